"""`make chaos`, short: a node SIGKILLed, the active gateway SIGKILLed (the standby takes over), RabbitMQ
unreachable, Redis restarted empty, the whole cluster restarted over its state, the AMI link cut, under call
traffic with agents on both transports, on private RabbitMQ and Redis behind fault proxies.

Each fault's verdict is computed by ops/chaos/verdict.py from the simulator's ground truth and
asserted against issue 10's targets, every one of them for every fault but those in NOT_YET.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.chaos.__main__ import print_result, run
from ops.chaos.harness import ChaosOptions, ChaosResult
from ops.chaos.verdict import PhaseReport

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

FAULTS = ("baseline", "node-kill", "gateway-kill", "rabbitmq-unreachable", "redis-restart-empty", "cluster-restart",
          "ami-cut")


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosResult]:
    options = ChaosOptions(
        agents=24, command_agents=4, cps=3.0, faults=FAULTS, lead_seconds=3.0, observe_seconds=10.0,
        outage_seconds=10.0, reconnect_delay=2.0, run_dir=Path(tmp_path_factory.mktemp("chaos")),
    )
    result = run(options)
    print_result(result)
    yield result


def report_of(result: ChaosResult, fault: str) -> PhaseReport:
    return next(r for r in result.reports if r.phase.name == fault)


#: fault -> what the cluster still misses under it now and then (xfail, not strict: a pass shows as XPASS). Empty
#: since the warm-standby fix (a gateway starting cold buffers events until its first channel listing) held over
#: full `make chaos` runs on 7 Dec 2026.
NOT_YET: dict[str, str] = {}


@pytest.mark.parametrize("fault", [
    pytest.param(f, marks=pytest.mark.xfail(strict=False, reason=NOT_YET[f])) if f in NOT_YET else f for f in FAULTS
])
def test_fault_meets_every_target(chaos: ChaosResult, fault: str) -> None:
    report = report_of(chaos, fault)
    if not report.phase.applicable:
        pytest.skip(report.phase.note)
    failed = [name for name, ok in report.targets().items() if not ok]
    assert not failed, (failed, report.lost_calls[:5], report.missed_calls[:5])


def test_the_run_measured_something(chaos: ChaosResult) -> None:
    """Guards against a harness that passes because nothing happened."""
    assert chaos.signalr_agents > 0 and chaos.agents - chaos.signalr_agents > 0
    for report in chaos.reports:
        if not report.phase.applicable:  # e.g. no redis-server here: the shared Redis is never restarted
            continue
        assert report.calls >= 10, report.phase.name
        assert report.consistent_seconds, report.phase.name
        assert report.commands > 0, report.phase.name
    assert report_of(chaos, "node-kill").agents_disconnected > 0, "the killed node served nobody"
    assert report_of(chaos, "baseline").agents_disconnected == 0
