"""The status page's arithmetic: metrics text to numbers, rates across restarts, states, access."""

from __future__ import annotations

from ws_node.cluster_status import ProcessReading, RateWindow, counters_of, parse_metrics, summarize
from ws_node.status_page import authorize

NODE_METRICS = """\
# HELP cms_node_clients Agent connections open on this node
# TYPE cms_node_clients gauge
cms_node_clients{transport="raw"} 3.0
cms_node_clients{transport="signalr"} 2.0
# TYPE cms_node_lines_bound gauge
cms_node_lines_bound 4.0
# TYPE cms_node_ready gauge
cms_node_ready 1.0
# TYPE cms_broker_errors_total counter
cms_broker_errors_total 2.0
# TYPE cms_node_frames_sent_total counter
cms_node_frames_sent_total 100.0
"""
GATEWAY_METRICS = """\
# TYPE cms_ami_connected gauge
cms_ami_connected 1.0
# TYPE cms_calls_in_progress gauge
cms_calls_in_progress 2.0
# TYPE cms_commands_total counter
cms_commands_total{command="hangup",outcome="success"} 5.0
cms_commands_total{command="hangup",outcome="error"} 1.0
cms_commands_total{command="make_call",outcome="error"} 2.0
# TYPE cms_command_seconds histogram
cms_command_seconds_bucket{le="0.1"} 3.0
cms_command_seconds_count 8.0
"""


def node(pid: str, now: float, text: str = NODE_METRICS, **kw: object) -> ProcessReading:
    defaults: dict[str, object] = {"record": {"metrics_url": f"http://{pid}/metrics", "started_at": now - 100},
                                   "health": {"broker": "connected"}, "health_ok": True,
                                   "metrics": parse_metrics(text)}
    defaults.update(kw)
    return ProcessReading("node", pid, now - 1, **defaults)  # type: ignore[arg-type]


def gateway(now: float, **kw: object) -> ProcessReading:
    defaults: dict[str, object] = {"record": {"role": "active", "last_ami_event_at": now - 3, "started_at": now - 50},
                                   "health": {"ami": "connected"}, "health_ok": True,
                                   "metrics": parse_metrics(GATEWAY_METRICS)}
    defaults.update(kw)
    return ProcessReading("gateway", "g1", now - 1, **defaults)  # type: ignore[arg-type]


def test_parse_sums_labels_and_counts_command_errors() -> None:
    m = parse_metrics(NODE_METRICS + GATEWAY_METRICS)
    assert m["cms_node_clients"] == 5.0
    assert m["cms_commands_total"] == 8.0
    assert m["cms_commands_error_total"] == 3.0
    assert "cms_command_seconds_bucket" not in m and m["cms_command_seconds_count"] == 8.0


def test_rates_per_minute_survive_a_restart() -> None:
    rates = RateWindow()
    rates.add(0.0, {"node:a": {"x_total": 10.0}})
    assert rates.per_minute("x_total", 60, 0.0) is None  # one sample: no rate yet
    rates.add(30.0, {"node:a": {"x_total": 40.0}})
    rates.add(60.0, {"node:a": {"x_total": 5.0}})  # restarted: counts from 0 again -> +5
    assert rates.per_minute("x_total", 60, 60.0) == 35.0
    # the 1-minute window starts at the sample just before it
    rates.add(120.0, {"node:a": {"x_total": 65.0}})
    assert rates.per_minute("x_total", 60, 120.0) == 60.0


def test_summary_of_a_healthy_cluster() -> None:
    now = 1000.0
    readings = [node("n1", now), node("n2", now), gateway(now)]
    rates = RateWindow()
    rates.add(now - 60, counters_of(readings))
    summary = summarize(readings, now, rates, redis_state={"state": "connected"})
    assert summary.warnings == []
    assert [n["agents"] for n in summary.nodes] == [5, 5]
    assert summary.totals["agents"] == 10 and summary.totals["lines_bound"] == 8
    assert summary.totals["calls_in_progress"] == 2
    assert summary.broker == {"state": "connected", "nodes_connected": 2, "nodes": 2}
    [g] = summary.gateways
    assert g["role"] == "active" and g["ami"] == "connected" and g["last_ami_event_seconds"] == 3.0
    errors = {r["counter"]: r for r in summary.rates if r["error"]}
    assert errors["cms_broker_errors_total"]["total"] == 4.0
    assert errors["cms_commands_error_total"]["total"] == 3.0


def test_lost_unreachable_and_missing_gateway() -> None:
    now = 1000.0
    lost = ProcessReading("node", "n2", now - 120, None)
    unreachable = node("n3", now, metrics=None, health=None, health_ok=False, error="/metrics: refused")
    down_broker = node("n1", now, health={"broker": "down"}, health_ok=False)
    summary = summarize([down_broker, lost, unreachable], now, RateWindow(), redis_state={"state": "connected"})
    assert [n["state"] for n in summary.nodes] == ["unhealthy", "lost", "unreachable"]
    assert summary.broker["state"] == "down on some nodes"
    assert "no active gateway: no call events reach the agents" in summary.warnings
    assert "no node is up: agents cannot connect" in summary.warnings


def test_two_active_gateways_are_flagged() -> None:
    now = 1000.0
    second = ProcessReading("gateway", "g2", now - 1, {"role": "active"}, {}, True, parse_metrics(GATEWAY_METRICS))
    summary = summarize([gateway(now), second, node("n1", now)], now, RateWindow(), redis_state={})
    assert any("2 active gateways" in w for w in summary.warnings)


def test_access_rules() -> None:
    assert authorize("", "", token=None, key=None) is None
    assert authorize("", "k", token=None, key=None) == 401
    assert authorize("", "k", token=None, key="nope") == 403
    assert authorize("", "k", token=None, key="k") is None
    # with an admin token, the deployment key alone is not enough
    assert authorize("t", "k", token=None, key="k") == 401
    assert authorize("t", "k", token="x", key="k") == 403
    assert authorize("t", "k", token="t", key=None) is None
