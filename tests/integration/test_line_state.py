"""LineStateWriter/Reader against the real Redis, in a namespace of their own."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from local_cluster.infra import Infrastructure
from services.line_state import HistoryUnavailable, LineStateReader, LineStateWriter
from services.wire import Call, CallState, Direction, EventType, LineEvent

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

        missed = await reader.events_after("305", epoch, 1)
        assert [(e.seq, e.type) for e in missed] == [(2, EventType.COMMUTATION_STARTED), (3, EventType.RING_FINISHED)]
        assert await reader.events_after("305", epoch, 3) == []
        with pytest.raises(HistoryUnavailable):
            await reader.events_after("305", str(int(epoch) - 1), 7)

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
            await reader.events_after("306", epoch, 1)
        recent = await reader.events_after("306", epoch, 395)
        assert [e.seq for e in recent] == [396, 397, 398, 399]

    run(infra, prefix, body)
