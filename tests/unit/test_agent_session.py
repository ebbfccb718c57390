"""AgentSession flows against an in-memory SessionEnvironment (a double for the I/O shell)."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.config import AsteriskConfig
from services.line_access import SecurityConfig, UserAssignment
from services.wire import (
    AgentState,
    Call,
    CallArgs,
    CallState,
    Command,
    CommandName,
    CommandResult,
    DialArgs,
    Direction,
    DtmfArgs,
    EventType,
    LineEvent,
    PauseArgs,
    TransferArgs,
    TransferPairArgs,
    WrapUpArgs,
)
from ws_node import creatio_protocol as cp
from ws_node.agent_session import AgentSession, FrameMemo, SessionOptions, SessionState
from ws_node.creatio_protocol import CallFeaturesSet, MsgErrorType

LINE = "101"
#: what the administrator allows the sessions of these tests: user-1's debugging, a few contexts
ASTERISK = AsteriskConfig(
    originate_context="from-internal", allowed_originate_contexts=("from-creatio", "from-crm", "vip")
)
SECURITY = SecurityConfig(users=(UserAssignment("user-1", LINE, debug=True), UserAssignment("user-1", "102")))
OPTIONS = SessionOptions(asterisk=ASTERISK, security=SECURITY)


class FakeEnv:
    def __init__(self) -> None:
        self.frames: list[str] = []
        self.claimed: list[str] = []
        self.released: list[str] = []
        self.snapshots: list[str] = []
        self.agent_queries: list[str] = []
        self.commands: list[Command] = []
        #: RECORD_OWNER commands (sent on every line claim) kept apart from the agent's own
        self.owner_commands: list[Command] = []
        self.closed: list[tuple[int, str]] = []

    def send_frame(self, text: str) -> None:
        self.frames.append(text)

    def claim_line(self, session: AgentSession, line: str) -> None:
        self.claimed.append(line)

    def release_line(self, session: AgentSession, line: str) -> None:
        self.released.append(line)

    def request_snapshot(self, session: AgentSession, line: str) -> None:
        self.snapshots.append(line)

    def request_agent_state(self, session: AgentSession, line: str) -> None:
        self.agent_queries.append(line)

    def submit_command(self, session: AgentSession, command: Command) -> None:
        if command.name is CommandName.RECORD_OWNER:
            self.owner_commands.append(command)
            return
        self.commands.append(command)

    def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))

    def take(self) -> list[dict[str, Any]]:
        out = [json.loads(f) for f in self.frames]
        self.frames.clear()
        return out


def content(msg: dict[str, Any]) -> Any:
    c = msg["content"]
    return json.loads(c) if isinstance(c, str) else c


def make_call(**kw: Any) -> Call:
    base: dict[str, Any] = dict(
        id="a1", line=LINE, linked_id="a1", channel="PJSIP/101-1", direction=Direction.INBOUND,
        state=CallState.RINGING, caller_number="+74951234567", called_number=LINE, started_at=100.0,
    )
    base.update(kw)
    return Call(**base)


def cmd(command: str, parameters: dict[str, Any] | None = None, executor: Call | None = None, **extra: Any) -> str:
    msg: dict[str, Any] = {
        "commandUId": "", "command": command, "libraryInstanceUId": "", "connectionUId": "",
        "commandExecutorId": "", "commandExecutorType": "",
    }
    if executor is not None:
        obj = cp.call_to_creatio(executor)
        msg["commandExecutorId"] = obj["id"]
        msg["commandExecutorType"] = cp.EXECUTOR_TYPE_CALL
        msg["commandExecutor"] = json.dumps(obj)
    if parameters is not None:
        msg["parameters"] = parameters
    msg.update(extra)
    return json.dumps(msg)


def open_cmd(line: str = LINE, **params: Any) -> str:
    return cmd(
        "OpenConnection",
        {
            "connectionParams": json.dumps({"ExtensionName": line, **params}),
            "sessionServiceParams": json.dumps({"UserUId": "user-1", "UserContactUId": "c", "ServiceUrl": "x"}),
        },
    )


def new_session(**kw: Any) -> tuple[AgentSession, FakeEnv]:
    env = FakeEnv()
    ids = itertools.count(1)
    kw.setdefault("options", OPTIONS)
    session = AgentSession(env, clock=lambda: 1000.0, new_id=lambda: f"cmd-{next(ids)}", **kw)
    return session, env


def opened(**params: Any) -> tuple[AgentSession, FakeEnv]:
    session, env = new_session()
    session.on_text(cmd("LoadLibrary", {"AssemblyName": "Terrasoft.Messaging.Asterisk"}))
    session.on_text(open_cmd(**params))
    session.on_claimed([])  # what the shell does once it follows the line (no gap)
    env.take()
    return session, env


def with_calls(*calls: Call) -> tuple[AgentSession, FakeEnv]:
    session, env = opened()
    session.on_snapshot(list(calls))
    env.take()
    return session, env


def only_error(env: FakeEnv) -> dict[str, Any]:
    msgs = env.take()
    assert len(msgs) == 1 and msgs[0]["eventType"] == 3, msgs
    err: dict[str, Any] = content(msgs[0])
    return err


# --------------------------------------------------------------------------------------
# handshake
# --------------------------------------------------------------------------------------


def test_load_library_then_open_connection() -> None:
    session, env = new_session()
    session.on_text(cmd("LoadLibrary", {"AssemblyName": "x"}))
    (lib,) = env.take()
    assert lib["eventType"] == 1
    assert lib["content"] == session.library_instance_uid  # raw, not JSON
    assert session.state is SessionState.LIBRARY

    session.on_text(open_cmd(OriginateContext="from-creatio", debugMode=True))
    (created,) = env.take()
    assert created["eventType"] == 2
    assert created["connectionUId"] == cp.connection_uid_for_line(LINE)
    assert session.state is SessionState.OPEN
    assert session.line == LINE
    assert session.originate_context == "from-creatio"
    assert session.debug_mode is True
    assert session.user_uid == "user-1"
    assert env.claimed == [LINE]


def test_repeated_load_library_and_open_connection() -> None:
    session, env = opened()
    uid = session.library_instance_uid
    session.on_text(cmd("LoadLibrary"))
    assert env.take()[0]["content"] == uid
    session.on_text(open_cmd())
    assert [m["eventType"] for m in env.take()] == [2]
    assert env.claimed == [LINE]  # not claimed twice
    assert session.state is SessionState.OPEN


def test_open_connection_other_line_switches() -> None:
    session, env = opened()
    session.on_snapshot([make_call()])
    session.on_text(open_cmd("102"))
    assert env.released == [LINE]
    assert env.claimed == [LINE, "102"]
    assert session.calls == []
    assert env.take()[-1]["connectionUId"] == cp.connection_uid_for_line("102")


@pytest.mark.parametrize(
    "params",
    [
        {"ExtensionName": ""},
        {"ExtensionName": "10 1"},
        {"ExtensionName": "101.1"},
        {"ExtensionName": "1" * 33},
        {"ExtensionName": 101},
        {},
        {"ExtensionName": "101", "OriginateContext": "bad context"},
    ],
)
def test_open_connection_bad_config(params: dict[str, Any]) -> None:
    session, env = new_session()
    session.on_text(cmd("OpenConnection", {"connectionParams": json.dumps(params)}))
    err = only_error(env)
    assert err["errorType"] == MsgErrorType.CONNECTION_CONFIG_ERROR
    assert session.state is SessionState.NEW
    assert env.claimed == []


def test_open_connection_key_case_insensitive() -> None:
    session, env = new_session()
    session.on_text(cmd("OpenConnection", {"connectionParams": json.dumps({"extensionName": "7001"})}))
    assert session.line == "7001"


def test_commands_before_open_are_refused() -> None:
    session, env = new_session()
    session.on_text(cmd("MakeCall", {"targetAddress": "200"}))
    assert only_error(env)["errorType"] == MsgErrorType.COMMAND_ERROR
    session.on_text(cmd("QueryActiveCallSnapshot"))
    assert only_error(env)["errorType"] == MsgErrorType.COMMAND_ERROR
    assert env.commands == [] and env.snapshots == []


@pytest.mark.parametrize(
    ("text", "error_type"),
    [
        ("garbage", MsgErrorType.GENERAL_ERROR),
        ('{"command":"Reboot"}', MsgErrorType.COMMAND_NOT_IMPLEMENTED_ERROR),
        ('{"command":"OpenConnection","parameters":{"connectionParams":"{"}}', MsgErrorType.COMMAND_ERROR),
    ],
)
def test_malformed_frames_become_errors(text: str, error_type: MsgErrorType) -> None:
    session, env = opened()
    session.on_text(text)
    assert only_error(env)["errorType"] == error_type
    assert session.state is SessionState.OPEN


def test_oversized_frame() -> None:
    session, env = opened()
    session._opts = SessionOptions(max_message_bytes=100, asterisk=ASTERISK, security=SECURITY)
    session.on_text(cmd("MakeCall", {"targetAddress": "2" * 200}))
    assert only_error(env)["errorType"] == MsgErrorType.GENERAL_ERROR


# --------------------------------------------------------------------------------------
# snapshot, line state, agent state
# --------------------------------------------------------------------------------------


def test_snapshot_flow() -> None:
    session, env = opened()
    session.on_text(cmd("QueryActiveCallSnapshot"))
    assert env.snapshots == [LINE]
    main = make_call(state=CallState.HELD, started_at=1.0)
    consult = make_call(id="b2", direction=Direction.OUTBOUND, state=CallState.CONNECTED, started_at=2.0)
    foreign = make_call(id="zz", line="999")
    session.on_snapshot([consult, main, foreign], agent=AgentState(line=LINE, paused=True))
    msgs = env.take()
    assert [m["eventType"] for m in msgs] == [10, 12]
    snap = content(msgs[0])
    assert [c["id"] for c in snap["ActiveCalls"]] == [cp.call_guid("a1"), cp.call_guid("b2")]
    assert snap["CurrentCall"]["id"] == cp.call_guid("a1")
    assert content(msgs[1]) == "Paused"
    assert session.current_call == main


def test_empty_snapshot_sets_idle_line() -> None:
    session, env = opened()
    session.on_snapshot([])
    msgs = env.take()
    assert [m["eventType"] for m in msgs] == [10, 11]
    assert content(msgs[1]) == {"callFeaturesSet": int(CallFeaturesSet.CAN_DIAL)}


def test_query_line_state() -> None:
    session, env = opened()
    session.on_text(cmd("QueryLineState"))
    assert content(env.take()[0]) == {"callFeaturesSet": 2}
    session.on_snapshot([make_call(state=CallState.CONNECTED)])
    env.take()
    session.on_text(cmd("QueryLineState"))
    (msg,) = env.take()
    assert msg["eventType"] == 11
    assert content(msg)["callId"] == cp.call_guid("a1")
    assert content(msg)["callFeaturesSet"] & CallFeaturesSet.CAN_HOLD


def test_query_user_state() -> None:
    session, env = opened()
    session.on_text(cmd("QueryMsgUserState"))
    assert env.take() == []  # unknown yet: no guess
    session.on_line_event(LineEvent(line=LINE, type=EventType.AGENT_STATE_CHANGED, agent=AgentState(LINE, False)))
    assert content(env.take()[0]) == "Active"
    session.on_text(cmd("QueryMsgUserState"))
    (msg,) = env.take()
    assert msg["eventType"] == 12 and content(msg) == "Active"


# --------------------------------------------------------------------------------------
# call tracking from events
# --------------------------------------------------------------------------------------


def event(etype: EventType, call: Call | None = None, seq: int = 1, **kw: Any) -> LineEvent:
    return LineEvent(line=LINE, type=etype, epoch="e1", seq=seq, call=call, **kw)


def test_events_are_forwarded_and_tracked() -> None:
    session, env = opened()
    ring = make_call()
    session.on_line_event(event(EventType.RING_STARTED, ring))
    (msg,) = env.take()
    assert msg["eventType"] == 5
    assert content(msg)["id"] == cp.call_guid("a1")
    assert session.calls == [ring]
    talk = ring.evolve(state=CallState.CONNECTED)
    session.on_line_event(event(EventType.COMMUTATION_STARTED, talk, seq=2))
    assert [m["eventType"] for m in env.take()] == [7]
    session.on_line_event(event(EventType.RING_FINISHED, talk.evolve(state=CallState.FINISHED), seq=3))
    assert [m["eventType"] for m in env.take()] == [6, 11]
    assert session.calls == []


def test_events_of_other_lines_or_before_open_are_ignored() -> None:
    session, env = new_session()
    session.on_line_event(event(EventType.RING_STARTED, make_call()))
    assert env.frames == []
    session, env = opened()
    session.on_line_event(LineEvent(line="999", type=EventType.RING_STARTED, call=make_call(line="999")))
    assert env.frames == [] and session.calls == []


def test_consult_flow_line_state_for_main_call() -> None:
    main = make_call(state=CallState.CONNECTED, started_at=1.0)
    session, env = with_calls(main)
    session.on_line_event(event(EventType.HOLD_STARTED, main.evolve(state=CallState.HELD)))
    assert [m["eventType"] for m in env.take()] == [8]
    consult = make_call(id="c2", direction=Direction.OUTBOUND, called_number="200", started_at=2.0)
    session.on_line_event(event(EventType.RING_STARTED, consult, seq=2))
    msgs = env.take()
    assert [m["eventType"] for m in msgs] == [5, 11]
    assert content(msgs[1])["callId"] == cp.call_guid("a1")
    assert content(msgs[1])["callFeaturesSet"] & CallFeaturesSet.CAN_COMPLETE_TRANSFER
    assert session.current_call is not None and session.current_call.id == "a1"


def test_frame_memo_shares_encoding() -> None:
    memo = FrameMemo()
    s1, e1 = new_session(frame_memo=memo)
    s2, e2 = new_session(frame_memo=memo)
    for s, e in ((s1, e1), (s2, e2)):
        s.on_text(open_cmd())
        s.on_claimed([])
        e.take()
    ev = event(EventType.RING_STARTED, make_call())
    s1.on_line_event(ev)
    s2.on_line_event(ev)
    assert e1.frames == e2.frames
    assert e1.frames[0] is e2.frames[0]  # the same str object: encoded once


def test_frame_memo_is_bounded() -> None:
    memo = FrameMemo(max_entries=2)
    for i in range(5):
        memo.get_or_build((i,), lambda: ["x"])
    assert len(memo._entries) == 2


# --------------------------------------------------------------------------------------
# call control
# --------------------------------------------------------------------------------------


def last_command(env: FakeEnv) -> Command:
    assert env.frames == [], env.frames
    assert len(env.commands) == 1, env.commands
    command = env.commands.pop()
    assert command.line == LINE
    assert command.issued_at == 1000.0
    return command


def test_make_call() -> None:
    session, env = opened(OriginateContext="from-crm")
    session.on_text(cmd("MakeCall", {"targetAddress": "+7 (495) 123-45-67"}))
    c = last_command(env)
    assert c.name is CommandName.MAKE_CALL
    assert c.args == DialArgs("+74951234567", context="from-crm")
    assert c.id == "cmd-1"


@pytest.mark.parametrize("target", [None, "", "200;drop", "2" * 65, ["200"]])
def test_make_call_bad_target(target: Any) -> None:
    session, env = opened()
    params = {} if target is None else {"targetAddress": target}
    session.on_text(cmd("MakeCall", params))
    assert only_error(env)["errorType"] == MsgErrorType.COMMAND_ERROR
    assert env.commands == []


def test_default_originate_context() -> None:
    session, env = new_session()
    session.on_text(open_cmd())
    env.take()
    session.on_text(cmd("MakeCall", {"targetAddress": "200"}))
    # the gateway owns the default: only a user's own context travels with a command
    assert last_command(env).args == DialArgs("200")
    session.on_text(open_cmd("102", OriginateContext="vip"))
    env.take()
    assert session.originate_context == "vip"


def test_calls_known_seeds_silently() -> None:
    session, env = opened()
    call = make_call(state=CallState.CONNECTED)
    session.on_calls_known([call, make_call(id="f", state=CallState.FINISHED), make_call(id="o", line="9")])
    assert env.frames == []
    assert session.calls == [call]
    session.on_text(cmd("DropCall", None, call))
    assert last_command(env).args == CallArgs("a1")


def test_snapshot_failed() -> None:
    session, env = opened()
    session.on_snapshot_failed("call state store unavailable: ConnectionError")
    err = only_error(env)
    assert err["errorType"] == MsgErrorType.GENERAL_ERROR
    assert err["data"] == "call state store unavailable: ConnectionError"
    assert session.state is SessionState.OPEN
    fresh, fresh_env = new_session()
    fresh.on_snapshot_failed("x")
    fresh.on_calls_known([make_call()])
    assert fresh_env.frames == [] and fresh.calls == []


def test_answer_drop() -> None:
    call = make_call()
    session, env = with_calls(call)
    session.on_text(cmd("AnswerCall", None, call))
    assert last_command(env) == Command("cmd-1", LINE, CommandName.ANSWER, CallArgs("a1"), 1000.0)
    session.on_text(cmd("DropCall", None, call))
    assert last_command(env).args == CallArgs("a1")


def test_answer_connected_call_refused() -> None:
    call = make_call(state=CallState.CONNECTED)
    session, env = with_calls(call)
    session.on_text(cmd("AnswerCall", None, call))
    assert only_error(env)["errorType"] == MsgErrorType.COMMAND_ERROR


def test_hold_is_a_toggle() -> None:
    call = make_call(state=CallState.CONNECTED)
    session, env = with_calls(call)
    session.on_text(cmd("HoldCall", None, call))
    assert last_command(env).name is CommandName.HOLD
    session.on_line_event(event(EventType.HOLD_STARTED, call.evolve(state=CallState.HELD)))
    env.take()
    session.on_text(cmd("HoldCall", None, call))  # the client's copy may be stale: our state rules
    assert last_command(env).name is CommandName.UNHOLD
    session.on_line_event(event(EventType.HOLD_ENDED, call, seq=2))
    env.take()
    session.on_text(cmd("HoldCall", None, call))
    assert last_command(env).name is CommandName.HOLD


def test_hold_ringing_refused() -> None:
    call = make_call()
    session, env = with_calls(call)
    session.on_text(cmd("HoldCall", None, call))
    assert only_error(env)["errorType"] == MsgErrorType.COMMAND_ERROR


def test_unknown_call_refused() -> None:
    session, env = with_calls(make_call())
    stranger = make_call(id="not-mine")
    for name in ("DropCall", "AnswerCall", "HoldCall"):
        session.on_text(cmd(name, None, stranger))
        err = only_error(env)
        assert err["errorType"] == MsgErrorType.COMMAND_ERROR
        assert "unknown call" in err["data"]
    session.on_text(cmd("DropCall"))  # no executor at all
    assert only_error(env)["errorType"] == MsgErrorType.COMMAND_ERROR
    assert env.commands == []


def test_call_of_another_line_is_not_commandable() -> None:
    session, env = opened()
    session.on_snapshot([make_call(id="x", line="102")])
    env.take()
    session.on_text(cmd("DropCall", None, make_call(id="x", line="102")))
    assert only_error(env)["errorType"] == MsgErrorType.COMMAND_ERROR


def test_executor_id_from_executor_object() -> None:
    call = make_call()
    session, env = with_calls(call)
    text = json.loads(cmd("DropCall", None, call))
    text["commandExecutorId"] = ""
    session.on_text(json.dumps(text))
    assert last_command(env).args == CallArgs("a1")


def test_blind_transfer_and_consult() -> None:
    call = make_call(state=CallState.CONNECTED)
    session, env = with_calls(call)
    session.on_text(cmd("BlindTransferCall", {"targetAddress": "300"}, call))
    c = last_command(env)
    assert (c.name, c.args) == (CommandName.BLIND_TRANSFER, TransferArgs("300", "a1"))
    session.on_text(cmd("MakeConsultCall", {"targetAddress": "301"}, call))
    c = last_command(env)
    assert (c.name, c.args) == (CommandName.CONSULT_CALL, TransferArgs("301", "a1"))


def test_transfer_and_cancel() -> None:
    main = make_call(state=CallState.HELD, started_at=1.0)
    consult = make_call(id="c2", direction=Direction.OUTBOUND, state=CallState.CONNECTED, started_at=2.0)
    session, env = with_calls(main, consult)
    session.on_text(cmd("TransferCall", {"consultationCall": json.dumps(cp.call_to_creatio(consult))}, main))
    c = last_command(env)
    assert (c.name, c.args) == (CommandName.COMPLETE_TRANSFER, TransferPairArgs("a1", "c2"))
    session.on_text(
        cmd(
            "CancelTransfer",
            {
                "currentCall": json.dumps(cp.call_to_creatio(main)),
                "consultCall": json.dumps(cp.call_to_creatio(consult)),
            },
        )
    )
    c = last_command(env)
    assert (c.name, c.args) == (CommandName.CANCEL_TRANSFER, TransferPairArgs("a1", "c2"))


def test_transfer_needs_known_distinct_consult_call() -> None:
    main = make_call(state=CallState.HELD)
    session, env = with_calls(main)
    session.on_text(cmd("TransferCall", {"consultationCall": json.dumps(cp.call_to_creatio(main))}, main))
    assert only_error(env)["errorType"] == MsgErrorType.COMMAND_ERROR
    session.on_text(cmd("TransferCall", {}, main))
    assert only_error(env)["errorType"] == MsgErrorType.COMMAND_ERROR
    session.on_text(cmd("CancelTransfer", {"currentCall": json.dumps(cp.call_to_creatio(main))}))
    assert only_error(env)["errorType"] == MsgErrorType.COMMAND_ERROR


def test_send_dtmf() -> None:
    call = make_call(state=CallState.CONNECTED)
    session, env = with_calls(call)
    session.on_text(cmd("SendDtmf", {"digits": "1#"}, call))
    assert last_command(env).args == DtmfArgs("1#", "a1")
    session.on_text(cmd("SendDtmf", {"digits": 5}, call))
    assert last_command(env).args == DtmfArgs("5", "a1")
    session.on_text(cmd("SendDtmf", {"digits": "1;x"}, call))
    assert only_error(env)["errorType"] == MsgErrorType.COMMAND_ERROR


def test_set_dnd() -> None:
    session, env = opened()
    session.on_text(cmd("SetDnd"))
    assert last_command(env).name is CommandName.SET_DND


def test_agent_states() -> None:
    session, env = opened()
    session.on_snapshot([])  # the line is in no queue: the state re-sent on connect is carried out (rule 8)
    env.take()
    session.on_text(cmd("SetMsgUserState", {"code": "Active", "reason": ""}))
    assert last_command(env).name is CommandName.AGENT_UNPAUSE
    session.on_text(cmd("SetMsgUserState", {"code": "Paused", "reason": "Lunch"}))
    c = last_command(env)
    assert (c.name, c.args) == (CommandName.AGENT_PAUSE, PauseArgs("Lunch", state_code="Paused"))
    session.on_text(cmd("SetMsgUserState", {"code": "Break", "reason": ""}))
    assert last_command(env).args == PauseArgs("Break", state_code="Break")
    session.on_text(cmd("SetMsgUserState", {"code": "WrapUp"}))
    c = last_command(env)
    assert (c.name, c.args) == (CommandName.WRAP_UP, WrapUpArgs(active=True))
    session.on_text(cmd("SetWrapUpUserState", {"isWrapUpActive": False}))
    c = last_command(env)
    assert (c.name, c.args) == (CommandName.WRAP_UP, WrapUpArgs(active=False))
    session.on_text(cmd("SetWrapUpUserState", {"isWrapUpActive": "yes"}))
    assert only_error(env)["errorType"] == MsgErrorType.COMMAND_ERROR
    session.on_text(cmd("SetMsgUserState", {"reason": "x"}))
    assert only_error(env)["errorType"] == MsgErrorType.COMMAND_ERROR


def test_call_centre_disabled() -> None:
    session, env = opened(disableCallCentre=True)
    assert session.call_centre_enabled is False
    for text in (
        cmd("SetMsgUserState", {"code": "Active"}),
        cmd("SetWrapUpUserState", {"isWrapUpActive": True}),
        cmd("QueryMsgUserState"),
    ):
        session.on_text(text)
        err = only_error(env)
        assert err["errorType"] == MsgErrorType.CALL_CENTRE_NOT_AVAILABLE_ERROR
        assert "call centre" in err["data"]
    session.on_line_event(LineEvent(line=LINE, type=EventType.AGENT_STATE_CHANGED, agent=AgentState(LINE, True)))
    assert env.frames == []
    # call control still works
    session.on_text(cmd("MakeCall", {"targetAddress": "200"}))
    assert last_command(env).name is CommandName.MAKE_CALL


@pytest.mark.parametrize("name", ["ProcessLogs", "SetLogFilePath"])
def test_log_replay_commands_refused(name: str) -> None:
    session, env = opened()
    session.on_text(cmd(name, {"filePath": "/etc/passwd"}))
    err = only_error(env)
    assert err["errorType"] == MsgErrorType.COMMAND_NOT_IMPLEMENTED_ERROR
    assert err["data"].startswith(f"{name} is refused")
    assert env.commands == []


@pytest.mark.parametrize(
    "name", ["Hookup", "SetupTransferCall", "RegisterConnectionSession", "PostRawData", "LibrarySpecificService"]
)
def test_unsupported_commands(name: str) -> None:
    session, env = opened()
    session.on_text(cmd(name))
    assert only_error(env)["errorType"] == MsgErrorType.COMMAND_NOT_IMPLEMENTED_ERROR
    assert env.commands == []


def test_command_result() -> None:
    session, env = opened()
    session.on_text(cmd("MakeCall", {"targetAddress": "200"}))
    command = env.commands.pop()
    session.on_command_result(CommandResult(command.id, ok=True), command)
    assert env.frames == []
    session.on_command_result(CommandResult(command.id, ok=False, error="Originate failed: no such extension"), command)
    err = only_error(env)
    assert err == {
        "errorType": 3,
        "internalErrorCode": None,
        "data": "Originate failed: no such extension",
        "source": "asterisk-cms",
    }
    session.on_command_result(CommandResult(command.id, ok=False), command)
    assert "make_call" in only_error(env)["data"]


# --------------------------------------------------------------------------------------
# close
# --------------------------------------------------------------------------------------


def test_close_connection() -> None:
    session, env = with_calls(make_call())
    session.on_text(cmd("CloseConnection"))
    (msg,) = env.take()
    assert msg["eventType"] == 14
    assert msg["privateData"] == {"ignoreTryReconnection": True}
    assert env.released == [LINE]
    assert session.state is SessionState.LIBRARY
    assert session.calls == []
    session.on_text(cmd("MakeCall", {"targetAddress": "200"}))
    assert only_error(env)["errorType"] == MsgErrorType.COMMAND_ERROR
    session.on_text(open_cmd())
    assert env.claimed == [LINE, LINE]


def test_disconnect_releases_once_and_goes_quiet() -> None:
    session, env = with_calls(make_call())
    session.on_disconnect()
    session.on_disconnect()
    assert env.released == [LINE]
    assert session.state is SessionState.CLOSED
    session.on_text(cmd("LoadLibrary"))
    session.on_line_event(event(EventType.RING_STARTED, make_call()))
    session.on_snapshot([make_call()])
    session.on_command_result(CommandResult("x", ok=False, error="e"), Command("x", LINE, CommandName.HANGUP))
    assert env.frames == [] and env.commands == []


def test_disconnect_before_open() -> None:
    session, env = new_session()
    session.on_disconnect()
    assert env.released == []


# --------------------------------------------------------------------------------------
# fuzz: any frame sequence, never an exception, every answer is a valid frame
# --------------------------------------------------------------------------------------

frames_strategy = st.lists(
    st.one_of(
        st.text(max_size=50),
        st.sampled_from([c.value for c in cp.CtiCommand]).map(lambda n: cmd(n)),
        st.sampled_from([c.value for c in cp.CtiCommand]).flatmap(
            lambda n: st.dictionaries(
                st.sampled_from(["targetAddress", "digits", "code", "reason", "isWrapUpActive", "consultationCall"]),
                st.one_of(st.text(max_size=10), st.integers(), st.booleans(), st.none()),
                max_size=3,
            ).map(lambda p: cmd(n, p, make_call()))
        ),
        st.just(open_cmd()),
    ),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(frames_strategy)
def test_fuzz_session(frames: list[str]) -> None:
    session, env = new_session()
    session.on_snapshot([make_call()])
    for text in frames:
        session.on_text(text)
    for frame in env.frames:
        msg = json.loads(frame)
        assert isinstance(msg["eventType"], int)
        if msg["eventType"] == 3:
            assert isinstance(content(msg)["errorType"], int)
    for command in env.commands:
        assert command.line == LINE


# --------------------------------------------------------------------------------------
# catch-up after a reconnect (missed calls replayed before the snapshot)
# --------------------------------------------------------------------------------------


def claimed_without_catch_up(*, replay: bool = True, **params: Any) -> tuple[AgentSession, FakeEnv]:
    session, env = new_session(options=SessionOptions(replay_missed_calls=replay))
    session.on_text(cmd("LoadLibrary", {"AssemblyName": "x"}))
    session.on_text(open_cmd(**params))
    env.take()
    return session, env


def gap_of_one_call(call_id: str = "gone", first_seq: int = 5) -> list[LineEvent]:
    ring = make_call(id=call_id)
    talk = ring.evolve(state=CallState.CONNECTED)
    end = talk.evolve(state=CallState.FINISHED)
    return [
        event(EventType.RING_STARTED, ring, seq=first_seq),
        event(EventType.COMMUTATION_STARTED, talk, seq=first_seq + 1),
        event(EventType.DTMF_ENTERED, None, seq=first_seq + 2, digits="1"),
        event(EventType.RING_FINISHED, end, seq=first_seq + 3),
    ]


def test_snapshot_waits_for_the_catch_up_and_the_gap_comes_first() -> None:
    session, env = claimed_without_catch_up()
    assert session.catching_up
    session.on_text(cmd("QueryActiveCallSnapshot"))
    assert env.snapshots == [] and env.frames == []  # held until the gap is known

    still_on = make_call(id="still", state=CallState.CONNECTED, started_at=50.0)
    missed = gap_of_one_call() + [event(EventType.RING_STARTED, still_on.evolve(state=CallState.RINGING), seq=9)]
    session.on_claimed([still_on], missed)
    types = [m["eventType"] for m in env.take()]
    # the ended call's story (no DTMF), nothing of the call still on (the snapshot shows it)
    assert types == [5, 7, 6]
    assert session.replayed == 3
    assert env.snapshots == [LINE]  # then the snapshot the client asked for
    assert [c.id for c in session.calls] == ["still"]


def test_replayed_finish_is_a_finished_call() -> None:
    session, env = claimed_without_catch_up()
    missed = gap_of_one_call()
    # a RING_FINISHED whose call still says connected is sent as finished (state NONE)
    missed[-1] = event(EventType.RING_FINISHED, make_call(id="gone", state=CallState.CONNECTED), seq=8)
    session.on_claimed([], missed)
    msgs = env.take()
    assert content(msgs[-1])["state"] == cp.GeneralizedCallState.NONE
    assert all(content(m)["id"] == cp.call_guid("gone") for m in msgs)


def test_live_events_during_catch_up_are_held_and_not_sent_twice() -> None:
    session, env = claimed_without_catch_up()
    gap = gap_of_one_call(first_seq=5)
    # the node got seq 7 and 8 live while Redis was being read: they are held, in order
    session.on_line_event(gap[2])
    session.on_line_event(gap[3])
    assert env.frames == []
    session.on_claimed([], gap)
    types = [m["eventType"] for m in env.take()]
    # replay up to seq 6, then the held live events (DTMF, RING_FINISHED + idle line state)
    assert types == [5, 7, 18, 6, 11]


def test_by_default_a_reconnect_gets_the_snapshot_not_old_rings() -> None:
    session, env = claimed_without_catch_up(replay=False)
    session.on_text(cmd("QueryActiveCallSnapshot"))
    still_on = make_call(id="still", state=CallState.CONNECTED, started_at=50.0)
    missed = gap_of_one_call() + [event(EventType.RING_STARTED, still_on.evolve(state=CallState.RINGING), seq=9)]
    session.on_claimed([still_on], missed)
    assert env.frames == [] and session.replayed == 0  # no phantom ring of the ended call
    assert env.snapshots == [LINE]
    assert [c.id for c in session.calls] == ["still"]
    # live events held during the catch-up still go out, in order; the end of a call the client never
    # saw (it rang in the gap) is not one of them
    session2, env2 = claimed_without_catch_up(replay=False)
    gap = gap_of_one_call(first_seq=5)
    still_live = make_call(id="live", state=CallState.CONNECTED, started_at=40.0)
    session2.on_line_event(gap[3])
    session2.on_line_event(event(EventType.RING_FINISHED, still_live.evolve(state=CallState.FINISHED), seq=9))
    session2.on_claimed([still_live], gap)
    msgs = env2.take()
    assert [m["eventType"] for m in msgs] == [6, 11]
    assert content(msgs[0])["id"] == cp.call_guid("live")


def test_a_call_seen_ringing_before_the_gap_is_closed_not_replayed() -> None:
    """The agent left while call A rang; A ended in the gap, B rang and ended in it. Without the
    full replay the panel must still lose A (its RING_FINISHED) and never hear of B."""
    session, env = claimed_without_catch_up(replay=False)
    seen = make_call(id="seen", state=CallState.RINGING, started_at=10.0)
    missed = [event(EventType.RING_FINISHED, seen.evolve(state=CallState.FINISHED), seq=4)] + gap_of_one_call(
        first_seq=5)
    session.on_claimed([], missed)
    msgs = env.take()
    assert [m["eventType"] for m in msgs] == [6]
    assert content(msgs[0])["id"] == cp.call_guid("seen") and session.replayed == 1


def test_nothing_missed_sends_nothing() -> None:
    session, env = claimed_without_catch_up()
    session.on_claimed([make_call()], [])
    assert env.frames == [] and session.replayed == 0


def test_too_many_held_events_end_the_catch_up() -> None:
    session, env = new_session(options=SessionOptions(max_held_events=2, asterisk=ASTERISK, security=SECURITY))
    session.on_text(open_cmd())
    env.take()
    for seq in (1, 2, 3):
        session.on_line_event(event(EventType.DTMF_ENTERED, None, seq=seq, digits=str(seq)))
    assert not session.catching_up
    assert [content(m) for m in env.take()] == ["1", "2", "3"]
    session.on_claimed([], gap_of_one_call())  # late: ignored
    assert env.frames == []


def test_load_library_keeps_the_tab_uid_across_reconnects() -> None:
    first, env = opened()
    uid = first.library_instance_uid
    again, env2 = new_session()
    again.on_text(cmd("LoadLibrary", {"AssemblyName": "x"}, libraryInstanceUId=uid))
    assert env2.take()[0]["content"] == uid
    again.on_text(open_cmd())
    assert again.agent_key is not None
    assert again.agent_key == first.agent_key
    assert again.agent_key.user == "user-1"


def test_hostile_library_uid_is_not_adopted() -> None:
    session, env = new_session()
    session.on_text(cmd("LoadLibrary", {}, libraryInstanceUId="x:y*" * 5))
    assert session.library_instance_uid != "x:y*" * 5
    assert ":" not in session.library_instance_uid


def test_another_user_on_the_same_session_reclaims() -> None:
    session, env = opened()
    session.on_text(cmd("OpenConnection", {
        "connectionParams": json.dumps({"ExtensionName": LINE}),
        "sessionServiceParams": json.dumps({"UserUId": "user-2"}),
    }))
    assert env.released == [LINE] and env.claimed == [LINE, LINE]
    assert session.user_uid == "user-2"


def test_query_user_state_unknown_is_read_from_redis() -> None:
    session, env = opened()
    session.on_text(cmd("QueryMsgUserState"))
    assert env.frames == [] and env.agent_queries == [LINE]
    session.on_agent_state(AgentState(LINE, paused=True))
    (msg,) = env.take()
    assert msg["eventType"] == 12 and content(msg) == "Paused"
    session.on_text(cmd("QueryMsgUserState"))  # now known: answered at once
    assert [m["eventType"] for m in env.take()] == [12]
    assert env.agent_queries == [LINE]


def test_query_user_state_nobody_knows() -> None:
    session, env = opened()
    session.on_text(cmd("QueryMsgUserState"))
    session.on_agent_state(None)
    assert env.frames == []


def test_debug_mode_logs_only_that_sessions_traffic(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="ws_node.agent_session")
    loud, loud_env = opened(debugMode=True)
    quiet, quiet_env = opened(debugMode=False)
    quiet.on_text(cmd("MakeCall", {"targetAddress": "55501"}))
    quiet.on_line_event(event(EventType.RING_STARTED, make_call(id="q", caller_number="111222")))
    assert "55501" not in caplog.text and "111222" not in caplog.text

    loud.on_text(cmd("MakeCall", {"targetAddress": "55502"}))
    loud.on_line_event(event(EventType.RING_STARTED, make_call(id="l", caller_number="333444")))
    debug_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("debug ")]
    assert any("debug in" in m and "55502" in m for m in debug_lines)  # the client's frame
    assert any("debug command" in m and "55502" in m for m in debug_lines)  # what went to the gateway
    assert any("debug out" in m and "333444" in m for m in debug_lines)  # the event frame
    assert all("user-1" in m for m in debug_lines)


def test_a_call_seen_before_the_gap_and_restated_by_a_new_term_in_it_is_still_closed() -> None:
    """The whole cluster restarted while the agent was away: the new term restated call A (ringing since
    before the term began), then A ended. Its restated ring is not a call that began in the gap; a call
    that rang for the first time in the new term is."""
    session, env = claimed_without_catch_up(replay=False)
    seen = make_call(id="seen", state=CallState.RINGING, started_at=1_000.0)
    fresh = make_call(id="fresh", state=CallState.RINGING, started_at=2_001.0)
    term = "2000000"  # the term began at t=2000 s
    missed = [
        LineEvent(line=LINE, type=EventType.RING_STARTED, call=seen, epoch=term, seq=1),
        LineEvent(line=LINE, type=EventType.RING_STARTED, call=fresh, epoch=term, seq=2),
        LineEvent(line=LINE, type=EventType.RING_FINISHED, call=seen.evolve(state=CallState.FINISHED), epoch=term,
                  seq=3),
        LineEvent(line=LINE, type=EventType.RING_FINISHED, call=fresh.evolve(state=CallState.FINISHED), epoch=term,
                  seq=4),
    ]
    session.on_claimed([], missed)
    msgs = env.take()
    assert [m["eventType"] for m in msgs] == [6]
    assert content(msgs[0])["id"] == cp.call_guid("seen")

