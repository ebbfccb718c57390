"""The gateway's AMI client against the simulator over TCP: MD5 login, the event mask, filters, ActionID
correlation of an action with its later event, refused credentials."""

from __future__ import annotations

import asyncio

import pytest

from ami.protocol import AmiMessage
from ami_gateway.ami_client import AmiClient, AmiFenced, AmiSession
from ami_simulator.server import AmiSimulator, User, parse_classes
from services.backoff import Backoff
from tests.integration.test_gateway_proxy import SECRET, wait_until

pytestmark = pytest.mark.integration


async def _collect(sim: AmiSimulator, *, user: str = "admin", secret: str = SECRET, **options: object) \
        -> tuple[AmiClient, list[AmiMessage], asyncio.Task[None]]:
    received: list[AmiMessage] = []

    async def connected(session: AmiSession) -> None:
        return None

    client = AmiClient("127.0.0.1", sim.port, user, secret, on_event=lambda m, _at: received.append(m),
                       on_connected=connected, backoff=Backoff(initial=0.05, maximum=0.2), **options)  # type: ignore[arg-type]
    task = asyncio.create_task(client.run())
    return client, received, task


async def _stop(client: AmiClient, task: asyncio.Task[None]) -> None:
    await client.stop()
    await asyncio.wait_for(task, 5)


def test_md5_login_and_the_event_mask_keep_only_call_and_agent_events() -> None:
    async def main() -> None:
        async with AmiSimulator(port=0, users={"admin": SECRET}, time_scale=0.02) as sim:
            client, received, task = await _collect(sim)
            await asyncio.wait_for(client.ready.wait(), 5)
            session = client.session
            assert session is not None and session.banner == "Asterisk Call Manager/9.0.0"
            assert sim.metrics.actions.labels(action="challenge", response="handled")._value.get() == 1  # MD5
            call = sim.play("inbound-queue", line="305", agent2="306")
            await sim.wait_call(call, 10)
            await wait_until(lambda: any(m.event == "AgentComplete" for m in received), 5, "queue events")
            dtmf = await session.send_action("PlayDTMF", {"Channel": "SIP/none-1", "Digit": "1"})
            assert dtmf[0].response == "Error"
            names = {m.event for m in received}
            assert {"Newchannel", "DialBegin", "BridgeEnter", "Hangup", "AgentCalled", "QueueMemberStatus"} <= names
            assert "FullyBooted" not in names  # class "system": not in the mask, Asterisk never sends it
            await _stop(client, task)

    asyncio.run(main())


def test_filters_drop_chatty_events_and_a_refused_filter_is_not_fatal() -> None:
    cms = User(SECRET, parse_classes("call,agent"), parse_classes("call,agent,originate"))

    async def main() -> None:
        async with AmiSimulator(port=0, users={"admin": SECRET, "cms": cms}, time_scale=0.02) as sim:
            filtered, got_filtered, t1 = await _collect(sim, event_filters=["!Event: Newstate"])
            plain, got_plain, t2 = await _collect(sim, user="cms", event_filters=["!Event: Newstate"])
            await asyncio.wait_for(filtered.ready.wait(), 5)
            await asyncio.wait_for(plain.ready.wait(), 5)  # the refused Filter did not stop the session
            call = sim.play("inbound-direct-answered", line="305")
            await sim.wait_call(call, 10)
            await wait_until(lambda: sum(m.event == "Hangup" for m in got_filtered) == 2, 5, "hangups")
            await wait_until(lambda: sum(m.event == "Hangup" for m in got_plain) == 2, 5, "hangups")
            assert not any(m.event == "Newstate" for m in got_filtered)
            assert any(m.event == "Newstate" for m in got_plain)  # no system class: no filter, all events
            await _stop(filtered, t1)
            await _stop(plain, t2)

    asyncio.run(main())


def test_async_originate_waits_for_its_originate_response() -> None:
    async def main() -> None:
        async with AmiSimulator(port=0, users={"admin": SECRET}, time_scale=0.05) as sim:
            client, received, task = await _collect(sim)
            await asyncio.wait_for(client.ready.wait(), 5)
            assert client.session is not None
            answer = await client.session.send_action(
                "Originate",
                {"Channel": "SIP/307", "Context": "from-internal", "Exten": "5551234", "Priority": "1",
                 "Async": "true"},
                until_event="OriginateResponse",
            )
            response, outcome = answer
            assert response["Message"] == "Originate successfully queued"
            assert outcome.event == "OriginateResponse" and outcome["Response"] == "Success"
            assert outcome.action_id == response.action_id
            assert any(m.event == "OriginateResponse" for m in received)  # the tracker sees it too
            await _stop(client, task)

    asyncio.run(main())


def test_refused_credentials_are_retried_with_backoff_without_a_session() -> None:
    async def main() -> None:
        async with AmiSimulator(port=0, users={"admin": SECRET}) as sim:
            client, _, task = await _collect(sim, secret="wrong", auth_retry=0.3)
            await wait_until(lambda: sim.metrics.connections._value.get() >= 3, 5, "retries")
            assert not client.ready.is_set() and client.sessions_established == 0
            await _stop(client, task)
            # a refused login is not retried at the pace of a refused connect (Asterisk logs every failed login,
            # and fail2ban-style guards ban an address that keeps failing)
            slow, _, slow_task = await _collect(sim, secret="wrong")
            before = sim.metrics.connections._value.get()
            await asyncio.sleep(2.0)
            assert sim.metrics.connections._value.get() - before == 1
            await _stop(slow, slow_task)

    asyncio.run(main())


def test_a_standby_session_is_warm_and_silent_and_its_guard_keeps_it_from_acting() -> None:
    """Login with events off (no event reaches a standby), listing actions allowed, anything that changes the PBX
    refused by the guard before it is sent; the Events action turns events on when the lease is taken."""
    async def main() -> None:
        async with AmiSimulator(port=0, users={"admin": SECRET}, time_scale=0.02) as sim:
            allowed = False
            client, received, task = await _collect(sim, event_mask="off", action_guard=lambda _action: allowed)
            await asyncio.wait_for(client.ready.wait(), 5)
            session = client.session
            assert session is not None and session.logged_in
            call = sim.play("inbound-direct-answered", line="305")
            await sim.wait_call(call, 10)
            await asyncio.sleep(0.2)
            assert received == []  # warm, but Asterisk sends it nothing
            listing = await session.send_action("CoreShowChannels", expect_list=True)
            assert listing[0].response == "Success"
            with pytest.raises(AmiFenced):
                await session.send_action("Originate", {"Channel": "SIP/305", "Exten": "100", "Context": "x"})
            with pytest.raises(AmiFenced):
                await session.send_action("QueuePause", {"Interface": "SIP/305", "Paused": "true"})
            assert sim.metrics.actions.labels(action="originate", response="handled")._value.get() == 0
            assert sim.metrics.actions.labels(action="queuepause", response="handled")._value.get() == 0

            allowed = True  # the lease is ours: events on, actions go out
            answer = await session.send_action("Events", {"EventMask": "call,agent"})
            assert answer[0].response == "Success"
            call = sim.play("inbound-direct-answered", line="306")
            await sim.wait_call(call, 10)
            await wait_until(lambda: any(m.event == "Hangup" for m in received), 5, "events after Events on")
            pause = await session.send_action("QueuePause", {"Interface": "SIP/305", "Paused": "true"})
            assert pause[0].response in ("Success", "Error")  # sent and answered (membership is the PBX's business)
            assert sim.metrics.actions.labels(action="queuepause", response="handled")._value.get() == 1
            await _stop(client, task)

    asyncio.run(main())
