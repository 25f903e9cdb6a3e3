"""`ml.steps.common.in_processes`: the batch steps' CPU-bound per-ticker work (validate's GX
suites, forecast's Keras loads) spread over forked processes.

Real processes (`os.fork` through multiprocessing), real signals; what the children compute is
plain Python here, and real validation in the last test (the same tickers validated with and
without workers must leave byte-identical stores).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from ml.quality.validation import PriceValidationError
from ml.steps import common
from ml.steps.common import WorkerDied, in_processes
from tests.conftest import staged_with_a_bad_batch

log = logging.getLogger("tests.step_processes")


@pytest.fixture
def forkable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pytest process may have started TensorFlow in an earlier test (then `in_processes`
    stays in this process on purpose); these children never touch TensorFlow, so fork anyway."""
    monkeypatch.setattr(common, "tensorflow_started", lambda: False)


NO_ROWS = {
    "check": "rows",
    "expectation": "expect_table_row_count_to_be_between",
    "columns": [],
    "reason": "a batch has at least one bar",
    "examples": [],
}


def _work(n: int) -> tuple[int, int]:
    log.warning("item %d in %d", n, os.getpid())
    if n == 2:
        raise ValueError("two")
    if n == 3:
        raise PriceValidationError("TKR", [NO_ROWS], {"success": False}, "no rows")
    return n * 10, os.getpid()


def test_the_work_runs_in_forked_processes_in_the_items_order(
    forkable: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tests.step_processes")
    out = in_processes(_work, range(7), workers=2)

    assert [item for item, _, _ in out] == list(range(7))
    assert [r[0] if r else None for _, r, _ in out] == [0, 10, None, None, 40, 50, 60]
    pids = {r[1] for _, r, _ in out if r}
    assert len(pids) == 2 and os.getpid() not in pids  # two children, not this process
    errors = {item: exc for item, _, exc in out if exc is not None}
    assert isinstance(errors[2], ValueError) and str(errors[2]) == "two"
    # The step's own exception crosses the process boundary with what the report needs.
    assert isinstance(errors[3], PriceValidationError)
    assert errors[3].ticker == "TKR" and errors[3].failures == [NO_ROWS]
    assert str(errors[3]).startswith("TKR: price validation failed: no rows")
    # The children's log records are logged again here, one per item.
    messages = [r.getMessage() for r in caplog.records if r.name == "tests.step_processes"]
    assert sorted(m.split()[1] for m in messages) == [str(n) for n in range(7)]
    assert all(int(m.split()[-1]) in pids for m in messages)


def test_a_result_that_cannot_cross_processes_is_that_items_error(forkable: None) -> None:
    out = in_processes(lambda n: (lambda: n) if n == 1 else n, range(4), workers=2)
    assert [r for _, r, _ in out] == [0, None, 2, 3]
    assert isinstance(out[1][2], RuntimeError)


def _kill_on_three(args: tuple[int, str]) -> int:
    n, folder = args
    if n == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    Path(folder, str(n)).write_text(str(os.getpid()))
    return n


def test_a_killed_worker_fails_the_step_after_the_others_finished(
    forkable: None, tmp_path: Path
) -> None:
    items = [(n, str(tmp_path)) for n in range(6)]
    with pytest.raises(WorkerDied) as excinfo:
        in_processes(_kill_on_three, items, workers=2)
    assert "exit code -9" in str(excinfo.value)
    # The worker with the odd items died at 3 (after 1); the other did all of its share.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1", "2", "4"]


def _in_a_daemon(queue) -> None:
    out = in_processes(_work, [0, 1, 4, 5, 6], workers=2)
    queue.put((os.getpid(), [r for _, r, _ in out]))


def test_the_workers_start_in_a_daemonic_process(forkable: None) -> None:
    """A Celery worker runs each task in a daemonic process, which `multiprocessing` forbids to
    have children ("daemonic processes are not allowed to have children"); plain forks work."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    daemon = context.Process(target=_in_a_daemon, args=(queue,), daemon=True)
    daemon.start()
    parent, results = queue.get(timeout=120)
    daemon.join(timeout=120)
    assert daemon.exitcode == 0
    assert [r[0] for r in results] == [0, 10, 40, 50, 60]
    pids = {r[1] for r in results}
    assert len(pids) == 2 and parent not in pids


def test_few_items_or_a_started_tensorflow_keep_the_work_here(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(common, "tensorflow_started", lambda: False)
    few = in_processes(_work, [0, 1, 4], workers=2)  # fewer than FORK_MIN_ITEMS
    assert {r[1] for _, r, _ in few} == {os.getpid()}
    monkeypatch.setattr(common, "tensorflow_started", lambda: True)
    many = in_processes(_work, [0, 1, 4, 5, 6], workers=2)
    assert {r[1] for _, r, _ in many} == {os.getpid()}


def test_tensorflow_counts_as_started_after_its_first_operation_only() -> None:
    """A forked child of a process whose TensorFlow runtime runs would hang in its first
    operation; importing TensorFlow and Keras alone starts nothing (a fresh interpreter)."""
    code = (
        "from ml.steps.common import tensorflow_started as s\n"
        "a = s()\n"
        "import tensorflow as tf, keras\n"
        "b = s()\n"
        "tf.constant(1.0) + 1.0\n"
        "print(a, b, s())\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False", "True"]


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "locks" not in p.parts
    }


def test_validate_with_workers_leaves_the_store_a_serial_validate_leaves(
    forkable: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Five tickers, one with a bad batch: the validation over two processes publishes,
    quarantines and reports exactly what one process does."""
    from ml.steps.data import validate_all

    as_of = date(2023, 12, 29)
    tickers = {f"TK{c}": f"Ticker {c}" for c in "ABCDE"}
    outcomes = {}
    for mode, min_items in (("serial", 10**6), ("workers", 4)):
        monkeypatch.setattr(common, "FORK_MIN_ITEMS", min_items)
        (tmp_path / mode).mkdir()
        settings = staged_with_a_bad_batch(tmp_path / mode, tickers, "TKC", as_of)
        result = validate_all(list(tickers), as_of, settings, check_registry=False)
        outcomes[mode] = (result, _digests(settings.data_dir))

    serial, workers = outcomes["serial"], outcomes["workers"]
    assert list(workers[0]["failed"]) == ["TKC"] and "high_ge_low" in workers[0]["failed"]["TKC"]
    assert list(workers[0]["tickers"]) == ["TKA", "TKB", "TKD", "TKE"]
    assert workers[0] == serial[0]
    assert workers[1] == serial[1]  # prices, reports, the quarantined batch: byte for byte
    assert any("quarantine" in name for name in workers[1])
