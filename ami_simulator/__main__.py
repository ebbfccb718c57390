"""``python -m ami_simulator``: run the simulated Asterisk, optionally with looping demo traffic.

Example::

    python -m ami_simulator --port 5038 --control-port 5039 --username admin --secret amp111 \\
        --demo-lines 305,306,307,308 --loop
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import time
from collections.abc import Sequence

from ami_simulator.model import Call
from ami_simulator.server import AmiSimulator, User, parse_classes

log = logging.getLogger("ami_simulator")

# (scenario, weight) of the demo mix.
DEMO_MIX: tuple[tuple[str, int], ...] = (
    ("inbound-direct-answered", 4),
    ("inbound-direct-noanswer", 1),
    ("inbound-direct-abandoned", 1),
    ("inbound-busy", 1),
    ("inbound-queue", 3),
    ("outbound-originate", 3),
)
CALLERS = (
    ("79161234567", "Ivan Petrov"),
    ("79035550101", "Olga Smirnova"),
    ("74951234567", "ACME Ltd"),
    ("79260001122", "Pavel Sokolov"),
    ("79998887766", ""),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ami_simulator", description="Simulated Asterisk AMI server")
    p.add_argument("--host", default="127.0.0.1", help="AMI listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5038, help="AMI port (default 5038, 0 = ephemeral)")
    p.add_argument("--control-port", type=int, default=5039, help="JSON control port on 127.0.0.1; -1 disables")
    p.add_argument("--username", default="admin")
    p.add_argument("--secret", default=os.environ.get("AMI_SIMULATOR_SECRET", "amp111"),
                   help="AMI secret (default: $AMI_SIMULATOR_SECRET, else amp111)")
    p.add_argument("--read", default="all", help="read permission classes, e.g. call,agent,originate")
    p.add_argument("--write", default="all", help="write permission classes, e.g. call,agent,originate")
    p.add_argument("--ami-version", default="9.0.0", help="banner version: 9.0.0 = Asterisk 20, 2.10.6 = 13")
    p.add_argument("--tech", choices=("SIP", "PJSIP"), default="SIP")
    p.add_argument(
        "--queue",
        action="append",
        default=[],
        metavar="NAME:LINE,LINE",
        help="queue and its member lines (repeatable); default: the demo lines in pairs, "
        "support:<1st,2nd>, sales:<3rd,4th>, queue3:<5th,6th>...",
    )
    p.add_argument("--demo-lines", default="", help="comma-separated lines for demo traffic")
    p.add_argument("--loop", action="store_true", help="play demo traffic on --demo-lines until stopped")
    p.add_argument(
        "--pause",
        type=float,
        nargs=2,
        default=(3.0, 10.0),
        metavar=("MIN", "MAX"),
        help="idle seconds between two calls of a line (default 3 10)",
    )
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply every scenario delay (0.1 = 10x faster)")
    p.add_argument("--scenario-dir", default=None, help="extra scenarios (*.ami), shadowing the built-in ones")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if args.loop and not args.demo_lines:
        p.error("--loop needs --demo-lines")
    return args


QUEUE_NAMES = ("support", "sales")


def _queues(args: argparse.Namespace, lines: list[str]) -> dict[str, list[str]]:
    """``--queue`` as given; by default the demo lines in pairs, so every demo line gets ringall queue calls."""
    queues: dict[str, list[str]] = {}
    for spec in args.queue:
        name, _, members = spec.partition(":")
        queues[name] = [m for m in members.split(",") if m]
    if not queues:
        if len(lines) < 2:
            return {"support": ["305", "306"]}
        for i in range(0, len(lines) - 1, 2):
            n = i // 2
            queues[QUEUE_NAMES[n] if n < len(QUEUE_NAMES) else f"queue{n + 1}"] = lines[i : i + 2]
        if len(lines) % 2:
            # the odd line out joins the last queue: its calls ring it and one partner
            queues[list(queues)[-1]].append(lines[-1])
    return queues


def queue_partners(sim: AmiSimulator, line: str) -> list[tuple[str, list[str]]]:
    """(queue, other member lines) for every queue ``line`` belongs to."""
    result = []
    for queue in sim.model.queues.values():
        members = [m.state_interface.split("/", 1)[1] for m in queue.members.values()]
        if line in members:
            result.append((queue.name, [x for x in members if x != line]))
    return result


async def demo_line(sim: AmiSimulator, line: str, lines: list[str], busy: set[str], pause: tuple[float, float]) -> None:
    """One line's endless traffic: a call, an idle pause, another call..."""
    while True:
        await asyncio.sleep(random.uniform(*pause))
        if line in busy:
            continue
        names, weights = zip(*DEMO_MIX, strict=True)
        scenario = random.choices(names, weights)[0]
        caller, caller_name = random.choice(CALLERS)
        variables = {"line": line, "caller": caller, "callerName": caller_name or caller}
        involved = [line]
        if scenario == "inbound-queue":
            # ringall: the queue rings this line and a free partner; this line answers, the partner's ring ends
            options = [(q, [x for x in others if x not in busy]) for q, others in queue_partners(sim, line)]
            options = [(q, free) for q, free in options if free]
            if not options:
                scenario = "inbound-direct-answered"
            else:
                queue_name, free = random.choice(options)
                agent2 = random.choice(free)
                variables |= {"agent2": agent2, "queue": queue_name, "did": "4950000100"}
                involved.append(agent2)
        if scenario == "outbound-originate":
            # as if another manager session had sent the Originate (its OriginateResponse carries an ActionID)
            variables |= {
                "number": f"8495{random.randint(1000000, 9999999)}",
                "actionid": f"demo-{line}-{time.time():.0f}",
            }
        busy.update(involved)
        try:
            call: Call = sim.play(scenario, **variables)
            log.info(
                "demo call=%s scenario=%s line=%s caller=%s", call.id, scenario, line, variables.get("number", caller)
            )
            await sim.wait_call(call)
        finally:
            busy.difference_update(involved)


async def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lines = [x.strip() for x in args.demo_lines.split(",") if x.strip()]
    sim = AmiSimulator(
        host=args.host,
        port=args.port,
        control_port=None if args.control_port < 0 else args.control_port,
        users={args.username: User(args.secret, parse_classes(args.read), parse_classes(args.write))},
        version=args.ami_version,
        tech=args.tech,
        time_scale=args.time_scale,
        queues=_queues(args, lines),
        scenario_dir=args.scenario_dir,
    )
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[int] = loop.create_future()

    def on_signal(signum: int) -> None:
        if not stop.done():
            stop.set_result(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await sim.start()
    demo: list[asyncio.Task[None]] = []
    if args.loop:
        busy: set[str] = set()
        pause = (float(args.pause[0]), float(args.pause[1]))
        demo = [asyncio.create_task(demo_line(sim, line, lines, busy, pause)) for line in lines]
    try:
        signum = await stop
        log.info("signal %s: shutting down", signal.Signals(signum).name)
    finally:
        for task in demo:
            task.cancel()
        for task in demo:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await sim.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
