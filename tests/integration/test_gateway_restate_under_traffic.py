"""The gateway restates every line when the Redis server behind its lease changes (a Sentinel failover), while its
outbox keeps writing call events. The restate claims a new epoch, which changes the lease's token: an outbox write
already sent with the old token would be refused as fenced and the gateway would step down. The clustered-engines
test once timed out that way ("the gateway restated under a new epoch" never seen): the gateway had stepped down.

Here the change of server is simulated the way tests/integration/test_lease_on_a_new_server.py does (the term's
recorded run_id replaced), and most restates are started directly, so the race is met dozens of times in seconds
instead of once per Sentinel failover."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest

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
from tests.integration.test_gateway_standby import assert_positions_sound

pytestmark = pytest.mark.integration

LINES = [str(400 + n) for n in range(10)]
RESTATES = 40


def test_restates_beside_a_busy_outbox_never_step_the_gateway_down(infra: Infrastructure, prefix: str) -> None:
    async def main() -> None:
        listener = await EventListener(infra.amqp_url, prefix).start(LINES)
        try:
            async with AmiSimulator(port=0, users={"admin": SECRET}, time_scale=0.05) as sim:
                async with running_gateway(gateway_settings(infra, prefix, sim.port)) as gateway:
                    await wait_until(gateway.ready.is_set, 30, "gateway active")
                    stop = asyncio.Event()

                    async def calls_on(line: str) -> None:
                        number = 0
                        while not stop.is_set():
                            number += 1
                            sim.play("inbound-direct-answered", line=line, caller=f"7926{line}{number:05d}")
                            await asyncio.sleep(0.05)

                    callers = [asyncio.create_task(calls_on(line)) for line in LINES]
                    epochs = {gateway.sequencer.epoch}
                    try:
                        await wait_until(lambda: gateway.outbox.published > 200, 30, "events flowing")
                        for n in range(RESTATES):
                            epoch = gateway.sequencer.epoch
                            if n % 8 == 0:
                                # As after a failover: the next renew sees "another server" and restates.
                                gateway.lease.server.run_id = "0" * 40
                            else:
                                # The same restate, started at once, so that many land while a write is out.
                                await gateway._restate_all_lines()
                            await wait_until(lambda e=epoch: gateway.sequencer.epoch != e  # type: ignore[misc]
                                             or gateway.stepped_down.is_set(), 10, "a restate")
                            assert not gateway.stepped_down.is_set(), (
                                f"the gateway stepped down at restate {n + 1}: an outbox write raced the new epoch"
                            )
                            epochs.add(gateway.sequencer.epoch)
                            await asyncio.sleep(random.uniform(0.0, 0.03))  # the outbox takes up writing again
                    finally:
                        stop.set()
                        await asyncio.gather(*callers)
                    assert len(epochs) == RESTATES + 1
                    # Still publishing under the last epoch, and the bus saw every epoch's events in order.
                    published = gateway.outbox.published
                    await wait_until(lambda: gateway.outbox.published > published, 10, "events after the restates")
                    assert not gateway.stepped_down.is_set()
                    sim.hangup_all()
                    await wait_until(lambda: gateway.outbox.depth == 0, 30, "outbox drained")
            last = gateway.sequencer.epoch
            await wait_until(lambda: any(e.epoch == last for e in listener.events), 10, "the last epoch on the bus")
            events: list[LineEvent] = list(listener.events)
            assert_positions_sound(events)
        finally:
            await listener.close()
            with contextlib.suppress(Exception):
                await cleanup(infra, prefix)

    asyncio.run(main())
