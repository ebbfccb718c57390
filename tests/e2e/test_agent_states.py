"""What the agent sees in Creatio's header and panel, through the whole cluster (issue 11, points 3 and 4).

Agent states, with an ``AgentStates`` block: the code the agent chose comes back exactly; a supervisor's pause or
unpause on the PBX (QueuePause from another AMI client) reaches the agent as the configured code; on reconnect,
the state Creatio's header re-sends from the profile does not undo what a supervisor did meanwhile. Then
ExtensionName as admins type it, and the caller of an attended transfer's original call. The last test goes
over the same points on Creatio 8.x's SignalR transport.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from local_cluster.infra import Infrastructure
from local_cluster.launcher import ClusterOptions, LocalCluster
from tests.e2e.test_signalr import SignalRAgent, assert_creatio_sequence_ok, content, ensure_signalr_client
from tests.e2e.test_signalr import opened as signalr_opened
from tests.support.creatio_client import (
    ABONENT_BUSY,
    AGENT_STATE_CHANGED,
    COMMUTATION_STARTED,
    DTMF_ENTERED,
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


def test_signalr_agent_sees_codes_extension_forms_busy_dtmf_and_the_original_caller(cluster: LocalCluster) -> None:
    """The same points over Creatio 8.x's transport (Microsoft's SignalR client through HAProxy): ExtensionName
    typed as `` SIP/306 ``, the chosen code back exactly and a supervisor's change as the configured code; on a
    line of its own (309, in no queue: the other tests' calls do not reach it), the busy call kept until
    RING_FINISHED, DTMF echoed once played, and the original caller kept on the transferring agent's call
    through an attended transfer."""
    script = ensure_signalr_client()
    url = f"http://127.0.0.1:{cluster.options.haproxy_port}/"
    caller = "79165550309"

    async def main() -> None:
        states = SignalRAgent(script, url, " SIP/306 ")
        calls = SignalRAgent(script, url, "SIP/309")
        await states.start()
        await calls.start()

        async def event(agent: SignalRAgent, kind: int, mark: int, pred: Callable[[Any], bool] = lambda c: True,
                        timeout: float = 15.0) -> Any:
            item = await agent.wait(lambda i: i["kind"] == "event" and i["eventType"] == kind and pred(content(i)),
                                    timeout, after=mark)
            return content(item)

        async def send(agent: SignalRAgent, command: str, parameters: dict[str, Any] | None = None,
                       executor: dict[str, Any] | None = None) -> None:
            await agent.send({"op": "send", "command": command, "parameters": parameters or {}, "executor": executor})

        try:
            await signalr_opened(states)
            await signalr_opened(calls)
            # codes (point 3), on 306 (in the simulator's "support" queue), opened as "SIP/306" with spaces
            mark = len(states.lines)
            await send(states, "SetMsgUserState", {"code": "Lunch", "reason": ""})
            await event(states, AGENT_STATE_CHANGED, mark, lambda c: c == "Lunch")
            assert stored_agent(cluster, "306")["code"] == "Lunch"
            mark = len(states.lines)
            await supervisor_pause(cluster, "306", False)
            await event(states, AGENT_STATE_CHANGED, mark, lambda c: c == "Active")
            mark = len(states.lines)
            await send(states, "SetMsgUserState", {"code": "Active", "reason": ""})  # the agent's own choice, last
            await states.wait(lambda i: i["kind"] == "invoked" and i["label"] == "SetMsgUserState", after=mark)

            # busy (point 4): the call stays, as busy, until its RING_FINISHED
            mark = len(calls.lines)
            await asyncio.to_thread(cluster.play, "inbound-busy", line="309", caller=caller)
            busy = await event(calls, ABONENT_BUSY, mark)
            assert busy["state"] == 6 and busy["deviceId"] == "309"
            await event(calls, RING_FINISHED, mark, lambda c: c["id"] == busy["id"])

            # DTMF echo, then the attended transfer keeps the original caller (point 4)
            mark = len(calls.lines)
            await asyncio.to_thread(cluster.play, "inbound-direct-noanswer", line="309", caller=caller)
            ring = await event(calls, RING_STARTED, mark)
            await send(calls, "AnswerCall", executor=ring)
            call = await event(calls, COMMUTATION_STARTED, mark)
            await send(calls, "SendDtmf", {"digits": "12#"}, executor=call)
            assert await event(calls, DTMF_ENTERED, mark) == "12#"
            await send(calls, "MakeConsultCall", {"targetAddress": "310"}, executor=call)
            consult = await event(calls, RING_STARTED, mark, lambda c: c.get("calledId") == "310")
            await asyncio.sleep(1.0)
            await send(calls, "TransferCall", {"consultationCall": json.dumps(consult)}, executor=call)
            await event(calls, RING_FINISHED, mark, lambda c: c["id"] == call["id"])
            await asyncio.sleep(1.0)
            objects = [content(i) for i in calls.lines[mark:] if i["kind"] == "event"
                       and isinstance(content(i), dict) and content(i).get("id") == call["id"]]
            assert objects and all(o["callerId"] == caller for o in objects), objects
            assert [content(i) for i in calls.events(DTMF_ENTERED)] == ["12#"]
            for agent in (states, calls):
                assert not agent.events(ERROR), agent.events(ERROR)
                assert_creatio_sequence_ok(agent)
        finally:
            await calls.stop()
            await states.stop()

    asyncio.run(main())
