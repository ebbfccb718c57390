"""The whole production topology on one machine's loopback, for `make run` and the tests.

    simulator (or the PBX in CONFIG) -> ami_gateway -> RabbitMQ -> ws_node x N -> HAProxy

RabbitMQ and Redis already listening on their default ports are reused (each run keeps to its
own namespace prefix); otherwise private instances are started under the run directory. Every
child runs in its own process group, so stopping kills exactly what was started, children
included, and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balancer.cluster import ClusterDescription, Node
from balancer.haproxy_ctl import check_config, find_haproxy
from balancer.render import render_config
from local_cluster.infra import DEFAULT_AMQP_URL, DEFAULT_REDIS_URL, Infrastructure, free_port, port_open
from services.config import load_settings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent


class LaunchError(RuntimeError):
    pass


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback URLs we built
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


@dataclass
class ClusterOptions:
    run_dir: Path = ROOT / ".run"
    prefix: str = ""
    config: Path | None = None
    nodes: int = 2
    haproxy_port: int = 2013
    node_ports: tuple[int, ...] = ()
    gateway_metrics_port: int = 9101
    stats_port: int = 8404
    ami_port: int = 5038
    simulator_control_port: int = 5039
    demo: bool = True
    demo_lines: str = "305,306,307,308"
    amqp_url: str = DEFAULT_AMQP_URL
    redis_url: str = DEFAULT_REDIS_URL
    deployment_key: str = ""
    #: shared by every node so a SignalR token from /negotiate on one node is valid on all
    signalr_token_secret: str = ""
    allowed_origins: tuple[str, ...] = ()
    log_json: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def ephemeral(cls, run_dir: Path, **overrides: Any) -> ClusterOptions:
        """Options for a test run: free ports everywhere and a unique namespace."""
        options = cls(
            run_dir=run_dir,
            prefix=f"t{uuid.uuid4().hex[:10]}",
            haproxy_port=free_port(),
            node_ports=(free_port(), free_port()),
            gateway_metrics_port=free_port(),
            stats_port=free_port(),
            ami_port=free_port(),
            simulator_control_port=free_port(),
            demo=False,
        )
        for key, value in overrides.items():
            setattr(options, key, value)
        return options


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    args: list[str]
    env: dict[str, str] | None

    def alive(self) -> bool:
        return self.process.poll() is None


class LocalCluster:
    def __init__(self, options: ClusterOptions) -> None:
        self.options = options
        self.prefix = options.prefix or "cms"
        self.run_dir = options.run_dir
        self.children: list[Child] = []
        self.node_ports: list[int] = list(options.node_ports) or [2101 + i for i in range(options.nodes)]
        if len(self.node_ports) < options.nodes:
            raise LaunchError("fewer node ports than nodes")
        self.node_ports = self.node_ports[: options.nodes]
        self.amqp_url = options.amqp_url
        self.redis_url = options.redis_url
        self.uses_simulator = True
        self.settings_path = self.run_dir / f"appsettings-{self.prefix}.json"
        self._infra: Infrastructure | None = None
        self.signalr_token_secret = options.signalr_token_secret or secrets.token_urlsafe(32)

    # ---- start -------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._ensure_infrastructure()
            self._write_settings()
            if self.uses_simulator:
                self._start_simulator()
                self._wait(lambda: port_open(self.options.ami_port), deadline, "simulator AMI port")
            self._spawn(
                "gateway",
                [sys.executable, "-m", "ami_gateway", "--config", str(self.settings_path),
                 "--metrics-port", str(self.options.gateway_metrics_port), *self._log_flags()],
            )
            for index, port in enumerate(self.node_ports):
                self.start_node(index, port)
            self._start_haproxy()
            self._wait(self._gateway_ready, deadline, "gateway /health")
            for port in self.node_ports:
                self._wait(lambda p=port: self._node_ready(p), deadline, f"node :{port} /health")
            self._wait(self._haproxy_ready, deadline, "HAProxy marking the nodes up")
        except BaseException:
            self.stop()
            raise

    def _log_flags(self) -> list[str]:
        return ["--log-json"] if self.options.log_json else []

    def start_node(self, index: int, port: int) -> Child:
        args = [sys.executable, "-m", "ws_node", "--config", str(self.settings_path), "--port", str(port),
                "--node-id", f"{self.prefix}-n{index + 1}-{uuid.uuid4().hex[:4]}", "--drain-seconds", "2",
                *self._log_flags()]
        # Secrets go through the environment: a command line is visible to every user in `ps`.
        env = {"CMS_NODE_SIGNALR_TOKEN_SECRET": self.signalr_token_secret}
        if self.options.deployment_key:
            env["CMS_NODE_KEY"] = self.options.deployment_key
        if self.options.allowed_origins:
            env["CMS_NODE_ALLOWED_ORIGINS"] = ",".join(self.options.allowed_origins)
        return self._spawn(f"node{index + 1}", args, env)

    def _ensure_infrastructure(self) -> None:
        """Reuse RabbitMQ/Redis given in the options or listening on the default ports; else start private ones."""
        if self.amqp_url != DEFAULT_AMQP_URL or self.redis_url != DEFAULT_REDIS_URL:
            return
        self._infra = Infrastructure(self.run_dir / "infra")
        self._infra.start()
        self.amqp_url, self.redis_url = self._infra.amqp_url, self._infra.redis_url

    def _write_settings(self) -> None:
        document: dict[str, Any]
        if self.options.config is not None:
            document = json.loads(self.options.config.read_text(encoding="utf-8-sig"))
            settings = load_settings(self.options.config)
            self.uses_simulator = not (settings.asterisk.url or settings.asterisk.file_path)
        else:
            document = {}
        if self.uses_simulator:
            # The administrator's list of allowed contexts (docs/security.md) holds for the simulator too.
            given = next((v for k, v in document.items() if k.lower() == "asterisk" and isinstance(v, dict)), {})
            allowed = next((v for k, v in given.items() if k.lower() == "allowedoriginatecontexts"), "")
            document = {k: v for k, v in document.items() if k.lower() != "asterisk"}
            document["Asterisk"] = {
                "allowedOriginateContexts": allowed,
                "url": "127.0.0.1",
                "port": str(self.options.ami_port),
                "userName": "cms",
                "secret": "simulator-secret",
                "originateContext": "from-internal",
                "queueExtensionFormat": "Local/{0}@from-queue/n",
                "protocol": "SIP",
                "asyncOriginate": "true",
                "sendRingStartedOnRingingState": "true",
                "autoPauseOnCommutationStart": "false",
                "traceQueuesState": "false",
                "packetInfoConfig": "",
                "filePath": "",
                # The simulator has Asterisk's default parking lot, so hold/resume work in the demo.
                "parkingLotContext": "parkedcalls",
            }
        document["Cluster"] = {"amqpUrl": self.amqp_url, "redisUrl": self.redis_url, "prefix": self.prefix}
        self.settings_path.write_text(json.dumps(document, indent=2))
        self.settings_path.chmod(0o600)
        load_settings(self.settings_path)  # fail here, with the key named, not in a child

    def _start_simulator(self) -> None:
        args = [sys.executable, "-m", "ami_simulator", "--port", str(self.options.ami_port),
                "--control-port", str(self.options.simulator_control_port),
                "--username", "cms", "--secret", "simulator-secret"]
        if self.options.demo:
            args += ["--demo-lines", self.options.demo_lines, "--loop"]
        self._spawn("simulator", args)

    def _start_haproxy(self) -> None:
        description = ClusterDescription(
            nodes=tuple(Node(name=f"node{i + 1}", host="127.0.0.1", port=p) for i, p in enumerate(self.node_ports)),
            bind="127.0.0.1",
            ws_port=self.options.haproxy_port,
            tls_cert=None,
            deployment_key=self.options.deployment_key or None,
            allowed_origins=self.options.allowed_origins,
            stats_port=self.options.stats_port,
            runtime_socket=self.run_dir / f"haproxy-{self.prefix}.sock",
            pidfile=self.run_dir / f"haproxy-{self.prefix}.pid",
            master_worker=False,
            maxconn=_haproxy_maxconn(),
        )
        config = self.run_dir / f"haproxy-{self.prefix}.cfg"
        config.write_text(render_config(description))
        check_config(config)
        self._spawn("haproxy", [find_haproxy(), "-db", "-f", str(config)])

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Child:
        log_path = self.run_dir / f"{self.prefix}-{name}.log"
        full_env = {**os.environ, **self.options.extra_env, **(env or {})}
        full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        with open(log_path, "ab") as out:
            process = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env, start_new_session=True
            )
        child = Child(name, process, log_path, args, env)
        self.children = [c for c in self.children if c.name != name] + [child]
        return child

    def _wait(self, ready: Any, deadline: float, what: str) -> None:
        while time.monotonic() < deadline:
            dead = [c for c in self.children if not c.alive()]
            if dead:
                tail = dead[0].log_path.read_text(errors="replace")[-3000:]
                raise LaunchError(f"{dead[0].name} exited while waiting for {what}:\n{tail}")
            if ready():
                return
            time.sleep(0.1)
        raise LaunchError(f"timed out waiting for {what}")

    def _gateway_ready(self) -> bool:
        return self._healthy(self.options.gateway_metrics_port)

    def _node_ready(self, port: int) -> bool:
        return self._healthy(port)

    @staticmethod
    def _healthy(port: int) -> bool:
        try:
            status, _ = http_get(f"http://127.0.0.1:{port}/health", timeout=0.5)
        except OSError:
            return False
        return status == 200

    def _haproxy_ready(self) -> bool:
        try:
            status, body = http_get(f"http://127.0.0.1:{self.options.stats_port}/stats;csv", timeout=0.5)
        except OSError:
            return False
        if status != 200:
            return False
        up = [row for row in body.decode().splitlines() if row.startswith("ws_nodes,node") and ",UP," in row]
        return len(up) == len(self.node_ports)

    # ---- control -----------------------------------------------------------------------------

    def child(self, name: str) -> Child:
        for c in self.children:
            if c.name == name:
                return c
        raise KeyError(name)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        child = self.child(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.process.pid, sig)
        child.process.wait(timeout=10)

    def restart(self, name: str, timeout: float = 30.0) -> Child:
        """Start a stopped (or killed) child again with its original command line; wait for /health."""
        old = self.child(name)
        if old.alive():
            self.kill(name, signal.SIGTERM)
        child = self._spawn(name, old.args, old.env)
        if name == "gateway":
            self._wait(self._gateway_ready, time.monotonic() + timeout, "gateway /health after restart")
        return child

    def play(self, scenario: str, **variables: str) -> dict[str, Any]:
        body = json.dumps({"scenario": scenario, "vars": variables}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.options.simulator_control_port}/play", data=body, method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
            result: dict[str, Any] = json.loads(response.read())
            return result

    @property
    def client_url(self) -> str:
        key = f"/?key={self.options.deployment_key}" if self.options.deployment_key else "/"
        return f"ws://127.0.0.1:{self.options.haproxy_port}{key}"

    @property
    def signalr_url(self) -> str:
        key = f"?key={self.options.deployment_key}" if self.options.deployment_key else ""
        return f"http://127.0.0.1:{self.options.haproxy_port}/{key}"

    def urls(self) -> dict[str, str]:
        urls = {
            "client, Creatio 7.x (raw WebSocket)": self.client_url,
            "client, Creatio 8.x (SignalR)": self.signalr_url,
            "agent console (demo line 305)": f"http://127.0.0.1:{self.options.haproxy_port}/console?line=305"
            + (f"&key={self.options.deployment_key}" if self.options.deployment_key else ""),
            "HAProxy stats": f"http://127.0.0.1:{self.options.stats_port}/stats",
            "HAProxy metrics": f"http://127.0.0.1:{self.options.stats_port}/metrics",
            "gateway metrics": f"http://127.0.0.1:{self.options.gateway_metrics_port}/metrics",
        }
        for i, port in enumerate(self.node_ports):
            urls[f"node{i + 1} metrics"] = f"http://127.0.0.1:{port}/metrics"
        if self.uses_simulator:
            urls["simulator calls (ground truth)"] = f"http://127.0.0.1:{self.options.simulator_control_port}/calls"
            urls["simulator metrics"] = f"http://127.0.0.1:{self.options.simulator_control_port}/metrics"
        return urls

    # ---- stop --------------------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every child (newest first, so nodes drain before the broker goes), then SIGKILL."""
        for child in reversed(self.children):
            if child.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in reversed(self.children):
            remaining = max(0.1, deadline - time.monotonic())
            try:
                child.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait(timeout=5)
        self.children.clear()
        self._cleanup_namespace()
        if self._infra is not None:
            self._infra.stop()
            self._infra = None

    def _cleanup_namespace(self) -> None:
        """Test runs leave nothing behind in the shared Redis; queues are exclusive/auto-delete."""
        if not self.options.prefix or self.options.prefix == "cms":
            return
        try:
            import redis

            client = redis.Redis.from_url(self.redis_url)
            keys = list(client.scan_iter(f"{self.prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()
        except Exception as exc:  # cleanup is best effort; the test already has its verdict
            log.warning("could not clean Redis namespace %s: %s", self.prefix, exc)
        try:
            asyncio.run(_delete_broker_objects(self.amqp_url, self.prefix))
        except Exception as exc:
            log.warning("could not clean RabbitMQ namespace %s: %s", self.prefix, exc)


def _haproxy_maxconn() -> int:
    """HAProxy needs two descriptors per proxied connection; stay within what this machine allows."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return 50_000
    return max(1000, min(50_000, hard // 2 - 100))


async def _delete_broker_objects(amqp_url: str, prefix: str) -> None:
    import aio_pika

    from services.topology import Topology

    topology = Topology(prefix)
    connection = await aio_pika.connect(amqp_url, timeout=5)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(topology.commands_queue)
        await channel.exchange_delete(topology.events_exchange)
