"""The operator's status page in a real headless browser, against the whole cluster: it shows
every node and the gateway, with the same figures as their ``/metrics``, follows a node killed
under it, and is refused without the admin token."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from local_cluster.infra import Infrastructure
from local_cluster.launcher import LocalCluster, http_get
from tests.e2e.conftest import running_cluster
from tests.e2e.test_console_browser import browser, wait_until  # noqa: F401 - `browser` is a fixture
from tests.support.creatio_client import CreatioAgent
from ws_node.cluster_status import parse_metrics

try:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
except ImportError:  # pragma: no cover - the browser fixture reports it
    pass

pytestmark = pytest.mark.e2e

KEY = f"status-{uuid.uuid4().hex}"
TOKEN = f"admin-{uuid.uuid4().hex}"


@pytest.fixture
def guarded_cluster(infra: Infrastructure, tmp_path: Path) -> Iterator[LocalCluster]:
    with running_cluster(infra, tmp_path / "run", deployment_key=KEY,
                         extra_env={"CMS_NODE_ADMIN_TOKEN": TOKEN}) as local:
        yield local


class BackgroundAgent:
    """A Creatio-like agent kept connected from another thread while the browser test runs."""

    def __init__(self, url: str, line: str) -> None:
        self.url, self.line = url, line
        self.ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def go() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            agent = CreatioAgent(self.url, self.line)
            await agent.connect()
            await agent.open()
            self.ready.set()
            await self._stop.wait()
            await agent.close()

        try:
            asyncio.run(go())
        except BaseException as exc:  # reported by start()
            self.error = exc
            self.ready.set()

    def start(self) -> None:
        self._thread.start()
        assert self.ready.wait(30) and self.error is None, f"agent did not connect: {self.error!r}"

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def metrics_of(port: int) -> dict[str, float]:
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return parse_metrics(body.decode())


def cell(driver: WebDriver, table: str, row_attr: str, row_id: str, field: str) -> str | None:
    found = driver.find_elements(By.CSS_SELECTOR, f"#{table} tr[{row_attr}='{row_id}'] td[data-field='{field}']")
    return found[0].text if found else None


def node_ids(cluster: LocalCluster) -> list[str]:
    return [cluster.child(f"node{i + 1}").args[cluster.child(f"node{i + 1}").args.index("--node-id") + 1]
            for i in range(len(cluster.node_ports))]


def test_status_page_shows_the_cluster_as_metrics_do(
    guarded_cluster: LocalCluster, browser: WebDriver  # noqa: F811 - the fixture imported above
) -> None:
    cluster = guarded_cluster
    n1, n2 = node_ids(cluster)
    agent = BackgroundAgent(f"ws://127.0.0.1:{cluster.node_ports[0]}/?key={KEY}", "305")
    agent.start()
    try:
        browser.get(f"http://127.0.0.1:{cluster.options.haproxy_port}/status?key={KEY}&token={TOKEN}")

        def explain() -> str:
            return browser.find_element(By.TAG_NAME, "body").text[:2000]

        wait_until("both nodes up", lambda: cell(browser, "nodes", "data-node", n1, "state") == "up"
                   and cell(browser, "nodes", "data-node", n2, "state") == "up", timeout=30, explain=explain)
        gateway_rows = browser.find_elements(By.CSS_SELECTOR, "#gateways tbody tr[data-gateway]")
        assert len(gateway_rows) == 1, explain()
        gw = str(gateway_rows[0].get_attribute("data-gateway"))
        assert cell(browser, "gateways", "data-gateway", gw, "ami") == "connected"
        assert cell(browser, "gateways", "data-gateway", gw, "role") == "active"
        assert browser.find_element(By.ID, "load-state").get_attribute("data-state") == "ok"
        assert browser.find_element(By.ID, "redis-state").text.startswith("connected")
        assert browser.find_element(By.ID, "broker-state").text == "connected (2/2 nodes)"
        assert browser.find_element(By.ID, "warnings").text == ""

        # The agent on node 1 is what node 1's /metrics says, and what the page says.
        def agents_match() -> bool:
            expected = int(metrics_of(cluster.node_ports[0])["cms_node_clients"])
            return expected == 1 and cell(browser, "nodes", "data-node", n1, "agents") == "1" and \
                cell(browser, "nodes", "data-node", n2, "agents") == "0"

        wait_until("node 1 showing its one agent", agents_match, timeout=20, explain=explain)
        lines = int(metrics_of(cluster.node_ports[0])["cms_node_lines_bound"])
        assert cell(browser, "nodes", "data-node", n1, "lines") == str(lines) and lines >= 1

        # A call: the gateway's calls in progress on the page follow its /metrics.
        cluster.play("inbound-direct-long", line="305", caller="79161234567")

        def calls_match() -> bool:
            live = int(metrics_of(cluster.options.gateway_metrics_port)["cms_calls_in_progress"])
            shown = cell(browser, "gateways", "data-gateway", gw, "calls")
            return live >= 1 and shown == str(live)

        wait_until("the call on the page", calls_match, timeout=20, explain=explain)
        published = metrics_of(cluster.options.gateway_metrics_port)["cms_call_events_published_total"]
        assert published >= 1
        wait_until("a call-event rate", lambda: (browser.find_elements(
            By.CSS_SELECTOR, "#rates tr[data-counter='cms_call_events_published_total'] td[data-field='1m']")
            or [None])[0].text not in ("…", "0"), timeout=30, explain=explain)

        # Node 2 killed: its record expires and the page (served through node 1 now) says it is lost.
        cluster.kill("node2")
        wait_until("node 2 lost", lambda: cell(browser, "nodes", "data-node", n2, "state") == "lost",
                   timeout=45, explain=explain)
        assert cell(browser, "nodes", "data-node", n1, "state") == "up"
    finally:
        agent.stop()


def test_status_needs_the_admin_token(
    guarded_cluster: LocalCluster, browser: WebDriver  # noqa: F811 - the fixture imported above
) -> None:
    cluster = guarded_cluster
    node = f"http://127.0.0.1:{cluster.node_ports[0]}"
    for path in ("/status", "/status/data"):
        assert http_get(f"{node}{path}")[0] == 401
        assert http_get(f"{node}{path}?key={KEY}")[0] == 401  # the deployment key is not the admin token
        assert http_get(f"{node}{path}?token=wrong")[0] == 403
        assert http_get(f"{node}{path}?token={TOKEN}")[0] == 200
    request = urllib.request.Request(f"{node}/status/data", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
        assert response.status == 200
    balancer = f"http://127.0.0.1:{cluster.options.haproxy_port}"
    assert http_get(f"{balancer}/status?token={TOKEN}")[0] == 403  # HAProxy: no deployment key
    assert http_get(f"{balancer}/status/data?key={KEY}")[0] == 401

    browser.get(f"{balancer}/status?key={KEY}")
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "needs an admin token" in body
    assert "Agents connected" not in body
