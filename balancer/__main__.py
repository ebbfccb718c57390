"""Command line: `python -m balancer {render,check,reload,drain,enable,status}`.

Exit status: 0 success, 1 haproxy refused (config check, reload, runtime API), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from balancer.cluster import BACKEND_NAME, ClusterConfigError, ClusterDescription, parse_node_flag
from balancer.haproxy_ctl import (
    HAProxyError,
    RuntimeAPI,
    check_config,
    format_status,
    reload,
)
from balancer.render import render_config, write_config

DEFAULT_SOCKET = str(ClusterDescription.__dataclass_fields__["runtime_socket"].default)
DEFAULT_PIDFILE = str(ClusterDescription.__dataclass_fields__["pidfile"].default)


def _cluster_from_args(args: argparse.Namespace) -> ClusterDescription:
    """The JSON file (if any) is the base; each flag given overrides its key; `--node` replaces `nodes`."""
    data: dict[str, Any] = {}
    if args.cluster:
        try:
            data = json.loads(Path(args.cluster).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ClusterConfigError(args.cluster, f"cannot read: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ClusterConfigError(args.cluster, f"invalid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ClusterConfigError(args.cluster, "expected a JSON object")
    if args.node:
        data["nodes"] = [parse_node_flag(text) for text in args.node]
    if args.origin:
        data["allowed_origins"] = list(args.origin)
    if args.deployment_key_file:
        try:
            data["deployment_key"] = Path(args.deployment_key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ClusterConfigError("--deployment-key-file", f"cannot read: {exc.strerror}") from None
    if args.no_stats:
        data["stats_port"] = None
    for key in (
        "bind",
        "ws_port",
        "wss_port",
        "tls_cert",
        "stats_port",
        "stats_bind",
        "runtime_socket",
        "pidfile",
        "maxconn",
        "log_target",
    ):
        value = getattr(args, key)
        if value is not None:
            data[key] = value
    if args.master_worker is not None:
        data["master_worker"] = args.master_worker
    if "nodes" not in data:
        raise ClusterConfigError("nodes", "give --cluster FILE or at least one --node name=host:port")
    return ClusterDescription.from_dict(data)


def _cmd_render(args: argparse.Namespace) -> int:
    cluster = _cluster_from_args(args)
    text = render_config(cluster)
    out: Path | None = None if args.out in (None, "-") else Path(args.out)
    if not args.no_check:
        # Check the exact bytes we are about to publish, before they replace a working config.
        fd, tmp = tempfile.mkstemp(prefix="haproxy-check-", suffix=".cfg")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            check_config(tmp, haproxy=args.haproxy)
        finally:
            os.unlink(tmp)
    if out is None:
        sys.stdout.write(text)
    else:
        write_config(text, out)
        print(f"wrote {out}" + ("" if args.no_check else " (haproxy -c -dW: valid)"), file=sys.stderr)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    check_config(args.config, haproxy=args.haproxy)
    print(f"{args.config}: valid (haproxy -c -dW, no warnings)")
    return 0


def _cmd_reload(args: argparse.Namespace) -> int:
    pids = reload(
        args.config,
        args.pidfile,
        socket_path=args.socket,
        master_worker={"auto": None, "master-worker": True, "standalone": False}[args.mode],
        haproxy=args.haproxy,
        check=not args.no_check,
    )
    mode = args.mode if args.mode != "auto" else "mode from config"
    print(f"reloaded {args.config}: {mode}, pids {' '.join(map(str, pids))}")
    return 0


def _cmd_state(args: argparse.Namespace) -> int:
    api = RuntimeAPI(args.socket)
    if args.command == "drain":
        api.drain(args.node, backend=args.backend)
    else:
        api.enable(args.node, backend=args.backend)
    status = api.server(args.node, backend=args.backend)
    print(f"{args.backend}/{args.node}: {status.status} ({status.current_sessions} sessions)")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    rows = RuntimeAPI(args.socket).servers(args.backend)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(format_status(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m balancer", description="HAProxy in front of ws_node")
    parser.add_argument("--haproxy", help="haproxy binary (default: $HAPROXY_BIN, PATH, /usr/sbin/haproxy)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("render", help="render haproxy.cfg from a cluster description (and validate it)")
    p.add_argument("--cluster", help="cluster description JSON; flags below override its keys")
    p.add_argument("--out", help="output file (default: stdout); written atomically")
    p.add_argument("--no-check", action="store_true", help="skip `haproxy -c -dW`")
    p.add_argument("--node", action="append", metavar="NAME=HOST:PORT", help="a ws_node (repeat)")
    p.add_argument("--bind")
    p.add_argument("--ws-port", dest="ws_port", type=int)
    p.add_argument("--wss-port", dest="wss_port", type=int)
    p.add_argument("--tls-cert", dest="tls_cert", help="PEM with chain and key; enables the wss/https port")
    p.add_argument("--deployment-key-file", help="file holding the ?key= value (kept off the command line)")
    p.add_argument("--origin", action="append", help="allowed Origin (repeat)")
    p.add_argument("--stats-port", dest="stats_port", type=int)
    p.add_argument("--no-stats", action="store_true", help="no stats/metrics frontend")
    p.add_argument("--stats-bind", dest="stats_bind")
    p.add_argument("--socket", dest="runtime_socket", help="runtime API socket path")
    p.add_argument("--pidfile")
    mw = p.add_mutually_exclusive_group()
    mw.add_argument("--master-worker", dest="master_worker", action="store_const", const=True)
    mw.add_argument("--standalone", dest="master_worker", action="store_const", const=False)
    p.add_argument("--maxconn", type=int)
    p.add_argument("--log-target", dest="log_target")
    p.set_defaults(func=_cmd_render)

    p = sub.add_parser("check", help="validate a config with `haproxy -c -dW` (warnings fail)")
    p.add_argument("--config", required=True)
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("reload", help="seamless reload of a running haproxy")
    p.add_argument("--config", required=True)
    p.add_argument("--pidfile", default=DEFAULT_PIDFILE)
    p.add_argument("--socket", default=DEFAULT_SOCKET, help="runtime socket (standalone mode: passed as -x)")
    p.add_argument(
        "--mode",
        choices=("auto", "master-worker", "standalone"),
        default="auto",
        help="master-worker: SIGUSR2 to the master; standalone: new daemon with -x/-sf; "
        "auto (default): master-worker if the config says `master-worker`",
    )
    p.add_argument("--no-check", action="store_true")
    p.set_defaults(func=_cmd_reload)

    for name, help_text in (
        ("drain", "stop new connections to a node (existing ones stay)"),
        ("enable", "put a node back in rotation (state ready)"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("node")
        p.add_argument("--socket", default=DEFAULT_SOCKET)
        p.add_argument("--backend", default=BACKEND_NAME)
        p.set_defaults(func=_cmd_state)

    p = sub.add_parser("status", help="servers of the backend, from `show stat`")
    p.add_argument("--socket", default=DEFAULT_SOCKET)
    p.add_argument("--backend", default=BACKEND_NAME)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        result: int = args.func(args)
    except ClusterConfigError as exc:
        print(f"error: cluster description: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except HAProxyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
