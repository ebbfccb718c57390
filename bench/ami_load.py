"""AMI load: a large, realistic event stream made from the simulator's scenarios, and the call mix.

Calls of the shipped scenarios (direct answered/unanswered/abandoned/busy, queue calls ringing two
agents, click-to-dial originates) are rendered with the simulator's own renderer, so every
Uniqueid, channel and bridge id is fresh, and interleaved by their due times as if the calls had
overlapped on a busy PBX. The result is the exact byte stream a gateway would read.
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ami.protocol import AmiMessage
from ami.scenario import IdAllocator
from ami_simulator.builtin import builtin_scenario

__all__ = ["CALL_MIX", "CallPlan", "mean_events_per_call", "plan_calls", "synthesize_ami"]

# (scenario, weight): the simulator's demo mix (ami_simulator.__main__.DEMO_MIX) with a long call.
CALL_MIX: tuple[tuple[str, int], ...] = (
    ("inbound-direct-answered", 4),
    ("inbound-direct-noanswer", 1),
    ("inbound-direct-abandoned", 1),
    ("inbound-busy", 1),
    ("inbound-queue", 3),
    ("outbound-originate", 3),
)
CALLERS = ("79161234567", "79035550101", "74951234567", "79260001122", "79998887766")


@dataclass(frozen=True, slots=True)
class CallPlan:
    scenario: str
    variables: dict[str, str]
    lines: tuple[str, ...]  # the agent lines the call rings


def plan_calls(count: int, lines: Sequence[str], rng: random.Random,
               mix: Sequence[tuple[str, int]] = CALL_MIX) -> Iterator[CallPlan]:
    """``count`` calls of the mix on random ``lines`` (queue calls ring a second line too)."""
    names = [name for name, _ in mix]
    weights = [weight for _, weight in mix]
    for i in range(count):
        scenario = rng.choices(names, weights)[0]
        line = rng.choice(lines)
        variables = {"line": line, "caller": rng.choice(CALLERS), "callerName": f"Caller {i}"}
        involved = [line]
        if scenario == "inbound-queue" and len(lines) > 1:
            agent2 = rng.choice([x for x in lines[:64] if x != line] or [line])
            variables |= {"agent2": agent2, "queue": "support"}
            involved.append(agent2)
        elif scenario == "outbound-originate":
            variables |= {"number": f"8495{rng.randint(1000000, 9999999)}", "actionid": f"bench-{i}"}
        yield CallPlan(scenario, variables, tuple(involved))


def mean_events_per_call(mix: Sequence[tuple[str, int]] = CALL_MIX) -> float:
    total_weight = sum(w for _, w in mix)
    return sum(
        w * sum(1 for step in builtin_scenario(name).steps if isinstance(step.item, AmiMessage))
        for name, w in mix
    ) / total_weight


def synthesize_ami(events: int, lines: Sequence[str], *, calls_per_second: float = 40.0, seed: int = 7,
                   start: float | None = None) -> tuple[bytes, int]:
    """At least ``events`` AMI events as wire bytes (CRLF, no banner), interleaved by due time.

    Returns ``(data, event_count)``.
    """
    rng = random.Random(seed)
    ids = IdAllocator(first_sequence=rng.randint(0, 1000) * 10)
    t0 = time.time() if start is None else start
    per_call = mean_events_per_call()
    calls = max(1, int(events / per_call) + 1)
    heap: list[tuple[float, int, bytes]] = []
    order = 0
    for i, plan in enumerate(plan_calls(calls, lines, rng)):
        begin = t0 + i / calls_per_second
        rendered = builtin_scenario(plan.scenario).render(ids, plan.variables, start=begin)
        due = begin
        for step in rendered.steps:
            due += step.delay
            if isinstance(step.item, AmiMessage):
                heapq.heappush(heap, (due, order, step.item.encode()))
                order += 1
    chunks = [item for _, _, item in sorted(heap)]
    return b"".join(chunks[: max(events, 1)]), min(len(chunks), max(events, 1))
