"""The status page's numbers, computed from what the processes publish (pure: texts in, a
summary out). Each figure is read from a process's own ``/metrics`` (the Prometheus text it
serves to Prometheus), so the page and a Prometheus query agree; rates come from successive
samples of the same counters, with a process restart (a counter going down) counted as a reset.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

#: counters whose sum over the cluster is "errors": what each one means is shown beside it
ERROR_COUNTERS: dict[str, str] = {
    "cms_broker_errors_total": "RabbitMQ operations failed",
    "cms_redis_errors_total": "Redis operations failed",
    "cms_call_events_dropped_total": "call events dropped (outbox full)",
    "cms_commands_error_total": "agent commands failed",
    "cms_ami_malformed_messages_total": "AMI messages unparsable",
    "cms_ami_reconnects_total": "AMI reconnections",
    "cms_node_frames_dropped_total": "frames not delivered to agents",
    "cms_node_delivery_log_errors_total": "delivery positions not stored",
    "cms_node_refused_requests_total": "agent connections refused",
}
#: counters shown as activity rates
ACTIVITY_COUNTERS: dict[str, str] = {
    "cms_call_events_published_total": "call events published",
    "cms_commands_total": "agent commands",
    "cms_ami_events_received_total": "AMI events received",
    "cms_node_frames_sent_total": "frames sent to agents",
}
RATE_WINDOWS = (60.0, 300.0, 900.0)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name: value summed over its labels}; also ``cms_commands_error_total``
    (commands with outcome="error"). Histogram buckets are left out."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(("_bucket", "_created")):
                continue
            value = float(sample.value)
            if math.isnan(value):
                continue
            out[sample.name] = out.get(sample.name, 0.0) + value
            if sample.name == "cms_commands_total" and sample.labels.get("outcome") == "error":
                out["cms_commands_error_total"] = out.get("cms_commands_error_total", 0.0) + value
    return out


@dataclass(frozen=True, slots=True)
class ProcessReading:
    """What was read from one registered process just now."""

    kind: str
    id: str
    last_seen: float
    record: dict[str, Any] | None
    health: dict[str, Any] | None = None
    health_ok: bool = False
    metrics: dict[str, float] | None = None
    error: str = ""


class RateWindow:
    """Per-process counter samples over the last ``horizon`` seconds; rates per minute over windows."""

    def __init__(self, horizon: float = max(RATE_WINDOWS)) -> None:
        self._horizon = horizon
        self._samples: collections.deque[tuple[float, dict[str, dict[str, float]]]] = collections.deque()

    def add(self, now: float, counters: Mapping[str, Mapping[str, float]]) -> None:
        """``counters``: {process: {counter: value}} as read at ``now``."""
        self._samples.append((now, {p: dict(c) for p, c in counters.items()}))
        while self._samples and self._samples[0][0] < now - self._horizon - 60:
            self._samples.popleft()

    def per_minute(self, name: str, window: float, now: float) -> float | None:
        """Increase of counter ``name`` summed over processes in the last ``window`` s, per minute;
        None until two samples at least a few seconds apart exist."""
        usable = [(t, c) for t, c in self._samples if t >= now - window]
        older = [(t, c) for t, c in self._samples if t < now - window]
        if older and (not usable or usable[0][0] > now - window):
            usable.insert(0, older[-1])  # the window starts between two samples: begin at the one before it
        if len(usable) < 2 or usable[-1][0] - usable[0][0] < 2.0:
            return None
        total = 0.0
        for (_, before), (_, after) in zip(usable, usable[1:], strict=False):
            for process, counters in after.items():
                current = counters.get(name)
                if current is None:
                    continue
                previous = before.get(process, {}).get(name)
                total += current if previous is None or current < previous else current - previous
        span = usable[-1][0] - usable[0][0]
        return total * 60.0 / span


@dataclass
class ClusterSummary:
    nodes: list[dict[str, Any]] = field(default_factory=list)
    gateways: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=dict)
    rates: list[dict[str, Any]] = field(default_factory=list)
    broker: dict[str, Any] = field(default_factory=dict)
    redis: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _state(reading: ProcessReading, now: float, lost_after: float) -> str:
    if reading.record is None or now - reading.last_seen > lost_after:
        return "lost"
    if reading.error:
        return "unreachable"
    return "up" if reading.health_ok else "unhealthy"


def summarize(
    readings: Iterable[ProcessReading],
    now: float,
    rates: RateWindow,
    *,
    redis_state: Mapping[str, Any],
    lost_after: float = 15.0,
) -> ClusterSummary:
    summary = ClusterSummary(redis=dict(redis_state))
    readings = list(readings)
    totals: dict[str, float] = collections.defaultdict(float)
    broker_views: list[str] = []
    for r in readings:
        m = r.metrics or {}
        state = _state(r, now, lost_after)
        record = r.record or {}
        base = {
            "id": r.id, "state": state, "last_seen_seconds": round(max(0.0, now - r.last_seen), 1),
            "metrics_url": record.get("metrics_url", ""), "version": record.get("version", ""),
            "uptime_seconds": round(now - float(record["started_at"]), 0) if "started_at" in record else None,
            "error": r.error,
        }
        if state in ("up", "unhealthy"):
            for name in (*ERROR_COUNTERS, *ACTIVITY_COUNTERS):
                totals[name] += m.get(name, 0.0)
        if r.kind == "node":
            broker = str((r.health or {}).get("broker", "?")) if r.health else "?"
            if state in ("up", "unhealthy"):
                broker_views.append(broker)
                totals["agents"] += m.get("cms_node_clients", 0.0)
                totals["lines_bound"] += m.get("cms_node_lines_bound", 0.0)
            summary.nodes.append({
                **base,
                "ready": m.get("cms_node_ready") == 1.0,
                "draining": bool((r.health or {}).get("draining", False)),
                "agents": int(m.get("cms_node_clients", 0.0)),
                "lines": int(m.get("cms_node_lines_bound", 0.0)),
                "broker": broker,
            })
        elif r.kind == "gateway":
            last_event = record.get("last_ami_event_at")
            gateway = {
                **base,
                "role": record.get("role", "active") if state in ("up", "unhealthy") else "-",
                "ami": "connected" if m.get("cms_ami_connected") == 1.0 else "down",
                "ami_peer": record.get("ami_peer", ""),
                "last_ami_event_seconds": round(now - float(last_event), 1) if last_event else None,
                "calls_in_progress": int(m.get("cms_calls_in_progress", 0.0)),
                "outbox": int(m.get("cms_outbox_events", 0.0)),
            }
            if state in ("up", "unhealthy"):
                totals["calls_in_progress"] += m.get("cms_calls_in_progress", 0.0)
            summary.gateways.append(gateway)
    active = [g for g in summary.gateways if g["role"] == "active" and g["state"] in ("up", "unhealthy")]
    if redis_state.get("state") == "unreachable":
        summary.warnings.append("Redis unreachable: the other processes cannot be listed (only this node is shown), "
                                "and call state and history cannot be stored")
    elif not active:
        summary.warnings.append("no active gateway: no call events reach the agents")
    elif len(active) > 1:
        summary.warnings.append(f"{len(active)} active gateways: each AMI event would be published more than once")
    if not any(n["state"] == "up" for n in summary.nodes):
        summary.warnings.append("no node is up: agents cannot connect")
    summary.totals = dict(totals)
    down = [v for v in broker_views if v != "connected"]
    summary.broker = {
        "state": "unknown" if not broker_views else "connected" if not down else "down on some nodes",
        "nodes_connected": len(broker_views) - len(down), "nodes": len(broker_views),
    }
    for name, label in {**ACTIVITY_COUNTERS, **ERROR_COUNTERS}.items():
        summary.rates.append({
            "counter": name, "label": label, "error": name in ERROR_COUNTERS, "total": totals.get(name, 0.0),
            "per_minute": {f"{int(w // 60)}m": _round(rates.per_minute(name, w, now)) for w in RATE_WINDOWS},
        })
    return summary


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def counters_of(readings: Iterable[ProcessReading]) -> dict[str, dict[str, float]]:
    """The counters a RateWindow samples, per process."""
    names = (*ERROR_COUNTERS, *ACTIVITY_COUNTERS)
    return {
        f"{r.kind}:{r.id}": {n: r.metrics[n] for n in names if n in r.metrics}
        for r in readings
        if r.metrics is not None
    }
