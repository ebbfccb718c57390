"""Creatio agent-state codes and what each means on the PBX. Pure; shared by the gateway and the nodes.

Creatio's header offers the ``SysMsgUserState.Code`` strings the admin attached to the messaging library
(the stock Asterisk library lists only ``Active``; admins add their own) and shows any code it does not
know as "Active". So the codes are configuration (the ``AgentStates`` block), and every state the cluster
reports must be one of them, exactly as the agent chose it.

Rules:

1. A *ready* code unpauses the agent's queue interface in all queues; the first ready code is what an
   unpaused agent is reported as.
2. The *wrap-up* code pauses with the wrap-up reason (after-call work); it is reported for a pause with
   that reason.
3. Any other code pauses with the reason configured for it, else the reason the client sent, else the
   code itself (what CMS does), so the PBX (queue_log, supervisors' screens) shows which state it was.
4. A pause reported by the PBX is the code the agent chose when its reason is the one that choice used
   (the gateway remembers each line's last choice, and keeps it in Redis with the agent state); else the
   configured code whose reason it is; else ``pbx_paused`` - a supervisor's pause from the PBX, say.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from services.wire import AgentState

#: QueuePause reason of the wrap-up state (after-call work).
WRAP_UP_REASON: Final = "Wrap-up"


@dataclass(frozen=True, slots=True)
class AgentStateCodes:
    ready: str = "Active"
    #: code reported for a PBX pause that matches no choice and no configured reason (Rule 4)
    paused: str = "Paused"
    wrap_up: str = "WrapUp"
    #: more codes meaning ready (Rule 1)
    other_ready: tuple[str, ...] = ()
    #: (code, QueuePause reason) for pausing codes (Rule 3); codes not listed pause with their own name
    pause_reasons: tuple[tuple[str, str], ...] = ()
    wrap_up_reason: str = WRAP_UP_REASON
    #: what wins when the header re-sends the profile's state on connect and the PBX says otherwise:
    #: "pbx" (the PBX's state is kept and reported) or "profile" (the re-sent state is carried out)
    on_connect: str = "pbx"

    def is_ready(self, code: str) -> bool:
        return code == self.ready or code in self.other_ready

    def is_wrap_up(self, code: str) -> bool:
        return code == self.wrap_up

    def reason_for(self, code: str, client_reason: str = "") -> str:
        for known, reason in self.pause_reasons:
            if known == code:
                return reason or code
        return client_reason.strip() or code

    def code_of(self, paused: bool, reason: str, chosen: tuple[str, str] | None = None) -> str:
        """The code for a PBX pause state (Rule 4); ``chosen`` = (code, reason) of the line's last choice."""
        if not paused:
            return self.ready
        if chosen is not None and chosen[1] == reason:
            return chosen[0]
        folded = reason.strip().casefold()
        if folded and folded == self.wrap_up_reason.casefold():
            return self.wrap_up
        for code, configured in self.pause_reasons:
            if folded and folded == (configured or code).casefold():
                return code
        return self.paused

    def code_for(self, agent: AgentState) -> str:
        """The code for an agent state: the one the gateway decided (kept in Redis), else derived."""
        return agent.code or self.code_of(agent.paused, agent.reason)


DEFAULT_AGENT_CODES: Final = AgentStateCodes()
