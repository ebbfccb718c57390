"""services/tasks.py: a task nobody holds is not collected before it ends."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref

import pytest

from services.tasks import background, running


async def _parked(parked: list[weakref.ref[asyncio.Future[str]]], results: list[str]) -> None:
    # Awaits a future only this task holds: the task and its future form a cycle nobody else points to.
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    parked.append(weakref.ref(future))
    results.append(await future)


def test_a_background_task_outlives_a_garbage_collection() -> None:
    async def main() -> list[str]:
        parked: list[weakref.ref[asyncio.Future[str]]] = []
        results: list[str] = []
        background(_parked(parked, results))
        await asyncio.sleep(0)
        gc.collect()
        future = parked[0]()
        assert future is not None, "the task was collected while it waited"
        assert running() == 1
        future.set_result("woken")
        await asyncio.sleep(0.01)
        assert running() == 0
        return results

    assert asyncio.run(main()) == ["woken"]


def test_the_cycle_is_collectable_without_it(caplog: pytest.LogCaptureFixture) -> None:
    # What background() guards against, shown on a bare task (so the test above can fail).
    async def main() -> bool:
        parked: list[weakref.ref[asyncio.Future[str]]] = []
        task = asyncio.ensure_future(_parked(parked, []))
        await asyncio.sleep(0)
        del task
        gc.collect()
        return parked[0]() is None

    with caplog.at_level(logging.CRITICAL, logger="asyncio"):  # asyncio reports the pending task it lost
        assert asyncio.run(main())


def test_a_failure_is_logged_once_unless_the_caller_reports_it(caplog: pytest.LogCaptureFixture) -> None:
    async def fail() -> None:
        raise RuntimeError("boom")

    async def main() -> None:
        background(fail())
        quiet = background(fail(), report=False)
        await asyncio.sleep(0.01)
        assert isinstance(quiet.exception(), RuntimeError)

    with caplog.at_level(logging.ERROR, logger="services.tasks"):
        asyncio.run(main())
    assert [r.getMessage().split(" failed: ")[1] for r in caplog.records] == ["RuntimeError('boom')"]
