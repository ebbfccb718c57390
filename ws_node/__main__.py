"""``python -m ws_node --port 2013 --config appsettings.json``: one WebSocket node."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ws_node", description=__doc__)
    parser.add_argument("--config", help="CMS-style appsettings.json (the Cluster block is used)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2013)
    parser.add_argument("--node-id", default="")
    parser.add_argument("--key", default="", help="deployment key required as ?key=... (optional)")
    parser.add_argument("--allowed-origin", action="append", default=[], help="repeat for each allowed Origin")
    parser.add_argument("--drain-seconds", type=float, default=3.0)
    parser.add_argument("--log-json", action="store_true")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)

    # The asyncio reactor must be installed, on the loop asyncio will use, before anything
    # imports twisted.internet.reactor (see FACTS.md).
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    from twisted.internet import asyncioreactor

    asyncioreactor.install(loop)
    from twisted.internet import reactor as _reactor
    from twisted.internet.defer import Deferred

    reactor: Any = _reactor

    from services import logs
    from services.config import ConfigError, load_settings
    from ws_node.agent_connection import spawn
    from ws_node.app import Node, NodeOptions

    logs.configure(f"ws_node[{args.port}]", json_lines=args.log_json, level=args.log_level)
    log = logging.getLogger("ws_node")
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if args.key:
        logs.register_secret(args.key)
    node = Node(
        settings,
        NodeOptions(
            host=args.host, port=args.port, node_id=args.node_id, deployment_key=args.key,
            allowed_origins=tuple(args.allowed_origin), drain_seconds=args.drain_seconds,
        ),
    )
    stopping = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        d = Deferred.fromFuture(spawn(node.drain_and_stop()))
        d.addBoth(lambda _: reactor.stop())

    def on_start_failed(failure: object) -> None:
        log.error("node failed to start: %s", failure)
        reactor.stop()

    loop.add_signal_handler(signal.SIGTERM, on_signal)
    loop.add_signal_handler(signal.SIGINT, on_signal)
    reactor.callWhenRunning(lambda: Deferred.fromFuture(spawn(node.start())).addErrback(on_start_failed))
    reactor.run(installSignalHandlers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
