"""The least WebSocket (RFC 6455) a load-generating client needs, sans I/O.

Thousands of simulated agents share two cores with the system under test, so the client side
must cost next to nothing: no per-message objects beyond ``(opcode, payload)``, no UTF-8
validation, no extensions. Client frames are masked (the server must reject unmasked ones);
server frames are not.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "FrameDecoder",
    "HandshakeError",
    "accept_key",
    "encode_frame",
    "handshake_request",
    "parse_handshake_response",
]

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_FRAME = 4 * 1024 * 1024


class HandshakeError(Exception):
    pass


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()  # noqa: S324 - RFC 6455


def handshake_request(host: str, port: int, path: str = "/", key: str | None = None) -> tuple[bytes, str]:
    """The opening handshake and the ``Sec-WebSocket-Key`` it carries."""
    key = key or base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    return request, key


def parse_handshake_response(head: bytes, key: str) -> None:
    """Check a server's answer (up to and including the blank line); raise :class:`HandshakeError`."""
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or status[1] != "101":
        raise HandshakeError(f"handshake refused: {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if headers.get("sec-websocket-accept") != accept_key(key):
        raise HandshakeError("bad Sec-WebSocket-Accept")


def _mask(payload: bytes, mask: bytes) -> bytes:
    if not payload:
        return payload
    n = len(payload)
    repeated = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(n, "little")


def encode_frame(opcode: int, payload: bytes, *, mask: bytes | None = None, fin: bool = True) -> bytes:
    """One frame. ``mask`` (4 bytes) is required of clients; ``None`` writes an unmasked (server) frame."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    mask_bit = 0x80 if mask is not None else 0
    if n < 126:
        head = struct.pack("!BB", first, mask_bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    if mask is None:
        return head + payload
    if len(mask) != 4:
        raise ValueError("mask must be 4 bytes")
    return head + mask + _mask(payload, mask)


class FrameDecoder:
    """Feed bytes, get complete messages ``(opcode, payload)``; fragments are reassembled.

    Control frames (ping/pong/close) come out as they arrive, even between fragments.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame
        self._fragments: list[bytes] = []
        self._fragment_op = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            header = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = struct.unpack_from("!H", buf, pos + 2)[0]
                header = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = struct.unpack_from("!Q", buf, pos + 2)[0]
                header = 10
            if n > self._max:
                raise ValueError(f"frame of {n} bytes exceeds {self._max}")
            masked = b1 & 0x80
            if masked:
                header += 4
            if end - pos < header + n:
                break
            payload = bytes(buf[pos + header : pos + header + n])
            if masked:
                payload = _mask(payload, bytes(buf[pos + header - 4 : pos + header]))
            pos += header + n
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            if opcode >= 0x8:
                out.append((opcode, payload))
            elif opcode == OP_CONT:
                self._fragments.append(payload)
                if fin:
                    out.append((self._fragment_op, b"".join(self._fragments)))
                    self._fragments = []
            elif not fin:
                self._fragment_op = opcode
                self._fragments = [payload]
            else:
                out.append((opcode, payload))
        if pos:
            del buf[:pos]
        return out
