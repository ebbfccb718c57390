"""services/tasks.py: a task nobody holds is not collected before it ends."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref

import pytest

from services.tasks import background, running, stop_tasks


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


async def _swallows_cancels(times: int, ended: list[str]) -> None:
    # As a task does whose await went through 3.11's wait_for when the result and the cancel met in one turn.
    for _ in range(times):
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            pass
    await asyncio.sleep(60)
    ended.append("never")


def test_stop_tasks_cancels_again_a_task_that_went_on_after_its_cancel(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        ended: list[str] = []
        loop = asyncio.get_running_loop()
        stubborn = asyncio.create_task(_swallows_cancels(1, ended), name="stubborn")
        plain = asyncio.create_task(asyncio.sleep(60), name="plain")
        await asyncio.sleep(0)
        started = loop.time()
        assert await stop_tasks([stubborn, plain, None], grace=0.1, timeout=5)
        assert stubborn.cancelled() and plain.cancelled() and ended == []
        assert loop.time() - started < 1
        assert "task stubborn went on after it was cancelled" in caplog.text

    asyncio.run(main())


def test_stop_tasks_gives_up_on_a_task_that_never_ends_and_says_which(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        forever = asyncio.create_task(_swallows_cancels(1_000_000, []), name="forever")
        await asyncio.sleep(0)
        assert not await stop_tasks([forever], grace=0.05, timeout=0.3)
        assert "did not stop within 0.3s: forever" in caplog.text
        forever.get_coro().close()  # type: ignore[union-attr]  # let the test's loop close

    asyncio.run(main())


def test_stop_tasks_drops_what_a_task_raised_on_its_way_out() -> None:
    async def failing() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            raise RuntimeError("cleanup failed")

    async def main() -> None:
        task = asyncio.create_task(failing())
        await asyncio.sleep(0)
        assert await stop_tasks([task], grace=0.1, timeout=1)
        assert isinstance(task.exception(), RuntimeError)

    asyncio.run(main())
