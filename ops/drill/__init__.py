"""Failover drill (``python -m ops.drill``); ``bench_figures`` is what ``make bench`` calls."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def bench_figures(*, quick: bool, amqp_url: str, redis_url: str, run_dir: Path) -> Mapping[str, float]:
    """Issue 6's failover target: kill -9 one of two nodes holding 1,000 agents under ~100 events/s."""
    import asyncio

    from local_cluster.launcher import ClusterOptions, LocalCluster
    from ops.drill.__main__ import Drill, DrillOptions
    from ops.drill.truth import percentile

    # One inbound answered call is about 30 AMI events, so 3.5 calls/s is about 100 events/s.
    options = DrillOptions(agents=100 if quick else 1000, cps=3.5, duration=12 if quick else 30,
                           fault="kill", fault_at=4 if quick else 10, reconnect_delay=5.0)
    cluster = LocalCluster(ClusterOptions.ephemeral(run_dir, amqp_url=amqp_url, redis_url=redis_url))
    cluster.start(timeout=90)
    try:
        result = asyncio.run(Drill(options, cluster).run())
    finally:
        cluster.stop()
    reconnects = result.reconnect_seconds
    within = sum(1 for s in reconnects if s <= options.max_reconnect_seconds)
    return {
        "reconnected_within_5s_fraction": within / len(reconnects) if reconnects else 0.0,
        "snapshot_correct_fraction": 1.0 - len(result.bad_snapshots) / len(reconnects) if reconnects else 0.0,
        "calls_lost": float(result.lost),
        "reconnect_p99_seconds": percentile(reconnects, 99),
        "agents": float(result.agents),
        "agents_affected": float(result.affected),
        "agents_never_reconnected": float(len(result.not_reconnected)),
    }
