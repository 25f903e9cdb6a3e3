"""The per-ticker lock in the MLflow registry (ml/registry/lock.py), on a real tracking server.

Holders are real processes where it matters: a lock held by a process that was SIGKILLed is
broken at once on its host; one whose heartbeat stopped (another host, as far as the waiter can
tell) after its ttl; a live holder makes the waiter wait, and give up after its timeout.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
from mlflow import MlflowClient

from ml.registry.lock import RegistryLockTimeout, is_lock, lock_name, registry_lock
from ml.servers import MlflowServer
from tests.faults.daykit import REPO


@pytest.fixture
def client(mlflow_server: MlflowServer) -> MlflowClient:
    return MlflowClient(mlflow_server.uri, mlflow_server.uri)


def _exists(client: MlflowClient, name: str) -> bool:
    return bool(client.search_registered_models(f"name = '{name}'"))


def _holder(uri: str, model: str) -> subprocess.Popen:
    """A child process that takes the lock, says so on stdout and sleeps holding it."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from mlflow import MlflowClient
        from ml.registry.lock import registry_lock
        with registry_lock(MlflowClient({uri!r}, {uri!r}), {model!r}, ttl=600):
            print("held", flush=True)
            time.sleep(600)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_the_lock_exists_while_held_and_is_gone_after(client: MlflowClient) -> None:
    name = lock_name("lock-basic")
    with registry_lock(client, "lock-basic") as owner:
        assert is_lock(name) and _exists(client, name)
        assert client.get_registered_model(name).tags["owner"] == owner
    assert not _exists(client, name), "the lock was not released"


def test_a_body_that_raises_still_releases(client: MlflowClient) -> None:
    with pytest.raises(RuntimeError), registry_lock(client, "lock-raises"):
        raise RuntimeError("boom")
    assert not _exists(client, lock_name("lock-raises"))


def test_a_live_holder_makes_the_waiter_time_out(client: MlflowClient, mlflow_server) -> None:
    holder = _holder(mlflow_server.uri, "lock-live")
    try:
        started = time.monotonic()
        with (
            pytest.raises(RegistryLockTimeout, match="still alive"),
            registry_lock(client, "lock-live", timeout=2),
        ):
            pass
        assert time.monotonic() - started >= 2
    finally:
        holder.kill()
        holder.wait()


def test_a_sigkilled_holder_on_this_host_is_broken_at_once(
    client: MlflowClient, mlflow_server
) -> None:
    holder = _holder(mlflow_server.uri, "lock-killed")
    holder.kill()  # SIGKILL: the holder cannot release
    holder.wait()
    assert _exists(client, lock_name("lock-killed")), "the killed holder's lock should remain"
    started = time.monotonic()
    with registry_lock(client, "lock-killed", ttl=600, timeout=30) as owner:
        assert client.get_registered_model(lock_name("lock-killed")).tags["owner"] == owner
    assert time.monotonic() - started < 10, "the dead holder's lock was not broken at once"


def test_a_holder_without_heartbeat_is_broken_after_its_ttl(client: MlflowClient) -> None:
    """A lock whose owner lives on another host (its pid cannot be checked from here) and whose
    heartbeat stopped: broken once the heartbeat is older than the ttl, not before."""
    name = lock_name("lock-remote")
    client.create_registered_model(
        name, tags={"owner": "elsewhere:1:abc", "heartbeat": f"{time.time():.3f}"}
    )
    with (
        pytest.raises(RegistryLockTimeout),
        registry_lock(client, "lock-remote", ttl=30, timeout=1),
    ):
        pass
    client.set_registered_model_tag(name, "heartbeat", f"{time.time() - 31:.3f}")
    with registry_lock(client, "lock-remote", ttl=30, timeout=10) as owner:
        assert client.get_registered_model(name).tags["owner"] == owner
    assert not _exists(client, name)


def test_the_holder_keeps_its_heartbeat_fresh(client: MlflowClient) -> None:
    name = lock_name("lock-heartbeat")
    with registry_lock(client, "lock-heartbeat", ttl=2):
        first = float(client.get_registered_model(name).tags["heartbeat"])
        time.sleep(1.5)
        later = float(client.get_registered_model(name).tags["heartbeat"])
    assert later > first, "the heartbeat thread did not refresh the lock"


def test_a_version_duplicated_by_a_retried_post_is_deleted(client: MlflowClient) -> None:
    """The MLflow client retries a request whose answer was lost, POSTs too: a server restarting
    during create_model_version can create the version twice. Made here by calling it twice for
    one run, as the retry would; `log_candidate` then keeps the first and deletes the other."""
    from ml.registry.client import find_versions
    from ml.registry.versions import drop_duplicate_versions

    name = "dup-post"
    client.create_registered_model(name)
    experiment = client.create_experiment("dup-post")
    run = client.create_run(experiment)
    client.set_terminated(run.info.run_id)
    created = [
        client.create_model_version(
            name,
            f"runs:/{run.info.run_id}/model",
            run_id=run.info.run_id,
            tags={"run_id": run.info.run_id},
        ).version
        for _ in range(2)
    ]
    kept = drop_duplicate_versions(client, name, run.info.run_id)
    assert kept is not None and kept.version == min(created, key=int)
    assert [v.version for v in find_versions(client, name)] == [kept.version]
