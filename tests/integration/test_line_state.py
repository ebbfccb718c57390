"""LineStateWriter/Reader against the real Redis, in a namespace of their own."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from local_cluster.infra import Infrastructure
from services.delivery_log import AgentKey, DeliveryLog, RedisDeliveryStore
from services.line_state import HistoryUnavailable, LineStateReader, LineStateWriter
from services.wire import Call, CallState, Direction, EventType, LineEvent, StreamPosition

pytestmark = pytest.mark.integration


def _call(state: CallState, call_id: str = "c1", line: str = "305") -> Call:
    return Call(id=call_id, line=line, linked_id="1.1", channel="SIP/305-1", direction=Direction.INBOUND,
                state=state, caller_number="79161234567", started_at=1.0)


def run(infra: Infrastructure, prefix: str, body: Callable[[aioredis.Redis], Awaitable[None]]) -> None:
    async def main() -> None:
        client = aioredis.from_url(infra.redis_url)
        try:
            await body(client)
        finally:
            keys = [k async for k in client.scan_iter(f"{prefix}:*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()

    asyncio.run(main())


def test_epochs_only_grow_even_when_the_clock_goes_back(infra: Infrastructure, prefix: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        writer = LineStateWriter(client, prefix)
        first = await writer.new_epoch(now_ms=5_000)
        second = await writer.new_epoch(now_ms=1_000)
        assert int(second) > int(first)

    run(infra, prefix, body)


def test_snapshot_follows_the_events_and_history_fills_gaps(infra: Infrastructure, prefix: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        writer = LineStateWriter(client, prefix, history_length=100)
        reader = LineStateReader(client, prefix)
        epoch = await writer.new_epoch()
        ring = LineEvent("305", EventType.RING_STARTED, epoch, 1, call=_call(CallState.RINGING))
        talk = LineEvent("305", EventType.COMMUTATION_STARTED, epoch, 2, call=_call(CallState.CONNECTED))
        await writer.write([ring, talk])
        snap = await reader.snapshot("305")
        assert (snap.epoch, snap.seq) == (epoch, 2)
        assert [c.state for c in snap.calls] == [CallState.CONNECTED]

        end = LineEvent("305", EventType.RING_FINISHED, epoch, 3, call=_call(CallState.FINISHED))
        await writer.write([end])
        snap = await reader.snapshot("305")
        assert snap.calls == () and snap.seq == 3

        missed = await reader.events_after("305", StreamPosition(epoch, 1))
        assert [(e.seq, e.type) for e in missed] == [(2, EventType.COMMUTATION_STARTED), (3, EventType.RING_FINISHED)]
        assert await reader.events_after("305", StreamPosition(epoch, 3)) == []
        with pytest.raises(HistoryUnavailable):
            await reader.events_after("305", StreamPosition(str(int(epoch) - 1), 7))

    run(infra, prefix, body)


def test_trimmed_history_is_reported_not_hidden(infra: Infrastructure, prefix: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        writer = LineStateWriter(client, prefix, history_length=10)
        reader = LineStateReader(client, prefix)
        epoch = await writer.new_epoch()
        for seq in range(1, 400):
            call = _call(CallState.RINGING, call_id=f"c{seq}")
            await writer.write([LineEvent("306", EventType.RING_STARTED, epoch, seq, call=call)])
        with pytest.raises(HistoryUnavailable):
            await reader.events_after("306", StreamPosition(epoch, 1))
        recent = await reader.events_after("306", StreamPosition(epoch, 395))
        assert [e.seq for e in recent] == [396, 397, 398, 399]

    run(infra, prefix, body)


# ---- the nodes' delivery log ------------------------------------------------------------------


def test_delivery_positions_written_in_batches_are_read_by_another_node(infra: Infrastructure, prefix: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        node_a = DeliveryLog(RedisDeliveryStore(client, prefix), ttl_seconds=60, flush_interval=0.05)
        node_b = DeliveryLog(RedisDeliveryStore(client, prefix), ttl_seconds=60, flush_interval=0.05)
        tab = AgentKey("305", "user-1", "tab-1")
        flushes = REGISTRY.get_sample_value("cms_node_delivery_log_flushes_total") or 0.0
        node_a.attach(tab, StreamPosition("17", 3))
        for seq in range(4, 200):
            node_a.note(tab, StreamPosition("17", seq))
        node_a.note(tab, StreamPosition("17", 50))  # never backwards
        await asyncio.sleep(0.3)
        assert await node_b.last(tab) == StreamPosition("17", 199)
        # 197 positions, written in a handful of pipelines rather than one command each
        assert (REGISTRY.get_sample_value("cms_node_delivery_log_flushes_total") or 0.0) - flushes <= 3
        # a reloaded page (a new tab uid) falls back to the user's record on that line
        assert await node_b.last(AgentKey("305", "user-1", "tab-new")) == StreamPosition("17", 199)
        assert await node_b.last(AgentKey("305", "user-2", "tab-1")) is None
        ttl = await client.ttl(f"{prefix}:delivered:305:user-1:tab-1")
        assert 50 < ttl <= 60
        # a new epoch replaces an old one whatever its numbers
        node_a.note(tab, StreamPosition("18", 1))
        node_a.detach(tab)
        await node_a.close()
        assert await node_b.last(tab) == StreamPosition("18", 1)
        await node_b.close()

    run(infra, prefix, body)


def test_an_unknown_users_record_is_kept_per_line_in_the_documented_form(infra: Infrastructure, prefix: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        log = DeliveryLog(RedisDeliveryStore(client, prefix), flush_interval=0.05)
        log.attach(AgentKey("306"), StreamPosition("", 0))
        await log.close()
        assert await client.get(f"{prefix}:delivered:306:-") == b"- 0"

    run(infra, prefix, body)


# The delivery log's other cases (holders, reading an unknown user's record back) run against Redis
# in test_store_contracts_real.py (TestRedisDelivery), and against the memory store in the unit tests.
