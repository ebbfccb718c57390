"""The node's Redis connection pool: bounded, a command past the bound waits for a connection, and cheap.

Every OpenConnection costs the node five or six Redis round trips (holder claim, snapshot, delivery
position, holders, the client's own snapshot), each taking a connection from the pool and giving it back.
redis-py's ``BlockingConnectionPool`` wraps each of those in a condition, a lock, a timeout and four
awaited observability hooks (redis-py 8): measured here, 13-28 us of CPU per command on top of the
round trip, about a tenth of a node's cost per agent connection in a reconnect storm.

This pool keeps what the node relies on (at most ``max_connections``; past that a command waits, up to
``timeout`` seconds, then fails with ``ConnectionError``; a connection is checked before reuse as redis-py
checks it) and drops the rest. On one event loop, taking a free connection needs no lock: nothing else
runs between the check and the pop. Waiters are served first come, first served; a waiter that gave up
(timeout, cancellation) passes its turn on, so a released connection never sits idle while someone waits.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, ConnectionPool

from services.redis_client import is_sentinel_url, redis_client


class BoundedPool(ConnectionPool):
    def __init__(self, *, timeout: float = 5.0, **options: Any) -> None:
        super().__init__(**options)
        self.timeout = timeout
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> AbstractConnection:
        # Someone already waiting goes first: a newcomer must not overtake the queue.
        if self._waiters or not self.can_get_connection():
            await self._wait_turn()
        connection: AbstractConnection = self.get_available_connection()  # type: ignore[no-untyped-call]
        try:
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def _wait_turn(self) -> None:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    await turn
                    if self.can_get_connection():
                        return
                    # A newcomer took it between the wake-up and this turn of the loop: wait again, first in line.
                    turn = asyncio.get_running_loop().create_future()
                    self._waiters.appendleft(turn)
        except TimeoutError as exc:
            self._pass_turn(turn)
            raise aioredis.ConnectionError("No connection available.") from exc
        except BaseException:
            self._pass_turn(turn)
            raise

    def _pass_turn(self, turn: asyncio.Future[None]) -> None:
        """A waiter leaves: out of the queue, and if it had been woken, the wake-up goes to the next one."""
        with_turn = turn.done() and not turn.cancelled()
        try:
            self._waiters.remove(turn)
        except ValueError:
            pass
        if with_turn:
            self._wake_next()

    def _wake_next(self) -> None:
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return

    async def release(self, connection: AbstractConnection) -> None:
        self._in_use_connections.discard(connection)
        try:
            if connection.should_reconnect():  # type: ignore[no-untyped-call]
                await connection.disconnect()
        except BaseException:
            connection._force_disconnect()  # not known to be closed: the next use reconnects
            raise
        finally:
            self._available_connections.append(connection)
            self._wake_next()


def node_redis_client(url: str, *, max_connections: int, pool_wait_seconds: float, **options: Any) -> aioredis.Redis:
    """The node's client: :class:`BoundedPool` on a plain URL; Sentinel URLs as every process makes them."""
    if is_sentinel_url(url):
        return redis_client(url, max_connections=max_connections, pool_wait_seconds=pool_wait_seconds, **options)
    pool = BoundedPool.from_url(url, max_connections=max_connections, timeout=pool_wait_seconds, **options)
    return aioredis.Redis.from_pool(pool)
