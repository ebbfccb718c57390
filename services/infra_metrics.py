"""Metrics every process keeps about the shared infrastructure, under one set of names.

The gateway and the nodes both talk to RabbitMQ and Redis; they count failures and
reconnections with the same metric names and no extra labels (Prometheus' ``job`` and
``instance`` already say which process), so one alert rule covers them all. Also: the build
of every process (``cms_build_info``), so mixed versions show during a rolling upgrade.
"""

from __future__ import annotations

from importlib import metadata

from prometheus_client import Counter, Gauge, disable_created_metrics

# The `_created` series double the series count and nothing here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

BROKER_ERRORS = Counter("cms_broker_errors_total", "RabbitMQ operations that failed")
BROKER_RECONNECTS = Counter("cms_broker_reconnects_total", "RabbitMQ connections opened after the first")
REDIS_ERRORS = Counter("cms_redis_errors_total", "Redis operations that failed")
REDIS_RECONNECTS = Counter("cms_redis_reconnects_total", "Redis operations that succeeded again after a failure")

BUILD_INFO = Gauge("cms_build_info", "Always 1; the version of the running build", ["version"])


def _version() -> str:
    try:
        return metadata.version("asterisk-cms")
    except metadata.PackageNotFoundError:
        return "unknown"


BUILD_INFO.labels(version=_version()).set(1)


class RedisHealth:
    """Counts a Redis reconnect when an operation succeeds after one or more failures."""

    def __init__(self) -> None:
        self._failing = False

    def failed(self) -> None:
        REDIS_ERRORS.inc()
        self._failing = True

    def succeeded(self) -> None:
        if self._failing:
            self._failing = False
            REDIS_RECONNECTS.inc()
