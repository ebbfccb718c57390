"""Our process_* series against prometheus_client's own collector, in this very process."""

from __future__ import annotations

import os
import socket

from prometheus_client import REGISTRY, ProcessCollector

from services import infra_metrics  # noqa: F401  (installs ProcessMetrics, as every process does)
from services.process_metrics import ProcessMetrics, open_descriptors


def samples(collector: object) -> dict[str, float]:
    return {s.name: s.value for family in collector.collect() for s in family.samples}  # type: ignore[attr-defined]


def test_the_same_series_and_values_as_prometheus_clients_collector() -> None:
    held = [socket.socket() for _ in range(300)]  # descriptors worth counting
    try:
        ours, theirs = samples(ProcessMetrics()), samples(ProcessCollector(registry=None))
    finally:
        for sock in held:
            sock.close()
    assert set(ours) == set(theirs) == {
        "process_virtual_memory_bytes", "process_resident_memory_bytes", "process_start_time_seconds",
        "process_cpu_seconds_total", "process_open_fds", "process_max_fds",
    }
    # the listing counts the descriptor it reads the directory through; the size does not
    assert ours["process_open_fds"] == theirs["process_open_fds"] - 1 >= 300
    assert ours["process_max_fds"] == theirs["process_max_fds"]
    assert ours["process_start_time_seconds"] == theirs["process_start_time_seconds"]
    assert abs(ours["process_cpu_seconds_total"] - theirs["process_cpu_seconds_total"]) < 0.5
    assert abs(ours["process_resident_memory_bytes"] - theirs["process_resident_memory_bytes"]) < 16 * 2**20


def test_open_descriptors_counts_as_the_listing_does() -> None:
    before = open_descriptors()
    read, write = os.pipe()
    try:
        assert open_descriptors() == before + 2 == len(os.listdir("/proc/self/fd")) - 1  # listdir's own fd
    finally:
        os.close(read)
        os.close(write)


def test_the_registry_serves_ours_once() -> None:
    collectors = list(REGISTRY._collector_to_names)  # noqa: SLF001
    assert sum(isinstance(c, ProcessMetrics) for c in collectors) == 1
    assert not any(type(c) is ProcessCollector for c in collectors)
