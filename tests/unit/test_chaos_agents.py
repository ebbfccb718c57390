"""The chaos agents' frame handling on both transports (no sockets), and a run's evidence judged again."""

from __future__ import annotations

import dataclasses
import json

from ops.chaos.agents import RS, ChaosAgent
from ops.chaos.harness import observe
from ops.chaos.verdict import judge_evidence


def event(event_type: int, content: object) -> str:
    return json.dumps({"eventType": event_type, "content": json.dumps(content), "connectionUId": "c"})


def test_raw_websocket_frames_are_recorded_with_their_time() -> None:
    agent = ChaosAgent("ws://x/", "500")
    for text in agent._texts(event(5, {"id": "call-1", "callerId": "7916"})):
        assert agent._record(text, 10.0) == 5
    agent._record(event(6, {"id": "call-1"}), 12.0)
    assert agent.events == {"call-1": [(5, 10.0), (6, 12.0)]}
    assert agent.callers == {"call-1": "7916"}


def test_signalr_records_carry_the_same_events_and_pings_are_ignored() -> None:
    agent = ChaosAgent("http://x/", "500", transport="signalr")
    invocation = {"type": 1, "target": "ServerMessage", "arguments": [event(7, {"id": "call-2"})]}
    message = '{"type":6}' + RS + json.dumps(invocation) + RS + '{"type":3,"invocationId":"1"}' + RS
    texts = agent._texts(message)
    assert len(texts) == 1
    agent._record(texts[0], 5.0)
    assert agent.events == {"call-2": [(7, 5.0)]}


def test_a_snapshot_is_matched_to_the_question_it_answers() -> None:
    agent = ChaosAgent("ws://x/", "500")
    agent._asked.append(3.0)
    snapshot = {"ActiveCalls": [json.dumps({"id": "call-3", "callerId": "1"}), {"id": "call-4"}], "CurrentCall": None}
    agent._record(event(10, snapshot), 4.5)
    agent._record(event(10, {"ActiveCalls": []}), 6.0)  # unasked (a reconnect's): asked = read time
    assert [(s.asked, s.at, s.call_ids) for s in agent.snapshots] == [(3.0, 4.5, ("call-3", "call-4")), (6.0, 6.0, ())]
    assert agent.events == {}  # a snapshot is not an event


def test_evidence_round_trip() -> None:
    agent = ChaosAgent("ws://x/", "500")
    agent._record(event(5, {"id": "g-1:500"}), 101.0)
    agent._record(event(7, {"id": "g-1:500"}), 102.0)
    agent._record(event(6, {"id": "g-1:500"}), 105.0)
    for t in range(100, 110):
        agent._asked.append(float(t))
        agent._record(event(10, {"ActiveCalls": []}), t + 0.01)
    evidence = json.loads(json.dumps({
        "phases": [{"name": "baseline", "start": 99.0, "fault_start": 100.0, "fault_end": 100.0, "end": 110.0}],
        "truth": {"finished": [{"linkedid": "1", "scenario": "inbound-direct-answered", "started": 100.5,
                                "ended": 105.0, "vars": {"line": "500", "caller": "7916"}}], "live": []},
        "agents": [{**dataclasses.asdict(observe(agent)), "transport": "ws"}],
        "commands": [],
    }))
    [report] = judge_evidence(evidence, lambda key: f"g-{key}")
    assert report.calls == 1 and report.lost == 0 and not report.missed and report.phase.open_ended
    assert report.passed, report.targets()


def test_an_agent_that_never_gets_back_is_counted_even_when_the_run_ends_mid_retry() -> None:
    import asyncio

    from local_cluster.infra import free_port

    async def main() -> ChaosAgent:
        agent = ChaosAgent(f"ws://127.0.0.1:{free_port()}/", "500", reconnect_delay=0.05)  # nothing listens
        task = asyncio.create_task(agent.run())
        await asyncio.sleep(0.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return agent

    agent = asyncio.run(main())
    assert len(agent.outages) == 1
    assert agent.outages[0].ready_at == 0.0 and agent.outages[0].attempts >= 1
