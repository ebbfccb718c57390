"""The contract between the AMI gateway and the WebSocket nodes.

Everything that crosses RabbitMQ or is stored in Redis is one of the frozen types below,
encoded as compact JSON. The gateway is the only producer of :class:`LineEvent`; nodes are
the only producers of :class:`Command`. ``SCHEMA_VERSION`` is carried in every message so a
rolling upgrade can refuse (rather than misread) a message from a newer peer.

Continuity: each line has a stream position ``(epoch, seq)``. ``seq`` grows by one per event
of that line, without gaps, for as long as ``epoch`` is unchanged. A new epoch means "continuity
was lost; forget what you know about this line and take a snapshot" (centrifuge's
StreamPosition idea).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

SCHEMA_VERSION = 1


class WireError(ValueError):
    """A message on the bus could not be decoded into the schema."""


class CallState(StrEnum):
    RINGING = "ringing"
    CONNECTED = "connected"
    HELD = "held"
    BUSY = "busy"
    FINISHED = "finished"


class Direction(StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"
    INTERNAL = "internal"


class EventType(StrEnum):
    """What happened to a line. Nodes map these onto the Creatio client's event numbers."""

    RING_STARTED = "ring_started"
    COMMUTATION_STARTED = "commutation_started"
    RING_FINISHED = "ring_finished"
    HOLD_STARTED = "hold_started"
    HOLD_ENDED = "hold_ended"
    CALL_INFO_CHANGED = "call_info_changed"
    ABONENT_BUSY = "abonent_busy"
    DTMF_ENTERED = "dtmf_entered"
    AGENT_STATE_CHANGED = "agent_state_changed"
    #: the call's record was written to Creatio; ``call.database_uid`` is its id there
    CALL_SAVED = "call_saved"
    #: saving the call's record in Creatio was given up; the agent is told (CALL_SAVING_ERROR)
    CALL_SAVE_FAILED = "call_save_failed"


@dataclass(frozen=True, slots=True)
class Call:
    """One call as one line sees it.

    ``id`` is stable for the life of the call on that line (the line's own channel may be
    replaced by a transfer, the id is not). ``linked_id`` groups all legs of one call.
    """

    id: str
    line: str
    linked_id: str
    channel: str
    direction: Direction
    state: CallState
    caller_number: str = ""
    caller_name: str = ""
    called_number: str = ""
    called_name: str = ""
    queue: str = ""
    redirecting_number: str = ""
    redirection_number: str = ""
    started_at: float = 0.0
    answered_at: float | None = None
    ended_at: float | None = None
    hangup_cause: int | None = None
    hangup_cause_text: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    #: id of the call's record in Creatio once saved (ami_gateway.call_records), else ""
    database_uid: str = ""

    @property
    def active(self) -> bool:
        return self.state not in (CallState.FINISHED, CallState.BUSY)

    @property
    def on_line(self) -> bool:
        """Still on the line: active, or busy (Creatio keeps a busy call, with Drop, until RING_FINISHED)."""
        return self.state is not CallState.FINISHED

    def evolve(self, **changes: Any) -> Call:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        # Spelled out: dataclasses.asdict recurses and deep-copies every value, and this runs for every line
        # event, up to three times (history entry, calls hash, broker body): it was a quarter of the outbox's
        # CPU. tests/unit/test_wire_encoding.py keeps it equal to asdict.
        return {
            "id": self.id, "line": self.line, "linked_id": self.linked_id, "channel": self.channel,
            "direction": self.direction, "state": self.state, "caller_number": self.caller_number,
            "caller_name": self.caller_name, "called_number": self.called_number, "called_name": self.called_name,
            "queue": self.queue, "redirecting_number": self.redirecting_number,
            "redirection_number": self.redirection_number, "started_at": self.started_at,
            "answered_at": self.answered_at, "ended_at": self.ended_at, "hangup_cause": self.hangup_cause,
            "hangup_cause_text": self.hangup_cause_text, "extra": dict(self.extra),
            "database_uid": self.database_uid,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Call:
        try:
            return cls(
                id=str(data["id"]),
                line=str(data["line"]),
                linked_id=str(data["linked_id"]),
                channel=str(data["channel"]),
                direction=Direction(data["direction"]),
                state=CallState(data["state"]),
                caller_number=str(data.get("caller_number", "")),
                caller_name=str(data.get("caller_name", "")),
                called_number=str(data.get("called_number", "")),
                called_name=str(data.get("called_name", "")),
                queue=str(data.get("queue", "")),
                redirecting_number=str(data.get("redirecting_number", "")),
                redirection_number=str(data.get("redirection_number", "")),
                started_at=float(data.get("started_at", 0.0)),
                answered_at=_opt_float(data.get("answered_at")),
                ended_at=_opt_float(data.get("ended_at")),
                hangup_cause=_opt_int(data.get("hangup_cause")),
                hangup_cause_text=str(data.get("hangup_cause_text", "")),
                extra={str(k): str(v) for k, v in dict(data.get("extra") or {}).items()},
                database_uid=str(data.get("database_uid", "")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise WireError(f"bad call object: {exc!r}") from exc


@dataclass(frozen=True, slots=True)
class AgentState:
    """Queue state of the agent on a line: paused in all its queues or not, and why."""

    line: str
    paused: bool
    reason: str = ""
    queues: tuple[str, ...] = ()
    #: the Creatio agent-state code this is (services.agent_states), "" when not decided
    code: str = ""
    #: who made the last change: "agent" (a state chosen through us), "pbx" (a supervisor, the dialplan,
    #: another tool), "" (not known: first seen, or listed after a reconnect)
    set_by: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "paused": self.paused, "reason": self.reason, "queues": list(self.queues),
                "code": self.code, "set_by": self.set_by}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AgentState:
        try:
            return cls(
                line=str(data["line"]),
                paused=bool(data["paused"]),
                reason=str(data.get("reason", "")),
                queues=tuple(str(q) for q in data.get("queues", ())),
                code=str(data.get("code", "")),
                set_by=str(data.get("set_by", "")),
            )
        except (KeyError, TypeError) as exc:
            raise WireError(f"bad agent state: {exc!r}") from exc


@dataclass(frozen=True, slots=True)
class LineEvent:
    """One event of one line, as published by the gateway and kept in the line's history."""

    line: str
    type: EventType
    epoch: str = ""
    seq: int = 0
    call: Call | None = None
    agent: AgentState | None = None
    digits: str = ""
    #: wall-clock time (time.time()) when the AMI bytes that caused this event arrived.
    ami_received_at: float = 0.0
    #: the encoded body, once asked for: the gateway stores it in the history and publishes the same bytes
    _body: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def positioned(self, epoch: str, seq: int) -> LineEvent:
        return replace(self, epoch=epoch, seq=seq)

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": SCHEMA_VERSION,
            "line": self.line,
            "type": self.type.value,
            "epoch": self.epoch,
            "seq": self.seq,
            "call": self.call.to_dict() if self.call is not None else None,
            "agent": self.agent.to_dict() if self.agent is not None else None,
            "digits": self.digits,
            "ami_received_at": self.ami_received_at,
        }

    def encode(self) -> bytes:
        body = self._body
        if body is None:
            body = _dumps(self.to_dict())
            object.__setattr__(self, "_body", body)  # frozen: the event cannot change under its body
        return body

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LineEvent:
        _check_version(data)
        try:
            call = data.get("call")
            agent = data.get("agent")
            return cls(
                line=str(data["line"]),
                type=EventType(data["type"]),
                epoch=str(data.get("epoch", "")),
                seq=int(data.get("seq", 0)),
                call=Call.from_dict(call) if call else None,
                agent=AgentState.from_dict(agent) if agent else None,
                digits=str(data.get("digits", "")),
                ami_received_at=float(data.get("ami_received_at", 0.0)),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise WireError(f"bad line event: {exc!r}") from exc

    @classmethod
    def decode(cls, raw: bytes | str) -> LineEvent:
        return cls.from_dict(_loads(raw))


class CommandName(StrEnum):
    MAKE_CALL = "make_call"
    HANGUP = "hangup"
    ANSWER = "answer"
    HOLD = "hold"
    UNHOLD = "unhold"
    BLIND_TRANSFER = "blind_transfer"
    CONSULT_CALL = "consult_call"
    COMPLETE_TRANSFER = "complete_transfer"
    CANCEL_TRANSFER = "cancel_transfer"
    DTMF = "dtmf"
    SET_DND = "set_dnd"
    AGENT_PAUSE = "agent_pause"
    AGENT_UNPAUSE = "agent_unpause"
    WRAP_UP = "wrap_up"
    #: who saves this line's calls in Creatio: args contact (UserContactUId), service_url, user
    RECORD_OWNER = "record_owner"


@dataclass(frozen=True, slots=True)
class Command:
    """A request from an agent's connection, carried out by the gateway as AMI actions."""

    id: str
    line: str
    name: CommandName
    args: dict[str, str] = field(default_factory=dict)
    #: wall-clock time when the node accepted the command; the gateway refuses stale ones.
    issued_at: float = 0.0

    def encode(self) -> bytes:
        return _dumps(
            {
                "v": SCHEMA_VERSION,
                "id": self.id,
                "line": self.line,
                "name": self.name.value,
                "args": self.args,
                "issued_at": self.issued_at,
            }
        )

    @classmethod
    def decode(cls, raw: bytes | str) -> Command:
        data = _loads(raw)
        _check_version(data)
        try:
            args = data.get("args") or {}
            if not isinstance(args, dict):
                raise TypeError("args must be an object")
            return cls(
                id=str(data["id"]),
                line=str(data["line"]),
                name=CommandName(data["name"]),
                args={str(k): str(v) for k, v in args.items()},
                issued_at=float(data.get("issued_at", 0.0)),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise WireError(f"bad command: {exc!r}") from exc


@dataclass(frozen=True, slots=True)
class CommandResult:
    command_id: str
    ok: bool
    error: str = ""
    data: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return _dumps(
            {"v": SCHEMA_VERSION, "command_id": self.command_id, "ok": self.ok, "error": self.error,
             "data": self.data}
        )

    @classmethod
    def decode(cls, raw: bytes | str) -> CommandResult:
        data = _loads(raw)
        _check_version(data)
        try:
            return cls(
                command_id=str(data["command_id"]),
                ok=bool(data["ok"]),
                error=str(data.get("error", "")),
                data={str(k): str(v) for k, v in dict(data.get("data") or {}).items()},
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise WireError(f"bad command result: {exc!r}") from exc


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _loads(raw: bytes | str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise WireError("message is not a JSON object")
    return data


def _check_version(data: dict[str, Any]) -> None:
    version = data.get("v")
    if version != SCHEMA_VERSION:
        raise WireError(f"unsupported schema version {version!r} (this build speaks {SCHEMA_VERSION})")


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)
