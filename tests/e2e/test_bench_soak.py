"""The short soak CI runs (issue 15: `make bench` has the 1-hour one): the bench's soak stage, for real,
on the local cluster with 200 agents at 200 AMI events/s for 40 s; every process alive at the end,
nothing dropped, and the cluster's memory not growing.

40 s is mostly warm-up for a heap, so the bound here is looser than the long soak's 5 %: it catches a
leak fast enough to show in 30 s (every event or every frame retained), not a slow one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from bench.context import Context
from bench.stages_pipeline import stage_soak
from local_cluster.infra import Infrastructure

pytestmark = pytest.mark.e2e

SHORT_SOAK_FLAT = 0.10


@pytest.mark.timeout(300)
def test_short_soak_keeps_memory_flat_and_drops_nothing(infra: Infrastructure) -> None:
    # A short folder: HAProxy refuses a stats socket path over 97 characters (pytest's tmp_path is longer).
    with tempfile.TemporaryDirectory(prefix="soak") as short:
        run_dir = Path(short)
        ctx = Context(quick=True, repeats=1, run_dir=run_dir / "b", results_dir=run_dir / "r",
                      amqp_url=infra.amqp_url, redis_url=infra.redis_url, soak_seconds=40.0)
        result = stage_soak(ctx)
    assert result.status == "ok", result.reason
    figures = {f.name: f for f in result.figures}
    assert figures["processes that died during the soak"].value == 0
    assert figures["events/frames dropped"].value == 0
    ami = figures["AMI events/s over the soak"].value
    assert ami is not None and ami > 50, "the soak carried almost no traffic"
    drift = figures["RSS drift, worst cluster process (|end - start| / start after warm-up)"]
    assert drift.value is not None, drift.note
    assert drift.value <= SHORT_SOAK_FLAT, f"RSS grew {drift.value * 100:.1f} % ({drift.note})"
    samples = result.details["rss"]
    assert {"gateway", "node1", "node2", "haproxy"} <= set(samples)
    assert all(len(s["samples"]) >= 10 for s in samples.values())
