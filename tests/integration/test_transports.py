"""Both agent transports on real node processes (python -m ws_node) with the real RabbitMQ and Redis.

Nodes are started directly here, not behind HAProxy, so the node's own admission and protocol
rules are what is tested: negotiate, cross-node tokens, handshake and keep-alive timings (made
short by flags), size/rate limits, Origin and key checks, the connection cap, and the bounded
backlog for a client that never reads. The HAProxy path is in tests/e2e.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import redis.asyncio as aioredis
import websockets

from ami_gateway.event_outbox import EventOutbox, EventPublisher, Sequencer
from local_cluster.infra import Infrastructure, free_port
from services.line_state import LineStateWriter
from services.topology import Topology
from services.wire import Call, CallState, Direction, EventType, LineEvent

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RS = "\x1e"
KEY = "integration-key-0123"
SECRET = "integration-token-secret"
ORIGIN = "https://crm.example.com"


@dataclass
class NodeProcess:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str) -> float:
        status, body = http("GET", f"{self.http}/metrics")
        assert status == 200
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def health(self) -> dict[str, Any]:
        _status, body = http("GET", f"{self.http}/health")
        result: dict[str, Any] = json.loads(body)
        return result


def http(method: str, url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {}, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def http_headers(method: str, url: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, method=method, headers=headers, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
            return int(response.status), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as exc:
        return int(exc.code), {k.lower(): v for k, v in exc.headers.items()}


def start_node(run_dir: Path, prefix: str, infra: Infrastructure, *extra: str) -> NodeProcess:
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = run_dir / f"appsettings-{prefix}.json"
    settings.write_text(json.dumps({"Cluster": {"amqpUrl": infra.amqp_url, "redisUrl": infra.redis_url,
                                                "prefix": prefix}}))
    port = free_port()
    log_path = run_dir / f"node-{port}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "ws_node", "--config", str(settings), "--port", str(port),
             "--node-id", f"{prefix}-{port}", "--drain-seconds", "0", *extra],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True,
        )
    node = NodeProcess(port, process, log_path)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"node exited:\n{node.log()[-3000:]}")
        with contextlib.suppress(OSError):
            if http("GET", f"{node.http}/health")[0] == 200:
                return node
        time.sleep(0.1)
    stop_node(node)
    raise AssertionError(f"node did not become healthy:\n{node.log()[-3000:]}")


def stop_node(node: NodeProcess) -> None:
    if node.process.poll() is None:
        node.process.terminate()
        try:
            node.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait(timeout=5)


async def _delete_namespace(infra: Infrastructure, prefix: str) -> None:
    client = aioredis.from_url(infra.redis_url)
    keys = [k async for k in client.scan_iter(f"{prefix}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()
    connection = await aio_pika.connect(infra.amqp_url)
    async with connection:
        channel = await connection.channel()
        topology = Topology(prefix)
        await channel.queue_delete(topology.commands_queue)
        await channel.exchange_delete(topology.events_exchange)


TIGHT = (
    "--key", KEY, "--signalr-token-secret", SECRET, "--allowed-origin", ORIGIN,
    "--signalr-ping-interval", "0.5", "--signalr-client-timeout", "2", "--handshake-timeout", "1.5",
    "--max-message-bytes", "4096", "--rate", "5", "--burst", "10", "--flood-tolerance", "10",
    "--max-connections", "6",
)


@pytest.fixture(scope="module")
def nodes(infra: Infrastructure, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    run_dir = Path(tmp_path_factory.mktemp("transports"))
    first = start_node(run_dir, prefix, infra, *TIGHT)
    try:
        second = start_node(run_dir, prefix, infra, *TIGHT)
    except BaseException:
        stop_node(first)
        raise
    try:
        yield first, second
    finally:
        stop_node(first)
        stop_node(second)
        asyncio.run(_delete_namespace(infra, prefix))
        for node in (first, second):
            assert KEY not in node.log() and SECRET not in node.log(), "a secret reached the node's log"


# ---- a minimal SignalR client for protocol-level checks --------------------------------------------


class HubClient:
    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self._pending: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, url: str, *, handshake: bool = True, origin: str | None = None) -> HubClient:
        headers = {"Origin": origin} if origin else None
        client = cls(await websockets.connect(url, additional_headers=headers, max_size=2**22))
        if handshake:
            await client.ws.send(json.dumps({"protocol": "json", "version": 1}) + RS)
            assert await client.record() == {}
        return client

    async def record(self, timeout: float = 5.0) -> dict[str, Any]:
        while not self._pending:
            message = await asyncio.wait_for(self.ws.recv(), timeout)
            assert isinstance(message, str) and message.endswith(RS), message
            self._pending.extend(json.loads(part) for part in message.split(RS)[:-1])
        return self._pending.pop(0)

    async def until(self, predicate: Any, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            record = await self.record(max(0.01, deadline - time.monotonic()))
            if predicate(record):
                return record

    async def invoke(self, target: str, *arguments: Any, invocation_id: str | None = None) -> None:
        message: dict[str, Any] = {"type": 1, "target": target, "arguments": list(arguments)}
        if invocation_id is not None:
            message["invocationId"] = invocation_id
        await self.ws.send(json.dumps(message) + RS)

    async def send_command(self, command: str, parameters: dict[str, Any], invocation_id: str) -> None:
        body = {"command": command, "parameters": parameters, "commandUId": "", "connectionUId": ""}
        await self.invoke("SendRawMessage", json.dumps(body), invocation_id=invocation_id)

    async def close(self) -> None:
        await self.ws.close()


def server_event(record: dict[str, Any]) -> dict[str, Any] | None:
    if record.get("type") == 1 and record.get("target") == "ServerMessage":
        [text] = record["arguments"]
        assert isinstance(text, str)
        envelope: dict[str, Any] = json.loads(text)
        return envelope
    return None


def negotiate(node: NodeProcess, version: int | str = 1, **headers: str) -> dict[str, Any]:
    status, body = http("POST", f"{node.http}/negotiate?key={KEY}&negotiateVersion={version}", headers)
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


async def closed_with(ws: Any, timeout: float = 5.0) -> int | None:
    """Reads until the server closes; returns the close code it sent."""
    with contextlib.suppress(websockets.ConnectionClosed):
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    code: int | None = ws.close_code
    return code


# ---- negotiate --------------------------------------------------------------------------------------


def test_negotiate_versions_and_errors(nodes: tuple[NodeProcess, NodeProcess]) -> None:
    node, _ = nodes
    v1 = negotiate(node, 1)
    assert v1["negotiateVersion"] == 1
    assert v1["connectionId"] and v1["connectionToken"] and v1["connectionId"] != v1["connectionToken"]
    assert v1["availableTransports"] == [{"transport": "WebSockets", "transferFormats": ["Text"]}]
    v0 = negotiate(node, 0)
    assert v0["negotiateVersion"] == 0 and "connectionToken" not in v0 and v0["connectionId"]
    assert negotiate(node, 9)["negotiateVersion"] == 1
    assert http("POST", f"{node.http}/negotiate?key={KEY}&negotiateVersion=x")[0] == 400
    assert http("GET", f"{node.http}/negotiate?key={KEY}")[0] == 405
    assert http("POST", f"{node.http}/negotiate?key=wrong-key-000000&negotiateVersion=1")[0] == 403
    assert http("POST", f"{node.http}/negotiate?negotiateVersion=1")[0] == 403
    # any hub path the administrator chose works: the client appends /negotiate to it
    assert http("POST", f"{node.http}/signalr/hub/negotiate?key={KEY}&negotiateVersion=1")[0] == 200
    # a plain GET of the agent endpoint says how to connect instead of serving anything
    assert http("GET", f"{node.http}/?key={KEY}")[0] == 426


def test_negotiate_cors_for_a_browser_on_another_origin(nodes: tuple[NodeProcess, NodeProcess]) -> None:
    node, _ = nodes
    url = f"{node.http}/negotiate?key={KEY}&negotiateVersion=1"
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "x-requested-with,x-signalr-user-agent"}
    status, headers = http_headers("OPTIONS", url, preflight)
    assert status == 204
    assert headers["access-control-allow-origin"] == ORIGIN
    assert headers["access-control-allow-credentials"] == "true"
    assert "x-signalr-user-agent" in headers["access-control-allow-headers"]
    status, headers = http_headers("POST", url, {"Origin": ORIGIN})
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    assert http_headers("OPTIONS", url, {**preflight, "Origin": "https://evil.example"})[0] == 403
    status, headers = http_headers("POST", url, {"Origin": "https://evil.example"})
    assert status == 403 and "access-control-allow-origin" not in headers


# ---- tokens across nodes ------------------------------------------------------------------------------


def test_negotiate_on_node_a_then_open_the_socket_on_node_b(nodes: tuple[NodeProcess, NodeProcess]) -> None:
    node_a, node_b = nodes

    async def main() -> None:
        for version, field in ((1, "connectionToken"), (0, "connectionId")):
            token = negotiate(node_a, version)[field]
            hub = await HubClient.connect(f"{node_b.ws}/?key={KEY}&id={token}")
            try:
                await hub.send_command("LoadLibrary", {"AssemblyName": "Asterisk"}, invocation_id="7")
                records = [await hub.record(), await hub.record()]
                completion = next(r for r in records if r.get("type") == 3)
                assert completion == {"type": 3, "invocationId": "7"}
                events = [server_event(r) for r in records if server_event(r) is not None]
                assert [e["eventType"] for e in events if e] == [1]  # LIBRARY_INITIALIZED
            finally:
                await hub.close()

    asyncio.run(main())


@pytest.mark.parametrize("token", ["garbage", "ffffffff.AAAA.BBBB", "{other}"])
def test_unknown_forged_or_foreign_tokens_get_404(nodes: tuple[NodeProcess, NodeProcess], token: str) -> None:
    node, _ = nodes
    if token == "{other}":
        from ws_node.signalr_token import ConnectionTokens, derive_secret

        token = ConnectionTokens(derive_secret("another-cluster", "")).issue(time.time()).connection_token

    async def main() -> None:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(f"{node.ws}/?key={KEY}&id={token}")
        assert refused.value.response.status_code == 404

    asyncio.run(main())


def test_skip_negotiation_handshake_on_a_socket_without_id(nodes: tuple[NodeProcess, NodeProcess]) -> None:
    node, _ = nodes

    async def main() -> None:
        hub = await HubClient.connect(f"{node.ws}/?key={KEY}")
        try:
            await hub.invoke("Ping", invocation_id="p1")
            assert await hub.until(lambda r: r.get("type") == 3) == {"type": 3, "invocationId": "p1"}
            await hub.invoke("NoSuchMethod", invocation_id="p2")
            failed = await hub.until(lambda r: r.get("type") == 3)
            assert failed["invocationId"] == "p2" and "Unknown hub method" in failed["error"]
        finally:
            await hub.close()

    asyncio.run(main())


# ---- keep-alive and deadlines ------------------------------------------------------------------------


def test_server_pings_and_drops_a_silent_client_but_not_a_pinging_one(nodes: tuple[NodeProcess, NodeProcess]) -> None:
    node, _ = nodes

    async def main() -> None:
        lively = await HubClient.connect(f"{node.ws}/?key={KEY}")
        silent = await HubClient.connect(f"{node.ws}/?key={KEY}")
        try:
            assert await silent.record(timeout=3) == {"type": 6}
            started = time.monotonic()
            for _ in range(8):  # 3.2 s: longer than the 2 s client timeout
                await lively.ws.send('{"type":6}' + RS)
                await asyncio.sleep(0.4)
            close = await silent.until(lambda r: r.get("type") == 7, timeout=1)
            assert "Connection closed with an error" in close["error"] and close.get("allowReconnect") is True
            assert await closed_with(silent.ws) == 1001
            assert 1.5 < time.monotonic() - started < 4.5
            await lively.invoke("Ping", invocation_id="still-here")
            assert await lively.until(lambda r: r.get("type") == 3) == {"type": 3, "invocationId": "still-here"}
        finally:
            await lively.close()
            await silent.close()

    asyncio.run(main())


@pytest.mark.parametrize("with_token", [False, True])
def test_a_socket_that_never_says_anything_is_closed_after_the_handshake_timeout(
    nodes: tuple[NodeProcess, NodeProcess], with_token: bool
) -> None:
    node, _ = nodes

    async def main() -> None:
        url = f"{node.ws}/?key={KEY}"
        if with_token:
            url += "&id=" + negotiate(node)["connectionToken"]
        ws = await websockets.connect(url)
        started = time.monotonic()
        code = await closed_with(ws, timeout=6)
        assert code == 1008 and 1.0 < time.monotonic() - started < 4.0

    asyncio.run(main())


# ---- the raw transport on the same endpoint -----------------------------------------------------------


def test_raw_websocket_on_the_same_endpoint_gets_plain_frames(nodes: tuple[NodeProcess, NodeProcess]) -> None:
    node, _ = nodes

    async def main() -> None:
        async with websockets.connect(f"{node.ws}/?key={KEY}") as ws:
            await ws.send(json.dumps({"command": "LoadLibrary", "parameters": {}, "commandUId": ""}))
            frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert frame["eventType"] == 1 and isinstance(frame["content"], str)

    asyncio.run(main())


# ---- hostile input, directly on a node ----------------------------------------------------------------


def test_key_origin_and_connection_cap_are_enforced_by_the_node(nodes: tuple[NodeProcess, NodeProcess]) -> None:
    node, _ = nodes

    async def status_of(url: str, origin: str | None = None) -> int:
        headers = {"Origin": origin} if origin else None
        try:
            ws = await websockets.connect(url, additional_headers=headers)
        except websockets.InvalidStatus as exc:
            return int(exc.response.status_code)
        await ws.close()
        return 101

    async def main() -> None:
        assert await status_of(f"{node.ws}/") == 403
        assert await status_of(f"{node.ws}/?key=integration-key-0124") == 403
        assert await status_of(f"{node.ws}/?key={KEY}", origin="https://evil.example") == 403
        assert await status_of(f"{node.ws}/?key={KEY}", origin=ORIGIN) == 101
        held = [await websockets.connect(f"{node.ws}/?key={KEY}") for _ in range(6)]
        try:
            assert await status_of(f"{node.ws}/?key={KEY}") == 503
            assert http("POST", f"{node.http}/negotiate?key={KEY}&negotiateVersion=1")[0] == 503
        finally:
            for ws in held:
                await ws.close()
        for _ in range(50):
            if node.health()["sockets"] == 0:
                break
            await asyncio.sleep(0.05)
        assert await status_of(f"{node.ws}/?key={KEY}") == 101

    asyncio.run(main())


@pytest.mark.parametrize("transport", ["raw", "signalr"])
def test_oversized_binary_and_invalid_utf8_frames_close_only_that_socket(
    nodes: tuple[NodeProcess, NodeProcess], transport: str
) -> None:
    node, _ = nodes

    async def open_socket() -> HubClient:
        return await HubClient.connect(f"{node.ws}/?key={KEY}", handshake=transport == "signalr")

    async def main() -> None:
        bystander = await HubClient.connect(f"{node.ws}/?key={KEY}")
        try:
            big = await open_socket()
            await big.ws.send("x" * 5000)
            if transport == "signalr":
                close = await big.until(lambda r: r.get("type") == 7)
                assert "4096 bytes" in close["error"]
            assert await closed_with(big.ws) == 1009

            binary = await open_socket()
            await binary.ws.send(b"\x00\x01\x02")
            if transport == "signalr":
                close = await binary.until(lambda r: r.get("type") == 7)
                assert "binary" in close["error"]
            assert await closed_with(binary.ws) == 1003

            bad_utf8 = await open_socket()
            await bad_utf8.ws.send(b'{"command":"\xff\xfe"}', text=True)
            assert await closed_with(bad_utf8.ws) == 1007

            await bystander.invoke("Ping", invocation_id="ok")
            assert await bystander.until(lambda r: r.get("type") == 3) == {"type": 3, "invocationId": "ok"}
        finally:
            await bystander.close()

    asyncio.run(main())


def test_garbage_signalr_records_close_with_an_error(nodes: tuple[NodeProcess, NodeProcess]) -> None:
    node, _ = nodes

    async def main() -> None:
        bad_handshake = await HubClient.connect(f"{node.ws}/?key={KEY}", handshake=False)
        await bad_handshake.ws.send('{"protocol":"messagepack","version":1}' + RS)
        assert "not available" in (await bad_handshake.record())["error"]
        assert await closed_with(bad_handshake.ws) == 1002

        garbage = await HubClient.connect(f"{node.ws}/?key={KEY}")
        await garbage.ws.send("this is not json" + RS)
        close = await garbage.until(lambda r: r.get("type") == 7)
        assert "not a JSON object" in close["error"]
        assert await closed_with(garbage.ws) == 1002

        # Garbage on the raw transport is the session's business: an ERROR event, the socket stays.
        async with websockets.connect(f"{node.ws}/?key={KEY}") as raw:
            await raw.send("{{{ not json")
            frame = json.loads(await asyncio.wait_for(raw.recv(), 5))
            assert frame["eventType"] == 3
            await raw.send(json.dumps({"command": "LoadLibrary", "parameters": {}}))
            assert json.loads(await asyncio.wait_for(raw.recv(), 5))["eventType"] == 1

    asyncio.run(main())


@pytest.mark.parametrize("transport", ["raw", "signalr"])
def test_a_flood_is_warned_then_disconnected_and_counted(
    nodes: tuple[NodeProcess, NodeProcess], transport: str
) -> None:
    node, _ = nodes
    before_limited = node.metric("cms_node_rate_limited_messages_total")
    before_cut = node.metric("cms_node_rate_limit_disconnects_total")
    query = json.dumps({"command": "QueryLineState", "parameters": {}, "commandUId": ""})

    async def main() -> None:
        bystander = await HubClient.connect(f"{node.ws}/?key={KEY}")
        try:
            if transport == "raw":
                ws = await websockets.connect(f"{node.ws}/?key={KEY}")
                for _ in range(40):
                    await ws.send(query)
                frames: list[dict[str, Any]] = []
                with contextlib.suppress(websockets.ConnectionClosed):
                    async with asyncio.timeout(5):
                        while True:
                            frames.append(json.loads(await ws.recv()))
                warnings = [f for f in frames if f["eventType"] == 3 and "too many messages" in f["content"]]
                assert len(warnings) == 1
                assert ws.close_code == 1008
            else:
                hub = await HubClient.connect(f"{node.ws}/?key={KEY}")
                for n in range(40):
                    await hub.invoke("SendRawMessage", query, invocation_id=str(n))
                records: list[dict[str, Any]] = []
                with contextlib.suppress(websockets.ConnectionClosed):
                    async with asyncio.timeout(5):
                        while True:
                            records.append(await hub.record())
                refused = [r for r in records if r.get("type") == 3 and "too many messages" in r.get("error", "")]
                assert refused, records
                warnings = [e for e in map(server_event, records) if e and e["eventType"] == 3]
                assert any("too many messages" in e["content"] for e in warnings)
                assert records[-1]["type"] == 7 and "too many messages" in records[-1]["error"]
                assert hub.ws.close_code == 1008
            await bystander.invoke("Ping", invocation_id="ok")
            assert await bystander.until(lambda r: r.get("type") == 3) == {"type": 3, "invocationId": "ok"}
        finally:
            await bystander.close()

    asyncio.run(main())
    assert node.metric("cms_node_rate_limited_messages_total") >= before_limited + 11
    assert node.metric("cms_node_rate_limit_disconnects_total") == before_cut + 1


# ---- a client that never reads --------------------------------------------------------------------------


def _masked_text_frame(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    header = bytearray([0x81])
    if len(payload) < 126:
        header.append(0x80 | len(payload))
    else:
        header.append(0x80 | 126)
        header += len(payload).to_bytes(2, "big")
    return bytes(header) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _stuck_client(port: int, line: str, transport: str) -> socket.socket:
    """A client that opens the line and then never reads: a tiny receive window, nothing read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"GET /?key={KEY} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(1)
        assert chunk, "server closed during the handshake"
        response += chunk
    assert response.startswith(b"HTTP/1.1 101"), response
    params = {"connectionParams": json.dumps({"ExtensionName": line, "debugMode": False})}
    commands = [json.dumps({"command": "LoadLibrary", "parameters": {}}),
                json.dumps({"command": "OpenConnection", "parameters": params})]
    if transport == "signalr":
        sock.sendall(_masked_text_frame('{"protocol":"json","version":1}' + RS))
        for n, command in enumerate(commands):
            invocation = {"type": 1, "invocationId": str(n), "target": "SendRawMessage", "arguments": [command]}
            sock.sendall(_masked_text_frame(json.dumps(invocation) + RS))
    else:
        for command in commands:
            sock.sendall(_masked_text_frame(command))
    return sock


def _big_event(line: str, n: int, finished: bool) -> LineEvent:
    call = Call(id=f"call-{n}", line=line, linked_id=f"{n}.0", channel=f"SIP/{line}-{n}", direction=Direction.INBOUND,
                state=CallState.FINISHED if finished else CallState.RINGING, caller_number=str(1000 + n),
                caller_name="N" * 3000, started_at=time.time())
    kind = EventType.RING_FINISHED if finished else EventType.RING_STARTED
    return LineEvent(line=line, type=kind, call=call, ami_received_at=time.time())


@pytest.mark.parametrize("transport", ["raw", "signalr"])
def test_a_client_that_never_reads_is_cut_while_another_on_the_line_keeps_receiving(
    infra: Infrastructure, tmp_path: Path, transport: str
) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    node = start_node(tmp_path, prefix, infra, "--key", KEY, "--max-backlog-frames", "50", "--rate", "0")
    line, calls = "401", 1500

    async def main() -> None:
        topology = Topology(prefix)
        redis_client = aioredis.from_url(infra.redis_url)
        writer = LineStateWriter(redis_client, prefix)
        publisher = EventPublisher(infra.amqp_url, topology)
        outbox = EventOutbox(writer, publisher, Sequencer(await writer.new_epoch()))
        drain = asyncio.create_task(outbox.run())
        stuck: socket.socket | None = None
        reader: HubClient | None = None
        try:
            outbox.put([_big_event("999", 0, True)])  # declares the exchange before nodes bind
            assert await outbox.wait_idle(10)
            reader = await HubClient.connect(f"{node.ws}/?key={KEY}")
            await reader.send_command("LoadLibrary", {}, "a")
            await reader.send_command(
                "OpenConnection", {"connectionParams": json.dumps({"ExtensionName": line})}, "b"
            )
            await reader.until(lambda r: (server_event(r) or {}).get("eventType") == 2)
            stuck = await asyncio.to_thread(_stuck_client, node.port, line, transport)
            for _ in range(100):
                if node.health()["clients"] == 2:
                    break
                await asyncio.sleep(0.05)
            assert node.health()["clients"] == 2
            await asyncio.sleep(0.5)  # the stuck client's OpenConnection has bound the line

            finished = 0
            for start in range(0, calls, 100):
                outbox.put([_big_event(line, n, done) for n in range(start, start + 100) for done in (False, True)])
                deadline = time.monotonic() + 20
                while finished < start + 100:
                    event = server_event(await reader.record(timeout=max(0.1, deadline - time.monotonic())))
                    if event and event["eventType"] == 6:  # RING_FINISHED
                        finished += 1
            assert finished == calls
            assert node.metric("cms_node_slow_client_disconnects_total") == 1
            assert node.health()["clients"] == 1
        finally:
            if stuck is not None:
                stuck.close()
            if reader is not None:
                await reader.close()
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
            await publisher.close()
            await redis_client.aclose()

    try:
        asyncio.run(main())
    finally:
        stop_node(node)
        asyncio.run(_delete_namespace(infra, prefix))
    assert re.search(r"client does not read; disconnecting", node.log())
