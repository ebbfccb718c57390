"""``filePath``: a raw AMI capture given to the gateway instead of a PBX produces the same line events as the same
capture played live by the simulator over TCP - both through the real Redis and RabbitMQ."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ami.scenario import load_scenario
from ami_simulator.server import AmiSimulator
from local_cluster.infra import Infrastructure
from services.wire import LineEvent
from tests.integration.test_gateway_proxy import (
    SECRET,
    EventListener,
    cleanup,
    gateway_settings,
    running_gateway,
    wait_until,
)

pytestmark = pytest.mark.integration

CAPTURES = sorted((Path(__file__).resolve().parent.parent / "fixtures" / "ami").glob("*.ami"))
LINES = ["305", "306", "307", "308"]


def _view(e: LineEvent) -> tuple[object, ...]:
    c = e.call
    call = (
        (c.id, c.state.value, c.direction.value, c.caller_number, c.caller_name, c.called_number, c.queue,
         c.hangup_cause, c.redirecting_number, c.redirection_number)
        if c is not None
        else ()
    )
    agent = (e.agent.paused, e.agent.reason) if e.agent is not None else ()
    return (e.line, e.seq, e.type.value, call, agent)


async def _replayed(infra: Infrastructure, prefix: str, capture: Path) -> list[tuple[object, ...]]:
    listener = await EventListener(infra.amqp_url, prefix).start(LINES)
    try:
        settings = gateway_settings(infra, prefix, 0, url="", file_path=str(capture))
        async with running_gateway(settings) as gateway:
            await asyncio.wait_for(gateway.replay_done.wait(), 30)
            await wait_until(lambda: gateway.outbox.depth == 0 and len(listener.events) >= gateway.outbox.published)
            assert gateway.ami is None  # no AMI connection at all
        return [_view(e) for e in listener.events]
    finally:
        await listener.close()
        await cleanup(infra, prefix)


async def _live(infra: Infrastructure, prefix: str, capture: Path) -> list[tuple[object, ...]]:
    listener = await EventListener(infra.amqp_url, prefix).start(LINES)
    try:
        async with AmiSimulator(port=0, users={"admin": SECRET}, time_scale=0.2) as sim:
            async with running_gateway(gateway_settings(infra, prefix, sim.port)) as gateway:
                await asyncio.wait_for(gateway.ready.wait(), 10)
                call = sim.play(load_scenario(capture))
                await sim.wait_call(call, 30)
                await wait_until(lambda: gateway.outbox.depth == 0 and len(listener.events) >= gateway.outbox.published)
        return [_view(e) for e in listener.events]
    finally:
        await listener.close()
        await cleanup(infra, prefix)


@pytest.mark.parametrize("capture", CAPTURES, ids=[p.stem for p in CAPTURES])
def test_replaying_a_capture_gives_the_live_events(infra: Infrastructure, prefix: str, capture: Path) -> None:
    async def main() -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
        return await _replayed(infra, prefix, capture), await _live(infra, prefix + "l", capture)

    replayed, live = asyncio.run(main())
    assert replayed, "the capture produced no line events"
    assert replayed == live
