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
