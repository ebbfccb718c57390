"""services/broker.py against the real broker: a dead member is skipped (a failover, counted), a refused login at
the first connect fails fast, and the commands queue is quorum unless an earlier version left a classic one."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest

from local_cluster.infra import Infrastructure, free_port
from services.broker import (
    BROKER_FAILOVERS,
    Broker,
    BrokerLoginRefused,
    BrokerUnavailable,
    close_quietly,
    declare_commands_queue,
)
from services.infra_metrics import BROKER_RECONNECTS
from services.topology import Topology

pytestmark = pytest.mark.integration


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.netloc.rsplit('@', 1)[0]}@127.0.0.1:{port}"))


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{password}@{parts.hostname}:{parts.port or 5672}"))


def test_a_dead_member_is_skipped_and_the_move_is_counted(infra: Infrastructure) -> None:
    dead = _with_port(infra.amqp_url, free_port())

    async def main() -> None:
        broker = Broker([infra.amqp_url, dead], connect_timeout=3)
        first = await broker.connect()
        assert broker.current_url is not None and broker.current_url.startswith(infra.amqp_url)
        failovers, reconnects = BROKER_FAILOVERS._value.get(), BROKER_RECONNECTS._value.get()
        await first.close()
        # Lost: the next round starts after the member we were on (the dead one), then comes back.
        again = await broker.connect()
        assert broker.current_url.startswith(infra.amqp_url)
        assert BROKER_RECONNECTS._value.get() == reconnects + 1
        assert BROKER_FAILOVERS._value.get() == failovers  # the same member as before
        await again.close()

        only_dead = Broker([dead], connect_timeout=3)
        with pytest.raises(BrokerUnavailable, match="no RabbitMQ member answered"):
            await only_dead.connect()

        moving = Broker([dead, infra.amqp_url], connect_timeout=3)
        connection = await moving.connect()
        assert moving.current_url.startswith(infra.amqp_url)
        await connection.close()

    asyncio.run(main())


def test_a_refused_login_fails_fast_at_the_first_connect(infra: Infrastructure) -> None:
    wrong = _with_password(infra.amqp_url, "not-the-password")

    async def main() -> None:
        with pytest.raises(BrokerLoginRefused) as refused:
            await Broker([wrong], connect_timeout=5).connect()
        message = str(refused.value)
        assert "refused the login" in message and "not-the-password" not in message and "***" in message

    asyncio.run(main())


def test_the_commands_queue_is_quorum_unless_a_classic_one_exists(
    infra: Infrastructure, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        connection = await aio_pika.connect(infra.amqp_url, timeout=10)
        try:
            fresh = Topology(prefix)
            channel, queue = await declare_commands_queue(connection, fresh, prefetch_count=8)
            # A second declaration with a classic type is refused: it *is* quorum.
            probe = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed, match="x-queue-type"):
                await probe.declare_queue(fresh.commands_queue, durable=True)
            await channel.queue_delete(fresh.commands_queue)

            old = Topology(prefix + "old")
            legacy = await connection.channel()
            await legacy.declare_queue(old.commands_queue, durable=True)  # what an earlier version declared
            with caplog.at_level(logging.WARNING, logger="services.broker"):
                channel, queue = await declare_commands_queue(connection, old)
            assert queue.name == old.commands_queue
            assert "exists as a classic queue" in caplog.text and "delete_queue" in caplog.text
            await channel.queue_delete(old.commands_queue)
        finally:
            await close_quietly(connection)

    asyncio.run(main())


@pytest.mark.parametrize("program", ["ami_gateway", "ws_node"])
def test_a_process_whose_login_is_refused_exits_at_once_saying_so(
    infra: Infrastructure, prefix: str, program: str, tmp_path: Path
) -> None:
    config = tmp_path / "appsettings.json"
    config.write_text(json.dumps({
        "Asterisk": {"url": "127.0.0.1", "port": free_port(), "userName": "admin", "secret": "x"},
        "Cluster": {"amqpUrls": [_with_password(infra.amqp_url, "wrong-secret"), _with_port(infra.amqp_url,
                                                                                             free_port())],
                    "redisUrl": infra.redis_url, "prefix": prefix},
    }))
    extra = ["--port", str(free_port())] if program == "ws_node" else ["--metrics-port", str(free_port())]
    done = subprocess.run([sys.executable, "-m", program, "--config", str(config), *extra],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "CMS_NODE_SIGNALR_TOKEN_SECRET": "x" * 32})
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("configuration error:")]
    assert len(errors) == 1 and "refused the login" in errors[0] and "wrong-secret" not in done.stderr, done.stderr
