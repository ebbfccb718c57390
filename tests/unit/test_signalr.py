"""SignalR JSON hub protocol, hub methods, keep-alive and connection tokens: pure, no sockets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ws_node import signalr
from ws_node.signalr import (
    RECORD_SEPARATOR,
    CloseReceived,
    HandshakeCompleted,
    HandshakeFailed,
    HubConnection,
    HubState,
    Invocation,
    KeepAlive,
    KeepAliveVerdict,
    PingReceived,
    ProtocolViolation,
)
from ws_node.signalr_token import ConnectionTokens, derive_secret

RS = RECORD_SEPARATOR


def record(obj: object) -> str:
    return json.dumps(obj) + RS


def opened(max_record_chars: int = 64 * 1024) -> HubConnection:
    hub = HubConnection(max_record_chars=max_record_chars)
    assert hub.receive_text(record({"protocol": "json", "version": 1})) == [HandshakeCompleted(1)]
    return hub


def parse_record(text: str) -> dict[str, object]:
    assert text.endswith(RS) and text.count(RS) == 1
    value = json.loads(text[:-1])
    assert isinstance(value, dict)
    return value


# ---- handshake -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_handshake_accepts_json_versions_the_microsoft_clients_send(version: int) -> None:
    hub = HubConnection()
    assert hub.receive_text(record({"protocol": "json", "version": version})) == [HandshakeCompleted(version)]
    assert hub.state is HubState.OPEN
    assert signalr.HANDSHAKE_OK == "{}" + RS


@pytest.mark.parametrize(
    ("request_text", "fragment"),
    [
        (record({"protocol": "messagepack", "version": 1}), "'messagepack' is not available"),
        (record({"protocol": "json", "version": 7}), "version 7"),
        (record({"protocol": "json"}), "integer 'version'"),
        (record({"protocol": "json", "version": True}), "integer 'version'"),
        (record([1, 2]), "not a JSON object"),
        ("not json" + RS, "not a JSON object"),
    ],
)
def test_bad_handshakes_fail_with_a_readable_error(request_text: str, fragment: str) -> None:
    hub = HubConnection()
    [event] = hub.receive_text(request_text)
    assert isinstance(event, HandshakeFailed) and fragment in event.message
    assert hub.state is HubState.CLOSED
    assert hub.receive_text(record({"type": 6})) == []
    assert parse_record(signalr.handshake_error(event.message)) == {"error": event.message}


def test_handshake_and_first_invocation_in_one_message_split_across_messages() -> None:
    hub = HubConnection()
    data = record({"protocol": "json", "version": 1}) + record(
        {"type": 1, "invocationId": "0", "target": "SendRawMessage", "arguments": ["{\"command\":\"LoadLibrary\"}"]}
    )
    cut = len(data) - 10
    first = hub.receive_text(data[:cut])
    assert first == [HandshakeCompleted(1)]
    assert hub.receive_text(data[cut:]) == [Invocation("0", "SendRawMessage", ['{"command":"LoadLibrary"}'])]


# ---- records -----------------------------------------------------------------------------------------


def test_pings_closes_and_ignored_types() -> None:
    hub = opened()
    events = hub.receive_text(record({"type": 6}) + record({"type": 5, "invocationId": "1"}) + record({"type": 8}))
    assert events == [PingReceived()]
    assert hub.receive_text(record({"type": 7, "error": "bye"})) == [CloseReceived("bye")]
    assert hub.state is HubState.CLOSED


@pytest.mark.parametrize(
    "bad",
    [
        "garbage" + RS,
        record("a string"),
        record({"type": "1"}),
        record({"target": "x"}),
        record({"type": 1, "arguments": []}),
        record({"type": 1, "target": "Ping", "arguments": {}}),
        record({"type": 1, "target": "Ping", "invocationId": 5}),
        "[" * 100_000 + RS,
    ],
)
def test_protocol_violations_close_the_connection(bad: str) -> None:
    hub = opened(max_record_chars=1_000_000)
    events = hub.receive_text(bad)
    assert len(events) == 1 and isinstance(events[0], ProtocolViolation)
    assert hub.state is HubState.CLOSED
    assert hub.receive_text(record({"type": 6})) == []


def test_an_unterminated_record_cannot_grow_without_bound() -> None:
    hub = opened(max_record_chars=1000)
    assert hub.receive_text('{"type":1,"target":"SendRawMessage","arguments":["' + "x" * 500) == []
    [event] = hub.receive_text("x" * 600)
    assert isinstance(event, ProtocolViolation) and "1000" in event.message


def test_events_before_a_violation_in_the_same_message_are_kept() -> None:
    hub = opened(max_record_chars=100)
    events = hub.receive_text(record({"type": 6}) + record({"type": 1, "target": "Ping", "arguments": ["x" * 200]}))
    assert events[0] == PingReceived() and isinstance(events[1], ProtocolViolation)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_never_raises(text: str) -> None:
    hub = opened(max_record_chars=200)
    for chunk in (text, text + RS, RS + text):
        hub.receive_text(chunk)


# ---- hub methods -------------------------------------------------------------------------------------


def test_send_raw_message_goes_to_the_session_and_completes_without_result() -> None:
    call = signalr.dispatch(Invocation("3", "SendRawMessage", ['{"command":"LoadLibrary"}']))
    assert call.session_text == '{"command":"LoadLibrary"}'
    assert call.reply is not None and parse_record(call.reply) == {"type": 3, "invocationId": "3"}


def test_method_names_match_case_insensitively_like_aspnet() -> None:
    assert signalr.dispatch(Invocation(None, "sendrawmessage", ["x"])) == signalr.HubCall("x", None)


def test_send_message_accepts_an_object_and_passes_it_as_json() -> None:
    call = signalr.dispatch(Invocation("1", "SendMessage", [{"command": "Ping"}]))
    assert call.session_text is not None and json.loads(call.session_text) == {"command": "Ping"}


def test_ping_method_completes() -> None:
    call = signalr.dispatch(Invocation("9", "Ping", []))
    assert call.session_text is None
    assert call.reply is not None and parse_record(call.reply) == {"type": 3, "invocationId": "9"}


@pytest.mark.parametrize(
    ("invocation", "fragment"),
    [
        (Invocation("1", "SendRawMessage", [{"command": "x"}]), "one string argument"),
        (Invocation("1", "SendRawMessage", []), "one string argument"),
        (Invocation("1", "SendRawMessage", ["a", "b"]), "one string argument"),
        (Invocation("1", "DeleteEverything", []), "Unknown hub method 'DeleteEverything'"),
        (Invocation("1", "SendRawMessage", ["x"], streaming=True), "Streaming is not supported"),
    ],
)
def test_bad_invocations_get_an_error_completion_and_reach_no_session(invocation: Invocation, fragment: str) -> None:
    call = signalr.dispatch(invocation)
    assert call.session_text is None
    assert call.reply is not None
    reply = parse_record(call.reply)
    assert reply["type"] == 3 and reply["invocationId"] == "1" and fragment in str(reply["error"])


def test_non_blocking_invocations_get_no_completion() -> None:
    assert signalr.dispatch(Invocation(None, "Nope", [])) == signalr.HubCall(None, None)


def test_server_message_carries_the_event_as_one_string_argument() -> None:
    event = '{"eventType":5,"content":"{\\"id\\":\\"x\\"}"}'
    pushed = parse_record(signalr.server_message(event))
    assert pushed == {"type": 1, "target": "ServerMessage", "arguments": [event]}
    assert "invocationId" not in pushed


def test_record_separator_inside_text_is_escaped() -> None:
    out = signalr.server_message("a\x1eb")
    assert out.count(RS) == 1 and json.loads(out[:-1])["arguments"] == ["a\x1eb"]


def test_close_record_forms() -> None:
    assert parse_record(signalr.close_record()) == {"type": 7}
    assert parse_record(signalr.close_record("boom", allow_reconnect=True)) == {
        "type": 7, "error": "boom", "allowReconnect": True,
    }
    assert signalr.PING_RECORD == '{"type":6}' + RS


def test_first_message_sniffing() -> None:
    assert signalr.looks_like_handshake('{"protocol":"json","version":1}\x1e')
    assert not signalr.looks_like_handshake('{"command":"LoadLibrary","parameters":{}}')
    assert not signalr.looks_like_handshake("\x1e")


# ---- keep-alive --------------------------------------------------------------------------------------


def test_keepalive_pings_after_15s_of_sending_nothing_and_drops_after_30s_of_silence() -> None:
    keepalive = KeepAlive(100.0)
    assert keepalive.check(114.9) is KeepAliveVerdict.IDLE
    assert keepalive.check(115.0) is KeepAliveVerdict.SEND_PING
    keepalive.sent(115.0)
    keepalive.received(125.0)
    assert keepalive.check(129.0) is KeepAliveVerdict.IDLE
    assert keepalive.check(154.9) is KeepAliveVerdict.SEND_PING
    assert keepalive.check(155.0) is KeepAliveVerdict.TIMED_OUT


# ---- tokens ------------------------------------------------------------------------------------------


def test_a_token_from_one_node_is_accepted_by_another_with_the_same_secret() -> None:
    node_a = ConnectionTokens(derive_secret("cluster-secret", ""))
    node_b = ConnectionTokens(derive_secret("cluster-secret", ""))
    issued = node_a.issue(1000.0)
    assert issued.connection_id != issued.connection_token
    assert node_b.verify(issued.connection_token, 1000.0 + 299)
    assert not node_b.verify(issued.connection_token, 1000.0 + 301)
    assert not ConnectionTokens(derive_secret("other", "")).verify(issued.connection_token, 1000.0)


def test_tokens_are_url_safe_because_the_client_does_not_encode_them() -> None:
    token = ConnectionTokens(b"k" * 32).issue(0).connection_token
    assert all(c.isalnum() or c in "-_." for c in token)


def test_secret_falls_back_to_the_deployment_key() -> None:
    assert derive_secret("", "key-123") == derive_secret("key-123", "")
    assert derive_secret("", "key-123") != derive_secret("", "")


@pytest.mark.parametrize("tampered", ["", "x", "a.b", "a.b.c", "zz.nonce.sig", "é.a.b", "1" * 200])
def test_malformed_tokens_are_refused(tampered: str) -> None:
    assert not ConnectionTokens(b"k" * 32).verify(tampered, 0)


def test_a_modified_expiry_breaks_the_signature() -> None:
    tokens = ConnectionTokens(b"k" * 32)
    token = tokens.issue(1000.0).connection_token
    expiry, nonce, signature = token.split(".")
    forged = f"{int(expiry, 16) + 10_000:x}.{nonce}.{signature}"
    assert not tokens.verify(forged, 1000.0)
    assert "k" * 32 not in repr(tokens)
