"""Every agent command through the real path: node side -> RabbitMQ -> gateway -> AMI (simulator over TCP) ->
events back on RabbitMQ, with the gateway's state in the real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from ami_gateway.app import Gateway
from ami_gateway.command_executor import CommandExecutor
from ami_gateway.queue_policy import AUTO_PAUSE_REASON
from ami_gateway.tracker import CallControl, CallTracker
from ami_simulator.model import Call as SimCall
from ami_simulator.server import AmiSimulator, User, parse_classes
from local_cluster.infra import Infrastructure
from services.wire import CallArgs, CallState, Command, CommandName, DialArgs, EventType, LineEvent
from tests.integration.test_gateway_proxy import (
    SECRET,
    CommandClient,
    EventListener,
    cleanup,
    gateway_settings,
    running_gateway,
    wait_until,
)
from tests.integration.test_simulator import Client

pytestmark = pytest.mark.integration

LINES = ["305", "306", "307", "308"]


@dataclass
class Rig:
    sim: AmiSimulator
    gateway: Gateway
    events: EventListener
    commands: CommandClient
    observers: list[Client] = field(default_factory=list)

    async def observe(self) -> Client:
        """A plain AMI client watching the simulator; closed with the rig."""
        observer = await Client.connect(self.sim.port)
        Client.open_clients.remove(observer)  # not left to test_simulator's cleanup, which runs in its own loop
        self.observers.append(observer)
        await observer.login(secret=SECRET)
        return observer

    async def send(self, line: str, name: CommandName, **args: str) -> Any:
        return await self.commands.send(line, name, **args)

    async def event(self, line: str, kind: EventType, call_id: str | None = None, **match: Any) -> LineEvent:
        def pred(e: LineEvent) -> bool:
            if e.line != line or e.type is not kind:
                return False
            if call_id is not None and (e.call is None or e.call.id != call_id):
                return False
            return all(getattr(e.call if k != "agent" else e, k) == v for k, v in match.items())

        return await self.events.wait_for(pred, what=f"{kind.value} on {line}")

    async def connected_call(self, scenario: str = "inbound-direct-long", line: str = "305", **variables: str) \
            -> tuple[SimCall, str]:
        call = self.sim.play(scenario, line=line, **variables)
        event = await self.event(line, EventType.COMMUTATION_STARTED, linked_id=call.id)
        assert event.call is not None
        call_id = event.call.id
        # DialEnd ANSWER comes a moment before the bridge: transfers need the agent's phone bridged.
        await wait_until(lambda: bool((c := self.gateway.tracker.control(line, call_id)) and c.peer), what="bridged")
        return call, call_id


@contextlib.asynccontextmanager
async def rig(infra: Infrastructure, prefix: str, *, sim_options: dict[str, Any] | None = None,
              **asterisk: Any) -> AsyncIterator[Rig]:
    options: dict[str, Any] = {"port": 0, "users": {"admin": SECRET}, "time_scale": 0.2,
                               "queues": {"support": ["305", "306"], "sales": ["305", "307"]}}
    options.update(sim_options or {})
    listener = await EventListener(infra.amqp_url, prefix).start(LINES)
    commands = await CommandClient(infra.amqp_url, prefix).start()
    try:
        async with AmiSimulator(**options) as sim:
            async with running_gateway(gateway_settings(infra, prefix, sim.port, **asterisk)) as gateway:
                await asyncio.wait_for(gateway.ready.wait(), 10)
                r = Rig(sim, gateway, listener, commands)
                try:
                    yield r
                finally:
                    for observer in r.observers:
                        await observer.close()
                    sim.hangup_all()
    finally:
        await commands.close()
        await listener.close()
        await cleanup(infra, prefix)


def run(coro: Any) -> None:
    asyncio.run(coro)



def test_make_call_originates_from_the_agent_line_in_the_users_context(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        async with rig(infra, prefix, allowed_originate_contexts=("from-users-306",)) as r:
            result = await r.send("306", CommandName.MAKE_CALL, number="84951112233", context="from-users-306")
            assert result.ok, result.error
            # asyncOriginate: the answer waited for the OriginateResponse of the same ActionID
            assert result.data["uniqueid"] and result.data["context"] == "from-users-306"
            ring = await r.event("306", EventType.RING_STARTED)
            assert ring.call is not None and ring.call.direction.value == "outbound"
            played = next(c for c in [*r.sim.model.calls.values(), *r.sim.model.finished]
                          if c.variables.get("line") == "306")
            assert played.variables["context"] == "from-users-306" and played.variables["number"] == "84951112233"
            connected = await r.event("306", EventType.COMMUTATION_STARTED)
            assert connected.call is not None and connected.call.called_number == "84951112233"
            bad = await r.send("306", CommandName.MAKE_CALL, number="12;Hangup")
            assert not bad.ok and "valid number" in bad.error
            # a context the administrator did not allow never reaches the PBX (issue 12)
            trunk = await r.send("306", CommandName.MAKE_CALL, number="84951112233", context="from-trunk")
            assert not trunk.ok and "'from-trunk' is not allowed on this server" in trunk.error
            assert not any(c.variables.get("context") == "from-trunk"
                           for c in [*r.sim.model.calls.values(), *r.sim.model.finished])

    run(main())


def test_a_redelivered_command_without_its_claim_is_not_carried_out_again(infra: Infrastructure, prefix: str) -> None:
    """Claims live in Redis. A command the broker redelivers (its consumer died or stepped down
    holding it) whose claim is gone (Redis came back empty) may already have reached the PBX:
    it is refused, not sent again (chaos redis-restart-empty saw click-to-dial run twice)."""
    async def main() -> None:
        async with rig(infra, prefix) as r:
            def originated() -> int:
                return sum(1 for c in [*r.sim.model.calls.values(), *r.sim.model.finished]
                           if c.variables.get("line") == "307")

            again = Command(id="redelivered-1", line="307", name=CommandName.MAKE_CALL,
                            args=DialArgs("5550001"), issued_at=time.time())
            result = await r.gateway._carry_out(again, redelivered=True)
            assert result is not None and not result.ok and "check the call" in result.error
            assert originated() == 0
            # The same command id delivered once more, now with its claim taken: still not repeated.
            assert not (await r.gateway._carry_out(again)).ok  # type: ignore[union-attr]
            # A first delivery is carried out as ever.
            first = Command(id="first-1", line="307", name=CommandName.MAKE_CALL, args=DialArgs("5550002"),
                            issued_at=time.time())
            done = await r.gateway._carry_out(first)
            assert done is not None and done.ok, done
            await wait_until(lambda: originated() == 1, 5)

    run(main())


def test_synchronous_originate_answers_when_the_phone_is_up(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        async with rig(infra, prefix, async_originate=False) as r:
            started = time.monotonic()
            result = await r.send("307", CommandName.MAKE_CALL, number="5550000")
            assert result.ok, result.error
            assert time.monotonic() - started > 0.15  # the Response came once the agent's phone answered (1 s x 0.2)
            played = next(c for c in [*r.sim.model.calls.values(), *r.sim.model.finished]
                          if c.variables.get("line") == "307")
            assert played.variables["context"] == "from-internal"  # originateContext when the user has none

    run(main())


@pytest.mark.parametrize("async_originate", [True, False])
def test_make_call_to_an_unreachable_phone_says_why(infra: Infrastructure, prefix: str, async_originate: bool) -> None:
    async def main() -> None:
        async with rig(infra, prefix, async_originate=async_originate) as r:
            r.sim.unregistered.add("308")
            result = await r.send("308", CommandName.MAKE_CALL, number="5551234")
            assert not result.ok
            if async_originate:  # the OriginateResponse with our ActionID said Failure, Reason 0
                assert result.error == (
                    "the call could not be started: the line could not be dialled (unknown, unregistered or refused)"
                )
            else:
                assert result.error == "Originate failed (is the agent's phone registered and reachable?)"

    run(main())


def test_hangup_acts_only_on_the_agents_own_line_and_stale_commands_are_refused(
    infra: Infrastructure, prefix: str
) -> None:
    async def main() -> None:
        async with rig(infra, prefix) as r:
            call, call_id = await r.connected_call()
            other = await r.send("306", CommandName.HANGUP, call_id=call_id)
            assert not other.ok and other.error == f"no call {call_id} on line 306"
            stale = await r.commands.send("305", CommandName.HANGUP, issued_at=time.time() - 30, call_id=call_id)
            assert not stale.ok and "expired" in stale.error
            assert call.live  # neither touched the call
            done = await r.send("305", CommandName.HANGUP, call_id=call_id)
            assert done.ok, done.error
            end = await r.event("305", EventType.RING_FINISHED, call_id)
            assert end.call is not None and end.call.hangup_cause == 16
            await r.sim.wait_call(call, 10)

    run(main())


@pytest.mark.parametrize("tech", ["SIP", "PJSIP"])
def test_answer_tells_the_phone_to_answer(infra: Infrastructure, prefix: str, tech: str) -> None:
    async def main() -> None:
        async with rig(infra, prefix, sim_options={"tech": tech}) as r:
            observer = await r.observe()
            r.sim.play("inbound-direct-noanswer", line="305")  # would ring 15 s x 0.2 = 3 s, then give up
            ring = await r.event("305", EventType.RING_STARTED)
            assert ring.call is not None
            result = await r.send("305", CommandName.ANSWER, call_id=ring.call.id)
            assert result.ok, result.error
            connected = await r.event("305", EventType.COMMUTATION_STARTED, ring.call.id)
            assert connected.call is not None and connected.call.state is CallState.CONNECTED
            # the phone answered because of the NOTIFY, not because the scenario said so
            await observer.event("DialEnd", DialStatus="ANSWER")
            wrong = await r.send("305", CommandName.ANSWER, call_id=ring.call.id)
            assert not wrong.ok and wrong.error == "answer: the call is connected"

    run(main())


def test_answer_without_the_system_class_says_which_permission_is_missing(
    infra: Infrastructure, prefix: str
) -> None:
    cms_user = User(SECRET, parse_classes("call,agent,originate"), parse_classes("call,agent,originate"))
    async def main() -> None:
        async with rig(infra, prefix, sim_options={"users": {"admin": cms_user}}) as r:
            r.sim.play("inbound-direct-noanswer", line="305")
            ring = await r.event("305", EventType.RING_STARTED)
            assert ring.call is not None
            result = await r.send("305", CommandName.ANSWER, call_id=ring.call.id)
            assert not result.ok
            assert result.error == "SIPnotify was refused: the AMI user needs write = system in manager.conf"

    run(main())


def test_hold_and_resume_by_parking_the_far_end(infra: Infrastructure, prefix: str) -> None:
    """Park the far end (Asterisk then hangs the agent's phone channel up: the call stays held), resume by
    calling the phone into the lot; the same call goes on, on the phone's new channel."""

    async def main() -> None:
        async with rig(infra, prefix, parking_lot_context="parkedcalls") as r:
            call, call_id = await r.connected_call()
            trunk, agent = call.planned[:2]
            held = await r.send("305", CommandName.HOLD, call_id=call_id)
            assert held.ok and held.data["parked_channel"] == trunk
            on_hold = await r.event("305", EventType.HOLD_STARTED, call_id, state=CallState.HELD)
            assert on_hold.call is not None and on_hold.call.caller_number
            assert [p.channel for p in r.sim.parked.values()] == [trunk]  # the far end, not the agent
            await wait_until(lambda: agent not in r.sim.model.channels, what="the agent's channel gone")
            [control] = r.gateway.tracker.controls("305")
            assert control.call.id == call_id and control.channel == "" and control.parked_space == "701"
            assert [e for e in r.events.events if e.line == "305" and e.type is EventType.RING_FINISHED] == []

            resumed = await r.send("305", CommandName.UNHOLD, call_id=call_id)
            assert resumed.ok, resumed.error
            assert resumed.data["parking_space"] == "701" and resumed.data["retriever"].startswith("cms-")
            back = await r.event("305", EventType.HOLD_ENDED, call_id, state=CallState.CONNECTED)
            assert back.call is not None and back.call.channel not in ("", agent)
            assert (back.call.caller_number, back.call.caller_name) == (on_hold.call.caller_number,
                                                                         on_hold.call.caller_name)
            assert not r.sim.parked
            phone = r.sim.model.channels[back.call.channel]
            assert phone.snapshot["Uniqueid"] == resumed.data["retriever"]
            assert [p.name for p in r.sim.model.bridge_partners(phone)] == [trunk]  # back with the caller
            # No other call was announced on the line meanwhile (the ringing phone was this call coming back).
            assert {e.call.id for e in r.events.events if e.line == "305" and e.call} == {call_id}

            done = await r.send("305", CommandName.HANGUP, call_id=call_id)
            assert done.ok, done.error
            await r.event("305", EventType.RING_FINISHED, call_id)

    run(main())


@dataclass
class TrailingView:
    """The tracker as it was a moment ago (what a command planned just before an event was read sees), with
    the live tracker behind it for everything else."""

    live: CallTracker
    then: list[CallControl]

    def controls(self, line: str) -> list[CallControl]:
        return self.then

    def tech_of(self, line: str) -> str | None:
        return self.live.tech_of(line)

    def expect_retriever(self, line: str, call_id: str, uniqueid: str) -> None:
        self.live.expect_retriever(line, call_id, uniqueid)


def test_a_resume_planned_on_a_phone_channel_asterisk_has_just_hung_up(infra: Infrastructure, prefix: str) -> None:
    """The resume is planned while the gateway still sees the agent's channel (it hears the parking space), and
    reaches the PBX after that channel hung up: the Redirect finds no channel, and the phone is called into the
    lot instead. The call resumes either way; before, the agent got an error and the call stayed parked."""

    async def main() -> None:
        async with rig(infra, prefix, parking_lot_context="parkedcalls") as r:
            call, call_id = await r.connected_call()
            trunk, agent = call.planned[:2]
            assert (await r.send("305", CommandName.HOLD, call_id=call_id)).ok
            await r.event("305", EventType.HOLD_STARTED, call_id)
            gw = r.gateway
            await wait_until(lambda: agent not in r.sim.model.channels and gw.tracker.controls("305")[0].channel == "",
                             what="the agent's channel gone")
            # what the tracker showed while the agent's phone heard the space read out
            then = dataclasses.replace(gw.tracker.controls("305")[0], channel=agent)
            assert then.parked_space == "701"
            executor = CommandExecutor(gw.settings.asterisk, gw.matcher,
                                       session=lambda: gw.ami.session if gw.ami is not None else None,
                                       view=TrailingView(gw.tracker, [then]))
            result = await executor.execute(Command(id="resume-1", line="305", name=CommandName.UNHOLD,
                                                    args=CallArgs(call_id), issued_at=time.time()))
            assert result.ok, result.error
            back = await r.event("305", EventType.HOLD_ENDED, call_id, state=CallState.CONNECTED)
            assert back.call is not None and back.call.channel not in ("", agent)
            phone = r.sim.model.channels[back.call.channel]
            assert phone.snapshot["Uniqueid"].startswith("cms-")  # called into the lot, announced beforehand
            assert [p.name for p in r.sim.model.bridge_partners(phone)] == [trunk]
            assert {e.call.id for e in r.events.events if e.line == "305" and e.call} == {call_id}

    run(main())


def test_hanging_up_a_held_call_hangs_up_the_parked_party(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        async with rig(infra, prefix, parking_lot_context="parkedcalls") as r:
            call, call_id = await r.connected_call()
            assert (await r.send("305", CommandName.HOLD, call_id=call_id)).ok
            await r.event("305", EventType.HOLD_STARTED, call_id)
            await wait_until(lambda: call.planned[1] not in r.sim.model.channels, what="the agent's channel gone")
            done = await r.send("305", CommandName.HANGUP, call_id=call_id)
            assert done.ok, done.error
            end = await r.event("305", EventType.RING_FINISHED, call_id)
            assert end.call is not None and end.call.hangup_cause_text == "PARKED_GIVEUP"
            await r.sim.wait_call(call, 10)
            assert not r.sim.parked

    run(main())


def test_hold_without_a_parking_lot_is_not_supported(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        async with rig(infra, prefix) as r:
            _, call_id = await r.connected_call()
            result = await r.send("305", CommandName.HOLD, call_id=call_id)
            assert not result.ok and result.error.startswith("hold is not supported: set parkingLotContext")

    run(main())


def test_blind_transfer(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        async with rig(infra, prefix) as r:
            _, call_id = await r.connected_call()
            result = await r.send("305", CommandName.BLIND_TRANSFER, call_id=call_id, number="308")
            assert result.ok, result.error
            await r.event("305", EventType.RING_FINISHED, call_id)
            moved = await r.event("308", EventType.COMMUTATION_STARTED)
            assert moved.call is not None and moved.call.caller_number == "79161234567"
            assert (moved.call.redirecting_number, moved.call.redirection_number) == ("305", "308")

    run(main())


def test_consult_then_complete_the_transfer(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        async with rig(infra, prefix) as r:
            _, call_id = await r.connected_call()
            result = await r.send("305", CommandName.CONSULT_CALL, call_id=call_id, number="306")
            assert result.ok, result.error
            await r.event("305", EventType.HOLD_STARTED, call_id)
            consult = await r.event("305", EventType.COMMUTATION_STARTED, f"{call_id.rsplit(':', 1)[0]}:305:2")
            assert consult.call is not None and consult.call.called_number == "306"
            assert consult.call.direction.value == "internal"
            await r.event("306", EventType.COMMUTATION_STARTED)
            done = await r.send("305", CommandName.COMPLETE_TRANSFER, call_id=call_id,
                                consult_call_id=consult.call.id)
            assert done.ok, done.error
            await r.event("305", EventType.RING_FINISHED, call_id)
            await r.event("305", EventType.RING_FINISHED, consult.call.id)
            talking = await r.event("306", EventType.CALL_INFO_CHANGED, caller_number="79161234567")
            assert talking.call is not None and talking.call.redirecting_number == "305"

    run(main())


def test_consult_then_cancel_the_transfer(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        async with rig(infra, prefix) as r:
            call, call_id = await r.connected_call()
            assert (await r.send("305", CommandName.CONSULT_CALL, call_id=call_id, number="306")).ok
            consult = await r.event("305", EventType.COMMUTATION_STARTED, f"{call_id.rsplit(':', 1)[0]}:305:2")
            assert consult.call is not None
            done = await r.send("305", CommandName.CANCEL_TRANSFER, call_id=call_id, consult_call_id=consult.call.id)
            assert done.ok, done.error
            await r.event("305", EventType.RING_FINISHED, consult.call.id)
            await r.event("305", EventType.HOLD_ENDED, call_id, state=CallState.CONNECTED)
            await r.event("306", EventType.RING_FINISHED)
            partners = r.sim.model.bridge_partners(r.sim.model.channels[call.planned[1]])
            assert [p.name for p in partners] == [call.planned[0]]  # the agent talks to the caller again
            same = await r.send("305", CommandName.CANCEL_TRANSFER, call_id=call_id, consult_call_id=call_id)
            assert not same.ok and "is the call itself" in same.error

    run(main())


def test_dtmf_is_played_to_the_far_end(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        async with rig(infra, prefix) as r:
            observer = await r.observe()
            call, call_id = await r.connected_call()
            result = await r.send("305", CommandName.DTMF, call_id=call_id, digits="1#")
            assert result.ok, result.error
            first = await observer.event("DTMFEnd", Digit="1")
            second = await observer.event("DTMFEnd", Digit="#")
            assert first["Channel"] == second["Channel"] == call.planned[0]  # the trunk, toward the caller
            assert call.to_json()["dtmf"] == "1#"  # what an end-to-end test reads from GET /calls
            bad = await r.send("305", CommandName.DTMF, call_id=call_id, digits="9x")
            assert not bad.ok and "digits" in bad.error

    run(main())


def test_dnd_toggles_freepbx_keys(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        async with rig(infra, prefix) as r:
            on = await r.send("305", CommandName.SET_DND, mode="toggle")
            assert on.ok and on.data["dnd"] == "on"
            assert r.sim.astdb[("DND", "305")] == "YES"
            assert r.sim._globals["DEVICE_STATE(Custom:DND305)"] == "BUSY"
            off = await r.send("305", CommandName.SET_DND, mode="toggle")
            assert off.ok and off.data["dnd"] == "off"
            assert ("DND", "305") not in r.sim.astdb
            assert r.sim._globals["DEVICE_STATE(Custom:DND305)"] == "NOT_INUSE"
            again = await r.send("305", CommandName.SET_DND, mode="off")
            assert again.ok  # already off: DBDel of a missing key is not an error

    run(main())


def test_pause_and_unpause_in_every_queue_with_a_reason(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        async with rig(infra, prefix) as r:
            paused = await r.send("305", CommandName.AGENT_PAUSE, reason="Lunch")
            assert paused.ok and paused.data["interface"] == "Local/305@from-queue/n"
            event = await r.events.wait_for(
                lambda e: e.line == "305" and e.agent is not None and e.agent.paused, what="paused"
            )
            assert event.agent is not None and event.agent.reason == "Lunch"
            assert event.agent.queues == ("sales", "support")
            assert all(m.paused for m in r.sim.model.find_members("Local/305@from-queue/n"))
            assert (await r.send("305", CommandName.AGENT_UNPAUSE)).ok
            await r.events.wait_for(
                lambda e: e.line == "305" and e.agent is not None and not e.agent.paused, what="unpaused"
            )
            stranger = await r.send("308", CommandName.AGENT_PAUSE, reason="x")
            assert not stranger.ok and stranger.error == "QueuePause failed: Interface not found"

    run(main())


def test_an_ami_reconnect_whose_queue_listing_fails_keeps_a_paused_agent_paused(
    infra: Infrastructure, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A QueueStatus that fails says nothing about the queues: it used to be read as an empty listing, every
    membership gone, and a paused agent was reported ready after every AMI reconnect of a PBX without app_queue
    loaded (or one whose listing timed out)."""
    caplog.set_level(logging.WARNING, logger="ami_gateway.app")

    async def main() -> None:
        async with rig(infra, prefix) as r:
            assert (await r.send("305", CommandName.AGENT_PAUSE, reason="Lunch")).ok
            await r.events.wait_for(lambda e: e.line == "305" and e.agent is not None and e.agent.paused,
                                    what="paused")
            r.sim.unloaded_actions.add("queuestatus")
            seen = len(r.events.of_line("305"))
            r.gateway.ready.clear()
            assert r.sim.drop_clients() >= 1
            await asyncio.wait_for(r.gateway.ready.wait(), 10)  # reconnected and resynced
            assert any("QueueStatus refused" in m for m in caplog.messages)
            # the next event on the line comes after the resync: an agent state in it would have been published
            r.sim.play("inbound-direct-answered", line="305")
            await r.event("305", EventType.RING_STARTED)
            after = r.events.of_line("305")[seen:]
            assert not [e for e in after if e.agent is not None and not e.agent.paused], after

    run(main())


def test_an_older_nodes_command_is_carried_out_and_a_broken_one_is_answered(infra: Infrastructure,
                                                                            prefix: str) -> None:
    async def main() -> None:
        async with rig(infra, prefix) as r:
            # What a node of the previous build sends: wrap_up's flag as the string "true".
            old = {"v": 1, "id": "old-1", "line": "305", "name": "wrap_up", "args": {"active": "true"},
                   "issued_at": time.time()}
            assert (await r.commands.send_body("old-1", json.dumps(old).encode())).ok
            await wait_until(lambda: [m.paused_reason for m in r.sim.model.find_members("305")] == ["Wrap-up"] * 2,
                             what="wrap-up")
            # A command whose arguments do not fit is answered with what is wrong, not left to time out.
            broken = {**old, "id": "bad-1", "name": "set_dnd", "args": {"mode": "maybe"}}
            result = await r.commands.send_body("bad-1", json.dumps(broken).encode())
            assert not result.ok
            assert result.error == "bad command: set_dnd.mode must be one of on, off, toggle, not 'maybe'"

    run(main())


def test_auto_pause_on_answer_and_restore_after_the_call(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        async with rig(infra, prefix, auto_pause_on_commutation_start=True) as r:
            call = r.sim.play("inbound-direct-answered", line="305")
            paused = await r.events.wait_for(
                lambda e: e.line == "305" and e.agent is not None and e.agent.paused, what="auto pause"
            )
            assert paused.agent is not None and paused.agent.reason == AUTO_PAUSE_REASON
            kinds = [e.type for e in r.events.of_line("305")]
            assert kinds.index(EventType.COMMUTATION_STARTED) < kinds.index(EventType.AGENT_STATE_CHANGED)
            await r.sim.wait_call(call, 10)
            await r.events.wait_for(
                lambda e: e.line == "305" and e.agent is not None and not e.agent.paused, what="restored"
            )
            assert not any(m.paused for m in r.sim.model.find_members("Local/305@from-queue/n"))

    run(main())


def test_auto_pause_refused_for_want_of_the_agent_class_says_which_class(
    infra: Infrastructure, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """autoPauseOnCommutationStart's QueuePause is planned and sent as the agents' own: a refusal is explained
    the same way (it was hand-built in app.py and logged Asterisk's bare "Permission denied")."""
    caplog.set_level(logging.WARNING, logger="ami_gateway.app")
    no_agent_class = User(SECRET, parse_classes("call,agent,originate"), parse_classes("call,originate"))

    async def main() -> None:
        async with rig(infra, prefix, auto_pause_on_commutation_start=True,
                       sim_options={"users": {"admin": no_agent_class}}) as r:
            await r.connected_call()
            await wait_until(lambda: any("auto pause of line 305 not done" in m for m in caplog.messages),
                             what="the refusal logged")
            assert not any(m.paused for m in r.sim.model.find_members("305"))

    run(main())
    refusal = next(m for m in caplog.messages if "auto pause of line 305 not done" in m)
    assert refusal.endswith("QueuePause was refused: the AMI user needs write = agent in manager.conf")


def test_auto_pause_keeps_the_agents_own_choice_and_wrap_up(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        async with rig(infra, prefix, auto_pause_on_commutation_start=True) as r:
            # 1. the agent pauses for lunch during the call: stays paused after it
            call, _ = await r.connected_call()
            await r.events.wait_for(lambda e: e.line == "305" and e.agent is not None and e.agent.paused)
            assert (await r.send("305", CommandName.AGENT_PAUSE, reason="Lunch")).ok
            await r.events.wait_for(lambda e: e.agent is not None and e.agent.reason == "Lunch")
            r.sim.hangup_all()
            await r.sim.wait_call(call, 10)
            await asyncio.sleep(0.5)
            assert [m.paused_reason for m in r.sim.model.find_members("305")] == ["Lunch", "Lunch"]
            # 2. ready again; a call with wrap-up switched on during it: paused (Wrap-up) after it
            assert (await r.send("305", CommandName.AGENT_UNPAUSE)).ok
            await wait_until(lambda: not any(m.paused for m in r.sim.model.find_members("305")))
            call, _ = await r.connected_call(scenario="inbound-direct-answered")
            await wait_until(lambda: all(m.paused for m in r.sim.model.find_members("305")), what="auto pause")
            assert (await r.send("305", CommandName.WRAP_UP, active="true")).ok
            await r.sim.wait_call(call, 10)
            await asyncio.sleep(0.5)
            assert [m.paused_reason for m in r.sim.model.find_members("305")] == ["Wrap-up", "Wrap-up"]
            assert (await r.send("305", CommandName.WRAP_UP, active="false")).ok
            await wait_until(lambda: not any(m.paused for m in r.sim.model.find_members("305")), what="ready")

    run(main())


def test_trace_queues_state_logs_one_line_per_change(
    infra: Infrastructure, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ami_gateway.queues")

    async def main() -> None:
        async with rig(infra, prefix, trace_queues_state=True) as r:
            await wait_until(lambda: sum("change=added" in m for m in caplog.messages) == 4, what="memberships")
            assert (await r.send("305", CommandName.AGENT_PAUSE, reason="Break")).ok
            await wait_until(lambda: sum("change=paused" in m for m in caplog.messages) == 2, what="pause lines")

    run(main())
    lines = [m for m in caplog.messages if m.startswith("queue_state")]
    assert "queue_state line=305 queue=sales change=paused paused=true reason='Break' status=1 " \
           "interface=Local/305@from-queue/n" in lines
    assert sum("line=305" in m and "change=paused" in m for m in lines) == 2
