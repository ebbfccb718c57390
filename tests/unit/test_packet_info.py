from __future__ import annotations

import pytest

from ami_gateway.packet_info import PacketInfoError, PacketInfoItem, Source, parse_packet_info


def test_example_from_the_docs() -> None:
    spec = parse_packet_info("header:AccountCode=account; var:CRM_ID=crmId; header:Queue")
    assert spec.items == (
        PacketInfoItem(Source.HEADER, "AccountCode", "account"),
        PacketInfoItem(Source.VAR, "CRM_ID", "crmId"),
        PacketInfoItem(Source.HEADER, "Queue", "Queue"),
    )
    assert [i.key for i in spec.headers] == ["account", "Queue"]
    assert [i.key for i in spec.variables] == ["crmId"]


def test_empty_and_whitespace() -> None:
    assert not parse_packet_info("")
    assert not parse_packet_info(" ; ;")
    spec = parse_packet_info("  HEADER : Exten = did ;;v:X;")
    assert spec.items == (PacketInfoItem(Source.HEADER, "Exten", "did"), PacketInfoItem(Source.VAR, "X", "X"))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("AccountCode", "item 1 ('AccountCode')"),
        ("header:A;cookie:B", "item 2 ('cookie:B'): unknown source"),
        ("header:", "item 1"),
        ("header:A b", "not a valid header name"),
        ("var:X=", "not a valid key"),
        ("var:X=1abc", "not a valid key"),
        ("header:A=k;var:B=k", "key 'k' is already used by item 1"),
        ("header:Queue;header:Queue", "already used"),
    ],
)
def test_errors_name_the_item(text: str, fragment: str) -> None:
    with pytest.raises(PacketInfoError) as info:
        parse_packet_info(text)
    assert fragment in str(info.value)
