"""RabbitMQ, Redis, the HAProxy configuration and the listening ports, each tried for real:
the broker gets a temporary queue bound and a message through it, Redis a temporary key, HAProxy
its rendered configuration through ``haproxy -c``, each port a bind."""

from __future__ import annotations

import asyncio
import errno
import socket
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path

import aio_pika
import redis.asyncio as aioredis
from aio_pika.exceptions import AMQPError

from balancer.cluster import ClusterConfigError, ClusterDescription
from balancer.haproxy_ctl import ConfigCheckError, HAProxyNotFoundError, check_config
from balancer.render import render_config
from doctor.report import Result, failed, passed, skipped, warned
from services.config import ClusterConfig, redact_url
from services.heartbeat import read_registry
from services.redis_client import redis_client
from services.topology import Topology

#: the Redis features the cluster uses: streams (XADD ... MAXLEN) arrived in 5.0
MIN_REDIS_MAJOR = 5


def _amqp_fix(exc: BaseException, url: str) -> str:
    text = f"{type(exc).__name__} {exc}".lower()
    if "authentication" in text or "access_refused" in text or "login" in text:
        return (f"the user/password in Cluster.amqpUrl ({redact_url(url)}) or CMS_AMQP_URL: "
                "`rabbitmqctl list_users`; `rabbitmqctl change_password USER PASSWORD`")
    if "not_allowed" in text or "vhost" in text:
        return ("the virtual host in Cluster.amqpUrl: `rabbitmqctl list_vhosts`; "
                "`rabbitmqctl set_permissions -p VHOST USER '.*' '.*' '.*'`")
    if "access" in text or "permission" in text or "403" in text:
        return ("give the user configure/write/read rights on the names the cluster uses: "
                "`rabbitmqctl set_permissions -p VHOST USER '^PREFIX\\..*' '^PREFIX\\..*' '^PREFIX\\..*'` "
                "(PREFIX = Cluster.prefix)")
    return (f"Cluster.amqpUrl ({redact_url(url)}) or CMS_AMQP_URL: host and port of RabbitMQ (5672); "
            "is rabbitmq-server running (`systemctl status rabbitmq-server`) and reachable from here?")


async def check_broker(cluster: ClusterConfig, timeout: float = 5.0) -> Result:
    """Declare the events exchange as the processes do, bind a temporary queue, route one message
    through it and delete the queue: the rights a node and the gateway need, tried for real."""
    name = "RabbitMQ reachable, with rights"
    url = cluster.amqp_url
    topology = Topology(cluster.prefix)
    queue_name = topology.node_events_queue(f"doctor-{uuid.uuid4().hex[:8]}")
    try:
        connection = await aio_pika.connect(url, timeout=timeout)
    except (AMQPError, OSError, TimeoutError, ConnectionError) as exc:
        return failed(name, f"cannot connect to {redact_url(url)}: {type(exc).__name__}: {exc}".strip(),
                      _amqp_fix(exc, url))
    try:
        async with connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(
                topology.events_exchange, aio_pika.ExchangeType.DIRECT, durable=True
            )
            queue = await channel.declare_queue(queue_name, exclusive=True, auto_delete=True)
            await queue.bind(exchange, routing_key=topology.line_routing_key("doctor"))
            await exchange.publish(aio_pika.Message(b"doctor"), routing_key=topology.line_routing_key("doctor"))
            message = None
            for _ in range(50):
                message = await queue.get(no_ack=True, fail=False)
                if message is not None:
                    break
                await asyncio.sleep(0.05)
            await queue.delete(if_unused=False, if_empty=False)
            if message is None:
                return failed(name, f"a message published to {topology.events_exchange} never reached its queue",
                              "check the broker's logs (alarms: disk or memory watermark block publishers)")
            server = connection.transport.connection.server_properties if connection.transport else {}
    except (AMQPError, OSError, TimeoutError, ConnectionError) as exc:
        return failed(name, f"{redact_url(url)}: {type(exc).__name__}: {exc}", _amqp_fix(exc, url))
    version = server.get("version", b"") if isinstance(server, dict) else b""
    version_text = version.decode() if isinstance(version, bytes) else str(version)
    return passed(name, f"{redact_url(url)} (RabbitMQ {version_text or '?'}): exchange {topology.events_exchange}, "
                        "temporary queue declared, bound, used, deleted")


def _redis_fix(exc: BaseException, url: str) -> str:
    text = str(exc).lower()
    if isinstance(exc, aioredis.AuthenticationError) or "auth" in text or "wrongpass" in text:
        return f"the password in Cluster.redisUrl ({redact_url(url)}) or CMS_REDIS_URL: redis://:PASSWORD@host:6379/0"
    if "noperm" in text:
        return ("the Redis ACL user needs read/write on the cluster's keys: "
                "`ACL SETUSER USER on >PASSWORD ~PREFIX:* +@all` (PREFIX = Cluster.prefix)")
    return (f"Cluster.redisUrl ({redact_url(url)}) or CMS_REDIS_URL: host and port of Redis (6379); "
            "is redis-server running (`systemctl status redis-server`) and reachable from here?")


async def check_namespace(cluster: ClusterConfig, timeout: float = 5.0) -> Result:
    """Processes already beating under this prefix (services/heartbeat.py): a second cluster started
    in the same namespace would share queues and publish every AMI event twice."""
    name = f"namespace {cluster.prefix!r} not used by a running cluster"
    client = redis_client(cluster.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        processes = await read_registry(client, cluster.prefix)
    except (aioredis.RedisError, OSError, TimeoutError) as exc:
        return skipped(name, f"registry not readable: {type(exc).__name__}")
    finally:
        await client.aclose()
    alive = [p for p in processes if p.record is not None]
    if not alive:
        return passed(name, "no gateway or node is registered under it")
    counts: dict[str, int] = {}
    for process in alive:
        counts[process.kind] = counts.get(process.kind, 0) + 1
    kinds = ", ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in sorted(counts.items()))
    return warned(name, f"in use now: {kinds} ({', '.join(p.id for p in alive[:4])})",
                  "if this is that cluster, nothing to do (use --skip-ports on its machines); if it is a new "
                  "deployment, choose another Cluster.prefix (or CMS_PREFIX)")


async def check_redis(cluster: ClusterConfig, timeout: float = 5.0) -> Result:
    """SET, GET and DEL a temporary key under the cluster's prefix; report the server version."""
    name = "Redis reachable, with rights"
    url = cluster.redis_url
    key = f"{cluster.prefix}:doctor:{uuid.uuid4().hex[:8]}"
    client = redis_client(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        await client.set(key, b"doctor", px=30_000)
        got = await client.get(key)
        await client.delete(key)
        info = await client.info("server")
    except (aioredis.RedisError, OSError, TimeoutError) as exc:
        return failed(name, f"{redact_url(url)}: {type(exc).__name__}: {exc}", _redis_fix(exc, url))
    finally:
        await client.aclose()
    if got != b"doctor":
        return failed(name, f"{redact_url(url)}: a key written could not be read back",
                      "a replica (read-only) or a proxy in the way? point Cluster.redisUrl at the primary")
    version = str(info.get("redis_version", "?"))
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    if major and major < MIN_REDIS_MAJOR:
        return failed(name, f"Redis {version} at {redact_url(url)}: streams need {MIN_REDIS_MAJOR}.0 or later",
                      "upgrade Redis (Debian 11 and later ship 6.x or newer)")
    return passed(name, f"{redact_url(url)} (Redis {version}): temporary key written, read, deleted")


def check_ports(ports: Iterable[tuple[str, str, int]]) -> list[Result]:
    """Each (what, host, port) must be free to listen on: tried with a real bind."""
    results = []
    for what, host, port in ports:
        name = f"port {port} free ({what})"
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                sock.listen(1)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    results.append(failed(
                        name, f"{host}:{port} is already in use",
                        f"stop what listens there (`ss -ltnp 'sport = :{port}'` names it), or choose another port "
                        f"for the {what}",
                    ))
                elif exc.errno == errno.EACCES:
                    results.append(failed(name, f"{host}:{port}: permission denied",
                                          "ports below 1024 need root or CAP_NET_BIND_SERVICE; use a higher port"))
                else:
                    results.append(failed(name, f"{host}:{port}: {exc.strerror}",
                                          f"{host} must be an address of this machine"))
                continue
        results.append(passed(name, f"{host}:{port}"))
    return results


def check_haproxy(description: ClusterDescription | ClusterConfigError) -> Result:
    """Render the balancer's configuration and have ``haproxy -c`` validate it."""
    name = "HAProxy configuration validates"
    if isinstance(description, ClusterConfigError):
        return failed(name, str(description), "correct that key in the file given with --cluster")
    with tempfile.TemporaryDirectory(prefix="cms-doctor-") as tmp:
        path = Path(tmp) / "haproxy.cfg"
        path.write_text(render_config(description), encoding="utf-8")
        try:
            check_config(path)
        except HAProxyNotFoundError as exc:
            return warned(name, str(exc), "install HAProxy (`apt-get install haproxy`) on the balancer machine")
        except ConfigCheckError as exc:
            complaints = [line.strip() for line in exc.output.splitlines() if "[ALERT]" in line or "[WARNING]" in line]
            return failed(name, complaints[0] if complaints else f"haproxy -c refused it (exit {exc.returncode})",
                          "read the full output with `python -m balancer check --cluster FILE`; "
                          "a TLS certificate must be a PEM with the chain and the private key")
    nodes = ", ".join(n.address for n in description.nodes)
    tls = f", TLS on :{description.wss_port}" if description.tls_enabled else ", no TLS"
    return passed(name, f"{len(description.nodes)} nodes ({nodes}), clients on :{description.ws_port}{tls}")
