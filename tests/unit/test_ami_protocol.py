"""The sans-I/O AMI parser against real Asterisk 20 captures and hostile input."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ami.protocol import (
    AmiMessage,
    AmiParser,
    Banner,
    MalformedMessage,
    encode_action,
    md5_login_key,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ami"
CAPTURES = {p.stem: p.read_bytes() for p in sorted(FIXTURES.glob("*.ami"))}

Item = AmiMessage | Banner | MalformedMessage


def parse_all(data: bytes, chunk: int | None = None, **kwargs: int | bool) -> list[Item]:
    parser = AmiParser(**kwargs)  # type: ignore[arg-type]
    out: list[Item] = []
    step = chunk or max(1, len(data))
    for i in range(0, len(data), step):
        parser.receive_data(data[i : i + step])
        while (item := parser.next_event()) is not None:
            out.append(item)
    parser.receive_data(b"")
    while (item := parser.next_event()) is not None:
        out.append(item)
    return out


def test_fixtures_are_the_three_captures() -> None:
    assert set(CAPTURES) == {"inbound-direct", "inbound-queue", "outbound"}
    for data in CAPTURES.values():
        assert b"\r\n\r\n" in data  # CRLF preserved


@pytest.mark.parametrize(
    ("name", "events"),
    [("inbound-direct", 28), ("inbound-queue", 104), ("outbound", 36)],
)
def test_captures_parse_completely(name: str, events: int) -> None:
    items = parse_all(CAPTURES[name])
    assert items[0] == Banner("9.0.0")
    assert all(isinstance(i, AmiMessage) for i in items[1:])
    msgs = [i for i in items[1:] if isinstance(i, AmiMessage)]
    assert msgs[0].response == "Success" and msgs[0].action_id == "capture-login"
    assert msgs[0]["Message"] == "Authentication accepted"
    assert msgs[-1].response == "Goodbye" and msgs[-1]["Message"] == "Thanks for all the fish."
    assert sum(1 for m in msgs if m.event) == events


def test_capture_headers() -> None:
    msgs = [i for i in parse_all(CAPTURES["inbound-direct"]) if isinstance(i, AmiMessage) and i.event]
    first = msgs[0]
    assert first.event == "Newchannel"
    assert first.headers[:3] == (
        ("Event", "Newchannel"),
        ("Privilege", "call,all"),
        ("Channel", "SIP/trunk-in-00000003"),
    )
    assert first["uniqueid"] == "1795685548.7" == first.get("UNIQUEID")
    assert first["CallerIDName"] == "Ivan Petrov"  # internal space kept
    assert first["AccountCode"] == ""  # "AccountCode: " -> empty value
    assert "Linkedid" in first and "Nope" not in first and 42 not in first
    assert first.get("Nope") is None and first.get("Nope", "x") == "x"
    with pytest.raises(KeyError):
        first["Nope"]
    hangups = [m for m in msgs if m.event == "Hangup"]
    assert [(m["Cause"], m["Cause-txt"]) for m in hangups] == [("16", "Normal Clearing")] * 2
    dial_end = next(m for m in msgs if m.event == "DialEnd")
    assert dial_end["DestExten"] == "" and dial_end["DialStatus"] == "ANSWER"


def test_originate_response_event_has_response_header() -> None:
    msgs = [i for i in parse_all(CAPTURES["outbound"]) if isinstance(i, AmiMessage)]
    orig = next(m for m in msgs if m.event == "OriginateResponse")
    assert orig.response == "Success" and orig.action_id == "drv-79" and orig["Reason"] == "4"


@pytest.mark.parametrize("name", sorted(CAPTURES))
def test_byte_by_byte_equals_whole(name: str) -> None:
    data = CAPTURES[name]
    assert parse_all(data, chunk=1) == parse_all(data)


def test_lf_only_equals_crlf() -> None:
    data = CAPTURES["outbound"]
    assert parse_all(data.replace(b"\r\n", b"\n")) == parse_all(data)
    assert parse_all(data.replace(b"\r\n", b"\n"), chunk=7) == parse_all(data)


def test_repeated_headers_and_variables() -> None:
    data = (
        b"Event: Newexten\r\nChannel: SIP/305-0001\r\nChanVariable: CALL_ID=abc\r\nChanVariable: EMPTY=\r\n"
        b"ChanVariable(SIP/305-0001): OLD=1\r\nVariable: X=a=b\r\n\r\n"
        b"Event: VarSet\r\nVariable: FOO\r\nValue: bar baz\r\n\r\n"
    )
    first, second = parse_all(data, expect_banner=False)
    assert isinstance(first, AmiMessage) and isinstance(second, AmiMessage)
    assert first.getall("chanvariable") == ["CALL_ID=abc", "EMPTY="]
    assert first.get("ChanVariable") == "CALL_ID=abc"  # first occurrence
    assert first.variables() == {"CALL_ID": "abc", "EMPTY": "", "OLD": "1", "X": "a=b"}
    assert second.variables() == {"FOO": "bar baz"}


def test_value_spacing() -> None:
    (msg,) = parse_all(
        b"Event: X\r\nA:  two spaces\r\nB:nospace\r\nC: trailing \r\nD: a: b\r\n\r\n", expect_banner=False
    )
    assert isinstance(msg, AmiMessage)
    assert msg["A"] == " two spaces" and msg["B"] == "nospace" and msg["C"] == "trailing " and msg["D"] == "a: b"


def test_follows_body() -> None:
    data = (
        b"Asterisk Call Manager/1.1\r\n"
        b"Response: Follows\r\nPrivilege: Command\r\nActionID: 7\r\n"
        b"Name/username  Host\r\n\r\n305/305   10.0.0.5\r\nKey: looks like a header\r\n"
        b"--END COMMAND--\r\n\r\n"
        b"Response: Follows\r\nPrivilege: Command\r\nNo newline at the end--END COMMAND--\r\n\r\n"
        b"Event: After\r\n\r\n"
    )
    for chunk in (None, 1, 5):
        items = parse_all(data, chunk=chunk)
        assert items[0] == Banner("1.1")
        first, second, after = items[1:]
        assert isinstance(first, AmiMessage) and isinstance(second, AmiMessage) and isinstance(after, AmiMessage)
        assert first.response == "Follows" and first.action_id == "7"
        assert first.body == ("Name/username  Host", "", "305/305   10.0.0.5", "Key: looks like a header")
        assert second.body == ("No newline at the end",)
        assert after.event == "After"


def test_malformed_message_is_reported_and_parsing_continues() -> None:
    data = b"Event: Good\r\n\r\nEvent: Bad\r\nno colon here\r\n\r\n:empty name\r\n\r\nEvent: \xff\xfeok\r\n\r\n"
    items = parse_all(data, expect_banner=False)
    assert [type(i).__name__ for i in items] == ["AmiMessage", "MalformedMessage", "MalformedMessage", "AmiMessage"]
    bad = items[1]
    assert isinstance(bad, MalformedMessage) and bad.raw.startswith(b"Event: Bad")
    last = items[3]
    assert isinstance(last, AmiMessage) and last.event is not None and last.event.endswith("ok")


def test_oversized_message_resyncs_with_capped_buffer() -> None:
    limit = 4096
    parser = AmiParser(max_message_bytes=limit, expect_banner=False)
    parser.receive_data(b"Event: Before\r\n\r\n")
    assert isinstance(parser.next_event(), AmiMessage)
    chunk = b"X-Junk: " + b"y" * 1000 + b"\r\n"
    reported = []
    for _ in range(2000):  # ~2 MB of one never-ending message
        parser.receive_data(chunk)
        while (item := parser.next_event()) is not None:
            reported.append(item)
        assert parser.buffered <= limit + len(chunk)
    assert len(reported) == 1
    assert isinstance(reported[0], MalformedMessage) and reported[0].reason == "oversized"
    assert len(reported[0].raw) <= 200
    parser.receive_data(b"tail\r\n\r\nEvent: After\r\n\r\n")
    item = parser.next_event()
    assert isinstance(item, AmiMessage) and item.event == "After"
    assert parser.next_event() is None and parser.buffered == 0


def test_oversized_complete_message_in_one_chunk() -> None:
    big = b"Event: Big\r\n" + b"A: " + b"z" * 10000 + b"\r\n\r\nEvent: Small\r\n\r\n"
    items = parse_all(big, max_message_bytes=1024, expect_banner=False)
    assert isinstance(items[0], MalformedMessage) and items[0].reason == "oversized"
    assert isinstance(items[1], AmiMessage) and items[1].event == "Small"


def test_oversized_banner_line() -> None:
    parser = AmiParser(max_message_bytes=128)
    parser.receive_data(b"A" * 1000)
    item = parser.next_event()
    assert isinstance(item, MalformedMessage) and item.reason == "oversized"
    assert parser.buffered <= 128


def test_banner_optional_and_truncated_tail() -> None:
    items = parse_all(b"Response: Success\r\nMessage: x\r\n\r\nEvent: Half\r\nChan")
    assert isinstance(items[0], AmiMessage) and items[0].response == "Success"
    assert isinstance(items[1], MalformedMessage) and items[1].reason.startswith("truncated")


def test_eof_flag() -> None:
    parser = AmiParser()
    assert not parser.eof
    parser.receive_data(b"")
    assert parser.eof and parser.next_event() is None
    with pytest.raises(RuntimeError):
        parser.receive_data(b"more")


def test_encode_action_roundtrip() -> None:
    data = encode_action(
        "Originate",
        [("Channel", "SIP/305"), ("Variable", "A=1"), ("Variable", "B=2")],
        action_id="c2d-1",
    )
    assert data.startswith(b"Action: Originate\r\nActionID: c2d-1\r\nChannel: SIP/305\r\n")
    assert data.endswith(b"\r\n\r\n")
    (msg,) = parse_all(data, expect_banner=False)
    assert isinstance(msg, AmiMessage)
    assert msg.getall("Variable") == ["A=1", "B=2"] and msg.variables() == {"A": "1", "B": "2"}
    assert encode_action("Ping", {"X": "y"}) == b"Action: Ping\r\nX: y\r\n\r\n"
    with pytest.raises(ValueError):
        encode_action("Hangup", {"Channel": "SIP/305\r\nAction: Originate"})


def test_md5_login_key() -> None:
    assert md5_login_key("123456789", "secret") == hashlib.md5(b"123456789secret").hexdigest()


def test_message_is_hashable_and_comparable() -> None:
    a = AmiMessage((("Event", "X"),))
    b = AmiMessage((("Event", "X"),))
    assert a.get("event") == "X"  # builds the lazy index on a only
    assert a == b and hash(a) == hash(b)


ALL = b"".join(CAPTURES.values())
EXPECTED = parse_all(ALL)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(ALL)), max_size=40))
def test_any_split_gives_the_same_messages(cuts: list[int]) -> None:
    bounds = [0, *sorted(set(cuts)), len(ALL)]
    parser = AmiParser()
    out: list[Item] = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        if a == b:
            continue
        parser.receive_data(ALL[a:b])
        while (item := parser.next_event()) is not None:
            out.append(item)
    parser.receive_data(b"")
    while (item := parser.next_event()) is not None:
        out.append(item)
    assert out == EXPECTED


garbage_atoms = st.sampled_from(
    [b"\r\n", b"\n", b"\r", b":", b": ", b"Event", b"Response: Follows\r\n", b"--END COMMAND--", b"\xff", b"\x00", b"A"]
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.one_of(st.binary(max_size=300), garbage_atoms), max_size=200),
    st.booleans(),
)
def test_garbage_never_raises_and_buffer_stays_bounded(chunks: list[bytes], banner: bool) -> None:
    limit = 512
    parser = AmiParser(max_message_bytes=limit, expect_banner=banner)
    for chunk in chunks:
        if not chunk:
            continue
        parser.receive_data(chunk)
        while (item := parser.next_event()) is not None:
            assert isinstance(item, AmiMessage | Banner | MalformedMessage)
            if isinstance(item, MalformedMessage):
                assert len(item.raw) <= 200
        assert parser.buffered <= limit + len(chunk)
    parser.receive_data(b"")
    while parser.next_event() is not None:
        pass
    assert parser.buffered == 0
