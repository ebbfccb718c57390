"""HTTP side of a node, on the same port as the WebSocket: ``/health`` (for HAProxy),
``/metrics`` (for Prometheus), ``/console`` (the agent console page) and the WebSocket at ``/``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.static import File

STATIC_DIR = Path(__file__).with_name("static")


class HealthResource(Resource):
    isLeaf = True

    def __init__(self, check: Callable[[], tuple[bool, dict[str, Any]]]) -> None:
        super().__init__()
        self._check = check

    def render_GET(self, request: Request) -> bytes:
        healthy, details = self._check()
        request.setResponseCode(200 if healthy else 503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps({"status": "ok" if healthy else "unavailable", **details}).encode()


class MetricsResource(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return bytes(generate_latest(REGISTRY))


def build_site(ws_factory: Any, health: Callable[[], tuple[bool, dict[str, Any]]]) -> Site:
    root: Any = Resource()
    children: dict[bytes, Any] = {
        b"": WebSocketResource(ws_factory),
        b"health": HealthResource(health),
        b"metrics": MetricsResource(),
    }
    if STATIC_DIR.is_dir():
        children[b"console"] = File(str(STATIC_DIR / "console.html"), defaultType="text/html")
        children[b"static"] = File(str(STATIC_DIR))
    for path, resource in children.items():
        root.putChild(path, resource)
    site = Site(root)
    site.displayTracebacks = False
    site.noisy = False
    return site
