"""Where tail latencies come from: GC pauses and event-loop lag, recorded inside the measured processes.

The bench cannot edit the gateway or the nodes, but it starts them: with ``CMS_BENCH_PAUSES_DIR`` set
and ``bench/_site`` on ``PYTHONPATH`` (see :func:`child_env`), Python imports ``bench/_site/sitecustomize.py``
at start-up, which calls :func:`install`. From then on

* every garbage collection is timed through ``gc.callbacks`` (start -> stop of each collection);
* a daemon thread probes the process's running event loop (found by wrapping asyncio's
  ``_set_running_loop``, which the standard loop and uvloop both call) with one
  ``call_soon_threadsafe`` at a time, every 50 ms: the delay until it runs is the loop's lag, i.e. how
  long something held the loop (a slow callback, a GC pause, the GIL held by another thread);
* the same thread writes what it saw to ``<dir>/<pid>.json`` twice a second (atomic rename).

The bench reads those files around a measured window (:func:`read_all`, :func:`window`) and prints
the pauses next to the tail latencies. Cumulative counters are exact; individual pauses are kept
from 0.2 ms (GC) and 1 ms (lag) up, the last :data:`KEEP` of each kind: what a tail can be blamed on.
Nothing here runs unless the variable is set; the cost when it is: one callback per collection and
20 probes a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stats import PauseSummary, summarize_pauses

ENV_DIR = "CMS_BENCH_PAUSES_DIR"
SITE_DIR = Path(__file__).resolve().parent / "_site"
KEEP = 5000
RECORD_FROM = 0.001  # loop lags kept one by one from here
RECORD_GC_FROM = 0.0002  # GC pauses kept one by one from here (a young collection takes tens of us)
PROBE_INTERVAL = 0.05
WRITE_INTERVAL = 0.5

__all__ = ["ENV_DIR", "PauseLog", "ProcessPauses", "child_env", "install", "read_all", "window"]


@dataclass
class PauseLog:
    """What one process saw. ``gc``/``lag``: ``(wall clock at the end, seconds)`` of the longer pauses;
    the counters cover every pause and every probe."""

    gc: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=KEEP))
    lag: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=KEEP))
    gc_count: int = 0
    gc_seconds: float = 0.0
    probes: int = 0
    lag_seconds: float = 0.0

    def to_json(self, pid: int, argv: list[str]) -> dict[str, Any]:
        return {"pid": pid, "argv": argv, "written_at": time.time(), "gc_count": self.gc_count,
                "gc_seconds": self.gc_seconds, "probes": self.probes, "lag_seconds": self.lag_seconds,
                "gc": [list(p) for p in self.gc], "lag": [list(p) for p in self.lag]}


class _GcTimer:
    def __init__(self, log: PauseLog) -> None:
        self.log = log
        self._started = 0.0

    def __call__(self, phase: str, info: Mapping[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        if not self._started:
            return
        pause = time.perf_counter() - self._started
        self._started = 0.0
        self.log.gc_count += 1
        self.log.gc_seconds += pause
        if pause >= RECORD_GC_FROM:
            self.log.gc.append((time.time(), pause))


class _LoopProbe(threading.Thread):
    """One probe in flight at a time: a loop blocked for 300 ms yields one 300 ms lag, not six."""

    def __init__(self, log: PauseLog, out: Path, loops: Callable[[], asyncio.AbstractEventLoop | None]) -> None:
        super().__init__(name="bench-pause-probe", daemon=True)
        self.log = log
        self.out = out
        self.loops = loops
        self._done = threading.Event()
        self._done.set()

    def _ran(self, scheduled: float) -> None:
        lag = max(0.0, time.perf_counter() - scheduled)
        self.log.probes += 1
        self.log.lag_seconds += lag
        if lag >= RECORD_FROM:
            self.log.lag.append((time.time(), lag))
        self._done.set()

    def run(self) -> None:
        last_write = 0.0
        while True:
            time.sleep(PROBE_INTERVAL)
            loop = self.loops()
            if loop is not None and self._done.is_set() and not loop.is_closed():
                self._done.clear()
                try:
                    loop.call_soon_threadsafe(self._ran, time.perf_counter())
                except RuntimeError:  # closed between the check and the call
                    self._done.set()
            now = time.monotonic()
            if now - last_write >= WRITE_INTERVAL:
                last_write = now
                self.write()

    def write(self) -> None:
        tmp = self.out.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(self.log.to_json(os.getpid(), sys.argv)))
            tmp.replace(self.out)


def install(directory: str | None = None) -> PauseLog | None:
    """Start recording in this process when ``CMS_BENCH_PAUSES_DIR`` (or ``directory``) names a folder."""
    folder = directory or os.environ.get(ENV_DIR)
    if not folder:
        return None
    out_dir = Path(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = PauseLog()
    gc.callbacks.append(_GcTimer(log))
    running: list[asyncio.AbstractEventLoop | None] = [None]
    import asyncio.events as events

    original = events._set_running_loop

    def remember(loop: asyncio.AbstractEventLoop | None) -> None:
        if loop is not None:
            running[0] = loop
        original(loop)

    # Both names: the standard loop calls events._set_running_loop, uvloop binds asyncio._set_running_loop
    # when it is imported (after this runs, since sitecustomize comes first).
    events._set_running_loop = remember
    asyncio._set_running_loop = remember
    _LoopProbe(log, out_dir / f"{os.getpid()}.json", lambda: running[0]).start()
    return log


def child_env(directory: Path, existing: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment additions that make a Python child record its pauses into ``directory``."""
    base = (existing or os.environ).get("PYTHONPATH", "")
    return {ENV_DIR: str(directory), "PYTHONPATH": str(SITE_DIR) + (os.pathsep + base if base else "")}


# ---- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessPauses:
    pid: int
    role: str
    gc_count: int
    gc_seconds: float
    probes: int
    gc: tuple[tuple[float, float], ...]
    lag: tuple[tuple[float, float], ...]


def role_of(argv: Iterable[str]) -> str:
    """A short name for a process from its command line: ``gateway``, ``node``, ``simulator``, ``python``."""
    text = " ".join(argv)
    for marker, role in (("ami_gateway", "gateway"), ("ws_node", "node"), ("ami_simulator", "simulator"),
                         ("bench.bare_server", "bare"), ("bench", "bench")):
        if marker in text:
            return role
    return "python"


def read_all(directory: Path) -> dict[int, ProcessPauses]:
    """Every process's latest file in ``directory`` (unreadable or half-written files are skipped)."""
    out: dict[int, ProcessPauses] = {}
    if not directory.is_dir():
        return out
    for path in directory.glob("*.json"):
        try:
            doc = json.loads(path.read_text())
            pauses = ProcessPauses(int(doc["pid"]), role_of(doc.get("argv", [])), int(doc["gc_count"]),
                                   float(doc["gc_seconds"]), int(doc["probes"]),
                                   tuple((float(t), float(d)) for t, d in doc["gc"]),
                                   tuple((float(t), float(d)) for t, d in doc["lag"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        out[pauses.pid] = pauses
    return out


@dataclass(frozen=True)
class WindowPauses:
    """Pauses of one role (all its processes) within ``[start, end]`` wall clock."""

    role: str
    processes: int
    gc_count: int
    gc_seconds: float
    gc: PauseSummary
    lag: PauseSummary


def window(before: Mapping[int, ProcessPauses], after: Mapping[int, ProcessPauses], start: float,
           end: float) -> dict[str, WindowPauses]:
    """Per role: collections and GC seconds between two reads (exact), and the >= 1 ms GC pauses and loop
    lags that ended inside the window (from the kept lists)."""
    roles: dict[str, list[ProcessPauses]] = {}
    for later in after.values():
        roles.setdefault(later.role, []).append(later)
    out: dict[str, WindowPauses] = {}
    for role, processes in sorted(roles.items()):
        gc_count = gc_seconds = 0.0
        gcs: list[float] = []
        lags: list[float] = []
        for later in processes:
            earlier = before.get(later.pid)
            gc_count += later.gc_count - (earlier.gc_count if earlier else 0)
            gc_seconds += later.gc_seconds - (earlier.gc_seconds if earlier else 0.0)
            gcs.extend(d for t, d in later.gc if start <= t <= end)
            lags.extend(d for t, d in later.lag if start <= t <= end)
        out[role] = WindowPauses(role, len(processes), int(gc_count), gc_seconds, summarize_pauses(gcs),
                                 summarize_pauses(lags))
    return out
