"""``make bench`` stage "flood": a well-behaved agent's round trip while SignalR clients flood (issue 12).

The agent sends QueryLineState five times a second (well under its own rate limit) and times each
answer, first alone, then while four flooding processes hammer the same cluster through HAProxy:
batches of 2,000 SignalR pings per WebSocket message, batches of 500 ``Ping`` invocations, 500
unknown-method invocations, and single pings as fast as the socket takes them, each reconnecting
whenever the node cuts it. The figure is the agent's median round trip during the flood, with its
median alone, same cluster, same run, as the baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import websockets

from bench.context import Context
from bench.report import Figure, StageResult
from ws_node.creatio_protocol import MsgEventType

RS = "\x1e"


def flood(url: str, batch: str, seconds: float) -> tuple[int, list[int | None]]:
    """One flooding client (run it in its own process): SignalR handshake, then ``batch`` as fast as
    the socket takes it, reconnecting whenever cut. Returns the records it wrote and the close code of
    every socket the server cut."""

    async def run() -> tuple[int, list[int | None]]:
        sent, codes = 0, []
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            with contextlib.suppress(OSError, websockets.WebSocketException):
                async with websockets.connect(url, max_size=2**22, close_timeout=1) as hub:
                    await hub.send('{"protocol":"json","version":1}' + RS)
                    await hub.recv()
                    with contextlib.suppress(websockets.ConnectionClosed):
                        while time.monotonic() < until:
                            await hub.send(batch)
                            sent += batch.count(RS)
                    if time.monotonic() < until:  # cut by the server, not by our own deadline
                        with contextlib.suppress(websockets.ConnectionClosed, TimeoutError):
                            async with asyncio.timeout(5):
                                while True:
                                    await hub.recv()
                        codes.append(hub.close_code)
        return sent, codes

    return asyncio.run(run())


FLOOD_BATCHES = (
    '{"type":6}' + RS * 1,
    ('{"type":6}' + RS) * 2000,
    (json.dumps({"type": 1, "invocationId": "1", "target": "Ping", "arguments": []}) + RS) * 500,
    (json.dumps({"type": 1, "invocationId": "2", "target": "NoSuchMethod", "arguments": []}) + RS) * 500,
)


async def well_behaved_round_trips(agent: Any, seconds: float) -> list[float]:
    """QueryLineState -> LINE_STATE_CHANGED, five a second, for ``seconds``."""
    out: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        mark = len(agent.events)
        started = time.perf_counter()
        await agent.send("QueryLineState")
        await agent.wait_for(MsgEventType.LINE_STATE_CHANGED, after=mark, timeout=10)
        out.append(time.perf_counter() - started)
        await asyncio.sleep(0.2)
    return out


async def flood_while_measuring(ws_url: str, agent: Any, seconds: float) -> tuple[list[float], int, list[int | None]]:
    """The agent's round trips during ``seconds`` of flood from one process per batch kind."""
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(len(FLOOD_BATCHES), mp_context=multiprocessing.get_context("spawn")) as pool:
        await asyncio.gather(*(loop.run_in_executor(pool, flood, ws_url, "", 0.0) for _ in FLOOD_BATCHES))
        flooding = [loop.run_in_executor(pool, flood, ws_url, batch, seconds) for batch in FLOOD_BATCHES]
        during = await well_behaved_round_trips(agent, seconds)
        results = await asyncio.gather(*flooding)
    return during, sum(r[0] for r in results), [code for r in results for code in r[1]]


def stage_flood(ctx: Context) -> StageResult:
    from bench.stages_nodes import local_cluster
    from tests.support.creatio_client import CreatioAgent

    seconds = ctx.size(10.0, 4.0)
    result = StageResult("flood")
    with local_cluster(ctx) as cluster:

        async def main() -> tuple[list[float], list[float], int, list[int | None]]:
            agent = CreatioAgent(cluster.client_url, "305")
            await agent.connect()
            await agent.open()
            try:
                alone = await well_behaved_round_trips(agent, seconds)
                ws_url = f"ws://127.0.0.1:{cluster.options.haproxy_port}/"
                during, sent, codes = await flood_while_measuring(ws_url, agent, seconds)
            finally:
                await agent.close()
            return alone, during, sent, codes

        alone, during, sent, codes = asyncio.run(main())
    p50_alone, p50_during = statistics.median(alone), statistics.median(during)
    ctx.say(f"well-behaved agent: p50 {p50_alone * 1000:.1f} ms alone, {p50_during * 1000:.1f} ms during the "
            f"flood ({len(during)} round trips); flooders wrote {sent:,} records, {len(codes)} sockets cut")
    result.add(Figure("well-behaved agent's round trip (p50) during a SignalR flood", p50_during, "s",
                      baseline=p50_alone, note="baseline: the same agent with no flood, same run",
                      samples=during, baseline_samples=alone))
    result.details = {"flood_records_written": sent, "sockets_cut": len(codes),
                      "close_codes": sorted({str(c) for c in codes})}
    return result
