"""A per-ticker lock that the MLflow registry's own database provides.

Two processes can work on the same ticker and date at once: a zombie task beside its retry, a
manual run or backfill overlapping the schedule, the CLI beside the DAG, on different hosts and
with different `DATA_DIR`s. A file lock under `DATA_DIR` cannot serialize them; the registry can.
Registered-model names are unique in its database (a primary key), so creating the registered
model `lock.<model name>` succeeds for exactly one caller at a time: that is the lock. Its tags
say who holds it (`owner`: host, pid, a random token) and when it last proved alive
(`heartbeat`, refreshed by a thread while the lock is held). The holder deletes it on release.

A holder that died (SIGKILL, OOM, a lost node) cannot release. Its lock is broken when its pid
no longer runs on this host, or when its heartbeat is older than the lock's `ttl` (another host:
hosts' clocks must agree to within a fraction of the ttl, as NTP gives). Breaking is
delete-if-owner-unchanged: two waiters that both see the same dead holder both delete it, and
the create that follows still admits one. The window left is a waiter that read the dead owner,
then slept past another's break-and-create: keep `ttl` well above a request's latency.

Held around check-train-register (`ml.steps.model.train_step`) and the gate
(`ml.registry.promote_if_better`): exactly one version per (ticker, bars, config) and one
promotion, however many processes try (docs/architecture.md, "One writer per ticker").
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ml.config import HEARTBEATS_PER_TTL
from ml.data.store import pid_alive

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

LOCK_PREFIX = "lock."
_HOST = socket.gethostname()


class RegistryLockTimeout(TimeoutError):
    """The lock stayed held by a live owner for longer than the caller would wait."""


def lock_name(model_name: str) -> str:
    return f"{LOCK_PREFIX}{model_name}"


def is_lock(name: str) -> bool:
    """Whether a registered model is one of these locks (not a model)."""
    return name.startswith(LOCK_PREFIX)


def _stale(tags: dict[str, str], ttl: float) -> str | None:
    """Why the holder described by `tags` is gone, or None while it may be alive."""
    host, _, rest = tags.get("owner", "").partition(":")
    pid = rest.partition(":")[0]
    if host == _HOST and pid.isdigit() and not pid_alive(int(pid)):
        return f"its process {pid} on this host is gone"
    try:
        age = time.time() - float(tags.get("heartbeat", "0"))
    except ValueError:
        age = float("inf")
    if age > ttl:
        return f"no heartbeat for {age:.0f} s (ttl {ttl:.0f} s)"
    return None


def _error_code(exc: Exception) -> str:
    return getattr(exc, "error_code", "")


@contextmanager
def registry_lock(
    client: MlflowClient, model_name: str, *, ttl: float = 120.0, timeout: float = 3600.0
) -> Iterator[str]:
    """Hold `lock.<model_name>` in the registry for the body; yields the owner token.

    Waits (with jittered backoff) while a live owner holds it, breaks it when the owner is gone
    (see the module docstring), and raises RegistryLockTimeout after `timeout` seconds.
    """
    from mlflow.exceptions import MlflowException

    name = lock_name(model_name)
    owner = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + timeout
    delay = 0.1
    holder = ""
    while True:
        try:
            client.create_registered_model(
                name,
                tags={"owner": owner, "heartbeat": f"{time.time():.3f}"},
                description="A lock held while one process trains or promotes this ticker "
                "(ml/registry/lock.py). It is deleted on release; do not use it as a model.",
            )
            break
        except MlflowException as exc:
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            tags = dict(client.get_registered_model(name).tags)
        except MlflowException as exc:
            if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                continue  # released between our create and this read: try again at once
            raise
        holder = tags.get("owner", "?")
        if holder == owner:
            break  # our create went through but its answer was lost; the client's retry saw it
        reason = _stale(tags, ttl)
        if reason is not None:
            log.warning("breaking %s held by %s: %s", name, holder, reason)
            _delete_if_owner(client, name, holder)
            continue
        if time.monotonic() > deadline:
            raise RegistryLockTimeout(
                f"{name} is held by {holder} (still alive) for longer than {timeout:.0f} s"
            )
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 5.0)
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat,
        args=(client, name, stop, ttl / HEARTBEATS_PER_TTL),
        name=f"{name}-heartbeat",
        daemon=True,
    )
    beat.start()
    try:
        yield owner
    finally:
        stop.set()
        beat.join()
        _delete_if_owner(client, name, owner)


def _heartbeat(client: MlflowClient, name: str, stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        try:
            client.set_registered_model_tag(name, "heartbeat", f"{time.time():.3f}")
        except Exception as exc:  # the server restarting: the next beat may get through
            log.warning("heartbeat of %s failed: %s", name, exc)


def _delete_if_owner(client: MlflowClient, name: str, owner: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        if client.get_registered_model(name).tags.get("owner") == owner:
            client.delete_registered_model(name)
    except MlflowException as exc:
        if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
            raise
