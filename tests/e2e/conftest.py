"""The running local cluster the end-to-end tests share the shape of."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from local_cluster.infra import Infrastructure
from local_cluster.launcher import ClusterOptions, LocalCluster


@contextlib.contextmanager
def running_cluster(infra: Infrastructure, run_dir: Path, **overrides: Any) -> Iterator[LocalCluster]:
    """A whole cluster on free ports and its own namespace, on the session's RabbitMQ and Redis."""
    options = ClusterOptions.ephemeral(run_dir, amqp_url=infra.amqp_url, redis_url=infra.redis_url, **overrides)
    local = LocalCluster(options)
    local.start(timeout=60)
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture
def cluster(infra: Infrastructure, tmp_path: Path) -> Iterator[LocalCluster]:
    # The production topology: two gateways (one active, one warm standby) and two nodes.
    with running_cluster(infra, tmp_path / "run", gateways=2) as local:
        yield local
