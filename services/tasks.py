"""Tasks nobody awaits (fire and forget), kept alive until they finish; and stopping tasks for sure.

The event loop keeps only a weak reference to a task, so one that nobody else holds can be collected
before it is done (asyncio.create_task's documentation warns of it). :func:`background` holds every task
it starts until the task ends, and logs an exception nobody else would see, at once instead of whenever
the task happens to be collected.

:func:`stop_tasks` cancels tasks and waits for their end, cancelling again a task that goes on: under Python
3.11, a library that awaits through ``asyncio.wait_for`` (redis-py's ``send_packed_command`` does) drops a cancel
that lands in the same loop turn as the awaited result, and the task carries on as if never cancelled. A stop that
awaited it once waited for ever (a node's feed hung on its drain that way).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

__all__ = ["background", "running", "stop_tasks"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_RUNNING: set[asyncio.Future[Any]] = set()


def background(coro: Coroutine[Any, Any, T], *, report: bool = True) -> asyncio.Future[T]:
    """Run ``coro`` as a task of the current loop, kept referenced until it ends; returns the task.

    ``report=False`` when the caller handles the task's failure itself (a Deferred's errback...)."""
    task = asyncio.ensure_future(coro)
    _RUNNING.add(task)
    task.add_done_callback(_finished if report else _RUNNING.discard)
    return task


def running() -> int:
    """How many background tasks have not finished yet (for tests and the status page)."""
    return len(_RUNNING)


def _finished(task: asyncio.Future[Any]) -> None:
    _RUNNING.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %r failed: %r", task, task.exception())


async def stop_tasks(tasks: Iterable[asyncio.Future[Any] | None], *, grace: float = 1.0, timeout: float = 10.0) -> bool:
    """Cancel ``tasks`` and wait until each has ended; False if one is still running after ``timeout`` seconds.

    A task still running ``grace`` seconds after its cancel is cancelled again (see the module's docstring); the
    grace leaves what a task does on its way out (closing a connection) its time. What the tasks raised is
    retrieved and dropped: they were told to stop. A cancel of the caller itself propagates at once."""
    loop = asyncio.get_running_loop()
    given = {task for task in tasks if task is not None}
    pending = {task for task in given if not task.done()}
    deadline = loop.time() + timeout
    for task in pending:
        task.cancel()
    _retrieve(given - pending)
    while pending:
        done, pending = await asyncio.wait(pending, timeout=max(0.0, min(grace, deadline - loop.time())))
        _retrieve(done)
        if not pending:
            break
        if loop.time() >= deadline:
            log.error("%d task(s) did not stop within %.1fs: %s", len(pending), timeout,
                      ", ".join(_name(task) for task in pending))
            return False
        for task in pending:
            log.warning("task %s went on after it was cancelled; cancelling it again", _name(task))
            task.cancel()
    return True


def _retrieve(done: Iterable[asyncio.Future[Any]]) -> None:
    for task in done:
        if not task.cancelled():
            task.exception()  # retrieved: not reported as "never retrieved" when collected


def _name(task: asyncio.Future[Any]) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else repr(task)
