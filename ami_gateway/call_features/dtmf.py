"""DTMF keys the agent pressed, one of the call tracker's features (ami_gateway/tracker.py).

Rule 10 - DTMF. DTMF_ENTERED means "DTMF characters sent" in Creatio: its panel shows the digits the *agent*
dialled, never the far end's. With ``read = dtmf`` Asterisk sends ``DTMFBegin``/``DTMFEnd``; a ``DTMFEnd`` with
``Direction: Received`` on a line's phone channel is a key the agent pressed on the phone: DTMF_ENTERED with the
digit for the line's current call (its consultation call while it consults, Rule 7). Digits other parties press
(``Received`` on any other channel), ``Sent`` events (Asterisk passing a digit on, or ``PlayDTMF``) and
``DTMFBegin`` (endpoints without variable-length DTMF only produce ``DTMFEnd``) are not reported, so each press
is reported once. Digits the agent sends from the CRM (the ``dtmf`` command, played with ``PlayDTMF``) are
echoed by the gateway once Asterisk accepted them (``ami_gateway.app``).
"""

from __future__ import annotations

import logging

from ami.protocol import AmiMessage
from ami_gateway.channel_graph import ChannelGraph
from services.wire import CallState, EventType, LineEvent

__all__ = ["Dtmf"]

log = logging.getLogger(__name__)

_DTMF_DIGITS = frozenset("0123456789*#ABCDEabcde")


class Dtmf:
    """Rule 10; see the module docstring."""

    def __init__(self, graph: ChannelGraph) -> None:
        self._graph = graph

    def on_dtmf(self, msg: AmiMessage, event: str, at: float, out: list[LineEvent]) -> None:
        """Rule 10: a key the agent pressed on the line's phone is DTMF_ENTERED for the line's current call."""
        if event != "dtmfend" or (msg.get("Direction") or "").strip().lower() != "received":
            return
        digit = (msg.get("Digit") or "").strip()
        if len(digit) != 1 or digit not in _DTMF_DIGITS:
            log.debug("DTMFEnd with digit %r ignored", digit)
            return
        ch = self._graph.find(msg, "")
        if ch is None or ch.line is None or ch.local_half:
            return
        lc = ch.call
        consulting = next((c.call for c in self._graph.chans.values() if c.consult_of == ch.key and c.call is not None
                           and c.call.state is not CallState.FINISHED), None)
        if consulting is not None:
            lc = consulting
        if lc is None or lc.state is CallState.FINISHED:
            return
        out.append(LineEvent(line=lc.line, type=EventType.DTMF_ENTERED, call=lc.call, digits=digit.upper(),
                             ami_received_at=at))
