"""``python -m ami_gateway --config appsettings.json``: the AMI gateway process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from ami_gateway.app import run_gateway
from services import logs
from services.broker import refused_login
from services.config import ConfigError, load_settings
from services.lifecycle import stop_event_on_signals

log = logging.getLogger("ami_gateway")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ami_gateway", description=__doc__)
    parser.add_argument("--config", help="CMS-style appsettings.json (Asterisk block + optional Cluster block)")
    parser.add_argument("--metrics-host", default="127.0.0.1")
    parser.add_argument("--metrics-port", type=int, default=9101)
    parser.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--lease-ttl", type=float, default=2.0,
                        help="seconds a dead active gateway keeps the lease before a standby takes over (default 2)")
    args = parser.parse_args(argv)
    logs.configure("ami_gateway", json_lines=args.log_json, level=args.log_level)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if not settings.asterisk.url and not settings.asterisk.file_path:
        print("configuration error: Asterisk.url (a PBX) or Asterisk.filePath (a replay) is required", file=sys.stderr)
        return 2
    if not 0.5 <= args.lease_ttl <= 60:
        print(f"configuration error: --lease-ttl {args.lease_ttl:g} is out of range; use 0.5 to 60 seconds",
              file=sys.stderr)
        return 2
    for warning in settings.warnings:
        log.warning("configuration: %s", warning)
    logs.register_secret(settings.asterisk.secret)
    log.info("configuration: %s", settings.asterisk.redacted())

    refused = refused_login(settings.cluster.broker_urls)
    if refused:
        print(f"configuration error: {refused}", file=sys.stderr)
        return 2

    async def _main() -> None:
        stop = stop_event_on_signals(asyncio.get_running_loop())
        await run_gateway(settings, stop, metrics_host=args.metrics_host, metrics_port=args.metrics_port,
                          lease_ttl=args.lease_ttl, lease_renew_interval=args.lease_ttl / 4)

    asyncio.run(_main())
    return 0


if __name__ == "__main__":
    sys.exit(main())
