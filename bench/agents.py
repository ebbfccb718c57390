"""A swarm of simulated Creatio agents: lean asyncio WebSocket clients spread over worker processes.

Each agent does what Creatio's panel does after connecting (LoadLibrary, then OpenConnection on
LIBRARY_INITIALIZED, open on CONNECTION_CREATED), answers pings, and from then on only counts the
frames it gets: the load generator must stay cheap next to the node it measures. Workers are
spawned processes driven over a pipe; :class:`Swarm` is the parent's handle.
"""

from __future__ import annotations

import asyncio
import collections
import json
import multiprocessing
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Self, cast

from bench.wsproto import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameDecoder,
    HandshakeError,
    encode_frame,
    handshake_request,
    parse_handshake_response,
)
from ws_node.creatio_protocol import MsgEventType

__all__ = ["ConnectResult", "PipeWorker", "Swarm", "WebSocketClient", "WorkerProcesses", "raise_fd_limit"]



def raise_fd_limit() -> tuple[int, int]:
    """Soft descriptor limit up to the hard one; returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def load_library_frame() -> bytes:
    return json.dumps(
        {"command": "LoadLibrary", "parameters": {"libraryName": "Asterisk"}, "commandUId": "", "connectionUId": ""}
    ).encode()


def open_connection_frame(line: str) -> bytes:
    params = json.dumps({"ExtensionName": line, "OriginateContext": "", "debugMode": False})
    return json.dumps(
        {"command": "OpenConnection", "parameters": {"connectionParams": params}, "commandUId": "",
         "connectionUId": ""}
    ).encode()


def query_snapshot_frame() -> bytes:
    return json.dumps(
        {"command": "QueryActiveCallSnapshot", "parameters": {}, "commandUId": "", "connectionUId": ""}
    ).encode()


class _Counters:
    def __init__(self) -> None:
        self.frames = 0  # text frames received by open agents
        self.bytes = 0
        self.pings = 0
        self.open = 0
        self.closed_by_server = 0
        self.sample: str | None = None


class WebSocketClient(asyncio.Protocol):
    """One client connection: the opening handshake and the framing of bench/wsproto.py, pings answered, a server's
    close echoed. What to send once the handshake is through (:meth:`on_open`) and what a text message means
    (:meth:`on_text`) is the subclass's."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.host, self.port, self.path = host, port, path
        self.transport: asyncio.Transport | None = None
        self.handshaken = False
        self._head = bytearray()
        self._key = ""
        self._decoder = FrameDecoder()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        request, self._key = handshake_request(self.host, self.port, self.path)
        self.transport.write(request)

    def send_text(self, payload: bytes) -> None:
        self._send(OP_TEXT, payload)

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_frame(opcode, payload, mask=os.urandom(4)))

    def data_received(self, data: bytes) -> None:
        if not self.handshaken:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > 16384:
                    self.fail("oversized handshake answer")
                return
            head, rest = bytes(self._head[: end + 4]), bytes(self._head[end + 4 :])
            self._head.clear()
            try:
                parse_handshake_response(head, self._key)
            except HandshakeError as exc:
                self.fail(str(exc))
                return
            self.handshaken = True
            self.on_open()
            data = rest
            if not data:
                return
        try:
            messages = self._decoder.feed(data)
        except ValueError as exc:
            self.fail(str(exc))
            return
        for opcode, payload in messages:
            if opcode == OP_TEXT:
                self.on_text(payload)
            elif opcode == OP_PING:
                self.on_ping()
                self._send(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                self._send(OP_CLOSE, payload[:2])
                self.on_server_close()
                if self.transport is not None:
                    self.transport.close()

    def on_open(self) -> None:
        """The handshake is through."""

    def on_text(self, payload: bytes) -> None:
        """A text message arrived."""

    def on_ping(self) -> None:
        """A ping arrived (it is answered)."""

    def on_server_close(self) -> None:
        """The server sent a close frame (it is echoed and the connection closed)."""

    def fail(self, reason: str) -> None:
        """Give the connection up: ``reason`` is for subclasses to report."""
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._send(OP_CLOSE, b"\x03\xe8")
            self.transport.close()


class AgentClient(WebSocketClient):
    """One agent; ``opened`` resolves when CONNECTION_CREATED arrives (or fails with the reason)."""

    def __init__(self, counters: _Counters, host: str, port: int, path: str, line: str) -> None:
        super().__init__(host, port, path)
        self.counters = counters
        self.line = line
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.state = "handshake"

    def on_open(self) -> None:
        self.state = "loading"
        self.send_text(load_library_frame())

    def on_ping(self) -> None:
        self.counters.pings += 1

    def on_server_close(self) -> None:
        if self.state == "open":
            self.counters.closed_by_server += 1

    def on_text(self, payload: bytes) -> None:
        if self.state == "open":
            counters = self.counters
            counters.frames += 1
            counters.bytes += len(payload)
            if counters.sample is None and b'"eventType": 2' not in payload:
                counters.sample = payload.decode("utf-8", "replace")
            return
        try:
            event_type = json.loads(payload).get("eventType")
        except (ValueError, AttributeError):
            return
        if self.state == "loading" and event_type == MsgEventType.LIBRARY_INITIALIZED:
            self.state = "opening"
            self.send_text(open_connection_frame(self.line))
        elif self.state == "opening" and event_type == MsgEventType.CONNECTION_CREATED:
            self.state = "open"
            self.counters.open += 1
            if not self.opened.done():
                self.opened.set_result(None)
        elif event_type == MsgEventType.ERROR:
            self.fail(f"server error before open: {payload[:120]!r}")

    def fail(self, reason: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(reason))
        super().fail(reason)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state == "open":
            self.counters.open -= 1
        self.state = "closed"
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed before open: {exc or 'EOF'}"))


# ---- worker process ---------------------------------------------------------------------------


class PipeWorker:
    """A worker process's side of the pipe: the parent's commands, each answered in turn, ``("ok", reply)`` or
    ``("error", {"error": ...})``; ``exit`` ends the process after :meth:`shutdown`. Subclasses answer the rest
    in :meth:`handle`."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def handle(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        raise ValueError(f"unknown command {command!r}")

    async def shutdown(self) -> None:
        """Before the process ends (the parent said ``exit``)."""

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(self.conn.fileno(), ready.set)
        while True:
            await ready.wait()
            ready.clear()
            while self.conn.poll():
                command, args = self.conn.recv()
                if command == "exit":
                    await self.shutdown()
                    self._answer(("ok", {}))
                    return
                try:
                    answer: tuple[str, dict[str, Any]] = ("ok", await self.handle(command, args))
                except Exception as exc:  # the parent must get an answer, whatever happened
                    answer = ("error", {"error": f"{type(exc).__name__}: {exc}"})
                self._answer(answer)

    def _answer(self, answer: tuple[str, dict[str, Any]]) -> None:
        # The loop's add_reader left the pipe non-blocking: a reply larger than the pipe's buffer (a drill's
        # records) would fail half-written. Blocking here costs nothing: the parent is waiting to read it.
        fd = self.conn.fileno()
        os.set_blocking(fd, True)
        try:
            self.conn.send(answer)
        finally:
            os.set_blocking(fd, False)


class _Worker(PipeWorker):
    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        self.counters = _Counters()
        self.agents: list[AgentClient] = []

    async def connect(self, host: str, port: int, path: str, lines: Sequence[str], concurrency: int,
                      timeout: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(max(1, concurrency))
        latencies: list[float] = []
        errors: collections.Counter[str] = collections.Counter()

        async def one(line: str) -> None:
            async with gate:
                started = time.perf_counter()
                try:
                    async with asyncio.timeout(timeout):
                        _transport, agent = await loop.create_connection(
                            lambda: AgentClient(self.counters, host, port, path, line), host, port)
                    self.agents.append(agent)
                    async with asyncio.timeout(timeout):
                        await asyncio.shield(agent.opened)
                    latencies.append(time.perf_counter() - started)
                except (OSError, ConnectionError, TimeoutError) as exc:
                    errors[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1

        started = time.perf_counter()
        await asyncio.gather(*(one(line) for line in lines))
        return {
            "ok": len(latencies),
            "failed": sum(errors.values()),
            "seconds": time.perf_counter() - started,
            "latencies": latencies,
            "errors": dict(errors.most_common(5)),
        }

    def stats(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        c = self.counters
        return {
            "frames": c.frames, "bytes": c.bytes, "pings": c.pings, "open": c.open,
            "closed_by_server": c.closed_by_server, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "sample": c.sample,
        }

    async def close_all(self) -> dict[str, Any]:
        for agent in self.agents:
            agent.close()
        self.agents.clear()
        await asyncio.sleep(0.2)
        return {"closed": True}

    async def handle(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        if command == "connect":
            return await self.connect(**args)
        if command == "stats":
            return self.stats()
        if command == "close":
            return await self.close_all()
        return await super().handle(command, args)

    async def shutdown(self) -> None:
        await self.close_all()


def _worker_main(conn: Connection, worker: Callable[[Connection], PipeWorker]) -> None:
    raise_fd_limit()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # the plain loop only makes the client heavier, not wrong
        pass
    asyncio.run(worker(conn).serve())


# ---- parent handle ----------------------------------------------------------------------------


@dataclass
class ConnectResult:
    ok: int
    failed: int
    wall_seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.ok / self.wall_seconds if self.wall_seconds > 0 else 0.0


class WorkerProcesses:
    """``with WorkerProcesses(2, SomePipeWorker) as workers: workers.ask_all(...)``: spawned processes, each
    running ``worker`` (a :class:`PipeWorker`, importable by name) on uvloop, driven over a pipe; every one is
    ended on exit."""

    def __init__(self, processes: int, worker: Callable[[Connection], PipeWorker]) -> None:
        self.processes = max(1, processes)
        self._worker = worker
        self._workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []

    def __enter__(self) -> Self:
        ctx = multiprocessing.get_context("spawn")
        for _ in range(self.processes):
            parent, child = ctx.Pipe()
            process = ctx.Process(target=_worker_main, args=(child, self._worker), daemon=True)
            process.start()
            child.close()
            self._workers.append((process, parent))
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids (their CPU is the load generator's)."""
        return [int(process.pid) for process, _ in self._workers if process.pid is not None]

    def ask_all(self, commands: Sequence[tuple[str, dict[str, Any]]], timeout: float) -> list[dict[str, Any]]:
        """One command to each worker (in order), then every reply; raises if one fails or is late."""
        for (_process, conn), command in zip(self._workers, commands, strict=True):
            conn.send(command)
        replies: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        for process, conn in self._workers:
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"agent worker {process.pid} did not answer {commands[0][0]!r} in {timeout:.0f}s")
            status, reply = conn.recv()
            if status != "ok":
                raise RuntimeError(f"agent worker {process.pid}: {reply.get('error')}")
            replies.append(reply)
        return replies

    def stop(self) -> None:
        for _process, conn in self._workers:
            try:
                conn.send(("exit", {}))
                conn.poll(10)
            except (OSError, EOFError):
                pass
        for process, conn in self._workers:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)
            conn.close()
        self._workers.clear()


class Swarm(WorkerProcesses):
    """``with Swarm(2) as swarm: swarm.connect(host, port, lines)``; every worker is ended on exit."""

    def __init__(self, processes: int = 2) -> None:
        super().__init__(processes, _Worker)

    def connect(self, host: str, port: int, lines: Sequence[str], *, path: str = "/", concurrency: int = 64,
                timeout: float = 20.0) -> ConnectResult:
        """Open one agent per entry of ``lines`` (repeat a line for several tabs), spread over the workers."""
        shares = [list(lines[i :: self.processes]) for i in range(self.processes)]
        per_worker = max(1, concurrency // self.processes)
        started = time.perf_counter()
        replies = self.ask_all(
            [("connect", {"host": host, "port": port, "path": path, "lines": share, "concurrency": per_worker,
                          "timeout": timeout}) for share in shares],
            timeout=timeout * (1 + len(lines) / max(1, concurrency)) + 30,
        )
        wall = time.perf_counter() - started
        errors: collections.Counter[str] = collections.Counter()
        for reply in replies:
            errors.update(reply["errors"])
        return ConnectResult(
            ok=sum(r["ok"] for r in replies),
            failed=sum(r["failed"] for r in replies),
            wall_seconds=wall,
            latencies=[x for r in replies for x in r["latencies"]],
            errors=dict(errors.most_common(5)),
        )

    def stats(self) -> dict[str, Any]:
        replies = self.ask_all([("stats", {})] * self.processes, timeout=30)
        total: dict[str, Any] = {
            key: sum(r[key] for r in replies)
            for key in ("frames", "bytes", "pings", "open", "closed_by_server", "cpu_seconds")
        }
        total["sample"] = next((r["sample"] for r in replies if r["sample"]), None)
        return total

    def close_all(self) -> None:
        self.ask_all([("close", {})] * self.processes, timeout=60)
