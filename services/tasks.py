"""Tasks nobody awaits (fire and forget), kept alive until they finish.

The event loop keeps only a weak reference to a task, so one that nobody else holds can be collected
before it is done (asyncio.create_task's documentation warns of it). :func:`background` holds every task
it starts until the task ends, and logs an exception nobody else would see, at once instead of whenever
the task happens to be collected.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["background", "running"]

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
