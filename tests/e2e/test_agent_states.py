"""What the agent sees in Creatio's header and panel, through the whole cluster (issue 11, points 3 and 4).

Agent states, with an ``AgentStates`` block: the code the agent chose comes back exactly; a supervisor's pause or
unpause on the PBX (QueuePause from another AMI client) reaches the agent as the configured code; on reconnect,
the state Creatio's header re-sends from the profile does not undo what a supervisor did meanwhile. Then
ExtensionName as admins type it, and the caller of an attended transfer's original call.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from local_cluster.infra import Infrastructure
from local_cluster.launcher import ClusterOptions, LocalCluster
from tests.support.creatio_client import (
    AGENT_STATE_CHANGED,
    COMMUTATION_STARTED,
    ERROR,
    LIBRARY_INITIALIZED,
    RING_FINISHED,
    RING_STARTED,
    CreatioAgent,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(infra: Infrastructure, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    tmp = tmp_path_factory.mktemp("states")
    config = tmp / "appsettings.json"
    config.write_text(json.dumps({"AgentStates": {"ready": "Active", "paused": {"Lunch": "lunch", "Break": ""},
                                                  "wrapUp": "AfterCall", "pbxPaused": "Supervisor"}}))
    options = ClusterOptions.ephemeral(tmp / "run", amqp_url=infra.amqp_url, redis_url=infra.redis_url,
                                       config=Path(config))
    local = LocalCluster(options)
    local.start(timeout=60)
    try:
        yield local
    finally:
        local.stop()


async def supervisor_pause(cluster: LocalCluster, line: str, paused: bool, reason: str = "") -> None:
    """QueuePause from a supervisor's own AMI session (not through the cluster)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", cluster.options.ami_port)
    try:
        await reader.readline()  # banner
        writer.write(b"Action: Login\r\nUsername: cms\r\nSecret: simulator-secret\r\nActionID: l\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        fields = f"Action: QueuePause\r\nInterface: SIP/{line}\r\nPaused: {'true' if paused else 'false'}\r\n"
        if reason:
            fields += f"Reason: {reason}\r\n"
        writer.write((fields + "ActionID: p\r\n\r\n").encode())
        while b"ActionID: p" not in (block := await reader.readuntil(b"\r\n\r\n")):
            pass
        assert b"Response: Success" in block, block
    finally:
        writer.close()
        await writer.wait_closed()


def line_epoch(cluster: LocalCluster, line: str) -> bytes | None:
    """The epoch of the line's last stored event: a new one once a new gateway term wrote the line."""
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        epoch: bytes | None = client.hget(f"{cluster.prefix}:line:{line}:pos", "epoch")  # type: ignore[assignment]
    finally:
        client.close()
    return epoch


def stored_agent(cluster: LocalCluster, line: str) -> dict[str, object]:
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        raw = client.get(f"{cluster.prefix}:line:{line}:agent")
    finally:
        client.close()
    return json.loads(raw) if raw else {}


def test_codes_come_back_exactly_supervisors_win_over_a_stale_profile_state(cluster: LocalCluster) -> None:
    async def main() -> None:
        agent = CreatioAgent(cluster.client_url, "305")  # 305: a member of the simulator's "support" queue
        await agent.connect()
        await agent.open()
        try:
            # the agent's own choice, reported back as exactly that code (not "Paused")
            mark = len(agent.events)
            await agent.send("SetMsgUserState", {"code": "Lunch", "reason": ""})
            await agent.wait_for(AGENT_STATE_CHANGED, after=mark, timeout=10,
                                 predicate=lambda r: r.content == "Lunch")
            assert stored_agent(cluster, "305")["code"] == "Lunch"  # kept per line in Redis

            # a supervisor unpauses the agent on the PBX
            mark = len(agent.events)
            await supervisor_pause(cluster, "305", False)
            await agent.wait_for(AGENT_STATE_CHANGED, after=mark, timeout=10,
                                 predicate=lambda r: r.content == "Active")
            assert stored_agent(cluster, "305")["set_by"] == "pbx"

            # the panel reconnects and its header re-sends the profile's "Lunch": the supervisor's change stays
            await agent.reconnect()
            mark = len(agent.events)
            await agent.send("SetMsgUserState", {"code": "Lunch", "reason": ""})
            await agent.wait_for(AGENT_STATE_CHANGED, after=mark, timeout=10,
                                 predicate=lambda r: r.content == "Active")
            assert stored_agent(cluster, "305")["paused"] is False

            # a supervisor's pause with a reason of their own shows as the configured code; it comes after
            # anything the re-sent "Lunch" could have caused, on the same line's stream: there was nothing
            await supervisor_pause(cluster, "305", True, "coaching")
            await agent.wait_for(AGENT_STATE_CHANGED, after=mark, timeout=10,
                                 predicate=lambda r: r.content == "Supervisor")
            assert [e.content for e in agent.of_type(AGENT_STATE_CHANGED, mark)] == ["Active", "Supervisor"]

            # the agent's next choice is carried out
            mark = len(agent.events)
            await agent.send("SetMsgUserState", {"code": "Break", "reason": ""})
            await agent.wait_for(AGENT_STATE_CHANGED, after=mark, timeout=10,
                                 predicate=lambda r: r.content == "Break")
            mark = len(agent.events)
            await agent.send("SetMsgUserState", {"code": "Active", "reason": ""})
            await agent.wait_for(AGENT_STATE_CHANGED, after=mark, timeout=10,
                                 predicate=lambda r: r.content == "Active")
        finally:
            await agent.close()

    asyncio.run(main())


def test_extension_name_as_admins_type_it(cluster: LocalCluster) -> None:
    """``SIP/307`` (the configured protocol), trimmed, is line 307; another technology is refused, saying why."""

    async def main() -> None:
        agent = CreatioAgent(cluster.client_url, "307", connection_params={"ExtensionName": " SIP/307 "})
        await agent.connect()
        await agent.open()
        wrong = CreatioAgent(cluster.client_url, "307", connection_params={"ExtensionName": "PJSIP/307"})
        await wrong.connect()
        try:
            mark = len(agent.events)
            await asyncio.to_thread(cluster.play, "inbound-direct-answered", line="307", caller="79161112233")
            ring = await agent.wait_for(RING_STARTED, after=mark, timeout=15)
            assert isinstance(ring.content, dict) and ring.content["deviceId"] == "307"
            await wrong.send("LoadLibrary", {"AssemblyName": "Terrasoft.Messaging.Asterisk"})
            await wrong.wait_for(LIBRARY_INITIALIZED)
            await wrong.send("OpenConnection", {"connectionParams": json.dumps(wrong.connection_params)})
            error = await wrong.wait_for(ERROR)
            assert isinstance(error.content, dict) and error.content["errorType"] == 9
            assert "SIP/305" in error.content["data"] and "PJSIP" in error.content["data"]
        finally:
            await agent.close()
            await wrong.close()

    asyncio.run(main())


def test_attended_transfer_keeps_the_original_caller_on_the_transferring_agents_call(cluster: LocalCluster) -> None:
    """Every call object of the original call (hold, CALL_INFO_CHANGED, the end) names the original caller, not
    the consultation target."""

    async def main() -> None:
        agent = CreatioAgent(cluster.client_url, "308")
        await agent.connect()
        await agent.open()
        try:
            mark = len(agent.events)
            await asyncio.to_thread(cluster.play, "inbound-direct-noanswer", line="308", caller="79161112233")
            ring = await agent.wait_for(RING_STARTED, after=mark, timeout=15)
            assert isinstance(ring.content, dict)
            await agent.call_command("AnswerCall", ring.content)
            call = (await agent.wait_for(COMMUTATION_STARTED, after=mark, timeout=10)).content
            assert isinstance(call, dict)
            await agent.call_command("MakeConsultCall", call, {"targetAddress": "306"})
            consult = (await agent.wait_for(RING_STARTED, after=mark, timeout=10,
                                            predicate=lambda r: r.content["id"] != call["id"])).content
            await asyncio.sleep(1.0)
            await agent.call_command("TransferCall", call, {"consultationCall": json.dumps(consult)})
            await agent.wait_for(RING_FINISHED, after=mark, timeout=15,
                                 predicate=lambda r: r.content["id"] == call["id"])
            await asyncio.sleep(1.0)
            objects = [e.content for e in agent.events[mark:]
                       if isinstance(e.content, dict) and e.content.get("id") == call["id"]]
            assert objects and all(o["callerId"] == "79161112233" for o in objects), objects
        finally:
            await agent.close()

    asyncio.run(main())


def test_a_code_the_agent_chose_survives_a_gateway_restart(cluster: LocalCluster) -> None:
    """An unlisted code pauses with its own name; after a gateway restart (a new run reads the queue states
    back from Asterisk) the agent is still reported with that code, not as a supervisor's pause."""

    async def main() -> None:
        agent = CreatioAgent(cluster.client_url, "306")  # 306: in the simulator's "support" queue
        await agent.connect()
        await agent.open()
        try:
            mark = len(agent.events)
            # the first state after connect: nobody changed 306 from the PBX side, so it is carried out
            await agent.send("SetMsgUserState", {"code": "Coffee", "reason": ""})
            await agent.wait_for(AGENT_STATE_CHANGED, after=mark, timeout=10,
                                 predicate=lambda r: r.content == "Coffee")
            epoch = line_epoch(cluster, "306")
            await asyncio.to_thread(cluster.kill, "gateway")
            await asyncio.to_thread(cluster.restart, "gateway", 60)
            # the new run has read the queue states back and restated the line (a new epoch for it)
            deadline = time.monotonic() + 30
            while line_epoch(cluster, "306") == epoch:
                assert time.monotonic() < deadline, "the restarted gateway never restated line 306"
                await asyncio.sleep(0.1)
            assert stored_agent(cluster, "306")["code"] == "Coffee"
            mark = len(agent.events)
            await agent.send("QueryMsgUserState")
            state = await agent.wait_for(AGENT_STATE_CHANGED, after=mark, timeout=10)
            assert state.content == "Coffee"
            mark = len(agent.events)
            await agent.send("SetMsgUserState", {"code": "Active", "reason": ""})
            await agent.wait_for(AGENT_STATE_CHANGED, after=mark, timeout=10,
                                 predicate=lambda r: r.content == "Active")
        finally:
            await agent.close()

    asyncio.run(main())
