"""The drill's agents as lean clients in worker processes: the pool the storm stage of ``make bench`` uses.

The in-process pool (ops/drill/swarm.py) runs one ``websockets`` client per agent in the drill's own loop; at
thousands of agents that one process, not the cluster, decides when the agents get back after a node dies (the
reconnects arrive late and bunched). Here each agent is a bare asyncio protocol with bench/wsproto.py's framing
(:class:`bench.agents.WebSocketClient`, as the bench's baseline client), spread over spawned worker processes
driven over a pipe (:class:`bench.agents.WorkerProcesses`), each on uvloop. Per agent it does what Creatio's panel
does and records what the in-process agent records, through the same :class:`~ops.drill.swarm.AgentLog`:
LoadLibrary, OpenConnection with the line, QueryActiveCallSnapshot after every (re)connect; after a drop, the
first retry after ``reconnect_delay`` x 0.9-1.1, then backing off.

This module imports bench: ``ops.drill`` imports it only when the worker pool is asked for.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from bench.agents import (
    PipeWorker,
    WebSocketClient,
    WorkerProcesses,
    load_library_frame,
    open_connection_frame,
    query_snapshot_frame,
)
from ops.drill.swarm import AgentLog
from ws_node.creatio_protocol import MsgEventType

__all__ = ["PanelClient", "WorkerAgents", "split_url"]

#: as the in-process agent's ``websockets.connect(open_timeout=10)``: TCP connect and the opening handshake
OPEN_TIMEOUT = 10.0
#: as the in-process agent's wait for each frame while it opens (LoadLibrary ... snapshot)
FRAME_TIMEOUT = 15.0
#: agents opening their first connection at a time, per worker (the in-process pool opens waves of 50)
FIRST_CONNECT_CONCURRENCY = 25


def split_url(url: str) -> tuple[str, int, str]:
    """``ws://host:port/path?query`` -> (host, port, path with its query)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "ws" or not parts.hostname:
        raise ValueError(f"the worker pool speaks plain ws:// only, not {url!r}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, parts.port or 80, path


class PanelClient(WebSocketClient):
    """One connection of one agent. ``ready`` resolves with the snapshot's call ids once the panel's three
    commands are answered, and fails when the connection breaks first or goes :data:`FRAME_TIMEOUT` without a
    frame while opening; ``closed`` resolves when the connection is gone. Every frame goes to the agent's log
    as it arrives, so its times are the frames' own."""

    def __init__(self, log: AgentLog, host: str, port: int, path: str) -> None:
        super().__init__(host, port, path)
        self.log = log
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[tuple[str, ...]] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.state = "handshake"
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm(OPEN_TIMEOUT)

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(seconds, self.fail, f"nothing in {seconds:.0f} s")

    def data_received(self, data: bytes) -> None:
        if self.handshaken and self.state != "ready":
            self._arm(FRAME_TIMEOUT)
        super().data_received(data)

    def on_open(self) -> None:
        self.log.reached()
        self.state = "loading"
        self.send_text(load_library_frame())

    def on_text(self, payload: bytes) -> None:
        try:
            envelope, content = self.log.record(payload)
        except (ValueError, AttributeError, TypeError):
            return  # not a Creatio frame: the in-process agent would not get further either
        event_type = envelope.get("eventType")
        if self.state == "loading" and event_type == MsgEventType.LIBRARY_INITIALIZED:
            self.state = "opening"
            self.send_text(open_connection_frame(self.log.line))
        elif self.state == "opening" and event_type == MsgEventType.CONNECTION_CREATED:
            self.state = "querying"
            self.send_text(query_snapshot_frame())
        elif self.state == "querying" and event_type == MsgEventType.ACTIVE_CALL_SNAPSHOT:
            self.state = "ready"
            if self._timer is not None:
                self._timer.cancel()
            ids = self.log.snapshot(content)
            self.log.ready(ids)
            if not self.ready.done():
                self.ready.set_result(ids)

    def fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        super().fail(reason)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.state = "closed"
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before ready: {exc or 'EOF'}"))
        if not self.closed.done():
            self.closed.set_result(None)


async def run_agent(log: AgentLog, host: str, port: int, path: str, first: asyncio.Semaphore,
                    first_ready: Callable[[], None]) -> None:
    """One agent's life, as ``DrillAgent.run``: connect, open, record until the connection goes, wait, again.
    Until its first connection is ready it holds a place under ``first`` (the start is not the storm being
    measured), then calls ``first_ready``."""
    loop = asyncio.get_running_loop()
    gate: asyncio.Semaphore | None = first
    client: PanelClient | None = None
    try:
        while True:
            log.attempt()
            client = None
            try:
                if gate is not None:
                    await gate.acquire()
                try:
                    async with asyncio.timeout(OPEN_TIMEOUT):
                        _transport, client = await loop.create_connection(
                            lambda: PanelClient(log, host, port, path), host, port)
                    await client.ready
                finally:
                    if gate is not None:
                        gate.release()
                if gate is not None:
                    gate = None
                    first_ready()
                await client.closed  # the server closed the connection, or it broke
            except (OSError, ConnectionError, TimeoutError):
                log.failed()
            await asyncio.sleep(log.dropped())
    finally:  # stopped (cancelled): leave as a panel closing its page would
        if client is not None:
            client.close()


class _DrillWorker(PipeWorker):
    """A worker process's agents: ``start`` (returns once all are connected), ``status``, ``stop`` (their logs)."""

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        self.logs: list[AgentLog] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def handle(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        if command == "start":
            return await self.start(**args)
        if command == "status":
            return self.status()
        if command == "stop":
            # the records as plain data: a log's clock and random source stay here
            return {"logs": [(log.line, log.seen, log.outages, log.connected, log.frames) for log in await self.stop()]}
        return await super().handle(command, args)

    async def start(self, url: str, lines: Sequence[str], reconnect_delay: float, timeout: float) -> dict[str, Any]:
        host, port, path = split_url(url)
        first = asyncio.Semaphore(FIRST_CONNECT_CONCURRENCY)
        self.logs = [AgentLog(line, reconnect_delay) for line in lines]
        all_ready = asyncio.Event()
        waiting = len(self.logs)

        def one_ready() -> None:
            nonlocal waiting
            waiting -= 1
            if waiting == 0:
                all_ready.set()

        self.tasks = [asyncio.create_task(run_agent(log, host, port, path, first, one_ready)) for log in self.logs]
        if self.logs:
            try:
                async with asyncio.timeout(timeout):
                    await all_ready.wait()
            except TimeoutError:
                pass  # the parent is told how many are connected
        return self.status()

    def status(self) -> dict[str, Any]:
        return {"connected": sum(1 for log in self.logs if log.connected), "agents": len(self.logs)}

    async def stop(self) -> list[AgentLog]:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []
        return self.logs

    async def shutdown(self) -> None:
        await self.stop()


class WorkerAgents:
    """The drill's worker pool (:class:`~ops.drill.swarm.AgentPool`): ``with WorkerAgents(2) as pool:
    Drill(options, cluster, pool=pool)``; the processes end with the ``with``. Lines are dealt round-robin to the
    workers, as ``bench.agents.Swarm`` deals them."""

    def __init__(self, processes: int = 2) -> None:
        self.workers = WorkerProcesses(processes, _DrillWorker)

    def __enter__(self) -> WorkerAgents:
        self.workers.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.workers.stop()

    @property
    def pids(self) -> list[int]:
        return self.workers.pids

    async def _ask(self, commands: Sequence[tuple[str, dict[str, Any]]], timeout: float) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.workers.ask_all, commands, timeout)

    async def start(self, url: str, lines: Sequence[str], reconnect_delay: float) -> None:
        split_url(url)  # refused here, not in every worker
        count = self.workers.processes
        timeout = 60.0 + len(lines) / 20
        shares = [list(lines[i :: count]) for i in range(count)]
        replies = await self._ask([("start", {"url": url, "lines": share, "reconnect_delay": reconnect_delay,
                                              "timeout": timeout}) for share in shares], timeout + 30)
        connected = sum(r["connected"] for r in replies)
        if connected < len(lines):
            raise TimeoutError(f"{connected} of {len(lines)} agents connected in {timeout:.0f} s")

    async def all_connected(self) -> bool:
        replies = await self._ask([("status", {})] * self.workers.processes, 30)
        return all(r["connected"] == r["agents"] for r in replies)

    async def stop(self) -> list[AgentLog]:
        replies = await self._ask([("stop", {})] * self.workers.processes, 120)
        return [AgentLog(line, seen=seen, outages=outages, connected=connected, frames=frames)
                for r in replies for line, seen, outages, connected, frames in r["logs"]]
