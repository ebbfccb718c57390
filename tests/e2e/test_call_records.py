"""Call records through the whole cluster: simulator -> gateway -> Creatio-shaped site over HTTP, and
CALL_SAVED_IN_DB / databaseUId to the agent's client through the nodes and HAProxy.

Each flow the simulator plays (direct, queue, outbound, internal, hold, blind and attended transfer, busy, no
answer, abandoned) leaves one row per call and line in the test site with Creatio's columns.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from local_cluster.infra import Infrastructure
from local_cluster.launcher import ClusterOptions, LocalCluster
from tests.e2e.test_signalr import SignalRAgent, ensure_signalr_client
from tests.e2e.test_signalr import content as signalr_content
from tests.e2e.test_signalr import opened as signalr_opened
from tests.support.creatio_client import (
    ABONENT_BUSY,
    CALL_SAVED_IN_DB,
    COMMUTATION_STARTED,
    END_HOLD_ACTION,
    ERROR,
    PUT_HOLD_ACTION,
    RING_FINISHED,
    RING_STARTED,
    CreatioAgent,
    Received,
    calls_in_snapshot,
)
from tests.support.creatio_site import CreatioSite

pytestmark = pytest.mark.e2e

CALLER = "79161112233"
DIRECTION_IN = "1d96a65f-2131-4916-8825-2d142b1000b2"
DIRECTION_OUT = "53f71b5f-7e17-4cf5-bf14-6a59212db422"


@pytest.fixture(scope="module")
def site() -> Iterator[CreatioSite]:
    s = CreatioSite(user="cms-service", password="e2e-records-secret")
    s.start()
    try:
        yield s
    finally:
        s.stop()


def records_config(tmp: Path, site: CreatioSite) -> Path:
    path = tmp / "appsettings.json"
    path.write_text(json.dumps({"CallRecords": {"siteUrl": site.url + "/0", "userName": site.user,
                                                "password": site.password, "api": "msgutil",
                                                "retryForSeconds": "60"}}))
    return path


@pytest.fixture(scope="module")
def signalr_harness() -> Path:
    return ensure_signalr_client()


@pytest.fixture(scope="module")
def cluster(infra: Infrastructure, site: CreatioSite,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    tmp = tmp_path_factory.mktemp("records")
    options = ClusterOptions.ephemeral(tmp / "run", amqp_url=infra.amqp_url, redis_url=infra.redis_url,
                                       config=records_config(tmp, site),
                                       extra_env={"CMS_NODE_SIGNALR_TOKEN_SECRET": "e2e-records-signalr"})
    local = LocalCluster(options)
    local.start(timeout=60)
    try:
        yield local
    finally:
        local.stop()


def obj(item: Received) -> dict[str, Any]:
    assert isinstance(item.content, dict), item.content
    return item.content


async def play(cluster: LocalCluster, scenario: str, **variables: str) -> None:
    await asyncio.to_thread(cluster.play, scenario, **variables)


async def opened(cluster: LocalCluster, line: str) -> CreatioAgent:
    agent = CreatioAgent(cluster.client_url, line)
    await agent.connect()
    assert calls_in_snapshot(await agent.open()) == []
    # the node passes the record owner on as a command; give the gateway a moment to store it
    await asyncio.sleep(0.5)
    return agent


async def final_row(site: CreatioSite, database_uid: str, timeout: float = 20.0) -> dict[str, Any]:
    """The row once the call's end is written."""
    deadline = time.monotonic() + timeout
    while True:
        with site.lock:
            row = dict(site.rows.get(database_uid) or {})
        if row.get("EndDate"):
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"no finished row {database_uid}: {row}")
        await asyncio.sleep(0.1)


async def saved(agent: CreatioAgent, call_id: str, after: int) -> str:
    """CALL_SAVED_IN_DB for the call: its databaseUId."""
    item = await agent.wait_for(CALL_SAVED_IN_DB, after=after, timeout=20,
                                predicate=lambda r: obj(r)["id"] == call_id)
    uid = obj(item)["databaseUId"]
    assert isinstance(uid, str) and len(uid) == 36
    return uid


def rows_for_line(site: CreatioSite, line: str) -> list[dict[str, Any]]:
    return [r for r in site.all_rows() if str(r.get("IntegrationId", "")).split(":")[1:2] == [line]]


def test_direct_answered_call_is_saved_and_the_client_gets_its_id(cluster: LocalCluster, site: CreatioSite) -> None:
    async def main() -> None:
        agent = await opened(cluster, "511")
        try:
            mark = len(agent.events)
            await play(cluster, "inbound-direct-answered", line="511", caller=CALLER)
            ring = obj(await agent.wait_for(RING_STARTED, after=mark, timeout=15))
            uid = await saved(agent, ring["id"], mark)
            end = obj(await agent.wait_for(RING_FINISHED, after=mark, timeout=20))
            assert end["databaseUId"] == uid  # later call objects carry it
            row = await final_row(site, uid)
            assert (row["CallerId"], row["CalledId"], row["DirectionId"]) == (CALLER, "511", DIRECTION_IN)
            assert row["CreatedById"] == agent.contact_uid
            # rings 1.5 s, talks 3 s (simulator timing, with slack for a loaded machine)
            assert 1 <= row["BeforeConnectionTime"] <= 4, row
            assert 2 <= row["TalkTime"] <= 6, row
            assert row["HoldTime"] == 0
            assert row["Duration"] >= row["TalkTime"] + row["BeforeConnectionTime"] - 1
            assert len(rows_for_line(site, "511")) == 1
            assert agent.of_type(ERROR, mark) == []
        finally:
            await agent.close()

    asyncio.run(main())


def test_outbound_call_from_the_crm(cluster: LocalCluster, site: CreatioSite) -> None:
    async def main() -> None:
        agent = await opened(cluster, "512")
        try:
            mark = len(agent.events)
            await agent.send("MakeCall", {"targetAddress": "5550512"})
            ring = obj(await agent.wait_for(RING_STARTED, after=mark, timeout=15))
            uid = await saved(agent, ring["id"], mark)
            await agent.wait_for(COMMUTATION_STARTED, after=mark, timeout=15)
            await agent.wait_for(RING_FINISHED, after=mark, timeout=25)
            row = await final_row(site, uid)
            assert (row["CallerId"], row["CalledId"], row["DirectionId"]) == ("512", "5550512", DIRECTION_OUT)
            assert row["TalkTime"] >= 1 and row["CreatedById"] == agent.contact_uid
        finally:
            await agent.close()

    asyncio.run(main())


@pytest.mark.parametrize(("scenario", "line"), [("inbound-direct-noanswer", "513"),
                                                 ("inbound-direct-abandoned", "514"),
                                                 ("inbound-busy", "515")])
def test_missed_abandoned_and_busy_calls_have_no_talk_time(cluster: LocalCluster, site: CreatioSite,
                                                           scenario: str, line: str) -> None:
    async def main() -> None:
        agent = await opened(cluster, line)
        try:
            mark = len(agent.events)
            await play(cluster, scenario, line=line, caller=CALLER)
            ring = obj(await agent.wait_for(RING_STARTED, after=mark, timeout=15))
            uid = await saved(agent, ring["id"], mark)
            if scenario == "inbound-busy":
                await agent.wait_for(ABONENT_BUSY, after=mark, timeout=15)
            await agent.wait_for(RING_FINISHED, after=mark, timeout=30)
            row = await final_row(site, uid)
            assert row["TalkTime"] == 0 and row["EndDate"] is not None  # what the panel shows as missed
            assert (row["CallerId"], row["DirectionId"]) == (CALLER, DIRECTION_IN)
            assert len(rows_for_line(site, line)) == 1
        finally:
            await agent.close()

    asyncio.run(main())


def test_queue_call_gives_one_row_per_agent_line(cluster: LocalCluster, site: CreatioSite) -> None:
    async def main() -> None:
        first = await opened(cluster, "521")
        second = await opened(cluster, "522")
        try:
            marks = (len(first.events), len(second.events))
            await play(cluster, "inbound-queue", line="521", agent2="522", caller=CALLER)
            ring1 = obj(await first.wait_for(RING_STARTED, after=marks[0], timeout=15))
            ring2 = obj(await second.wait_for(RING_STARTED, after=marks[1], timeout=15))
            uid1 = await saved(first, ring1["id"], marks[0])
            uid2 = await saved(second, ring2["id"], marks[1])
            assert uid1 != uid2
            await first.wait_for(RING_FINISHED, after=marks[0], timeout=25)
            answered, missed = await final_row(site, uid1), await final_row(site, uid2)
            assert answered["TalkTime"] >= 1 and missed["TalkTime"] == 0
            assert answered["CreatedById"] == first.contact_uid and missed["CreatedById"] == second.contact_uid
            assert answered["CallerId"] == missed["CallerId"] == CALLER
        finally:
            await first.close()
            await second.close()

    asyncio.run(main())


def test_internal_call_gives_each_agent_a_row_with_its_own_direction(cluster: LocalCluster, site: CreatioSite) -> None:
    """Agent to agent (the simulator's ``internal`` flow): the caller's line gets an outgoing record, the called
    line an incoming one, both naming the two lines, each owned by its own agent's contact."""

    async def main() -> None:
        caller, called = await opened(cluster, "571"), await opened(cluster, "572")
        try:
            marks = (len(caller.events), len(called.events))
            await play(cluster, "internal", line="571", agent2="572")
            out_ring = obj(await caller.wait_for(RING_STARTED, after=marks[0], timeout=15))
            in_ring = obj(await called.wait_for(RING_STARTED, after=marks[1], timeout=15))
            out_uid = await saved(caller, out_ring["id"], marks[0])
            in_uid = await saved(called, in_ring["id"], marks[1])
            assert out_uid != in_uid
            await caller.wait_for(RING_FINISHED, after=marks[0], timeout=20)
            await called.wait_for(RING_FINISHED, after=marks[1], timeout=20)
            placed, received = await final_row(site, out_uid), await final_row(site, in_uid)
            assert (placed["CallerId"], placed["CalledId"], placed["DirectionId"]) == ("571", "572", DIRECTION_OUT)
            assert (received["CallerId"], received["CalledId"], received["DirectionId"]) == ("571", "572",
                                                                                            DIRECTION_IN)
            assert placed["CreatedById"] == caller.contact_uid and received["CreatedById"] == called.contact_uid
            # rings 1.5 s, talks 3 s (simulator timing, with slack for a loaded machine)
            for row in (placed, received):
                assert 1 <= row["BeforeConnectionTime"] <= 4 and 2 <= row["TalkTime"] <= 6, row
            assert len(rows_for_line(site, "571")) == 1 and len(rows_for_line(site, "572")) == 1
        finally:
            await caller.close()
            await called.close()

    asyncio.run(main())


def test_hold_time_and_consultation_parent(cluster: LocalCluster, site: CreatioSite) -> None:
    async def main() -> None:
        agent = await opened(cluster, "531")
        try:
            mark = len(agent.events)
            await play(cluster, "inbound-direct-noanswer", line="531", caller=CALLER)
            ring = obj(await agent.wait_for(RING_STARTED, after=mark, timeout=15))
            await agent.call_command("AnswerCall", ring)
            call = obj(await agent.wait_for(COMMUTATION_STARTED, after=mark, timeout=10))
            uid = await saved(agent, call["id"], mark)
            await agent.call_command("HoldCall", call)
            held = obj(await agent.wait_for(PUT_HOLD_ACTION, after=mark, timeout=10))
            assert held["databaseUId"] == uid
            await asyncio.sleep(2.2)
            await agent.call_command("HoldCall", held)
            await agent.wait_for(END_HOLD_ACTION, after=mark, timeout=10)
            # a consultation: a second record, with the first as its parent
            consult_mark = len(agent.events)
            await agent.call_command("MakeConsultCall", call, {"targetAddress": "532"})
            consult = obj(await agent.wait_for(RING_STARTED, after=consult_mark, timeout=10,
                                               predicate=lambda r: obj(r).get("calledId") == "532"))
            consult_uid = await saved(agent, consult["id"], consult_mark)
            await agent.send("CancelTransfer", {"currentCall": json.dumps(call), "consultCall": json.dumps(consult)})
            await agent.wait_for(RING_FINISHED, after=consult_mark, timeout=10,
                                 predicate=lambda r: obj(r)["id"] == consult["id"])
            await agent.call_command("DropCall", call)
            await agent.wait_for(RING_FINISHED, after=consult_mark, timeout=15,
                                 predicate=lambda r: obj(r)["id"] == call["id"])
            row = await final_row(site, uid)
            assert row["HoldTime"] >= 2, row
            child = await final_row(site, consult_uid)
            assert child["ParentCallId"] == uid
            # the phone called back into the lot to resume is the same call: no ring, no record of its own
            rings = [obj(r)["id"] for r in agent.of_type(RING_STARTED, mark)]
            assert rings == [call["id"], consult["id"]], rings
            assert sorted(r["IntegrationId"] for r in rows_for_line(site, "531")) == sorted(
                [row["IntegrationId"], child["IntegrationId"]])
            assert (child["CallerId"], child["CalledId"], child["DirectionId"]) == ("531", "532", DIRECTION_OUT)
        finally:
            await agent.close()

    asyncio.run(main())


def test_blind_transfer_ends_the_record_on_the_transferring_line(cluster: LocalCluster, site: CreatioSite) -> None:
    async def main() -> None:
        agent = await opened(cluster, "541")
        try:
            mark = len(agent.events)
            await play(cluster, "inbound-direct-noanswer", line="541", caller=CALLER)
            ring = obj(await agent.wait_for(RING_STARTED, after=mark, timeout=15))
            await agent.call_command("AnswerCall", ring)
            call = obj(await agent.wait_for(COMMUTATION_STARTED, after=mark, timeout=10))
            uid = await saved(agent, call["id"], mark)
            await asyncio.sleep(1.2)
            await agent.call_command("BlindTransferCall", call, {"targetAddress": "5559000"})
            await agent.wait_for(RING_FINISHED, after=mark, timeout=15)
            row = await final_row(site, uid)
            assert row["TalkTime"] >= 1 and row["CallerId"] == CALLER
            assert len(rows_for_line(site, "541")) == 1
        finally:
            await agent.close()

    asyncio.run(main())


def test_attended_transfer_completed_rows(cluster: LocalCluster, site: CreatioSite) -> None:
    """The transferring line: its call and the consultation (ParentCallId); the target line (an internal
    call from 581 first): the call it ends up with, naming who transferred it."""

    async def main() -> None:
        agent, target = await opened(cluster, "581"), await opened(cluster, "582")
        try:
            mark, tmark = len(agent.events), len(target.events)
            await play(cluster, "inbound-direct-noanswer", line="581", caller=CALLER)
            ring = obj(await agent.wait_for(RING_STARTED, after=mark, timeout=15))
            await agent.call_command("AnswerCall", ring)
            call = obj(await agent.wait_for(COMMUTATION_STARTED, after=mark, timeout=10))
            uid = await saved(agent, call["id"], mark)
            await asyncio.sleep(1.5)  # talk before consulting (the consultation holds the call)
            await agent.call_command("MakeConsultCall", call, {"targetAddress": "582"})
            consult = obj(await agent.wait_for(RING_STARTED, after=mark, timeout=10,
                                               predicate=lambda r: obj(r).get("calledId") == "582"))
            consult_uid = await saved(agent, consult["id"], mark)
            target_ring = obj(await target.wait_for(RING_STARTED, after=tmark, timeout=10))
            target_uid = await saved(target, target_ring["id"], tmark)
            await target.call_command("AnswerCall", target_ring)
            await target.wait_for(COMMUTATION_STARTED, after=tmark, timeout=10)
            await asyncio.sleep(1.0)
            await agent.call_command("TransferCall", call, {"consultationCall": json.dumps(consult)})
            await agent.wait_for(RING_FINISHED, after=mark, timeout=15, predicate=lambda r: obj(r)["id"] == call["id"])
            target_call = obj(await target.wait_for(COMMUTATION_STARTED, after=tmark, timeout=10))
            await asyncio.sleep(0.5)
            await target.call_command("DropCall", target_call)
            await target.wait_for(RING_FINISHED, after=tmark, timeout=15)
            original, consultation = await final_row(site, uid), await final_row(site, consult_uid)
            assert original["CallerId"] == CALLER and original["TalkTime"] >= 1
            assert consultation["ParentCallId"] == uid and consultation["CalledId"] == "582"
            at_target = await final_row(site, target_uid)
            assert at_target["CreatedById"] == target.contact_uid
            # after the transfer the target's call names the original caller and who transferred it
            assert at_target["CallerId"] == CALLER, at_target
            assert at_target["RedirectingId"] == "581", at_target
        finally:
            await agent.close()
            await target.close()

    asyncio.run(main())


def test_a_record_creatio_refuses_is_a_call_saving_error_for_the_agent(cluster: LocalCluster,
                                                                        site: CreatioSite) -> None:
    async def main() -> None:
        agent = await opened(cluster, "591")
        try:
            mark = len(agent.events)
            site.fail_next(400)  # Creatio refuses the record's data: retrying cannot help
            await play(cluster, "inbound-direct-answered", line="591", caller=CALLER)
            error = obj(await agent.wait_for(ERROR, after=mark, timeout=20))
            assert error["errorType"] == 7 and CALLER in error["data"]  # CALL_SAVING_ERROR
            await agent.wait_for(RING_FINISHED, after=mark, timeout=20)
            await asyncio.sleep(1.0)
            assert agent.of_type(CALL_SAVED_IN_DB, mark) == []
            assert rows_for_line(site, "591") == []
        finally:
            await agent.close()

    asyncio.run(main())


def test_signalr_agent_gets_call_saved_in_db_and_its_contact_owns_the_record(
    cluster: LocalCluster, site: CreatioSite, signalr_harness: Path
) -> None:
    """Creatio 8.x's transport (Microsoft's SignalR client): the same record and the same databaseUId."""

    async def main() -> None:
        contact = str(uuid.uuid4())
        agent = SignalRAgent(signalr_harness, f"http://127.0.0.1:{cluster.options.haproxy_port}/", "561",
                             "--contact", contact)
        await agent.start()
        try:
            await signalr_opened(agent)
            await asyncio.sleep(0.5)  # the record owner reaches the gateway
            mark = len(agent.lines)
            await asyncio.to_thread(cluster.play, "inbound-direct-answered", line="561", caller=CALLER)
            ring = signalr_content(await agent.event(RING_STARTED, after=mark))
            saved_item = await agent.wait(lambda i: i["kind"] == "event" and i["eventType"] == CALL_SAVED_IN_DB
                                          and signalr_content(i)["id"] == ring["id"], timeout=20, after=mark)
            uid = signalr_content(saved_item)["databaseUId"]
            end = signalr_content(await agent.event(RING_FINISHED, timeout=20, after=mark))
            assert end["databaseUId"] == uid
            row = await final_row(site, uid)
            assert row["CreatedById"] == contact and row["CallerId"] == CALLER and row["TalkTime"] >= 1
            assert all(i["argType"] == "string" for i in agent.events())
        finally:
            await agent.stop()

    asyncio.run(main())


def test_gateway_killed_with_an_unsaved_end_resumes_the_same_record(cluster: LocalCluster,
                                                                    site: CreatioSite) -> None:
    """Creatio fails while the call ends, and the gateway is SIGKILLed before it could write the end: the
    restarted gateway finds the record in the Redis journal the killed run left and finishes the same row."""

    async def main() -> None:
        agent = await opened(cluster, "551")
        try:
            mark = len(agent.events)
            await play(cluster, "inbound-direct-long", line="551", caller=CALLER)
            call = obj(await agent.wait_for(COMMUTATION_STARTED, after=mark, timeout=15))
            uid = await saved(agent, call["id"], mark)
            await asyncio.sleep(1.2)
            site.fail_next(*([503] * 100_000))
            await agent.call_command("DropCall", call)
            await agent.wait_for(RING_FINISHED, after=mark, timeout=15)
            await asyncio.sleep(1.0)  # the end's write fails: the record stays pending in the journal
            assert (await final_row_now(site, uid)).get("EndDate") is None
            await asyncio.to_thread(cluster.kill, "gateway")
            await asyncio.to_thread(cluster.restart, "gateway", 60)
            with site.lock:
                site._fail.clear()  # Creatio is back
            row = await final_row(site, uid, timeout=40)
            assert row["CallerId"] == CALLER and row["TalkTime"] >= 1
            assert len(rows_for_line(site, "551")) == 1
        finally:
            await agent.close()

    asyncio.run(main())


async def final_row_now(site: CreatioSite, uid: str) -> dict[str, Any]:
    with site.lock:
        return dict(site.rows.get(uid) or {})
