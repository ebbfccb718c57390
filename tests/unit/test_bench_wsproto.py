"""The bench client's minimal WebSocket framing and handshake check, and the pacing rule."""

from __future__ import annotations

import pytest

from bench.bare_server import due_count
from bench.wsproto import (
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    FrameDecoder,
    HandshakeError,
    accept_key,
    encode_frame,
    handshake_request,
    parse_handshake_response,
)


def test_accept_key_matches_rfc6455_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_handshake_request_and_response_check() -> None:
    request, key = handshake_request("127.0.0.1", 2013, "/", key="dGhlIHNhbXBsZSBub25jZQ==")
    assert request.startswith(b"GET / HTTP/1.1\r\n") and b"Sec-WebSocket-Key: " + key.encode() in request
    good = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
    parse_handshake_response(good, key)
    with pytest.raises(HandshakeError, match="refused"):
        parse_handshake_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\n", key)
    with pytest.raises(HandshakeError, match="Accept"):
        parse_handshake_response(good.replace(b"s3pP", b"XXXX"), key)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 100_000])
def test_masked_frames_decode_to_the_payload(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    frame = encode_frame(OP_TEXT, payload, mask=b"\x01\x02\x03\x04")
    assert frame[1] & 0x80  # client frames are masked
    decoder = FrameDecoder()
    # fed one awkward piece at a time, the message still comes out whole, once
    out = []
    for i in range(0, len(frame), 7):
        out += decoder.feed(frame[i : i + 7])
    assert out == [(OP_TEXT, payload)]


def test_fragments_are_joined_and_control_frames_pass_between() -> None:
    data = (encode_frame(OP_TEXT, b"hel", fin=False) + encode_frame(OP_PING, b"p")
            + encode_frame(OP_CONT, b"lo", fin=False) + encode_frame(OP_CONT, b"!")
            + encode_frame(OP_CLOSE, b"\x03\xe8"))
    assert FrameDecoder().feed(data) == [(OP_PING, b"p"), (OP_TEXT, b"hello!"), (OP_CLOSE, b"\x03\xe8")]


def test_oversized_frame_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        FrameDecoder(max_frame=10).feed(encode_frame(OP_TEXT, b"x" * 11))
    with pytest.raises(ValueError, match="4 bytes"):
        encode_frame(OP_TEXT, b"x", mask=b"12")


def test_due_count_paces_a_rate() -> None:
    assert due_count(100.0, 0.5, 0) == 50
    assert due_count(100.0, 0.5, 50) == 0
    assert due_count(100.0, 0.5, 60) == 0
    assert due_count(0.0, 10.0, 0) == 0
    assert due_count(100.0, -1.0, 0) == 0
