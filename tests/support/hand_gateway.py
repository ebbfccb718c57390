"""The gateway's output played by hand: number, store, publish, each step skippable, so a test can
order, delay or drop them the way a restart or an outage does."""

from __future__ import annotations

from typing import Generic, TypeVar

from ami_gateway.event_outbox import EventSink, Sequencer
from services.line_state import LineWriter
from services.wire import LineEvent

W = TypeVar("W", bound=LineWriter)
E = TypeVar("E", bound=EventSink)


class HandGateway(Generic[W, E]):
    """The gateway's output by hand, over any line state writer and event sink (memory or real)."""

    def __init__(self, writer: W, publisher: E, sequencer: Sequencer | None = None) -> None:
        self.writer: W = writer
        self.publisher: E = publisher
        self.sequencer = sequencer or Sequencer("")

    async def restart(self) -> str:
        """A new term: a new epoch, every line numbered from 1 again."""
        epoch = await self.writer.new_epoch()
        self.sequencer.restart(epoch)
        return epoch

    async def emit(self, *events: LineEvent, store: bool = True, publish: bool = True) -> list[LineEvent]:
        """Number the events, then store and publish them (Redis first, as the outbox does)."""
        numbered = [self.sequencer.position(e) for e in events]
        if store:
            await self.writer.write(numbered)
        if publish:
            await self.publisher.publish(numbered)
        return numbered
