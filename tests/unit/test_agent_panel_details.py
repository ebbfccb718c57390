"""Smaller things the agent notices (issue 11, point 4): the busy call kept with Drop until RING_FINISHED, and
ExtensionName as admins type it in Creatio's Call Centre parameters."""

from __future__ import annotations

import json

import pytest

from services.wire import Call, CallArgs, CallState, CommandName, Direction, EventType, LineEvent
from tests.unit.test_agent_state_codes import Env, frame, session_at
from ws_node import creatio_protocol as cp
from ws_node.agent_session import AgentSession, SessionOptions

# ---- after ABONENT_BUSY the busy call stays, with Drop, until RING_FINISHED -----------------------------------


def test_busy_call_keeps_drop_until_ring_finished() -> None:
    session, env = session_at([100.0])
    ring = Call(id="9.1:305", line="305", linked_id="9.1", channel="SIP/305-9", direction=Direction.OUTBOUND,
                state=CallState.RINGING, caller_number="305", called_number="5550000", started_at=1.0)
    busy = ring.evolve(state=CallState.BUSY)
    session.on_line_event(LineEvent("305", EventType.RING_STARTED, call=ring))
    env.frames.clear()
    session.on_line_event(LineEvent("305", EventType.ABONENT_BUSY, call=busy))
    kinds = [json.loads(f)["eventType"] for f in env.frames]
    assert kinds == [13]  # no idle LINE_STATE_CHANGED: the panel keeps the busy call
    content = json.loads(json.loads(env.frames[0])["content"])
    assert content["callFeaturesSet"] == cp.CallFeaturesSet.CAN_DROP
    # a snapshot (a second tab, a reconnect) lists it too, and Drop is accepted
    env.frames.clear()
    session.on_snapshot([busy])
    snap = json.loads(json.loads(env.frames[0])["content"])
    assert [c["id"] for c in snap["ActiveCalls"]] == [cp.call_guid("9.1:305")]
    assert snap["CurrentCall"]["callFeaturesSet"] == cp.CallFeaturesSet.CAN_DROP
    session.on_text(json.dumps({"command": "DropCall", "commandUId": "", "commandExecutorId": cp.call_guid("9.1:305")}))
    assert [(c.name, c.args) for c in env.commands] == [(CommandName.HANGUP, CallArgs("9.1:305"))]
    env.frames.clear()
    session.on_line_event(LineEvent("305", EventType.RING_FINISHED, call=busy.evolve(state=CallState.FINISHED)))
    assert [json.loads(f)["eventType"] for f in env.frames] == [6, 11]  # now the line is idle
    assert session.calls == []



def open_line(extension: str, protocols: tuple[str, ...] = ("SIP",)) -> tuple[AgentSession, Env]:
    env = Env()
    session = AgentSession(env, options=SessionOptions(line_protocols=protocols))
    session.on_text(frame("LoadLibrary"))
    session.on_text(frame("OpenConnection", {"connectionParams": json.dumps({"ExtensionName": extension})}))
    return session, env


@pytest.mark.parametrize(("extension", "protocols"), [
    ("305", ("SIP",)), (" 305 ", ("SIP",)), ("SIP/305", ("SIP",)), ("sip/305", ("SIP",)),
    (" PJSIP/305", ("PJSIP",)), ("PJSIP/305", ("SIP", "PJSIP")), ("SIP / 305", ("SIP",)),
])
def test_extension_names_admins_type(extension: str, protocols: tuple[str, ...]) -> None:
    session, env = open_line(extension, protocols)
    assert session.line == "305"
    assert json.loads(env.frames[-1])["eventType"] == cp.MsgEventType.CONNECTION_CREATED


@pytest.mark.parametrize(("extension", "says"), [
    ("PJSIP/305", "'PJSIP' is not this PBX's channel technology; use the line number (e.g. 305) or SIP/305"),
    ("IAX2/305", "not this PBX's channel technology"),
    ("SIP/", "bad ExtensionName 'SIP/'"),
    ("SIP/305/1", "bad ExtensionName"),
    ("305 306", "bad ExtensionName"),
])
def test_other_extension_names_are_refused_saying_what_is_allowed(extension: str, says: str) -> None:
    session, env = open_line(extension)
    assert session.line is None
    error = json.loads(env.frames[-1])
    assert error["eventType"] == cp.MsgEventType.ERROR
    content = json.loads(error["content"])
    assert content["errorType"] == cp.MsgErrorType.CONNECTION_CONFIG_ERROR
    assert says in content["data"] and "305" in content["data"]
