"""The gateway against Redis trouble: a private redis-server restarted empty under a live call (the gateway notices,
starts a new epoch and restates every line from AMI), and Redis unreachable through a proxy the test cuts, with a
standby waiting (AMI reading never stalls, the active resumes its own term, events come out in order, once)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from ami_gateway.app import Gateway, run_gateway
from ami_simulator.server import AmiSimulator
from local_cluster.infra import Infrastructure, free_port, port_open
from ops.chaos.fault_proxy import CUT, PASS, FaultProxy
from services.config import Settings
from services.line_state import LineSnapshot, LineStateReader
from services.wire import CallState, EventType
from tests.integration.test_gateway_proxy import (
    SECRET,
    EventListener,
    cleanup,
    gateway_settings,
    running_gateway,
    wait_until,
)
from tests.integration.test_gateway_resilience import Recorder, _view
from tests.integration.test_gateway_standby import assert_positions_sound

pytestmark = pytest.mark.integration


class PrivateRedis:
    """A redis-server of our own, without persistence, so a restart comes back empty like the machine's would."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        server = shutil.which("redis-server")
        if server is None:
            pytest.skip("redis-server is not installed")
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "redis.log", "ab") as out:
            self.process = subprocess.Popen(
                [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.directory)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 15
        while not port_open(self.port):
            assert time.monotonic() < deadline, "private redis-server did not start"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None


def _with_redis(settings: Settings, url: str) -> Settings:
    return replace(settings, cluster=replace(settings.cluster, redis_url=url))


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    redis = PrivateRedis(tmp_path / "redis").start()
    try:
        yield redis
    finally:
        redis.stop()


def test_redis_restarted_empty_under_a_live_call_is_restated_in_a_new_epoch(
        infra: Infrastructure, prefix: str, private_redis: PrivateRedis) -> None:
    async def main() -> None:
        sim = AmiSimulator(port=0, users={"admin": SECRET}, queues={"support": ["305", "306"]})
        await sim.start()
        listener = await EventListener(infra.amqp_url, prefix).start(["305", "306"])
        settings = _with_redis(gateway_settings(infra, prefix, sim.port), private_redis.url)
        current: list[Gateway] = []
        stop = asyncio.Event()
        runner = asyncio.create_task(run_gateway(settings, stop, metrics_host="127.0.0.1", metrics_port=0,
                                                 on_ready=current.append))
        client = aioredis.from_url(private_redis.url)
        reader = LineStateReader(client, prefix)

        async def snapshot(line: str) -> LineSnapshot:
            for _ in range(5):  # our own pooled connection dies with the server once
                with contextlib.suppress(aioredis.ConnectionError):
                    return await reader.snapshot(line)
                await asyncio.sleep(0.1)
            return await reader.snapshot(line)

        try:
            await wait_until(lambda: bool(current) and current[-1].ready.is_set(), 15, "gateway ready")
            live = sim.play("inbound-direct-long", line="305")
            up = await listener.wait_for(lambda e: e.line == "305" and e.type is EventType.COMMUTATION_STARTED)
            assert up.call is not None
            assert [c.id for c in (await snapshot("305")).calls] == [up.call.id]

            private_redis.stop()
            private_redis.start()  # same port, nothing kept
            restarted = time.monotonic()
            assert (await snapshot("305")).calls == ()

            restated = await listener.wait_for(
                lambda e: e.line == "305" and e.epoch != up.epoch and e.call is not None, 20, "305 restated")
            assert restated.call is not None and restated.call.id == up.call.id
            assert restated.call.state is CallState.CONNECTED and restated.call.linked_id == live.id

            async def snapshot_right() -> bool:
                snap = await snapshot("305")
                return snap.epoch == restated.epoch and [c.id for c in snap.calls] == [up.call.id]

            deadline = time.monotonic() + 20
            while not await snapshot_right():
                assert time.monotonic() < deadline, "snapshot not right again"
                await asyncio.sleep(0.05)
            print(f"Redis restarted empty: snapshot right again {time.monotonic() - restarted:.2f}s later")
            assert len(current) == 2 and current[-1].ready.is_set()  # a fresh term replaced the one Redis forgot

            nxt = sim.play("inbound-direct-answered", line="306")
            ring = await listener.wait_for(lambda e: e.line == "306" and e.type is EventType.RING_STARTED, 15)
            assert ring.call is not None and ring.call.linked_id == nxt.id and ring.epoch == restated.epoch
            assert_positions_sound(listener.events)
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(runner, 15)
            await client.aclose()
            await sim.stop()
            await listener.close()
            await cleanup(infra, prefix)

    asyncio.run(main())


def test_redis_unreachable_the_active_keeps_reading_and_resumes_its_term_in_order(
        infra: Infrastructure, prefix: str) -> None:
    lines = [str(n) for n in range(401, 411)]

    async def main() -> None:
        redis_port = urlsplit(infra.redis_url).port or 6379
        proxy = FaultProxy("proxy", "127.0.0.1", redis_port)
        await proxy.start()
        listener = await EventListener(infra.amqp_url, prefix).start(["399", *lines])
        sim = AmiSimulator(port=0, users={"admin": SECRET}, time_scale=0.01, max_client_buffer=128 * 1024, queues={})
        await sim.start()
        recorder = await Recorder().start(sim.port)
        settings = _with_redis(gateway_settings(infra, prefix, sim.port), f"redis://127.0.0.1:{proxy.port}/0")
        try:
            async with running_gateway(settings) as active:
                await asyncio.wait_for(active.ready.wait(), 15)
                async with running_gateway(settings) as standby:
                    await asyncio.sleep(0.5)
                    assert not standby.active
                    warmup = sim.play("inbound-direct-answered", line="399")
                    await sim.wait_call(warmup, 10)
                    first = await listener.wait_for(lambda e: e.line == "399" and e.type is EventType.RING_FINISHED)
                    epoch = first.epoch

                    await proxy.set_fault(CUT)  # Redis unreachable for both gateways
                    cut_at = time.monotonic()
                    # Redis is written beside the publish (issue 15): what goes out before the first failed write
                    # is noticed (at most the outbox's window) reaches readers, its writes land once Redis is
                    # back. A call on another line shows the outbox the outage; after that nothing is published
                    # without Redis, so none of the calls below may reach the listener before Redis is back.
                    probe = sim.play("inbound-direct-answered", line="399", caller="79160000999")
                    await sim.wait_call(probe, 10)
                    await wait_until(lambda: active.outbox.redis_in_trouble, 10, "the outbox to notice the outage")
                    await asyncio.sleep(0.5)  # what the probe got out is on its way to the listener
                    seen_before = len(listener.events)
                    calls = [sim.play("inbound-direct-answered", line=line, caller=f"7916{n:07d}")
                             for n in range(2) for line in lines]
                    for call in calls:
                        await sim.wait_call(call, 30)
                    produced = 2 * len(lines) * 3  # ring, answer, end per call
                    await wait_until(lambda: sum(len(v) for v in recorder.expected(set(lines)).values()) == produced,
                                     10, "the recorder saw every call")
                    await wait_until(lambda: active.outbox.depth >= produced, 10, "every event read into the outbox")
                    await asyncio.sleep(1.0)  # anything on its way to the listener has arrived
                    published_in_outage = len(listener.events)
                    assert published_in_outage == seen_before, "published while the outbox knew Redis was away"
                    assert sim.metrics.clients_dropped._value.get() == 0  # AMI reading never stalled
                    assert active.ami is not None and active.ami.sessions_established == 1
                    await asyncio.sleep(max(0.0, 10.0 - (time.monotonic() - cut_at)))  # several lease ttls
                    assert not active.lease.held()
                    assert len(listener.events) == published_in_outage  # nothing more published without Redis

                    await proxy.set_fault(PASS)
                    restored_at = time.monotonic()
                    await wait_until(lambda: sum(len(listener.of_line(line)) for line in lines) >= produced, 30,
                                     "all delivered")
                    print(f"Redis back: all {produced} waiting events delivered "
                          f"{time.monotonic() - restored_at:.2f}s later")
                    await asyncio.sleep(3.0)  # the standby's grace has passed: it must not have taken over
                    assert active.active and active.lease.held() and not standby.active
                    assert active.sequencer.epoch == epoch
        finally:
            await recorder.close()
            await sim.stop()
            await listener.close()
            await proxy.close()
            await cleanup(infra, prefix)

        expected = recorder.expected(set(lines))
        assert {e.epoch for e in listener.events} == {epoch}  # the term went on: no resync for any reader
        assert_positions_sound(listener.events)
        for line in lines:
            assert [_view(e) for e in listener.of_line(line)] == expected[line], line

    asyncio.run(main())


def test_namespace_emptied_under_two_gateways_one_takes_a_new_term_and_restates(
        infra: Infrastructure, prefix: str) -> None:
    """The shared Redis cannot be restarted here; deleting exactly this run's keys is what an empty Redis looks
    like to the gateways (lease, epoch, calls, history, positions all gone), with a standby racing for it."""

    async def main() -> None:
        sim = AmiSimulator(port=0, users={"admin": SECRET}, queues={"support": ["305", "306"]})
        await sim.start()
        listener = await EventListener(infra.amqp_url, prefix).start(["305", "306"])
        settings = gateway_settings(infra, prefix, sim.port)
        first: list[Gateway] = []
        second: list[Gateway] = []
        stop = asyncio.Event()
        runners = [asyncio.create_task(run_gateway(settings, stop, metrics_host="127.0.0.1", metrics_port=0,
                                                   on_ready=first.append))]
        client = aioredis.from_url(infra.redis_url)
        reader = LineStateReader(client, prefix)
        try:
            await wait_until(lambda: bool(first) and first[-1].ready.is_set(), 15, "first gateway active")
            runners.append(asyncio.create_task(run_gateway(settings, stop, metrics_host="127.0.0.1",
                                                           metrics_port=0, on_ready=second.append)))
            await wait_until(lambda: bool(second) and second[-1].ami is not None
                             and second[-1].ami.ready.is_set(), 15, "standby logged in")
            assert not second[-1].active
            live = sim.play("inbound-direct-long", line="305")
            up = await listener.wait_for(lambda e: e.line == "305" and e.type is EventType.COMMUTATION_STARTED)
            assert up.call is not None

            keys = [k async for k in client.scan_iter(f"{prefix}:*")]
            await client.delete(*keys)

            restated = await listener.wait_for(
                lambda e: e.line == "305" and e.epoch != up.epoch and e.call is not None, 20, "305 restated")
            assert restated.call is not None and restated.call.id == up.call.id
            assert restated.call.linked_id == live.id and restated.call.state is CallState.CONNECTED
            await wait_until(lambda: sum(g[-1].active for g in (first, second)) == 1, 10, "one active gateway")
            # The first term's process starts a fresh gateway on a new AMI login, deaf to what rang meanwhile; it
            # waits a lease ttl, so the warm standby, which heard everything, is the one that takes over.
            await wait_until(lambda: second[-1].active and len(first) == 2, 10, "the warm standby active")
            assert len(second) == 1 and not first[-1].active
            snap = await reader.snapshot("305")
            deadline = time.monotonic() + 10
            while snap.epoch != restated.epoch:
                assert time.monotonic() < deadline, "snapshot not right again"
                await asyncio.sleep(0.05)
                snap = await reader.snapshot("305")
            assert [c.id for c in snap.calls] == [up.call.id]

            nxt = sim.play("inbound-direct-answered", line="306")
            ring = await listener.wait_for(lambda e: e.line == "306" and e.type is EventType.RING_STARTED, 15)
            assert ring.call is not None and ring.call.linked_id == nxt.id and ring.epoch == restated.epoch
            assert len({e.epoch for e in listener.events}) == 2  # exactly one new term, no tug of war
            assert_positions_sound(listener.events)
        finally:
            stop.set()
            for runner in runners:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(runner, 15)
            await client.aclose()
            await sim.stop()
            await listener.close()
            await cleanup(infra, prefix)

    asyncio.run(main())


def test_outbox_overflow_while_redis_is_away_restarts_under_a_new_epoch_with_the_truth(
        infra: Infrastructure, prefix: str) -> None:
    """Redis away long enough for the bounded outbox to overflow: the oldest events are dropped, and once Redis
    is back (and the lease confirmed) every line restarts under a new epoch with its current truth."""
    lines = [str(n) for n in range(401, 411)]

    async def main() -> None:
        redis_port = urlsplit(infra.redis_url).port or 6379
        proxy = FaultProxy("proxy", "127.0.0.1", redis_port)
        await proxy.start()
        listener = await EventListener(infra.amqp_url, prefix).start(["305", *lines])
        sim = AmiSimulator(port=0, users={"admin": SECRET}, time_scale=0.01, queues={})
        await sim.start()
        settings = _with_redis(gateway_settings(infra, prefix, sim.port), f"redis://127.0.0.1:{proxy.port}/0")
        client = aioredis.from_url(infra.redis_url)
        try:
            async with running_gateway(settings, outbox_capacity=40) as gateway:
                await asyncio.wait_for(gateway.ready.wait(), 15)
                sim.time_scale = 1.0
                live = sim.play("inbound-direct-long", line="305")
                up = await listener.wait_for(lambda e: e.line == "305" and e.type is EventType.COMMUTATION_STARTED)
                assert up.call is not None
                sim.time_scale = 0.01

                await proxy.set_fault(CUT)
                calls = [sim.play("inbound-direct-answered", line=line, caller=f"7916{n:07d}")
                         for n in range(2) for line in lines]  # 60 events: more than the outbox holds
                for call in calls:
                    await sim.wait_call(call, 30)
                await asyncio.sleep(3.0)  # past the lease ttl
                await proxy.set_fault(PASS)

                restated = await listener.wait_for(
                    lambda e: e.line == "305" and e.epoch != up.epoch, 20, "305 restated under a new epoch")
                assert restated.call is not None and restated.call.id == up.call.id
                assert restated.call.linked_id == live.id and restated.call.state is CallState.CONNECTED
                assert gateway.active and not gateway.stepped_down.is_set()  # same term, new epoch inside it
                snap = await LineStateReader(client, prefix).snapshot("305")
                assert snap.epoch == restated.epoch and [c.id for c in snap.calls] == [up.call.id]
                nxt = sim.play("inbound-direct-answered", line="401")
                await listener.wait_for(lambda e: e.line == "401" and e.epoch == restated.epoch
                                        and e.type is EventType.RING_FINISHED and e.call is not None
                                        and e.call.linked_id == nxt.id, 15, "the next call, in the new epoch")
                assert_positions_sound(listener.events)
        finally:
            await client.aclose()
            await sim.stop()
            await listener.close()
            await proxy.close()
            await cleanup(infra, prefix)

    asyncio.run(main())


def test_a_replacement_after_a_step_down_leaves_a_free_lease_to_the_warm_standby(
        infra: Infrastructure, prefix: str) -> None:
    """Redis lost the lease (restarted empty): the active term's write is refused, it steps down, and its process
    starts a fresh gateway on a new AMI login, deaf to what rang in between. Were it to take the free lease at once,
    a phone that refused busy in that gap would reach no agent (seen in `make chaos`, redis-restart-empty); the
    warm standby heard it. The replacement waits one ttl, as any standby that saw Redis fail does."""

    async def main() -> None:
        sim = AmiSimulator(port=0, users={"admin": SECRET}, queues={})
        await sim.start()
        settings = gateway_settings(infra, prefix, sim.port)
        client = aioredis.from_url(infra.redis_url)
        try:
            async with running_gateway(settings) as active:
                await asyncio.wait_for(active.ready.wait(), 15)
                async with running_gateway(settings, lease_poll_interval=0.5) as standby:
                    await wait_until(lambda: standby.ami is not None and standby.ami.ready.is_set(), 15, "standby")
                    assert not standby.active
                    await client.delete(active.lease.key, active.lease.epoch_key)  # Redis lost the lease
                    async with running_gateway(settings, unstored_since=time.time()) as replacement:
                        await wait_until(lambda: standby.active, 5, "the warm standby taking the free lease")
                        assert not replacement.active
        finally:
            await client.aclose()
            await sim.stop()
            await cleanup(infra, prefix)

    asyncio.run(main())
