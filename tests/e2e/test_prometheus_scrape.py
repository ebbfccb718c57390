"""The real Prometheus scrapes a running local cluster with ops/prometheus/prometheus-local.yml.

The checked-in local config is used as it is, with its well-known `make run` ports swapped for the
cluster's free ones and the intervals shortened. Then: every target is up, the core metrics carry
the values the cluster is in (AMI connected, one agent on the nodes, a call seen end to end),
every Grafana dashboard expression evaluates without error, every alert rule evaluates healthy,
and killing a node makes CmsNodeDown go pending on real data.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from local_cluster.infra import free_port
from local_cluster.launcher import LocalCluster
from tests.support.creatio_client import RING_STARTED, CreatioAgent

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "ops" / "prometheus"
DASHBOARDS = sorted((REPO / "ops" / "grafana" / "dashboards").glob("*.json"))
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return json.loads(exc.read())

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", f"{expr}: {answer.get('errorType')}: {answer.get('error')}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait(self, what: str, predicate: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}")


def local_config(cluster: LocalCluster, prom_port: int) -> str:
    text = (PROM / "prometheus-local.yml").read_text(encoding="utf-8")
    swaps = {
        '"127.0.0.1:9101"': f'"127.0.0.1:{cluster.options.gateway_metrics_ports[0]}"',
        '"127.0.0.1:9102"': f'"127.0.0.1:{cluster.options.gateway_metrics_ports[1]}"',
        '"127.0.0.1:2101"': f'"127.0.0.1:{cluster.node_ports[0]}"',
        '"127.0.0.1:2102"': f'"127.0.0.1:{cluster.node_ports[1]}"',
        '"127.0.0.1:8404"': f'"127.0.0.1:{cluster.options.stats_port}"',
        '"127.0.0.1:9090"': f'"127.0.0.1:{prom_port}"',
        "scrape_interval: 5s": "scrape_interval: 1s",
        "scrape_timeout: 4s": "scrape_timeout: 900ms",
        "evaluation_interval: 5s": "evaluation_interval: 1s",
    }
    for old, new in swaps.items():
        assert text.count(old) == 1, f"prometheus-local.yml no longer has exactly one {old}"
        text = text.replace(old, new)
    return text


@pytest.fixture
def prometheus(cluster: LocalCluster, tmp_path: Path) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the prometheus binary is missing: install it with `bash scripts/setup-ops.sh`")
    port = free_port()
    config_dir = tmp_path / "prometheus"
    config_dir.mkdir()
    (config_dir / "prometheus.yml").write_text(local_config(cluster, port), encoding="utf-8")
    shutil.copy(PROM / "alerts.yml", config_dir / "alerts.yml")
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={config_dir / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        server = Prometheus(port)

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{log_path.read_text(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(f"{server.base}/-/ready", timeout=1) as response:  # noqa: S310
                    return bool(response.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        server.wait("prometheus /-/ready", ready, 20)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def dashboard_expressions() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text(encoding="utf-8"))["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                found.append((panel["title"], expr))
    return found


def test_prometheus_scrapes_every_process_and_evaluates_the_dashboard_and_alerts(
    cluster: LocalCluster, prometheus: Prometheus
) -> None:
    def all_targets_up() -> bool:
        active = prometheus.get("/api/v1/targets")["data"]["activeTargets"]
        return len(active) == 6 and all(t["health"] == "up" for t in active)

    prometheus.wait("6 targets up (2 gateways, 2 nodes, HAProxy, Prometheus)", all_targets_up, 20)
    jobs = {t["labels"]["job"] for t in prometheus.get("/api/v1/targets")["data"]["activeTargets"]}
    assert jobs == {"cms-gateway", "cms-node", "haproxy", "prometheus"}

    async def one_call() -> None:
        agent = CreatioAgent(cluster.client_url, "305")
        await agent.connect()
        try:
            await agent.open()
            mark = len(agent.events)
            await asyncio.to_thread(cluster.play, "inbound-direct-answered", line="305", caller="79161234567")
            await agent.wait_for(RING_STARTED, after=mark, timeout=15)
            # Stay connected until Prometheus has seen the agent and the latency samples.
            await asyncio.to_thread(
                prometheus.wait, "one agent and an end-to-end sample scraped",
                lambda: prometheus.value('sum(cms_node_clients{job="cms-node"})') == 1
                and (prometheus.value('sum(cms_end_to_end_latency_seconds_count{job="cms-node"})') or 0) >= 1,
                15,
            )
        finally:
            await agent.close()

    asyncio.run(one_call())

    # Both gateways hold an AMI login; exactly one is active and ready, the other a warm standby.
    assert prometheus.value('min(cms_ami_connected{job="cms-gateway"})') == 1
    assert prometheus.value('sum(cms_gateway_ready{job="cms-gateway"})') == 1
    assert prometheus.value('sum(cms_gateway_lease_state{job="cms-gateway",state="active"})') == 1
    assert prometheus.value('sum(cms_gateway_lease_state{job="cms-gateway",state="standby"})') == 1
    assert prometheus.value('sum(cms_node_ready{job="cms-node"})') == 2
    assert prometheus.value('haproxy_backend_active_servers{proxy="ws_nodes"}') == 2
    # The gateway counts an event once RabbitMQ confirms it; its scrape may trail the node's.
    prometheus.wait("a published call event counted by the gateway",
                    lambda: (prometheus.value('sum(cms_call_events_published_total{job="cms-gateway"})') or 0) >= 1, 10)
    p99 = prometheus.value(
        'histogram_quantile(0.99, sum by (le) (rate(cms_end_to_end_latency_seconds_bucket{job="cms-node"}[1m])))'
    )
    assert p99 is not None and 0 < p99 < 2.5, p99

    # A series born with the call (e.g. cms_ami_events_received_total{event="Newchannel"}) needs
    # two scrapes before rate() has something to say.
    ami_rate = 'sum(rate(cms_ami_events_received_total{job="cms-gateway"}[1m])) > 0'
    prometheus.wait("AMI events per second on the dashboard", lambda: bool(prometheus.query(ami_rate)), 10)

    # Every dashboard expression evaluates (PromQL errors fail with the panel's name), and the ones
    # over metrics this cluster has produced return data.
    empty = []
    for title, expr in dashboard_expressions():
        if not prometheus.query(expr):
            empty.append(title)
    for must_have_data in ("AMI session", "Agents connected", "Calls in progress", "Events per second",
                           "Connected agents per node", "Nodes in HAProxy"):
        assert must_have_data not in empty, f"{must_have_data!r} shows no data; empty panels: {empty}"
    print(f"dashboard: {len(dashboard_expressions())} expressions evaluated; no data yet in {sorted(set(empty))}")

    def rules_evaluated() -> bool:
        groups = prometheus.get("/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return bool(rules) and all(r.get("lastEvaluation", "").startswith("20") for r in rules)

    prometheus.wait("every alert rule evaluated once", rules_evaluated, 10)
    groups = prometheus.get("/api/v1/rules")["data"]["groups"]
    unhealthy = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"]
    assert not unhealthy, unhealthy
    firing = [r["name"] for g in groups for r in g["rules"] if r["state"] != "inactive"]
    assert not firing, f"alerts active on a healthy cluster: {firing}"

    durations = {t["labels"]["job"] + " " + t["labels"]["instance"]: t["lastScrapeDuration"]
                 for t in prometheus.get("/api/v1/targets")["data"]["activeTargets"]}
    print("scrape durations (s):", json.dumps(durations, sort_keys=True))

    # A node dies: its scrape fails and CmsNodeDown goes pending (it fires after `for: 30s`).
    cluster.kill("node2")
    prometheus.wait(
        "CmsNodeDown pending for the killed node",
        lambda: any(
            s["metric"].get("instance") == f"127.0.0.1:{cluster.node_ports[1]}"
            for s in prometheus.query('ALERTS{alertname="CmsNodeDown"}')
        ),
        15,
    )
    assert prometheus.value('sum(up{job="cms-node"})') == 1
