"""A TCP proxy that injects network faults on one link (gateway <-> AMI, <-> RabbitMQ, <-> Redis,
agents <-> HAProxy), so a chaos run can break a link without touching the servers behind it.

Theory of operation. Each accepted connection gets an upstream connection and two pumps, one per
direction. A pump reads a chunk, stamps it with the time it may leave (now + added latency, plus a
retransmission timeout for every simulated loss) and a writer sends chunks strictly in order,
never before their time: TCP never drops or reorders bytes, so packet loss shows up as what it
does to a TCP stream, head-of-line delay, not as missing bytes.

Modes, set at any time with :meth:`FaultProxy.set_fault`:

* ``pass``: forward (with the latency and loss of the fault, if any);
* ``cut``: every open connection is closed and the listening socket is closed too, so new
  connections are refused (a process or host that went away); back to ``pass`` re-listens on
  the same port;
* ``blackhole``: connections are accepted and kept, nothing moves in either direction (a
  partition or a stalled peer); when healed, what was held flows on, as it would after a real
  partition that ended before TCP gave up.

The delay arithmetic (:func:`chunk_delay`) is pure and unit-tested; :class:`FaultProxy` is the
asyncio shell, for a caller on the same loop; :class:`ProxyThread` runs one on a loop of its own
thread, driven synchronously (a test or a bench stage whose own loop must not carry the relay);
:class:`ProxyHost` runs proxies in a child process, so the chaos harness's own load (hundreds of
agents on the same interpreter) never adds latency to the links it measures. The tests' and the
benchmarks' links go through these too: one relay, whatever breaks the link.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import random
import threading
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Literal

log = logging.getLogger(__name__)

Mode = Literal["pass", "cut", "blackhole"]
MODES: tuple[Mode, ...] = ("pass", "cut", "blackhole")
CHUNK = 65536


@dataclass(frozen=True, slots=True)
class LinkFault:
    """What the link does now. ``loss`` is the chance that a chunk's first transmission is lost."""

    mode: Mode = "pass"
    latency: float = 0.0
    loss: float = 0.0
    #: how long TCP waits before resending a lost segment (Linux's minimum RTO is 200 ms)
    retransmit: float = 0.2

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.latency < 0 or self.retransmit < 0:
            raise ValueError("latency and retransmit must be >= 0")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError("loss must be in [0, 1)")

    def describe(self) -> str:
        parts: list[str] = [self.mode]
        if self.latency:
            parts.append(f"+{self.latency * 1000:.0f}ms")
        if self.loss:
            parts.append(f"{self.loss * 100:.0f}% loss")
        return " ".join(parts)


PASS = LinkFault()
#: the peer went away: open connections reset, new ones refused (until PASS again, on the same port)
CUT = LinkFault("cut")
#: a partition: connections stay up, nothing moves (until PASS again)
BLACKHOLE = LinkFault("blackhole")


def chunk_delay(fault: LinkFault, rand: Callable[[], float]) -> float:
    """Seconds a chunk is held: the added latency plus one retransmission timeout per loss.

    Each retransmission may be lost again; TCP doubles its timeout every time (capped here at
    eight tries, beyond which a real connection would be in trouble anyway).
    """
    delay = fault.latency
    timeout = fault.retransmit
    for _ in range(8):
        if fault.loss <= 0 or rand() >= fault.loss:
            break
        delay += timeout
        timeout *= 2
    return delay


def release_time(arrived: float, delay: float, previous_release: float) -> float:
    """When a chunk may leave: its own due time, but never before the chunk ahead of it (order kept)."""
    return max(arrived + delay, previous_release)


@dataclass(slots=True)
class LinkStats:
    accepted: int = 0
    refused_upstream: int = 0
    closed_by_cut: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    open: int = 0


@dataclass(slots=True, eq=False)  # kept in a set by identity
class _Pair:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.transport.abort()


class FaultProxy:
    """One link: listens on 127.0.0.1:``port`` and forwards to ``target``."""

    def __init__(self, name: str, target_host: str, target_port: int, port: int = 0, seed: int = 0) -> None:
        self.name = name
        self.target = (target_host, target_port)
        self.port = port
        self.fault = PASS
        self.stats = LinkStats()
        self._random = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._pairs: set[_Pair] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> int:
        await self._listen()
        return self.port

    def retarget(self, host: str, port: int) -> None:
        """Connections from now on go to ``host:port`` (a server that moved, a replacement PBX)."""
        self.target = (host, port)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", self.port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def set_fault(self, fault: LinkFault) -> None:
        previous, self.fault = self.fault, fault
        if fault.mode == "blackhole":
            self._flowing.clear()
        else:
            self._flowing.set()
        if fault.mode == "cut" and previous.mode != "cut":
            if self._server is not None:
                self._server.close()
                self._server = None
            for pair in list(self._pairs):
                pair.abort()
                self.stats.closed_by_cut += 1
        elif fault.mode != "cut" and self._server is None:
            await self._listen()
        log.info("link=%s fault=%s", self.name, fault.describe())

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        pair = _Pair(writer)
        self._pairs.add(pair)
        self.stats.open = len(self._pairs)
        try:
            await self._flowing.wait()  # a blackholed link accepts but does not reach the peer
            if self.fault.mode == "cut":
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                self.stats.refused_upstream += 1
                return
            pair.upstream = up_writer
            pair.tasks = [
                asyncio.create_task(self._pump(reader, up_writer, up=True)),
                asyncio.create_task(self._pump(up_reader, writer, up=False)),
            ]
            await asyncio.wait(pair.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pair.tasks:
                task.cancel()
            await asyncio.gather(*pair.tasks, return_exceptions=True)
            pair.abort()
            self._pairs.discard(pair)
            self.stats.open = len(self._pairs)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.create_task(self._send(queue, writer))
        released = 0.0
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
                released = release_time(loop.time(), chunk_delay(self.fault, self._random.random), released)
                queue.put_nowait((released, data))
            queue.put_nowait((released, b""))
            await sender
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sender

    async def _send(self, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._flowing.wait()
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self._flowing.set()
        for pair in list(self._pairs):
            pair.abort()


# ---- a child process hosting the proxies ---------------------------------------------------------


def _host_main(conn: Connection) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s fault-proxy %(message)s")
    asyncio.run(_host_serve(conn))


async def _host_serve(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    proxies: dict[str, FaultProxy] = {}
    requests: asyncio.Queue[Any] = asyncio.Queue()
    loop.add_reader(conn.fileno(), lambda: requests.put_nowait(conn.recv() if conn.poll() else None))
    while True:
        request = await requests.get()
        if request is None:
            continue
        op, args = request
        try:
            if op == "add":
                name, host, port, listen = args
                proxy = FaultProxy(name, host, port, listen, seed=len(proxies) + 1)
                proxies[name] = proxy
                result: Any = await proxy.start()
            elif op == "set":
                name, fault = args
                await proxies[name].set_fault(LinkFault(**fault))
                result = None
            elif op == "stats":
                result = {name: asdict(p.stats) for name, p in proxies.items()}
            elif op == "stop":
                for proxy in proxies.values():
                    await proxy.close()
                await asyncio.sleep(0.2)  # the aborted connections' handlers finish before the loop closes
                conn.send(("ok", None))
                return
            else:
                raise ValueError(f"unknown op {op}")
            conn.send(("ok", result))
        except Exception as exc:  # the parent gets the error; the host keeps serving other links
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class ProxyHostError(RuntimeError):
    pass


class ProxyHost:
    """Fault proxies in a child process, driven from the harness by name."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_host_main, args=(child_conn,), name="fault-proxies", daemon=True)
        self.ports: dict[str, int] = {}
        self.faults: dict[str, LinkFault] = {}

    def start(self) -> ProxyHost:
        self._process.start()
        return self

    def _call(self, op: str, args: Any, timeout: float = 10.0) -> Any:
        self._conn.send((op, args))
        if not self._conn.poll(timeout):
            raise ProxyHostError(f"fault proxy host did not answer {op} within {timeout:.0f}s")
        status, result = self._conn.recv()
        if status != "ok":
            raise ProxyHostError(f"{op} {args}: {result}")
        return result

    def add(self, name: str, target_host: str, target_port: int, listen_port: int = 0) -> int:
        port = int(self._call("add", (name, target_host, target_port, listen_port)))
        self.ports[name] = port
        self.faults[name] = PASS
        return port

    def set_fault(self, name: str, fault: LinkFault) -> None:
        self._call("set", (name, asdict(fault)))
        self.faults[name] = fault

    def heal_all(self) -> None:
        for name, fault in list(self.faults.items()):
            if fault != PASS:
                self.set_fault(name, PASS)

    def stats(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = self._call("stats", None)
        return result

    def stop(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(ProxyHostError, OSError, EOFError):
                self._call("stop", None, timeout=5)
            self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)

    def __enter__(self) -> ProxyHost:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- a thread hosting one proxy -------------------------------------------------------------------


class ProxyThread:
    """One :class:`FaultProxy` on an event loop of its own thread, driven synchronously."""

    def __init__(self, name: str, target_host: str, target_port: int, port: int = 0, seed: int = 0) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"proxy-{name}", daemon=True)
        self._proxy = FaultProxy(name, target_host, target_port, port, seed)

    @property
    def port(self) -> int:
        return self._proxy.port

    @property
    def stats(self) -> LinkStats:
        return self._proxy.stats

    def start(self) -> ProxyThread:
        self._thread.start()
        self._call(self._proxy.start())
        return self

    def set_fault(self, fault: LinkFault, *, wait: bool = True) -> None:
        """Applied when this returns; ``wait=False`` only asks for it (a caller whose own loop is being
        measured must not block on another thread)."""
        if wait:
            self._call(self._proxy.set_fault(fault))
        else:
            asyncio.run_coroutine_threadsafe(self._proxy.set_fault(fault), self._loop)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._call(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _shutdown(self) -> None:
        await self._proxy.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def __enter__(self) -> ProxyThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
