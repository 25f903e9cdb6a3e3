"""Peak memory of a stack's processes, sampled from /proc once a second.

Per process: the peak resident set (VmHWM from /proc/<pid>/status, the kernel's own high-water
mark, so it is exact as long as the process is seen once before it exits) and the peak private
memory (Private_Clean + Private_Dirty from smaps_rollup, i.e. USS, sampled; read for task
processes and executor workers only, the ones it is reported for, and less often than the rest:
see `PRIVATE_EVERY`). A task process is
recognised by the title Airflow's task runner gives it, `airflow worker -- <task instance id>`;
an executor worker by the title `airflow worker -- LocalExecutor` with a parent that is not one.
Also the peak of the summed RSS of all stack processes, and the CPU time each component of the
stack has used (`cpu_by_component`).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from pathlib import Path
from typing import Any

# What Airflow's executor titles its processes: a task process `<prefix><task instance id>`, a
# long-lived worker (the parent tasks fork from) `<prefix>LocalExecutor`.
_EXECUTOR_TITLE_PREFIX = "airflow worker -- "
_TASK_TITLE = re.compile(re.escape(_EXECUTOR_TITLE_PREFIX) + r"([0-9a-fA-F-]{32,36})\b")
_WORKER_TITLE = _EXECUTOR_TITLE_PREFIX + "LocalExecutor"
# Seconds between two reads of one process's smaps_rollup: the kernel walks the page tables of
# these 0.5-1 GB processes for it, about 20 ms each. Read every second for every task and worker,
# it took 15 % of a core from the stack it measures (py-spy on the bench process: 92 % of its
# samples in these reads). A task lives 2-4 s and is read at least once; a worker's private
# memory is set by its preload and hardly moves after it.
PRIVATE_EVERY = {"task": 2.0, "worker": 10.0}


def _status_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM from /proc/<pid>/status (cheap: counters the kernel keeps)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def _private_kb(pid: int) -> int | None:
    """Private_Clean + Private_Dirty from smaps_rollup (the kernel walks the process's page
    tables for it: milliseconds for each of these 0.5-1 GB processes, so only the processes whose
    private memory is reported are read)."""
    with contextlib.suppress(OSError):
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        private = [x for x in rollup if x.startswith(("Private_Clean:", "Private_Dirty:"))]
        return sum(int(line.split()[1]) for line in private)
    return None


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def process_cpu_seconds(pid: int | None) -> float | None:
    """CPU seconds of one process: its utime + stime and those of the children it has waited for
    (cutime + cstime), from /proc/<pid>/stat; None if it is gone."""
    import os

    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after the ")": state is field 3 of proc(5), so utime (14) .. cstime (17) are [11:15]
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


# The stack's components by their processes' titles (the first match wins; a process no title
# names belongs to its parent's component): the executor's workers and the task processes they
# fork, then the services `airflow standalone` and the launcher start.
COMPONENTS = (
    ("executor workers and tasks", (_EXECUTOR_TITLE_PREFIX, "celery worker", "celeryd:")),
    ("MLflow server", ("mlflow server", "mlflow.server")),
    ("scheduler", ("airflow scheduler",)),
    ("API server", ("airflow api-server", "airflow api_server")),
    ("DAG processor", ("airflow dag-processor", "airflow dag_processor")),
    ("triggerer", ("airflow triggerer",)),
)


def _component(title: str) -> str | None:
    return next((name for name, needles in COMPONENTS if any(n in title for n in needles)), None)


class MemorySampler(threading.Thread):
    """Samples every process under `roots` every `interval` seconds (see the module docstring)."""

    def __init__(self, roots: list[int], interval: float = 1.0) -> None:
        super().__init__(daemon=True, name="memory-sampler")
        self.roots = roots
        self.interval = interval
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.by_pid: dict[int, dict[str, Any]] = {}
        self.peak_total_kb = 0

    def _processes(self) -> list[int]:
        import psutil

        pids: list[int] = []
        for root in self.roots:
            with contextlib.suppress(psutil.Error):
                children = psutil.Process(root).children(recursive=True)
                pids += [root, *(p.pid for p in children)]
        return pids

    def sample(self) -> None:
        total = 0
        now = time.monotonic()
        for pid in self._processes():
            kb = _status_kb(pid)
            if not kb:
                continue
            title = _cmdline(pid)
            total += kb.get("VmRSS", 0)
            with self.lock:
                rec = self.by_pid.setdefault(
                    pid, {"hwm_kb": 0, "private_kb": 0, "ti_id": None, "title": title}
                )
                rec["hwm_kb"] = max(rec["hwm_kb"], kb.get("VmHWM", 0))
                match = _TASK_TITLE.search(title)
                if match:
                    rec["ti_id"] = match.group(1).replace("-", "").lower()
                    rec["title"] = title
                elif title.startswith(_WORKER_TITLE) and not _cmdline(_ppid(pid)).startswith(
                    _WORKER_TITLE
                ):
                    # (a task process keeps its parent worker's title until the task runner
                    # renames it: a worker is one whose parent is not a worker)
                    rec["worker"] = True
                kind = "task" if rec["ti_id"] else "worker" if rec.get("worker") else None
                due = kind is not None and now >= rec.get("private_at", 0.0)
                if due:
                    rec["private_at"] = now + PRIVATE_EVERY[kind]
            # Private memory is reported for tasks and workers only, and read on their own
            # schedule (PRIVATE_EVERY): the reads cost the pipeline it measures.
            private = _private_kb(pid) if due else None
            if private is not None:
                with self.lock:
                    rec["private_kb"] = max(rec["private_kb"], private)
        with self.lock:
            self.peak_total_kb = max(self.peak_total_kb, total)

    def run(self) -> None:
        while not self.stop_event.is_set():
            with contextlib.suppress(Exception):
                self.sample()
            self.stop_event.wait(self.interval)

    def by_task_instance(self) -> dict[str, dict[str, int]]:
        """{task instance id (hex, no dashes): peak hwm/private kB over its processes}."""
        out: dict[str, dict[str, int]] = {}
        with self.lock:
            for rec in self.by_pid.values():
                if rec["ti_id"]:
                    cur = out.setdefault(rec["ti_id"], {"hwm_kb": 0, "private_kb": 0})
                    cur["hwm_kb"] = max(cur["hwm_kb"], rec["hwm_kb"])
                    cur["private_kb"] = max(cur["private_kb"], rec["private_kb"])
        return out

    def workers(self) -> list[dict[str, int]]:
        """Peak memory of the executor's worker processes (the parents the tasks fork from)."""
        with self.lock:
            return [
                {"pid": pid, "hwm_kb": r["hwm_kb"], "private_kb": r["private_kb"]}
                for pid, r in self.by_pid.items()
                if r.get("worker") and not r["ti_id"]
            ]

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the live processes of the stack."""
        import psutil

        total = 0.0
        for pid in self._processes():
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
        return total

    def cpu_by_component(self) -> dict[str, float]:
        """CPU seconds (user + system) used so far by each component of the stack (`COMPONENTS`;
        `other` for the launcher's own `airflow standalone`): every live process's own time plus
        that of the children it has waited for (a task process, once its worker reaps it). The
        difference of two calls is what each component used in between: a child that ended in
        between moved from its own count into its parent's."""
        import psutil

        named: dict[int, str] = {}

        def component_of(pid: int) -> str:
            # The first title up the process tree that names a component (up to a root).
            path, current = [], pid
            while current not in named:
                found = _component(_cmdline(current))
                if found is not None:
                    named[current] = found
                    break
                path.append(current)
                if current in self.roots or current <= 1:
                    named[current] = "other"
                    break
                current = _ppid(current)
            for seen in path:
                named[seen] = named[current]
            return named[current]

        totals: dict[str, float] = {}
        for pid in self._processes():
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                used = t.user + t.system + t.children_user + t.children_system
                component = component_of(pid)
                totals[component] = totals.get(component, 0.0) + used
        return totals

    def reset_peak_total(self) -> None:
        with self.lock:
            self.peak_total_kb = 0
