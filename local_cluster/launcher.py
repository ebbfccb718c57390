"""The whole production topology on one machine's loopback, for `make run` and the tests.

    simulator (or the PBX in CONFIG) -> ami_gateway -> RabbitMQ -> ws_node x N -> HAProxy

RabbitMQ and Redis already listening on their default ports are reused (each run keeps to its
own namespace prefix); otherwise private instances are started under the run directory. Every
child runs in its own process group, so stopping kills exactly what was started, children
included, and nothing else; each is also armed to die with the launcher (``spawn.py``), so not
even a SIGKILLed launcher leaves one behind.

``LocalCluster`` starts and stops; keeping the processes up while it runs is
``supervisor.Supervisor``'s job (``make run`` uses both; tests that kill a node on purpose use
only the first).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balancer.cluster import ClusterConfigError, ClusterDescription, Node
from balancer.haproxy_ctl import ConfigCheckError, check_config, find_haproxy
from balancer.render import render_config
from local_cluster.infra import (
    DEFAULT_AMQP_URL,
    DEFAULT_REDIS_URL,
    Infrastructure,
    InfrastructureError,
    PrivateServer,
    free_port,
    free_ports,
    port_open,
)
from local_cluster.spawn import spawn
from services.config import AsteriskConfig, load_settings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent


class LaunchError(RuntimeError):
    pass


class LaunchAborted(LaunchError):
    """A stop was requested (SIGTERM, Ctrl-C) while the cluster was still starting."""


class PortTaken(LaunchError):
    pass


@dataclass(frozen=True)
class PortUse:
    """One port the run will listen on, and how the operator chooses another."""

    port: int
    what: str
    flag: str
    env: str


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could not listen on ``port`` (bound the way our servers bind)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


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
    #: gateway processes for the one PBX (more than one needs the gateway's Redis lease: one is active)
    gateways: int = 2
    haproxy_port: int = 2013
    node_ports: tuple[int, ...] = ()
    gateway_metrics_port: int = 9101
    #: one per gateway; default: consecutive ports from ``gateway_metrics_port``
    gateway_metrics_ports: tuple[int, ...] = ()
    stats_port: int = 8404
    #: the launcher's own /metrics (served by ``python -m local_cluster``, not here): 0 = none
    launcher_metrics_port: int = 0
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
    #: start these servers privately (under run_dir/infra, free ports) even when one listens on the
    #: default port: "redis", "rabbitmq". They are supervised like the rest.
    private_servers: tuple[str, ...] = ()
    #: delete the namespace's Redis keys and broker objects at stop: for test runs only, never
    #: for an operator's deployment (its prefix holds the lines' state and history)
    cleanup_namespace: bool = False
    #: play the built-in simulator in place of the PBX that ``config`` names, with that file's own
    #: AMI user and every other setting kept: an admin's production file tried before it meets the PBX
    simulator_instead_of_pbx: bool = False

    @classmethod
    def ephemeral(cls, run_dir: Path, **overrides: Any) -> ClusterOptions:
        """Options for a test run: free ports everywhere and a unique namespace."""
        gateways = int(overrides.get("gateways", 1))
        ports = free_ports(7 + gateways)
        options = cls(
            run_dir=run_dir,
            prefix=f"t{uuid.uuid4().hex[:10]}",
            haproxy_port=ports[0],
            node_ports=(ports[1], ports[2]),
            gateway_metrics_port=ports[3],
            stats_port=ports[4],
            ami_port=ports[5],
            simulator_control_port=ports[6],
            demo=False,
            cleanup_namespace=True,
            gateways=gateways,
        )
        for key, value in overrides.items():
            setattr(options, key, value)
        if "gateway_metrics_ports" not in overrides:
            options.gateway_metrics_ports = (options.gateway_metrics_port, *ports[7:7 + gateways - 1])
        return options


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    args: list[str]
    env: dict[str, str] | None

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def alive(self) -> bool:
        return self.process.poll() is None

    def returncode(self) -> int | None:
        return self.process.poll()


_AMI_DISCONNECTS = re.compile(r'^cms_ami_disconnects_total\{reason="(\w+)"\} ([0-9.e+]+)$', re.MULTILINE)


class LocalCluster:
    def __init__(self, options: ClusterOptions) -> None:
        self.options = options
        self.prefix = options.prefix or "cms"
        # absolute: HAProxy's admin socket lives here, and HAProxy reads a relative socket path as host:port
        self.run_dir = options.run_dir.resolve()
        self.children: list[Child] = []
        if options.nodes < 1 or options.gateways < 1:
            raise LaunchError("a cluster needs at least one node and one gateway")
        self.node_ports: list[int] = list(options.node_ports) or [2101 + i for i in range(options.nodes)]
        if len(self.node_ports) < options.nodes:
            raise LaunchError("fewer node ports than nodes")
        self.node_ports = self.node_ports[: options.nodes]
        self.gateway_ports: list[int] = list(options.gateway_metrics_ports) or [
            options.gateway_metrics_port + i for i in range(options.gateways)
        ]
        # `gateways` raised after ephemeral() picked one port: the others get free ports too.
        while len(self.gateway_ports) < options.gateways:
            self.gateway_ports.append(free_port())
        self.gateway_ports = self.gateway_ports[: options.gateways]
        self.amqp_url = options.amqp_url
        self.redis_url = options.redis_url
        self.uses_simulator = True
        self.pbx: AsteriskConfig | None = None
        self.settings_path = self.run_dir / f"appsettings-{self.prefix}.json"
        self.haproxy_config = self.run_dir / f"haproxy-{self.prefix}.cfg"
        self.processes_path = self.run_dir / f"{self.prefix}-processes.json"
        self._generated: list[Path] = []
        self._infra: Infrastructure | None = None
        self._abort: Callable[[], bool] = lambda: False
        #: set at the start of stop(): a supervisor must not start anything any more
        self.stopping = False
        # Held while stop() flips `stopping` and while a supervisor thread respawns: no child may
        # be started behind stop()'s back.
        self._respawn_lock = threading.Lock()
        self.signalr_token_secret = options.signalr_token_secret or secrets.token_urlsafe(32)

    @property
    def gateway_names(self) -> list[str]:
        """``gateway`` first (what a single-gateway run has always called it), then ``gateway2``..."""
        return ["gateway" if i == 0 else f"gateway{i + 1}" for i in range(len(self.gateway_ports))]

    # ---- start -------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0, abort: Callable[[], bool] | None = None) -> None:
        """Start everything and wait until HAProxy has every node UP. ``abort`` is polled while
        waiting: when it turns true (a stop was asked for), what was started is stopped and
        :class:`LaunchAborted` raised."""
        deadline = time.monotonic() + timeout
        self.stopping = False
        if abort is not None:
            self._abort = abort
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._read_config()
            self.check_ports()
            self._ensure_infrastructure()
            self._write_settings()
            if self.uses_simulator:
                self._start_simulator()
                self._wait(lambda: port_open(self.options.ami_port), deadline, "simulator AMI port")
            for name, port in zip(self.gateway_names, self.gateway_ports, strict=True):
                self._spawn(
                    name,
                    [sys.executable, "-m", "ami_gateway", "--config", str(self.settings_path),
                     "--metrics-port", str(port), *self._log_flags()],
                )
            for index, port in enumerate(self.node_ports):
                self.start_node(index, port)
            self._start_haproxy()
            self._wait(self._gateways_ready, deadline, "gateway /health")
            for port in self.node_ports:
                self._wait(functools.partial(self._node_ready, port), deadline, f"node :{port} /health")
            self._wait(self._haproxy_ready, deadline, "HAProxy marking the nodes up")
        except BaseException:
            self.stop()
            raise

    def planned_ports(self) -> list[PortUse]:
        """Every port this run listens on, with the flag and variable that choose it."""
        ports = [
            PortUse(self.options.haproxy_port, "HAProxy client port", "--port", "CMS_RUN_PORT"),
            PortUse(self.options.stats_port, "HAProxy stats/metrics port", "--stats-port", "CMS_RUN_STATS_PORT"),
        ]
        for i, port in enumerate(self.node_ports):
            ports.append(PortUse(port, f"node{i + 1} port", "--node-port", "CMS_RUN_NODE_PORT"))
        for name, port in zip(self.gateway_names, self.gateway_ports, strict=True):
            ports.append(PortUse(port, f"{name} metrics port", "--gateway-metrics-port",
                                 "CMS_RUN_GATEWAY_METRICS_PORT"))
        if self.options.launcher_metrics_port:
            ports.append(PortUse(self.options.launcher_metrics_port, "launcher metrics port", "--metrics-port",
                                 "CMS_RUN_METRICS_PORT"))
        if self.uses_simulator:
            ports.append(PortUse(self.options.ami_port, "simulator AMI port", "--ami-port", "CMS_RUN_AMI_PORT"))
            ports.append(PortUse(self.options.simulator_control_port, "simulator control port",
                                 "--simulator-control-port", "CMS_RUN_SIMULATOR_CONTROL_PORT"))
        return ports

    def check_ports(self) -> None:
        """Fail before starting anything when a port is taken, naming it and how to pick another."""
        seen: dict[int, str] = {}
        for use in self.planned_ports():
            if use.port in seen:
                raise PortTaken(f"port {use.port} is given to both the {seen[use.port]} and the {use.what}; "
                                f"choose another with {use.flag} N (or {use.env}=N)")
            seen[use.port] = use.what
            if port_taken(use.port):
                raise PortTaken(
                    f"port {use.port} ({use.what}) is taken by another program, maybe another `make run`; "
                    f"choose another with {use.flag} N (make run RUN_ARGS='{use.flag} N', or {use.env}=N), "
                    "or let every port be picked free with --auto-ports"
                )

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
        """Private RabbitMQ/Redis when asked for (``private_servers``), or when the URL is the
        default and nothing listens there; otherwise the given servers, which must answer."""
        private = set(self.options.private_servers)
        need_redis = "redis" in private or (self.redis_url == DEFAULT_REDIS_URL and not port_open(6379))
        need_rabbitmq = "rabbitmq" in private or (self.amqp_url == DEFAULT_AMQP_URL and not port_open(5672))
        if need_redis or need_rabbitmq:
            self._infra = Infrastructure(self.run_dir / "infra")
            try:
                self._infra.start(abort=self._abort, redis=need_redis, rabbitmq=need_rabbitmq)
            except InfrastructureError as exc:
                raise (LaunchAborted if self._abort() else LaunchError)(str(exc)) from None
            if need_redis:
                self.redis_url = self._infra.redis_url
            if need_rabbitmq:
                self.amqp_url = self._infra.amqp_url
        self._check_reachable()

    def _check_reachable(self) -> None:
        """A configured broker or Redis that does not answer is named now, not after a 60 s wait."""
        from urllib.parse import urlsplit

        for what, url, key, env in (("RabbitMQ", self.amqp_url, "Cluster.amqpUrl", "CMS_AMQP_URL"),
                                    ("Redis", self.redis_url, "Cluster.redisUrl", "CMS_REDIS_URL")):
            parts = urlsplit(url)
            if parts.scheme in ("unix", "redis+sentinel", "rediss+sentinel"):
                continue  # a Sentinel list is several addresses: the processes report which answer
            host = parts.hostname or "127.0.0.1"
            port = parts.port or {"amqp": 5672, "amqps": 5671}.get(parts.scheme, 6379)
            if not port_open(port, host, timeout=2.0):
                source = f"{key} in {self.options.config}" if self.options.config else f"{env} or {key}"
                raise LaunchError(f"{what} at {host}:{port} ({source}) does not answer; start it, or fix the URL "
                                  f"(leave both URLs out to use the local ones or private instances)")

    def _read_config(self) -> None:
        """Which PBX: the one the admin's file names, or the built-in simulator. ConfigError
        (naming file, line or key) propagates to the caller unchanged."""
        if self.options.config is None:
            return
        settings = load_settings(self.options.config)
        self.pbx = settings.asterisk
        self.uses_simulator = self.options.simulator_instead_of_pbx or not (
            settings.asterisk.url or settings.asterisk.file_path
        )

    def _write_settings(self) -> None:
        if not self.uses_simulator and self.options.config is not None:
            # The admin's own file, as it is (JSON or the .NET service's XML): our Cluster settings
            # reach the children through CMS_AMQP_URL/CMS_REDIS_URL/CMS_PREFIX, which override it.
            self.settings_path = self.options.config.resolve()
            return
        document: dict[str, Any] = {}
        if self.options.config is not None:
            with contextlib.suppress(ValueError):  # not JSON (XML): we only take its Cluster block
                loaded = json.loads(self.options.config.read_text(encoding="utf-8-sig"))
                if isinstance(loaded, dict):
                    document = loaded
            _drop_blocks(document, ("asterisk", "cluster"))
        if self.options.simulator_instead_of_pbx and self.pbx is not None:
            # Every setting of the admin's file (JSON or XML) but where the PBX is.
            document["Asterisk"] = {**_cms_block(self.pbx), "url": "127.0.0.1", "port": str(self.options.ami_port),
                                    "filePath": ""}
        else:
            document["Asterisk"] = {
                # The administrator's list of allowed contexts (docs/security.md) holds for the simulator too.
                "allowedOriginateContexts": ",".join(self.pbx.allowed_originate_contexts) if self.pbx else "",
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
        _write_private(self.settings_path, json.dumps(document, indent=2))
        self._generated.append(self.settings_path)
        load_settings(self.settings_path, env={})  # fail here, with the key named, not in a child

    def _start_simulator(self) -> None:
        user, secret, tech = "cms", "simulator-secret", "SIP"
        if self.options.simulator_instead_of_pbx and self.pbx is not None:
            user, secret = self.pbx.user_name, self.pbx.secret
            tech = "PJSIP" if self.pbx.protocol.split(",")[0].upper() == "PJSIP" else "SIP"
        args = [sys.executable, "-m", "ami_simulator", "--port", str(self.options.ami_port),
                "--control-port", str(self.options.simulator_control_port), "--username", user, "--tech", tech]
        if self.options.demo:
            args += ["--demo-lines", self.options.demo_lines, "--loop"]
        # The secret through the environment: a command line is visible to every user in `ps`.
        self._spawn("simulator", args, {"AMI_SIMULATOR_SECRET": secret})

    def _start_haproxy(self) -> None:
        try:
            description = self._balancer_description()
        except ClusterConfigError as exc:
            option = "--key (CMS_RUN_KEY)" if exc.key == "deployment_key" else exc.key
            raise LaunchError(f"{option}: {exc.problem}") from None
        # It holds the deployment key: readable by us only, and gone when the run stops.
        _write_private(self.haproxy_config, render_config(description))
        self._generated += [self.haproxy_config, description.runtime_socket, description.pidfile]
        try:
            check_config(self.haproxy_config)
        except ConfigCheckError as exc:
            raise LaunchError(f"HAProxy refused the configuration {self.haproxy_config}: {exc}") from None
        self._spawn("haproxy", [find_haproxy(), "-db", "-f", str(self.haproxy_config)])

    def _balancer_description(self) -> ClusterDescription:
        return ClusterDescription(
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

    def _child_env(self, env: dict[str, str] | None) -> dict[str, str]:
        full_env = {**os.environ, **self.options.extra_env, **(env or {})}
        full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        # Where and under which namespace this run works, whatever the config file says.
        full_env.update(CMS_AMQP_URL=self.amqp_url, CMS_REDIS_URL=self.redis_url, CMS_PREFIX=self.prefix)
        return full_env

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Child:
        log_path = self.run_dir / f"{self.prefix}-{name}.log"
        process = spawn(args, log_path, env=self._child_env(env), cwd=ROOT)
        child = Child(name, process, log_path, args, env)
        self.children = [c for c in self.children if c.name != name] + [child]
        self._write_processes()
        return child

    def _write_processes(self) -> None:
        """name -> pid of every child, for operators and tests (which check that none survives)."""
        pids = {c.name: c.pid for c in self.children}
        if self._infra is not None:
            pids.update(self._infra.pids())
        _write_private(self.processes_path, json.dumps(pids, indent=1))
        if self.processes_path not in self._generated:
            self._generated.append(self.processes_path)

    def _wait(self, ready: Callable[[], bool], deadline: float, what: str) -> None:
        while time.monotonic() < deadline:
            if self._abort():
                raise LaunchAborted(f"stop requested while waiting for {what}")
            dead = [c for c in self.children if not c.alive()]
            if dead:
                tail = dead[0].log_path.read_text(errors="replace")[-3000:]
                if dead[0].name in self.gateway_names and "login refused" in tail:
                    raise LaunchError(self._login_refused_text())
                raise LaunchError(f"{dead[0].name} exited while waiting for {what}:\n{tail}")
            if ready():
                return
            time.sleep(0.1)
        raise LaunchError(f"timed out waiting for {what}")

    def _gateways_ready(self) -> bool:
        for port in self.gateway_ports:
            self._raise_on_ami_problem(port)
        return all(self._healthy(port) for port in self.gateway_ports)

    def _gateway_ready(self) -> bool:
        return self._healthy(self.gateway_ports[0])

    def _raise_on_ami_problem(self, port: int) -> None:
        """The gateway retries a refused login or an unreachable PBX forever (right for a running
        cluster); at start the admin wants to hear it at once, with the fix."""
        try:
            status, body = http_get(f"http://127.0.0.1:{port}/metrics", timeout=0.5)
        except OSError:
            return
        if status != 200:
            return
        counts = {reason: float(value) for reason, value in _AMI_DISCONNECTS.findall(body.decode(errors="replace"))}
        pbx = self._pbx()
        where = f"{pbx.url}:{pbx.port}"
        source = self.options.config or "the simulator settings"
        if counts.get("auth", 0) > 0:
            raise LaunchError(self._login_refused_text())
        if counts.get("connect", 0) >= 3:
            raise LaunchError(
                f"the PBX's AMI at {where} does not answer ({int(counts['connect'])} tries; "
                f"Asterisk.url/port in {source}); check the host and port, and that manager.conf has "
                "enabled = yes and a bindaddr/port reachable from here"
            )

    def _pbx(self) -> AsteriskConfig:
        return self.pbx or AsteriskConfig(url="127.0.0.1", port=self.options.ami_port, user_name="cms")

    def _login_refused_text(self) -> str:
        pbx = self._pbx()
        hint = "Asterisk.secret is empty" if not pbx.secret else "userName/secret do not match"
        return (
            f"the PBX at {pbx.url}:{pbx.port} refused the AMI login of user {pbx.user_name!r} ({hint} in "
            f"{self.options.config or 'the simulator settings'}); in /etc/asterisk/manager.conf the "
            f"[{pbx.user_name}] section needs the same secret, a permit= that allows this host, "
            "read = call,agent and write = call,agent,originate; then run `asterisk -rx \"manager reload\"`"
        )

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

    # ---- supervision (see supervisor.py) -----------------------------------------------------

    def supervised(self) -> list[Child | PrivateServer]:
        """Every process of the run, the private RabbitMQ/Redis included (when it started them)."""
        servers = self._infra.servers if self._infra is not None else []
        return [*servers, *self.children]

    def _private_server(self, name: str) -> PrivateServer | None:
        servers = self._infra.servers if self._infra is not None else []
        return next((s for s in servers if s.name == name), None)

    def respawn(self, name: str) -> Child | PrivateServer:
        """Start a dead child again with its original command line (its process group is
        SIGKILLed first: nothing of the old one may hold its port). Does not wait."""
        with self._respawn_lock:
            if self.stopping:
                raise LaunchError(f"not restarting {name}: the cluster is stopping")
            server = self._private_server(name)
            if server is not None and self._infra is not None:
                restarted = self._infra.respawn(name)
                self._write_processes()
                return restarted
            old = self.child(name)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(old.pid, signal.SIGKILL)
            if old.alive():
                old.process.wait(timeout=10)
            return self._spawn(name, old.args, old.env)

    def ready(self, name: str) -> bool:
        """Serving again: /health for gateways and nodes, HAProxy's stats, the simulator's AMI port."""
        if name in self.gateway_names:
            return self._healthy(self.gateway_ports[self.gateway_names.index(name)])
        if name.startswith("node"):
            return self._healthy(self.node_ports[int(name[4:]) - 1])
        if name == "haproxy":
            return self._haproxy_ready()
        if name == "simulator":
            return port_open(self.options.ami_port)
        server = self._private_server(name)
        if server is not None:
            return port_open(server.port)
        return self.child(name).alive()

    def log_path(self, name: str) -> str:
        server = self._private_server(name)
        return str(server.log_path if server is not None else self.child(name).log_path)

    # ---- control -----------------------------------------------------------------------------

    def child(self, name: str) -> Child:
        for c in self.children:
            if c.name == name:
                return c
        raise KeyError(name)

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Signal a child's process group and wait for it; one that outlives ``timeout`` (a SIGTERM it does not
        finish draining for) is SIGKILLed, as any supervisor would."""
        child = self.child(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.process.pid, sig)
        try:
            child.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if sig == signal.SIGKILL:
                raise
            log.warning("%s (pid %d) did not stop within %.0fs of signal %d; killing it", name, child.process.pid,
                        timeout, sig)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait(timeout=timeout)

    def restart(self, name: str, timeout: float = 30.0, *, wait: bool = True) -> Child:
        """Start a stopped (or killed) child again with its original command line; wait for a gateway's
        /health unless ``wait`` is False (several stopped children restarted together: the wait gives up
        when any child is down)."""
        old = self.child(name)
        if old.alive():
            self.kill(name, signal.SIGTERM)
        child = self._spawn(name, old.args, old.env)
        if wait and name in self.gateway_names:
            port = self.gateway_ports[self.gateway_names.index(name)]
            self._wait(lambda: self._healthy(port), time.monotonic() + timeout, f"{name} /health after restart")
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
            "cluster status page": f"http://127.0.0.1:{self.options.haproxy_port}/status"
            + (f"?key={self.options.deployment_key}" if self.options.deployment_key else ""),
            "HAProxy stats": f"http://127.0.0.1:{self.options.stats_port}/stats",
            "HAProxy metrics": f"http://127.0.0.1:{self.options.stats_port}/metrics",
        }
        for name, port in zip(self.gateway_names, self.gateway_ports, strict=True):
            urls[f"{name} metrics"] = f"http://127.0.0.1:{port}/metrics"
        for i, port in enumerate(self.node_ports):
            urls[f"node{i + 1} metrics"] = f"http://127.0.0.1:{port}/metrics"
        if self.uses_simulator:
            urls["simulator calls (ground truth)"] = f"http://127.0.0.1:{self.options.simulator_control_port}/calls"
            urls["simulator metrics"] = f"http://127.0.0.1:{self.options.simulator_control_port}/metrics"
        return urls

    # ---- stop --------------------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every child (newest first, so nodes drain before the broker goes), then SIGKILL
        what is still there at the deadline. Idempotent."""
        with self._respawn_lock:
            self.stopping = True
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
                log.warning("%s (pid %d) did not stop within %.0fs; killing it", child.name, child.pid, timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait(timeout=5)
            # A child's own children (its process group) go with it, even if it left them behind.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.process.pid, signal.SIGKILL)
        self.children.clear()
        if self.options.cleanup_namespace:
            self._cleanup_namespace()
        if self._infra is not None:
            self._infra.stop()
            self._infra = None
        for path in self._generated:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._generated.clear()

    def _cleanup_namespace(self) -> None:
        """Test runs leave nothing behind in the shared Redis; queues are exclusive/auto-delete."""
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
            asyncio.run(delete_broker_objects(self.amqp_url, self.prefix))
        except Exception as exc:
            log.warning("could not clean RabbitMQ namespace %s: %s", self.prefix, exc)


def _drop_blocks(document: dict[str, Any], names: tuple[str, ...]) -> None:
    """Remove every block with one of these names (any case, any depth): the config loader finds
    a block wherever it is, so a nested one would win over the one we put at the top."""
    for key in list(document):
        if key.lower() in names:
            del document[key]
        elif isinstance(document[key], dict):
            _drop_blocks(document[key], names)


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only, from its creation on (it may hold a secret)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def _haproxy_maxconn() -> int:
    """HAProxy needs two descriptors per proxied connection; stay within what this machine allows."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return 50_000
    return max(1000, min(50_000, hard // 2 - 100))


async def delete_broker_objects(amqp_url: str, prefix: str) -> None:
    import aio_pika

    from services.topology import Topology

    topology = Topology(prefix)
    connection = await aio_pika.connect(amqp_url, timeout=5)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(topology.commands_queue)
        await channel.exchange_delete(topology.events_exchange)


def _cms_block(pbx: AsteriskConfig) -> dict[str, str]:
    """The Asterisk block in CMS's own spelling, from settings read from any CMS file."""
    flag = {True: "true", False: "false"}
    return {
        "url": pbx.url, "port": str(pbx.port), "userName": pbx.user_name, "secret": pbx.secret,
        "originateContext": pbx.originate_context, "queueExtensionFormat": pbx.queue_extension_format,
        "protocol": pbx.protocol, "asyncOriginate": flag[pbx.async_originate],
        "sendRingStartedOnRingingState": flag[pbx.send_ring_started_on_ringing_state],
        "autoPauseOnCommutationStart": flag[pbx.auto_pause_on_commutation_start],
        "traceQueuesState": flag[pbx.trace_queues_state], "packetInfoConfig": pbx.packet_info_config,
        "filePath": pbx.file_path, "parkingLotContext": pbx.parking_lot_context,
        "allowedOriginateContexts": ",".join(pbx.allowed_originate_contexts),
    }
