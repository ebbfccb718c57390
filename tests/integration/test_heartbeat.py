"""The process registry on the real Redis: beats, a clean stop, a killed process, leftovers of an
earlier run, a namespace emptied under a running process, and Redis unreachable."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from local_cluster.infra import Infrastructure, free_port
from services.heartbeat import FORGET_AFTER_SECONDS, HEARTBEATS, Heartbeat, read_registry, registry_key

pytestmark = pytest.mark.integration


async def _wait(probe: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await probe():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_beat_clean_stop_and_kill(infra: Infrastructure, prefix: str) -> None:
    async def go() -> None:
        redis = aioredis.from_url(infra.redis_url)
        try:
            # leftovers of an earlier run: a member long forgotten, with no record
            await redis.zadd(registry_key(prefix), {"node:ancient": time.time() - FORGET_AFTER_SECONDS - 5})
            state = {"n": 0}

            def describe() -> dict[str, object]:
                state["n"] += 1
                return {"metrics_url": "http://127.0.0.1:1/metrics", "beats": state["n"]}

            clean = Heartbeat(redis, prefix, "node", "clean", describe, interval=0.2)
            killed = Heartbeat(redis, prefix, "gateway", "killed", describe, interval=0.2)
            clean.start()
            killed.start()

            async def both_present() -> bool:
                found = {p.member: p for p in await read_registry(redis, prefix)}
                return {"node:clean", "gateway:killed"} <= set(found) and all(
                    found[m].record is not None for m in ("node:clean", "gateway:killed"))

            await _wait(both_present)
            members = {p.member for p in await read_registry(redis, prefix)}
            assert "node:ancient" not in members  # pruned by the first beat
            assert await redis.zscore(registry_key(prefix), "node:ancient") is None

            # the namespace is emptied (Redis restarted empty): the next beats register again
            await redis.delete(registry_key(prefix))
            await _wait(both_present)

            await clean.stop()
            # "kill": the task ends without the goodbye; the record expires, the member stays (lost)
            assert killed._task is not None
            killed._task.cancel()
            await asyncio.gather(killed._task, return_exceptions=True)

            async def killed_is_lost() -> bool:
                found = {p.member: p for p in await read_registry(redis, prefix)}
                gone = "node:clean" not in found
                return gone and "gateway:killed" in found and found["gateway:killed"].record is None

            await _wait(killed_is_lost)
        finally:
            keys = [k async for k in redis.scan_iter(f"{prefix}:*")]
            if keys:
                await redis.delete(*keys)
            await redis.aclose()

    run(go())


def test_redis_unreachable_is_counted_and_retried(prefix: str) -> None:
    async def go() -> None:
        redis = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
        before = HEARTBEATS.labels(outcome="error")._value.get()
        beat = Heartbeat(redis, prefix, "node", "x", dict, interval=0.1)
        beat.start()
        deadline = time.monotonic() + 10
        while HEARTBEATS.labels(outcome="error")._value.get() < before + 2:
            assert time.monotonic() < deadline, "no retry counted"
            await asyncio.sleep(0.05)
        await beat.stop()  # does not raise: the record would expire by itself
        await redis.aclose()

    run(go())
