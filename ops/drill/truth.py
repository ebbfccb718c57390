"""What every agent should have seen, from the simulator's ground truth, and what it did see.

Pure functions over plain data, so the verdict logic is unit-tested without a cluster.

Ground truth: the simulator's ``GET /calls`` lists every call it played with its Linkedid, the
variables it was played with (``line``, ``agent2`` for queue calls, ``caller``) and its start
and end times. A call that rang line L is, for L's agent, the Creatio call whose id is
``call_guid(f"{linkedid}:{L}")`` (the gateway's call id for that line, as the node encodes it).

Verdict per agent line:
* missing: a call that rang the line and never reached the agent (no event at all); a line's leg that rang
  and ended while that line's agent was disconnected is not expected (issue 11: it is not replayed after
  the reconnect, or Creatio would pop it up as a new call), nor one whose phone never rang
  (:func:`owed_lines`, shared with ops/chaos/verdict.py);
* unfinished: a call that ended before the drill's end but whose end never reached the agent;
* wrong: the agent saw the call with another caller number than the one played.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ws_node.creatio_protocol import MsgEventType

#: Scenarios in which the line's own leg lasts as long as the whole call, so "the simulator says
#: the call is live" implies "the agent's call is live". In the others (no answer, a queue's
#: second agent) the agent's ring may end while the call goes on.
WHOLE_CALL_SCENARIOS = frozenset({"inbound-direct-answered", "inbound-direct-long"})


@dataclass(frozen=True, slots=True)
class TruthCall:
    linkedid: str
    lines: tuple[str, ...]
    caller: str
    started: float
    ended: float | None
    scenario: str = ""
    #: line -> when that line's phone channel hung up (its leg can end long before the call)
    leg_ends: Mapping[str, float] = field(default_factory=dict)
    #: line -> when that line's phone channel was created (a queue member's rings after the call began)
    leg_starts: Mapping[str, float] = field(default_factory=dict)
    #: the simulator reported the call's channels (``channelsStarted``): a line without a leg never rang
    legs_reported: bool = False
    #: line -> when that line's phone first rang, was off hook or up; None: not reported (an older simulator)
    leg_alerts: Mapping[str, float] | None = None
    #: line -> when that line's phone was answered (went Up); None: not reported (an older simulator)
    leg_answers: Mapping[str, float] | None = None

    def leg_end(self, line: str) -> float | None:
        return self.leg_ends.get(line, self.ended)

    def leg_start(self, line: str) -> float:
        return self.leg_starts.get(line, self.started)

    def first_news(self, line: str) -> float:
        """When ``line``'s leg first gave its agent something to hear of: its ring (with sendRingStartedOnRingingState,
        the default, the gateway announces an incoming call on the ring, not when the PBX creates the phone's
        channel), or, for a phone that refused busy without ringing, its end; the channel's creation when the
        simulator does not report rings."""
        if self.leg_alerts is None:
            return self.leg_start(line)
        if line in self.leg_alerts:
            return self.leg_alerts[line]
        end = self.leg_end(line)
        return end if end is not None else self.leg_start(line)

    def never_rang(self, line: str) -> bool:
        """The simulator reported the call's channels and none was ``line``'s phone (e.g. a queue call whose
        PBX died before it rang the members), or whose phone channel was created but vanished without ever ringing
        (the PBX died between creating it and the phone's 180 Ringing: no Hangup, no ring, nothing to report; a
        phone that refused busy never rang either, but hung up, and its agent is owed the busy call); unknown
        (False) for a simulator that does not report them."""
        if not self.legs_reported or self.ended is None:
            return False
        if line not in self.leg_starts:
            return True
        return self.leg_alerts is not None and line not in self.leg_alerts and line not in self.leg_ends


@dataclass(slots=True)
class SeenCall:
    caller: str = ""
    event_types: list[int] = field(default_factory=list)
    #: when each of ``event_types`` arrived (wall clock, as the simulator's truth); empty where not recorded
    arrived: list[float] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return MsgEventType.RING_FINISHED in self.event_types


@dataclass(frozen=True, slots=True)
class LineVerdict:
    line: str
    expected: int
    missing: tuple[str, ...]
    unfinished: tuple[str, ...]
    wrong: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unfinished or self.wrong)


def parse_truth(payload: Mapping[str, Any], agent_lines: Iterable[str]) -> list[TruthCall]:
    """Calls from the simulator's /calls answer that involve one of the agents' lines."""
    wanted = set(agent_lines)
    calls: list[TruthCall] = []
    for item in [*payload.get("finished", []), *payload.get("live", [])]:
        variables = item.get("vars") or {}
        lines = tuple(v for v in (variables.get("line"), variables.get("agent2")) if v and v in wanted)
        if not lines or not item.get("linkedid"):
            continue
        calls.append(
            TruthCall(
                linkedid=str(item["linkedid"]),
                lines=lines,
                caller=str(variables.get("caller", "")),
                started=float(item.get("started") or 0.0),
                ended=float(item["ended"]) if item.get("ended") else None,
                scenario=str(item.get("scenario", "")),
                leg_ends=_leg_times(item.get("channelsEnded") or {}, lines, max),
                leg_starts=_leg_times(item.get("channelsStarted") or {}, lines, min),
                legs_reported="channelsStarted" in item,
                leg_alerts=(_leg_times(item["channelsAlerted"], lines, min) if "channelsAlerted" in item else None),
                leg_answers=(_leg_times(item["channelsAnswered"], lines, min) if "channelsAnswered" in item else None),
            )
        )
    return calls


def _leg_times(times_by_channel: Mapping[str, Any], lines: Iterable[str],
               pick: Callable[[list[float]], float]) -> dict[str, float]:
    """Per line, the time of its phone channel (``SIP/305-0000002a``) in ``times_by_channel``; ``pick``
    chooses among several (a line rung twice in one call: its first start, its last end)."""
    found: dict[str, float] = {}
    for line in lines:
        pattern = re.compile(rf"^[A-Za-z0-9]+/{re.escape(line)}-[0-9a-f]+$")
        times = [float(t) for name, t in times_by_channel.items() if pattern.match(name)]
        if times:
            found[line] = pick(times)
    return found


#: a leg that began this close before its agent's connection dropped counts as begun in the drop: frames in
#: flight die with the connection (Creatio's protocol has no acknowledgements)
IN_FLIGHT_SLACK = 0.5


def leg_missed_while_away(call: TruthCall, line: str, outages: Iterable[tuple[float, float]]) -> bool:
    """``line``'s leg of ``call`` (its phone channel) rang and ended while that agent was disconnected
    (``outages``: its (dropped, ready again) times; ready 0 = never back), or began within :data:`IN_FLIGHT_SLACK`
    before the drop. Such a call is not sent after the reconnect, by design (docs/creatio-protocol.md,
    issue 11: Creatio would pop a replayed ring up as a new call; the call is in Creatio's call records)."""
    start, end = call.leg_start(line), call.leg_end(line)
    if end is None:
        return False
    return any(dropped - IN_FLIGHT_SLACK <= start and (not ready or end <= ready) for dropped, ready in outages)


def owed_lines(call: TruthCall, outages: Mapping[str, Iterable[tuple[float, float]]]) -> tuple[str, ...]:
    """The lines of ``call`` whose agent (one per line, ``outages`` by line) can be expected to hear of it: not
    a line whose phone never rang, nor one whose leg it missed while away. Judged per line: a queue call's
    second agent may have been away while the first was not."""
    return tuple(line for line in call.lines
                 if not call.never_rang(line) and not leg_missed_while_away(call, line, outages.get(line, ())))


def judge(
    truth: Iterable[TruthCall],
    seen_by_line: Mapping[str, Mapping[str, SeenCall]],
    guid: Callable[[str], str],
) -> list[LineVerdict]:
    expected: dict[str, list[TruthCall]] = {}
    for call in truth:
        for line in call.lines:
            expected.setdefault(line, []).append(call)
    verdicts = []
    for line in sorted(set(expected) | set(seen_by_line)):
        seen = seen_by_line.get(line, {})
        missing, unfinished, wrong = [], [], []
        for call in expected.get(line, []):
            observed = seen.get(guid(f"{call.linkedid}:{line}"))
            if observed is None:
                missing.append(call.linkedid)
                continue
            if call.ended is not None and not observed.finished:
                unfinished.append(call.linkedid)
            if call.caller and observed.caller and observed.caller != call.caller:
                wrong.append(call.linkedid)
        verdicts.append(
            LineVerdict(line, len(expected.get(line, [])), tuple(missing), tuple(unfinished), tuple(wrong))
        )
    return verdicts


def lost_evidence(
    verdicts: Iterable[LineVerdict],
    truth: Iterable[TruthCall],
    seen_by_line: Mapping[str, Mapping[str, SeenCall]],
    outages: Mapping[str, Iterable[tuple[float, float]]],
    guid: Callable[[str], str],
    limit: int = 50,
) -> list[dict[str, Any]]:
    """For each call a verdict counts against a line (up to ``limit``): the simulator's times for that line's leg,
    the agent's outages and what it received of the call, so a loss can be told from a judge's mistake afterwards."""
    by_id = {call.linkedid: call for call in truth}
    found: list[dict[str, Any]] = []
    for verdict in verdicts:
        for kind, ids in (("missing", verdict.missing), ("unfinished", verdict.unfinished), ("wrong", verdict.wrong)):
            for linkedid in ids:
                if len(found) >= limit:
                    return found
                call = by_id.get(linkedid)
                seen = seen_by_line.get(verdict.line, {}).get(guid(f"{linkedid}:{verdict.line}"))
                line = verdict.line
                found.append({
                    "line": line, "kind": kind, "linkedid": linkedid,
                    "scenario": call.scenario if call else "", "lines": list(call.lines) if call else [],
                    "started": call.started if call else None, "ended": call.ended if call else None,
                    "leg_start": call.leg_start(line) if call else None,
                    "leg_rang": (call.leg_alerts or {}).get(line) if call else None,
                    "leg_answered": (call.leg_answers or {}).get(line) if call else None,
                    "leg_end": call.leg_end(line) if call else None,
                    "outages": [list(o) for o in outages.get(line, ())],
                    "seen": list(zip(seen.event_types, seen.arrived, strict=False)) if seen else [],
                })
    return found


def snapshot_is_correct(
    snapshot_call_ids: Iterable[str],
    truth: Iterable[TruthCall],
    line: str,
    at: float,
    guid: Callable[[str], str],
    slack: float = 1.0,
) -> bool:
    """Every call surely live on the line at ``at`` is in the snapshot, and nothing surely dead is.

    ``slack`` absorbs the few hundred milliseconds between the simulator's clock and the
    moment the gateway processed the event: calls starting or ending that close to ``at`` may
    legitimately be on either side.
    """
    in_snapshot = set(snapshot_call_ids)
    for call in truth:
        if line not in call.lines:
            continue
        call_id = guid(f"{call.linkedid}:{line}")
        whole = call.scenario in WHOLE_CALL_SCENARIOS and call.lines[0] == line
        surely_live = whole and call.started < at - slack and (call.ended is None or call.ended > at + slack)
        surely_dead = (call.ended is not None and call.ended < at - slack) or call.started > at + slack
        if surely_live and call_id not in in_snapshot:
            return False
        if surely_dead and call_id in in_snapshot:
            return False
    return True


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
