"""``python -m ops.chaos`` (what `make chaos` runs): every fault in turn under call traffic, with a
few hundred simulated Creatio agents on both transports, on private RabbitMQ and Redis; prints a
table with a PASS/FAIL per fault against issue 10's targets and exits 1 if any target is missed.

Faults: baseline (none), node-kill, node-stop, gateway-kill, gateway-restart, rabbitmq-restart,
rabbitmq-unreachable, redis-restart-empty, redis-unreachable, ami-cut, asterisk-restart,
slow-ami, slow-amqp, slow-redis, slow-client, rabbitmq-stall, redis-stall. See docs/chaos.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

from ops.chaos.harness import ALL_FAULTS, FAULTS, QUICK_FAULTS, ChaosOptions, ChaosResult, ChaosRun
from ops.chaos.verdict import format_table, judge_evidence
from ws_node.creatio_protocol import call_guid


def parse_args(argv: list[str] | None) -> tuple[ChaosOptions, Path | None]:
    parser = argparse.ArgumentParser(prog="python -m ops.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=300, help="agents ringing in the traffic")
    parser.add_argument("--signalr-share", type=float, default=0.5, help="share of agents on SignalR")
    parser.add_argument("--command-agents", type=int, default=10, help="agents sending click-to-dial")
    parser.add_argument("--cps", type=float, default=4.0, help="calls started per second")
    parser.add_argument("--faults", default=",".join(ALL_FAULTS), help="comma-separated, in order")
    parser.add_argument("--quick", action="store_true", help=f"only {','.join(QUICK_FAULTS)}, short outages")
    parser.add_argument("--outage-seconds", type=float, default=30.0, help="RabbitMQ/Redis unreachable for")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds added each way on a slow link")
    parser.add_argument("--loss", type=float, default=0.02, help="chance a chunk is lost once on a slow link")
    parser.add_argument("--reconnect-delay", type=float, default=5.0, help="agents' first retry (Creatio: 5 s)")
    parser.add_argument("--run-dir", type=Path, default=None, help="logs and data (default: .run/chaos, emptied)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--judge", type=Path, default=None, metavar="EVIDENCE",
                        help="print the table again from a run's evidence.json, without running anything")
    args = parser.parse_args(argv)
    faults = QUICK_FAULTS if args.quick else tuple(f.strip() for f in args.faults.split(",") if f.strip())
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        parser.error(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    options = ChaosOptions(
        agents=args.agents, signalr_share=args.signalr_share, command_agents=args.command_agents, cps=args.cps,
        faults=faults, outage_seconds=10.0 if args.quick else args.outage_seconds, latency=args.latency,
        loss=args.loss, reconnect_delay=args.reconnect_delay, seed=args.seed,
    )
    if args.run_dir is not None:
        options.run_dir = args.run_dir
    return options, args.judge


def run(options: ChaosOptions) -> ChaosResult:
    chaos = ChaosRun(options)
    try:
        chaos.start()
        return asyncio.run(chaos.run())
    finally:
        chaos.stop()


def print_result(result: ChaosResult) -> None:
    print()
    print(f"{result.agents} agents ({result.signalr_agents} SignalR), {result.calls_played} calls played, "
          f"{result.seconds:.0f}s; standby gateway: {'yes' if result.standby else 'no'}")
    print("disc = agents disconnected in the phase; missed = events not delivered for calls that started after "
          "recovery began (RING_STARTED/COMMUTATION_STARTED/RING_FINISHED); dup = duplicate events; "
          "ooo = calls with events out of order; ghost = over or foreign calls in snapshots from 5 s after "
          "recovery; cmd = click-to-dial executed twice/after its TTL; consistent = seconds from recovery (node "
          "faults: from the agent's first retry) until every snapshot is right")
    print()
    print(format_table(result.reports))
    for report in result.reports:
        details = report.lost_calls[:5] + report.missed_calls[:5]
        if details:
            print(f"  {report.phase.name}: lost {report.lost_calls[:5]} missed {report.missed_calls[:5]}")
    for note in result.notes:
        print(f"  note: {note}")
    failed = [r.phase.name for r in result.reports if r.phase.applicable and not r.passed]
    print(f"\n{'PASS' if not failed else 'FAIL'}: {len(failed)} of "
          f"{sum(r.phase.applicable for r in result.reports)} faults missed a target"
          + (f" ({', '.join(failed)})" if failed else ""), flush=True)


def _stop_on_sigterm() -> None:
    """SIGTERM (make's process group, a CI timeout) stops the run like Ctrl-C: everything started is
    stopped. The handler only raises; a second signal during the clean-up is ignored."""

    def handler(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    _stop_on_sigterm()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    options, evidence = parse_args(argv)
    if evidence is not None:
        reports = judge_evidence(json.loads(evidence.read_text()), call_guid)
        print(format_table(reports))
        return 0 if all(r.passed for r in reports if r.phase.applicable) else 1
    started = time.monotonic()
    if options.run_dir == ChaosOptions.run_dir and options.run_dir.exists():
        shutil.rmtree(options.run_dir)  # the previous run's logs and broker data; ours start clean
    print(f"logs and data: {options.run_dir.resolve()}/", flush=True)
    result = run(options)
    print_result(result)
    print(f"whole run {time.monotonic() - started:.0f}s")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
