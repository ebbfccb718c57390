"""The node's Redis pool (ws_node/redis_pool.py) against the real Redis: bounded, waiting, fair, never stuck."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from local_cluster.infra import Infrastructure
from ws_node.redis_pool import BoundedPool, node_redis_client

pytestmark = pytest.mark.integration


def _client(infra: Infrastructure, size: int, wait: float = 5.0) -> aioredis.Redis:
    client = node_redis_client(infra.redis_url, max_connections=size, pool_wait_seconds=wait)
    assert isinstance(client.connection_pool, BoundedPool)
    return client


def test_a_burst_larger_than_the_pool_waits_and_never_opens_more_connections(infra: Infrastructure,
                                                                            prefix: str) -> None:
    async def main() -> None:
        client = _client(infra, 4)
        pool = client.connection_pool
        most = 0

        async def watched() -> None:
            nonlocal most
            while True:
                most = max(most, len(pool._in_use_connections))
                await asyncio.sleep(0)

        watching = asyncio.create_task(watched())
        try:
            # Each command holds its connection for 50 ms: a blocking pop on a list nobody fills.
            burst = [client.blpop([f"{prefix}:nothing"], timeout=0.05) for _ in range(40)]
            pipelines = []
            for n in range(20):
                pipe = client.pipeline(transaction=False)
                pipe.set(f"{prefix}:k{n}", n)
                pipe.get(f"{prefix}:k{n}")
                pipelines.append(pipe.execute())
            outcome = await asyncio.gather(*burst, *pipelines)
            assert outcome[:40] == [None] * 40
            assert outcome[40:] == [[True, str(n).encode()] for n in range(20)]
            assert most == 4
            assert len(pool._available_connections) == 4 and not pool._in_use_connections
        finally:
            watching.cancel()
            await client.delete(*(f"{prefix}:k{n}" for n in range(20)))
            await client.aclose()

    asyncio.run(main())


def test_waiters_are_served_in_order_and_one_that_gives_up_passes_its_turn_on(infra: Infrastructure,
                                                                           prefix: str) -> None:
    async def main() -> None:
        client = _client(infra, 1)
        try:
            holder = asyncio.create_task(client.blpop([f"{prefix}:nothing"], timeout=0.3))
            await asyncio.sleep(0.05)  # the only connection is taken
            order: list[int] = []

            async def ping(n: int) -> None:
                await client.ping()
                order.append(n)

            first = asyncio.create_task(ping(1))
            await asyncio.sleep(0)
            quitter = asyncio.create_task(ping(99))
            await asyncio.sleep(0)
            rest = [asyncio.create_task(ping(n)) for n in range(2, 6)]
            await asyncio.sleep(0.05)
            quitter.cancel()  # gives up while waiting: the ones behind it must still get their turn
            await asyncio.wait_for(asyncio.gather(holder, first, *rest), 5)
            assert order == [1, 2, 3, 4, 5]
            # Woken, then cancelled before it ran: the wake-up is not lost either.
            pool = client.connection_pool
            taken = await pool.get_connection()
            woken = asyncio.create_task(pool.get_connection())
            behind = asyncio.create_task(pool.get_connection())
            await asyncio.sleep(0.05)
            assert len(pool._waiters) == 2
            await pool.release(taken)  # wakes ``woken``, which has not run yet ...
            woken.cancel()  # ... and never will
            connection = await asyncio.wait_for(behind, 2)
            await pool.release(connection)
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_command_that_finds_no_connection_in_time_fails_and_the_pool_goes_on(infra: Infrastructure,
                                                                            prefix: str) -> None:
    async def main() -> None:
        client = _client(infra, 1, wait=0.2)
        try:
            holder = asyncio.create_task(client.blpop([f"{prefix}:nothing"], timeout=1))
            await asyncio.sleep(0.05)
            with pytest.raises(aioredis.ConnectionError, match="No connection available"):
                await client.ping()
            await holder
            assert await client.ping() is True
            assert not client.connection_pool._waiters
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_connection_the_server_closed_is_reconnected_before_reuse(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        client = _client(infra, 2)
        admin = aioredis.from_url(infra.redis_url)
        try:
            name = f"{prefix}-pool"
            await client.client_setname(name)
            assert await client.get(f"{prefix}:x") is None
            for entry in await admin.client_list():
                if entry.get("name") == name:
                    await admin.client_kill_filter(_id=entry["id"])
            await asyncio.sleep(0.05)
            await client.set(f"{prefix}:x", "1")  # on the connection the server closed: retried on a new one
            assert await client.get(f"{prefix}:x") == b"1"
        finally:
            await client.delete(f"{prefix}:x")
            await client.aclose()
            await admin.aclose()

    asyncio.run(main())
