"""Per-fault verdicts of a chaos run: the simulator's ground truth against what every agent saw.

Pure functions over plain data (unit-tested without a cluster). Nothing here knows which fault
was injected beyond its :class:`Phase`: the times it started and ended and whether it is one in
which agents may lose their connection (a node killed or stopped).

Definitions (docs/chaos.md explains them for operators):

* A call belongs to the phase in which the simulator started it; its end (RING_FINISHED, or an end that
  never reached the agent) to the phase in which it ended.
* **Recovery began** at the phase's ``fault_end`` (the fault was removed: the process restarted,
  the link healed, the node was killed and its agents may retry). For an agent that lost its
  connection in the phase, its own recovery began when it was connected again with a snapshot.
* **Lost**: a call that rang an agent's line and never reached the agent at all (neither an event
  nor a snapshot), or ended without its end reaching the agent, or reached it with the wrong caller.
* **Missed**: for calls that started after recovery began, an event the agent must get for that
  scenario (RING_STARTED, COMMUTATION_STARTED, RING_FINISHED; :data:`EXPECTED_EVENTS`) it did not get.
* **Duplicates**: the same call event delivered more than once; **out of order**: a call's events
  not in the order ring, commutation, finish.
* **Ghost**: a call in a snapshot that was surely over (or never rang that line), in snapshots taken
  once the agent should be consistent again; **consistent** from the first snapshot after which all
  of the agent's snapshots in the phase are right (nothing surely over, nothing surely live missing).
* **Commands**: each click-to-dial has a unique number; the simulator's Originates with that number
  are its executions: more than one is "executed twice", one later than the command's TTL after it
  was sent is "stale" (executed after the caller gave up).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ops.drill.truth import (
    IN_FLIGHT_SLACK,
    SeenCall,
    TruthCall,
    judge,
    leg_missed_while_away,
    parse_truth,
    percentile,
)
from ws_node.creatio_protocol import MsgEventType

# Creatio's event numbers, from the one module that has them (the drill and the bench use it too).
RING_STARTED, RING_FINISHED = MsgEventType.RING_STARTED, MsgEventType.RING_FINISHED
COMMUTATION_STARTED, ABONENT_BUSY = MsgEventType.COMMUTATION_STARTED, MsgEventType.ABONENT_BUSY
#: a call seen in a snapshot, recorded among the events
SNAPSHOT = MsgEventType.ACTIVE_CALL_SNAPSHOT
EVENT_NAMES: dict[int, str] = {
    kind: kind.name for kind in (RING_STARTED, COMMUTATION_STARTED, RING_FINISHED, ABONENT_BUSY)
}
#: call events that happen at most once per call and line in the traffic mix
ONCE_EVENTS = frozenset(EVENT_NAMES)
ORDER: dict[int, int] = {RING_STARTED: 0, COMMUTATION_STARTED: 1, ABONENT_BUSY: 1, RING_FINISHED: 2}

#: (scenario, role) -> events the line's agent must get; role 0 is the line dialled, 1 the queue's
#: second member. Checked against a fault-free baseline at the start of every run.
EXPECTED_EVENTS: Mapping[tuple[str, int], frozenset[int]] = {
    ("inbound-direct-answered", 0): frozenset({RING_STARTED, COMMUTATION_STARTED, RING_FINISHED}),
    ("inbound-direct-long", 0): frozenset({RING_STARTED, COMMUTATION_STARTED, RING_FINISHED}),
    ("inbound-direct-noanswer", 0): frozenset({RING_STARTED, RING_FINISHED}),
    ("inbound-direct-abandoned", 0): frozenset({RING_STARTED, RING_FINISHED}),
    ("inbound-busy", 0): frozenset({RING_STARTED, ABONENT_BUSY, RING_FINISHED}),
    ("inbound-queue", 0): frozenset({RING_STARTED, COMMUTATION_STARTED, RING_FINISHED}),
    ("inbound-queue", 1): frozenset({RING_STARTED, RING_FINISHED}),
}

CONSISTENT_WITHIN = 5.0
#: share of a killed or stopped node's agents that must be consistent within 5 s of their first retry
NODE_FAULT_SHARE = 0.99
#: calls starting this close to the moment recovery began may legitimately be on either side
START_SLACK = 0.5
#: snapshot times vs the simulator's clock (the gateway processes an event a little later)
SNAPSHOT_SLACK = 1.0
COMMAND_SLACK = 0.5


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    start: float
    fault_start: float
    fault_end: float
    end: float
    #: a node was killed or stopped: its agents may drop (and are timed from their first retry)
    node_fault: bool = False
    applicable: bool = True
    note: str = ""
    #: the last phase: calls that end after it (hung up when the run ends) are judged in it
    open_ended: bool = False
    #: no gateway could hear the PBX from fault_start to fault_end (the AMI link was cut): a line's leg that
    #: began and ended in that time left no trace anybody could report (Asterisk does not replay events)
    pbx_unheard: bool = False
    #: when a gateway was logged in and resynced again after such a fault (0: at fault_end)
    pbx_heard_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Drop:
    dropped_at: float
    first_retry_at: float
    #: 0.0 when the agent never got back
    ready_at: float
    #: when each retry began, the first one included (empty in evidence of runs that did not record them)
    retries: tuple[float, ...] = ()

    def first_retry_from(self, at: float) -> float:
        """When the agent first tried again at or after ``at``: for a fault that took the whole cluster away, its
        earlier retries found nothing to connect to, and when it tries next is its backoff's choice (Creatio's:
        5 s, then longer), not something the cluster can make sooner."""
        later = [r for r in self.retries if r >= at]
        return min(later) if later else max(at, self.first_retry_at)


@dataclass(frozen=True, slots=True)
class Observation:
    """What one agent saw during the whole run."""

    line: str
    events: Mapping[str, Sequence[tuple[int, float]]]
    callers: Mapping[str, str]
    #: (asked at, answered at, call ids)
    snapshots: Sequence[tuple[float, float, tuple[str, ...]]]
    drops: Sequence[Drop] = ()


@dataclass(frozen=True, slots=True)
class Originate:
    number: str
    started: float


@dataclass
class PhaseReport:
    phase: Phase
    calls: int = 0
    agents_disconnected: int = 0
    not_reconnected: int = 0
    lost: int = 0
    lost_calls: list[str] = field(default_factory=list)
    missed: Counter[int] = field(default_factory=Counter)
    missed_calls: list[str] = field(default_factory=list)
    duplicates: int = 0
    out_of_order: int = 0
    ghosts: int = 0
    live_missing_from_snapshots: int = 0
    consistent_seconds: list[float] = field(default_factory=list)
    never_consistent: int = 0
    #: seconds until consistent (inf: not within the phase), agents that dropped in it and the others
    consistent_dropped: list[float] = field(default_factory=list)
    consistent_stayed: list[float] = field(default_factory=list)
    commands: int = 0
    commands_twice: int = 0
    commands_stale: int = 0
    commands_not_executed: int = 0

    @property
    def consistent_p99(self) -> float:
        return percentile(self.consistent_seconds, 99) if self.consistent_seconds else math.nan

    @property
    def consistent_max(self) -> float:
        return max(self.consistent_seconds) if self.consistent_seconds else math.nan

    def targets(self) -> dict[str, bool]:
        """Issue 10's targets, each PASS (True) or FAIL."""
        p = self.phase
        stayed_ok = bool(self.consistent_stayed) and max(self.consistent_stayed) <= CONSISTENT_WITHIN
        if p.node_fault:
            # issue 10: "node kill: 99 % within 5 s of first retry"; agents the fault did not touch: all
            dropped = self.consistent_dropped
            share = sum(s <= CONSISTENT_WITHIN for s in dropped) / len(dropped) if dropped else 1.0
            disconnects_ok = self.not_reconnected == 0
            consistent_ok = share >= NODE_FAULT_SHARE and (stayed_ok or not self.consistent_stayed)
        else:
            disconnects_ok = self.agents_disconnected == 0 and self.not_reconnected == 0
            everyone = self.consistent_stayed + self.consistent_dropped
            consistent_ok = bool(everyone) and max(everyone) <= CONSISTENT_WITHIN
        return {
            "0 calls lost": self.lost == 0,
            "0 missed after recovery": sum(self.missed.values()) == 0,
            "0 ghost calls after recovery": self.ghosts == 0 and self.live_missing_from_snapshots == 0,
            "0 commands twice or stale": self.commands_twice == 0 and self.commands_stale == 0,
            "disconnects only for a node fault": disconnects_ok,
            "consistent within 5 s": consistent_ok,
        }

    @property
    def passed(self) -> bool:
        return all(self.targets().values())


def parse_originates(payload: Mapping[str, Any]) -> list[Originate]:
    """Click-to-dial calls the simulator executed (one per AMI Originate it received)."""
    result = []
    for item in [*payload.get("finished", []), *payload.get("live", [])]:
        if item.get("scenario") == "outbound-originate":
            number = str((item.get("vars") or {}).get("number", ""))
            if number:
                result.append(Originate(number, float(item.get("started") or 0.0)))
    return result


class TruthLog:
    """Every call the simulator played, from /calls answers read now and then.

    The simulator keeps only its last 1,000 finished calls, and an Asterisk that restarts forgets
    everything, so the run reads /calls often and keeps every call it ever saw. A lifetime that ended
    in a crash (:meth:`crashed`) leaves its live calls over at that moment: a restarted Asterisk has
    no calls.
    """

    def __init__(self) -> None:
        self._calls: dict[str, dict[str, Any]] = {}
        self._over: set[str] = set()

    def add(self, payload: Mapping[str, Any]) -> None:
        for item in payload.get("finished", []):
            key = str(item.get("linkedid"))
            self._calls[key] = dict(item)
            self._over.add(key)
        for item in payload.get("live", []):
            key = str(item.get("linkedid"))
            if key not in self._over:
                self._calls[key] = dict(item)

    def crashed(self, payload: Mapping[str, Any], at: float) -> None:
        """The last answer of a lifetime that ended at ``at`` without ending its calls."""
        self.add(payload)
        for key, item in self._calls.items():
            if key not in self._over:
                self._calls[key] = {**item, "ended": at, "state": "crashed"}
                self._over.add(key)

    def payload(self) -> dict[str, Any]:
        """All calls, shaped as one /calls answer."""
        return {"finished": [c for k, c in self._calls.items() if k in self._over],
                "live": [c for k, c in self._calls.items() if k not in self._over]}


def _role(call: TruthCall, line: str) -> int:
    return call.lines.index(line)


def _ring_ids(truth: Iterable[TruthCall], line: str, guid: Callable[[str], str]) -> dict[str, TruthCall]:
    return {guid(f"{c.linkedid}:{line}"): c for c in truth if line in c.lines}


def snapshot_errors(
    call_ids: Iterable[str], calls_of_line: Mapping[str, TruthCall], line: str, asked: float,
    answered: float | None = None, slack: float = SNAPSHOT_SLACK,
) -> tuple[int, int]:
    """(ghosts, live calls missing) in one snapshot asked for at ``asked`` and read at ``answered``.

    The state it shows was true at some moment in between (the harness may read it late on a busy
    machine). A ghost is a call surely over (ended before ``asked - slack``), or one that never rang
    the line; a missing call is surely live: its scenario keeps the line's leg as long as the call,
    it started before ``asked - slack`` and had not ended by ``answered + slack``.
    """
    at = asked
    until = answered if answered is not None else asked
    from ops.drill.truth import WHOLE_CALL_SCENARIOS

    shown = set(call_ids)
    ghosts = 0
    for call_id in shown:
        call = calls_of_line.get(call_id)
        if call is None or (call.ended is not None and call.ended < at - slack) or call.started > until + slack:
            ghosts += 1
    missing = 0
    for call_id, call in calls_of_line.items():
        whole = call.scenario in WHOLE_CALL_SCENARIOS and _role(call, line) == 0
        if (whole and call.started < at - slack and (call.ended is None or call.ended > until + slack)
                and call_id not in shown):
            missing += 1
    return ghosts, missing


def _missed(report: PhaseReport, line: str, call: TruthCall, not_seen: frozenset[int] | set[int]) -> None:
    if not_seen:
        report.missed.update(not_seen)
        report.missed_calls.append(f"{line}:{call.linkedid}:{call.scenario}:-"
                                   + ",".join(EVENT_NAMES[t] for t in sorted(not_seen)))


def _drop_in(obs: Observation, phase: Phase) -> Drop | None:
    drops = [d for d in obs.drops if phase.fault_start <= d.dropped_at < phase.end]
    return drops[0] if drops else None


#: a line's leg that ends this soon after the AMI link is back was still over before the gateway could look
UNHEARD_SLACK = 0.5


def _unheard(at: float, leg_end: float, phases: Sequence[Phase]) -> bool:
    """Whether a moment of a leg at ``at`` fell while no gateway could hear the PBX, and the leg was over before one
    could look again (a resync finds its channel gone: the moment left no trace). AMI events written within
    :data:`IN_FLIGHT_SLACK` before the cut die with the connection, as an agent's frames do."""
    return any(p.pbx_unheard and p.fault_start - IN_FLIGHT_SLACK <= at
               and leg_end <= max(p.fault_end, p.pbx_heard_at) + UNHEARD_SLACK for p in phases)


def _expected_lines(call: TruthCall, observations: Sequence[Observation], phases: Sequence[Phase]) -> tuple[str, ...]:
    """The lines of ``call`` whose agent can be expected to hear of it. Not a line whose phone never rang,
    nor one whose leg (its phone channel, which can begin after and end long before the call: a queue
    member, a phone refusing busy) rang and ended

    * while that line's agent was disconnected (or began within :data:`IN_FLIGHT_SLACK` before): such a
      call is not sent after the reconnect, by design (docs/creatio-protocol.md, issue 11: Creatio would
      pop a replayed ring up as a new call; the call is in Creatio's call records instead);
    * while no gateway could hear the PBX (:attr:`Phase.pbx_unheard`): nothing is left to report. What counts
      is when the phone rang (:meth:`TruthCall.first_news`), not when its channel was created: a queue member's
      phone created just before the AMI link was cut, ringing and cancelled inside the cut, was never heard
      ringing by anybody.
    """
    kept: list[str] = []
    for line in call.lines:
        if call.never_rang(line):
            continue
        leg_end = call.leg_end(line)
        if leg_end is None:
            kept.append(line)
            continue
        agents = [o for o in observations if o.line == line]
        away = bool(agents) and all(
            leg_missed_while_away(call, line, [(d.dropped_at, d.ready_at) for d in o.drops]) for o in agents
        )
        if not (away or _unheard(call.first_news(line), leg_end, phases)):
            kept.append(line)
    return tuple(kept)


def _answer_unheard(call: TruthCall, line: str, phases: Sequence[Phase]) -> bool:
    """``line``'s phone was answered while no gateway could hear the PBX, and hung up before one could look again:
    nobody can report that answer (the resync finds the call over and ends it). Unknown (False) for a simulator
    that does not report answers."""
    answered = (call.leg_answers or {}).get(line)
    leg_end = call.leg_end(line)
    return answered is not None and leg_end is not None and _unheard(answered, leg_end, phases)


def expected_truth(truth: Sequence[TruthCall], observations: Sequence[Observation],
                   phases: Sequence[Phase] = ()) -> list[TruthCall]:
    """``truth`` with each call reduced to the lines that must hear of it (calls with none left out)."""
    out: list[TruthCall] = []
    for call in truth:
        lines = _expected_lines(call, observations, phases)
        if lines == call.lines:
            out.append(call)
        elif lines:
            out.append(replace(call, lines=lines))
    return out


def judge_phase(
    phase: Phase,
    truth: Sequence[TruthCall],
    observations: Sequence[Observation],
    originates: Sequence[Originate],
    guid: Callable[[str], str],
    commands: Sequence[tuple[str, float]] = (),
    command_ttl: float = 5.0,
    run_phases: Sequence[Phase] = (),
) -> PhaseReport:
    """``observations``: the agents of the lines the traffic rings; ``commands``: (number, sent at)
    of every click-to-dial the command agents sent; ``run_phases``: every phase of the run, for the times no
    gateway could hear the PBX (a call of this phase may ring or be answered in the next fault's AMI cut)."""
    report = PhaseReport(phase)
    if not phase.applicable:
        return report
    deaf = (phase, *(p for p in run_phases if p.pbx_unheard and p != phase))
    truth = expected_truth(truth, observations, deaf)
    in_phase = [c for c in truth if phase.start <= c.started < phase.end]
    # A call's end belongs to the phase in which it happened: a 90 s call may start in one phase and
    # end in another fault's; the last phase also takes the calls hung up after it.
    ended_in_phase = [c for c in truth if c.ended is not None and phase.start <= c.ended
                      and (c.ended < phase.end or phase.open_ended)]
    report.calls = len(in_phase)

    # lost: ops/drill's judge; missing and wrong by the call's start, unfinished by its end
    seen: dict[str, dict[str, SeenCall]] = {}
    for obs in observations:
        calls: dict[str, SeenCall] = {}
        for call_id, events in obs.events.items():
            calls[call_id] = SeenCall(obs.callers.get(call_id, ""), [t for t, _ in events])
        for _, _, ids in obs.snapshots:
            for call_id in ids:
                calls.setdefault(call_id, SeenCall(obs.callers.get(call_id, ""))).event_types.append(SNAPSHOT)
        seen[obs.line] = calls
    for verdict in judge(in_phase, seen, guid):
        for linkedid in (*verdict.missing, *verdict.wrong):
            report.lost += 1
            report.lost_calls.append(f"{verdict.line}:{linkedid}")
    for verdict in judge(ended_in_phase, seen, guid):
        for linkedid in verdict.unfinished:
            report.lost += 1
            report.lost_calls.append(f"{verdict.line}:{linkedid}:no end")

    for obs in observations:
        drop = _drop_in(obs, phase)
        if drop is not None:
            report.agents_disconnected += 1
            if not drop.ready_at:
                report.not_reconnected += 1
        recovered = max(phase.fault_end, drop.ready_at if drop else 0.0) if not (drop and not drop.ready_at) \
            else math.inf
        for call in in_phase:
            if obs.line not in call.lines:
                continue
            types = [t for t, _ in obs.events.get(guid(f"{call.linkedid}:{obs.line}"), ())]
            counts = Counter(t for t in types if t in ONCE_EVENTS)
            report.duplicates += sum(n - 1 for n in counts.values() if n > 1)
            ranks = [ORDER[t] for t in types if t in ORDER]
            if any(b < a for a, b in zip(ranks, ranks[1:], strict=False)):
                report.out_of_order += 1
            if call.started >= recovered + START_SLACK:
                expected = EXPECTED_EVENTS.get((call.scenario, _role(call, obs.line)), frozenset())
                if _answer_unheard(call, obs.line, deaf):
                    expected -= {COMMUTATION_STARTED}
                _missed(report, obs.line, call, (expected - {RING_FINISHED}) - set(types))
        for call in ended_in_phase:
            if obs.line not in call.lines or call.ended is None or call.ended < recovered + START_SLACK:
                continue
            expected = EXPECTED_EVENTS.get((call.scenario, _role(call, obs.line)), frozenset())
            types = [t for t, _ in obs.events.get(guid(f"{call.linkedid}:{obs.line}"), ())]
            _missed(report, obs.line, call, (expected & {RING_FINISHED}) - set(types))

    # consistency, from the snapshots every agent was given after recovery began
    for obs in observations:
        drop = _drop_in(obs, phase)
        reference = phase.fault_end
        if phase.node_fault and drop is not None:
            # issue 10: "node kill: 99 % within 5 s of first retry"; after a cluster restart, of the first retry
            # once the cluster serves again (docs/chaos.md: "agents from their first retry if later")
            reference = drop.first_retry_from(reference)
        calls_of_line = _ring_ids(truth, obs.line, guid)
        consistent_at: float | None = None
        for at, answered, ids in obs.snapshots:
            if not phase.fault_end <= at < phase.end:
                continue
            ghosts, missing = snapshot_errors(ids, calls_of_line, obs.line, at, answered)
            if at >= reference + CONSISTENT_WITHIN:
                report.ghosts += ghosts
                report.live_missing_from_snapshots += missing
            if ghosts or missing:
                consistent_at = None
            elif consistent_at is None:
                consistent_at = at
        later_drop = any(consistent_at is not None and d.dropped_at > consistent_at and d.dropped_at < phase.end
                         for d in obs.drops)
        seconds = math.inf if consistent_at is None or later_drop else max(0.0, consistent_at - reference)
        if seconds == math.inf:
            report.never_consistent += 1
        else:
            report.consistent_seconds.append(seconds)
        (report.consistent_dropped if drop is not None else report.consistent_stayed).append(seconds)

    # commands
    executions: dict[str, list[float]] = {}
    for originate in originates:
        executions.setdefault(originate.number, []).append(originate.started)
    for number, sent_at in commands:
        if not phase.start <= sent_at < phase.end:
            continue
        report.commands += 1
        done = executions.get(number, [])
        if not done:
            report.commands_not_executed += 1
        if len(done) > 1:
            report.commands_twice += 1
        if any(started - sent_at > command_ttl + COMMAND_SLACK for started in done):
            report.commands_stale += 1
    return report


def judge_evidence(evidence: Mapping[str, Any], guid: Callable[[str], str]) -> list[PhaseReport]:
    """Every phase's report from a run's saved evidence (what `make chaos` writes to evidence.json)."""
    phases = [Phase(**p) for p in evidence["phases"]]
    if phases:
        phases[-1] = Phase(**{**evidence["phases"][-1], "open_ended": True})
    payload = evidence["truth"]
    observations = [
        Observation(
            line=a["line"],
            events={k: [(int(t), float(at)) for t, at in v] for k, v in a["events"].items()},
            callers=a["callers"],
            snapshots=[(float(asked), float(at), tuple(ids)) for asked, at, ids in a["snapshots"]],
            drops=[Drop(**d) for d in a["drops"]],
        )
        for a in evidence["agents"]
    ]
    truth = parse_truth(payload, [o.line for o in observations])
    originates = parse_originates(payload)
    commands = [(str(c["number"]), float(c["at"])) for c in evidence.get("commands", [])]
    return [judge_phase(p, truth, observations, originates, guid, commands, run_phases=phases) for p in phases]


def format_table(reports: Sequence[PhaseReport]) -> str:
    """The per-fault table `make chaos` prints."""
    header = ("fault", "calls", "disc", "lost", "missed RS/CS/RF", "dup", "ooo", "ghost", "cmd x2/stale",
              "consistent p99/max", "verdict")
    rows: list[tuple[str, ...]] = []
    for r in reports:
        if not r.phase.applicable:
            rows.append((r.phase.name, "-", "-", "-", "-", "-", "-", "-", "-", "-", f"n/a: {r.phase.note}"))
            continue
        failed = [name for name, ok in r.targets().items() if not ok]
        consistent = (f"{r.consistent_p99:.1f}/{r.consistent_max:.1f}s" if r.consistent_seconds else "-")
        if r.never_consistent:
            consistent += f" ({r.never_consistent} never)"
        rows.append((
            r.phase.name, str(r.calls),
            f"{r.agents_disconnected}" + (f" ({r.not_reconnected} not back)" if r.not_reconnected else ""),
            str(r.lost),
            f"{r.missed[RING_STARTED]}/{r.missed[COMMUTATION_STARTED]}/{r.missed[RING_FINISHED]}"
            + (f" +{r.missed[ABONENT_BUSY]}" if r.missed[ABONENT_BUSY] else ""),
            str(r.duplicates), str(r.out_of_order),
            str(r.ghosts) + (f" ({r.live_missing_from_snapshots} live missing)" if r.live_missing_from_snapshots
                             else ""),
            f"{r.commands_twice}/{r.commands_stale} of {r.commands}",
            consistent,
            "PASS" if not failed else "FAIL: " + "; ".join(failed),
        ))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
