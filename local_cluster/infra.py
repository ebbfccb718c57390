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


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Infrastructure:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.amqp_url = DEFAULT_AMQP_URL
        self.redis_url = DEFAULT_REDIS_URL
        self._processes: list[subprocess.Popen[bytes]] = []
        self._names: list[str] = []
        self._abort: Callable[[], bool] = lambda: False

    def start(self, timeout: float = 90.0, abort: Callable[[], bool] | None = None) -> None:
        """``abort`` is polled while waiting for a private server: true stops the wait with an error."""
        if abort is not None:
            self._abort = abort
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not port_open(6379):
            self.redis_url = self._start_redis()
        if not port_open(5672):
            self.amqp_url = self._start_rabbitmq(timeout)

    def pids(self) -> dict[str, int]:
        """The private servers this instance started, by name."""
        return {name: p.pid for name, p in zip(self._names, self._processes, strict=True) if p.poll() is None}

    def _start_redis(self) -> str:
        server = shutil.which("redis-server")
        if server is None:
            raise InfrastructureError("no Redis on 6379 and no redis-server installed (run scripts/setup-system.sh)")
        port = free_port()
        data = self.run_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        self._spawn([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                     "--dir", str(data)], data / "redis.log")
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
        self._spawn([server], base / "server.log", env)
        self._wait(port, timeout, "RabbitMQ")
        return f"amqp://guest:guest@127.0.0.1:{port}/"

    def _spawn(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self._processes.append(spawn(args, log_path, env=env))
        self._names.append("private-" + Path(args[0]).name)

    def _wait(self, port: int, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_open(port):
                return
            if self._abort():
                raise InfrastructureError(f"stop requested while waiting for the private {what}")
            if any(p.poll() is not None for p in self._processes):
                raise InfrastructureError(f"private {what} exited at start; see {self.run_dir}")
            time.sleep(0.2)
        raise InfrastructureError(f"private {what} did not listen on {port} within {timeout:.0f}s")

    def stop(self) -> None:
        for process in reversed(self._processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self._processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        self._processes.clear()
        self._names.clear()
