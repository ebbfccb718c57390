"""Agents' commands, carried out as AMI actions.

Commands come from the nodes over one durable RabbitMQ queue. Each is checked (fresh enough, about a call
of the agent's own line), planned by :func:`~ami_gateway.command_plan.plan_command` (pure) and sent here;
the answer (success, or an error that says why) goes back to the node's reply queue. Every action is
correlated with its response - and, for an asynchronous ``Originate``, with its ``OriginateResponse`` event -
by ActionID inside :class:`~ami_gateway.ami_client.AmiSession`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from prometheus_client import Counter, Histogram

from ami.permissions import WRITE_CLASSES
from ami.protocol import AmiMessage
from ami_gateway.ami_client import AmiError, AmiSession
from ami_gateway.command_plan import AmiAction, CommandPlan, CommandRefused, LineView, check_fresh, plan_command
from ami_gateway.lines import LineMatcher
from services.config import AsteriskConfig
from services.wire import Command, CommandName, CommandResult, DndArgs, DndMode

__all__ = ["CommandExecutor", "CommandRefused"]

log = logging.getLogger(__name__)

COMMANDS = Counter("cms_commands_total", "Agent commands handled by the gateway", ["command", "outcome"])
COMMAND_SECONDS = Histogram(
    "cms_command_seconds",
    "Time from a node accepting a command to the gateway's answer",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
# Every series exists from the start, so rate() sees the first failure too.
for _name in CommandName:
    for _outcome in ("success", "error"):
        COMMANDS.labels(command=_name.value, outcome=_outcome)

# OriginateResponse Reason: the AST_CONTROL code the originated channel ended its dial with.
_ORIGINATE_REASONS = {
    "0": "the line could not be dialled (unknown, unregistered or refused)",
    "1": "the line hung up",
    "3": "the agent's phone did not answer",
    "5": "the agent's phone is busy",
    "8": "the line is congested",
}


def _ok(message: AmiMessage) -> bool:
    return (message.response or "").lower() == "success"


def explain(action: AmiAction, message: str) -> str:
    """An AMI error as the agent (and the administrator reading the log) should read it."""
    if message.lower() == "permission denied":
        first, *others = WRITE_CLASSES.get(action.name.lower()) or ("?",)
        needed = f"{first} (or {', '.join(others)})" if others else first
        return f"{action.name} was refused: the AMI user needs write = {needed} in manager.conf"
    if message.lower() in ("invalid/unknown command", "unknown command"):
        return f"{action.name} is not available on this Asterisk (module not loaded or version too old)"
    if message.lower().startswith(action.name.lower()):
        text = message  # "Originate failed": the name is already there
    else:
        text = f"{action.name} failed: {message or 'no reason given'}"
    if action.name == "Originate":
        # A synchronous Originate fails without a reason when the agent's phone cannot be rung.
        text += " (is the agent's phone registered and reachable?)"
    return text


#: waits before re-sending an action refused because the call's bridge is not formed yet
_BRIDGE_SETTLE_DELAYS = (0.1, 0.25, 0.5)


class CommandExecutor:
    def __init__(
        self,
        config: AsteriskConfig,
        matcher: LineMatcher,
        session: Callable[[], AmiSession | None],
        view: LineView,
        *,
        ttl_seconds: float = 5.0,
        clock: Callable[[], float] = time.time,
        on_done: Callable[[Command, CommandResult], None] | None = None,
    ) -> None:
        self._config = config
        self._matcher = matcher
        self._session = session
        self._view = view
        self._ttl = ttl_seconds
        self._clock = clock
        self._on_done = on_done

    async def execute(self, command: Command) -> CommandResult:
        outcome = "error"
        try:
            check_fresh(command, self._clock(), self._ttl)
            session = self._connected()
            dnd_now = None
            if isinstance(command.args, DndArgs) and command.args.mode is DndMode.TOGGLE:
                dnd_now = await self._dnd_state(session, command.line)
            plan = plan_command(command, self._view, self._config, self._matcher, dnd_now=dnd_now)
            if plan.retriever is not None:
                self._view.expect_retriever(command.line, *plan.retriever)
            data = await self.carry_out(plan, session)
            outcome = "success"
            result = CommandResult(command_id=command.id, ok=True, data=data)
        except CommandRefused as exc:
            log.info("command %s refused: %s", command.name.value, exc, extra={"line": command.line})
            result = CommandResult(command_id=command.id, ok=False, error=str(exc))
        except AmiError as exc:
            log.warning("command %s failed: %s", command.name.value, exc, extra={"line": command.line})
            result = CommandResult(command_id=command.id, ok=False, error=f"PBX error: {exc}")
        COMMANDS.labels(command=command.name.value, outcome=outcome).inc()
        if command.issued_at:
            COMMAND_SECONDS.observe(max(0.0, self._clock() - command.issued_at))
        if self._on_done is not None:
            self._on_done(command, result)
        return result

    def _connected(self) -> AmiSession:
        session = self._session()
        if session is None:
            raise CommandRefused("the PBX is not connected; try again in a moment")
        return session

    async def carry_out(self, plan: CommandPlan, session: AmiSession | None = None) -> dict[str, str]:
        """Send the plan's actions in order; what they did, or :class:`CommandRefused` / ``AmiError``."""
        session = session or self._connected()
        data = dict(plan.data)
        for action in plan.actions:
            data.update(await self._run(session, action))
        return data

    async def _run(self, session: AmiSession, action: AmiAction) -> dict[str, str]:
        answer = await session.send_action(
            action.name, action.fields, timeout=action.timeout, until_event=action.until_event
        )
        response = answer[0]
        for delay in _BRIDGE_SETTLE_DELAYS:
            # Asterisk reports the answer (DialEnd ANSWER) a few ms before the two channels enter
            # their bridge; an agent quick enough to consult or transfer in that gap gets "not in
            # a bridge". Give the bridge a moment instead of failing the agent's click.
            if _ok(response) or "not in a bridge" not in (response.get("Message") or ""):
                break
            await asyncio.sleep(delay)
            answer = await session.send_action(
                action.name, action.fields, timeout=action.timeout, until_event=action.until_event
            )
            response = answer[0]
        if not _ok(response):
            message = (response.get("Message") or "").strip()
            if message in action.tolerated:
                return {}
            if action.fallback is not None and (
                not action.fallback_when or message.lower().startswith(tuple(w.lower() for w in action.fallback_when))
            ):
                log.info("%s failed (%s); trying %s", action.name, message, action.fallback.name)
                return await self._run(session, action.fallback)
            raise CommandRefused(explain(action, message))
        if action.until_event:
            outcome = answer[-1]
            if outcome.event != action.until_event:
                raise CommandRefused(f"{action.name}: no {action.until_event} came back")
            if not _ok(outcome):
                reason = (outcome.get("Reason") or "").strip()
                why = _ORIGINATE_REASONS.get(reason, f"reason {reason or 'unknown'}")
                raise CommandRefused(f"the call could not be started: {why}")
            return {"uniqueid": outcome.get("Uniqueid") or ""}
        return {}

    async def _dnd_state(self, session: AmiSession, line: str) -> bool:
        action = AmiAction("DBGet", (("Family", "DND"), ("Key", line)))
        answer = await session.send_action(action.name, action.fields, expect_list=True)
        if not _ok(answer[0]):
            message = (answer[0].get("Message") or "").strip()
            if message.lower().startswith("database entry not found"):
                return False
            raise CommandRefused(explain(action, message))
        values = [m.get("Val") or "" for m in answer[1:] if m.event == "DBGetResponse"]
        return bool(values) and values[0].strip().upper() not in ("", "NO", "0", "FALSE")
