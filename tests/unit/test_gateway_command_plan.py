"""Which AMI actions each command becomes, and every refusal, as pure data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from ami_gateway.command_executor import explain
from ami_gateway.command_plan import (
    WRAP_UP_REASON,
    AmiAction,
    CommandRefused,
    check_fresh,
    plan_command,
)
from ami_gateway.lines import LineMatcher
from ami_gateway.tracker import CallControl
from services.config import AsteriskConfig
from services.wire import BadCommand, Call, CallState, Command, CommandName, Direction, command_args
from tests.unit.test_tracker import load, play

CONFIG = AsteriskConfig(
    originate_context="from-internal", async_originate=True, allowed_originate_contexts=("from-user-305", "from-user")
)
MATCHER = LineMatcher("SIP,PJSIP", "Local/{0}@from-queue/n")


@dataclass
class View:
    """A line's calls as the tracker would describe them (plain data)."""

    calls: dict[str, list[CallControl]] = field(default_factory=dict)
    techs: dict[str, str] = field(default_factory=dict)

    def controls(self, line: str) -> list[CallControl]:
        return self.calls.get(line, [])

    def tech_of(self, line: str) -> str | None:
        return self.techs.get(line)

    def expect_retriever(self, line: str, call_id: str, uniqueid: str) -> None:
        raise AssertionError("the planner only plans; the executor announces retrievers")


def detached(call_id: str = "1.1:305", space: str = "701", parked_channel: str = "SIP/trunk-0000000b") -> CallControl:
    """A held call whose far end is parked and whose phone channel Asterisk hung up (tracker Rule 8)."""
    call = Call(id=call_id, line="305", linked_id="1.1", channel="SIP/305-0000000a", direction=Direction.INBOUND,
                state=CallState.HELD, caller_number="79161234567", caller_name='Ivan "Vanya" Petrov',
                called_number="305")
    return CallControl(call, "", "", "", space, "default", parked_channel, "SIP")


def control(call_id: str = "1.1:305", state: CallState = CallState.CONNECTED, channel: str = "SIP/305-0000000a",
            peer: str = "SIP/trunk-0000000b", **more: str) -> CallControl:
    call = Call(id=call_id, line="305", linked_id="1.1", channel=channel, direction=Direction.INBOUND, state=state)
    return CallControl(call, channel, peer, tech=channel.split("/", 1)[0], **more)


def cmd(name: CommandName, line: str = "305", **args: str) -> Command:
    # Through the decoder, as the arguments arrive from a node.
    return Command(id="c1", line=line, name=name, args=command_args(name, args), issued_at=1000.0)


def plan(command: Command, view: View | None = None, config: AsteriskConfig = CONFIG,
         dnd_now: bool | None = None) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    result = plan_command(command, view or View(), config, MATCHER, dnd_now=dnd_now)
    return [(a.name, a.fields) for a in result.actions]


def refused(command: Command, view: View | None = None, config: AsteriskConfig = CONFIG) -> str:
    with pytest.raises(CommandRefused) as info:
        plan_command(command, view or View(), config, MATCHER, dnd_now=None)
    return str(info.value)


def test_stale_commands_are_refused() -> None:
    check_fresh(cmd(CommandName.HANGUP), now=1004.9, ttl=5)
    with pytest.raises(CommandRefused, match=r"expired: it reached the gateway 6.0s after it was sent \(limit 5s\)"):
        check_fresh(cmd(CommandName.HANGUP), now=1006.0, ttl=5)


def test_make_call_originates_from_the_line_in_the_users_context() -> None:
    result = plan_command(cmd(CommandName.MAKE_CALL, number="+74951234567", context="from-user-305"),
                          View(techs={"305": "PJSIP"}), CONFIG, MATCHER)
    [action] = result.actions
    assert action.name == "Originate" and action.until_event == "OriginateResponse"
    assert dict(action.fields) == {
        "Channel": "PJSIP/305", "Context": "from-user-305", "Exten": "+74951234567", "Priority": "1",
        "CallerID": "+74951234567 <+74951234567>", "Timeout": "30000", "Async": "true",
    }
    assert action.timeout > 30
    default = plan_command(cmd(CommandName.MAKE_CALL, number="5551234"), View(), CONFIG, MATCHER).actions[0]
    assert default.field("Channel") == "SIP/305" and default.field("Context") == "from-internal"
    sync = plan_command(cmd(CommandName.MAKE_CALL, number="5551234"), View(),
                        AsteriskConfig(async_originate=False), MATCHER).actions[0]
    assert sync.field("Async") == "false" and sync.until_event == ""


@pytest.mark.parametrize("number", ["", "12 34", "1\r\nAction: Hangup", "5;6", "x" * 65])
def test_make_call_refuses_a_bad_number(number: str) -> None:
    assert "needs a valid number" in refused(cmd(CommandName.MAKE_CALL, number=number))


def test_make_call_refuses_a_bad_context_and_a_non_line() -> None:
    assert "bad dialplan context" in refused(cmd(CommandName.MAKE_CALL, number="1", context="a b"))
    assert "'trunk-in' is not an agent line" in refused(cmd(CommandName.MAKE_CALL, line="trunk-in", number="1"))


@pytest.mark.parametrize("name", [CommandName.MAKE_CALL, CommandName.BLIND_TRANSFER, CommandName.CONSULT_CALL])
def test_a_context_the_admin_did_not_allow_is_refused(name: CommandName) -> None:
    view = View({"305": [control()]})
    message = refused(cmd(name, number="1", context="from-trunk", call_id="1.1:305"), view)
    assert "'from-trunk' is not allowed on this server (allowed: from-internal, from-user-305, from-user)" in message
    # only the configured context when no list is given
    only_default = AsteriskConfig(originate_context="from-internal")
    with pytest.raises(CommandRefused, match="'from-user' is not allowed"):
        plan_command(cmd(name, number="1", context="from-user", call_id="1.1:305"), view, only_default, MATCHER)
    assert plan_command(cmd(name, number="1", call_id="1.1:305"), view, only_default, MATCHER).actions


def test_commands_act_only_on_calls_of_the_agents_own_line() -> None:
    view = View({"306": [control("1.1:306")]})
    assert refused(cmd(CommandName.HANGUP, call_id="1.1:306"), view) == "no call 1.1:306 on line 305"
    assert refused(cmd(CommandName.HANGUP), View()) == "hangup: say which call (call_id); line 305 has 0 calls"


def test_hangup_and_the_single_call_shortcut() -> None:
    view = View({"305": [control()]})
    assert plan(cmd(CommandName.HANGUP), view) == [("Hangup", (("Channel", "SIP/305-0000000a"), ("Cause", "16")))]
    parked = View({"305": [control(state=CallState.HELD, peer="", parked_space="701",
                                   parked_channel="SIP/trunk-0000000b")]})
    assert [a for a, _ in plan(cmd(CommandName.HANGUP, call_id="1.1:305"), parked)] == ["Hangup", "Hangup"]
    # The phone's channel is gone already: only the parked party is left to hang up.
    only_parked = plan_command(cmd(CommandName.HANGUP), View({"305": [detached()]}), CONFIG, MATCHER).actions
    assert [(a.name, a.fields, a.tolerated) for a in only_parked] == [
        ("Hangup", (("Channel", "SIP/trunk-0000000b"), ("Cause", "16")), ())
    ]


def test_answer_uses_the_notify_of_the_phones_technology() -> None:
    ringing = View({"305": [control(state=CallState.RINGING, peer="")]})
    assert plan(cmd(CommandName.ANSWER), ringing) == [
        ("SIPnotify", (("Channel", "305"), ("Variable", "Event=talk")))
    ]
    pjsip = View({"305": [control(state=CallState.RINGING, channel="PJSIP/305-0000001f", peer="")]})
    assert plan(cmd(CommandName.ANSWER), pjsip) == [
        ("PJSIPNotify", (("Endpoint", "305"), ("Variable", "Event=talk")))
    ]
    assert refused(cmd(CommandName.ANSWER), View({"305": [control()]})) == "answer: the call is connected"
    iax = View({"305": [control(state=CallState.RINGING, channel="IAX2/305-1", peer="")]})
    assert "only SIP and PJSIP phones" in refused(cmd(CommandName.ANSWER), iax)


def test_hold_parks_the_far_end_and_resume_picks_it_up() -> None:
    parking = AsteriskConfig(parking_lot_context="parkedcalls")
    view = View({"305": [control()]})
    assert plan(cmd(CommandName.HOLD), view, parking) == [
        ("Park", (("Channel", "SIP/trunk-0000000b"), ("TimeoutChannel", "SIP/305-0000000a")))
    ]
    # The phone's channel survived the park (a dialplan that keeps it): it is redirected to the space.
    held = View({"305": [control(state=CallState.HELD, peer="", parked_space="702")]})
    assert plan(cmd(CommandName.UNHOLD), held, parking) == [
        ("Redirect", (("Channel", "SIP/305-0000000a"), ("Context", "parkedcalls"), ("Exten", "702"),
                      ("Priority", "1")))
    ]
    phone_hold = View({"305": [control(state=CallState.HELD)]})
    assert "held from the phone" in refused(cmd(CommandName.UNHOLD), phone_hold, parking)
    assert refused(cmd(CommandName.HOLD), View({"305": [control(peer="")]}), parking) == \
        "hold: the call has no other party to park"
    assert refused(cmd(CommandName.HOLD), view).startswith("hold is not supported: set parkingLotContext")
    assert refused(cmd(CommandName.UNHOLD), held).startswith("hold is not supported")


def test_resume_calls_the_phone_into_the_lot_once_asterisk_has_hung_it_up() -> None:
    parking = AsteriskConfig(parking_lot_context="parkedcalls", async_originate=True)
    result = plan_command(cmd(CommandName.UNHOLD), View({"305": [detached(space="702")]}), parking, MATCHER)
    [originate] = result.actions
    fields = dict(originate.fields)
    channel_id = fields.pop("ChannelId")
    assert fields == {"Channel": "SIP/305", "Context": "parkedcalls", "Exten": "702", "Priority": "1",
                      "CallerID": '"Ivan Vanya Petrov" <79161234567>', "Timeout": "30000", "Async": "true"}
    assert channel_id.startswith("cms-") and len(channel_id) == 28
    assert originate.until_event == "OriginateResponse"
    assert result.retriever == ("1.1:305", channel_id)
    assert result.data == {"parking_space": "702", "retriever": channel_id}
    again = plan_command(cmd(CommandName.UNHOLD), View({"305": [detached(space="702")]}), parking, MATCHER)
    other = plan_command(Command(id="c2", line="305", name=CommandName.UNHOLD, issued_at=1.0),
                         View({"305": [detached(space="702")]}), parking, MATCHER)
    assert again.retriever == result.retriever and other.retriever != result.retriever  # one id per command
    sync = plan_command(cmd(CommandName.UNHOLD), View({"305": [detached()]}),
                        AsteriskConfig(parking_lot_context="parkedcalls", async_originate=False), MATCHER)
    assert sync.actions[0].field("Async") == "false" and sync.actions[0].until_event == ""
    with pytest.raises(CommandRefused, match="the call is held"):
        plan_command(cmd(CommandName.HOLD), View({"305": [detached()]}), parking, MATCHER)


def test_a_resume_redirect_falls_back_to_calling_the_phone_into_the_lot() -> None:
    """The tracker may still see the phone's channel that Asterisk is hanging up: the Redirect then finds no
    channel, and the same command calls the phone into the lot (the retriever is announced either way)."""
    parking = AsteriskConfig(parking_lot_context="parkedcalls", async_originate=True)
    alive = dataclasses.replace(detached(space="702"), channel="SIP/305-0000000a")
    result = plan_command(cmd(CommandName.UNHOLD), View({"305": [alive]}), parking, MATCHER)
    [redirect] = result.actions
    assert redirect.name == "Redirect" and redirect.field("Channel") == "SIP/305-0000000a"
    assert redirect.fallback is not None and redirect.fallback.name == "Originate"
    assert "No such channel" in redirect.fallback_when and "Channel does not exist" in redirect.fallback_when
    assert result.retriever == ("1.1:305", redirect.fallback.field("ChannelId"))
    assert (redirect.fallback.field("Channel"), redirect.fallback.field("Exten")) == ("SIP/305", "702")
    gone = plan_command(cmd(CommandName.UNHOLD), View({"305": [detached(space="702")]}), parking, MATCHER)
    assert gone.actions[0].fields == redirect.fallback.fields  # the same call-back as when the channel is gone


def test_blind_transfer_and_consultation() -> None:
    view = View({"305": [control()]})
    assert plan(cmd(CommandName.BLIND_TRANSFER, number="308", context="from-user"), view) == [
        ("BlindTransfer", (("Channel", "SIP/305-0000000a"), ("Exten", "308"), ("Context", "from-user")))
    ]
    assert plan(cmd(CommandName.CONSULT_CALL, number="306"), view) == [
        ("Atxfer", (("Channel", "SIP/305-0000000a"), ("Exten", "306"), ("Context", "from-internal")))
    ]
    ringing = View({"305": [control(state=CallState.RINGING)]})
    assert refused(cmd(CommandName.CONSULT_CALL, number="306"), ringing) == "consult_call: the call is ringing"


def _atxfer_view() -> View:
    original = control(state=CallState.HELD, peer="")
    consult = control("1.1:305:2", channel="Local/306@from-internal-0000000c;1", peer="SIP/306-0000000e",
                      transferer="SIP/305-0000000a")
    return View({"305": [original, consult]})


def test_complete_and_cancel_an_atxfer_consultation() -> None:
    view = _atxfer_view()
    both = {"call_id": "1.1:305", "consult_call_id": "1.1:305:2"}
    assert plan(cmd(CommandName.COMPLETE_TRANSFER, **both), view) == [
        ("Hangup", (("Channel", "SIP/305-0000000a"), ("Cause", "16")))
    ]
    result = plan_command(cmd(CommandName.CANCEL_TRANSFER, **both), view, CONFIG, MATCHER)
    [cancel] = result.actions
    assert (cancel.name, cancel.fields) == ("CancelAtxfer", (("Channel", "SIP/305-0000000a"),))
    assert cancel.fallback is not None and cancel.fallback.field("Channel") == "Local/306@from-internal-0000000c;1"
    with pytest.raises(CommandRefused, match="say which call"):
        plan_command(cmd(CommandName.COMPLETE_TRANSFER, call_id="1.1:305"), view, CONFIG, MATCHER)


def test_complete_and_cancel_with_two_independent_calls() -> None:
    parking = AsteriskConfig(parking_lot_context="parkedcalls")
    first = control(state=CallState.HELD, peer="", parked_space="701", parked_channel="SIP/trunk-0000000b")
    second = control("2.2:305", channel="SIP/305-0000000f", peer="SIP/carrier-00000010")
    view = View({"305": [first, second]})
    both = {"call_id": "1.1:305", "consult_call_id": "2.2:305"}
    assert [(a, dict(f)) for a, f in plan(cmd(CommandName.COMPLETE_TRANSFER, **both), view, parking)] == [
        ("Bridge", {"Channel1": "SIP/trunk-0000000b", "Channel2": "SIP/carrier-00000010", "Tone": "no"}),
        ("Hangup", {"Channel": "SIP/305-0000000a", "Cause": "16"}),
        ("Hangup", {"Channel": "SIP/305-0000000f", "Cause": "16"}),
    ]
    assert [(a, dict(f)) for a, f in plan(cmd(CommandName.CANCEL_TRANSFER, **both), view, parking)] == [
        ("Hangup", {"Channel": "SIP/305-0000000f", "Cause": "16"}),
        ("Redirect", {"Channel": "SIP/305-0000000a", "Context": "parkedcalls", "Exten": "701", "Priority": "1"}),
    ]
    # The first call's phone channel is gone (Asterisk hung it up when its far end was parked).
    gone = View({"305": [detached(), second]})
    assert [(a, dict(f)) for a, f in plan(cmd(CommandName.COMPLETE_TRANSFER, **both), gone, parking)] == [
        ("Bridge", {"Channel1": "SIP/trunk-0000000b", "Channel2": "SIP/carrier-00000010", "Tone": "no"}),
        ("Hangup", {"Channel": "SIP/305-0000000f", "Cause": "16"}),
    ]
    cancel = plan_command(cmd(CommandName.CANCEL_TRANSFER, **both), gone, parking, MATCHER)
    assert [a.name for a in cancel.actions] == ["Hangup", "Originate"]
    assert cancel.actions[1].field("Exten") == "701" and cancel.retriever is not None


def test_dtmf_goes_to_the_far_end_one_digit_at_a_time() -> None:
    view = View({"305": [control()]})
    assert plan(cmd(CommandName.DTMF, digits="1*#"), view) == [
        ("PlayDTMF", (("Channel", "SIP/trunk-0000000b"), ("Digit", d), ("Duration", "250"))) for d in "1*#"
    ]
    assert "digits" in refused(cmd(CommandName.DTMF, digits="12e"), view)


def test_dnd_on_off_toggle() -> None:
    on = plan(cmd(CommandName.SET_DND, mode="on"))
    assert on == [
        ("DBPut", (("Family", "DND"), ("Key", "305"), ("Val", "YES"))),
        ("SetVar", (("Variable", "DEVICE_STATE(Custom:DND305)"), ("Value", "BUSY"))),
    ]
    assert plan(cmd(CommandName.SET_DND, mode="toggle"), dnd_now=True)[0][0] == "DBDel"
    assert plan(cmd(CommandName.SET_DND, mode="toggle"), dnd_now=False)[0][0] == "DBPut"
    with pytest.raises(BadCommand, match="set_dnd.mode must be one of on, off, toggle, not 'maybe'"):
        cmd(CommandName.SET_DND, mode="maybe")
    off = plan_command(cmd(CommandName.SET_DND, mode="off"), View(), CONFIG, MATCHER)
    assert off.data == {"dnd": "off"} and off.actions[0].tolerated == ("Database entry not found",)


def test_pause_unpause_and_wrap_up_in_every_queue() -> None:
    assert plan(cmd(CommandName.AGENT_PAUSE, reason="Lunch")) == [
        ("QueuePause", (("Interface", "Local/305@from-queue/n"), ("Paused", "true"), ("Reason", "Lunch")))
    ]
    assert plan(cmd(CommandName.AGENT_UNPAUSE)) == [
        ("QueuePause", (("Interface", "Local/305@from-queue/n"), ("Paused", "false")))
    ]
    assert plan(cmd(CommandName.WRAP_UP, active="true"))[0][1][-1] == ("Reason", WRAP_UP_REASON)
    assert plan(cmd(CommandName.WRAP_UP, active="false"))[0][1] == (
        ("Interface", "Local/305@from-queue/n"), ("Paused", "false"),
    )
    sip_members = LineMatcher("SIP", "SIP/{0}")
    result = plan_command(cmd(CommandName.AGENT_PAUSE), View(), CONFIG, sip_members)
    assert result.actions[0].field("Interface") == "SIP/305"
    assert "one line" in refused(cmd(CommandName.AGENT_PAUSE, reason="a\r\nAction: Logoff"))


def test_plans_from_a_real_tracker_state() -> None:
    """The tracker's view of a recorded consultation plans the right completion."""
    msgs = load("atxfer-complete.ami")
    cut = next(i for i, m in enumerate(msgs) if m.event == "AttendedTransfer")
    tracker, events = play(msgs[:cut])
    linked = events[0].call.linked_id  # type: ignore[union-attr]
    actions = plan_command(cmd(CommandName.COMPLETE_TRANSFER, call_id=f"{linked}:305",
                               consult_call_id=f"{linked}:305:2"), tracker, CONFIG, MATCHER).actions
    transferer = tracker.control("305", f"{linked}:305")
    assert transferer is not None
    assert [(a.name, a.field("Channel")) for a in actions] == [("Hangup", transferer.channel)]


def test_errors_say_why() -> None:
    pause = AmiAction("QueuePause", ())
    assert explain(pause, "Permission denied") == \
        "QueuePause was refused: the AMI user needs write = agent in manager.conf"
    assert explain(AmiAction("CancelAtxfer", ()), "Invalid/unknown command") == \
        "CancelAtxfer is not available on this Asterisk (module not loaded or version too old)"
    assert explain(pause, "Interface not found") == "QueuePause failed: Interface not found"
