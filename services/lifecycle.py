"""Process entry-point plumbing shared by every service: signals and the stop future."""

from __future__ import annotations

import asyncio
import signal


def stop_event_on_signals(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    """An Event set by SIGTERM or SIGINT, so ``main`` can run its orderly shutdown."""
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
