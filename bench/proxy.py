"""A TCP proxy the bench controls, to make RabbitMQ or Redis slow or unreachable for one process
only (the machine's shared servers are never touched).

It runs its own event loop in a thread, so the process under test shares nothing with it but the
GIL. Modes: ``pass`` (forward), ``delay`` (every chunk waits ``delay`` seconds, order kept) and
``hold`` (nothing is forwarded, connections stay open: a broker that stopped answering).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Literal

Mode = Literal["pass", "delay", "hold"]


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode: Mode = "pass"
        self.delay = 0.0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._released: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> TcpProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._released = asyncio.Event()
        self._released.set()
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def set_mode(self, mode: Mode, delay: float = 0.0) -> None:
        def apply() -> None:
            self.mode, self.delay = mode, delay
            assert self._released is not None
            if mode == "hold":
                self._released.clear()
            else:
                self._released.set()

        self._loop.call_soon_threadsafe(apply)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._released is not None
        loop = asyncio.get_running_loop()
        while True:
            data = await reader.read(65536)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            await self._released.wait()
            if self.mode == "delay" and self.delay > 0:
                # Keep order: each chunk leaves ``delay`` after it arrived, never before the previous one.
                due = loop.time() + self.delay
                await asyncio.sleep(max(0.0, due - loop.time()))
            writer.write(data)
            await writer.drain()

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            assert self._released is not None
            self._released.set()
            for writer in list(self._writers):
                writer.close()

        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()
