"""One way to make a Redis client, for every process: a plain URL, or Sentinel discovery.

``redis+sentinel://[user:password@]host1:26379,host2:26379/<master name>/<db>`` (or the Cluster block's
``sentinels`` + ``sentinelMaster``, which services/config.py turns into that URL) asks the Sentinels
for the current primary on every new connection. After a failover the old primary's connections
fail (Sentinel kills its clients when it demotes it; a write to a replica is ``READONLY``, which
redis-py turns into a dropped connection), the caller's retry opens a new one and lands on the new
primary. The password is the data servers'; Sentinels are asked without one (Sentinels with their own
``requirepass`` are not supported yet).

Replication is asynchronous: a promoted replica may lack the old primary's last writes. A client
cannot see that from the data, so :class:`ServerIdentity` notices that the server behind a client
changed (its ``run_id``: a new process or another server): the gateway treats that like a Redis that
restarted and re-states every line.
"""

from __future__ import annotations

import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

from services.config import redact_url

log = logging.getLogger(__name__)

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")


class RedisUrlError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class SentinelSpec:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelSpec:
    """``redis+sentinel://[user:pass@]h1:26379,h2:26379/master/db`` -> :class:`SentinelSpec`."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise RedisUrlError(f"{redact_url(url)!r}: expected redis+sentinel://host:port,.../master/db")
    netloc, _, path = rest.partition("/")
    auth, at, hosts = netloc.rpartition("@")
    if not at:
        auth, hosts = "", netloc
    username: str | None = None
    password: str | None = None
    if auth:
        user, colon, secret = auth.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(secret) if colon else None
    sentinels: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RedisUrlError(f"{redact_url(url)!r}: Sentinel address {item.strip()!r} is not host:port")
        sentinels.append((host.strip("[]"), int(port)))
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    if not parts:
        raise RedisUrlError(f"{redact_url(url)!r}: the master name is missing (…/mymaster/0)")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise RedisUrlError(f"{redact_url(url)!r}: the path must be /<master name>[/<db number>]")
    return SentinelSpec(
        sentinels=tuple(sentinels),
        master=urllib.parse.unquote(parts[0]),
        db=int(parts[1]) if len(parts) == 2 else 0,
        username=username,
        password=password,
        tls=scheme.lower() == "rediss+sentinel",
    )


class SentinelRedis(aioredis.Redis):
    """A client of the current primary; closing it also closes its connections to the Sentinels."""

    _sentinel: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        sentinel, self._sentinel = self._sentinel, None
        if sentinel is not None:
            for client in sentinel.sentinels:
                await client.aclose()


def redis_client(
    url: str, *, max_connections: int | None = None, pool_wait_seconds: float = 5.0, **options: Any
) -> aioredis.Redis:
    """A client for ``url``; ``options`` are redis-py connection options (timeouts...).

    ``max_connections`` (plain URLs): a pool of at most that many connections where a command that
    finds them all busy waits up to ``pool_wait_seconds`` for one. redis-py's default pool instead
    fails at 100 with "Too many connections": a node answering hundreds of reconnecting agents'
    snapshots at once left some of them unanswered.
    """
    if not is_sentinel_url(url):
        if max_connections is not None:
            pool = aioredis.BlockingConnectionPool.from_url(
                url, max_connections=max_connections, timeout=pool_wait_seconds, **options
            )
            return aioredis.Redis.from_pool(pool)
        return aioredis.from_url(url, **options)
    spec = parse_sentinel_url(url)
    sentinel_options = {
        "socket_timeout": min(float(options.get("socket_timeout") or 1.0), 1.0),
        "socket_connect_timeout": min(float(options.get("socket_connect_timeout") or 1.0), 1.0),
    }
    connection = dict(options)
    if spec.password is not None:
        connection["password"] = spec.password
    if spec.username is not None:
        connection["username"] = spec.username
    if spec.tls:
        connection["ssl"] = True
    sentinel = Sentinel(list(spec.sentinels), sentinel_kwargs=sentinel_options, db=spec.db, **connection)
    client = sentinel.master_for(spec.master, redis_class=SentinelRedis)
    assert isinstance(client, SentinelRedis)
    client._sentinel = sentinel
    return client


class ServerIdentity:
    """Which Redis server a client reaches: changes when the server restarts or another one is promoted."""

    def __init__(self) -> None:
        self.run_id: str | None = None

    async def changed(self, client: aioredis.Redis) -> bool:
        """Ask the server its ``run_id``; True when it differs from the one seen before (not on the first ask)."""
        info = await client.info("server")
        run_id = str(info.get("run_id", ""))
        previous, self.run_id = self.run_id, run_id
        if previous is not None and previous != run_id:
            log.warning("Redis server changed (run_id %s -> %s): a restart or a failover", previous[:8], run_id[:8])
            return True
        return False

    def forget(self) -> None:
        self.run_id = None
