"""The failover drill, small: agents keep every call across a SIGKILLed node."""

from __future__ import annotations

from pathlib import Path

import pytest

from local_cluster.infra import Infrastructure
from ops.drill.__main__ import Drill, DrillOptions, print_report
from tests.e2e.conftest import running_cluster

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("fault", ["kill", "drain"])
def test_drill_loses_nothing(infra: Infrastructure, tmp_path: Path, fault: str) -> None:
    import asyncio

    options = DrillOptions(agents=30, cps=4, duration=14, fault=fault, fault_at=5, reconnect_delay=2.0,
                           settle_timeout=50)
    with running_cluster(infra, tmp_path) as cluster:
        result = asyncio.run(Drill(options, cluster).run())
    print_report(result, options.max_reconnect_seconds)
    assert result.affected > 0, "the fault should have disconnected some agents"
    assert result.calls_played > 20
    assert not result.not_reconnected
    assert not result.bad_snapshots
    assert result.lost == 0, [v for v in result.verdicts if not v.ok]
    assert max(result.reconnect_seconds) < options.max_reconnect_seconds


def test_drill_with_the_worker_pool_loses_nothing(infra: Infrastructure, tmp_path: Path) -> None:
    """The storm stage's agents (lean clients in 2 worker processes) through a real cluster and a node kill: the
    same verdict as the in-process agents, from the records the workers hand back."""
    import asyncio

    from ops.drill.workers import WorkerAgents

    options = DrillOptions(agents=40, cps=4, duration=14, fault="kill", fault_at=5, reconnect_delay=2.0,
                           settle_timeout=50, pool="workers")
    with running_cluster(infra, tmp_path) as cluster, WorkerAgents(2) as pool:
        workers = pool.pids
        result = asyncio.run(Drill(options, cluster, pool=pool).run())
    print_report(result, options.max_reconnect_seconds)
    assert len(workers) == 2
    assert result.agents == 40
    # node1 held about half the agents; each must have come back with a snapshot matching the simulator's truth
    assert 10 <= result.affected <= 40 and len(result.reconnect_seconds) >= result.affected
    assert result.calls_played > 20
    assert sum(v.expected for v in result.verdicts) > 20, "the judge must have had calls to check"
    assert not result.not_reconnected
    assert not result.bad_snapshots
    assert result.lost == 0, result.lost_detail
    assert max(result.reconnect_seconds) < options.max_reconnect_seconds
