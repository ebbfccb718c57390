"""RabbitMQ and Redis for a local run: reuse the ones listening on the default ports, or start
private instances (on free ports, data under a run directory) and stop them afterwards.
The machine's own services are never stopped or reconfigured. Like every child of the launcher,
the private servers are armed to die with the process that started them."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from local_cluster.spawn import spawn

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class InfrastructureError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: all held open at once while chosen, so no two are the same
    (separate free_port() calls can hand out one port twice)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class PrivateServer:
    """A server this instance started; enough to start it again the same way."""

    name: str
    process: subprocess.Popen[bytes]
    args: list[str]
    log_path: Path
    env: dict[str, str] | None
    port: int

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def returncode(self) -> int | None:
        return self.process.poll()


class Infrastructure:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.amqp_url = DEFAULT_AMQP_URL
        self.redis_url = DEFAULT_REDIS_URL
        self.servers: list[PrivateServer] = []
        self._abort: Callable[[], bool] = lambda: False

    def start(
        self,
        timeout: float = 90.0,
        abort: Callable[[], bool] | None = None,
        *,
        redis: bool | None = None,
        rabbitmq: bool | None = None,
    ) -> None:
        """Start a private Redis / RabbitMQ when asked to (True), or, by default (None), when none
        listens on the default port. ``abort`` is polled while waiting: true stops with an error."""
        if abort is not None:
            self._abort = abort
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if redis or (redis is None and not port_open(6379)):
            self.redis_url = self._start_redis()
        if rabbitmq or (rabbitmq is None and not port_open(5672)):
            self.amqp_url = self._start_rabbitmq(timeout)

    def pids(self) -> dict[str, int]:
        """The private servers this instance started, by name."""
        return {s.name: s.pid for s in self.servers if s.returncode() is None}

    def respawn(self, name: str) -> PrivateServer:
        """Start a private server that died again, same port and data folder (a Redis comes
        back empty: it keeps nothing on disk, like the machine's). Does not wait."""
        old = next(s for s in self.servers if s.name == name)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(old.pid, signal.SIGKILL)
        old.process.wait(timeout=10)
        server = PrivateServer(name, spawn(old.args, old.log_path, env=old.env), old.args, old.log_path, old.env,
                               old.port)
        self.servers = [server if s.name == name else s for s in self.servers]
        return server

    def _start_redis(self) -> str:
        server = shutil.which("redis-server")
        if server is None:
            raise InfrastructureError("no Redis on 6379 and no redis-server installed (run scripts/setup-system.sh)")
        port = free_port()
        data = self.run_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        self._spawn("private-redis", [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(data)], data / "redis.log", port)
        self._wait(port, 15, "Redis")
        return f"redis://127.0.0.1:{port}/0"

    def _start_rabbitmq(self, timeout: float) -> str:
        server = shutil.which("rabbitmq-server") or "/usr/sbin/rabbitmq-server"
        if not Path(server).exists():
            raise InfrastructureError(
                "no RabbitMQ on 5672 and no rabbitmq-server installed (run scripts/setup-system.sh)"
            )
        port = free_port()
        base = self.run_dir / "rabbitmq"
        base.mkdir(parents=True, exist_ok=True)
        (base / "enabled_plugins").write_text("[].\n")
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": f"cms{port}@localhost",
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(base / "rabbit.pid"),
        }
        self._spawn("private-rabbitmq", [server], base / "server.log", port, env)
        self._wait(port, timeout, "RabbitMQ")
        return f"amqp://guest:guest@127.0.0.1:{port}/"

    def _spawn(self, name: str, args: list[str], log_path: Path, port: int, env: dict[str, str] | None = None) -> None:
        self.servers.append(PrivateServer(name, spawn(args, log_path, env=env), args, log_path, env, port))

    def _wait(self, port: int, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_open(port):
                return
            if self._abort():
                raise InfrastructureError(f"stop requested while waiting for the private {what}")
            if any(s.returncode() is not None for s in self.servers):
                raise InfrastructureError(f"private {what} exited at start; see {self.run_dir}")
            time.sleep(0.2)
        raise InfrastructureError(f"private {what} did not listen on {port} within {timeout:.0f}s")

    def stop(self) -> None:
        for server in reversed(self.servers):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
        for server in reversed(self.servers):
            try:
                server.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.pid, signal.SIGKILL)
                server.process.wait(timeout=5)
        self.servers.clear()
