"""Agent state from queue membership: raw AMI queue-member events in, AGENT_STATE_CHANGED out.

Pure, like the call tracker beside it (ami_gateway/tracker.py): no sockets, no clock, no asyncio. The gateway
feeds both the same AMI messages and the same resync listings, and emits what each returns the same way.

Theory of operation
-------------------
``QueueMemberStatus``/``QueueMemberPause``/``QueueMemberAdded``/``QueueMemberRemoved`` keep, per line, each
queue's pause flag (the member ``Interface``/``StateInterface`` mapped through the matcher). The agent is paused
when paused in all its queues. Each state carries the Creatio code it is (``services.agent_states``: the code the
agent chose if the pause has that choice's reason, else the code configured for the reason, else the "PBX paused"
code - a supervisor's QueueMemberPause). AGENT_STATE_CHANGED is emitted only when the pause flag, reason or code changes
(learning a membership is not a change).

After an AMI (re)connect the ``QueueMember`` list of ``QueueStatus`` is the truth: each line's membership is
rebuilt from it, and a line whose pause flag, reason or code differs from what was known is reported again.
"""

from __future__ import annotations

import logging

from ami.protocol import AmiMessage
from ami_gateway.lines import LineMatcher
from services.agent_states import DEFAULT_AGENT_CODES, AgentStateCodes
from services.wire import AgentState, EventType, LineEvent

__all__ = ["MEMBER_EVENTS", "AgentStateTracker"]

log = logging.getLogger(__name__)

#: the AMI events (lower case) that change a queue member: the call tracker leaves them to this class
MEMBER_EVENTS = frozenset(
    {"queuememberstatus", "queuememberpause", "queuememberpaused", "queuememberadded", "queuememberremoved"}
)


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


class AgentStateTracker:
    """See the module docstring. Not thread-safe; one instance per AMI connection's event stream."""

    def __init__(self, matcher: LineMatcher, codes: AgentStateCodes = DEFAULT_AGENT_CODES) -> None:
        self._matcher = matcher
        self._codes = codes
        self._members: dict[str, dict[str, tuple[bool, str]]] = {}
        self._agents: dict[str, AgentState] = {}
        # line -> (code, QueuePause reason) of the agent's last choice of a pausing state
        self._chosen: dict[str, tuple[str, str]] = {}
        # line -> (paused, reason) the agent's last choice will show as, until the PBX shows it
        self._expected: dict[str, tuple[bool, str]] = {}

    # ---- queries ---------------------------------------------------------------------------------

    def agent_state(self, line: str) -> AgentState | None:
        return self._agents.get(line)

    def expect_agent_code(self, line: str, code: str, reason: str, paused: bool = True) -> None:
        """The agent chose ``code``, which pauses (or not) with ``reason``: a pause with that reason is reported
        as ``code``, and the change as made by the agent. Called before the QueuePause is sent, as its events
        may come before its answer."""
        if paused:
            self._chosen[line] = (code, reason)
        self._expected[line] = (paused, reason if paused else "")

    def lines(self) -> set[str]:
        """Lines with a known agent state."""
        return set(self._agents)

    # ---- input -----------------------------------------------------------------------------------

    def handle(self, msg: AmiMessage, received_at: float) -> list[LineEvent]:
        """Feed one AMI message; returns the AGENT_STATE_CHANGED it causes (none for any other event)."""
        event = (msg.event or "").strip().lower()
        if event not in MEMBER_EVENTS:
            return []
        out: list[LineEvent] = []
        self._on_member(msg, event, received_at, out)
        return out

    def _on_member(self, msg: AmiMessage, event: str, at: float, out: list[LineEvent]) -> None:
        queue = (msg.get("Queue") or "").strip()
        line = None
        for header in ("Interface", "Location", "StateInterface"):
            value = msg.get(header)
            if value:
                line = self._matcher.line_of_interface(value)
                if line is not None:
                    break
        if line is None or not queue:
            log.debug("%s for a non-line member ignored", event)
            return
        queues = self._members.setdefault(line, {})
        if event == "queuememberremoved":
            queues.pop(queue, None)
        else:
            queues[queue] = _member_pause(msg, queues.get(queue))
        self._publish_agent(line, at, out, live=True)

    def _publish_agent(self, line: str, at: float, out: list[LineEvent], live: bool = False) -> None:
        queues = self._members.get(line, {})
        names = tuple(sorted(queues))
        paused = bool(names) and all(queues[q][0] for q in names)
        reason = next((queues[q][1] for q in names if queues[q][1]), "") if paused else ""
        code = self._codes.code_of(paused, reason, self._chosen.get(line)) if names else ""
        previous = self._agents.get(line)
        before = (previous.paused, previous.reason) if previous is not None else (False, "")
        set_by = previous.set_by if previous is not None else ""
        if (paused, reason) != before:
            if self._expected.get(line) == (paused, reason):
                set_by = "agent"
                del self._expected[line]
            else:
                set_by = "pbx" if live and previous is not None else ""
        if not paused:
            self._chosen.pop(line, None)
        state = AgentState(line=line, paused=paused, reason=reason, queues=names, code=code, set_by=set_by)
        self._agents[line] = state
        recoded = paused and previous is not None and previous.code != code
        if (paused, reason) != before or recoded:
            out.append(LineEvent(line=line, type=EventType.AGENT_STATE_CHANGED, agent=state, ami_received_at=at))

    # ---- resync ----------------------------------------------------------------------------------

    def resync(self, queue_members: list[AmiMessage], received_at: float) -> list[LineEvent]:
        """Align with the PBX's ``QueueMember`` list after an AMI (re)connect; see the module docstring."""
        at = received_at
        out: list[LineEvent] = []
        old_lines = set(self._members)
        self._members = {}
        for msg in queue_members:
            queue = (msg.get("Queue") or "").strip()
            line = None
            for header in ("Location", "Interface", "StateInterface"):
                value = msg.get(header)
                if value and (line := self._matcher.line_of_interface(value)) is not None:
                    break
            if line is not None and queue:
                self._members.setdefault(line, {})[queue] = _member_pause(msg, None)
        for line in sorted(old_lines | set(self._members)):
            self._publish_agent(line, at, out)
        return out


def _member_pause(msg: AmiMessage, previous: tuple[bool, str] | None) -> tuple[bool, str]:
    paused_header = msg.get("Paused")
    if paused_header is None:
        return previous if previous is not None else (False, "")
    paused = _truthy(paused_header)
    reason = (msg.get("PausedReason") or msg.get("Reason") or "").strip() if paused else ""
    return paused, reason
