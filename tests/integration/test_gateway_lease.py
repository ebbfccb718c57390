"""The lease scripts on the real Redis: take, renew, resume, lose, fence writes and commands, new epochs."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from ami_gateway.lease import GatewayLease, LeaseLost, RenewOutcome
from local_cluster.infra import Infrastructure
from services.line_state import Fenced, LineStateReader, LineStateWriter
from services.wire import Call, CallState, Direction, EventType, LineEvent
from tests.integration.test_gateway_proxy import cleanup

pytestmark = pytest.mark.integration


def _event(line: str, epoch: str, seq: int) -> LineEvent:
    call = Call(id=f"c{seq}", line=line, linked_id=f"l{seq}", channel=f"SIP/{line}-{seq}",
                direction=Direction.INBOUND, state=CallState.RINGING,
                caller_number="100", called_number=line, started_at=1.0)
    return LineEvent(line=line, type=EventType.RING_STARTED, call=call).positioned(epoch, seq)


def test_one_holder_at_a_time_and_the_epoch_is_the_fencing_token(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        client = aioredis.from_url(infra.redis_url)
        a = GatewayLease(client, prefix, owner="a", ttl=0.5)
        b = GatewayLease(client, prefix, owner="b", ttl=0.5)
        writer_a = LineStateWriter(client, prefix)
        writer_b = LineStateWriter(client, prefix)
        try:
            taken = await a.try_acquire()
            assert taken is not None
            term_a, earlier = taken
            assert not earlier and a.held()
            assert await b.try_acquire() is None
            assert await a.renew() is RenewOutcome.RENEWED
            writer_a.fence(a.key, term_a.token)
            await writer_a.write([_event("305", term_a.epoch, 1)])
            assert await a.claim_command("cmd-1")
            assert not await a.claim_command("cmd-1")  # a redelivery is never carried out again

            # a is paused past its ttl: the key expires, b takes over with a greater epoch
            await asyncio.sleep(0.7)
            assert not a.held()
            taken_b = await b.try_acquire()
            assert taken_b is not None
            term_b, earlier = taken_b
            assert earlier and int(term_b.epoch) > int(term_a.epoch)
            writer_b.fence(b.key, term_b.token)

            # a wakes up: its write is refused whole, its commands too, its renew says it lost
            with pytest.raises(Fenced):
                await writer_a.write([_event("305", term_a.epoch, 2), _event("306", term_a.epoch, 1)])
            with pytest.raises(LeaseLost):
                await a.claim_command("cmd-2")
            assert await a.renew() is RenewOutcome.LOST
            assert a.term is None and not a.held()
            snapshot = await LineStateReader(client, prefix).snapshot("305")
            assert (snapshot.epoch, snapshot.seq) == (term_a.epoch, 1)
            assert await client.exists(f"{prefix}:line:306:pos") == 0

            await writer_b.write([_event("305", term_b.epoch, 1)])
            assert await b.claim_command("cmd-2")
            assert not await b.claim_command("cmd-1")  # claimed in a's term, still not repeated

            # a new epoch inside b's term changes the token: writes under the old one are refused
            term_b2 = await b.advance_epoch()
            assert int(term_b2.epoch) > int(term_b.epoch)
            with pytest.raises(Fenced):
                await writer_b.write([_event("305", term_b.epoch, 2)])
            writer_b.fence(b.key, term_b2.token)
            await writer_b.write([_event("305", term_b2.epoch, 1)])

            # a clean stop releases at once; only the holder's release counts
            await a.release()
            assert await client.exists(b.key) == 1
            await b.release()
            assert await client.exists(b.key) == 0
        finally:
            await client.aclose()
            await cleanup(infra, prefix)

    asyncio.run(main())


def test_a_holder_cut_off_from_redis_resumes_its_term_when_nobody_took_over(infra: Infrastructure,
                                                                            prefix: str) -> None:
    async def main() -> None:
        client = aioredis.from_url(infra.redis_url)
        a = GatewayLease(client, prefix, owner="a", ttl=0.3)
        try:
            taken = await a.try_acquire()
            assert taken is not None
            await asyncio.sleep(0.5)  # expired while a could not renew
            assert not a.held()
            assert await a.renew() is RenewOutcome.RESUMED
            assert a.held() and a.term == taken[0]
        finally:
            await client.aclose()
            await cleanup(infra, prefix)

    asyncio.run(main())


def test_redis_emptied_under_the_holder_ends_its_term(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        client = aioredis.from_url(infra.redis_url)
        a = GatewayLease(client, prefix, owner="a", ttl=5)
        try:
            taken = await a.try_acquire()
            assert taken is not None
            await cleanup(infra, prefix)  # what a Redis restarted without persistence looks like to us
            assert await a.renew() is RenewOutcome.LOST  # the epoch key is gone: the term cannot go on
            again = await a.try_acquire()
            assert again is not None and not again[1]
        finally:
            await client.aclose()
            await cleanup(infra, prefix)

    asyncio.run(main())
