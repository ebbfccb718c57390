"""Clustered engines on loopback for the failover tests: a RabbitMQ cluster of private nodes and a
Redis primary + replica watched by Sentinels. Everything runs under a test's directory on free
ports and is stopped by :meth:`stop`; the machine's own RabbitMQ and Redis are never touched.

RabbitMQ nodes share one Erlang cookie through a private ``HOME`` (the cookie file lives there),
so ``rabbitmqctl`` run with the same ``HOME`` can talk to all of them. The cluster forms at boot
(``classic_config`` peer discovery: every member after the first lists the first, which is started
alone before them), not by ``rabbitmqctl stop_app / join_cluster / start_app``: on this 2-core machine
with the CPU busy each ``rabbitmqctl`` run took 15-32 s (an Erlang VM booted per call) and forming a
2-member cluster took 99 s, against 11 s for a member to boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika

from local_cluster.infra import free_port, port_open
from local_cluster.spawn import spawn

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


class EngineError(RuntimeError):
    pass


@dataclass
class RabbitNode:
    name: str  # the Erlang node name, e.g. cms12345@localhost
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"


@dataclass
class RabbitCluster:
    base: Path
    nodes: list[RabbitNode] = field(default_factory=list)

    @classmethod
    def create(cls, base: Path, size: int) -> RabbitCluster:
        if not (RABBITMQ_BIN / "rabbitmq-server").exists():
            raise EngineError(f"no RabbitMQ in {RABBITMQ_BIN}: install rabbitmq-server (scripts/setup-system.sh)")
        home = base / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text("CMSENGINESTESTCOOKIE")
        cookie.chmod(0o400)
        cluster = cls(base)
        ports = [free_port() for _ in range(size)]
        seed = f"cmse{ports[0]}@localhost"
        for index, port in enumerate(ports):
            node_dir = base / f"node{index}"
            node_dir.mkdir(parents=True, exist_ok=True)
            (node_dir / "enabled_plugins").write_text("[].\n")
            # Our own config file: the machine's /etc/rabbitmq/rabbitmq.conf pins its listener to 5672.
            conf = f"listeners.tcp.local = 127.0.0.1:{port}\n"
            if index:
                # Joins the first member while it boots (the first is running by then: see start()).
                conf += ("cluster_formation.peer_discovery_backend = classic_config\n"
                         f"cluster_formation.classic_config.nodes.1 = {seed}\n")
            (node_dir / "rabbitmq.conf").write_text(conf)
            name = f"cmse{port}@localhost"
            env = {
                **os.environ,
                "HOME": str(home),
                "RABBITMQ_NODENAME": name,
                "RABBITMQ_NODE_PORT": str(port),
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_DIST_PORT": str(free_port()),
                "RABBITMQ_MNESIA_BASE": str(node_dir / "mnesia"),
                "RABBITMQ_LOG_BASE": str(node_dir / "log"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(node_dir / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(node_dir / "rabbit.pid"),
                "RABBITMQ_CONFIG_FILE": str(node_dir / "rabbitmq.conf"),
            }
            cluster.nodes.append(RabbitNode(name, port, env, node_dir / "server.log"))
        return cluster

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self, timeout: float = 240.0) -> dict[str, float]:
        """Start the first member, then the others, which join it as they boot; seconds per phase.

        A member that found no peer at boot would start as a cluster of its own, so the others start only
        once the first listens, and membership is then checked over AMQP (a queue declared on the first
        member must be visible on every other) rather than trusted.
        """
        phases: dict[str, float] = {}
        started = time.monotonic()
        first, rest = self.nodes[0], self.nodes[1:]
        self.start_node(first)
        self._wait_listening(first, timeout)
        phases["first member boot"] = time.monotonic() - started
        mark = time.monotonic()
        for node in rest:
            self.start_node(node)
        for node in rest:
            self._wait_listening(node, timeout)
        phases["other members boot and join"] = time.monotonic() - mark
        mark = time.monotonic()
        asyncio.run(self._check_clustered(timeout))
        phases["membership checked"] = time.monotonic() - mark
        return phases

    async def _check_clustered(self, timeout: float) -> None:
        name = f"cms-engines-membership-{os.urandom(4).hex()}"
        deadline = time.monotonic() + timeout
        async with await aio_pika.connect(self.nodes[0].url, timeout=timeout) as first:
            channel = await first.channel()
            queue = await channel.declare_queue(name, auto_delete=False)
            try:
                for node in self.nodes[1:]:
                    async with await aio_pika.connect(node.url, timeout=max(1.0, deadline - time.monotonic())) as other:
                        try:
                            await (await other.channel()).declare_queue(name, passive=True)
                        except aio_pika.exceptions.ChannelClosed as exc:
                            raise EngineError(
                                f"RabbitMQ node {node.name} did not join {self.nodes[0].name} at boot ({exc}); "
                                f"see {node.log_path}"
                            ) from exc
            finally:
                await queue.delete(if_unused=False, if_empty=False)

    def start_node(self, node: RabbitNode) -> None:
        node.process = spawn([str(RABBITMQ_BIN / "rabbitmq-server")], node.log_path, env=node.env)

    def stop_node(self, node: RabbitNode) -> None:
        """Kill a member outright (a host that died): its clients' connections drop."""
        if node.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.process.pid, signal.SIGKILL)
        node.process.wait(timeout=20)
        node.process = None

    def node_of_port(self, port: int) -> RabbitNode:
        return next(node for node in self.nodes if node.port == port)

    def ctl(self, node: RabbitNode, *args: str, timeout: float = 120.0) -> str:
        done = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", node.name, *args],
            env=node.env, capture_output=True, text=True, timeout=timeout, check=False,
        )
        if done.returncode != 0:
            raise EngineError(f"rabbitmqctl {' '.join(args)} on {node.name}: {done.stderr.strip() or done.stdout}")
        return done.stdout

    def _wait_listening(self, node: RabbitNode, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_open(node.port):
                return
            if node.process is not None and node.process.poll() is not None:
                raise EngineError(f"RabbitMQ node {node.name} exited at start; see {node.log_path}")
            time.sleep(0.2)
        raise EngineError(f"RabbitMQ node {node.name} did not listen on {node.port} within {timeout:.0f}s")

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.process.pid, signal.SIGTERM)
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                node.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.process.pid, signal.SIGKILL)
                node.process.wait(timeout=5)
            node.process = None
        # Erlang's port mapper (epmd) was started by the first node for everyone on this machine and
        # is shared with the machine's RabbitMQ: it is left running on purpose.


@dataclass
class RedisProcess:
    name: str
    port: int
    args: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None


@dataclass
class SentinelSet:
    """A Redis primary, one replica and ``sentinels`` Sentinels watching them as ``master_name``."""

    base: Path
    master_name: str = "cmsmaster"
    primary: RedisProcess | None = None
    replica: RedisProcess | None = None
    sentinels: list[RedisProcess] = field(default_factory=list)

    @classmethod
    def create(cls, base: Path, sentinels: int = 3) -> SentinelSet:
        if shutil.which("redis-server") is None:
            raise EngineError("no redis-server: install it (scripts/setup-system.sh)")
        base.mkdir(parents=True, exist_ok=True)
        group = cls(base)
        primary_port, replica_port = free_port(), free_port()
        group.primary = group._server("redis-a", primary_port, [])
        group.replica = group._server("redis-b", replica_port, ["--replicaof", "127.0.0.1", str(primary_port)])
        for index in range(sentinels):
            port = free_port()
            conf = base / f"sentinel{index}.conf"
            # Sentinel rewrites its file as it learns; it must be writable and its own.
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {base}\n"
                f"sentinel monitor {group.master_name} 127.0.0.1 {primary_port} 2\n"
                f"sentinel down-after-milliseconds {group.master_name} 1000\n"
                f"sentinel failover-timeout {group.master_name} 10000\n"
                f"sentinel parallel-syncs {group.master_name} 1\n"
            )
            group.sentinels.append(
                RedisProcess(f"sentinel{index}", port, ["redis-server", str(conf), "--sentinel"],
                             base / f"sentinel{index}.log")
            )
        return group

    def _server(self, name: str, port: int, extra: list[str]) -> RedisProcess:
        data = self.base / name
        data.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(data), "--replica-announce-ip", "127.0.0.1", *extra]
        return RedisProcess(name, port, args, data / "redis.log")

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", s.port) for s in self.sentinels]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.master_name}/0"

    def processes(self) -> list[RedisProcess]:
        return [p for p in (self.primary, self.replica, *self.sentinels) if p is not None]

    def start(self, timeout: float = 30.0) -> None:
        for proc in self.processes():
            proc.process = spawn(proc.args, proc.log_path)
        deadline = time.monotonic() + timeout
        for proc in self.processes():
            while not port_open(proc.port):
                if proc.process is not None and proc.process.poll() is not None:
                    raise EngineError(f"{proc.name} exited at start; see {proc.log_path}")
                if time.monotonic() > deadline:
                    raise EngineError(f"{proc.name} did not listen on {proc.port}")
                time.sleep(0.1)

    def kill(self, proc: RedisProcess) -> None:
        if proc.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.process.pid, signal.SIGKILL)
        proc.process.wait(timeout=10)
        proc.process = None

    def stop(self) -> None:
        for proc in self.processes():
            self.kill(proc)
