"""The contract between the AMI gateway and the WebSocket nodes.

Everything that crosses RabbitMQ or is stored in Redis is one of the frozen types below,
encoded as compact JSON. The gateway is the only producer of :class:`LineEvent`; nodes are
the only producers of :class:`Command`. ``SCHEMA_VERSION`` is carried in every message so a
rolling upgrade can refuse (rather than misread) a message from a newer peer.

Continuity: each line has a :class:`StreamPosition` ``(epoch, seq)``. ``seq`` grows by one per
event of that line, without gaps, for as long as ``epoch`` is unchanged. A new epoch means
"continuity was lost; forget what you know about this line and take a snapshot" (centrifuge's
StreamPosition idea).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, TypeVar, get_type_hints

SCHEMA_VERSION = 1


class WireError(ValueError):
    """A message on the bus could not be decoded into the schema."""


# ---- stream positions ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """Where a line's stream stands: event ``seq`` of ``epoch``.

    Epochs are the gateway's claim times in milliseconds, digit strings that only grow; ``""``
    means "no epoch yet" (a line never written) and comes before every real one. ``seq`` counts
    a line's events from 1 within an epoch, so ``StreamPosition("", 0)`` is the start of a line.

    Positions compare by (epoch as a number, seq): the epoch is text on the wire and in Redis,
    and "999" < "1000" as text. Equality is field by field.
    """

    epoch: str = ""
    seq: int = 0

    def order(self) -> tuple[int, int]:
        """The sort key: epochs as numbers, ``""`` (or anything not a number) as 0."""
        return (int(self.epoch) if self.epoch.isdigit() else 0, self.seq)

    def newer_epoch_than(self, other: StreamPosition) -> bool:
        """Whether this position's epoch comes after ``other``'s (whatever the seqs)."""
        return self.order()[0] > other.order()[0]

    def __lt__(self, other: StreamPosition) -> bool:
        return self.order() < other.order()

    def __le__(self, other: StreamPosition) -> bool:
        return self.order() <= other.order()

    def __gt__(self, other: StreamPosition) -> bool:
        return self.order() > other.order()

    def __ge__(self, other: StreamPosition) -> bool:
        return self.order() >= other.order()

    def __str__(self) -> str:
        return f"{self.epoch or '-'}/{self.seq}"

    def encode(self) -> str:
        """``"<epoch> <seq>"``, ``-`` for no epoch: the form kept in Redis by the delivery log."""
        return f"{self.epoch or '-'} {self.seq}"

    @classmethod
    def decode(cls, raw: bytes | str | None) -> StreamPosition | None:
        """The :meth:`encode` form back, or None when ``raw`` is missing or not that form."""
        if raw is None:
            return None
        try:
            text = raw.decode() if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:
            return None  # a garbled record: as if there were none (the agent gets a snapshot)
        epoch, _, seq = text.partition(" ")
        if not seq.isdigit():
            return None
        return cls("" if epoch == "-" else epoch, int(seq))


#: the start of a line: no epoch, no event yet
LINE_START = StreamPosition()


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


class DndMode(StrEnum):
    """set_dnd: on, off, or the other way round from what the PBX says now."""

    ON = "on"
    OFF = "off"
    TOGGLE = "toggle"


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

    @property
    def position(self) -> StreamPosition:
        return StreamPosition(self.epoch, self.seq)

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
    #: who saves this line's calls in Creatio (RecordOwnerArgs)
    RECORD_OWNER = "record_owner"


# ---- command arguments: one frozen type per command (COMMAND_ARGS says which) --------------------------
#
# On the wire they stay the JSON object of version 1, so a rolling upgrade may mix old and new nodes and
# gateways without a schema bump: every field keeps its name and its string value, except WrapUpArgs.active,
# now a JSON boolean. An old gateway reads it with str(): "True"/"False", which it lower-cases, so it still
# understands a new node; a new gateway accepts the old "true"/"false" strings. Unknown fields are ignored
# (a newer node may add one); a missing required field or a value of the wrong type is a BadCommand.
#
# What a field must look like beyond its type (a dialable number, DTMF digits, an allowed context) is the
# gateway's planner's to judge: it answers the agent with the reason.


@dataclass(frozen=True, slots=True)
class CallArgs:
    """hangup, answer, hold, unhold. No ``call_id``: the line's only call."""

    call_id: str = ""


@dataclass(frozen=True, slots=True)
class DialArgs:
    """make_call. ``context``: the user's own dialplan context; empty = the gateway's originateContext."""

    number: str
    context: str = ""


@dataclass(frozen=True, slots=True)
class TransferArgs:
    """blind_transfer, consult_call: ``call_id`` to ``number`` in ``context`` (as DialArgs)."""

    number: str
    call_id: str = ""
    context: str = ""


@dataclass(frozen=True, slots=True)
class TransferPairArgs:
    """complete_transfer, cancel_transfer: the first call and its consultation."""

    call_id: str = ""
    consult_call_id: str = ""


@dataclass(frozen=True, slots=True)
class DtmfArgs:
    """dtmf: ``digits`` played to the party the line talks to."""

    digits: str
    call_id: str = ""


@dataclass(frozen=True, slots=True)
class DndArgs:
    """set_dnd. Creatio's SetDnd carries nothing: the node always asks for a toggle."""

    mode: DndMode = DndMode.TOGGLE


@dataclass(frozen=True, slots=True)
class PauseArgs:
    """agent_pause. ``state_code``: the Creatio agent-state code chosen, which the gateway reports back
    (services/agent_states.py); empty = the reason stands for it."""

    reason: str = ""
    state_code: str = ""


@dataclass(frozen=True, slots=True)
class NoArgs:
    """agent_unpause."""


@dataclass(frozen=True, slots=True)
class WrapUpArgs:
    """wrap_up: after-call work on (paused with the wrap-up reason) or off."""

    active: bool = True


@dataclass(frozen=True, slots=True)
class RecordOwnerArgs:
    """record_owner: the Creatio contact (UserContactUId) whose calls these are, its site, its user."""

    contact: str
    service_url: str = ""
    user: str = ""


CommandArgs = (
    CallArgs | DialArgs | TransferArgs | TransferPairArgs | DtmfArgs | DndArgs | PauseArgs | NoArgs | WrapUpArgs
    | RecordOwnerArgs
)

COMMAND_ARGS: dict[CommandName, type[CommandArgs]] = {
    CommandName.MAKE_CALL: DialArgs,
    CommandName.HANGUP: CallArgs,
    CommandName.ANSWER: CallArgs,
    CommandName.HOLD: CallArgs,
    CommandName.UNHOLD: CallArgs,
    CommandName.BLIND_TRANSFER: TransferArgs,
    CommandName.CONSULT_CALL: TransferArgs,
    CommandName.COMPLETE_TRANSFER: TransferPairArgs,
    CommandName.CANCEL_TRANSFER: TransferPairArgs,
    CommandName.DTMF: DtmfArgs,
    CommandName.SET_DND: DndArgs,
    CommandName.AGENT_PAUSE: PauseArgs,
    CommandName.AGENT_UNPAUSE: NoArgs,
    CommandName.WRAP_UP: WrapUpArgs,
    CommandName.RECORD_OWNER: RecordOwnerArgs,
}

# The field types, resolved once (the annotations are strings under `from __future__ import annotations`).
_ARG_TYPES: dict[CommandName, dict[str, Any]] = {name: get_type_hints(kind) for name, kind in COMMAND_ARGS.items()}

_A = TypeVar("_A", bound=CommandArgs)


class BadCommand(WireError):
    """A command whose arguments do not fit its type; the message names the command and the field.

    ``command_id`` is set when the envelope was readable, so the sender can still be answered."""

    def __init__(self, message: str, command_id: str = "") -> None:
        super().__init__(message)
        self.command_id = command_id


def _arg_value(command: CommandName, name: str, kind: Any, value: Any) -> Any:
    where = f"{command.value}.{name}"
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"  # what version-1 nodes send
        raise BadCommand(f"{where} must be true or false, not {value!r:.40}")
    if not isinstance(value, str):
        raise BadCommand(f"{where} must be a string, not {type(value).__name__}")
    if isinstance(kind, type) and issubclass(kind, StrEnum):
        try:
            return kind(value.strip().lower())
        except ValueError:
            raise BadCommand(
                f"{where} must be one of {', '.join(m.value for m in kind)}, not {value!r:.40}"
            ) from None
    return value


def command_args(name: CommandName, values: Mapping[str, Any]) -> CommandArgs:
    """The typed arguments of command ``name`` from their JSON object; raises :class:`BadCommand`."""
    kind = COMMAND_ARGS[name]
    hints = _ARG_TYPES[name]
    found: dict[str, Any] = {}
    for spec in fields(kind):
        if spec.name in values:
            found[spec.name] = _arg_value(name, spec.name, hints[spec.name], values[spec.name])
        elif spec.default is MISSING:
            raise BadCommand(f"{name.value}.{spec.name} is missing")
    return kind(**found)


@dataclass(frozen=True, slots=True)
class Command:
    """A request from an agent's connection, carried out by the gateway as AMI actions.

    ``args`` is the type :data:`COMMAND_ARGS` gives for ``name``; left out, the defaults of that type
    (only for a command whose arguments all have one)."""

    id: str
    line: str
    name: CommandName
    args: CommandArgs | None = None
    #: wall-clock time when the node accepted the command; the gateway refuses stale ones.
    issued_at: float = 0.0

    def __post_init__(self) -> None:
        kind = COMMAND_ARGS[self.name]
        if self.args is None:
            object.__setattr__(self, "args", command_args(self.name, {}))
        elif type(self.args) is not kind:
            raise TypeError(f"{self.name.value} takes {kind.__name__}, not {type(self.args).__name__}")

    def args_as(self, kind: type[_A]) -> _A:
        """``args`` as the type the caller expects for this command (a programming error if it is not)."""
        args = self.args
        if not isinstance(args, kind):
            raise TypeError(f"{self.name.value} carries {type(args).__name__}, not {kind.__name__}")
        return args

    def encode(self) -> bytes:
        return _dumps(
            {
                "v": SCHEMA_VERSION,
                "id": self.id,
                "line": self.line,
                "name": self.name.value,
                "args": asdict(self.args) if self.args is not None else {},
                "issued_at": self.issued_at,
            }
        )

    @classmethod
    def decode(cls, raw: bytes | str) -> Command:
        data = _loads(raw)
        _check_version(data)
        command_id = str(data.get("id", ""))
        try:
            name = CommandName(data["name"])
            args = data.get("args") or {}
            if not isinstance(args, dict):
                raise BadCommand(f"{name.value}: args must be an object")
            return cls(
                id=str(data["id"]),
                line=str(data["line"]),
                name=name,
                args=command_args(name, args),
                issued_at=float(data.get("issued_at", 0.0)),
            )
        except BadCommand as exc:
            raise BadCommand(f"bad command: {exc}", command_id) from None
        except (KeyError, ValueError, TypeError) as exc:
            raise BadCommand(f"bad command: {exc!r}", command_id) from exc


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
