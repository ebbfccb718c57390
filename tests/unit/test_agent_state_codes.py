"""Agent states as Creatio defines them: configured codes, the code reported back, what wins on connect."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from ami.protocol import AmiMessage
from ami_gateway.agent_tracker import AgentStateTracker
from ami_gateway.lines import LineMatcher
from ami_gateway.queue_policy import AgentChoice, agent_choice
from services.agent_states import AgentStateCodes
from services.config import ConfigError, parse_agent_states
from services.wire import AgentState, Command, CommandName, EventType, LineEvent, PauseArgs, WrapUpArgs, command_args
from ws_node.agent_session import PROFILE_STATE_WINDOW, AgentSession, SessionOptions

CODES = parse_agent_states({"ready": ["Active", "Available"], "wrapUp": "AfterCall",
                            "paused": {"Lunch": "lunch", "Break": "", "Training": "course"},
                            "pbxPaused": "Supervisor pause"})


def test_config_block() -> None:
    assert CODES.ready == "Active" and CODES.other_ready == ("Available",)
    assert CODES.reason_for("Lunch") == "lunch" and CODES.reason_for("Break") == "Break"
    assert CODES.reason_for("Unlisted", "client reason") == "client reason"
    assert CODES.reason_for("Unlisted") == "Unlisted"
    assert CODES.on_connect == "pbx"


@pytest.mark.parametrize(("block", "key"), [
    ({"paused": {"Lunch": "x", "Break": "X"}}, "AgentStates.paused"),
    ({"ready": "Lunch", "paused": {"Lunch": ""}}, "listed twice"),
    ({"onConnect": "browser"}, "AgentStates.onConnect"),
    ({"ready": []}, "AgentStates.ready"),
    ({"paused": ["Lunch"]}, "AgentStates.paused"),
    ({"readdy": "x"}, "readdy"),
])
def test_config_errors(block: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        parse_agent_states(block)


def test_code_of_a_pbx_pause() -> None:
    assert CODES.code_of(False, "anything") == "Active"
    assert CODES.code_of(True, "LUNCH") == "Lunch"  # the configured reason, any case
    assert CODES.code_of(True, "Break") == "Break"  # a code whose reason is its name
    assert CODES.code_of(True, "Wrap-up") == "AfterCall"
    assert CODES.code_of(True, "coffee") == "Supervisor pause"  # a supervisor's own reason
    assert CODES.code_of(True, "coffee", chosen=("Coffee", "coffee")) == "Coffee"  # what the agent chose
    assert CODES.code_for(AgentState("305", True, "lunch", ("q",), code="Training")) == "Training"


def member_pause(paused: bool, reason: str = "") -> AmiMessage:
    headers = [("Event", "QueueMemberPause"), ("Queue", "support"), ("Interface", "SIP/305"),
               ("Paused", "1" if paused else "0"), ("PausedReason", reason)]
    return AmiMessage(headers=tuple(headers))


def test_tracker_reports_the_chosen_code_and_a_supervisors_pause() -> None:
    tracker = AgentStateTracker(LineMatcher(protocol="SIP"), CODES)
    tracker.handle(AmiMessage(headers=(("Event", "QueueMemberAdded"), ("Queue", "support"),
                                       ("Interface", "SIP/305"), ("Paused", "0"))), 1.0)
    # the agent chose an unlisted code: the gateway registers it before the QueuePause
    tracker.expect_agent_code("305", "Coffee", "Coffee")
    [ev] = tracker.handle(member_pause(True, "Coffee"), 2.0)
    assert ev.type is EventType.AGENT_STATE_CHANGED and ev.agent is not None
    assert (ev.agent.code, ev.agent.set_by) == ("Coffee", "agent")
    [ev] = tracker.handle(member_pause(False), 3.0)  # not asked for through us: a supervisor
    assert ev.agent is not None and (ev.agent.code, ev.agent.set_by) == ("Active", "pbx")
    # a supervisor pauses the agent from the PBX with a reason of their own
    [ev] = tracker.handle(member_pause(True, "meeting"), 4.0)
    assert ev.agent is not None and (ev.agent.code, ev.agent.set_by) == ("Supervisor pause", "pbx")
    tracker.expect_agent_code("305", "Active", "", paused=False)
    [ev] = tracker.handle(member_pause(False), 4.5)
    assert ev.agent is not None and (ev.agent.code, ev.agent.set_by) == ("Active", "agent")
    # ... or with a configured reason
    tracker.handle(member_pause(False), 5.0)
    [ev] = tracker.handle(member_pause(True, "lunch"), 6.0)
    assert ev.agent is not None and ev.agent.code == "Lunch"


class Env:
    def __init__(self) -> None:
        self.frames: list[str] = []
        self.commands: list[Command] = []
        self.agent_queries: list[str] = []

    def send_frame(self, text: str) -> None:
        self.frames.append(text)

    def claim_line(self, session: AgentSession, line: str) -> None: ...

    def release_line(self, session: AgentSession, line: str) -> None: ...

    def request_snapshot(self, session: AgentSession, line: str) -> None: ...

    def request_agent_state(self, session: AgentSession, line: str) -> None:
        self.agent_queries.append(line)

    def submit_command(self, session: AgentSession, command: Command) -> None:
        if command.name is not CommandName.RECORD_OWNER:
            self.commands.append(command)

    def close(self, code: int, reason: str) -> None: ...


def frame(command: str, params: dict[str, Any] | None = None) -> str:
    return json.dumps({"command": command, "commandUId": "", "parameters": params or {}})


def session_at(clock: list[float], codes: AgentStateCodes = CODES) -> tuple[AgentSession, Env]:
    env = Env()
    ids = itertools.count(1)
    session = AgentSession(env, options=SessionOptions(agent_codes=codes), clock=lambda: clock[0],
                           new_id=lambda: f"c{next(ids)}")
    session.on_text(frame("LoadLibrary"))
    session.on_text(frame("OpenConnection", {"connectionParams": json.dumps({"ExtensionName": "305"})}))
    session.on_claimed([])
    return session, env


def states_sent(env: Env) -> list[Any]:
    out = []
    for text in env.frames:
        msg = json.loads(text)
        if msg["eventType"] == 12:
            out.append(json.loads(msg["content"]))
    return out


def test_stale_profile_pause_does_not_repause_an_agent_a_supervisor_unpaused() -> None:
    clock = [100.0]
    session, env = session_at(clock)
    # the header re-sends "Lunch" before the snapshot: it waits for the line's state
    session.on_text(frame("SetMsgUserState", {"code": "Lunch"}))
    assert env.commands == [] and env.agent_queries == ["305"]
    session.on_agent_state(AgentState("305", False, "", ("support",), code="Active", set_by="pbx"))
    assert env.commands == []  # a supervisor unpaused the agent: the PBX wins ...
    assert states_sent(env) == ["Active"]  # ... and the header is told
    # later, the agent's own choice is carried out
    clock[0] += 1
    session.on_text(frame("SetMsgUserState", {"code": "Lunch"}))
    assert [(c.name, c.args) for c in env.commands] == [
        (CommandName.AGENT_PAUSE, PauseArgs("lunch", state_code="Lunch"))]


def test_profile_state_is_carried_out_when_the_pbx_state_is_the_agents_own() -> None:
    session, env = session_at([100.0])
    session.on_snapshot([], AgentState("305", True, "lunch", ("support",), code="Lunch", set_by="agent"))
    session.on_text(frame("SetMsgUserState", {"code": "Active"}))
    assert [c.name for c in env.commands] == [CommandName.AGENT_UNPAUSE]
    session, env = session_at([100.0])
    session.on_snapshot([], AgentState("305", False, "", ("support",), code="Active"))  # first seen: set_by ""
    session.on_text(frame("SetMsgUserState", {"code": "Lunch"}))
    assert [c.name for c in env.commands] == [CommandName.AGENT_PAUSE]


def test_profile_state_is_carried_out_after_the_window_or_without_queues_or_when_configured() -> None:
    clock = [100.0]
    session, env = session_at(clock)
    session.on_snapshot([], AgentState("305", True, "lunch", ("support",), code="Lunch", set_by="pbx"))
    clock[0] += PROFILE_STATE_WINDOW + 1
    session.on_text(frame("SetMsgUserState", {"code": "Available"}))
    assert [c.name for c in env.commands] == [CommandName.AGENT_UNPAUSE]

    session, env = session_at([100.0])
    session.on_snapshot([], None)  # in no queue: nothing to protect
    session.on_text(frame("SetMsgUserState", {"code": "AfterCall"}))
    assert [(c.name, c.args) for c in env.commands] == [(CommandName.WRAP_UP, WrapUpArgs(active=True))]

    profile = AgentStateCodes(on_connect="profile")
    session, env = session_at([100.0], profile)
    session.on_snapshot([], AgentState("305", False, "", ("support",), set_by="pbx"))
    session.on_text(frame("SetMsgUserState", {"code": "Paused"}))
    assert [c.name for c in env.commands] == [CommandName.AGENT_PAUSE]


def test_the_agent_sees_the_code_the_gateway_decided() -> None:
    session, env = session_at([100.0])
    env.frames.clear()
    session.on_line_event(LineEvent("305", EventType.AGENT_STATE_CHANGED,
                                    agent=AgentState("305", True, "course", ("support",), code="Training")))
    assert states_sent(env) == ["Training"]



def test_agent_choice_of_each_command() -> None:
    def choice(name: CommandName, **args: str) -> AgentChoice | None:
        return agent_choice(Command("c", "305", name, command_args(name, args)), CODES, 200)

    lunch = choice(CommandName.AGENT_PAUSE, reason=" lunch ", state_code="Lunch")
    assert lunch == AgentChoice("305", "Lunch", "lunch", True)
    assert choice(CommandName.AGENT_UNPAUSE) == AgentChoice("305", "Active", "", False)
    assert choice(CommandName.WRAP_UP, active="true") == AgentChoice("305", "AfterCall", "Wrap-up", True)
    assert choice(CommandName.WRAP_UP, active="false") == AgentChoice("305", "Active", "", False)
    assert choice(CommandName.HANGUP, call_id="x") is None
