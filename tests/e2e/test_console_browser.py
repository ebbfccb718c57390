"""The agent console page in a real headless browser (Debian's chromium + chromedriver), against the
whole cluster: simulator -> gateway -> RabbitMQ -> nodes -> HAProxy -> the page.

What the page shows is read from its DOM; what it sends is read from Chromium's own network log
(``Network.webSocketFrameSent``), not from the page's word. ``scripts/setup-browser.sh`` installs the
browser and its driver.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from local_cluster.infra import Infrastructure
from local_cluster.launcher import LocalCluster, http_get
from tests.e2e.conftest import running_cluster

try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
except ImportError:  # pragma: no cover - reported by the fixture below
    webdriver = None  # type: ignore[assignment]

pytestmark = pytest.mark.e2e

STATIC_DIR = Path(__file__).resolve().parents[2] / "ws_node" / "static"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,800",
)
LINE = "305"
CALLER = "79161234567"
DIALLED = "4951234567"

T = TypeVar("T")


def _start_cluster(infra: Infrastructure, run_dir: Path, **overrides: Any) -> Iterator[LocalCluster]:
    with running_cluster(infra, run_dir, **overrides) as local:
        yield local


@pytest.fixture
def keyed_cluster(infra: Infrastructure, tmp_path: Path) -> Iterator[LocalCluster]:
    yield from _start_cluster(infra, tmp_path / "run", deployment_key=f"console-{uuid.uuid4().hex}")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: run `scripts/setup-browser.sh` (installs Debian's "
            "chromium and chromium-driver) before the browser tests",
            pytrace=False,
        )
    if webdriver is None:
        pytest.fail("the Python package `selenium` is missing: `.venv/bin/pip install -e '.[dev]'`", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    # browser: console messages; performance: DevTools network events, WebSocket frames included.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    # --window-size sizes the window, not the page: pin the viewport to the size the layout targets.
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False}
    )
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


# ---- helpers -------------------------------------------------------------------------------------


def wait_until(
    what: str,
    probe: Callable[[], T | None],
    timeout: float = 15.0,
    interval: float = 0.05,
    explain: Callable[[], str] = lambda: "",
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` (and ``explain()``) otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = probe()
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}. {explain()}")
        time.sleep(interval)


def page_state(driver: WebDriver) -> str:
    """A short description of the page for failure messages."""
    status = driver.find_element(By.ID, "connection-status").text
    calls = [c.text.replace("\n", " | ") for c in driver.find_elements(By.CSS_SELECTOR, "#calls .call")]
    log = [li.text.replace("\n", " ") for li in driver.find_elements(By.CSS_SELECTOR, "#log li")[:12]]
    alerts = driver.find_element(By.ID, "alerts").text
    return f"status={status!r} calls={calls} alerts={alerts!r} log(newest first)={log}"


def connection_state(driver: WebDriver) -> str:
    return str(driver.find_element(By.ID, "connection-status").get_attribute("data-state"))


def log_names(driver: WebDriver) -> list[str]:
    """The event log's frame names, newest first."""
    names = driver.execute_script("return Array.from(document.querySelectorAll('#log li')).map(li => li.dataset.name)")
    assert isinstance(names, list)
    return [str(n) for n in names]


def call_card(driver: WebDriver, number: str) -> Any:
    for card in driver.find_elements(By.CSS_SELECTOR, "#calls .call"):
        if card.find_element(By.CSS_SELECTOR, "[data-part=number]").text == number:
            return card
    return None


class WireTap:
    """WebSocket text frames the browser really sent, from Chromium's DevTools network log
    (``Network.webSocketFrameSent``). Reading that log drains it, so the frames are kept here."""

    def __init__(self, driver: WebDriver) -> None:
        self.driver = driver
        self.frames: list[dict[str, Any]] = []

    def sent(self, command: str | None = None) -> list[dict[str, Any]]:
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message.get("method") == "Network.webSocketFrameSent":
                self.frames.append(json.loads(message["params"]["response"]["payloadData"]))
        return [f for f in self.frames if command is None or f.get("command") == command]

    def click(self, element: Any, command: str, explain: Callable[[], str] = lambda: "") -> dict[str, Any]:
        """Click ``element`` and return the ``command`` frame that click put on the wire."""
        before = len(self.sent(command))
        element.click()
        frames = wait_until(
            f"a {command} frame on the wire", lambda: self.sent(command)[before:], timeout=5, explain=explain
        )
        assert len(frames) == 1, f"one click, one {command}: {frames}"
        return frames[0]


def received_since(driver: WebDriver, command: str) -> list[str]:
    """Names of the frames the page logged as received after its newest ``command`` line, newest first."""
    script = """
        const items = Array.from(document.querySelectorAll('#log li'));
        const i = items.findIndex(li => li.dataset.name === arguments[0] && li.classList.contains('log-out'));
        return i < 0 ? [] : items.slice(0, i).filter(li => li.classList.contains('log-in')).map(li => li.dataset.name);
    """
    return [str(n) for n in driver.execute_script(script, command)]


def alert_texts(driver: WebDriver) -> list[str]:
    return [a.text for a in driver.find_elements(By.CSS_SELECTOR, "#alerts .alert-text")]


def newest_error_on_top(driver: WebDriver) -> bool:
    """The newest ERROR in the log is the alert on top (same server message, agent-facing title)."""
    errors = driver.find_elements(By.CSS_SELECTOR, "#log li[data-name=ERROR] .sum")
    alerts = alert_texts(driver)
    if not errors or not alerts:
        return False
    message = errors[0].text.split(": ", 1)[-1]
    return alerts[0].split(": ", 1)[-1] == message


def console_errors(driver: WebDriver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


# ---- the test ------------------------------------------------------------------------------------


def test_console_shows_an_inbound_call_and_dials_out(cluster: LocalCluster, browser: WebDriver, tmp_path: Path) -> None:
    driver = browser
    base = f"http://127.0.0.1:{cluster.options.haproxy_port}"
    status, body = http_get(f"{base}/console")
    assert status == 200 and b"Agent console" in body, "HAProxy should route /console to a node"

    driver.get(f"{base}/console?line={LINE}")
    explain = lambda: page_state(driver)  # noqa: E731 - a one-line closure reads best here
    wait_until("the page to connect and sign in the line", lambda: connection_state(driver) == "open", explain=explain)
    assert f"line {LINE}" in driver.find_element(By.ID, "connection-status").text
    wait_until(
        "the snapshot after CONNECTION_CREATED", lambda: "ACTIVE_CALL_SNAPSHOT" in log_names(driver), explain=explain
    )
    assert driver.find_element(By.ID, "no-calls").is_displayed()

    # The handshake the browser really sent, in Creatio's order and shape.
    tap = WireTap(driver)
    handshake = tap.sent()
    assert [f["command"] for f in handshake][:3] == ["LoadLibrary", "OpenConnection", "QueryActiveCallSnapshot"]
    assert json.loads(handshake[1]["parameters"]["connectionParams"])["ExtensionName"] == LINE
    assert handshake[1]["libraryInstanceUId"], "OpenConnection must echo the library instance uid"
    assert handshake[2]["connectionUId"], "commands after CONNECTION_CREATED carry the connection uid"

    # An inbound call: ringing with the caller's number, then connected, then finished.
    cluster.play("inbound-direct-answered", line=LINE, caller=CALLER)
    card = wait_until(
        "a ringing call from the caller",
        lambda: (c := call_card(driver, CALLER)) is not None and c.get_attribute("data-state") == "ringing" and c,
        interval=0.03,
        explain=explain,
    )
    call_id = card.get_attribute("data-call-id")
    assert card.find_element(By.CSS_SELECTOR, "[data-part=state]").text.lower() == "ringing"
    assert card.find_element(By.CSS_SELECTOR, "[data-part=direction]").text == "Incoming"
    assert card.find_element(By.CSS_SELECTOR, "[data-action=answer]").is_displayed()
    assert "(1 ringing)" in driver.title
    # screen readers hear about it ("Incoming call from ...", then "Connected with ...")
    assert CALLER in driver.find_element(By.ID, "announcer").get_attribute("textContent")

    wait_until(
        "the call to be connected",
        lambda: (c := call_card(driver, CALLER)) is not None and c.get_attribute("data-state") == "connected",
        explain=explain,
    )
    card = call_card(driver, CALLER)
    hold = card.find_element(By.CSS_SELECTOR, "[data-action=hold]")
    assert hold.is_enabled() and hold.text == "Hold"
    assert not card.find_element(By.CSS_SELECTOR, "[data-action=answer]").is_displayed()
    wait_until(
        "the answer timer to run",
        lambda: card.find_element(By.CSS_SELECTOR, "[data-part=talk-timer]").text not in ("", "\u2014"),
        explain=explain,
    )
    assert driver.find_element(By.ID, "blind-transfer-button").is_enabled()
    assert driver.find_element(By.ID, "consult-button").is_enabled()
    assert not driver.find_element(By.ID, "call-button").is_enabled(), "no dialling while on a call"

    wait_until(
        "the call to leave the active list", lambda: call_card(driver, CALLER) is None, timeout=20, explain=explain
    )
    recent = wait_until(
        "the call among finished calls",
        lambda: driver.find_elements(By.CSS_SELECTOR, f"#recent li[data-call-id='{call_id}']"),
        explain=explain,
    )[0]
    assert CALLER in recent.text and "talked" in recent.text
    assert driver.find_element(By.ID, "no-calls").is_displayed()

    names = log_names(driver)
    for name in ("RING_STARTED", "COMMUTATION_STARTED", "RING_FINISHED"):
        assert name in names, f"{name} missing from the event log: {names[:30]}"
    # newest on top
    assert names.index("RING_FINISHED") < names.index("COMMUTATION_STARTED") < names.index("RING_STARTED")

    # Dial out: the MakeCall frame really leaves the browser, and the page shows what came back.
    wait_until("the Call button", lambda: driver.find_element(By.ID, "call-button").is_enabled(), explain=explain)
    driver.find_element(By.ID, "number-input").send_keys(f"+{DIALLED[:3]} {DIALLED[3:]}")
    frame = tap.click(driver.find_element(By.ID, "call-button"), "MakeCall", explain)
    assert frame["parameters"] == {"targetAddress": f"+{DIALLED}"}
    assert frame["commandUId"] == "" and frame["connectionUId"] and frame["libraryInstanceUId"]
    assert frame["commandExecutorId"] == "" and "commandExecutor" not in frame

    # The gateway may place the call (call events) or refuse it (ERROR): either way the page shows it.
    def answer() -> str | None:
        replies = received_since(driver, "MakeCall")
        if "ERROR" in replies:
            return f"error: {alert_texts(driver)[0]}" if newest_error_on_top(driver) else None
        if call_card(driver, f"+{DIALLED}") is not None:
            return "call"
        if "RING_FINISHED" in replies or "ABONENT_BUSY" in replies:
            recent = driver.find_elements(By.CSS_SELECTOR, "#recent li")
            return "finished call" if recent and f"+{DIALLED}" in recent[0].text else None
        return None

    outcome = wait_until(
        "an answer to MakeCall (a call on the page, or an ERROR shown)", answer, timeout=20, explain=explain
    )
    print(f"MakeCall answered with {outcome}")

    shot = tmp_path / "console.png"
    assert driver.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, f"screenshot looks empty ({len(data)} B)"
    assert driver.execute_script("return [window.innerWidth, window.innerHeight]") == [1280, 800]
    size = driver.execute_script(
        "const e = document.documentElement; return [e.scrollWidth, e.scrollHeight, e.clientWidth, e.clientHeight]"
    )
    assert size[0] <= size[2] and size[1] <= size[3], f"the page itself should not scroll at 1280x800: {size}"

    errors = console_errors(driver)
    assert errors == [], f"browser console errors: {errors}"


def test_console_reconnects_to_the_other_node_and_keeps_the_call(cluster: LocalCluster, browser: WebDriver) -> None:
    driver = browser
    base = f"http://127.0.0.1:{cluster.options.haproxy_port}"
    driver.get(f"{base}/console?line=306")
    explain = lambda: page_state(driver)  # noqa: E731
    wait_until("the page to connect", lambda: connection_state(driver) == "open", explain=explain)
    cluster.play("inbound-direct-long", line="306", caller=CALLER)
    wait_until(
        "the call to be connected",
        lambda: (c := call_card(driver, CALLER)) is not None and c.get_attribute("data-state") == "connected",
        explain=explain,
    )
    call_id = call_card(driver, CALLER).get_attribute("data-call-id")

    node = _node_serving_clients(cluster)
    cluster.kill(node)
    dropped = time.monotonic()
    status = wait_until(
        "the page to notice the drop and wait to reconnect",
        lambda: (s := driver.find_element(By.ID, "connection-status")).get_attribute("data-state") == "waiting" and s,
        timeout=10,
        explain=explain,
    )
    assert "Reconnecting in" in status.text
    wait_until("the page to reconnect", lambda: connection_state(driver) == "open", timeout=15, explain=explain)
    waited = time.monotonic() - dropped
    # Creatio's client waits about 5 s before its first retry (+-10 % jitter here).
    assert 4.0 <= waited <= 9.0, f"reconnected after {waited:.1f}s"
    card = wait_until("the call back from the snapshot", lambda: call_card(driver, CALLER), explain=explain)
    assert card.get_attribute("data-call-id") == call_id
    assert card.get_attribute("data-state") == "connected"
    names = log_names(driver)
    assert names.index("ACTIVE_CALL_SNAPSHOT") < names.index("RECONNECT"), names[:20]
    errors = [e for e in console_errors(driver) if "WebSocket" not in e]
    assert errors == [], f"browser console errors: {errors}"


def _node_serving_clients(cluster: LocalCluster) -> str:
    for index, port in enumerate(cluster.node_ports):
        status, body = http_get(f"http://127.0.0.1:{port}/health")
        if status == 200 and json.loads(body).get("clients", 0) > 0:
            return f"node{index + 1}"
    raise AssertionError("no node reports the console's connection")


def test_console_page_needs_no_third_party_resources() -> None:
    for path in STATIC_DIR.iterdir():
        text = path.read_text(encoding="utf-8")
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, path


def test_console_passes_the_key_from_its_url(keyed_cluster: LocalCluster, browser: WebDriver) -> None:
    driver = browser
    # Straight to a node: HAProxy (balancer template) refuses every keyless request, the page's
    # static files included, so through it the page would not load.
    node = f"http://127.0.0.1:{keyed_cluster.options.node_ports[0]}"
    key = keyed_cluster.options.deployment_key
    driver.get(f"{node}/console?line=307&key={key}")
    explain = lambda: page_state(driver)  # noqa: E731
    wait_until("the page to connect with the key", lambda: connection_state(driver) == "open", explain=explain)
    assert driver.find_element(By.ID, "key-input").get_attribute("value") == key
    assert driver.find_element(By.ID, "key-input").get_attribute("type") == "password"
    assert console_errors(driver) == []

    driver.get(f"{node}/console?line=307&key=wrong-{key}")
    status = wait_until(
        "the refused handshake to be reported",
        lambda: (s := driver.find_element(By.ID, "connection-status")).get_attribute("data-state") == "waiting" and s,
        timeout=10,
        explain=explain,
    )
    assert "Reconnecting in" in status.text
    assert "could not connect" in driver.find_element(By.CSS_SELECTOR, "#log li").text
    assert "RECONNECT" in log_names(driver) and "LIBRARY_INITIALIZED" not in log_names(driver)


def test_console_call_buttons_speak_creatio(cluster: LocalCluster, browser: WebDriver) -> None:
    """Hold, pause/unpause, consult, cancel and hang up: each click sends the command Creatio's panel
    would send (checked on the wire), and whatever the cluster answers (events or ERROR) is shown."""
    driver = browser
    tap = WireTap(driver)
    driver.get(f"http://127.0.0.1:{cluster.options.haproxy_port}/console?line=308")
    explain = lambda: page_state(driver)  # noqa: E731
    wait_until("the page to connect", lambda: connection_state(driver) == "open", explain=explain)
    cluster.play("inbound-direct-long", line="308", caller=CALLER)
    card = wait_until(
        "the call to be connected",
        lambda: (c := call_card(driver, CALLER)) is not None and c.get_attribute("data-state") == "connected" and c,
        explain=explain,
    )
    call_id = card.get_attribute("data-call-id")

    def answered(command: str, shown: Callable[[list[str]], bool]) -> list[str]:
        """Wait until the page logged a reply to ``command`` and shows it (``shown``), or shows its ERROR."""

        def probe() -> list[str] | None:
            replies = received_since(driver, command)
            if "ERROR" in replies:
                return replies if newest_error_on_top(driver) else None
            return replies if replies and shown(replies) else None

        return wait_until(f"the page to show the answer to {command}", probe, timeout=10, explain=explain)

    # Hold is a toggle in Creatio's protocol; the call goes in commandExecutor as a JSON string.
    frame = tap.click(card.find_element(By.CSS_SELECTOR, "[data-action=hold]"), "HoldCall", explain)
    assert frame["commandExecutorId"] == call_id
    assert frame["commandExecutorType"] == "Terrasoft.Messaging.Common.Call, Terrasoft.Messaging.Common"
    executor = json.loads(frame["commandExecutor"])
    assert executor["id"] == call_id and executor["callerId"] == CALLER and executor["deviceId"] == "308"
    assert "callFeaturesSet" not in executor, "Call.serialize() does not write callFeaturesSet"
    replies = answered("HoldCall", lambda r: call_card(driver, CALLER).get_attribute("data-state") == "held")
    if "ERROR" not in replies:
        resume = call_card(driver, CALLER).find_element(By.CSS_SELECTOR, "[data-action=hold]")
        assert resume.text == "Resume"
        tap.click(resume, "HoldCall", explain)
        answered("HoldCall", lambda r: call_card(driver, CALLER).get_attribute("data-state") == "connected")

    agent = driver.find_element(By.ID, "agent-state")
    driver.find_element(By.ID, "pause-reason").send_keys("lunch")
    frame = tap.click(driver.find_element(By.ID, "pause-button"), "SetMsgUserState", explain)
    assert frame["parameters"] == {"code": "Paused", "reason": "lunch"}
    answered("SetMsgUserState", lambda r: agent.text == "Paused")
    frame = tap.click(driver.find_element(By.ID, "unpause-button"), "SetMsgUserState", explain)
    assert frame["parameters"] == {"code": "Active", "reason": ""}
    answered("SetMsgUserState", lambda r: agent.text == "Active")

    # Consult 306: the page then shows two calls and the consultation bar.
    driver.find_element(By.ID, "number-input").send_keys("306")
    frame = tap.click(driver.find_element(By.ID, "consult-button"), "MakeConsultCall", explain)
    assert frame["commandExecutorId"] == call_id and frame["parameters"] == {"targetAddress": "306"}
    replies = answered("MakeConsultCall", lambda r: driver.find_element(By.ID, "consult-bar").is_displayed())
    if "ERROR" not in replies:
        consult = wait_until("the consultation call", lambda: call_card(driver, "306"), explain=explain)
        consult_id = consult.get_attribute("data-call-id")
        assert call_card(driver, CALLER).get_attribute("data-state") == "held"
        assert "current" in (call_card(driver, CALLER).get_attribute("class") or "")
        wait_until(
            "Complete transfer to be offered",
            lambda: driver.find_element(By.ID, "complete-transfer-button").is_enabled(),
            explain=explain,
        )
        frame = tap.click(driver.find_element(By.ID, "cancel-transfer-button"), "CancelTransfer", explain)
        assert frame["commandExecutorId"] == "" and "commandExecutor" not in frame
        assert json.loads(frame["parameters"]["currentCall"])["id"] == call_id
        assert json.loads(frame["parameters"]["consultCall"])["id"] == consult_id
        answered("CancelTransfer", lambda r: call_card(driver, "306") is None)

    frame = tap.click(
        call_card(driver, CALLER).find_element(By.CSS_SELECTOR, "[data-action=drop]"), "DropCall", explain
    )
    assert frame["commandExecutorId"] == call_id
    answered("DropCall", lambda r: call_card(driver, CALLER) is None)
    assert console_errors(driver) == []


@pytest.fixture
def static_server() -> Iterator[str]:
    """ws_node/static over plain HTTP on a free loopback port, for the page's modules on their own."""
    handler = functools.partial(StaticHandler, directory=str(STATIC_DIR))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class StaticHandler(http.server.SimpleHTTPRequestHandler):
    """The node's layout: ``/console`` is console.html, ``/static/<file>`` the folder's files."""

    def translate_path(self, path: str) -> str:
        route = path.split("?", 1)[0]
        if route == "/console":
            return str(STATIC_DIR / "console.html")
        if route.startswith("/static/"):
            return super().translate_path(route[len("/static") :])
        return str(STATIC_DIR / "missing")

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_protocol_module_builds_creatio_frames(static_server: str, browser: WebDriver) -> None:
    """creatio-channel.js on its own, in the browser: backoff, URL, call serialisation, content decoding."""
    driver = browser
    driver.get(f"{static_server}/console")  # idle: no line given, so it does not connect
    result = driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        import(arguments[0]).then((m) => done({
          delays: [1, 2, 3, 4, 5, 6, 7, 200].map(
            (n) => [m.reconnectDelayMs(n, () => 0), m.reconnectDelayMs(n, () => 1)]),
          url: m.socketUrl("https://crm.example/ops/console?line=1#x", "k y"),
          plain: m.socketUrl("http://127.0.0.1:2013/console?line=305", ""),
          call: m.serializeCall(
            {id: "a", state: 0, callerId: "", calledId: null, callFeaturesSet: 12, deviceId: "305"}),
          decoded: [m.decodeContent('{"a":1}'), m.decodeContent("raw"), m.decodeContent({b: 2})],
          names: [m.EVENT_NAMES[5], m.ERROR_NAMES[3]],
          line: [m.LINE_PATTERN.test("305"), m.LINE_PATTERN.test("30 5"), m.LINE_PATTERN.test("x".repeat(33))],
        }), (e) => done({error: String(e)}));
        """,
        f"{static_server}/static/creatio-channel.js",
    )
    assert "error" not in result, result
    # about 5 s first, doubling, capped near 185 s, +-10 %
    assert result["delays"] == [
        [4500, 5500],
        [9000, 11000],
        [18000, 22000],
        [36000, 44000],
        [72000, 88000],
        [144000, 176000],
        [166500, 203500],
        [166500, 203500],
    ]
    assert result["url"] == "wss://crm.example/ops/?key=k+y"
    assert result["plain"] == "ws://127.0.0.1:2013/"
    assert result["call"] == {"id": "a", "deviceId": "305", "state": 0}
    assert result["decoded"] == [{"a": 1}, "raw", {"b": 2}]
    assert result["names"] == ["RING_STARTED", "COMMAND_ERROR"]
    assert result["line"] == [True, False, False]
    assert console_errors(driver) == []
