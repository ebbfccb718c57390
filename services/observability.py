"""``/metrics`` and ``/health`` for processes that run a plain asyncio loop (the gateway).

A deliberately tiny HTTP/1.1 responder: Prometheus and HAProxy send short GETs, nothing else is
served, and it keeps prometheus_client's Twisted/WSGI adapters (and their reactor import) out of
processes that do not need them. Requests are capped in size and time.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]

_MAX_REQUEST = 8192


def render_health(check: HealthCheck) -> tuple[int, bytes]:
    healthy, details = check()
    body = json.dumps({"status": "ok" if healthy else "unavailable", **details}).encode()
    return (200 if healthy else 503), body


class ObservabilityServer:
    def __init__(
        self,
        host: str,
        port: int,
        health: HealthCheck,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self._host = host
        self._port = port
        self._health = health
        self._registry = registry
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split(" ")
            method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
            path = path.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"method not allowed\n"
            elif path == "/metrics":
                status, ctype, body = 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
            elif path == "/health":
                status, body = render_health(self._health)
                ctype = "application/json"
            else:
                status, ctype, body = 404, "text/plain", b"not found\n"
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            )
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
