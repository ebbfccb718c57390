"""The Creatio wire codec, checked against what the client's source reads."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.wire import AgentState, Call, CallState, Direction, EventType, LineEvent
from ws_node import creatio_protocol as cp
from ws_node.creatio_protocol import (
    CallFeaturesSet,
    ClientCommand,
    CreatioCallDirection,
    MsgErrorType,
    MsgEventType,
    ProtocolError,
)

LINE = "101"
UID = cp.connection_uid_for_line(LINE)

# The client's own Terrasoft.Telephony.Call declares exactly these properties; any other key
# in a call object is an error in the client (BaseObject._validateConfig).
CALL_CLASS_PROPERTIES = {
    "id", "databaseUId", "userContactUId", "callFeaturesSet", "parentCall", "deviceId", "callerId",
    "calledId", "direction", "callContext", "callContextType", "startTime", "endTime", "state", "oldState",
    "stateCause", "oldData", "identificationFieldsData", "needSaveIdentificationData", "isSavedInDB",
    "currentHoldStartTime", "totalHoldDuration", "connectionStartTime", "currentTalkStartTime",
    "totalTalkDuration", "redirectingId", "redirectionId", "timeStamp", "ctiProvider",
}


def make_call(**kw: Any) -> Call:
    base: dict[str, Any] = dict(
        id="1718000000.42",
        line=LINE,
        linked_id="1718000000.41",
        channel="PJSIP/101-00000001",
        direction=Direction.INBOUND,
        state=CallState.RINGING,
        caller_number="+74951234567",
        called_number="101",
        started_at=1718000000.0,
    )
    base.update(kw)
    return Call(**base)


def envelope(frame: str) -> dict[str, Any]:
    """Parse a frame the way the client does: Ext.decode, then check eventType is a number."""
    msg = json.loads(frame)
    assert isinstance(msg, dict)
    assert isinstance(msg["eventType"], int)
    return msg


def client_decode(content: Any) -> Any:
    """Terrasoft.decode: JSON.parse for strings, the value itself otherwise."""
    return json.loads(content) if isinstance(content, str) else content


# --------------------------------------------------------------------------------------
# enums
# --------------------------------------------------------------------------------------


def test_event_numbers_match_client() -> None:
    expected = {
        "NONE": 0, "LIBRARY_INITIALIZED": 1, "CONNECTION_CREATED": 2, "ERROR": 3, "COMMAND_INFO": 4,
        "RING_STARTED": 5, "RING_FINISHED": 6, "COMMUTATION_STARTED": 7, "PUT_HOLD_ACTION": 8,
        "END_HOLD_ACTION": 9, "ACTIVE_CALL_SNAPSHOT": 10, "LINE_STATE_CHANGED": 11,
        "AGENT_STATE_CHANGED": 12, "ABONENT_BUSY": 13, "DISCONNECTED": 14, "CALL_SAVED_IN_DB": 15,
        "RAW_DATA": 16, "CALL_INFO_CHANGED": 17, "DTMF_ENTERED": 18,
    }
    assert {m.name: m.value for m in MsgEventType} == expected


def test_error_and_state_numbers_match_client() -> None:
    assert [(m.name, m.value) for m in MsgErrorType] == [
        ("GENERAL_ERROR", 0), ("LOAD_LIBRARY_ERROR", 1), ("OPEN_CONNECTION_ERROR", 2), ("COMMAND_ERROR", 3),
        ("COMMAND_NOT_IMPLEMENTED_ERROR", 4), ("CALL_CENTRE_NOT_AVAILABLE_ERROR", 5),
        ("AUTHENTICATION_ERROR", 6), ("CALL_SAVING_ERROR", 7), ("EVENT_HANDLER_ERROR", 8),
        ("CONNECTION_CONFIG_ERROR", 9),
    ]
    assert [(m.name, m.value) for m in cp.GeneralizedCallState] == [
        ("NONE", 0), ("ALERTING", 1), ("CONNECTED", 2), ("HOLDED", 3), ("CONFERENCED", 4),
        ("UNKNOWN", 5), ("BUSY", 6),
    ]
    assert CallFeaturesSet.CAN_CANCEL_COMPLETE_TRANSFER == 0x2000
    assert CallFeaturesSet.CAN_MUTE == 0x1000
    assert cp.AgentFeaturesSet.CAN_GET_CALL_RECORDS == 4
    assert CreatioCallDirection.IN == "1d96a65f-2131-4916-8825-2d142b1000b2"
    assert CreatioCallDirection.OUT == "53f71b5f-7e17-4cf5-bf14-6a59212db422"


def test_every_client_command_is_known() -> None:
    names = {
        "LoadLibrary", "OpenConnection", "RegisterConnectionSession", "CloseConnection", "MakeCall", "Hookup",
        "ProcessLogs", "AnswerCall", "HoldCall", "DropCall", "SetupTransferCall", "MakeConsultCall",
        "TransferCall", "CancelTransfer", "BlindTransferCall", "SetDnd", "QueryLineState",
        "QueryActiveCallSnapshot", "SetMsgUserState", "QueryMsgUserState", "LibrarySpecificService",
        "PostRawData", "SendDtmf", "SetLogFilePath", "SetWrapUpUserState",
    }
    assert {c.value for c in cp.CtiCommand} == names


# --------------------------------------------------------------------------------------
# decoding client frames
# --------------------------------------------------------------------------------------


def client_frame(command: str, parameters: dict[str, Any] | None = None, executor: Call | None = None) -> str:
    """What MsgServiceCtiProvider.postCommand puts on the wire (MsgCommandInfo.serialize)."""
    msg: dict[str, Any] = {
        "commandUId": "",
        "command": command,
        "libraryInstanceUId": "lib-uid",
        "connectionUId": UID,
        "commandExecutorId": "",
        "commandExecutorType": "",
    }
    if executor is not None:
        obj = cp.call_to_creatio(executor)
        msg["commandExecutorId"] = obj["id"]
        msg["commandExecutorType"] = cp.EXECUTOR_TYPE_CALL
        msg["commandExecutor"] = json.dumps(obj)
    if parameters is not None:
        msg["parameters"] = parameters
    return json.dumps(msg)


def test_decode_open_connection_json_in_json() -> None:
    text = client_frame(
        "OpenConnection",
        {
            "connectionParams": json.dumps({"ExtensionName": "101", "debugMode": True}),
            "sessionServiceParams": json.dumps({"UserUId": "u", "UserContactUId": "c", "ServiceUrl": "x"}),
        },
    )
    cmd = cp.decode_client_message(text, max_bytes=65536)
    assert isinstance(cmd, ClientCommand)
    assert cmd.name == "OpenConnection"
    assert cmd.params["connectionParams"] == {"ExtensionName": "101", "debugMode": True}
    assert cmd.params["sessionServiceParams"]["UserUId"] == "u"
    assert cmd.connection_uid == UID
    assert cmd.library_instance_uid == "lib-uid"
    assert cmd.command_uid == ""
    assert cmd.raw["command"] == "OpenConnection"


def test_decode_call_command_executor() -> None:
    call = make_call()
    cmd = cp.decode_client_message(client_frame("DropCall", None, call), max_bytes=65536)
    assert cmd.params == {}
    assert cmd.executor is not None and cmd.executor["id"] == cp.call_guid(call.id)
    assert cmd.executor_id == cp.call_guid(call.id)


def test_decode_transfer_and_cancel_params() -> None:
    a, b = make_call(), make_call(id="b")
    t = cp.decode_client_message(
        client_frame("TransferCall", {"consultationCall": json.dumps(cp.call_to_creatio(b))}, a), max_bytes=65536
    )
    assert t.params["consultationCall"]["id"] == cp.call_guid("b")
    c = cp.decode_client_message(
        client_frame(
            "CancelTransfer",
            {"currentCall": json.dumps(cp.call_to_creatio(a)), "consultCall": json.dumps(cp.call_to_creatio(b))},
        ),
        max_bytes=65536,
    )
    assert c.params["currentCall"]["id"] == cp.call_guid(a.id)
    assert c.params["consultCall"]["id"] == cp.call_guid("b")


def test_decode_accepts_bytes_and_null_json_in_json() -> None:
    text = client_frame("OpenConnection", {"connectionParams": "null"}).encode()
    assert cp.decode_client_message(text, max_bytes=65536).params["connectionParams"] is None


@pytest.mark.parametrize(
    ("text", "error_type"),
    [
        ("", MsgErrorType.GENERAL_ERROR),
        ("not json", MsgErrorType.GENERAL_ERROR),
        ("[1,2]", MsgErrorType.GENERAL_ERROR),
        ('"LoadLibrary"', MsgErrorType.GENERAL_ERROR),
        ("{}", MsgErrorType.GENERAL_ERROR),
        ('{"command": 5}', MsgErrorType.GENERAL_ERROR),
        ('{"command": ""}', MsgErrorType.GENERAL_ERROR),
        ('{"command": "Reboot"}', MsgErrorType.COMMAND_NOT_IMPLEMENTED_ERROR),
        ('{"command": "MakeCall", "parameters": "x"}', MsgErrorType.COMMAND_ERROR),
        ('{"command": "OpenConnection", "parameters": {"connectionParams": "{bad"}}', MsgErrorType.COMMAND_ERROR),
        ('{"command": "OpenConnection", "parameters": {"connectionParams": "[1]"}}', MsgErrorType.COMMAND_ERROR),
        ('{"command": "OpenConnection", "parameters": {"connectionParams": 7}}', MsgErrorType.COMMAND_ERROR),
        ('{"command": "DropCall", "commandExecutor": "{"}', MsgErrorType.COMMAND_ERROR),
        ('{"command": "DropCall", "commandExecutor": "1"}', MsgErrorType.COMMAND_ERROR),
        (b"\xff\xfe{", MsgErrorType.GENERAL_ERROR),
        ("[" * 100000 + "]" * 100000, MsgErrorType.GENERAL_ERROR),
    ],
)
def test_decode_rejects(text: str | bytes, error_type: MsgErrorType) -> None:
    with pytest.raises(ProtocolError) as info:
        cp.decode_client_message(text, max_bytes=1_000_000)
    assert info.value.error_type is error_type
    assert info.value.message


def test_decode_rejects_deep_nesting_without_recursion_error() -> None:
    with pytest.raises(ProtocolError):
        cp.decode_client_message("[" * 200000, max_bytes=10**6)


def test_decode_size_limit() -> None:
    text = client_frame("MakeCall", {"targetAddress": "1" * 200})
    assert cp.decode_client_message(text, max_bytes=len(text)).name == "MakeCall"
    with pytest.raises(ProtocolError) as info:
        cp.decode_client_message(text, max_bytes=len(text) - 1)
    assert info.value.error_type is MsgErrorType.GENERAL_ERROR
    wide = client_frame("MakeCall", {"targetAddress": "й" * 100})
    size = len(wide.encode())
    with pytest.raises(ProtocolError):
        cp.decode_client_message(wide.replace("\\u0439", "й"), max_bytes=len(wide.replace("\\u0439", "й")))
    assert cp.decode_client_message(wide, max_bytes=size).name == "MakeCall"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(), st.binary(), json_values.map(json.dumps)))
def test_fuzz_decode_any_text(text: str | bytes) -> None:
    try:
        result = cp.decode_client_message(text, max_bytes=4096)
    except ProtocolError as exc:
        assert isinstance(exc.error_type, MsgErrorType)
    else:
        assert isinstance(result, ClientCommand)


command_names = st.sampled_from([c.value for c in cp.CtiCommand] + ["Nope", ""])
param_values = st.one_of(json_values, json_values.map(json.dumps), st.text(max_size=30))


@settings(max_examples=400, deadline=None)
@given(
    st.fixed_dictionaries(
        {"command": st.one_of(command_names, json_values)},
        optional={
            "parameters": st.one_of(
                st.dictionaries(
                    st.sampled_from(sorted(cp.JSON_IN_JSON_PARAMS) + ["targetAddress", "digits", "code"]),
                    param_values,
                    max_size=4,
                ),
                json_values,
            ),
            "commandExecutor": param_values,
            "commandExecutorId": json_values,
            "connectionUId": json_values,
        },
    )
)
def test_fuzz_decode_structured(msg: dict[str, Any]) -> None:
    try:
        result = cp.decode_client_message(json.dumps(msg), max_bytes=1 << 20)
    except ProtocolError as exc:
        assert isinstance(exc.error_type, MsgErrorType)
    else:
        assert result.name in {c.value for c in cp.CtiCommand}
        for key in cp.JSON_IN_JSON_PARAMS.intersection(result.params):
            assert result.params[key] is None or isinstance(result.params[key], dict)


# --------------------------------------------------------------------------------------
# encoding server frames
# --------------------------------------------------------------------------------------


def test_envelope_exact() -> None:
    frame = cp.encode_server_event(MsgEventType.COMMAND_INFO, "x", connection_uid="c")
    assert frame == (
        '{"eventType":4,"content":"x","connectionUId":"c","commandUId":"","contentType":"","privateData":null}'
    )
    frame = cp.encode_server_event(5, {"a": 1}, private_data={"k": True})
    assert json.loads(frame)["content"] == '{"a":1}'
    assert json.loads(frame)["privateData"] == {"k": True}


def test_envelope_is_strict_json() -> None:
    with pytest.raises(ValueError):
        cp.encode_server_event(MsgEventType.ERROR, {"x": float("nan")})


def test_library_initialized_content_is_raw_uid() -> None:
    msg = envelope(cp.library_initialized_frame("3f2504e0-4f89-11d3-9a0c-0305e82c3301"))
    assert msg["eventType"] == 1
    assert msg["content"] == "3f2504e0-4f89-11d3-9a0c-0305e82c3301"


def test_connection_created_uid_in_envelope() -> None:
    msg = envelope(cp.connection_created_frame(UID))
    assert msg["eventType"] == 2
    assert msg["connectionUId"] == UID
    assert msg["commandUId"] == ""


def test_connection_uid_is_a_guid_per_line() -> None:
    assert uuid.UUID(cp.connection_uid_for_line("101"))
    assert cp.connection_uid_for_line("101") == cp.connection_uid_for_line("101")
    assert cp.connection_uid_for_line("101") != cp.connection_uid_for_line("102")


def test_error_frame_content_shape() -> None:
    msg = envelope(cp.error_frame(MsgErrorType.COMMAND_ERROR, "no such call", connection_uid=UID))
    assert msg["eventType"] == 3
    assert client_decode(msg["content"]) == {
        "errorType": 3,
        "internalErrorCode": None,
        "data": "no such call",
        "source": "asterisk-cms",
    }


def test_disconnected_frame() -> None:
    msg = envelope(cp.disconnected_frame("shutdown", reconnect=False))
    assert msg["eventType"] == 14
    assert client_decode(msg["content"]) == "shutdown"
    assert msg["privateData"] == {"ignoreTryReconnection": True}
    assert envelope(cp.disconnected_frame(""))["content"] == '""'  # JSON.parse-able even when empty
    assert envelope(cp.disconnected_frame("x"))["privateData"] is None


def test_agent_state_content_is_json() -> None:
    msg = envelope(cp.agent_state_frame("Paused"))
    assert msg["eventType"] == 12
    assert msg["content"] == '"Paused"'
    assert client_decode(msg["content"]) == "Paused"


# --------------------------------------------------------------------------------------
# call objects
# --------------------------------------------------------------------------------------


def test_call_guid_is_uuid5_of_call_id() -> None:
    guid = cp.call_guid("1718000000.42")
    assert guid == str(uuid.uuid5(cp.CALL_ID_NAMESPACE, "1718000000.42"))
    assert uuid.UUID(guid).version == 5


def test_call_object_inbound_ringing() -> None:
    obj = cp.call_to_creatio(make_call(queue="support", caller_name="Иван", extra={"crm": "7"}))
    assert obj == {
        "id": cp.call_guid("1718000000.42"),
        "deviceId": "101",
        "callerId": "+74951234567",
        "calledId": "101",
        "direction": CreatioCallDirection.IN.value,
        "state": 1,
        "callFeaturesSet": int(CallFeaturesSet.CAN_ANSWER | CallFeaturesSet.CAN_DROP),
        "callContext": '{"queue":"support","callerName":"Иван","linkedId":"1718000000.41","crm":"7"}',
        "callContextType": "application/json",
    }
    assert set(obj) <= CALL_CLASS_PROPERTIES


def test_call_object_outbound_and_redirects() -> None:
    call = make_call(
        direction=Direction.OUTBOUND,
        state=CallState.CONNECTED,
        caller_number="",
        called_number="84951112233",
        redirecting_number="200",
        redirection_number="300",
        linked_id="",
    )
    obj = cp.call_to_creatio(call)
    assert obj["direction"] == CreatioCallDirection.OUT.value
    assert obj["callerId"] == "101"  # the client's getAbonentNumber compares deviceId with callerId
    assert obj["calledId"] == "84951112233"
    assert obj["state"] == 2
    assert obj["redirectingId"] == "200"
    assert obj["redirectionId"] == "300"
    assert "callContext" not in obj
    assert set(obj) <= CALL_CLASS_PROPERTIES


@pytest.mark.parametrize(
    ("caller", "expected"), [("101", CreatioCallDirection.OUT), ("102", CreatioCallDirection.IN)]
)
def test_internal_call_direction(caller: str, expected: CreatioCallDirection) -> None:
    other = "102" if caller == "101" else "101"
    call = make_call(direction=Direction.INTERNAL, caller_number=caller, called_number=other)
    assert cp.creatio_direction(call) is expected


@pytest.mark.parametrize(
    ("state", "number"),
    [
        (CallState.RINGING, 1),
        (CallState.CONNECTED, 2),
        (CallState.HELD, 3),
        (CallState.BUSY, 6),
        (CallState.FINISHED, 0),
    ],
)
def test_state_numbers(state: CallState, number: int) -> None:
    assert cp.call_to_creatio(make_call(state=state))["state"] == number


def test_features() -> None:
    f = cp.call_features
    F = CallFeaturesSet
    assert f(make_call()) == F.CAN_ANSWER | F.CAN_DROP
    assert f(make_call(direction=Direction.OUTBOUND)) == F.CAN_DROP
    connected = make_call(state=CallState.CONNECTED)
    assert f(connected) == F.CAN_DROP | F.CAN_HOLD | F.CAN_DTMF | F.CAN_BLIND_TRANSFER | F.CAN_MAKE_CONSULT_CALL
    assert f(connected, consulting=True) == F.CAN_DROP | F.CAN_HOLD | F.CAN_DTMF | F.CAN_COMPLETE_TRANSFER
    held = make_call(state=CallState.HELD)
    assert f(held) == F.CAN_DROP | F.CAN_UNHOLD | F.CAN_BLIND_TRANSFER | F.CAN_MAKE_CONSULT_CALL
    assert f(held, consulting=True) == F.CAN_DROP | F.CAN_UNHOLD | F.CAN_COMPLETE_TRANSFER
    assert f(make_call(state=CallState.BUSY)) == F.CAN_DROP
    assert f(make_call(state=CallState.FINISHED)) == F.CAN_NOTHING


# --------------------------------------------------------------------------------------
# line events
# --------------------------------------------------------------------------------------


def ev(etype: EventType, call: Call | None = None, **kw: Any) -> LineEvent:
    return LineEvent(line=LINE, type=etype, epoch="1718000000000", seq=1, call=call, **kw)


RING_STARTED_EXACT = (
    '{"eventType":5,"content":"{\\"id\\":\\"6ef62be2-ebe5-5de1-bf5d-cc2867df3806\\",\\"deviceId\\":\\"101\\",'
    '\\"callerId\\":\\"+74951234567\\",\\"calledId\\":\\"101\\",'
    '\\"direction\\":\\"1d96a65f-2131-4916-8825-2d142b1000b2\\",\\"state\\":1,\\"callFeaturesSet\\":12,'
    '\\"callContext\\":\\"{\\\\\\"linkedId\\\\\\":\\\\\\"1718000000.41\\\\\\"}\\",'
    '\\"callContextType\\":\\"application/json\\"}",'
    '"connectionUId":"2d13af33-a0f7-580a-a815-3f4a50d46bd3","commandUId":"","contentType":"","privateData":null}'
)


def test_ring_started_exact_frame() -> None:
    frames = cp.line_event_to_frames(ev(EventType.RING_STARTED, make_call()), UID)
    assert frames == [RING_STARTED_EXACT]
    call = client_decode(envelope(frames[0])["content"])
    assert call["id"] == cp.call_guid("1718000000.42")


@pytest.mark.parametrize(
    ("etype", "state", "number"),
    [
        (EventType.RING_STARTED, CallState.RINGING, 5),
        (EventType.COMMUTATION_STARTED, CallState.CONNECTED, 7),
        (EventType.HOLD_STARTED, CallState.HELD, 8),
        (EventType.HOLD_ENDED, CallState.CONNECTED, 9),
        (EventType.CALL_INFO_CHANGED, CallState.CONNECTED, 17),
        (EventType.ABONENT_BUSY, CallState.BUSY, 13),
    ],
)
def test_call_events_single_call(etype: EventType, state: CallState, number: int) -> None:
    call = make_call(state=state)
    frames = cp.line_event_to_frames(ev(etype, call), UID)
    msg = envelope(frames[0])
    assert msg["eventType"] == number
    assert msg["connectionUId"] == UID
    obj = client_decode(msg["content"])
    assert obj == cp.call_to_creatio(call)
    # busy included: Creatio keeps the busy call, with Drop, until RING_FINISHED (no idle line state yet)
    assert len(frames) == 1


def test_ring_finished_sets_idle_line() -> None:
    frames = cp.line_event_to_frames(ev(EventType.RING_FINISHED, make_call(state=CallState.CONNECTED)), UID)
    assert [envelope(f)["eventType"] for f in frames] == [6, 11]
    assert client_decode(envelope(frames[0])["content"])["state"] == 0
    assert client_decode(envelope(frames[1])["content"]) == {"callFeaturesSet": int(CallFeaturesSet.CAN_DIAL)}


def test_consult_call_updates_other_call_features() -> None:
    main = make_call(state=CallState.HELD)
    consult = make_call(id="c2", direction=Direction.OUTBOUND, state=CallState.CONNECTED, called_number="200")
    frames = cp.line_event_to_frames(ev(EventType.COMMUTATION_STARTED, consult), UID, other_calls=[main])
    assert [envelope(f)["eventType"] for f in frames] == [7, 11]
    obj = client_decode(envelope(frames[0])["content"])
    assert obj["callFeaturesSet"] & CallFeaturesSet.CAN_COMPLETE_TRANSFER
    line_state = client_decode(envelope(frames[1])["content"])
    assert line_state == {
        "callFeaturesSet": int(
            CallFeaturesSet.CAN_DROP | CallFeaturesSet.CAN_UNHOLD | CallFeaturesSet.CAN_COMPLETE_TRANSFER
        ),
        "callId": cp.call_guid(main.id),
    }
    # the consultation ends: the main call offers a new transfer again
    frames = cp.line_event_to_frames(ev(EventType.RING_FINISHED, consult), UID, other_calls=[main])
    assert [envelope(f)["eventType"] for f in frames] == [6, 11]
    assert client_decode(envelope(frames[1])["content"])["callFeaturesSet"] == int(
        CallFeaturesSet.CAN_DROP | CallFeaturesSet.CAN_UNHOLD | CallFeaturesSet.CAN_BLIND_TRANSFER
        | CallFeaturesSet.CAN_MAKE_CONSULT_CALL
    )


def test_call_info_changed_suppressed_with_several_calls() -> None:
    main = make_call(state=CallState.HELD)
    other = make_call(id="c2", state=CallState.CONNECTED)
    assert cp.line_event_to_frames(ev(EventType.CALL_INFO_CHANGED, other), UID, other_calls=[main]) == []


def test_dtmf_content_is_json_string() -> None:
    (frame,) = cp.line_event_to_frames(ev(EventType.DTMF_ENTERED, make_call(), digits="12*"), UID)
    msg = envelope(frame)
    assert msg["eventType"] == 18
    assert msg["content"] == '"12*"'
    # a bare "123" would come out of JSON.parse as a number
    (frame,) = cp.line_event_to_frames(ev(EventType.DTMF_ENTERED, None, digits="123"), UID)
    assert client_decode(envelope(frame)["content"]) == "123"


def test_agent_state_event() -> None:
    codes = cp.AgentStateCodes(ready="Ready", paused="Break")
    paused = ev(EventType.AGENT_STATE_CHANGED, agent=AgentState(line=LINE, paused=True, reason="lunch"))
    (frame,) = cp.line_event_to_frames(paused, UID, agent_codes=codes)
    assert envelope(frame)["eventType"] == 12
    assert client_decode(envelope(frame)["content"]) == "Break"
    ready = ev(EventType.AGENT_STATE_CHANGED, agent=AgentState(line=LINE, paused=False))
    assert client_decode(envelope(cp.line_event_to_frames(ready, UID)[0])["content"]) == "Active"
    assert cp.line_event_to_frames(ev(EventType.AGENT_STATE_CHANGED), UID) == []


def test_call_event_without_call_is_dropped() -> None:
    assert cp.line_event_to_frames(ev(EventType.RING_STARTED), UID) == []


# --------------------------------------------------------------------------------------
# snapshot
# --------------------------------------------------------------------------------------


def test_snapshot_shape() -> None:
    main = make_call(state=CallState.HELD)
    consult = make_call(id="c2", direction=Direction.OUTBOUND, state=CallState.CONNECTED, called_number="200")
    done = make_call(id="gone", state=CallState.FINISHED)
    msg = envelope(cp.snapshot_frame([main, consult, done], main, UID))
    assert msg["eventType"] == 10
    assert msg["connectionUId"] == UID
    content = client_decode(msg["content"])
    assert list(content) == ["ActiveCalls", "CurrentCall"]
    assert [c["id"] for c in content["ActiveCalls"]] == [cp.call_guid(main.id), cp.call_guid("c2")]
    assert content["CurrentCall"] == content["ActiveCalls"][0]
    for obj in content["ActiveCalls"]:
        assert set(obj) <= CALL_CLASS_PROPERTIES
        assert obj["callFeaturesSet"] & CallFeaturesSet.CAN_COMPLETE_TRANSFER


def test_empty_snapshot() -> None:
    msg = envelope(cp.snapshot_frame([], None, UID))
    assert client_decode(msg["content"]) == {"ActiveCalls": [], "CurrentCall": None}


def test_snapshot_adds_current_if_missing() -> None:
    cur = make_call(state=CallState.CONNECTED)
    content = client_decode(envelope(cp.snapshot_frame([], cur, UID))["content"])
    assert content["ActiveCalls"] == [content["CurrentCall"]]
