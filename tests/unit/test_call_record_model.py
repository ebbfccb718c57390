"""The pure call-record core: events folded into Creatio's Call columns, request bodies, UpdateCall answers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ami_gateway.call_record_model import (
    CallRecord,
    RecordOwner,
    apply,
    iso,
    msgutil_body,
    odata_body,
    parse_update_call_answer,
    proposed_uid,
)
from services.config import ConfigError, load_settings, parse_call_records, site_root
from services.wire import Call, CallState, Direction, EventType, LineEvent
from ws_node import creatio_protocol as cp

OWNER = RecordOwner(contact="4a3c1f8e-0d2b-4c5a-9e7f-1b2c3d4e5f60", site="https://crm.example.com")
T0 = 1_800_000_000.0


def call(state: CallState, **kw: Any) -> Call:
    values: dict[str, Any] = {"id": "17.1:305", "line": "305", "linked_id": "17.1", "channel": "SIP/305-1",
                              "direction": Direction.INBOUND, "state": state, "caller_number": "79161112233",
                              "called_number": "305", "started_at": T0}
    values.update(kw)
    return Call(**values)


def fold(events: list[tuple[EventType, Call, float]], owner: RecordOwner | None = OWNER) -> CallRecord | None:
    record: CallRecord | None = None
    for kind, c, at in events:
        record = apply(record, LineEvent("305", kind, call=c, ami_received_at=at), owner=owner, prefix="p")
    return record


def test_answered_held_call_columns() -> None:
    a = T0 + 2.4
    record = fold([
        (EventType.RING_STARTED, call(CallState.RINGING), T0),
        (EventType.COMMUTATION_STARTED, call(CallState.CONNECTED, answered_at=a), a),
        (EventType.HOLD_STARTED, call(CallState.HELD, answered_at=a), T0 + 10),
        (EventType.HOLD_ENDED, call(CallState.CONNECTED, answered_at=a), T0 + 15),
        (EventType.HOLD_STARTED, call(CallState.HELD, answered_at=a), T0 + 20),
        # ends while on hold: the open hold is closed by the end
        (EventType.RING_FINISHED, call(CallState.FINISHED, answered_at=a, ended_at=T0 + 30), T0 + 30),
    ])
    assert record is not None and record.ended
    cols = record.columns()
    assert (cols["Duration"], cols["BeforeConnectionTime"], cols["TalkTime"], cols["HoldTime"]) == (30, 2, 13, 15)
    assert cols["DirectionId"] == cp.CreatioCallDirection.IN.value
    assert cols["CreatedById"] == OWNER.contact
    assert cols["IntegrationId"] == "17.1:305"
    assert cols["StartDate"] == "2027-01-15T08:00:00.000Z" and cols["EndDate"] == "2027-01-15T08:00:30.000Z"
    assert record.version == 6


def test_missed_and_busy_calls() -> None:
    missed = fold([
        (EventType.RING_STARTED, call(CallState.RINGING), T0),
        (EventType.RING_FINISHED, call(CallState.FINISHED, ended_at=T0 + 9), T0 + 9),
    ])
    assert missed is not None
    assert (missed.columns()["TalkTime"], missed.columns()["BeforeConnectionTime"]) == (0, 9)
    busy = fold([
        (EventType.RING_STARTED, call(CallState.RINGING, direction=Direction.OUTBOUND, caller_number="305",
                                      called_number="84951234567"), T0),
        (EventType.ABONENT_BUSY, call(CallState.BUSY, direction=Direction.OUTBOUND, caller_number="305",
                                      called_number="84951234567"), T0 + 4),
        (EventType.RING_FINISHED, call(CallState.FINISHED, direction=Direction.OUTBOUND, caller_number="305",
                                       called_number="84951234567", ended_at=T0 + 7), T0 + 7),
    ])
    assert busy is not None
    cols = busy.columns()
    assert cols["Duration"] == 4 and cols["TalkTime"] == 0  # the end is the busy signal
    assert cols["DirectionId"] == cp.CreatioCallDirection.OUT.value
    assert (cols["CallerId"], cols["CalledId"]) == ("305", "84951234567")


def test_no_owner_no_record_and_own_events_change_nothing() -> None:
    assert fold([(EventType.RING_STARTED, call(CallState.RINGING), T0)], owner=None) is None
    record = fold([(EventType.RING_STARTED, call(CallState.RINGING), T0)])
    assert record is not None
    saved = LineEvent("305", EventType.CALL_SAVED, call=call(CallState.RINGING, database_uid="x"))
    assert apply(record, saved, owner=OWNER, prefix="p") is record
    # an event that changes nothing keeps the version (no needless write)
    again = LineEvent("305", EventType.CALL_INFO_CHANGED, call=call(CallState.RINGING), ami_received_at=T0)
    assert apply(record, again, owner=OWNER, prefix="p") == record


def test_numbers_are_sticky_and_transfer_numbers_arrive() -> None:
    record = fold([
        (EventType.RING_STARTED, call(CallState.RINGING), T0),
        (EventType.CALL_INFO_CHANGED, call(CallState.RINGING, caller_number="", redirecting_number="306",
                                           redirection_number="305"), T0 + 1),
    ])
    assert record is not None
    cols = record.columns()
    assert (cols["CallerId"], cols["RedirectingId"], cols["RedirectionId"]) == ("79161112233", "306", "305")


def test_record_ids_are_stable_and_survive_json() -> None:
    record = fold([(EventType.RING_STARTED, call(CallState.RINGING), T0)])
    assert record is not None
    assert record.proposed_uid == proposed_uid("p", "17.1:305") != proposed_uid("q", "17.1:305")
    assert CallRecord.from_json(record.to_json()) == record


def test_bodies() -> None:
    record = fold([(EventType.RING_STARTED, call(CallState.RINGING), T0)])
    assert record is not None
    body = msgutil_body(record, parent_uid="")
    assert body["id"] == cp.call_guid("17.1:305")
    assert body["databaseUId"] == record.proposed_uid
    assert body["userContactUId"] == OWNER.contact and body["deviceId"] == "305"
    assert body["endDate"] is None and body["parentCallId"] is None
    json.dumps(body)
    create = odata_body(record, "1b2c3d4e-0000-4000-8000-000000000000", create=True)
    assert create["Id"] == record.proposed_uid and create["ParentCallId"].startswith("1b2c3d4e")
    assert "Id" not in odata_body(record, create=False)


@pytest.mark.parametrize(
    ("answer", "uid"),
    [('"4A3C1F8E-0D2B-4C5A-9E7F-1B2C3D4E5F60"', "4a3c1f8e-0d2b-4c5a-9e7f-1b2c3d4e5f60"),
     ("4a3c1f8e-0d2b-4c5a-9e7f-1b2c3d4e5f60", "4a3c1f8e-0d2b-4c5a-9e7f-1b2c3d4e5f60"),
     ('{"UpdateCallResult": "4a3c1f8e-0d2b-4c5a-9e7f-1b2c3d4e5f60"}', "4a3c1f8e-0d2b-4c5a-9e7f-1b2c3d4e5f60")],
)
def test_update_call_answers(answer: str, uid: str) -> None:
    assert parse_update_call_answer(answer) == uid


@pytest.mark.parametrize("answer", ['"Object reference not set"', "", "null", '"not-a-guid"'])
def test_update_call_errors(answer: str) -> None:
    with pytest.raises(ValueError):
        parse_update_call_answer(answer)


def test_iso_has_milliseconds() -> None:
    assert iso(T0 + 0.25) == "2027-01-15T08:00:00.250Z"


# ---- the CallRecords configuration block ------------------------------------------------------------


def test_config_absent_is_off(tmp_path: Any) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"Asterisk": {"url": "pbx", "userName": "cms"}}))
    assert not load_settings(path, env={}).call_records.enabled


def test_config_block_and_env_password(tmp_path: Any) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"Asterisk": {"url": "pbx", "userName": "cms"},
                                "CallRecords": {"siteUrl": "https://crm.example.com/0/", "userName": "svc",
                                                "api": "OData"}}))
    cfg = load_settings(path, env={"CMS_CALL_RECORDS_PASSWORD": "s3cret"}).call_records
    assert cfg.enabled and cfg.site_url == "https://crm.example.com" and cfg.api == "odata"
    assert cfg.password == "s3cret" and "s3cret" not in repr(cfg) and "s3cret" not in str(cfg.redacted())


@pytest.mark.parametrize(
    ("block", "names"),
    [({"userName": "svc", "password": "x"}, "CallRecords.siteUrl"),
     ({"siteUrl": "https://crm", "password": "x"}, "CallRecords.userName"),
     ({"siteUrl": "https://crm", "userName": "svc"}, "CallRecords.password"),
     ({"siteUrl": "https://crm", "userName": "svc", "password": "x", "api": "soap"}, "CallRecords.api"),
     ({"siteUrl": "ftp://crm", "userName": "svc", "password": "x"}, "CallRecords.siteUrl"),
     ({"siteUrl": "https://crm", "userName": "svc", "password": "x", "sitUrl": "y"}, "siturl")],
)
def test_config_errors_name_the_key(block: dict[str, Any], names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        parse_call_records(block, {})


def test_disabled_block_needs_nothing() -> None:
    assert not parse_call_records({"enabled": "false"}, {}).enabled


def test_site_root() -> None:
    assert site_root(" https://crm.example.com:8443/0/ ", "k") == "https://crm.example.com:8443"
    with pytest.raises(ConfigError):
        site_root("https://crm.example.com/0?x=1", "k")
