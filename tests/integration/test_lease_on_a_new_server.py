"""The gateway lease across a Redis failover: the renew says MOVED when another server answers (a promoted replica
may lack the last writes: the gateway restates), and a renew racing the restate's new epoch does not lose it."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from ami_gateway.lease import GatewayLease, RenewOutcome
from local_cluster.infra import Infrastructure

pytestmark = pytest.mark.integration


def test_a_renew_racing_a_new_epoch_keeps_the_lease(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        client = aioredis.from_url(infra.redis_url)
        try:
            lease = GatewayLease(client, prefix, owner="a", ttl=5.0)
            assert await lease.try_acquire() is not None
            for _ in range(20):
                # The restate claims a new epoch while the lease loop renews with the term it read first.
                term, outcome = await asyncio.gather(lease.advance_epoch(), lease.renew())
                assert outcome is RenewOutcome.RENEWED and lease.term == term and lease.held()
        finally:
            await client.delete(f"{prefix}:gateway:lease", f"{prefix}:epoch")
            await client.aclose()

    asyncio.run(main())


def test_the_renew_says_moved_when_another_server_answers(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        client = aioredis.from_url(infra.redis_url)
        try:
            lease = GatewayLease(client, prefix, owner="a", ttl=5.0)
            assert await lease.try_acquire() is not None
            assert lease.server.run_id  # the server the term began on
            assert await lease.renew() is RenewOutcome.RENEWED
            lease.server.run_id = "0" * 40  # as if the term had begun on a server that is gone now
            assert await lease.renew() is RenewOutcome.MOVED
            assert await lease.renew() is RenewOutcome.RENEWED  # once: it is the server from now on
        finally:
            await client.delete(f"{prefix}:gateway:lease", f"{prefix}:epoch")
            await client.aclose()

    asyncio.run(main())
