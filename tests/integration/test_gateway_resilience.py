"""The gateway against outages, with TCP proxies the tests control: RabbitMQ unreachable during a burst (reading
AMI never stops, nothing is lost, order is kept), the PBX restarted mid-call (the truth comes back), a silent
AMI session (the keepalive notices)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from urllib.parse import urlsplit, urlunsplit

import pytest

from ami.protocol import AmiMessage, AmiParser, encode_action
from ami_gateway.ami_client import AMI_DISCONNECTS
from ami_gateway.lines import LineMatcher
from ami_gateway.tracker import CallTracker
from ami_simulator.server import AmiSimulator
from local_cluster.infra import Infrastructure
from ops.chaos.fault_proxy import BLACKHOLE, CUT, PASS, FaultProxy
from services.wire import CallState, EventType, LineEvent
from tests.integration.test_gateway_proxy import (
    SECRET,
    EventListener,
    cleanup,
    gateway_settings,
    running_gateway,
    wait_until,
)

pytestmark = pytest.mark.integration


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


class Recorder:
    """A second AMI client on the simulator: what Asterisk said, in order, to compute the expected events."""

    def __init__(self) -> None:
        self.messages: list[AmiMessage] = []
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def start(self, port: int) -> Recorder:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self._writer = writer
        writer.write(encode_action("Login", {"Username": "admin", "Secret": SECRET, "Events": "call,agent"}, "r"))
        parser = AmiParser()

        async def read() -> None:
            while data := await reader.read(65536):
                parser.receive_data(data)
                while (item := parser.next_event()) is not None:
                    if isinstance(item, AmiMessage) and item.event:
                        self.messages.append(item)

        self._task = asyncio.create_task(read())
        return self

    def expected(self, lines: set[str]) -> dict[str, list[tuple[str, str, str]]]:
        tracker = CallTracker(LineMatcher("SIP,PJSIP", "Local/{0}@from-queue/n"))
        out: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
        for i, msg in enumerate(self.messages):
            for e in tracker.handle(msg, float(i)):
                if e.line in lines:
                    out[e.line].append(_view(e))
        return dict(out)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def _view(e: LineEvent) -> tuple[str, str, str]:
    return e.type.value, e.call.id if e.call else "", e.call.state.value if e.call else ""


def test_broker_outage_during_a_burst_loses_nothing_and_keeps_order(infra: Infrastructure, prefix: str) -> None:
    burst_lines = [str(n) for n in range(401, 421)]

    async def main() -> None:
        amqp_port = urlsplit(infra.amqp_url).port or 5672
        broker = FaultProxy("broker", "127.0.0.1", amqp_port)
        await broker.start()
        listener = await EventListener(infra.amqp_url, prefix).start(["399", *burst_lines])
        # A small per-client buffer: a gateway that stopped reading for a moment would be cut by the simulator.
        sim = AmiSimulator(port=0, users={"admin": SECRET}, time_scale=0.01, max_client_buffer=128 * 1024,
                           queues={})
        await sim.start()
        recorder = await Recorder().start(sim.port)
        try:
            settings = gateway_settings(infra, prefix, sim.port, amqp_url=_via(infra.amqp_url, broker.port))
            async with running_gateway(settings) as gateway:
                await asyncio.wait_for(gateway.ready.wait(), 10)
                warmup = sim.play("inbound-direct-answered", line="399")
                await sim.wait_call(warmup, 10)
                await listener.wait_for(lambda e: e.line == "399" and e.type is EventType.RING_FINISHED)
                assert gateway.ami is not None and gateway.ami.sessions_established == 1

                await broker.set_fault(CUT)  # RabbitMQ unreachable from the gateway
                seen_before = len(listener.events)
                calls = [sim.play("inbound-direct-answered", line=line, caller=f"7916{n:07d}")
                         for n in range(3) for line in burst_lines]
                for call in calls:
                    await sim.wait_call(call, 30)
                await asyncio.sleep(0.5)
                # every event was read and is waiting in the outbox; nothing reached the bus
                produced = sum(len(v) for v in recorder.expected(set(burst_lines)).values())
                assert produced == 3 * len(burst_lines) * 3  # ring, answer, end per call
                assert gateway.outbox.depth >= produced
                assert len(listener.events) == seen_before
                assert sim.metrics.clients_dropped._value.get() == 0  # the simulator never had to cut us
                assert gateway.ami.sessions_established == 1 and gateway.ami.ready.is_set()

                await broker.set_fault(PASS)
                await wait_until(lambda: gateway.outbox.depth == 0, 30, "outbox drained")
                await wait_until(lambda: len(listener.events) - seen_before >= produced, 30, "all events delivered")
        finally:
            await recorder.close()
            await sim.stop()
            await listener.close()
            await broker.close()
            await cleanup(infra, prefix)

        expected = recorder.expected(set(burst_lines))
        epochs = {e.epoch for e in listener.events}
        assert len(epochs) == 1  # continuity was never lost: no new epoch
        for line in burst_lines:
            got = listener.of_line(line)
            assert [e.seq for e in got] == list(range(1, len(got) + 1)), line  # no gap, no duplicate
            assert [_view(e) for e in got] == expected[line], line  # Asterisk's order

    asyncio.run(main())


def test_pbx_restart_mid_call_ends_the_call_and_announces_the_new_truth(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        listener = await EventListener(infra.amqp_url, prefix).start(["305", "306"])
        first = AmiSimulator(port=0, users={"admin": SECRET}, queues={"support": ["305", "306"]})
        await first.start()
        ami = FaultProxy("ami", "127.0.0.1", first.port)
        await ami.start()
        second: AmiSimulator | None = None
        try:
            settings = gateway_settings(infra, prefix, ami.port)
            async with running_gateway(settings) as gateway:
                await asyncio.wait_for(gateway.ready.wait(), 10)
                old = first.play("inbound-direct-long", line="305")
                up = await listener.wait_for(lambda e: e.line == "305" and e.type is EventType.COMMUTATION_STARTED)
                assert up.call is not None and up.call.linked_id == old.id

                # The PBX dies with the call up; while the gateway is away a new PBX has other calls and states.
                await ami.set_fault(CUT)
                await first.stop()
                second = AmiSimulator(port=0, users={"admin": SECRET}, queues={"support": ["305", "306"]})
                await second.start()
                for member in second.model.find_members("305"):
                    member.paused, member.paused_reason = True, "Meeting"
                new = second.play("inbound-direct-long", line="306")
                await wait_until(lambda: any(c.bridge for c in second.model.channels.values()), what="new call up")
                ami.retarget("127.0.0.1", second.port)
                await ami.set_fault(PASS)

                ended = await listener.wait_for(
                    lambda e: e.line == "305" and e.type is EventType.RING_FINISHED, what="end of the old call"
                )
                assert ended.call is not None and ended.call.id == up.call.id
                assert ended.call.state is CallState.FINISHED
                announced = await listener.wait_for(
                    lambda e: e.line == "306" and e.type is EventType.COMMUTATION_STARTED, what="the new call"
                )
                assert announced.call is not None and announced.call.linked_id == new.id
                assert announced.call.caller_number == "79161234567"
                paused = await listener.wait_for(
                    lambda e: e.line == "305" and e.type is EventType.AGENT_STATE_CHANGED, what="pause state"
                )
                assert paused.agent is not None and paused.agent.paused and paused.agent.reason == "Meeting"
                assert gateway.ami is not None and gateway.ami.sessions_established == 2
                # the same epoch, no gap: a reader knows it missed nothing
                line305 = listener.of_line("305")
                assert [e.seq for e in line305] == list(range(1, len(line305) + 1))
                assert len({e.epoch for e in listener.events}) == 1
        finally:
            if second is not None:
                await second.stop()
            await first.stop()
            await ami.close()
            await listener.close()
            await cleanup(infra, prefix)

    asyncio.run(main())


def test_a_silent_ami_session_is_dropped_by_the_keepalive_and_reopened(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        sim = AmiSimulator(port=0, users={"admin": SECRET})
        await sim.start()
        ami = FaultProxy("ami", "127.0.0.1", sim.port)
        await ami.start()
        before = AMI_DISCONNECTS.labels(reason="ping_timeout")._value.get()
        try:
            settings = gateway_settings(infra, prefix, ami.port)
            async with running_gateway(settings, ping_interval=0.3, ping_timeout=0.5) as gateway:
                await asyncio.wait_for(gateway.ready.wait(), 10)
                assert gateway.ami is not None
                await ami.set_fault(BLACKHOLE)  # TCP stays up, nothing gets through: only the Ping can tell
                await wait_until(lambda: not gateway.ami.ready.is_set(), 5, "session declared dead")  # type: ignore[union-attr]
                assert AMI_DISCONNECTS.labels(reason="ping_timeout")._value.get() == before + 1
                await ami.set_fault(PASS)
                await wait_until(lambda: gateway.ami.sessions_established == 2, 15, "session reopened")  # type: ignore[union-attr]
                assert ami.stats.accepted >= 2
        finally:
            await sim.stop()
            await ami.close()
            await cleanup(infra, prefix)

    asyncio.run(main())


def test_asterisk_restart_ends_the_calls_that_vanished_and_the_next_call_rings(infra: Infrastructure,
                                                                               prefix: str) -> None:
    """The simulator restarts like Asterisk does: Shutdown, sessions closed, every call gone without a Hangup."""

    async def main() -> None:
        listener = await EventListener(infra.amqp_url, prefix).start(["305", "306"])
        sim = AmiSimulator(port=0, users={"admin": SECRET}, queues={"support": ["305", "306"]})
        await sim.start()
        for member in sim.model.find_members("306"):
            member.paused, member.paused_reason = True, "Lunch"  # the gateway's first resync sees it; a restart forgets
        try:
            async with running_gateway(gateway_settings(infra, prefix, sim.port)) as gateway:
                await asyncio.wait_for(gateway.ready.wait(), 10)
                await listener.wait_for(lambda e: e.line == "306" and e.agent is not None and e.agent.paused)
                old = sim.play("inbound-direct-long", line="305")
                up = await listener.wait_for(lambda e: e.line == "305" and e.type is EventType.COMMUTATION_STARTED)
                assert up.call is not None and up.call.linked_id == old.id

                assert await sim.restart(down_for=1.0) == 1
                assert [c["state"] for c in sim._control_request("GET", "/calls", {})[1]["finished"]] == ["lost"]

                ended = await listener.wait_for(
                    lambda e: e.line == "305" and e.type is EventType.RING_FINISHED, what="the lost call ends")
                assert ended.call is not None and ended.call.id == up.call.id
                assert ended.call.state is CallState.FINISHED
                assert gateway.ami is not None
                await wait_until(lambda: gateway.ami.sessions_established == 2, 15, "AMI back")  # type: ignore[union-attr]
                unpaused = await listener.wait_for(
                    lambda e: e.line == "306" and e.type is EventType.AGENT_STATE_CHANGED and e.agent is not None
                    and not e.agent.paused, what="306 unpaused by the restart")
                assert unpaused.epoch == up.epoch

                new = sim.play("inbound-direct-answered", line="306")
                ring = await listener.wait_for(lambda e: e.line == "306" and e.type is EventType.RING_STARTED,
                                               what="the next call rings")
                assert ring.call is not None and ring.call.linked_id == new.id
                # one epoch, no gap: readers just continue
                for line in ("305", "306"):
                    got = listener.of_line(line)
                    assert [e.seq for e in got] == list(range(1, len(got) + 1)), line
                assert len({e.epoch for e in listener.events}) == 1
        finally:
            await sim.stop()
            await listener.close()
            await cleanup(infra, prefix)

    asyncio.run(main())


def test_a_stop_with_the_broker_silent_ends_within_its_deadline_and_releases_the_lease(
        infra: Infrastructure, prefix: str) -> None:
    """Seen in `make chaos` (cluster-restart): a SIGTERMed gateway logged its last command failures and then hung
    past the 10 s its supervisor gives it, the lease unreleased. A broker that never answers a connection close
    (here: every byte to it swallowed) must not hold up the stop nor the handover."""
    import redis.asyncio as aioredis

    async def main() -> None:
        amqp_port = urlsplit(infra.amqp_url).port or 5672
        broker = FaultProxy("broker", "127.0.0.1", amqp_port)
        await broker.start()
        sim = AmiSimulator(port=0, users={"admin": SECRET}, queues={})
        await sim.start()
        redis = aioredis.from_url(infra.redis_url)
        try:
            settings = gateway_settings(infra, prefix, sim.port, amqp_url=_via(infra.amqp_url, broker.port))
            async with running_gateway(settings) as gateway:
                await asyncio.wait_for(gateway.ready.wait(), 10)
                call = sim.play("inbound-direct-answered", line="399")
                await sim.wait_call(call, 10)
                await wait_until(lambda: gateway.outbox.depth == 0, 10, "outbox drained")
                assert await redis.exists(gateway.lease.key)
                await broker.set_fault(BLACKHOLE)

                async def stubborn() -> None:
                    # what a task does that awaits the silent broker in its cancellation path (a command's requeue)
                    try:
                        await asyncio.sleep(3600)
                    except asyncio.CancelledError:
                        await asyncio.sleep(30)

                gateway._spawn(stubborn(), "stubborn")
                started = asyncio.get_running_loop().time()
                await asyncio.wait_for(gateway.stop(flush_timeout=1.0), 10)  # and 3 s to close
                took = asyncio.get_running_loop().time() - started
                assert took < 1.0 + 3.0 + 1.0, took
                assert not await redis.exists(gateway.lease.key)  # released: a standby takes over at once
        finally:
            await redis.aclose()
            await sim.stop()
            await broker.close()
            await cleanup(infra, prefix)

    asyncio.run(main())
