"""The fault proxy's delay arithmetic (pure) and the proxy itself on loopback sockets: pass, cut
(refused, then listening again on the same port), blackhole (held, then delivered in order),
latency and loss, a new target; in a child process and on a thread of its own."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from ops.chaos.fault_proxy import (
    BLACKHOLE,
    CUT,
    PASS,
    FaultProxy,
    LinkFault,
    ProxyHost,
    ProxyThread,
    chunk_delay,
    release_time,
)


def draws(*values: float) -> itertools.cycle[float]:
    return itertools.cycle(values)


def test_delay_is_the_latency_when_nothing_is_lost() -> None:
    rand = draws(0.99)
    assert chunk_delay(LinkFault(latency=0.05, loss=0.1), lambda: next(rand)) == pytest.approx(0.05)
    assert chunk_delay(PASS, lambda: 0.0) == 0.0


def test_each_loss_adds_a_doubling_retransmission_timeout() -> None:
    rand = iter([0.01, 0.01, 0.5])  # lost, lost again, delivered
    fault = LinkFault(latency=0.01, loss=0.1, retransmit=0.2)
    assert chunk_delay(fault, lambda: next(rand)) == pytest.approx(0.01 + 0.2 + 0.4)


def test_retransmissions_are_capped() -> None:
    fault = LinkFault(loss=0.5, retransmit=0.001)
    assert chunk_delay(fault, lambda: 0.0) == pytest.approx(0.001 * (2**8 - 1))


def test_a_chunk_never_overtakes_the_one_ahead() -> None:
    assert release_time(10.0, 0.5, 0.0) == 10.5
    assert release_time(10.1, 0.0, 10.5) == 10.5  # a fast chunk behind a lost one waits (TCP order)
    assert release_time(11.0, 0.0, 10.5) == 11.0


@pytest.mark.parametrize("bad", [{"mode": "drop"}, {"latency": -1}, {"loss": 1.0}, {"loss": -0.1}])
def test_bad_faults_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        LinkFault(**bad)  # type: ignore[arg-type]


def test_describe() -> None:
    assert LinkFault("pass", latency=0.05, loss=0.02).describe() == "pass +50ms 2% loss"
    assert LinkFault("cut").describe() == "cut"


# ---- on sockets ----------------------------------------------------------------------------------


class EchoServer:
    """Echoes every byte; ``close`` also closes the connections it accepted."""

    def __init__(self) -> None:
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._echo, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self.port

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()


async def echo_server() -> EchoServer:
    echo = EchoServer()
    await echo.start()
    return echo


async def roundtrip(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.readexactly(len(payload)), timeout)
    finally:
        writer.close()


def test_pass_cut_and_back() -> None:
    async def main() -> None:
        server = await echo_server()
        proxy = FaultProxy("t", "127.0.0.1", server.port)
        port = await proxy.start()
        assert await roundtrip(port, b"hello") == b"hello"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await proxy.set_fault(LinkFault("cut"))
        assert await asyncio.wait_for(reader.read(10), 5) == b""  # the open connection was closed
        writer.close()
        await asyncio.sleep(0.05)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)  # and new ones are refused
        await proxy.set_fault(PASS)
        assert proxy.port == port
        assert await roundtrip(port, b"again") == b"again"
        assert proxy.stats.closed_by_cut >= 1
        await proxy.close()
        server.close()
        await asyncio.sleep(0.05)  # let the transports finish closing

    asyncio.run(main())


def test_blackhole_holds_then_delivers_in_order() -> None:
    async def main() -> None:
        server = await echo_server()
        proxy = FaultProxy("t", "127.0.0.1", server.port)
        port = await proxy.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"a")
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"a"
        await proxy.set_fault(LinkFault("blackhole"))
        writer.write(b"bc")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(2), 0.5)
        late_reader, late_writer = await asyncio.open_connection("127.0.0.1", port)  # accepted, but stalled
        late_writer.write(b"z")
        await proxy.set_fault(PASS)
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"bc"
        assert await asyncio.wait_for(late_reader.readexactly(1), 5) == b"z"
        for w in (writer, late_writer):
            w.close()
        await proxy.close()
        server.close()
        await asyncio.sleep(0.05)  # let the transports finish closing

    asyncio.run(main())


def test_latency_applies_each_way() -> None:
    async def main() -> None:
        server = await echo_server()
        proxy = FaultProxy("t", "127.0.0.1", server.port)
        port = await proxy.start()
        await proxy.set_fault(LinkFault(latency=0.2))
        started = time.monotonic()
        assert await roundtrip(port, b"slow") == b"slow"
        assert time.monotonic() - started >= 0.4  # a lower bound only: the machine may be slower still
        await proxy.close()
        server.close()
        await asyncio.sleep(0.05)  # let the transports finish closing

    asyncio.run(main())


def test_loss_delays_but_never_corrupts_or_reorders() -> None:
    async def main() -> None:
        server = await echo_server()
        proxy = FaultProxy("t", "127.0.0.1", server.port, seed=7)
        port = await proxy.start()
        await proxy.set_fault(LinkFault(loss=0.3, retransmit=0.01))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sent = b"".join(f"{i:06d}".encode() for i in range(500))
        for i in range(0, len(sent), 60):
            writer.write(sent[i:i + 60])
            await writer.drain()
            await asyncio.sleep(0)
        assert await asyncio.wait_for(reader.readexactly(len(sent)), 20) == sent
        writer.close()
        await proxy.close()
        server.close()
        await asyncio.sleep(0.05)  # let the transports finish closing

    asyncio.run(main())


def test_proxy_host_in_a_child_process() -> None:
    async def serve(host: ProxyHost) -> None:
        server = await echo_server()
        port = await asyncio.to_thread(host.add, "x", "127.0.0.1", server.port)
        assert await roundtrip(port, b"via child") == b"via child"
        await asyncio.to_thread(host.set_fault, "x", LinkFault("cut"))
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        await asyncio.to_thread(host.heal_all)
        assert await roundtrip(port, b"healed") == b"healed"
        stats = await asyncio.to_thread(host.stats)
        assert stats["x"]["accepted"] == 2
        server.close()
        await asyncio.sleep(0.05)

    with ProxyHost() as host:
        asyncio.run(serve(host))


def test_retarget_sends_new_connections_to_the_new_server() -> None:
    async def main() -> None:
        first, second = await echo_server(), await echo_server()
        proxy = FaultProxy("t", "127.0.0.1", first.port)
        port = await proxy.start()
        assert await roundtrip(port, b"one") == b"one"
        first.close()
        await proxy.set_fault(CUT)
        proxy.retarget("127.0.0.1", second.port)
        await proxy.set_fault(PASS)
        assert await roundtrip(port, b"two") == b"two"
        assert proxy.stats.accepted == 2 and proxy.stats.refused_upstream == 0
        await proxy.close()
        second.close()
        await asyncio.sleep(0.05)

    asyncio.run(main())


def test_proxy_thread_is_driven_from_a_loop_it_does_not_share() -> None:
    async def main() -> None:
        server = await echo_server()
        with ProxyThread("t", "127.0.0.1", server.port) as proxy:
            assert await roundtrip(proxy.port, b"thread") == b"thread"
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            await asyncio.to_thread(proxy.set_fault, BLACKHOLE)
            writer.write(b"held")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.readexactly(4), 0.3)
            proxy.set_fault(PASS, wait=False)  # asked for, not awaited: the caller's loop goes on
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"held"
            await asyncio.to_thread(proxy.set_fault, CUT)
            assert await asyncio.wait_for(reader.read(4), 5) == b""
            writer.close()
            assert proxy.stats.closed_by_cut == 1
        server.close()
        await asyncio.sleep(0.05)

    asyncio.run(main())
