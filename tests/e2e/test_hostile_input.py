"""Bad and hostile input through the real HAProxy, on both transports, while two well-behaved agents
(one raw WebSocket, one Microsoft SignalR client) of the same line watch: after all of it, both
still ring on the next call and no node process has died.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from local_cluster.infra import Infrastructure
from local_cluster.launcher import ClusterOptions, LocalCluster, http_get
from tests.e2e.test_signalr import SignalRAgent, content, ensure_signalr_client, opened
from tests.support.creatio_client import ERROR, RING_STARTED, CreatioAgent

pytestmark = pytest.mark.e2e

KEY = "hostile-deployment-key-01"
ORIGIN = "https://crm.example.com"
RS = "\x1e"
LINE = "305"
#: the one Creatio user of the well-behaved agents (a different user would be refused the line: issue 12)
USER = "0e110000-0000-4000-8000-000000000305"


@pytest.fixture(scope="session")
def js_client() -> Path:
    return ensure_signalr_client()


@pytest.fixture(scope="module")
def cluster(infra: Infrastructure, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    options = ClusterOptions.ephemeral(
        Path(tmp_path_factory.mktemp("hostile")) / "run", amqp_url=infra.amqp_url, redis_url=infra.redis_url,
        deployment_key=KEY,
        extra_env={"CMS_NODE_ALLOWED_ORIGINS": ORIGIN, "CMS_NODE_SIGNALR_TOKEN_SECRET": "hostile-token-secret"},
    )
    local = LocalCluster(options)
    local.start(timeout=60)
    try:
        yield local
    finally:
        local.stop()
        for node in ("node1", "node2"):
            log = (local.run_dir / f"{local.prefix}-{node}.log").read_text(errors="replace")
            assert KEY not in log, f"the deployment key reached {node}'s log"
            assert "Traceback" not in log, f"{node} logged a traceback:\n{log[-3000:]}"


def ws_url(cluster: LocalCluster, key: str | None = KEY) -> str:
    return f"ws://127.0.0.1:{cluster.options.haproxy_port}/" + (f"?key={key}" if key is not None else "")


def http_url(cluster: LocalCluster, path: str = "/", key: str | None = KEY) -> str:
    return f"http://127.0.0.1:{cluster.options.haproxy_port}{path}" + (f"?key={key}" if key is not None else "")


async def handshake_status(url: str, origin: str | None = None) -> int:
    headers = {"Origin": origin} if origin else None
    try:
        ws = await websockets.connect(url, additional_headers=headers)
    except websockets.InvalidStatus as exc:
        return int(exc.response.status_code)
    await ws.close()
    return 101


async def close_code(ws: Any, timeout: float = 10.0) -> int | None:
    with contextlib.suppress(websockets.ConnectionClosed):
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    code: int | None = ws.close_code
    return code


def post_negotiate(cluster: LocalCluster, key: str | None, origin: str | None = None) -> int:
    import urllib.error
    import urllib.request

    url = http_url(cluster, "/negotiate", key) + ("&" if key is not None else "?") + "negotiateVersion=1"
    request = urllib.request.Request(url, method="POST", data=b"", headers={"Origin": origin} if origin else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def nodes_alive(cluster: LocalCluster) -> None:
    for name in ("node1", "node2", "haproxy"):
        assert cluster.child(name).alive(), f"{name} died"
    for port in cluster.node_ports:
        assert http_get(f"http://127.0.0.1:{port}/health")[0] == 200


def test_wrong_key_and_wrong_origin_are_refused_on_both_transports(
    cluster: LocalCluster, js_client: Path
) -> None:
    async def main() -> None:
        assert await handshake_status(ws_url(cluster, key=None)) == 403
        assert await handshake_status(ws_url(cluster, key="hostile-deployment-key-02")) == 403
        assert await handshake_status(ws_url(cluster), origin="https://evil.example") == 403
        assert await handshake_status(ws_url(cluster), origin=ORIGIN) == 101
        assert post_negotiate(cluster, key=None) == 403
        assert post_negotiate(cluster, key="x" * 20) == 403
        assert post_negotiate(cluster, KEY, origin="https://evil.example") == 403
        assert post_negotiate(cluster, KEY, origin=ORIGIN) == 200

        for url, origin in ((http_url(cluster, key="wrong-key-000000000"), ORIGIN),
                            (http_url(cluster), "https://evil.example")):
            agent = SignalRAgent(js_client, url, LINE, "--origin", origin, "--user", USER)
            await agent.start()
            failed = await agent.wait(lambda i: i["kind"] in ("start-error", "started"))
            assert failed["kind"] == "start-error" and "403" in failed["error"], failed
            await agent.stop()
        ok = SignalRAgent(js_client, http_url(cluster), LINE, "--origin", ORIGIN, "--user", USER)
        await ok.start()
        await opened(ok)
        await ok.stop()

    asyncio.run(main())


def _garbage_frames() -> list[str]:
    rng = random.Random(4)
    frames = [
        "", " ", "null", "[]", "[1,2,3]", '"a string"', "42", "{", '{"command":', "{}", '{"command":null}',
        '{"command":"NoSuchCommand","parameters":{}}', '{"command":"MakeCall","parameters":"not an object"}',
        '{"command":"OpenConnection","parameters":{"connectionParams":"{not json"}}',
        '{"command":"OpenConnection","parameters":{"connectionParams":"[1]"}}',
        '{"command":"DropCall","commandExecutor":"{\\"id\\":\\"00000000-0000-0000-0000-000000000000\\"}"}',
        "[" * 5000 + "]" * 5000, '{"a":' * 3000 + "1" + "}" * 3000, "\x00\x01\x1e\x1e{}",
        json.dumps({"command": "Load\ud7ffLibrary", "parameters": {"x": "\ue000" * 100}}),
    ]
    frames += ["".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(1, 300))) for _ in range(20)]
    return frames


def test_garbage_huge_binary_and_broken_frames_hurt_only_their_own_socket(
    cluster: LocalCluster, js_client: Path
) -> None:
    async def main() -> None:
        legacy = CreatioAgent(cluster.client_url, LINE, user_uid=USER)
        await legacy.connect()
        modern = SignalRAgent(js_client, http_url(cluster), LINE, "--user", USER)
        await modern.start()
        try:
            await legacy.open()
            await opened(modern)

            # Raw transport: each garbage frame is answered with an ERROR event, the socket stays up.
            # (The rate limit allows a burst of 60, so 40 frames are all answered.)
            garbage = _garbage_frames()
            async with websockets.connect(ws_url(cluster), max_size=2**22) as raw:
                for frame in garbage:
                    await raw.send(frame)
                errors = 0
                async with asyncio.timeout(15):
                    while errors < len(garbage):
                        if json.loads(await raw.recv())["eventType"] == ERROR:
                            errors += 1
                await raw.send(json.dumps({"command": "LoadLibrary", "parameters": {}}))
                assert json.loads(await asyncio.wait_for(raw.recv(), 5))["eventType"] == 1

            # Huge frames: 1009 on the raw transport; SignalR says why first, then 1009.
            async with websockets.connect(ws_url(cluster), max_size=2**22) as raw:
                await raw.send("x" * (1 << 20))
                assert await close_code(raw) == 1009
            async with websockets.connect(ws_url(cluster), max_size=2**22) as hub:
                await hub.send('{"protocol":"json","version":1}' + RS)
                assert await hub.recv() == "{}" + RS
                await hub.send('{"type":1,"target":"SendRawMessage","arguments":["' + "x" * (1 << 20) + '"]}' + RS)
                close = json.loads((await hub.recv()).rstrip(RS))
                assert close["type"] == 7 and "65536 bytes" in close["error"]
                assert await close_code(hub) == 1009

            # Binary and invalid UTF-8 frames.
            async with websockets.connect(ws_url(cluster)) as raw:
                await raw.send(os.urandom(64))
                assert await close_code(raw) == 1003
            async with websockets.connect(ws_url(cluster)) as raw:
                await raw.send(b'{"command":"\xc3\x28"}', text=True)
                assert await close_code(raw) == 1007

            # SignalR garbage after the handshake: a close record with the error, then 1002.
            async with websockets.connect(ws_url(cluster)) as hub:
                await hub.send('{"protocol":"json","version":1}' + RS)
                assert await hub.recv() == "{}" + RS
                await hub.send("]]]" + RS)
                close = json.loads((await hub.recv()).rstrip(RS))
                assert close["type"] == 7 and close["error"]
                assert await close_code(hub) == 1002

            # Sockets cut mid-frame and mid-handshake, many at once.
            await asyncio.gather(*(asyncio.to_thread(_cut_mid_frame, cluster.options.haproxy_port, n)
                                   for n in range(60)))

            nodes_alive(cluster)
            mark_legacy, mark_modern = len(legacy.events), len(modern.lines)
            await asyncio.to_thread(cluster.play, "inbound-direct-answered", line=LINE, caller="79160000001")
            ring_legacy = await legacy.wait_for(RING_STARTED, after=mark_legacy, timeout=15)
            ring_modern = content(await modern.event(RING_STARTED, after=mark_modern))
            assert ring_modern == ring_legacy.content
        finally:
            await legacy.close()
            await modern.stop()

    asyncio.run(main())


def _cut_mid_frame(port: int, n: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        request = (f"GET /?key={KEY} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
        if n % 3 == 0:
            sock.sendall(request[: len(request) // 2])  # half a handshake
            return
        sock.sendall(request)
        with contextlib.suppress(OSError):
            sock.recv(4096)
        # a text frame header announcing 60000 bytes, then only a few of them
        sock.sendall(bytes([0x81, 0x80 | 126]) + (60000).to_bytes(2, "big") + os.urandom(4) + os.urandom(100))


def test_floods_are_cut_and_counted_without_slowing_the_line(cluster: LocalCluster, js_client: Path) -> None:
    def limited() -> float:
        total = 0.0
        for port in cluster.node_ports:
            _status, body = http_get(f"http://127.0.0.1:{port}/metrics")
            for line in body.decode().splitlines():
                if line.startswith("cms_node_rate_limit_disconnects_total"):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    before = limited()
    query = json.dumps({"command": "QueryLineState", "parameters": {}, "commandUId": ""})

    async def flood_raw() -> int | None:
        async with websockets.connect(ws_url(cluster)) as raw:
            with contextlib.suppress(websockets.ConnectionClosed):
                for _ in range(400):
                    await raw.send(query)
            return await close_code(raw)

    async def flood_signalr() -> int | None:
        async with websockets.connect(ws_url(cluster)) as hub:
            await hub.send('{"protocol":"json","version":1}' + RS)
            assert await hub.recv() == "{}" + RS
            invocation = json.dumps({"type": 1, "target": "SendRawMessage", "arguments": [query]}) + RS
            await hub.send(invocation * 400)  # 400 invocations in one WebSocket message
            return await close_code(hub)

    async def main() -> None:
        modern = SignalRAgent(js_client, http_url(cluster), LINE, "--user", USER)
        await modern.start()
        try:
            await opened(modern)
            codes = await asyncio.gather(flood_raw(), flood_raw(), flood_signalr(), flood_signalr())
            assert codes == [1008, 1008, 1008, 1008]
            nodes_alive(cluster)
            mark = len(modern.lines)
            await asyncio.to_thread(cluster.play, "inbound-direct-answered", line=LINE, caller="79160000002")
            assert content(await modern.event(RING_STARTED, after=mark))["callerId"] == "79160000002"
        finally:
            await modern.stop()

    asyncio.run(main())
    assert limited() == before + 4
