"""``python -m bench`` (what ``make bench`` runs): the pipeline's figures against same-run baselines.

Each stage measures the system and the simplest program doing the same work, alternating them
``--repeats`` times on the same machine in the same run, and keeps the medians. The table prints
every figure absolute, as a ratio to its baseline and, where issue 6 sets one, against its target.
Results also go to ``bench-results/<timestamp>.json`` (or ``--json PATH``).

Exit status: 0 when every stage ran (whatever the verdicts), 1 when a stage crashed, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.context import Context
from bench.report import StageResult, render_table, report_document

ROOT = Path(__file__).resolve().parent.parent


def _stages() -> dict[str, Callable[[Context], StageResult]]:
    from bench.failover import stage_failover
    from bench.flood import stage_flood
    from bench.stages_gateway import stage_gateway, stage_publish, stage_stall
    from bench.stages_nodes import stage_fanout, stage_handshake, stage_idle
    from bench.stages_pipeline import stage_burst, stage_e2e, stage_soak
    from bench.storm import stage_storm

    return {
        "gateway": stage_gateway,
        "stall": stage_stall,
        "publish": stage_publish,
        "e2e": stage_e2e,
        "burst": stage_burst,
        "fanout": stage_fanout,
        "idle": stage_idle,
        "handshake": stage_handshake,
        "failover": stage_failover,
        "flood": stage_flood,
        "storm": stage_storm,
        "soak": stage_soak,
    }


STAGE_NAMES = ("gateway", "stall", "publish", "e2e", "burst", "fanout", "idle", "handshake", "failover", "flood",
               "storm", "soak")
STAGE_HELP = {
    "gateway": "AmiParser + CallTracker over synthesized AMI vs a bare split loop",
    "stall": "gateway AMI read loop while RabbitMQ is held and Redis delayed (TCP proxies)",
    "publish": "EventOutbox (Redis + confirmed publish) vs bare aio-pika publish/consume",
    "e2e": "500 AMI events/s, 2,000 agents via HAProxy: end to end p50/p99/p99.9, GC pauses, loop lag",
    "burst": "AMI rate stepped up to 6,000 events/s, 2,000 agents: the rate held with p99 <= 25 ms, the knee",
    "fanout": "frames/s and CPU per frame of one node vs a bare Autobahn broadcast",
    "idle": "10,000 idle agents on one node: RSS and keepalive CPU vs bare Autobahn",
    "handshake": "agent connections/s (handshake + LoadLibrary + OpenConnection) vs bare Autobahn",
    "failover": "kill -9 a node: figures from ops.drill.bench_figures() when it exists",
    "flood": "a well-behaved agent's round trip while SignalR clients flood the cluster (issue 12)",
    "storm": "reconnect storm: kill -9 a node holding as many agents as the fd limit allows; back within 10 s",
    "soak": "200 AMI events/s, 2,000 agents: RSS of every process over time (--soak-seconds; long: 3600)",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    epilog = "stages:\n" + "\n".join(f"  {name:10} {STAGE_HELP[name]}" for name in STAGE_NAMES)
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0], epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke, under a minute)")
    parser.add_argument("--stage", action="append", choices=STAGE_NAMES, default=[],
                        help="run only this stage (repeatable)")
    parser.add_argument("--skip", action="append", choices=STAGE_NAMES, default=[], help="leave a stage out")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results (default "
                        "bench-results/<timestamp>.json)")
    parser.add_argument("--profile", choices=("gateway", "publish", "e2e", "fanout", "idle", "handshake", "storm"),
                        help="run this one stage with profiles (py-spy on the processes, cProfile in-process) and "
                             "write their top costs to bench-results/")
    parser.add_argument("--repeats", type=int, default=None, help="system/baseline alternations per stage "
                        "(default 3, 1 with --quick); the verdict is taken on the median")
    parser.add_argument("--soak-seconds", type=float, default=None,
                        help="length of the soak stage (default 180 s, 20 s with --quick)")
    parser.add_argument("--storm-agents", type=int, default=None,
                        help="agents in the reconnect storm over two nodes (default: as many as the descriptor "
                             "limit allows, up to 20,000; 200 with --quick)")
    parser.add_argument("--long-soak", action="store_true",
                        help="issue 15's long soak: 1 hour at 200 events/s (sets --soak-seconds 3600)")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.soak_seconds is not None and args.soak_seconds < 10:
        parser.error("--soak-seconds must be at least 10")
    if args.storm_agents is not None and args.storm_agents < 10:
        parser.error("--storm-agents must be at least 10")
    if args.long_soak:
        args.soak_seconds = 3600.0
    return args


def machine_info() -> dict[str, object]:
    return {
        "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()), "hostname_hash": hash(platform.node()) & 0xFFFF,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from bench.profiling import Profiler
    from local_cluster.infra import Infrastructure

    stamp = time.strftime("%Y%m%d-%H%M%S")
    results_dir = ROOT / "bench-results"
    results_dir.mkdir(exist_ok=True)
    run_dir = ROOT / ".run" / f"bench-{stamp}"
    names = [args.profile] if args.profile else (args.stage or [n for n in STAGE_NAMES if n not in args.skip])
    repeats = args.repeats or (1 if args.quick else 3)
    infra = Infrastructure(run_dir / "infra")
    started = time.time()
    print(f"bench: {'quick' if args.quick else 'full'} run of {', '.join(names)}; {repeats} repeat(s); "
          f"{os.cpu_count()} CPUs", flush=True)
    infra.start()
    machine = machine_info()
    profiler = Profiler(results_dir, stamp) if args.profile else None
    ctx = Context(quick=args.quick, repeats=repeats, run_dir=run_dir, results_dir=results_dir,
                  amqp_url=infra.amqp_url, redis_url=infra.redis_url, profiler=profiler,
                  soak_seconds=args.soak_seconds, storm_agents=args.storm_agents)
    stages = _stages()
    results: list[StageResult] = []
    try:
        for name in names:
            print(f"[{name}] {STAGE_HELP[name]}", flush=True)
            t0 = time.perf_counter()
            try:
                result = stages[name](ctx)
            except Exception as exc:  # one broken stage must not hide the others' figures
                traceback.print_exc()
                result = StageResult(name, "error", f"{type(exc).__name__}: {exc}")
            result.seconds = time.perf_counter() - t0
            results.append(result)
            print(render_table([result]), flush=True)
            print(f"[{name}] {result.seconds:.1f} s", flush=True)
    finally:
        infra.stop()
    finished = time.time()
    machine["loadavg_at_end"] = list(os.getloadavg())
    document = report_document(results, started_at=started, finished_at=finished, machine=machine,
                               options={"quick": args.quick, "stages": names, "repeats": repeats,
                                        "profile": args.profile, "soak_seconds": args.soak_seconds,
                                        "storm_agents": args.storm_agents})
    out = args.json or results_dir / f"{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2))
    print()
    print(render_table(results))
    summary = document["summary"]
    print("\nverdicts are taken on the median of the repeats; 'spread' is min-max over them (n)")
    print(f"\n{summary['pass']} PASS, {summary['fail']} FAIL, {summary['not_measured']} not measured; "
          f"{finished - started:.0f} s; results in {out}")
    if profiler is not None:
        for problem in profiler.problems:
            print(f"profile: {problem}")
        for path in profiler.reports:
            print(f"\n==> {path}")
            print("\n".join(path.read_text().splitlines()[:30]))
    return 1 if any(r.status == "error" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
