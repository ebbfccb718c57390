"""Shared fixtures: the real RabbitMQ and Redis (the machine's, or private ones started here),
and a unique namespace per test run so runs never see each other's queues or keys."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from local_cluster.infra import Infrastructure


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Infrastructure]:
    infrastructure = Infrastructure(Path(tmp_path_factory.mktemp("infra")))
    infrastructure.start()
    yield infrastructure
    infrastructure.stop()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"
