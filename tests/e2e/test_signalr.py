"""Creatio 8.x's transport end to end: Microsoft's own SignalR client (@microsoft/signalr from npm,
driven by tests/js/signalr_agent.js) through the real HAProxy to the real nodes, gateway,
RabbitMQ, Redis and the AMI simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from local_cluster.infra import Infrastructure
from local_cluster.launcher import ClusterOptions, LocalCluster, http_get
from tests.support.creatio_client import RING_STARTED, CreatioAgent

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
JS_DIR = ROOT / "tests" / "js"
KEY = "e2e-deployment-key-0123"
SECRET = "e2e-signalr-token-secret"
CALLER = "79161234567"

LIBRARY_INITIALIZED, CONNECTION_CREATED, ERROR = 1, 2, 3
RING_FINISHED, COMMUTATION_STARTED, ACTIVE_CALL_SNAPSHOT = 6, 7, 10


@pytest.fixture(scope="session")
def signalr_client() -> Path:
    return ensure_signalr_client()


def ensure_signalr_client() -> Path:
    """``npm ci``, only when the lock file changed since the last install (npm's own cache makes
    the reinstall offline-fast); returns the harness script."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("Node.js (node and npm, 18+) is needed for the SignalR compatibility tests")
    marker = JS_DIR / "node_modules" / ".package-lock.json"
    lock = JS_DIR / "package-lock.json"
    if not marker.exists() or marker.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run([npm, "ci", "--prefer-offline", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True,
                       timeout=300, capture_output=True)
    return JS_DIR / "signalr_agent.js"


def client_log_dir(run_dir: Path) -> Path:
    return run_dir.parent / "client-logs"


def cluster_options(run_dir: Path, infra: Infrastructure) -> ClusterOptions:
    return ClusterOptions.ephemeral(
        run_dir, amqp_url=infra.amqp_url, redis_url=infra.redis_url, deployment_key=KEY,
        # env twins of ws_node flags reach every node without launcher changes; the client log folder is an
        # older deployment's setting, now ignored (test_log_replay_commands_get_an_error_over_signalr)
        extra_env={"CMS_NODE_SIGNALR_TOKEN_SECRET": SECRET, "CMS_NODE_CLIENT_LOG_DIR": str(client_log_dir(run_dir))},
    )


@pytest.fixture(scope="module")
def cluster(infra: Infrastructure, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(cluster_options(Path(tmp_path_factory.mktemp("signalr")) / "run", infra))
    local.start(timeout=60)
    try:
        yield local
    finally:
        local.stop()


class SignalRAgent:
    """One run of tests/js/signalr_agent.js; its JSON lines collected as they come."""

    def __init__(self, script: Path, url: str, line: str, *flags: str) -> None:
        self.args = ["node", str(script), "--url", url, "--line", line, *flags]
        self.lines: list[dict[str, Any]] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._new = asyncio.Condition()
        self.stderr = b""

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.args, cwd=JS_DIR, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for raw in self.process.stdout:
            item = json.loads(raw)
            async with self._new:
                self.lines.append(item)
                self._new.notify_all()
        async with self._new:
            self._new.notify_all()

    def events(self, event_type: int | None = None) -> list[dict[str, Any]]:
        return [i for i in self.lines if i["kind"] == "event" and (event_type is None or i["eventType"] == event_type)]

    async def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15.0,
                   after: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        async with self._new:
            while True:
                for item in self.lines[after:]:
                    if predicate(item):
                        return item
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self._reader is not None and self._reader.done()):
                    raise AssertionError(f"not seen within {timeout}s; last lines: {self.lines[-8:]}; "
                                         f"stderr: {self.stderr.decode(errors='replace')[-500:]}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._new.wait(), remaining)

    async def event(self, event_type: int, timeout: float = 15.0, after: int = 0) -> dict[str, Any]:
        return await self.wait(lambda i: i["kind"] == "event" and i["eventType"] == event_type, timeout, after)

    async def send(self, op: dict[str, Any]) -> None:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write((json.dumps(op) + "\n").encode())
        await self.process.stdin.drain()

    async def stop(self) -> None:
        if self.process is None:
            return
        if self.process.returncode is None:
            with contextlib.suppress(ConnectionError):
                await self.send({"op": "stop"})
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self.process.stderr is not None:
            self.stderr = await self.process.stderr.read()
        if self._reader is not None:
            await self._reader


async def opened(agent: SignalRAgent) -> dict[str, Any]:
    """Creatio's opening sequence done: the snapshot event, and the last invocation's completion
    (which may come before or after the event it caused)."""
    snapshot = await agent.event(ACTIVE_CALL_SNAPSHOT)
    await agent.wait(lambda i: i["kind"] in ("invoked", "invoke-error") and i["label"] == "QueryActiveCallSnapshot")
    return snapshot


def content(item: dict[str, Any]) -> Any:
    raw = item["envelope"]["content"]
    return json.loads(raw) if isinstance(raw, str) and raw else raw


def assert_creatio_sequence_ok(agent: SignalRAgent) -> None:
    """Every push was one string argument, every invocation completed without an error."""
    assert all(i["argType"] == "string" for i in agent.events())
    assert not [i for i in agent.lines if i["kind"] in ("invoke-error", "bad-message", "harness-error")], agent.lines
    labels = [i["label"] for i in agent.lines if i["kind"] == "invoked"]
    assert labels[:3] == ["LoadLibrary", "OpenConnection", "QueryActiveCallSnapshot"], labels


def http_url(cluster: LocalCluster, port: int | None = None) -> str:
    return f"http://127.0.0.1:{port or cluster.options.haproxy_port}/?key={KEY}"


def clients_per_node(cluster: LocalCluster) -> list[int]:
    counts = []
    for port in cluster.node_ports:
        status, body = http_get(f"http://127.0.0.1:{port}/health")
        counts.append(json.loads(body)["clients"] if status == 200 else -1)
    return counts


def test_microsoft_client_through_haproxy_gets_the_call(cluster: LocalCluster, signalr_client: Path) -> None:
    async def main() -> None:
        agent = SignalRAgent(signalr_client, http_url(cluster), "305")
        await agent.start()
        try:
            started = await agent.wait(lambda i: i["kind"] == "started")
            assert started["state"] == "Connected" and started["connectionId"]
            snapshot = await opened(agent)
            assert content(snapshot) == {"ActiveCalls": [], "CurrentCall": None}
            assert agent.events(CONNECTION_CREATED)[0]["envelope"]["connectionUId"]
            mark = len(agent.lines)
            await asyncio.to_thread(cluster.play, "inbound-direct-answered", line="305", caller=CALLER)
            ring = content(await agent.event(RING_STARTED, after=mark))
            assert ring["callerId"] == CALLER
            talk = content(await agent.event(COMMUTATION_STARTED, after=mark))
            end = content(await agent.event(RING_FINISHED, timeout=20, after=mark))
            assert ring["id"] == talk["id"] == end["id"]
            assert_creatio_sequence_ok(agent)
        finally:
            await agent.stop()
        assert agent.lines[-1] == {"kind": "closed", "error": None}

    asyncio.run(main())


def test_negotiate_on_node_a_and_connect_on_node_b_with_the_microsoft_client(
    cluster: LocalCluster, signalr_client: Path
) -> None:
    port_a, port_b = cluster.node_ports

    async def main() -> None:
        agent = SignalRAgent(signalr_client, http_url(cluster, port_b), "307",
                             "--negotiate-via", f"http://127.0.0.1:{port_a}")
        await agent.start()
        try:
            await opened(agent)
            [negotiation] = [i for i in agent.lines if i["kind"] == "http"]
            assert negotiation["method"] == "POST"
            assert negotiation["url"].startswith(f"http://127.0.0.1:{port_a}/negotiate?")
            assert clients_per_node(cluster) == [0, 1]
            assert_creatio_sequence_ok(agent)
        finally:
            await agent.stop()

    asyncio.run(main())


def test_skip_negotiation_through_haproxy(cluster: LocalCluster, signalr_client: Path) -> None:
    async def main() -> None:
        agent = SignalRAgent(signalr_client, http_url(cluster), "308", "--skip-negotiation")
        await agent.start()
        try:
            await opened(agent)
            assert_creatio_sequence_ok(agent)
        finally:
            await agent.stop()

    asyncio.run(main())


def test_raw_and_signalr_agents_of_one_line_both_ring(cluster: LocalCluster, signalr_client: Path) -> None:
    async def main() -> None:
        user = "0e110000-0000-4000-8000-000000000306"  # both transports, one Creatio user
        modern = SignalRAgent(signalr_client, http_url(cluster), "306", "--user", user)
        await modern.start()
        legacy = CreatioAgent(cluster.client_url, "306", user_uid=user)
        await legacy.connect()
        try:
            await opened(modern)
            await legacy.open()
            mark_modern, mark_legacy = len(modern.lines), len(legacy.events)
            await asyncio.to_thread(cluster.play, "inbound-direct-answered", line="306", caller=CALLER)
            over_signalr = content(await modern.event(RING_STARTED, after=mark_modern))
            over_websocket = await legacy.wait_for(RING_STARTED, after=mark_legacy, timeout=15)
            assert isinstance(over_websocket.content, dict)
            assert over_signalr == over_websocket.content
        finally:
            await legacy.close()
            await modern.stop()

    asyncio.run(main())


def test_log_replay_commands_get_an_error_over_signalr(cluster: LocalCluster, signalr_client: Path) -> None:
    """ProcessLogs/SetLogFilePath through Microsoft's client: each invocation completes and its answer is
    ERROR(4) as a ServerMessage; the folder the nodes were started with stays empty."""
    folder = client_log_dir(cluster.run_dir)
    folder.mkdir(exist_ok=True)

    async def main() -> None:
        agent = SignalRAgent(signalr_client, http_url(cluster), "304")
        await agent.start()
        try:
            await opened(agent)
            mark = len(agent.lines)
            sent = [("SetLogFilePath", {"filePath": "C:\\Logs\\cti.log"}),
                    ("ProcessLogs", {"logs": "Event: Newchannel\r\nChannel: SIP/304-1\r\n\r\n"})]
            for command, params in sent:
                await agent.send({"op": "send", "command": command, "parameters": params})
            for command, _ in sent:
                await agent.wait(lambda i, c=command: i["kind"] == "invoked" and i["label"] == c, after=mark)
            first = await agent.event(ERROR, after=mark)
            await agent.event(ERROR, after=agent.lines.index(first, mark) + 1)
            errors = [content(i) for i in agent.lines[mark:] if i["kind"] == "event" and i["eventType"] == ERROR]
            assert [e["errorType"] for e in errors] == [4, 4], errors
            assert [e["data"].split(" ", 1)[0] for e in errors] == [command for command, _ in sent]
            assert all("refused" in e["data"] for e in errors)
            assert_creatio_sequence_ok(agent)
        finally:
            await agent.stop()

    asyncio.run(main())
    assert list(folder.iterdir()) == []


def test_a_draining_node_closes_signalr_agents_who_come_back_elsewhere(
    infra: Infrastructure, tmp_path: Path, signalr_client: Path
) -> None:
    local = LocalCluster(cluster_options(tmp_path / "run", infra))
    local.start(timeout=60)
    try:
        async def main() -> None:
            agent = SignalRAgent(signalr_client, http_url(local), "305")
            await agent.start()
            try:
                await opened(agent)
                counts = clients_per_node(local)
                node = f"node{counts.index(1) + 1}"
                await asyncio.to_thread(local.kill, node, signal.SIGTERM)
                closed = await agent.wait(lambda i: i["kind"] == "closed", timeout=15)
                # a clean close (type 7 without error): Creatio's panel starts its reconnect timer
                assert closed["error"] is None
            finally:
                await agent.stop()
            again = SignalRAgent(signalr_client, http_url(local), "305")
            await again.start()
            try:
                await opened(again)
                assert_creatio_sequence_ok(again)
            finally:
                await again.stop()

        asyncio.run(main())
    finally:
        local.stop()
