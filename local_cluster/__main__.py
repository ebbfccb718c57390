"""``python -m local_cluster [--config appsettings.json]``: run the whole cluster on loopback
until Ctrl-C / SIGTERM (what `make run` calls), restarting any process that dies.

Signals only set a flag (and wake the main loop through a wakeup fd): a handler that takes a
lock deadlocks when a second signal lands inside the first, which is exactly what a SIGTERM to
make's process group does (it reaches the launcher directly and again through make).
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from wsgiref.simple_server import WSGIServer

from local_cluster.infra import free_ports
from local_cluster.launcher import (
    ClusterOptions,
    LaunchAborted,
    LaunchError,
    LocalCluster,
    PortTaken,
)
from local_cluster.supervisor import Supervisor
from services.config import ConfigError, load_settings

log = logging.getLogger("local_cluster")

#: flag, environment variable, default, what: every port `make run` listens on
PORT_FLAGS: tuple[tuple[str, str, int, str], ...] = (
    ("--port", "CMS_RUN_PORT", 2013, "HAProxy client port (ws:// and http:// for Creatio)"),
    ("--stats-port", "CMS_RUN_STATS_PORT", 8404, "HAProxy stats and metrics"),
    ("--node-port", "CMS_RUN_NODE_PORT", 2101, "first node's port; node N listens on this + N-1"),
    ("--gateway-metrics-port", "CMS_RUN_GATEWAY_METRICS_PORT", 9101,
     "first gateway's /metrics and /health; gateway N on this + N-1"),
    ("--ami-port", "CMS_RUN_AMI_PORT", 5038, "built-in simulator's AMI port"),
    ("--simulator-control-port", "CMS_RUN_SIMULATOR_CONTROL_PORT", 5039, "built-in simulator's control API"),
    ("--metrics-port", "CMS_RUN_METRICS_PORT", 9190, "the launcher's own /metrics (restarts per process)"),
)


class StopFlag:
    """Set from signal handlers: a plain counter and a byte on a wakeup socket, no lock anywhere."""

    def __init__(self) -> None:
        self.signals = 0
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def install(self) -> None:
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1

    def close(self) -> None:
        """Tests only: the launcher keeps its flag until it exits."""
        signal.set_wakeup_fd(-1)
        self._reader.close()
        self._writer.close()

    def is_set(self) -> bool:
        return self.signals > 0

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout`` seconds; a signal ends the sleep at once."""
        select.select([self._reader], [], [], timeout)
        try:
            while self._reader.recv(512):
                pass
        except BlockingIOError:
            pass


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"local_cluster: {name}={value!r} is not a number; give a port such as {default}") from None


def parse_args(argv: list[str] | None, env: Mapping[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="local_cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="CMS appsettings.json naming a real PBX (default: simulator)")
    parser.add_argument("--simulator", action="store_true", default=env.get("CMS_RUN_SIMULATOR", "") in ("1", "yes"),
                        help="play the built-in simulator in place of the PBX in --config, keeping the file's "
                             "AMI user and every other setting [CMS_RUN_SIMULATOR=1]")
    parser.add_argument("--nodes", type=int, default=_env_int(env, "CMS_RUN_NODES", 2))
    parser.add_argument("--gateways", type=int, default=_env_int(env, "CMS_RUN_GATEWAYS", 2),
                        help="gateway processes for the PBX (one active, the others standby)")
    ports = parser.add_argument_group("ports (each also settable by its CMS_RUN_* variable)")
    for flag, variable, default, what in PORT_FLAGS:
        ports.add_argument(flag, type=int, default=_env_int(env, variable, default), help=f"{what} [{variable}]")
    ports.add_argument("--auto-ports", action="store_true", default=env.get("CMS_RUN_AUTO_PORTS", "") in ("1", "yes"),
                       help="pick a free port for everything (printed at start) [CMS_RUN_AUTO_PORTS=1]")
    parser.add_argument("--demo-lines", default=env.get("CMS_RUN_DEMO_LINES", "305,306,307,308"),
                        help="lines the built-in simulator plays demo calls on; empty = no demo traffic")
    parser.add_argument("--private", action="append", choices=("redis", "rabbitmq"), default=[],
                        help="start a private Redis/RabbitMQ for this run (supervised, empty at each start) "
                             "even when one listens on the default port; repeat for both")
    parser.add_argument("--key", default=env.get("CMS_RUN_KEY", ""), help="deployment key required in the client URL")
    parser.add_argument("--run-dir", type=Path, default=None, help="logs and generated files (default: .run)")
    parser.add_argument("--log-json", action="store_true")
    return parser.parse_args(argv)


def build_options(args: argparse.Namespace, prefix: str, amqp_url: str, redis_url: str) -> ClusterOptions:
    options = ClusterOptions(config=args.config, nodes=args.nodes, gateways=args.gateways, prefix=prefix,
                             amqp_url=amqp_url, redis_url=redis_url, deployment_key=args.key,
                             log_json=args.log_json, demo=bool(args.demo_lines), demo_lines=args.demo_lines,
                             private_servers=tuple(args.private), simulator_instead_of_pbx=args.simulator)
    if args.run_dir is not None:
        options.run_dir = args.run_dir
    if args.auto_ports:
        ports = free_ports(5 + args.nodes + args.gateways)
        options.haproxy_port, options.stats_port, options.ami_port, options.simulator_control_port = ports[:4]
        args.metrics_port = ports[4]
        options.node_ports = tuple(ports[5:5 + args.nodes])
        options.gateway_metrics_ports = tuple(ports[5 + args.nodes:])
    else:
        options.haproxy_port, options.stats_port = args.port, args.stats_port
        options.node_ports = tuple(args.node_port + i for i in range(args.nodes))
        options.gateway_metrics_ports = tuple(args.gateway_metrics_port + i for i in range(args.gateways))
        options.ami_port, options.simulator_control_port = args.ami_port, args.simulator_control_port
    options.gateway_metrics_port = options.gateway_metrics_ports[0]
    options.launcher_metrics_port = args.metrics_port
    return options


def config_error_text(exc: ConfigError, path: Path | None) -> str:
    """One line naming the file (when the message does not already), the line or key, and the fix."""
    text = str(exc)
    if path is not None and str(path) not in text:
        text = f"{path}: {text}"
    elif path is None:
        text += " (from the CMS_AMQP_URL / CMS_REDIS_URL / CMS_PREFIX environment variables)"
    return f"configuration error: {text}"


def _serve_metrics(supervisor: Supervisor, port: int) -> WSGIServer | None:
    from prometheus_client import start_http_server

    try:
        server, _thread = start_http_server(port, addr="127.0.0.1", registry=supervisor.registry)
    except OSError as exc:  # checked free a moment ago, taken since: serve on without our own metrics
        log.error("launcher metrics not served: port %d: %s", port, exc.strerror)
        return None
    return server


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    args = parse_args(argv, env)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s launcher %(message)s",
                        datefmt="%H:%M:%S")
    stop = StopFlag()
    stop.install()
    if args.nodes < 1 or args.gateways < 1:
        print("local_cluster: --nodes and --gateways must be at least 1", file=sys.stderr)
        return 2
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(config_error_text(exc, args.config), file=sys.stderr)
        return 2
    for warning in settings.warnings:
        print(f"configuration warning: {warning}", file=sys.stderr)
    cluster_settings = settings.cluster
    options = build_options(args, cluster_settings.prefix, cluster_settings.amqp_url, cluster_settings.redis_url)
    cluster = LocalCluster(options)
    started = time.monotonic()
    try:
        cluster.start(timeout=90, abort=stop.is_set)
    except ConfigError as exc:
        print(config_error_text(exc, args.config), file=sys.stderr)
        return 2
    except LaunchAborted:
        print("stopped before the cluster was up; every process it had started is stopped", file=sys.stderr)
        return 0
    except PortTaken as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 1
    except LaunchError as exc:
        print(f"cluster did not start: {exc}", file=sys.stderr)
        return 1
    # From here on, whatever happens (even a bug, or stdout gone), the children are stopped.
    server = None
    try:
        supervisor = Supervisor(cluster)
        server = _serve_metrics(supervisor, args.metrics_port)
        demo = f", demo traffic on lines {options.demo_lines}" if options.demo else ""
        pbx = f"built-in Asterisk simulator{demo}" if cluster.uses_simulator else f"PBX from {args.config}"
        print(f"\ncluster up in {time.monotonic() - started:.1f}s ({pbx}; namespace {cluster.prefix!r})")
        for name, url in cluster.urls().items():
            print(f"  {name:<45} {url}")
        if server is not None:
            print(f"  {'launcher metrics (restarts per process)':<45} http://127.0.0.1:{args.metrics_port}/metrics")
        print(f"  logs: {cluster.run_dir}/{cluster.prefix}-*.log; processes: {cluster.processes_path}")
        print("A process that dies is restarted; Ctrl-C stops everything.", flush=True)
        while not stop.is_set():
            supervisor.poll()
            stop.wait(0.5)
    finally:
        print("stopping...", flush=True)
        cluster.stop()
        if server is not None:
            server.shutdown()
        print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
