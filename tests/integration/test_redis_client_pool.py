"""The node's Redis pool under a burst: commands wait for a connection instead of failing."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from local_cluster.infra import Infrastructure
from services.redis_client import redis_client

pytestmark = pytest.mark.integration


def test_a_burst_larger_than_the_pool_waits_for_connections(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        bounded = redis_client(infra.redis_url, max_connections=4, pool_wait_seconds=5.0)
        plain = aioredis.from_url(infra.redis_url, max_connections=4)
        try:
            # Each command holds its connection for 50 ms: a blocking pop on a list nobody fills.
            empty = f"{prefix}:nothing"
            burst = [bounded.blpop([empty], timeout=0.05) for _ in range(40)]
            assert await asyncio.gather(*burst) == [None] * 40
            assert bounded.connection_pool.max_connections == 4
            # What the default pool does at its limit: the commands past it fail.
            outcome = await asyncio.gather(*(plain.blpop([f"{prefix}:nothing"], timeout=0.05) for _ in range(12)),
                                           return_exceptions=True)
            assert any(isinstance(o, aioredis.ConnectionError) and "Too many connections" in str(o)
                       for o in outcome)
        finally:
            await bounded.aclose()
            await plain.aclose()

    asyncio.run(main())
