"""``python -m local_cluster [--config appsettings.json]``: run the whole cluster on loopback
until Ctrl-C / SIGTERM (what `make run` calls)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from local_cluster.launcher import ClusterOptions, LaunchError, LocalCluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="local_cluster", description=__doc__)
    parser.add_argument("--config", type=Path, help="CMS appsettings.json naming a real PBX (default: simulator)")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--port", type=int, default=2013, help="HAProxy ws port")
    parser.add_argument("--key", default="", help="deployment key required in the client URL")
    parser.add_argument("--log-json", action="store_true")
    args = parser.parse_args(argv)
    options = ClusterOptions(config=args.config, nodes=args.nodes, haproxy_port=args.port,
                             deployment_key=args.key, log_json=args.log_json)
    cluster = LocalCluster(options)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    started = time.monotonic()
    try:
        cluster.start(timeout=60)
    except LaunchError as exc:
        print(f"cluster did not start: {exc}", file=sys.stderr)
        return 1
    pbx = (f"built-in Asterisk simulator, demo traffic on lines {options.demo_lines}"
           if cluster.uses_simulator else f"PBX from {args.config}")
    print(f"\ncluster up in {time.monotonic() - started:.1f}s ({pbx})")
    for name, url in cluster.urls().items():
        print(f"  {name:<45} {url}")
    print(f"  logs: {cluster.run_dir}/\nCtrl-C stops everything.", flush=True)
    try:
        while not stop.is_set():
            dead = [c.name for c in cluster.children if not c.alive()]
            if dead:
                print(f"process(es) exited unexpectedly: {', '.join(dead)}; stopping", file=sys.stderr)
                break
            stop.wait(1.0)
    finally:
        print("stopping...", flush=True)
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
