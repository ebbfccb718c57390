"""The node's delivery log over the in-memory store: delivery never waits for the store, writes
back off while it is away, and the latest positions reach the next node once it answers."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from services.delivery_log import AgentKey, DeliveryLog
from services.delivery_log_memory import MemoryDeliveryStore
from services.wire import StreamPosition
from tests.support.waiting import until


def _metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_positions_survive_a_store_outage_and_are_written_after() -> None:
    async def main() -> None:
        store = MemoryDeliveryStore()
        log = DeliveryLog(store, ttl_seconds=60, flush_interval=0.02)
        agent = AgentKey("312", "user-1", "tab-1")
        log.attach(agent, StreamPosition("100", 1))
        await until(lambda: _metric("cms_node_delivery_log_flushes_total") > 0)
        store.outage.fail()
        errors = _metric("cms_node_delivery_log_errors_total")
        for seq in range(2, 50):
            log.note(agent, StreamPosition("100", seq))  # the hot path never touches the store
        await until(lambda: _metric("cms_node_delivery_log_errors_total") >= errors + 3, what="three failed writes")
        await asyncio.sleep(1.0)
        failed = _metric("cms_node_delivery_log_errors_total") - errors
        assert 3 <= failed < 15, failed  # backing off: far fewer than one try per 20 ms flush

        store.outage.recover()
        reader = DeliveryLog(store)
        for _ in range(300):
            if await reader.last(agent) == StreamPosition("100", 49):
                break
            await asyncio.sleep(0.05)
        assert await reader.last(agent) == StreamPosition("100", 49)
        log.detach(agent)
        await log.close()

    asyncio.run(main())


def test_an_agent_that_just_left_is_read_from_memory_before_its_write_lands() -> None:
    async def main() -> None:
        store = MemoryDeliveryStore()
        log = DeliveryLog(store, flush_interval=60)
        agent = AgentKey("313", "user-1", "tab-1")
        log.attach(agent, StreamPosition("100", 4))
        log.note(agent, StreamPosition("100", 5))
        log.detach(agent)
        store.outage.fail()  # the final write cannot land yet
        assert await log.last(agent) == StreamPosition("100", 5)
        store.outage.recover()
        await log.close()
        assert await DeliveryLog(store).last(agent) == StreamPosition("100", 5)

    asyncio.run(main())
