"""What the agent's client gets from call records: CALL_SAVED_IN_DB, databaseUId, CALL_SAVING_ERROR; and the
record owner the node passes on from OpenConnection."""

from __future__ import annotations

import json
from typing import Any

from services.wire import (
    Call,
    CallState,
    Command,
    CommandName,
    CommandResult,
    Direction,
    EventType,
    LineEvent,
    RecordOwnerArgs,
)
from ws_node import creatio_protocol as cp
from ws_node.agent_session import AgentSession

UID = "0f1e2d3c-4b5a-4968-8776-655443322110"


def call(call_id: str = "17.1:305", state: CallState = CallState.CONNECTED, **kw: Any) -> Call:
    return Call(id=call_id, line="305", linked_id="17.1", channel="SIP/305-1", direction=Direction.INBOUND,
                state=state, caller_number="79161112233", started_at=1.0, **kw)


def decoded(frame: str) -> tuple[int, Any]:
    envelope = json.loads(frame)
    return envelope["eventType"], json.loads(envelope["content"])


def test_call_saved_is_call_saved_in_db_with_the_record_id() -> None:
    frames = cp.line_event_to_frames(LineEvent("305", EventType.CALL_SAVED, call=call(database_uid=UID)), "conn")
    assert len(frames) == 1
    kind, content = decoded(frames[0])
    assert kind == cp.MsgEventType.CALL_SAVED_IN_DB == 15
    assert content["databaseUId"] == UID and content["id"] == cp.call_guid("17.1:305")


def test_later_call_objects_carry_the_record_id_and_info_changes_go_out_with_several_calls() -> None:
    other = call("17.2:305", state=CallState.HELD)
    unsaved = cp.line_event_to_frames(LineEvent("305", EventType.CALL_INFO_CHANGED, call=call()), "c",
                                      other_calls=[other])
    assert unsaved == []  # without databaseUId the client could match the wrong call
    frames = cp.line_event_to_frames(LineEvent("305", EventType.CALL_INFO_CHANGED, call=call(database_uid=UID)),
                                     "c", other_calls=[other])
    kind, content = decoded(frames[0])
    assert kind == cp.MsgEventType.CALL_INFO_CHANGED and content["databaseUId"] == UID
    ring = cp.line_event_to_frames(LineEvent("305", EventType.HOLD_STARTED, call=call(database_uid=UID)), "c")
    assert decoded(ring[0])[1]["databaseUId"] == UID
    snapshot = json.loads(cp.snapshot_frame([call(database_uid=UID)], None, "c"))
    assert json.loads(snapshot["content"])["ActiveCalls"][0]["databaseUId"] == UID


def test_save_failed_is_a_call_saving_error() -> None:
    frames = cp.line_event_to_frames(
        LineEvent("305", EventType.CALL_SAVE_FAILED, call=call(state=CallState.FINISHED)), "c")
    kind, content = decoded(frames[0])
    assert kind == cp.MsgEventType.ERROR
    assert content["errorType"] == cp.MsgErrorType.CALL_SAVING_ERROR == 7
    assert "79161112233" in content["data"]


class Env:
    def __init__(self) -> None:
        self.frames: list[str] = []
        self.commands: list[Command] = []

    def send_frame(self, text: str) -> None:
        self.frames.append(text)

    def claim_line(self, session: AgentSession, line: str) -> None: ...

    def release_line(self, session: AgentSession, line: str) -> None: ...

    def request_snapshot(self, session: AgentSession, line: str) -> None: ...

    def request_agent_state(self, session: AgentSession, line: str) -> None: ...

    def submit_command(self, session: AgentSession, command: Command) -> None:
        self.commands.append(command)

    def close(self, code: int, reason: str) -> None: ...


def open_frame(session_params: dict[str, str]) -> str:
    return json.dumps({"command": "OpenConnection", "commandUId": "", "parameters": {
        "connectionParams": json.dumps({"ExtensionName": "305"}),
        "sessionServiceParams": json.dumps(session_params)}})


def test_open_connection_names_the_lines_record_owner_once() -> None:
    env = Env()
    session = AgentSession(env, clock=lambda: 5.0)
    session.on_text(json.dumps({"command": "LoadLibrary", "commandUId": ""}))
    params = {"UserUId": "u-1", "UserContactUId": "c0ffee00-0000-4000-8000-000000000001",
              "ServiceUrl": "https://crm.example.com/0"}
    session.on_text(open_frame(params))
    session.on_text(open_frame(params))  # the client repeats OpenConnection: the line is not claimed again
    assert [c.name for c in env.commands] == [CommandName.RECORD_OWNER]
    owner = env.commands[0]
    assert owner.line == "305" and owner.args == RecordOwnerArgs(
        contact="c0ffee00-0000-4000-8000-000000000001", service_url="https://crm.example.com/0", user="u-1")
    # a refusal (site not allowed...) reaches the agent as a call-saving error
    env.frames.clear()
    session.on_command_result(CommandResult(owner.id, False, "call records: not allowed"), owner)
    kind, content = decoded(env.frames[-1])
    assert kind == cp.MsgEventType.ERROR and content["errorType"] == cp.MsgErrorType.CALL_SAVING_ERROR


def test_no_contact_no_owner() -> None:
    env = Env()
    session = AgentSession(env)
    session.on_text(json.dumps({"command": "LoadLibrary", "commandUId": ""}))
    session.on_text(open_frame({"UserUId": "u-1"}))
    assert env.commands == []
