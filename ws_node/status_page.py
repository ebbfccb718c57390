"""``/status``: the operator's read-only view of the whole cluster, served by every node.

The page (``static/status.html``) polls ``/status/data``. To answer, a node reads the process
registry in Redis (``services/heartbeat.py``: every gateway and node beats there with its
``/metrics`` and ``/health`` URLs), fetches those over HTTP, and summarizes them
(``cluster_status.py``); so any node's page shows every process, and the figures are the
processes' own ``/metrics``. A background sampler keeps counter samples for the rates.

Access: with an admin token configured, ``Authorization: Bearer <token>`` or ``?token=``; else,
with a deployment key, ``?key=``; else open (a loopback-only lab). Missing: 401; wrong: 403.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from services.heartbeat import read_registry
from services.tasks import background, stop_tasks
from ws_node.cluster_status import ProcessReading, RateWindow, counters_of, parse_metrics, summarize

log = logging.getLogger(__name__)

STATUS_REQUESTS = Counter("cms_node_status_requests_total", "Status page data requests", ["outcome"])
for _outcome in ("ok", "unauthorized", "forbidden", "error"):
    STATUS_REQUESTS.labels(outcome=_outcome)

STATIC_DIR = Path(__file__).with_name("static")
MAX_BODY = 8 * 1024 * 1024


def authorize(admin_token: str, deployment_key: str, *, token: str | None, key: str | None) -> int | None:
    """None: allowed; 401: a credential is required and none was given; 403: the one given is wrong."""
    expected, given = (admin_token, token) if admin_token else (deployment_key, key)
    if not expected:
        return None
    if not given:
        return 401
    return None if hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace")) else 403


async def http_get(url: str, timeout: float) -> tuple[int, bytes]:
    """A plain HTTP/1.0 GET (the processes' /metrics and /health are plain HTTP on the cluster network)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"not an http:// URL: {url!r}")
    port = parts.port or 80

    async def go() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(parts.hostname, port)
        try:
            path = parts.path or "/"
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {parts.netloc}\r\nAccept: */*\r\n\r\n".encode("latin-1"))
            await writer.drain()
            data = await reader.read(MAX_BODY)
            while len(data) < MAX_BODY and (more := await reader.read(MAX_BODY - len(data))):
                data += more
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        head, _, body = data.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].split()
        if len(status_line) < 2 or not status_line[1].isdigit():
            raise ValueError("not an HTTP answer")
        return int(status_line[1]), body

    async with asyncio.timeout(timeout):
        return await go()


class StatusCollector:
    """Reads the registry and every process; keeps counter samples for the rates."""

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        node_id: str,
        *,
        fetch_timeout: float = 2.0,
        sample_interval: float = 15.0,
        clock: Callable[[], float] = time.time,
        own_record: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._node_id = node_id
        self._fetch_timeout = fetch_timeout
        self._sample_interval = sample_interval
        self._clock = clock
        #: this node's heartbeat record: the page shows this node even when Redis cannot say who else is there
        self._own_record = own_record
        self.rates = RateWindow()
        self._task: asyncio.Task[None] | None = None
        # Several open pages (and the sampler) share one round of fetches: a fresh answer is reused
        # for a moment, and a round in flight is awaited rather than started again.
        self._last: tuple[float, dict[str, Any]] | None = None
        self._inflight: asyncio.Future[dict[str, Any]] | None = None
        self.reuse_seconds = 2.0

    async def _read_process(
        self, kind: str, pid: str, last_seen: float, record: dict[str, Any] | None
    ) -> ProcessReading:
        if record is None:
            return ProcessReading(kind, pid, last_seen, None)
        health: dict[str, Any] | None = None
        health_ok = False
        metrics: dict[str, float] | None = None
        errors = []
        if record.get("health_url"):
            try:
                status, body = await http_get(str(record["health_url"]), self._fetch_timeout)
                health_ok = status == 200
                loaded = json.loads(body or b"{}")
                health = loaded if isinstance(loaded, dict) else None
            except (OSError, TimeoutError, ValueError) as exc:
                errors.append(f"/health: {type(exc).__name__} {exc}".strip())
        if record.get("metrics_url"):
            try:
                status, body = await http_get(str(record["metrics_url"]), self._fetch_timeout)
                if status != 200:
                    raise ValueError(f"HTTP {status}")
                metrics = parse_metrics(body.decode("utf-8", "replace"))
            except (OSError, TimeoutError, ValueError) as exc:
                errors.append(f"/metrics: {type(exc).__name__} {exc}".strip())
        return ProcessReading(kind, pid, last_seen, record, health, health_ok, metrics, "; ".join(errors))

    async def snapshot(self) -> dict[str, Any]:
        if self._last is not None and self._clock() - self._last[0] < self.reuse_seconds:
            return self._last[1]
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._collect())
        return await asyncio.shield(self._inflight)

    async def _collect(self) -> dict[str, Any]:
        now = self._clock()
        redis_state: dict[str, Any]
        try:
            started = time.perf_counter()
            await self._redis.ping()
            ping_ms = (time.perf_counter() - started) * 1000
            processes = await read_registry(self._redis, self._prefix, now)
            redis_state = {"state": "connected", "ping_ms": round(ping_ms, 2)}
        except (aioredis.RedisError, OSError) as exc:
            processes = []
            redis_state = {"state": "unreachable", "error": f"{type(exc).__name__}: {exc}"}
        targets = [(p.kind, p.id, p.last_seen, p.record) for p in processes]
        if self._own_record is not None and not any(p.kind == "node" and p.id == self._node_id for p in processes):
            targets.append(("node", self._node_id, now, self._own_record()))
        readings = await asyncio.gather(*(self._read_process(*target) for target in targets))
        self.rates.add(now, counters_of(readings))
        summary = summarize(readings, now, self.rates, redis_state=redis_state)
        data = {"generated_at": now, "served_by": self._node_id, "prefix": self._prefix,
                **dataclasses.asdict(summary)}
        self._last = (now, data)
        return data

    async def _sample_forever(self) -> None:
        while True:
            try:
                await self.snapshot()
            except Exception as exc:  # a sampling round must never end the loop; the page shows errors
                log.warning("status sample failed: %s", exc)
            await asyncio.sleep(self._sample_interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._sample_forever())

    async def stop(self) -> None:
        await stop_tasks([self._task])
        self._task = None


def _arg(request: Request, name: bytes) -> str | None:
    values = (request.args or {}).get(name)
    return values[0].decode("utf-8", errors="replace") if values else None


def _bearer(request: Request) -> str | None:
    value = request.getHeader(b"authorization")
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    if text and text.lower().startswith("bearer "):
        return text[7:].strip()
    return None


class _Guarded(Resource):
    isLeaf = True

    def __init__(self, admin_token: str, deployment_key: str) -> None:
        super().__init__()
        self._admin_token = admin_token
        self._deployment_key = deployment_key

    def refused(self, request: Request) -> bytes | None:
        verdict = authorize(self._admin_token, self._deployment_key,
                            token=_bearer(request) or _arg(request, b"token"), key=_arg(request, b"key"))
        request.setHeader(b"cache-control", b"no-store")
        if verdict is None:
            return None
        STATUS_REQUESTS.labels(outcome="unauthorized" if verdict == 401 else "forbidden").inc()
        request.setResponseCode(verdict)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if verdict == 401:
            scheme = b'Bearer realm="cms status"' if self._admin_token else b'Key realm="cms status"'
            request.setHeader(b"www-authenticate", scheme)
            what = "an admin token (?token=... or Authorization: Bearer)" if self._admin_token else "?key=..."
            return f"The status page needs {what}.\n".encode()
        return b"Wrong credential for the status page.\n"


class StatusDataResource(_Guarded):
    def __init__(self, collector: StatusCollector, admin_token: str, deployment_key: str) -> None:
        super().__init__(admin_token, deployment_key)
        self._collector = collector

    def render_GET(self, request: Request) -> Any:
        refusal = self.refused(request)
        if refusal is not None:
            return refusal
        request.setHeader(b"content-type", b"application/json")

        def done(data: dict[str, Any]) -> None:
            STATUS_REQUESTS.labels(outcome="ok").inc()
            if not request.finished and not request._disconnected:
                request.write(json.dumps(data).encode())
                request.finish()

        def failed(failure: Any) -> None:
            STATUS_REQUESTS.labels(outcome="error").inc()
            log.warning("status data failed: %s", failure.getErrorMessage())
            if not request.finished and not request._disconnected:
                request.setResponseCode(500)
                request.write(json.dumps({"error": "status unavailable"}).encode())
                request.finish()

        d = Deferred.fromFuture(background(self._collector.snapshot(), report=False))
        d.addCallbacks(done, failed)
        return NOT_DONE_YET


class StatusPageResource(_Guarded):
    """``/status`` (the page) with ``/status/data`` (its JSON) below it."""

    isLeaf = False

    def __init__(self, collector: StatusCollector, admin_token: str, deployment_key: str) -> None:
        super().__init__(admin_token, deployment_key)
        data: Any = StatusDataResource(collector, admin_token, deployment_key)
        self.putChild(b"data", data)

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        child: Resource = super().getChild(path, request)
        return child

    def render_GET(self, request: Request) -> bytes:
        refusal = self.refused(request)
        if refusal is not None:
            return refusal
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return (STATIC_DIR / "status.html").read_bytes()
