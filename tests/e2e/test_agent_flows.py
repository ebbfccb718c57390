"""Every call flow, command and event type, through the real cluster.

simulator -> gateway -> RabbitMQ -> 2 nodes -> HAProxy -> :class:`CreatioAgent` (a client that speaks
like Creatio's). One cluster serves the module; each test keeps to lines of its own.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from local_cluster.infra import Infrastructure
from local_cluster.launcher import ClusterOptions, LocalCluster, http_get
from tests.support.creatio_client import (
    ABONENT_BUSY,
    ACTIVE_CALL_SNAPSHOT,
    AGENT_STATE_CHANGED,
    COMMUTATION_STARTED,
    DTMF_ENTERED,
    END_HOLD_ACTION,
    ERROR,
    LINE_STATE_CHANGED,
    PUT_HOLD_ACTION,
    RING_FINISHED,
    RING_STARTED,
    CreatioAgent,
    Received,
    calls_in_snapshot,
)

pytestmark = pytest.mark.e2e

CALLER = "79161112233"
DIRECTION_IN = "1d96a65f-2131-4916-8825-2d142b1000b2"
DIRECTION_OUT = "53f71b5f-7e17-4cf5-bf14-6a59212db422"
CAN_DIAL, CAN_ANSWER, CAN_DROP, CAN_HOLD = 0x2, 0x4, 0x8, 0x10
CAN_BLIND_TRANSFER, CAN_MAKE_CONSULT_CALL, CAN_DTMF = 0x100, 0x200, 0x400


LOUD_USER = "10ad0000-0000-4000-8000-000000000431"


@pytest.fixture(scope="module")
def cluster(infra: Infrastructure, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    run_dir = tmp_path_factory.mktemp("flows") / "run"
    # What the administrator allows these flows (docs/security.md): one user's own context and
    # debugging, and a line two users may share.
    config = run_dir.parent / "appsettings.json"
    config.write_text(json.dumps({
        "Asterisk": {"allowedOriginateContexts": ["from-crm"]},
        "Security": {"users": [{"userUId": LOUD_USER, "line": "431", "originateContext": "from-crm", "debug": True}],
                     "sharedLines": ["442"]},
    }))
    options = ClusterOptions.ephemeral(run_dir, amqp_url=infra.amqp_url, redis_url=infra.redis_url, config=config)
    local = LocalCluster(options)
    local.start(timeout=60)
    try:
        yield local
    finally:
        local.stop()


def node_logs(cluster: LocalCluster) -> str:
    return "".join(cluster.child(n).log_path.read_text(errors="replace") for n in ("node1", "node2"))


def metric(cluster: LocalCluster, name: str) -> float:
    total = 0.0
    for port in cluster.node_ports:
        status, body = http_get(f"http://127.0.0.1:{port}/metrics")
        for line in body.decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def clients_per_node(cluster: LocalCluster) -> list[int]:
    counts = []
    for port in cluster.node_ports:
        status, body = http_get(f"http://127.0.0.1:{port}/health")
        counts.append(int(json.loads(body).get("clients", 0)))
    return counts


async def play(cluster: LocalCluster, scenario: str, **variables: str) -> dict[str, Any]:
    return await asyncio.to_thread(cluster.play, scenario, **variables)


def obj(item: Received) -> dict[str, Any]:
    assert isinstance(item.content, dict), item.content
    return item.content


async def opened(cluster: LocalCluster, line: str, **kw: Any) -> CreatioAgent:
    agent = CreatioAgent(cluster.client_url, line, **kw)
    await agent.connect()
    snapshot = await agent.open()
    assert calls_in_snapshot(snapshot) == []
    return agent


async def answered_call(cluster: LocalCluster, agent: CreatioAgent) -> dict[str, Any]:
    """An inbound call the agent answers with AnswerCall (the phone is told to pick up)."""
    mark = len(agent.events)
    await play(cluster, "inbound-direct-noanswer", line=agent.line, caller=CALLER)
    ring = obj(await agent.wait_for(RING_STARTED, after=mark, timeout=15))
    await agent.call_command("AnswerCall", ring)
    call = obj(await agent.wait_for(COMMUTATION_STARTED, after=mark, timeout=10))
    assert call["id"] == ring["id"]
    return call


# ---- inbound calls -------------------------------------------------------------------------------------


def test_inbound_answered_every_event_with_its_features(cluster: LocalCluster) -> None:
    async def main() -> None:
        agent = await opened(cluster, "411")
        try:
            mark = len(agent.events)
            await play(cluster, "inbound-direct-answered", line="411", caller=CALLER)
            ring = obj(await agent.wait_for(RING_STARTED, after=mark, timeout=15))
            assert (ring["callerId"], ring["deviceId"], ring["direction"]) == (CALLER, "411", DIRECTION_IN)
            assert ring["state"] == 1 and ring["callFeaturesSet"] == CAN_ANSWER | CAN_DROP
            talk = obj(await agent.wait_for(COMMUTATION_STARTED, after=mark, timeout=15))
            assert talk["id"] == ring["id"] and talk["state"] == 2
            assert talk["callFeaturesSet"] == (CAN_DROP | CAN_HOLD | CAN_DTMF | CAN_BLIND_TRANSFER
                                               | CAN_MAKE_CONSULT_CALL)
            # answered from the node's own view of the line
            before = len(agent.events)
            await agent.send("QueryLineState")
            state = obj(await agent.wait_for(LINE_STATE_CHANGED, after=before))
            assert state == {"callFeaturesSet": talk["callFeaturesSet"], "callId": talk["id"]}
            end = await agent.wait_for(RING_FINISHED, after=mark, timeout=20)
            assert obj(end)["id"] == ring["id"] and obj(end)["state"] == 0
            # the line is idle again: dialling re-enabled without a callId
            idle = await agent.wait_for(LINE_STATE_CHANGED, after=agent.events.index(end))
            assert obj(idle) == {"callFeaturesSet": CAN_DIAL}
            assert agent.of_type(ERROR, mark) == []
        finally:
            await agent.close()

    asyncio.run(main())


@pytest.mark.parametrize(("scenario", "line"), [("inbound-direct-noanswer", "412"),
                                                 ("inbound-direct-abandoned", "413")])
def test_inbound_never_answered_rings_then_finishes(cluster: LocalCluster, scenario: str, line: str) -> None:
    async def main() -> None:
        agent = await opened(cluster, line)
        try:
            mark = len(agent.events)
            await play(cluster, scenario, line=line, caller=CALLER)
            ring = obj(await agent.wait_for(RING_STARTED, after=mark, timeout=15))
            end = obj(await agent.wait_for(RING_FINISHED, after=mark, timeout=30))
            assert end["id"] == ring["id"] and end["callerId"] == CALLER
            assert agent.of_type(COMMUTATION_STARTED, mark) == []
        finally:
            await agent.close()

    asyncio.run(main())


def test_inbound_busy_is_abonent_busy_then_ring_finished(cluster: LocalCluster) -> None:
    async def main() -> None:
        agent = await opened(cluster, "414")
        try:
            mark = len(agent.events)
            await play(cluster, "inbound-busy", line="414", caller=CALLER)
            busy = await agent.wait_for(ABONENT_BUSY, after=mark, timeout=15)
            assert obj(busy)["state"] == 6
            end = await agent.wait_for(RING_FINISHED, after=agent.events.index(busy), timeout=15)
            assert obj(end)["id"] == obj(busy)["id"]
        finally:
            await agent.close()

    asyncio.run(main())


def test_queue_call_rings_both_agents_one_answers_the_others_ring_ends(cluster: LocalCluster) -> None:
    async def main() -> None:
        first = await opened(cluster, "421")
        second = await opened(cluster, "422")
        try:
            marks = (len(first.events), len(second.events))
            await play(cluster, "inbound-queue", line="421", agent2="422", caller=CALLER)
            ring1 = obj(await first.wait_for(RING_STARTED, after=marks[0], timeout=15))
            ring2 = obj(await second.wait_for(RING_STARTED, after=marks[1], timeout=15))
            assert ring1["callerId"] == ring2["callerId"] == CALLER
            await first.wait_for(COMMUTATION_STARTED, after=marks[0], timeout=15)
            gone = obj(await second.wait_for(RING_FINISHED, after=marks[1], timeout=15))
            assert gone["id"] == ring2["id"]
            assert second.of_type(COMMUTATION_STARTED, marks[1]) == []
            end = obj(await first.wait_for(RING_FINISHED, after=marks[0], timeout=20))
            assert end["id"] == ring1["id"]
        finally:
            await first.close()
            await second.close()

    asyncio.run(main())


# ---- outbound, per-user settings --------------------------------------------------------------------------


def test_make_call_uses_the_users_originate_context_and_debug_mode_logs_only_that_agent(
    cluster: LocalCluster,
) -> None:
    async def main() -> None:
        loud = await opened(cluster, "431", user_uid=LOUD_USER,
                            connection_params={"OriginateContext": "from-crm", "debugMode": True})
        quiet = await opened(cluster, "432", connection_params={"debugMode": False})
        try:
            marks = (len(loud.events), len(quiet.events))
            await loud.send("MakeCall", {"targetAddress": "+7 (555) 04-31"})
            await quiet.send("MakeCall", {"targetAddress": "5550432"})
            for agent, mark, number in ((loud, marks[0], "+75550431"), (quiet, marks[1], "5550432")):
                ring = obj(await agent.wait_for(RING_STARTED, after=mark, timeout=15))
                assert ring["direction"] == DIRECTION_OUT and ring["deviceId"] == agent.line
                assert ring["calledId"] == number, ring
                await agent.wait_for(COMMUTATION_STARTED, after=mark, timeout=15)
                await agent.wait_for(RING_FINISHED, after=mark, timeout=20)
                assert agent.of_type(ERROR, mark) == []
            logs = node_logs(cluster)
            debug = [line for line in logs.splitlines() if "debug " in line]
            # the loud agent's whole traffic: its commands, what went to the gateway, its events
            assert any("debug in" in x and "MakeCall" in x and "04-31" in x for x in debug)
            assert any("debug command" in x and '"context":"from-crm"' in x and "+75550431" in x for x in debug)
            assert any("debug out" in x and "+75550431" in x for x in debug)
            # and nothing of the quiet agent's
            assert not any("5550432" in x or "line=432" in x for x in debug)
        finally:
            await loud.close()
            await quiet.close()

    asyncio.run(main())


def test_two_tabs_of_one_agent_on_different_nodes_both_get_the_events(cluster: LocalCluster) -> None:
    async def main() -> None:
        user = "0b0c8f35-3b3a-4f0d-9d8e-5c7a4f2a4401"
        tabs = [await opened(cluster, "441", user_uid=user)]
        for _ in range(10):  # HAProxy balances; keep the second tab on the other node
            tab = await opened(cluster, "441", user_uid=user)
            if sorted(clients_per_node(cluster)) == [1, 1]:
                tabs.append(tab)
                break
            await tab.close()
            await asyncio.sleep(0.2)
        assert len(tabs) == 2, clients_per_node(cluster)
        try:
            marks = [len(t.events) for t in tabs]
            await play(cluster, "inbound-direct-answered", line="441", caller=CALLER)
            ids = set()
            for tab, mark in zip(tabs, marks, strict=True):
                ids.add(obj(await tab.wait_for(RING_STARTED, after=mark, timeout=15))["id"])
                await tab.wait_for(COMMUTATION_STARTED, after=mark, timeout=15)
                await tab.wait_for(RING_FINISHED, after=mark, timeout=20)
            assert len(ids) == 1
            assert "claimed by user" not in node_logs(cluster)  # the same user twice is no conflict
        finally:
            for tab in tabs:
                await tab.close()

    asyncio.run(main())


def test_a_second_user_on_a_shared_line_is_let_in_with_a_warning(cluster: LocalCluster) -> None:
    async def main() -> None:
        before = metric(cluster, "cms_node_shared_line_claims_total")
        alice = await opened(cluster, "442", user_uid="a11ce000-0000-4000-8000-000000000442")
        bob = await opened(cluster, "442", user_uid="b0b00000-0000-4000-8000-000000000442")
        try:
            assert metric(cluster, "cms_node_shared_line_claims_total") == before + 1
            assert re.search(r"line 442 claimed by user b0b00000\S+ while held by a11ce000", node_logs(cluster))
            marks = (len(alice.events), len(bob.events))
            await play(cluster, "inbound-direct-abandoned", line="442", caller=CALLER)
            for agent, mark in ((alice, marks[0]), (bob, marks[1])):
                await agent.wait_for(RING_STARTED, after=mark, timeout=15)
        finally:
            await alice.close()
            await bob.close()

    asyncio.run(main())


def test_call_centre_commands_and_agent_state(cluster: LocalCluster) -> None:
    async def main() -> None:
        # 305 is a member of the simulator's "support" queue
        agent = await opened(cluster, "305")
        off = await opened(cluster, "443", connection_params={"disableCallCentre": True})
        try:
            mark = len(agent.events)
            await agent.send("SetMsgUserState", {"code": "Paused", "reason": "lunch"})
            paused = await agent.wait_for(AGENT_STATE_CHANGED, after=mark, timeout=10)
            assert paused.content == "Paused"
            mark = len(agent.events)
            await agent.send("QueryMsgUserState")
            assert (await agent.wait_for(AGENT_STATE_CHANGED, after=mark)).content == "Paused"
            # a new connection knows it at once: the snapshot is followed by the state, read from Redis
            again = CreatioAgent(cluster.client_url, "305", user_uid=agent.user_uid)  # the same user, a new tab
            await again.connect()
            await again.open()
            assert (await again.wait_for(AGENT_STATE_CHANGED, after=again.opened_at)).content == "Paused"
            await again.close()
            mark = len(agent.events)
            await agent.send("SetMsgUserState", {"code": "Active", "reason": ""})
            assert (await agent.wait_for(AGENT_STATE_CHANGED, after=mark, timeout=10)).content == "Active"

            mark = len(off.events)
            await off.send("SetMsgUserState", {"code": "Paused", "reason": ""})
            error = obj(await off.wait_for(ERROR, after=mark))
            assert error["errorType"] == 5 and "call centre" in error["data"]
        finally:
            await agent.close()
            await off.close()

    asyncio.run(main())


# ---- commands on a live call ------------------------------------------------------------------------------


def test_the_panels_first_snapshot_is_the_one_read_at_the_claim_and_later_ones_are_read_again(
    cluster: LocalCluster,
) -> None:
    """The panel asks for the snapshot right after CONNECTION_CREATED; with nothing on the line since the claim,
    the node answers with the snapshot it read then (one Redis read fewer per connecting agent)."""

    async def main() -> None:
        first = await opened(cluster, "461")  # the call is placed before the agent under test opens the line
        mark = len(first.events)
        await play(cluster, "inbound-direct-long", line="461", caller=CALLER)
        talk = obj(await first.wait_for(COMMUTATION_STARTED, after=mark, timeout=15))
        await first.close()
        reused = metric(cluster, "cms_node_snapshots_reused_total")
        agent = CreatioAgent(cluster.client_url, "461")
        await agent.connect()
        try:
            snapshot = await agent.open()
            assert [c["id"] for c in calls_in_snapshot(snapshot)] == [talk["id"]]
            assert metric(cluster, "cms_node_snapshots_reused_total") == reused + 1
            before = len(agent.events)
            await agent.send("QueryActiveCallSnapshot")
            again = await agent.wait_for(ACTIVE_CALL_SNAPSHOT, after=before, timeout=10)
            assert [c["id"] for c in calls_in_snapshot(again)] == [talk["id"]]
            assert metric(cluster, "cms_node_snapshots_reused_total") == reused + 1  # read from Redis this time
            mark = len(agent.events)
            await agent.call_command("DropCall", talk)  # the module's cluster is shared: leave the line idle
            await agent.wait_for(RING_FINISHED, after=mark, timeout=10)
        finally:
            await agent.close()

    asyncio.run(main())


def test_commands_on_a_live_call(cluster: LocalCluster) -> None:
    async def main() -> None:
        agent = await opened(cluster, "451")
        try:
            mark = len(agent.events)
            await play(cluster, "inbound-direct-long", line="451", caller=CALLER)
            call = obj(await agent.wait_for(COMMUTATION_STARTED, after=mark, timeout=15))

            # HoldCall is a toggle; the gateway holds by parking the far end (the local cluster sets
            # parkingLotContext) and resumes by bringing the line back to the parked call.
            mark = len(agent.events)
            await agent.call_command("HoldCall", call)
            held = obj(await agent.wait_for(PUT_HOLD_ACTION, after=mark, timeout=10))
            assert held["id"] == call["id"] and held["state"] == 3  # GeneralizedCallState.HOLDED
            mark = len(agent.events)
            await agent.call_command("HoldCall", held)
            resumed = obj(await agent.wait_for(END_HOLD_ACTION, after=mark, timeout=10))
            assert resumed["id"] == call["id"] and resumed["state"] == 2

            mark = len(agent.events)
            await agent.call_command("SendDtmf", call, {"digits": "12x"})
            bad = obj(await agent.wait_for(ERROR, after=mark))
            assert bad["errorType"] == 3 and "digits" in bad["data"]

            mark = len(agent.events)
            await agent.call_command("DropCall", call)
            end = obj(await agent.wait_for(RING_FINISHED, after=mark, timeout=10))
            assert end["id"] == call["id"]
        finally:
            await agent.close()

    asyncio.run(main())


def test_dtmf_on_a_connected_call_is_carried_out(cluster: LocalCluster) -> None:
    async def main() -> None:
        agent = await opened(cluster, "455")
        try:
            call = await answered_call(cluster, agent)
            mark = len(agent.events)
            await agent.call_command("SendDtmf", call, {"digits": "12#"})
            # once Asterisk played them, the digits the agent sent are echoed (the panel's "last dialed")
            echo = await agent.wait_for(DTMF_ENTERED, after=mark, timeout=10)  # sent only on success
            assert echo.content == "12#"
            # and the PBX was asked to play exactly those, into this call
            status, body = http_get(f"http://127.0.0.1:{cluster.options.simulator_control_port}/calls")
            assert status == 200
            (played,) = [c for c in json.loads(body)["live"] if c["vars"].get("line") == "455"]
            assert played["dtmf"] == "12#"
            await agent.call_command("DropCall", call)
            await agent.wait_for(RING_FINISHED, after=mark, timeout=10)
            # the line's events arrive in order: by the call's end, any second echo would have come
            assert [e.content for e in agent.of_type(DTMF_ENTERED, mark)] == ["12#"]  # once, not per Sent event
            assert agent.of_type(ERROR, mark) == []
        finally:
            await agent.close()

    asyncio.run(main())


def test_a_call_of_another_line_is_refused_and_never_touched(cluster: LocalCluster) -> None:
    async def main() -> None:
        owner = await opened(cluster, "452")
        intruder = await opened(cluster, "453")
        try:
            mark = len(owner.events)
            await play(cluster, "inbound-direct-long", line="452", caller=CALLER)
            call = obj(await owner.wait_for(COMMUTATION_STARTED, after=mark, timeout=15))

            mark2 = len(intruder.events)
            for command, params in (("DropCall", None), ("HoldCall", None), ("BlindTransferCall",
                                    {"targetAddress": "999"}), ("SendDtmf", {"digits": "1"})):
                await intruder.call_command(command, call, params)
            await intruder.send("TransferCall", {"consultationCall": json.dumps(call)}, executor=call)
            await intruder.send("CancelTransfer", {"currentCall": json.dumps(call), "consultCall": json.dumps(call)})
            for _ in range(6):
                await intruder.wait_for(ERROR, after=mark2)
            await asyncio.sleep(0.5)
            errors = [obj(e) for e in intruder.of_type(ERROR, mark2)]
            assert len(errors) == 6 and all(e["errorType"] == 3 for e in errors), errors
            assert all("unknown call" in e["data"] or "itself" in e["data"] for e in errors), errors
            # the owner's call went on untouched: the owner's own Drop is what ends it, and nothing came before
            dropped = len(owner.events)
            await owner.call_command("DropCall", call)
            await owner.wait_for(RING_FINISHED, after=dropped, timeout=10)
            before_drop = [e.event_type for e in owner.events[mark:dropped]]
            assert RING_FINISHED not in before_drop and PUT_HOLD_ACTION not in before_drop, before_drop
            assert owner.of_type(ERROR, mark) == []
        finally:
            await owner.close()
            await intruder.close()

    asyncio.run(main())


def test_refusals_carry_the_right_error_type(cluster: LocalCluster) -> None:
    async def main() -> None:
        agent = CreatioAgent(cluster.client_url, "454")
        await agent.connect()
        try:
            await agent.send("MakeCall", {"targetAddress": "100"})  # before OpenConnection
            assert obj(await agent.wait_for(ERROR))["errorType"] == 3
            await agent.open()
            expected = {
                "Hookup": 4, "SetupTransferCall": 4, "RegisterConnectionSession": 4, "PostRawData": 4,
                "LibrarySpecificService": 4, "ProcessLogs": 4, "SetLogFilePath": 4, "NoSuchCommand": 4,
            }
            for command, error_type in expected.items():
                mark = len(agent.events)
                await agent.send(command, {"filePath": "/etc/passwd"} if command == "SetLogFilePath" else None)
                error = obj(await agent.wait_for(ERROR, after=mark))
                assert error["errorType"] == error_type, (command, error)
                assert error["data"], command
            for params in ({"targetAddress": "rm -rf /"}, {}):
                mark = len(agent.events)
                await agent.send("MakeCall", params)
                assert obj(await agent.wait_for(ERROR, after=mark))["errorType"] == 3
            mark = len(agent.events)
            await agent.send("OpenConnection", {"connectionParams": json.dumps({"ExtensionName": "4 54"})})
            assert obj(await agent.wait_for(ERROR, after=mark))["errorType"] == 9
        finally:
            await agent.close()

    asyncio.run(main())


def test_answer_blind_transfer_consult_and_cancel_dnd_wrap_up(cluster: LocalCluster) -> None:
    async def main() -> None:
        agent = await opened(cluster, "306")  # 306: a queue member, for the wrap-up
        try:
            call = await answered_call(cluster, agent)

            # MakeConsultCall: a second call on the line; CancelTransfer ends it, the first stays
            mark = len(agent.events)
            await agent.call_command("MakeConsultCall", call, {"targetAddress": "307"})
            consult = obj(await agent.wait_for(RING_STARTED, after=mark, timeout=10,
                                               predicate=lambda r: obj(r)["id"] != call["id"]))
            await agent.send("CancelTransfer", {"currentCall": json.dumps(call), "consultCall": json.dumps(consult)})
            gone = obj(await agent.wait_for(RING_FINISHED, after=mark, timeout=10))
            assert gone["id"] == consult["id"]
            assert agent.of_type(ERROR, mark) == []

            # BlindTransferCall: the call leaves the line
            mark = len(agent.events)
            await agent.call_command("BlindTransferCall", call, {"targetAddress": "5559000"})
            end = obj(await agent.wait_for(RING_FINISHED, after=mark, timeout=15))
            assert end["id"] == call["id"]

            # SetDnd and SetWrapUpUserState are carried out silently or shown by their events
            mark = len(agent.events)
            await agent.send("SetDnd")
            await agent.send("SetWrapUpUserState", {"isWrapUpActive": True})
            assert (await agent.wait_for(AGENT_STATE_CHANGED, after=mark, timeout=10)).content == "WrapUp"
            await agent.send("SetWrapUpUserState", {"isWrapUpActive": False})
            await agent.wait_for(AGENT_STATE_CHANGED, after=mark, timeout=10,
                                 predicate=lambda r: r.content == "Active")
            assert agent.of_type(ERROR, mark) == []
        finally:
            await agent.close()

    asyncio.run(main())


def test_consult_then_complete_transfer(cluster: LocalCluster) -> None:
    async def main() -> None:
        agent = await opened(cluster, "456")
        try:
            call = await answered_call(cluster, agent)
            mark = len(agent.events)
            await agent.call_command("MakeConsultCall", call, {"targetAddress": "457"})
            consult = obj(await agent.wait_for(RING_STARTED, after=mark, timeout=10,
                                               predicate=lambda r: obj(r)["id"] != call["id"]))
            await agent.call_command("TransferCall", call, {"consultationCall": json.dumps(consult)})
            finished = set()
            while finished != {call["id"], consult["id"]}:
                item = await agent.wait_for(RING_FINISHED, after=mark, timeout=15,
                                            predicate=lambda r: obj(r)["id"] not in finished)
                finished.add(obj(item)["id"])
            assert agent.of_type(ERROR, mark) == []
        finally:
            await agent.close()

    asyncio.run(main())
