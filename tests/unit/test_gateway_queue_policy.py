"""autoPauseOnCommutationStart and traceQueuesState as pure objects, fed the tracker's own output."""

from __future__ import annotations

from ami.protocol import AmiMessage
from ami_gateway.agent_tracker import AgentStateTracker
from ami_gateway.queue_policy import AUTO_PAUSE_REASON, AutoPausePolicy, PauseRequest, QueueStateTrace
from ami_gateway.tracker import CallTracker
from services.wire import AgentState, Call, CallState, Direction, EventType, LineEvent
from tests.unit.test_tracker import load, matcher

READY = AgentState("305", paused=False, queues=("sales", "support"))


def ev(kind: EventType, line: str = "305", call_id: str = "1.1:305", agent: AgentState | None = None) -> LineEvent:
    call = Call(id=call_id, line=line, linked_id="1.1", channel="SIP/305-1", direction=Direction.INBOUND,
                state=CallState.CONNECTED)
    return LineEvent(line=line, type=kind, call=None if agent else call, agent=agent)


def paused(reason: str) -> AgentState:
    return AgentState("305", paused=True, reason=reason, queues=("sales", "support"))


def test_pause_on_answer_and_restore_after_the_call() -> None:
    policy = AutoPausePolicy(enabled=True)
    assert policy.observe(ev(EventType.RING_STARTED), READY, 1) == []
    assert policy.observe(ev(EventType.COMMUTATION_STARTED), READY, 1) == [
        PauseRequest("305", True, AUTO_PAUSE_REASON)
    ]
    # our own pause coming back is not the agent's decision
    assert policy.observe(ev(EventType.AGENT_STATE_CHANGED, agent=paused(AUTO_PAUSE_REASON)), None, 1) == []
    assert policy.observe(ev(EventType.RING_FINISHED), paused(AUTO_PAUSE_REASON), 0) == [PauseRequest("305", False)]
    assert not policy.remembers("305")


def test_disabled_or_not_a_queue_member_does_nothing() -> None:
    assert AutoPausePolicy(enabled=False).observe(ev(EventType.COMMUTATION_STARTED), READY, 1) == []
    policy = AutoPausePolicy(enabled=True)
    assert policy.observe(ev(EventType.COMMUTATION_STARTED), None, 1) == []
    assert policy.observe(ev(EventType.COMMUTATION_STARTED), AgentState("305", False), 1) == []


def test_an_agent_already_paused_is_left_alone() -> None:
    policy = AutoPausePolicy(enabled=True)
    assert policy.observe(ev(EventType.COMMUTATION_STARTED), paused("Lunch"), 1) == []
    assert policy.observe(ev(EventType.RING_FINISHED), paused("Lunch"), 0) == []


def test_the_agents_choice_during_the_call_wins() -> None:
    for decision in (paused("Lunch"), READY):
        policy = AutoPausePolicy(enabled=True)
        policy.observe(ev(EventType.COMMUTATION_STARTED), READY, 1)
        policy.observe(ev(EventType.AGENT_STATE_CHANGED, agent=paused(AUTO_PAUSE_REASON)), None, 1)
        policy.observe(ev(EventType.AGENT_STATE_CHANGED, agent=decision), None, 1)
        assert policy.observe(ev(EventType.RING_FINISHED), decision, 0) == []


def test_wrap_up_keeps_the_agent_paused() -> None:
    policy = AutoPausePolicy(enabled=True)
    policy.observe(ev(EventType.COMMUTATION_STARTED), READY, 1)
    policy.set_wrap_up("305", True)
    assert policy.observe(ev(EventType.RING_FINISHED), paused("Wrap-up"), 0) == []
    policy.set_wrap_up("305", False)
    assert not policy.in_wrap_up("305")


def test_only_the_end_of_the_last_call_restores() -> None:
    policy = AutoPausePolicy(enabled=True)
    assert policy.observe(ev(EventType.COMMUTATION_STARTED), READY, 1)
    assert policy.observe(ev(EventType.COMMUTATION_STARTED, call_id="2.2:305"), paused(AUTO_PAUSE_REASON), 2) == []
    assert policy.observe(ev(EventType.RING_FINISHED), paused(AUTO_PAUSE_REASON), 1) == []
    assert policy.observe(ev(EventType.RING_FINISHED, call_id="2.2:305"), paused(AUTO_PAUSE_REASON), 0) == [
        PauseRequest("305", False)
    ]


def test_a_refused_pause_is_not_undone() -> None:
    policy = AutoPausePolicy(enabled=True)
    policy.observe(ev(EventType.COMMUTATION_STARTED), READY, 1)
    policy.pause_failed("305")
    assert policy.observe(ev(EventType.RING_FINISHED), READY, 0) == []


def test_policy_fed_by_the_tracker_on_a_recorded_queue_call() -> None:
    """The real queue capture: 305 answers (pause), 306 only rang (nothing), the call ends (restore)."""
    tracker = CallTracker(matcher())
    agents = AgentStateTracker(matcher())
    member = AmiMessage((("Event", "QueueMember"), ("Queue", "support"), ("Location", "Local/{}@from-queue/n"),
                         ("Paused", "0")))
    agents.resync([member.with_headers((k, v.format(line)) for k, v in member.headers)
                   for line in ("305", "306")], 0.0)
    policy = AutoPausePolicy(enabled=True)
    requests: list[PauseRequest] = []
    for i, msg in enumerate(load("inbound-queue.ami")):
        for e in tracker.handle(msg, float(i)) + agents.handle(msg, float(i)):
            requests += policy.observe(e, agents.agent_state(e.line), len(tracker.calls_of(e.line)))
    assert requests == [PauseRequest("305", True, AUTO_PAUSE_REASON), PauseRequest("305", False)]


def _member(event: str, queue: str, paused: str | None = None, status: str = "1", reason: str = "",
            interface: str = "Local/305@from-queue/n") -> AmiMessage:
    headers = [("Event", event), ("Queue", queue), ("Interface", interface), ("Status", status)]
    if paused is not None:
        headers += [("Paused", paused), ("PausedReason", reason)]
    return AmiMessage(tuple(headers))


def test_trace_reports_each_membership_and_pause_change_once() -> None:
    trace = QueueStateTrace(matcher())
    [added] = trace.observe(_member("QueueMemberAdded", "support", "0"))
    assert (added.line, added.queue, added.change, added.paused) == ("305", "support", "added", False)
    assert trace.observe(_member("QueueMemberStatus", "support", "0")) == []  # nothing changed
    [pause] = trace.observe(_member("QueueMemberPause", "support", "1", reason="Lunch"))
    assert pause.log_text() == (
        "queue_state line=305 queue=support change=paused paused=true reason='Lunch' status=1 "
        "interface=Local/305@from-queue/n"
    )
    [status] = trace.observe(_member("QueueMemberStatus", "support", "1", status="2", reason="Lunch"))
    assert status.change == "status" and status.status == "2"
    [removed] = trace.observe(_member("QueueMemberRemoved", "support"))
    assert removed.change == "removed"
    assert trace.observe(_member("QueueMemberPause", "support", "1", interface="SIP/trunk")) == []


def test_trace_resync_reports_the_differences() -> None:
    trace = QueueStateTrace(matcher())
    trace.observe(_member("QueueMemberAdded", "support", "0"))
    trace.observe(_member("QueueMemberAdded", "sales", "0"))
    listing = [_member("QueueMember", "support", "1", reason="Away")]
    changes = trace.resync(listing)
    assert [(c.queue, c.change) for c in changes] == [("support", "paused"), ("sales", "removed")]
