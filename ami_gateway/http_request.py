"""One HTTP/1.1 request over asyncio, framed by h11 (sans-I/O): what the call-record saver needs.

A request per connection (``Connection: close``): records are written a few per call, so keeping
connections alive is not worth a pool's failure modes. The response body is capped, the whole exchange
has a deadline, and every failure is an :class:`HttpError` (a transport problem, worth retrying).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

MAX_RESPONSE_BYTES = 1024 * 1024


class HttpError(Exception):
    """The request did not get a complete response (refused, reset, timed out, garbled)."""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header_values(self, name: str) -> list[str]:
        lowered = name.lower()
        return [v for k, v in self.headers if k == lowered]


async def request(
    method: str,
    url: str,
    *,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> HttpResponse:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpError(f"not an http(s) URL: {url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rsplit("@", 1)[-1]
    all_headers = [("Host", host_header), ("Connection", "close"), ("Content-Length", str(len(body)))]
    all_headers += headers or []
    try:
        async with asyncio.timeout(timeout):
            return await _exchange(parts.hostname, port, tls, ssl_context, method, target, all_headers, body)
    except TimeoutError:
        raise HttpError(f"{method} {_safe(url)}: no response within {timeout:g}s") from None
    except (OSError, ssl.SSLError) as exc:
        raise HttpError(f"{method} {_safe(url)}: {exc.__class__.__name__}: {exc}") from None
    except h11.ProtocolError as exc:
        raise HttpError(f"{method} {_safe(url)}: bad HTTP response: {exc}") from None


async def _exchange(
    host: str,
    port: int,
    tls: bool,
    ssl_context: ssl.SSLContext | None,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes,
) -> HttpResponse:
    context = (ssl_context or ssl.create_default_context()) if tls else None
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    try:
        conn = h11.Connection(our_role=h11.CLIENT)
        data = conn.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        writer.write(data)
        await writer.drain()
        status = 0
        resp_headers: tuple[tuple[str, str], ...] = ()
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                chunk = await reader.read(65536)
                conn.receive_data(chunk)
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                resp_headers = tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers)
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_RESPONSE_BYTES:
                    raise HttpError(f"response larger than {MAX_RESPONSE_BYTES} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return HttpResponse(status, resp_headers, b"".join(chunks))
            elif isinstance(event, h11.ConnectionClosed):
                raise HttpError("connection closed before the response ended")
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


def _safe(url: str) -> str:
    """The URL without any user:password part (for messages)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"
