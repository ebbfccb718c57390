"""The bench's side probes (bench/side_probes.py) against the real RabbitMQ and Redis, and through a TCP
proxy that holds the broker: a stalled engine must show in the probe, not be averaged away."""

from __future__ import annotations

import time

import pytest

from bench.side_probes import SideProbes
from bench.stages_gateway import _host_port, _swap_port
from local_cluster.infra import Infrastructure
from ops.chaos.fault_proxy import BLACKHOLE, PASS, ProxyThread

pytestmark = pytest.mark.integration


def test_probes_measure_both_engines(infra: Infrastructure) -> None:
    started = time.time()
    with SideProbes(infra.amqp_url, infra.redis_url) as probes:
        time.sleep(1.5)
    ended = time.time()
    assert not probes.errors
    redis_rtts, broker_hops = probes.within(started, ended)
    assert len(redis_rtts) >= 20  # every 10 ms, on a busy machine far fewer than 150
    assert len(broker_hops) >= 5  # every 50 ms
    assert all(0 < d < 1.0 for d in redis_rtts + broker_hops)
    assert probes.within(ended + 10, ended + 20) == ([], [])


def test_a_held_broker_shows_as_a_long_hop(infra: Infrastructure) -> None:
    proxy = ProxyThread("broker", *_host_port(infra.amqp_url, 5672)).start()
    try:
        with SideProbes(_swap_port(infra.amqp_url, proxy.port), infra.redis_url) as probes:
            deadline = time.monotonic() + 15
            while not probes.broker and time.monotonic() < deadline:
                time.sleep(0.05)
            assert probes.broker, f"no broker hop through the proxy: {probes.errors}"
            proxy.set_fault(BLACKHOLE)
            time.sleep(0.6)
            proxy.set_fault(PASS)
            time.sleep(0.5)
    finally:
        proxy.stop()
    assert max(d for _, d in probes.broker) >= 0.4
