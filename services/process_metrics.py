"""The ``process_*`` series every exporter has, without listing ``/proc/self/fd`` on every scrape.

prometheus_client's default ``ProcessCollector`` counts open descriptors with
``os.listdir("/proc/self/fd")``: on a node holding thousands of agent sockets that builds a list of
thousands of names on the event loop at each scrape. During a reconnect storm, with /metrics read twice a
second, it was 7.9 % of the survivor node's CPU (docs/performance.md); in production it is a loop stall
per Prometheus scrape that grows with the node's agents. Linux 6.2 and later report the number of open
descriptors as the size of that directory; on an older kernel (size 0) the listing is still done.

Same names, help and types as prometheus_client's, so dashboards and alert rules see no difference.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import PROCESS_COLLECTOR, REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


def open_descriptors(fd_dir: str = "/proc/self/fd") -> int:
    size = os.stat(fd_dir).st_size
    # (the listing, as prometheus_client counts, includes the descriptor it reads the directory through)
    return size if size > 0 else len(os.listdir(fd_dir))


class ProcessMetrics(Collector):
    def __init__(self, proc: str = "/proc") -> None:
        self._self = os.path.join(proc, "self")
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._page_size = os.sysconf("SC_PAGE_SIZE")
        self._boot_time = 0.0
        with open(os.path.join(proc, "stat"), "rb") as stat:
            for line in stat:
                if line.startswith(b"btime "):
                    self._boot_time = float(line.split()[1])
                    break

    def collect(self) -> Iterable[Metric]:
        try:
            with open(os.path.join(self._self, "stat"), "rb") as handle:
                raw = handle.read()
        except OSError:
            return []
        # the fields after the command name, which may itself hold spaces and parentheses
        fields = raw[raw.rindex(b")") + 2:].split()
        result: list[Metric] = [
            GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.", value=float(fields[20])),
            GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes.",
                              value=float(fields[21]) * self._page_size),
            GaugeMetricFamily("process_start_time_seconds", "Start time of the process since unix epoch in seconds.",
                              value=float(fields[19]) / self._ticks + self._boot_time),
            CounterMetricFamily("process_cpu_seconds", "Total user and system CPU time spent in seconds.",
                                value=(float(fields[11]) + float(fields[12])) / self._ticks),
        ]
        try:
            with open(os.path.join(self._self, "limits"), "rb") as limits:
                max_fds = next((float(line.split()[3]) for line in limits if line.startswith(b"Max open file")), None)
            result.append(GaugeMetricFamily("process_open_fds", "Number of open file descriptors.",
                                            value=float(open_descriptors(os.path.join(self._self, "fd")))))
            if max_fds is not None:
                result.append(GaugeMetricFamily("process_max_fds", "Maximum number of open file descriptors.",
                                                value=max_fds))
        except OSError:
            pass
        return result


def use_process_metrics(registry: CollectorRegistry = REGISTRY) -> None:
    """Swap prometheus_client's process collector for :class:`ProcessMetrics` (idempotent; not on non-Linux)."""
    if not os.path.isdir("/proc/self/fd"):
        return
    try:
        registry.unregister(PROCESS_COLLECTOR)
    except KeyError:
        return  # already swapped (or never there)
    registry.register(ProcessMetrics())
