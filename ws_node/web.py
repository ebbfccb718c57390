"""HTTP side of a node, on the same port as the agent WebSocket.

* ``/health`` (for HAProxy), ``/metrics`` (for Prometheus), ``/console`` and ``/static`` (the agent
  console page), ``/status`` (the operator's cluster status page, ``status_page.py``).
* The node listens with ``front_door.py``: a plain agent upgrade goes to Autobahn without this
  module; any request it leaves to twisted.web is served here, upgrades included.
* Every other path is the agent endpoint, because Creatio's client takes the server URL
  verbatim and builds the rest from it: ``ws://host:2013`` opens a raw WebSocket at ``/``;
  ``http://host:2013[/any/hub/path]`` makes Microsoft's SignalR client ``POST
  <path>/negotiate`` and then open its WebSocket at ``<path>?id=...``. So ``.../negotiate``
  answers the negotiation, an ``Upgrade: websocket`` request becomes an agent socket, anything
  else gets 426.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.static import File

from ws_node.admission import AdmissionPolicy, admit, origin_allowed
from ws_node.front_door import FrontDoorFactory
from ws_node.http_deadline import BoundedHTTPChannel
from ws_node.signalr_token import ConnectionTokens

STATIC_DIR = Path(__file__).with_name("static")
#: seconds a whole HTTP request may take, however slowly its bytes come (slowloris)
REQUEST_DEADLINE = 10.0
#: SignalR negotiate versions this node speaks (1 adds the connection token)
MAX_NEGOTIATE_VERSION = 1

NEGOTIATIONS = Counter("cms_node_signalr_negotiations_total", "SignalR negotiations answered", ["version"])


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


def _arg(request: Request, name: bytes) -> str | None:
    values = (request.args or {}).get(name)
    return values[0].decode("utf-8", errors="replace") if values else None


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if isinstance(value, bytes) else value


class NegotiateResource(Resource):
    """``POST <hub>/negotiate``: a connection id and a token any node of the cluster accepts.

    Browsers call it cross-origin (Creatio's page is on another host) with credentials and
    custom headers, so there is a CORS preflight; the answer echoes an allowed Origin.
    """

    isLeaf = True

    def __init__(
        self,
        policy: AdmissionPolicy,
        tokens: ConnectionTokens,
        *,
        open_connections: Callable[[], int],
        is_draining: Callable[[], bool],
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.policy = policy
        self.tokens = tokens
        self.open_connections = open_connections
        self.is_draining = is_draining
        self.wall_clock = wall_clock

    def _cors(self, request: Request) -> bool:
        """Adds the CORS headers for an allowed Origin; False when the Origin is not allowed."""
        origin = _header(request, b"origin")
        if origin is None:
            return True
        if not origin_allowed(self.policy.allowed_origins, origin):
            return False
        request.setHeader(b"access-control-allow-origin", origin.encode("latin-1"))
        request.setHeader(b"access-control-allow-credentials", b"true")
        request.setHeader(b"vary", b"Origin")
        return True

    def _refuse(self, request: Request, status: int, message: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps({"error": message}).encode()

    def render_OPTIONS(self, request: Request) -> bytes:
        if not self._cors(request):
            return self._refuse(request, 403, "origin not allowed")
        request.setResponseCode(204)
        request.setHeader(b"access-control-allow-methods", b"POST, OPTIONS")
        asked = request.getHeader(b"access-control-request-headers")
        if asked:
            request.setHeader(b"access-control-allow-headers", asked[:512])
        request.setHeader(b"access-control-max-age", b"600")
        return b""

    def render_POST(self, request: Request) -> bytes:
        refusal = admit(
            self.policy, key=_arg(request, b"key"), origin=_header(request, b"origin"),
            open_connections=self.open_connections(), draining=self.is_draining(),
        )
        if refusal is not None:
            return self._refuse(request, refusal.status, refusal.reason)
        self._cors(request)
        requested = _arg(request, b"negotiateVersion") or "0"
        if not requested.isdigit() or len(requested) > 4:
            return self._refuse(request, 400, "negotiateVersion must be a non-negative integer")
        version = min(int(requested), MAX_NEGOTIATE_VERSION)
        issued = self.tokens.issue(self.wall_clock())
        body: dict[str, Any] = {
            "negotiateVersion": version,
            "availableTransports": [{"transport": "WebSockets", "transferFormats": ["Text"]}],
        }
        if version >= 1:
            body["connectionId"] = issued.connection_id
            body["connectionToken"] = issued.connection_token
        else:
            # Version 0 has no separate token: the id the client sends back is the connection id.
            body["connectionId"] = issued.connection_token
        NEGOTIATIONS.labels(version=str(version)).inc()
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"allow", b"POST, OPTIONS")
        return self._refuse(request, 405, "negotiate takes POST")


class AgentEndpoint(Resource):
    """Any path that is not reserved: negotiation, the agent WebSocket, or 426."""

    isLeaf = True

    def __init__(self, websocket: WebSocketResource, negotiate: NegotiateResource) -> None:
        super().__init__()
        self.websocket = websocket
        self.negotiate = negotiate

    def render(self, request: Request) -> Any:
        if request.path.rstrip(b"/").endswith(b"/negotiate"):
            return self.negotiate.render(request)
        upgrade = request.getHeader(b"upgrade") or b""
        if upgrade.lower() == b"websocket":
            return self.websocket.render(request)
        request.setResponseCode(426)
        request.setHeader(b"upgrade", b"websocket")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Agent endpoint: connect with a WebSocket (Creatio 7.x) or SignalR (Creatio 8.x).\n"


class RootResource(Resource):
    def __init__(self, endpoint: AgentEndpoint) -> None:
        super().__init__()
        self.endpoint = endpoint

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self.endpoint


def build_site(
    ws_factory: Any,
    health: Callable[[], tuple[bool, dict[str, Any]]],
    negotiate: NegotiateResource,
    *,
    idle_timeout: float = 30.0,
    status: Resource | None = None,
    request_deadline: float = REQUEST_DEADLINE,
) -> Site:
    root = RootResource(AgentEndpoint(WebSocketResource(ws_factory), negotiate))
    children: dict[bytes, Any] = {
        b"health": HealthResource(health),
        b"metrics": MetricsResource(),
    }
    if STATIC_DIR.is_dir():
        children[b"console"] = File(str(STATIC_DIR / "console.html"), defaultType="text/html")
        children[b"static"] = File(str(STATIC_DIR))
    if status is not None:  # the operator's status page (ws_node/status_page.py)
        children[b"status"] = status
    for path, resource in children.items():
        root.putChild(path, resource)
    # Idle HTTP connections (not upgraded sockets: those clear the timer) are closed after this.
    site = Site(root, timeout=idle_timeout)
    site.displayTracebacks = False
    site.noisy = False
    # A whole request within ``request_deadline``, however slowly its bytes come (slowloris).
    site_any: Any = site
    site_any.protocol = functools.partial(BoundedHTTPChannel, request_deadline)
    return site


def build_front_door(ws_factory: Any, site: Site, *, request_deadline: float = REQUEST_DEADLINE) -> FrontDoorFactory:
    """What the node listens with: agent upgrades straight to ``ws_factory``, the rest to ``site``
    (:func:`build_site`, with the same ``request_deadline``)."""
    root: Any = site.resource
    return FrontDoorFactory(ws_factory, site, reserved=list(root.children), request_deadline=request_deadline)
