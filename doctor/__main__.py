"""``python -m doctor --config appsettings.json``: checks a deployment and prints a checklist
with the fix for each failure; exit status 1 when any check failed, 2 for bad arguments."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from doctor.creatio_check import CreatioAccount
from doctor.report import Result, exit_code, render_result, summary
from doctor.run import DoctorOptions, run_checks

PASSWORD_ENV = "CMS_DOCTOR_CREATIO_PASSWORD"


def _port_flag(text: str) -> tuple[str, str, int]:
    """``what=host:port`` or ``host:port`` or ``port``."""
    what, _, address = text.rpartition("=")
    host, _, port = address.rpartition(":")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected [what=][host:]port with a port 1-65535")
    return what or "--port", host.strip("[]") or "0.0.0.0", int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="doctor", description=__doc__)
    parser.add_argument("--config", type=Path, default=os.environ.get("CMS_CONFIG") or None,
                        help="the CMS appsettings.json the cluster runs with [CMS_CONFIG]")
    parser.add_argument("--cluster", type=Path, help="the balancer's cluster description (JSON), as for "
                                                     "`python -m balancer --cluster`; default: two local nodes")
    parser.add_argument("--tls-cert", type=Path, help="PEM (certificate, chain, key) HAProxy serves wss:// with")
    parser.add_argument("--public-host", help="host name in Creatio's 'Message exchange server' URL (TLS name check)")
    parser.add_argument("--port", action="append", type=_port_flag, default=[], metavar="[WHAT=][HOST:]PORT",
                        help="another port that must be free here (repeatable)")
    parser.add_argument("--gateway-metrics-port", type=int, default=9101,
                        help="the gateway's /metrics port, checked free with the others (default 9101)")
    parser.add_argument("--skip-ports", action="store_true", help="do not check ports (the cluster runs here)")
    parser.add_argument("--listen", type=float, default=5.0, metavar="SECONDS",
                        help="how long to watch AMI events (default 5; longer on an idle PBX)")
    parser.add_argument("--timeout", type=float, default=5.0, help="per network step, seconds (default 5)")
    creatio = parser.add_argument_group("Creatio call records (optional)")
    creatio.add_argument("--creatio-url", help="the Creatio site, e.g. https://crm.example.com")
    creatio.add_argument("--creatio-user", help="the service account that writes call records")
    creatio.add_argument("--creatio-password-file", type=Path,
                         help=f"file holding its password (or set {PASSWORD_ENV}; never on the command line)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    account = None
    if args.creatio_url or args.creatio_user:
        password = os.environ.get(PASSWORD_ENV, "")
        if args.creatio_password_file:
            try:
                password = args.creatio_password_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                print(f"doctor: --creatio-password-file {args.creatio_password_file}: {exc.strerror}", file=sys.stderr)
                return 2
        if not (args.creatio_url and args.creatio_user and password):
            print(f"doctor: the Creatio check needs --creatio-url, --creatio-user and a password ({PASSWORD_ENV} "
                  "or --creatio-password-file)", file=sys.stderr)
            return 2
        account = CreatioAccount(args.creatio_url, args.creatio_user, password)
    options = DoctorOptions(
        config=args.config, cluster=args.cluster, tls_cert=args.tls_cert, public_host=args.public_host,
        ports=list(args.port), check_ports=not args.skip_ports,
        gateway_metrics_port=args.gateway_metrics_port, listen_seconds=max(0.0, args.listen),
        timeout=max(0.5, args.timeout), creatio=account,
    )

    def emit(result: Result) -> None:
        sys.stdout.write(render_result(result))
        sys.stdout.flush()

    print(f"doctor: checking {args.config or 'the default configuration'}")
    results = asyncio.run(run_checks(options, emit))
    print()
    print(summary(results), end="")
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
