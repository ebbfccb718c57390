"""Queue-side behaviours CMS offers, as pure objects: ``autoPauseOnCommutationStart`` and ``traceQueuesState``.

Both are fed what the gateway already has (the tracker's line events and agent states, raw queue member
events) and return decisions; ``app.py`` does the I/O (QueuePause actions, log lines).

AutoPausePolicy - theory of operation
-------------------------------------
CMS's rule: once an agent answers, pause the agent's queue interface in every queue, so no queue call rings
a busy agent; when the call is over, put the agent back as they were - unless they changed their state
themselves in between, or they are in wrap-up (after-call work keeps them paused).

* COMMUTATION_STARTED on a line that is a queue member (its :class:`~services.wire.AgentState` lists queues)
  and is not paused: remember "was ready", ask for a pause with :data:`AUTO_PAUSE_REASON`. Already paused
  (by the agent or by wrap-up): remember "was paused", ask nothing - there is nothing to restore.
* AGENT_STATE_CHANGED while remembered: our own pause coming back (paused, our reason) changes nothing; any
  other state (unpaused, or paused for another reason) means the agent decided: we will not restore.
* The last call of the line ends (RING_FINISHED / ABONENT_BUSY with no live call left): forget the line and,
  if we paused it and the agent did not decide meanwhile and wrap-up is off, ask for the unpause.
* A second call answered while the first is still up does not pause again; only the end of the last call
  restores.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ami.protocol import AmiMessage
from ami_gateway.lines import LineMatcher
from services.agent_states import AgentStateCodes
from services.wire import AgentState, Command, CommandName, EventType, LineEvent, PauseArgs, WrapUpArgs

__all__ = ["AUTO_PAUSE_REASON", "AgentChoice", "AutoPausePolicy", "PauseRequest", "QueueChange", "QueueStateTrace",
           "agent_choice"]

#: QueuePause reason of an automatic pause (the agent state shows it while the call lasts).
AUTO_PAUSE_REASON = "Auto pause: call in progress"
_CALL_OVER = frozenset({EventType.RING_FINISHED, EventType.ABONENT_BUSY})


@dataclass(frozen=True, slots=True)
class PauseRequest:
    """Pause or unpause the line's queue interface in all queues."""

    line: str
    paused: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class AgentChoice:
    """The state an agent chose through us, as the PBX will report it (see AgentStateTracker.expect_agent_code)."""

    line: str
    code: str
    reason: str
    paused: bool


def agent_choice(command: Command, codes: AgentStateCodes, reason_max: int) -> AgentChoice | None:
    """What an agent-state command will show as on the PBX: the gateway tells the tracker *before* sending the
    QueuePause (its QueueMemberPause may come before its answer), so the change is reported as the agent's,
    with the agent's code (services/agent_states.py)."""
    args = command.args
    if isinstance(args, PauseArgs):
        reason = args.reason.strip()[:reason_max]
        return AgentChoice(command.line, args.state_code or reason, reason, True)
    if command.name is CommandName.AGENT_UNPAUSE:
        return AgentChoice(command.line, codes.ready, "", False)
    if isinstance(args, WrapUpArgs):
        if args.active:
            return AgentChoice(command.line, codes.wrap_up, codes.wrap_up_reason, True)
        return AgentChoice(command.line, codes.ready, "", False)
    return None


@dataclass(slots=True)
class _Remembered:
    was_paused: bool
    requested: bool
    agent_decided: bool = False


class AutoPausePolicy:
    def __init__(self, enabled: bool, reason: str = AUTO_PAUSE_REASON) -> None:
        self.enabled = enabled
        self.reason = reason
        self._lines: dict[str, _Remembered] = {}
        self._wrap_up: set[str] = set()

    def set_wrap_up(self, line: str, active: bool) -> None:
        (self._wrap_up.add if active else self._wrap_up.discard)(line)

    def in_wrap_up(self, line: str) -> bool:
        return line in self._wrap_up

    def remembers(self, line: str) -> bool:
        return line in self._lines

    def observe(self, event: LineEvent, agent: AgentState | None, live_calls: int) -> list[PauseRequest]:
        """Feed one line event with the line's agent state and live call count *after* the event."""
        if not self.enabled:
            return []
        line = event.line
        remembered = self._lines.get(line)
        if event.type is EventType.COMMUTATION_STARTED:
            if remembered is not None or agent is None or not agent.queues:
                return []
            if agent.paused:
                self._lines[line] = _Remembered(was_paused=True, requested=False)
                return []
            self._lines[line] = _Remembered(was_paused=False, requested=True)
            return [PauseRequest(line, True, self.reason)]
        if event.type is EventType.AGENT_STATE_CHANGED and remembered is not None and event.agent is not None:
            ours = event.agent.paused and event.agent.reason == self.reason and remembered.requested
            if not ours:
                remembered.agent_decided = True
            return []
        if event.type in _CALL_OVER and remembered is not None and live_calls == 0:
            del self._lines[line]
            if remembered.requested and not remembered.agent_decided and line not in self._wrap_up:
                return [PauseRequest(line, False)]
        return []

    def pause_failed(self, line: str) -> None:
        """Our pause was refused (not a member after all...): nothing to restore later."""
        remembered = self._lines.get(line)
        if remembered is not None:
            remembered.requested = False


@dataclass(frozen=True, slots=True)
class QueueChange:
    """One change of one agent's membership or pause state in one queue (a ``traceQueuesState`` line)."""

    line: str
    queue: str
    change: str  # added, removed, paused, unpaused, status
    paused: bool
    reason: str
    status: str
    interface: str

    def log_text(self) -> str:
        return (
            f"queue_state line={self.line} queue={self.queue} change={self.change} paused={str(self.paused).lower()}"
            f" reason={self.reason!r} status={self.status} interface={self.interface}"
        )


_MEMBER_EVENTS = {
    "queuememberadded": "added",
    "queuememberremoved": "removed",
    "queuememberpause": "pause",
    "queuememberpaused": "pause",
    "queuememberstatus": "status",
    "queuemember": "listed",
}


class QueueStateTrace:
    """Follows queue member events; reports what changed for agent lines, each change once."""

    def __init__(self, matcher: LineMatcher) -> None:
        self._matcher = matcher
        self._state: dict[tuple[str, str], tuple[bool, str, str]] = {}  # (line, queue) -> paused, reason, status

    def observe(self, msg: AmiMessage) -> list[QueueChange]:
        kind = _MEMBER_EVENTS.get((msg.event or "").lower())
        if kind is None:
            return []
        queue = (msg.get("Queue") or "").strip()
        interface = ""
        line = None
        for header in ("Interface", "Location", "StateInterface"):
            value = (msg.get(header) or "").strip()
            if value and (line := self._matcher.line_of_interface(value)) is not None:
                interface = value
                break
        if line is None or not queue:
            return []
        key = (line, queue)
        before = self._state.get(key)
        if kind == "removed":
            if before is None:
                return []
            del self._state[key]
            return [QueueChange(line, queue, "removed", before[0], before[1], before[2], interface)]
        paused_header = msg.get("Paused")
        paused = before[0] if paused_header is None and before is not None else _truthy(paused_header or "")
        reason = (msg.get("PausedReason") or msg.get("Reason") or "").strip() if paused else ""
        status = (msg.get("Status") or (before[2] if before is not None else "")).strip()
        self._state[key] = (paused, reason, status)
        if before is None:
            return [QueueChange(line, queue, "added", paused, reason, status, interface)]
        if (paused, reason) != before[:2]:
            return [QueueChange(line, queue, "paused" if paused else "unpaused", paused, reason, status, interface)]
        if status != before[2]:
            return [QueueChange(line, queue, "status", paused, reason, status, interface)]
        return []

    def resync(self, members: Iterable[AmiMessage]) -> list[QueueChange]:
        """A QueueStatus listing is the whole truth: report what differs, including memberships gone."""
        out: list[QueueChange] = []
        seen: set[tuple[str, str]] = set()
        for msg in members:
            changes = self.observe(msg)
            out.extend(changes)
            queue = (msg.get("Queue") or "").strip()
            for header in ("Location", "Interface", "StateInterface"):
                value = (msg.get(header) or "").strip()
                if value and (line := self._matcher.line_of_interface(value)) is not None:
                    seen.add((line, queue))
                    break
        for key in sorted(set(self._state) - seen):
            paused, reason, status = self._state.pop(key)
            out.append(QueueChange(key[0], key[1], "removed", paused, reason, status, ""))
        return out


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")
