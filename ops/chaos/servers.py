"""Private RabbitMQ and Redis servers that a chaos run may stop and restart at will.

Each keeps its port (and RabbitMQ its node name and data directory) across restarts, as a
restarted production server does, so clients reconnect to the same address. They are started
in their own process groups under the run directory and only ever stopped by the run that
started them: the machine's shared servers on 5672/6379 are never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from local_cluster.infra import InfrastructureError, free_port, port_open

RABBIT_SCRIPT = "/usr/lib/rabbitmq/bin/rabbitmq-server"


class PrivateServer:
    name = "server"

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def _command(self) -> tuple[list[str], dict[str, str] | None]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        args, env = self._command()
        with open(self.run_dir / "server.log", "ab") as out:
            self._process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_open(self.port):
                return
            if self._process.poll() is not None:
                raise InfrastructureError(f"private {self.name} exited at start; see {self.run_dir}/server.log")
            time.sleep(0.2)
        raise InfrastructureError(f"private {self.name} did not listen on {self.port} within {timeout:.0f}s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        # The port must be free again before a restart binds it.
        deadline = time.monotonic() + 10
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)

    def restart(self, timeout: float = 60.0) -> None:
        self.stop()
        self.start(timeout)
        self.restarts += 1


class PrivateRedis(PrivateServer):
    """Redis that keeps nothing on disk: a restart comes back empty, as a cache-style Redis does."""

    name = "Redis"

    def _command(self) -> tuple[list[str], dict[str, str] | None]:
        server = shutil.which("redis-server")
        if server is None:
            raise InfrastructureError("redis-server is not installed (run scripts/setup-system.sh)")
        return [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.run_dir)], None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class PrivateRabbit(PrivateServer):
    """RabbitMQ with its own node name, ports and data directory (durable objects survive a restart)."""

    name = "RabbitMQ"

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir)
        self.dist_port = free_port()
        self.node_name = f"chaos{self.port}@localhost"

    def _command(self) -> tuple[list[str], dict[str, str] | None]:
        # Debian's /usr/sbin wrapper switches to the rabbitmq user when run as root, which then cannot
        # write under a private run directory; the script behind it runs as whoever starts it.
        server = next((p for p in (RABBIT_SCRIPT, shutil.which("rabbitmq-server")) if p and Path(p).exists()), "")
        if not server:
            raise InfrastructureError("rabbitmq-server is not installed (run scripts/setup-system.sh)")
        plugins = self.run_dir / "enabled_plugins"
        plugins.write_text("[].\n")
        # Our own config and env files: the machine's may name 5672 and its node name.
        config = self.run_dir / "rabbitmq.conf"
        config.write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        env_file = self.run_dir / "rabbitmq-env.conf"
        env_file.write_text("ERL_EPMD_ADDRESS=127.0.0.1\n")
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node_name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.run_dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.run_dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_CONF_ENV_FILE": str(env_file),
            "RABBITMQ_PID_FILE": str(self.run_dir / "rabbit.pid"),
            "HOME": str(self.run_dir),  # its own Erlang cookie
        }
        return [server], env

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"
