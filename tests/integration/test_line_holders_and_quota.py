"""The Redis halves of issue 12's rules, against the real Redis: who holds a line (first come, across
nodes, expiring when a node dies) and the command budgets every node shares."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from local_cluster.infra import Infrastructure
from services.wire import CommandName
from ws_node.admission import CommandLimit
from ws_node.command_quota import CommandQuota
from ws_node.line_holders import LineHolders

ALICE, BOB = "A11CE-1", "b0b-2"


async def _cleanup(redis: aioredis.Redis, prefix: str) -> None:
    keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
    if keys:
        await redis.delete(*keys)
    await redis.aclose()


def test_first_come_holds_a_line_across_nodes_until_every_tab_is_gone(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        redis = aioredis.from_url(infra.redis_url)
        node_a, node_b = LineHolders(redis, prefix), LineHolders(redis, prefix)
        try:
            tab1, other = await node_a.claim("307", ALICE, exclusive=True)
            assert tab1 and other is None
            tab2, other = await node_b.claim("307", ALICE.lower(), exclusive=True)  # her other tab, other node
            assert tab2 and other is None
            assert await node_b.claim("307", BOB, exclusive=True) == ("", ALICE)
            assert (await node_b.claim("307", BOB, exclusive=False))[1] is None  # a shared line lets him in
            await node_b.close()
            await node_a.release(tab1)
            claim, other = await node_a.claim("307", BOB, exclusive=True)
            assert claim and other is None
        finally:
            await node_a.close()
            await _cleanup(redis, prefix)

    asyncio.run(main())


def test_a_dead_nodes_holders_expire(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        redis = aioredis.from_url(infra.redis_url)
        now = [1000.0]
        dead = LineHolders(redis, prefix, ttl_seconds=30, clock=lambda: now[0])
        alive = LineHolders(redis, prefix, ttl_seconds=30, clock=lambda: now[0])
        try:
            await dead.claim("308", ALICE, exclusive=True)
            dead._mine.clear()  # the node is gone: nobody refreshes or releases its member
            assert (await alive.claim("308", BOB, exclusive=True))[1] == ALICE
            now[0] += 31
            assert (await alive.claim("308", BOB, exclusive=True))[1] is None
        finally:
            await alive.close()
            await _cleanup(redis, prefix)

    asyncio.run(main())


def test_nodes_share_a_lines_command_budget(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        redis = aioredis.from_url(infra.redis_url)
        limits = {"originate": CommandLimit(3, 60)}
        nodes = [CommandQuota(redis, prefix, limits) for _ in range(3)]
        try:
            answers = [await node.check("305", ALICE, CommandName.MAKE_CALL) for node in nodes for _ in range(2)]
            assert answers[:3] == [None, None, None]
            assert all(a is not None and a.startswith("too many originate commands from line 305") for a in answers[3:])
            assert await nodes[0].check("306", BOB, CommandName.MAKE_CALL) is None  # other line, other user
            await asyncio.sleep(1.1)  # one a second comes back
            assert await nodes[2].check("305", ALICE, CommandName.MAKE_CALL) is None
            assert await nodes[2].check("305", ALICE, CommandName.HANGUP) is None  # no limit given for "call"
        finally:
            await _cleanup(redis, prefix)

    asyncio.run(main())


def test_without_redis_the_cluster_budget_steps_aside(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        redis = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
        quota = CommandQuota(redis, prefix, {"originate": CommandLimit(1, 1)})
        holders = LineHolders(redis, prefix)
        try:
            assert await quota.check("305", ALICE, CommandName.MAKE_CALL) is None
            try:
                await holders.claim("305", ALICE, exclusive=True)
            except (OSError, aioredis.RedisError):
                pass
            else:
                raise AssertionError("a claim without Redis must raise, for the caller to decide")
        finally:
            await redis.aclose()

    asyncio.run(main())
