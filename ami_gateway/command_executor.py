"""Agents' commands, carried out as AMI actions.

Commands come from the nodes over one durable RabbitMQ queue. Each is checked (fresh enough,
about a call of the agent's own line) and turned into the AMI action(s) that do it; the
answer (success, or an error that says why) goes back to the node's reply queue. The AMI
response is correlated by ActionID inside :class:`AmiSession`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import Counter, Histogram

from ami_gateway.ami_client import AmiError, AmiSession
from services.config import AsteriskConfig
from services.wire import Call, CallState, Command, CommandName, CommandResult

log = logging.getLogger(__name__)

COMMANDS = Counter("cms_commands_total", "Agent commands handled by the gateway", ["command", "outcome"])
COMMAND_SECONDS = Histogram(
    "cms_command_seconds",
    "Time from a node accepting a command to the gateway's answer",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class CommandRefused(Exception):
    """The command cannot be carried out; the message is shown to the agent."""


class CommandExecutor:
    def __init__(
        self,
        config: AsteriskConfig,
        session: Callable[[], AmiSession | None],
        calls_of: Callable[[str], list[Call]],
        *,
        ttl_seconds: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._session = session
        self._calls_of = calls_of
        self._ttl = ttl_seconds
        self._clock = clock
        self._tech = config.protocol.split(",")[0].strip() or "SIP"

    async def execute(self, command: Command) -> CommandResult:
        age = self._clock() - command.issued_at
        outcome = "error"
        try:
            if age > self._ttl:
                raise CommandRefused(f"command expired: it reached the gateway {age:.1f}s after it was sent")
            session = self._session()
            if session is None:
                raise CommandRefused("the PBX is not connected; try again in a moment")
            data = await self._dispatch(session, command)
            outcome = "success"
            return CommandResult(command_id=command.id, ok=True, data=data)
        except CommandRefused as exc:
            log.info("command %s refused: %s", command.name.value, exc, extra={"line": command.line})
            return CommandResult(command_id=command.id, ok=False, error=str(exc))
        except AmiError as exc:
            log.warning("command %s failed: %s", command.name.value, exc, extra={"line": command.line})
            return CommandResult(command_id=command.id, ok=False, error=f"PBX error: {exc}")
        finally:
            COMMANDS.labels(command=command.name.value, outcome=outcome).inc()
            if command.issued_at:
                COMMAND_SECONDS.observe(max(0.0, self._clock() - command.issued_at))

    def _own_call(self, command: Command) -> Call:
        call_id = command.args.get("call_id", "")
        calls = self._calls_of(command.line)
        if not call_id and len(calls) == 1:
            return calls[0]
        for call in calls:
            if call.id == call_id:
                return call
        raise CommandRefused(f"no call {call_id or '(none given)'} on line {command.line}")

    async def _action(self, session: AmiSession, action: str, fields: dict[str, str]) -> dict[str, str]:
        response = (await session.send_action(action, fields))[0]
        if (response.response or "").lower() != "success":
            raise CommandRefused(f"{action} failed: {response.get('Message') or 'no reason given'}")
        return {"message": response.get("Message") or ""}

    async def _dispatch(self, session: AmiSession, command: Command) -> dict[str, str]:
        name = command.name
        args = command.args
        line = command.line
        if name is CommandName.MAKE_CALL:
            number = args.get("number", "").strip()
            if not number or len(number) > 64 or any(c in number for c in "\r\n&,|"):
                raise CommandRefused("make_call needs a valid number")
            context = args.get("context") or self._config.originate_context
            return await self._action(
                session,
                "Originate",
                {
                    "Channel": f"{self._tech}/{line}",
                    "Context": context,
                    "Exten": number,
                    "Priority": "1",
                    "CallerID": f"{number} <{number}>",
                    "Async": "true" if self._config.async_originate else "false",
                    "Timeout": "30000",
                },
            )
        if name is CommandName.HANGUP:
            call = self._own_call(command)
            return await self._action(session, "Hangup", {"Channel": call.channel, "Cause": "16"})
        if name is CommandName.BLIND_TRANSFER:
            call = self._own_call(command)
            target = args.get("number", "").strip()
            if not target:
                raise CommandRefused("blind_transfer needs a number")
            return await self._action(
                session,
                "BlindTransfer",
                {"Channel": call.channel, "Exten": target, "Context": self._config.originate_context},
            )
        if name is CommandName.CONSULT_CALL:
            call = self._own_call(command)
            target = args.get("number", "").strip()
            if not target:
                raise CommandRefused("consult_call needs a number")
            return await self._action(
                session, "Atxfer", {"Channel": call.channel, "Exten": target, "Context": self._config.originate_context}
            )
        if name is CommandName.DTMF:
            call = self._own_call(command)
            digits = args.get("digits", "")
            if not digits or any(d not in "0123456789*#ABCD" for d in digits):
                raise CommandRefused("dtmf needs digits 0-9, *, #, A-D")
            for digit in digits:
                await self._action(session, "PlayDTMF", {"Channel": call.channel, "Digit": digit})
            return {}
        if name in (CommandName.AGENT_PAUSE, CommandName.AGENT_UNPAUSE):
            interface = self._config.queue_extension_format.format(line)
            fields = {"Interface": interface, "Paused": "true" if name is CommandName.AGENT_PAUSE else "false"}
            if args.get("reason"):
                fields["Reason"] = args["reason"]
            return await self._action(session, "QueuePause", fields)
        if name in (CommandName.HOLD, CommandName.UNHOLD):
            call = self._own_call(command)
            if not self._config.parking_lot_context:
                raise CommandRefused("hold is not supported: set parkingLotContext to hold calls by parking them")
            if name is CommandName.HOLD:
                if call.state is not CallState.CONNECTED:
                    raise CommandRefused("only a connected call can be put on hold")
                return await self._action(
                    session, "Park", {"Channel": call.channel, "Parkinglot": self._config.parking_lot_context}
                )
            raise CommandRefused("resume a parked call by picking it up from the parking lot")
        raise CommandRefused(f"{name.value} is not supported yet")
