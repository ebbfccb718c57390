"""A whole-request deadline for the node's HTTP side (slowloris).

Twisted's HTTP idle timeout restarts on every byte received, so a client sending one header line
every few seconds holds a connection (and a slot under the node's cap) for as long as it likes.
:class:`BoundedHTTPChannel` gives each request a deadline from its first byte (or from the
connection's opening) to its last byte: past it the connection is aborted and counted. A socket
that upgrades to a WebSocket leaves HTTP when its request is complete, so the deadline ends
there; the WebSocket side has its own (first message / SignalR handshake, ``admission.py``).
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import Counter
from twisted.web import http

log = logging.getLogger(__name__)

SLOW_REQUESTS = Counter(
    "cms_node_slow_requests_aborted_total", "HTTP requests not complete within the request deadline (aborted)"
)


_HTTPChannel: Any = http.HTTPChannel  # partly untyped in Twisted


class BoundedHTTPChannel(_HTTPChannel):  # type: ignore[misc]
    def __init__(self, deadline_seconds: float = 10.0) -> None:
        super().__init__()
        self.deadline_seconds = deadline_seconds
        #: what is left of the first request's deadline when the connection was opened elsewhere
        #: (``front_door.py`` read the head before handing the connection over)
        self.first_deadline: float | None = None
        self._deadline: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm(self.first_deadline)

    def dataReceived(self, data: bytes) -> None:
        if self._deadline is None and not self._handlingRequest:
            self._arm()  # the first byte of the next request on a kept-alive connection
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._disarm()
        super().allContentReceived()

    def connectionLost(self, reason: Any) -> None:
        self._disarm()
        super().connectionLost(reason)

    def _arm(self, seconds: float | None = None) -> None:
        if self.deadline_seconds > 0:
            self._deadline = self.callLater(seconds if seconds is not None else self.deadline_seconds, self._expired)

    def _disarm(self) -> None:
        call, self._deadline = self._deadline, None
        cancel(call)

    def _expired(self) -> None:
        self._deadline = None
        abort_slow_request(self.transport, "request", self.deadline_seconds)


def cancel(call: Any) -> None:
    """Cancel a delayed call if it is still pending."""
    if call is not None and call.active():
        call.cancel()


def abort_slow_request(transport: Any, what: str, seconds: float) -> None:
    SLOW_REQUESTS.inc()
    log.info("%s not complete within %.0f s; connection aborted", what, seconds)
    if transport is not None:
        transport.abortConnection()
