"""The MLflow client, the experiment, aliases and version searches: what every registry step uses."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from ml.config import PROJECT_ROOT, Settings, redact_url

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

CHAMPION = "champion"

CHALLENGER = "challenger"

# MLflow's HTTP retries (`mlflow.utils.rest_utils.http_request`, urllib3's Retry): after the k-th
# failed try in a row it sleeps 0 s (k = 1), then BACKOFF_FACTOR * 2**(k-1) s (factor 2 unless
# MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR says otherwise), at most 120 s; at most 10 retries.
_MLFLOW_BACKOFF_FACTOR = 2
_MLFLOW_BACKOFF_MAX = 120.0
_MLFLOW_MAX_RETRIES_LIMIT = 10


class MlflowUnreachable(ConnectionError):
    """The tracking server did not answer within MLFLOW_UNREACHABLE_TIMEOUT; the message names it."""


def mlflow_retry_budget(retries: int, factor: float = _MLFLOW_BACKOFF_FACTOR) -> float:
    """Seconds MLflow's client sleeps between the tries of one request that fails `retries` + 1
    times (jitter aside: up to 1 s more per retry)."""
    return sum(
        min(_MLFLOW_BACKOFF_MAX, factor * 2 ** (k - 1)) if k > 1 else 0.0
        for k in range(1, retries + 1)
    )


def mlflow_retries_within(timeout: float, factor: float = _MLFLOW_BACKOFF_FACTOR) -> int:
    """The most retries whose backoff fits in `timeout` seconds, and at least one (a connection
    dropped once is tried again at once). 60 s: 5 retries, after 0, 4, 8, 16 and 32 s."""
    retries = 1
    while (
        retries < _MLFLOW_MAX_RETRIES_LIMIT and mlflow_retry_budget(retries + 1, factor) <= timeout
    ):
        retries += 1
    return retries


# (pid, tracking URI) -> None once the server answered in this process, or the error saying it
# did not: a process asks once, and its later steps and tickers fail at once instead of waiting
# again. The pid keeps a forked child (the preloading executor's tasks) from trusting its
# parent's answer.
_REACHED: dict[tuple[int, str], MlflowUnreachable | None] = {}


def ensure_reachable(settings: Settings) -> None:
    """Wait until the tracking server answers (any HTTP answer but a gateway's 502/503/504) for
    at most `settings.mlflow_unreachable_timeout` seconds, else raise MlflowUnreachable naming
    it. Once per process and URI; HTTP(S) URIs only (a local store has no server).

    Without it, a step facing a server that is down waits out MLflow's retries on each request
    it makes, one after another: minutes per ticker."""
    import ssl
    import urllib.error
    import urllib.request

    uri = settings.mlflow_tracking_uri.rstrip("/")
    if not uri.startswith(("http://", "https://")):
        return
    key = (os.getpid(), uri)
    if key in _REACHED:
        if _REACHED[key] is not None:
            raise _REACHED[key]
        return
    timeout = settings.mlflow_unreachable_timeout
    deadline = time.monotonic() + timeout
    delay, last = 0.25, ""
    while True:
        wait = min(5.0, max(0.5, deadline - time.monotonic()))
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=wait):
                break
        except urllib.error.HTTPError as exc:
            if exc.code not in (502, 503, 504):
                break  # it answers: MLflow's own request reports what it says
            last = f"HTTP {exc.code} {exc.reason}"
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLError):
                break  # something speaks TLS: MLflow's request checks it with its own settings
            last = str(exc.reason)
        except OSError as exc:  # a timeout, a connection reset
            last = str(exc) or type(exc).__name__
        left = deadline - time.monotonic()
        if left <= 0:
            _REACHED[key] = MlflowUnreachable(
                f"the MLflow tracking server {redact_url(uri)} (MLFLOW_TRACKING_URI) did not "
                f"answer within {timeout:g} s (MLFLOW_UNREACHABLE_TIMEOUT; {last}): start it or "
                "fix the URI, then run the step again (the DAG's task retries do)"
            )
            raise _REACHED[key]
        time.sleep(min(delay, left))
        delay = min(delay * 2, 5.0)
    _REACHED[key] = None


@lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the code that trained a model (or CODE_VERSION, or 'unknown')."""
    if os.environ.get("CODE_VERSION"):
        return os.environ["CODE_VERSION"]
    try:
        out = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        dirty = subprocess.run(
            [
                "git",
                "--no-optional-locks",
                "-C",
                str(PROJECT_ROOT),
                "status",
                "--porcelain",
                "--untracked-files=no",
            ],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def warm_caches() -> None:
    """Fill, once, the caches MLflow and `code_version` fill on the first run or model of a
    process.

    To check a model's pip requirements against what is installed, MLflow maps every installed
    distribution to its top-level modules (`mlflow.utils.requirements_utils`), reading the
    metadata of all of them: about 1 s on this project's environment, in every train, promote
    and forecast task, since each is a fresh process. Called once in a process that forks the
    tasks (the preloading executor's workers, `PRELOAD_WARMUP`), the map is inherited. So are
    the git facts MLflow tags each run with and the commit `code_version` tags each model with;
    they describe the code the worker imported, which is the code its tasks run. Safe before a
    fork: plain Python data, no threads, no sockets (the git subprocesses have exited).
    """
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils import requirements_utils

    requirements_utils._init_modules_to_packages_map()
    # The run context every `start_run` resolves: MLflow's git provider opens the repository of
    # the process's main file (in a task, the `airflow` script of the checkout's venv) three
    # times, for commit, branch and remote, and keeps the answer for the process.
    resolve_tags()
    code_version()  # two `git` subprocesses, once per process (lru_cache)


def get_client(settings: Settings) -> MlflowClient:
    """The client of the tracking server, once it answered (`ensure_reachable`; raises
    MlflowUnreachable). A request that meets the server away later retries for at most
    MLFLOW_UNREACHABLE_TIMEOUT too, unless MLFLOW_HTTP_REQUEST_MAX_RETRIES says otherwise: MLflow's
    default, 7 retries, waits about 4 minutes per request."""
    factor = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR") or _MLFLOW_BACKOFF_FACTOR)
    os.environ.setdefault(
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        str(mlflow_retries_within(settings.mlflow_unreachable_timeout, factor)),
    )
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # Ending a run, MLflow prints its URL, which costs a request for the run; the train step
    # logs that URL itself (`ml.registry.tracking`).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow import MlflowClient

    ensure_reachable(settings)
    uri = settings.mlflow_tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created concurrently by another task
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def get_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version behind `alias`, None if the model or alias does not exist. Any other error
    (server down, internal error) is raised: it must never look like "no champion"."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


_SAFE = r"[A-Za-z0-9_.:=+-]*"


def _checked(text: str, what: str) -> str:
    """`text` as it is, if it is safe to quote in a search filter (our own slugs, hashes and
    dates); else ValueError naming `what`."""
    import re

    if not re.fullmatch(_SAFE, text):
        raise ValueError(f"unsafe {what}")
    return text


def _tag_terms(tags: dict[str, str]) -> list[str]:
    for key, value in tags.items():
        _checked(f"{key}{value}", f"tag filter {key}={value!r}")
    return [f"tags.{key} = '{value}'" for key, value in tags.items()]


def _with_tags(versions: Iterable[ModelVersion], tags: dict[str, str]) -> list[ModelVersion]:
    """The versions whose tags equal all of `tags` (the server's tag filter, checked again)."""
    return [v for v in versions if all(v.tags.get(k) == val for k, val in tags.items())]


def find_versions(client: MlflowClient, name: str, **tags: str) -> list[ModelVersion]:
    """Versions of `name` whose tags match all of `tags`, newest first.

    The tags are filtered by the tracking server (one query, whatever the number of versions);
    names and values are our own slugs, hashes and dates, checked here before they are quoted.
    """
    terms = [f"name = '{name}'", *_tag_terms(tags)]
    versions, token = [], None
    while True:
        page = client.search_model_versions(" AND ".join(terms), max_results=1000, page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            break
    return sorted(_with_tags(versions, tags), key=lambda v: int(v.version), reverse=True)


def newest_versions(
    client: MlflowClient, names: Sequence[str], limit: int, **tags: str
) -> tuple[list[ModelVersion], bool]:
    """The `limit` most recently created versions of any of the models `names` whose tags match
    `tags`, newest first, in one request; and whether they are all there are.

    For each model, the versions returned are its newest matching ones (a model's versions are
    numbered in the order they are created): whoever looks for a model's newest version with
    some property finds it here when any version of that model here has it. Not when none
    does and the answer is cut at `limit`: then ask that model alone (`find_versions`).
    """
    if not names:
        return [], True
    quoted = ", ".join(f"'{_checked(n, f'model name {n!r}')}'" for n in names)
    terms = [f"name IN ({quoted})", *_tag_terms(tags)]
    page = client.search_model_versions(
        " AND ".join(terms),
        max_results=limit,
        order_by=["creation_timestamp DESC", "version_number DESC"],
    )
    return _with_tags(page, tags), not page.token


def registered_models(client: MlflowClient, prefix: str) -> dict[str, Any]:
    """Every registered model whose name starts with `prefix` (RegisteredModel, with its aliases
    and its latest version), by name: one request per thousand models."""
    _checked(prefix, f"model name prefix {prefix!r}")
    models: dict[str, Any] = {}
    token = None
    while True:
        page = client.search_registered_models(
            filter_string=f"name LIKE '{prefix}%'", max_results=1000, page_token=token
        )
        models.update({m.name: m for m in page if m.name.startswith(prefix)})
        token = page.token
        if not token:
            return models
