# mypy: disallow-untyped-calls=False
# (the Twisted/Autobahn edge is partly untyped, as in ws_node/websocket.py)
"""The baseline WebSocket server: the simplest Autobahn program that does a node's socket work.

``python -m bench.bare_server --port 0`` runs Autobahn on Twisted's asyncio reactor, as the node
does, with the same keepalive settings. It answers LoadLibrary and OpenConnection with canned
frames (so the bench's agents connect to it exactly as to a node), groups sockets by the line they
opened, and on command broadcasts given frames to a line's sockets at a given rate with
``prepareMessage`` once per frame and ``sendPreparedMessage`` per socket. No broker, no Redis, no
session: what is left is the floor Python + Twisted + Autobahn set on this machine.

Control: one JSON object per line on stdin, one answer per line on stdout. The first stdout line
is ``{"port": N}`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import Any


def due_count(rate: float, elapsed: float, done: int) -> int:
    """How many items a sender pacing ``rate`` per second should send now, ``elapsed`` seconds in."""
    if rate <= 0 or elapsed <= 0:
        return 0
    return max(0, int(rate * elapsed) - done)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args(argv)

    from bench.agents import raise_fd_limit

    raise_fd_limit()
    if args.uvloop:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    from twisted.internet import asyncioreactor

    asyncioreactor.install(loop)
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    groups: dict[str, set[Any]] = {}
    clients: set[Any] = set()

    class BareProtocol(WebSocketServerProtocol):
        line: str | None = None

        def onOpen(self) -> None:
            clients.add(self)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            try:
                message = json.loads(payload)
                command = message.get("command")
            except (ValueError, AttributeError):
                return
            if command == "LoadLibrary":
                self.sendMessage(json.dumps({"eventType": 1, "content": str(uuid.uuid4())}).encode())
            elif command == "OpenConnection":
                params = json.loads(message["parameters"]["connectionParams"])
                self.line = str(params["ExtensionName"])
                groups.setdefault(self.line, set()).add(self)
                self.sendMessage(json.dumps({"eventType": 2, "connectionUId": self.line}).encode())

        def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
            clients.discard(self)
            if self.line is not None:
                groups.get(self.line, set()).discard(self)

    factory = WebSocketServerFactory(f"ws://{args.host}")  # the URL is informational; port 0 = any
    factory.protocol = BareProtocol
    factory.setProtocolOptions(autoPingInterval=30, autoPingTimeout=15, openHandshakeTimeout=10)
    port = reactor.listenTCP(args.port, factory, interface=args.host, backlog=1024)

    def answer(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    async def broadcast(rate: float, seconds: float, frames: list[str]) -> dict[str, Any]:
        prepared = [factory.prepareMessage(f.encode()) for f in frames]
        lines = sorted(line for line, members in groups.items() if members)
        if not lines:
            return {"error": "no agents connected"}
        sent_events = sent_frames = 0
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            for _ in range(due_count(rate, elapsed, sent_events)):
                line = lines[sent_events % len(lines)]
                for message in prepared:
                    for client in list(groups[line]):
                        client.sendPreparedMessage(message)
                        sent_frames += 1
                sent_events += 1
            await asyncio.sleep(0.005)
        return {"events": sent_events, "frames": sent_frames, "seconds": time.perf_counter() - started}

    async def control() -> None:
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            raw = await reader.readline()
            if not raw:
                reactor.stop()
                return
            try:
                request = json.loads(raw)
                command = request.get("cmd")
                if command == "stats":
                    answer({"clients": len(clients), "lines": sum(1 for g in groups.values() if g)})
                elif command == "broadcast":
                    answer(await broadcast(float(request["rate"]), float(request["seconds"]),
                                           [str(f) for f in request["frames"]]))
                elif command == "stop":
                    answer({"stopped": True})
                    reactor.stop()
                    return
                else:
                    answer({"error": f"unknown command {command!r}"})
            except (ValueError, KeyError, TypeError) as exc:
                answer({"error": f"{type(exc).__name__}: {exc}"})

    tasks: list[asyncio.Task[None]] = []  # a task nobody references may be collected mid-await

    def started() -> None:
        answer({"port": port.getHost().port})
        tasks.append(loop.create_task(control()))

    reactor.callWhenRunning(started)
    reactor.run(installSignalHandlers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
