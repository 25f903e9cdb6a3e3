"""bench/memory.py: the CPU time each component of a stack uses, read from /proc for a real
process tree (a parent titled like Airflow's scheduler, one child without a title of its own that
is still running and one that has ended and been reaped, and an executor-worker-titled child)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from memory import MemorySampler  # noqa: E402

BURN = "import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass\n"

# The parent burns CPU, starts an untitled child that burns and exits (reaped: its time moves to
# the parent's children), one that burns and stays, and one titled like an executor worker.
PARENT = f"""
import subprocess, sys, time
{BURN.format(seconds=0.3)}
done = subprocess.run([sys.executable, "-c", {BURN.format(seconds=0.4)!r}])
stays = subprocess.Popen([sys.executable, "-c", {BURN.format(seconds=0.3)!r} + "time.sleep(60)"])
worker = subprocess.Popen(
    [sys.executable, "-c", {BURN.format(seconds=0.5)!r} + "time.sleep(60)",
     "airflow worker " + "-- LocalExecutor"]  # (not the title's text in the parent's own)
)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux only)")
def test_cpu_is_counted_under_the_component_that_started_it() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, "airflow scheduler"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline().strip() == "ready"
        # The two children that stay finish burning: a second on an idle machine, longer on a
        # loaded one (a fixed sleep read them half-way there).
        deadline = time.monotonic() + 20
        while True:
            cpu = MemorySampler([parent.pid]).cpu_by_component()
            burnt = (
                cpu.get("scheduler", 0) >= 1.0 and cpu.get("executor workers and tasks", 0) >= 0.5
            )
            if burnt or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        parent.kill()
        parent.wait()
    # The parent's 0.3 s, the reaped child's 0.4 s and the untitled child's 0.3 s, each with its
    # interpreter's start (some tens of ms); the titled child counts apart.
    assert set(cpu) == {"scheduler", "executor workers and tasks"}
    assert 1.0 <= cpu["scheduler"] < 2.5
    assert 0.5 <= cpu["executor workers and tasks"] < 1.2
