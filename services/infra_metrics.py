"""Metrics every process keeps about the shared infrastructure, under one set of names.

The gateway and the nodes both talk to RabbitMQ and Redis; they count failures and
reconnections with the same metric names and no extra labels (Prometheus' ``job`` and
``instance`` already say which process), so one alert rule covers them all. Also: the build
of every process (``cms_build_info``), so mixed versions show during a rolling upgrade.
"""

from __future__ import annotations

from importlib import metadata

from prometheus_client import Counter, Gauge, disable_created_metrics

from services.process_metrics import use_process_metrics

# The `_created` series double the series count and nothing here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]
# process_open_fds without listing every descriptor per scrape (a node holds thousands of sockets)
use_process_metrics()

BROKER_ERRORS = Counter("cms_broker_errors_total", "RabbitMQ operations that failed")
BROKER_RECONNECTS = Counter("cms_broker_reconnects_total", "RabbitMQ connections opened after the first")
REDIS_ERRORS = Counter("cms_redis_errors_total", "Redis operations that failed")
REDIS_RECONNECTS = Counter("cms_redis_reconnects_total", "Redis operations that succeeded again after a failure")

#: buckets of every latency an event's way through the cluster is timed by (AMI read -> confirm, -> node, -> frame):
#: fine around the 1-5 ms where the hot path lives, so a p50 read from them is not a guess across a whole
#: millisecond; 0.5, 1 and 2.5 s stay (the lag alerts read them)
EVENT_LATENCY_BUCKETS = (0.00025, 0.0005, 0.00075, 0.001, 0.00125, 0.0015, 0.00175, 0.002, 0.0025, 0.003, 0.004,
                         0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

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
