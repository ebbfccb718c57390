"""Looking at running processes from outside: CPU seconds, RSS, /metrics scrapes."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

from bench.stats import counter_value, histogram_buckets


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (its threads included, children not)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def rss_bytes(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


@dataclass
class CpuWindow:
    """CPU used by some processes between ``start()`` and ``stop()``, and the wall time between."""

    pids: tuple[int, ...]
    started_wall: float = 0.0
    started_cpu: tuple[float, ...] = ()
    wall: float = 0.0
    cpu: tuple[float, ...] = ()

    @classmethod
    def of(cls, pids: Iterable[int]) -> CpuWindow:
        return cls(tuple(pids))

    def start(self) -> CpuWindow:
        self.started_cpu = tuple(cpu_seconds(p) for p in self.pids)
        self.started_wall = time.perf_counter()
        return self

    def stop(self) -> CpuWindow:
        self.wall = time.perf_counter() - self.started_wall
        self.cpu = tuple(cpu_seconds(p) - c for p, c in zip(self.pids, self.started_cpu, strict=True))
        return self

    @property
    def total_cpu(self) -> float:
        return sum(self.cpu)

    @property
    def cores(self) -> float:
        """Average cores busy over the window (1.0 = one core fully used)."""
        return self.total_cpu / self.wall if self.wall > 0 else 0.0


def scrape(port: int, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:  # noqa: S310
        return bytes(response.read()).decode("utf-8", "replace")


def scrape_histogram(ports: Iterable[int], name: str) -> dict[float, float]:
    """The histogram summed over several processes."""
    total: dict[float, float] = {}
    for port in ports:
        for bound, count in histogram_buckets(scrape(port), name).items():
            total[bound] = total.get(bound, 0.0) + count
    return total


def scrape_counter(ports: Iterable[int], name: str, **labels: str) -> float:
    return sum(counter_value(scrape(port), name, **labels) for port in ports)


def wait_until(predicate: object, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if callable(predicate) and predicate():
                return True
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(interval)
    return False
