"""Clustered engines on loopback for the failover tests: a RabbitMQ cluster of private nodes and a
Redis primary + replica watched by Sentinels. Everything runs under a test's directory on free
ports and is stopped by :meth:`stop`; the machine's own RabbitMQ and Redis are never touched.

RabbitMQ nodes share one Erlang cookie through a private ``HOME`` (the cookie file lives there),
so ``rabbitmqctl`` run with the same ``HOME`` can talk to all of them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

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
        for index in range(size):
            port = free_port()
            node_dir = base / f"node{index}"
            node_dir.mkdir(parents=True, exist_ok=True)
            (node_dir / "enabled_plugins").write_text("[].\n")
            # Our own config file: the machine's /etc/rabbitmq/rabbitmq.conf pins its listener to 5672.
            (node_dir / "rabbitmq.conf").write_text(
                f"listeners.tcp.local = 127.0.0.1:{port}\n"
            )
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

    def start(self, timeout: float = 120.0) -> None:
        """Start every node, then join the others to the first one."""
        for node in self.nodes:
            self.start_node(node)
        for node in self.nodes:
            self._wait_listening(node, timeout)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
            self._wait_listening(node, timeout)
        running = self.ctl(first, "eval", "length(rabbit_nodes:all_running()).").strip()
        if running != str(len(self.nodes)):
            raise EngineError(f"RabbitMQ cluster has {running} running nodes, expected {len(self.nodes)}")

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
