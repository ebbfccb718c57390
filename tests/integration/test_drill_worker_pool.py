"""The drill's worker pool (ops/drill/workers.py) over real sockets and processes, against a stand-in node.

The stand-in answers the panel's three commands as a node does (LoadLibrary, OpenConnection, the snapshot), sends
each agent one call event, and can drop every connection and refuse new ones for a while: enough to see, from the
records the pool hands back, that each agent reconnected on Creatio's schedule and recorded what it got. The pool
against a real cluster: tests/e2e/test_drill.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.agents import PipeWorker, WorkerProcesses
from bench.wsproto import OP_CLOSE, OP_TEXT, FrameDecoder, accept_key, encode_frame
from ops.drill.swarm import AgentLog
from ops.drill.workers import WorkerAgents
from ws_node.creatio_protocol import MsgEventType


class StandInNode:
    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: set[asyncio.StreamWriter] = set()
        self.snapshots = 0

    async def listen(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def refuse_and_drop(self) -> None:
        """Stop listening, then cut every connection (as a killed node's sockets die)."""
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            key = next(line.split(":", 1)[1].strip() for line in head.split("\r\n")
                       if line.lower().startswith("sec-websocket-key:"))
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept_key(key).encode() + b"\r\n\r\n")
            decoder = FrameDecoder()
            line = ""
            while data := await reader.read(65536):
                for opcode, payload in decoder.feed(data):
                    if opcode == OP_CLOSE:
                        return
                    if opcode != OP_TEXT:
                        continue
                    message = json.loads(payload)
                    command = message["command"]
                    if command == "LoadLibrary":
                        self._send(writer, MsgEventType.LIBRARY_INITIALIZED, "library")
                    elif command == "OpenConnection":
                        line = json.loads(message["parameters"]["connectionParams"])["ExtensionName"]
                        self._send(writer, MsgEventType.CONNECTION_CREATED, line)
                    elif command == "QueryActiveCallSnapshot":
                        self.snapshots += 1
                        live = json.dumps({"id": f"live-{line}", "callerId": "100"})
                        self._send(writer, MsgEventType.ACTIVE_CALL_SNAPSHOT, json.dumps({"ActiveCalls": [live]}))
                        self._send(writer, MsgEventType.RING_STARTED,
                                   json.dumps({"id": f"ring-{line}-{self.snapshots}", "callerId": "200"}))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.writers.discard(writer)
            writer.transport.abort()

    @staticmethod
    def _send(writer: asyncio.StreamWriter, event_type: int, content: str) -> None:
        writer.write(encode_frame(OP_TEXT, json.dumps({"eventType": event_type, "content": content}).encode()))


async def until(check: Callable[[], Awaitable[bool]], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.1)
    return False


def test_worker_agents_reconnect_on_the_panels_schedule_and_record_what_they_got() -> None:
    lines = [str(5000 + i) for i in range(12)]
    delay = 0.3

    async def scenario(pool: WorkerAgents) -> tuple[float, list[AgentLog]]:
        node = StandInNode()
        await node.listen()
        await pool.start(f"ws://127.0.0.1:{node.port}/", lines, delay)
        assert await pool.all_connected()
        dropped = time.time()
        await node.refuse_and_drop()
        # refused for 0.8 s: the first retry (0.27-0.33 s) and the next (+0.3 s) fail, a later one gets through
        await asyncio.sleep(0.8)
        reopened = time.time()
        await node.listen()
        await asyncio.sleep(0.3)  # past the drop's detection
        assert await until(pool.all_connected, 15), "not every agent came back"
        logs = await pool.stop()
        assert node.server is not None
        node.server.close()
        return reopened - dropped, logs

    with WorkerAgents(2) as pool:
        assert len(pool.pids) == 2
        refused_for, logs = asyncio.run(scenario(pool))
    assert sorted(log.line for log in logs) == lines
    for log in logs:
        [outage] = log.outages
        line = log.line
        assert log.connected
        assert 0.9 * delay - 0.05 <= outage.first_retry_at - outage.dropped_at <= 1.1 * delay + 0.05
        assert len(outage.retry_times) >= 3 and outage.attempts >= 3  # two refused, then one that got through
        assert outage.ready_at - outage.dropped_at >= refused_for - 0.1
        assert outage.snapshot_ids == (f"live-{line}",) and outage.snapshot_at == outage.ready_at
        rings = [call for call_id, call in log.seen.items() if call_id.startswith(f"ring-{line}-")]
        assert len(rings) == 2 and all(r.event_types == [MsgEventType.RING_STARTED] for r in rings)
        assert rings[0].caller == "200"
        live = log.seen[f"live-{line}"]
        assert live.event_types == [MsgEventType.ACTIVE_CALL_SNAPSHOT] * 2  # one snapshot per connection


class BigReplies(PipeWorker):
    async def handle(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        if command == "big":
            return {"data": "x" * int(args["size"])}
        return await super().handle(command, args)


def test_a_worker_reply_larger_than_the_pipe_buffer_arrives_whole() -> None:
    # the drill's records at thousands of agents are megabytes; the pipe's buffer is 64 KiB or so
    with WorkerProcesses(2, BigReplies) as workers:
        replies = workers.ask_all([("big", {"size": 4_000_000})] * 2, timeout=60)
        assert [len(r["data"]) for r in replies] == [4_000_000] * 2
        assert workers.ask_all([("big", {"size": 10})] * 2, timeout=60)[0]["data"] == "x" * 10
