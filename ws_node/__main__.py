"""``python -m ws_node --port 2013 --config appsettings.json``: one WebSocket node."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from typing import Any

ENV_PREFIX = "CMS_NODE_"


def _env(name: str, default: str = "") -> str:
    return os.environ.get(ENV_PREFIX + name, default)


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in _env(name).split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    """Every flag has an environment twin, ``CMS_NODE_<FLAG>`` (secrets are better passed that way:
    a command line is visible to every user of the machine through ``ps``)."""
    parser = argparse.ArgumentParser(prog="ws_node", description=__doc__)
    parser.add_argument("--config", default=_env("CONFIG") or None,
                        help="CMS-style appsettings.json (the Cluster block is used) [CMS_NODE_CONFIG]")
    parser.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=_env("PORT", "2013"))
    parser.add_argument("--node-id", default=_env("NODE_ID"))
    security = parser.add_argument_group("admission (both transports)")
    security.add_argument("--key", default=_env("KEY"),
                          help="deployment key required as ?key=... on every request (optional) [CMS_NODE_KEY]")
    security.add_argument("--allowed-origin", action="append", default=_env_list("ALLOWED_ORIGINS"),
                          help="allowed browser Origin, repeatable; '*' for any "
                               "[CMS_NODE_ALLOWED_ORIGINS, comma-separated]")
    security.add_argument("--max-connections", type=int, default=_env("MAX_CONNECTIONS", "20000"),
                          help="open agent sockets per node; 0 = no cap [CMS_NODE_MAX_CONNECTIONS]")
    security.add_argument("--max-message-bytes", type=int, default=_env("MAX_MESSAGE_BYTES", str(64 * 1024)),
                          help="largest client message [CMS_NODE_MAX_MESSAGE_BYTES]")
    security.add_argument("--rate", type=float, default=_env("RATE", "20"),
                          help="sustained client messages per second per connection; 0 = no limit [CMS_NODE_RATE]")
    security.add_argument("--burst", type=int, default=_env("BURST", "60"),
                          help="messages allowed in a burst above the rate [CMS_NODE_BURST]")
    security.add_argument("--flood-tolerance", type=int, default=_env("FLOOD_TOLERANCE", "50"),
                          help="messages over the rate within 10 s before disconnecting [CMS_NODE_FLOOD_TOLERANCE]")
    security.add_argument("--command-limits", default=_env("COMMAND_LIMITS"),
                          help="agent commands per line and per user, over the defaults: kind=burst:per_minute, "
                               "comma-separated; kinds originate, transfer, dtmf, state, call; 0:0 = off "
                               "[CMS_NODE_COMMAND_LIMITS]")
    security.add_argument("--handshake-timeout", type=float, default=_env("HANDSHAKE_TIMEOUT", "15"),
                          help="seconds from socket open to the first message / SignalR handshake "
                               "[CMS_NODE_HANDSHAKE_TIMEOUT]")
    signalr_group = parser.add_argument_group("SignalR (Creatio 8.x)")
    signalr_group.add_argument("--signalr-token-secret", default=_env("SIGNALR_TOKEN_SECRET"),
                               help="secret shared by all nodes that signs negotiate tokens; default: derived "
                                    "from --key [CMS_NODE_SIGNALR_TOKEN_SECRET]")
    signalr_group.add_argument("--signalr-token-lifetime", type=float, default=_env("SIGNALR_TOKEN_LIFETIME", "300"))
    signalr_group.add_argument("--signalr-ping-interval", type=float, default=_env("SIGNALR_PING_INTERVAL", "15"))
    signalr_group.add_argument("--signalr-client-timeout", type=float, default=_env("SIGNALR_CLIENT_TIMEOUT", "30"))
    parser.add_argument("--max-backlog-frames", type=int, default=_env("MAX_BACKLOG_FRAMES", "2000"),
                        help="frames queued for a client that does not read before it is disconnected "
                             "[CMS_NODE_MAX_BACKLOG_FRAMES]")
    parser.add_argument("--event-loop", choices=("auto", "uvloop", "asyncio"), default=_env("EVENT_LOOP", "auto"),
                        help="the loop under Twisted's asyncio reactor: uvloop (when installed: about a quarter "
                             "less CPU per frame sent) or the standard one; auto = uvloop if available "
                             "[CMS_NODE_EVENT_LOOP]")
    parser.add_argument("--drain-seconds", type=float, default=_env("DRAIN_SECONDS", "3"))
    # Accepted so that a node started with an older deployment's settings still starts (a rolling upgrade
    # must not stop on it); it does nothing now, and the node says so at start (obsolete_settings).
    parser.add_argument("--client-log-dir", default=_env("CLIENT_LOG_DIR", ""),
                        help="obsolete, ignored: agents' ProcessLogs/SetLogFilePath are always refused and "
                             "nothing is written to files [CMS_NODE_CLIENT_LOG_DIR]")
    parser.add_argument("--admin-token", default=_env("ADMIN_TOKEN"),
                        help="token the /status page requires (?token= or Authorization: Bearer); unset: the "
                             "deployment key guards it [CMS_NODE_ADMIN_TOKEN]")
    parser.add_argument("--advertise-host", default=_env("ADVERTISE_HOST"),
                        help="name or address other nodes reach this one by, for the status page "
                             "(default: --host) [CMS_NODE_ADVERTISE_HOST]")
    parser.add_argument("--log-json", action="store_true", default=_env("LOG_JSON") in ("1", "true", "yes"))
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    parser.add_argument("--log-file", default=_env("LOG_FILE"),
                        help="log to this file, rotated (only warnings go to stderr then) [CMS_NODE_LOG_FILE]")
    parser.add_argument("--log-max-bytes", type=int, default=_env("LOG_MAX_BYTES", str(20 * 1024 * 1024)),
                        help="rotate the log file at this size [CMS_NODE_LOG_MAX_BYTES]")
    parser.add_argument("--log-backups", type=int, default=_env("LOG_BACKUPS", "5"),
                        help="rotated log files kept [CMS_NODE_LOG_BACKUPS]")
    return parser


def obsolete_settings(args: argparse.Namespace) -> list[str]:
    """One line for each setting the node still accepts but no longer uses: what changed, what to do."""
    warnings = []
    if args.client_log_dir:
        warnings.append(
            "--client-log-dir / CMS_NODE_CLIENT_LOG_DIR is ignored: agents' ProcessLogs and SetLogFilePath are "
            "now always refused with an ERROR and nothing is written to that folder; remove the setting"
        )
    return warnings


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """The loop the node runs on. Twisted's asyncio reactor only uses the loop's public API
    (add_reader/add_writer, call_at), so uvloop works under it; with uvloop registering a socket
    for writing, which the reactor does for every write, costs a C call instead of a Python
    selector key rebuild. ImportError when ``kind`` is "uvloop" and it is not installed."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


#: full collections only after this many collections of the middle generation (Python's default: 10)
FULL_COLLECTION_EVERY = 100


def settle_heap() -> None:
    """Once started: what start-up made (modules, classes, the site: ~70,000 objects) lives as long as the
    process. Out of the collector's sight, a full collection no longer walks it: with 2,000 agents a node's
    longest GC pause was 110 ms, the end-to-end p99.9 of the windows that had one (bench e2e).

    And full collections ten times rarer. Agents arriving by the thousand (a reconnect storm) grow the heap
    fast, and Python runs a full collection each time it has grown by a quarter: 150-320 ms each over a few
    thousand connections, 0.16 ms of CPU per connection measured here, the reason a node's second round of
    3,000 connections cost 0.97-1.04 ms each against 0.80-0.83 for the first. With full collections every
    100 middle ones the second round cost 0.70-0.78 ms, like the first. Young cycles are still collected as
    before; only cycles that lived long enough to reach the oldest generation wait longer to be freed."""
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse reports the bad flag or CMS_NODE_* value itself
        return int(exc.code or 0)

    from ws_node.admission import AdmissionPolicy

    try:
        admission = AdmissionPolicy(
            deployment_key=args.key,
            allowed_origins=tuple(args.allowed_origin),
            max_connections=args.max_connections,
            max_message_bytes=args.max_message_bytes,
            messages_per_second=args.rate,
            message_burst=args.burst,
            flood_tolerance=args.flood_tolerance,
            handshake_timeout_seconds=args.handshake_timeout,
        )
    except ValueError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    from ws_node.admission import parse_command_limits

    try:
        parse_command_limits(args.command_limits)
    except ValueError as exc:
        print(f"configuration error: --command-limits / CMS_NODE_COMMAND_LIMITS: {exc}", file=sys.stderr)
        return 2

    # The asyncio reactor must be installed, on the loop asyncio will use, before anything
    # imports twisted.internet.reactor (see FACTS.md).
    try:
        loop = new_event_loop(args.event_loop)
    except ImportError:
        print("configuration error: --event-loop uvloop: uvloop is not installed", file=sys.stderr)
        return 2
    asyncio.set_event_loop(loop)
    from twisted.internet import asyncioreactor

    asyncioreactor.install(loop)
    from twisted.internet import reactor as _reactor
    from twisted.internet.defer import Deferred

    reactor: Any = _reactor

    from services import logs
    from services.config import ConfigError, load_settings
    from services.tasks import background
    from ws_node.app import Node, NodeOptions

    try:
        logs.configure(f"ws_node[{args.port}]", json_lines=args.log_json, level=args.log_level,
                       log_file=args.log_file, max_bytes=args.log_max_bytes, backups=args.log_backups)
    except OSError as exc:
        print(f"configuration error: --log-file / CMS_NODE_LOG_FILE {args.log_file}: {exc.strerror}", file=sys.stderr)
        return 2
    log = logging.getLogger("ws_node")
    log.info("event loop: %s.%s", type(loop).__module__, type(loop).__name__)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    for warning in [*settings.warnings, *obsolete_settings(args)]:
        log.warning("configuration: %s", warning)
    from services.broker import refused_login

    refused = refused_login(settings.cluster.broker_urls)
    if refused:
        print(f"configuration error: {refused}", file=sys.stderr)
        return 2
    for secret in (args.key, args.signalr_token_secret, args.admin_token):
        logs.register_secret(secret)
    node = Node(
        settings,
        NodeOptions(
            host=args.host, port=args.port, node_id=args.node_id, admission=admission,
            signalr_token_secret=args.signalr_token_secret, signalr_token_lifetime=args.signalr_token_lifetime,
            signalr_ping_interval=args.signalr_ping_interval, signalr_client_timeout=args.signalr_client_timeout,
            max_backlog_frames=args.max_backlog_frames, drain_seconds=args.drain_seconds,
            admin_token=args.admin_token, advertise_host=args.advertise_host,
            command_limits=args.command_limits,
        ),
    )
    stopping = False
    start_failed = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        d = Deferred.fromFuture(background(node.drain_and_stop()))
        d.addBoth(lambda _: reactor.stop())

    def on_start_failed(failure: object) -> None:
        nonlocal start_failed
        start_failed = True  # a supervisor must see a failed start as a failure (e.g. port taken)
        log.error("node failed to start: %s", failure)
        reactor.stop()

    loop.add_signal_handler(signal.SIGTERM, on_signal)
    loop.add_signal_handler(signal.SIGINT, on_signal)
    async def start() -> None:
        await node.start()
        settle_heap()

    reactor.callWhenRunning(lambda: Deferred.fromFuture(background(start(), report=False)).addErrback(on_start_failed))
    reactor.run(installSignalHandlers=False)
    return 1 if start_failed else 0


if __name__ == "__main__":
    sys.exit(main())
