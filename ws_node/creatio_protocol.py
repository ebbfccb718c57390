"""Wire codec for Creatio's messaging client (``Terrasoft.MsgServiceCtiProvider``).

Pure functions and constants, no I/O. Everything here was read from the client's public
source; ``docs/creatio-protocol.md`` explains each rule and where it comes from. The
points that shape this module:

* The client sends one JSON object per frame (``MsgCommandInfo``). Some parameters are
  JSON *strings* inside that JSON (``connectionParams``, ``sessionServiceParams``,
  ``commandExecutor``, ``consultationCall``, ``currentCall``, ``consultCall``);
  :func:`decode_client_message` decodes them so callers see plain dicts.
* The server answers with ``{"eventType": <int>, "content": ..., "connectionUId": ...,
  "commandUId": "", "contentType": "", "privateData": ...}``. The client runs
  ``Terrasoft.decode`` (``JSON.parse`` for strings) on ``content`` of most events, so
  content is always a JSON *text* here, except LIBRARY_INITIALIZED (used raw as the
  library instance uid) and CONNECTION_CREATED (ignored; the uid is read from the
  envelope).
* The client builds ``Terrasoft.Telephony.Call`` objects straight from call content and
  rejects (logs, or throws in debug mode) any property the class does not declare, so a
  call object carries only the declared camelCase fields; everything else of ours goes
  into ``callContext``.

Encoding is done once per event per node and the text is sent to every tab of the line,
so the hot path is plain ``json.dumps`` of small dicts with a cached GUID derivation.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag, StrEnum
from functools import lru_cache
from typing import Any, Final

from services.agent_states import DEFAULT_AGENT_CODES, AgentStateCodes
from services.wire import Call, CallState, Direction, EventType, LineEvent

# --------------------------------------------------------------------------------------
# Enums, numbers exactly as in Terrasoft/integration/telephony/telephony-enums.js
# --------------------------------------------------------------------------------------


class MsgEventType(IntEnum):
    NONE = 0
    LIBRARY_INITIALIZED = 1
    CONNECTION_CREATED = 2
    ERROR = 3
    COMMAND_INFO = 4
    RING_STARTED = 5
    RING_FINISHED = 6
    COMMUTATION_STARTED = 7
    PUT_HOLD_ACTION = 8
    END_HOLD_ACTION = 9
    ACTIVE_CALL_SNAPSHOT = 10
    LINE_STATE_CHANGED = 11
    AGENT_STATE_CHANGED = 12
    ABONENT_BUSY = 13
    DISCONNECTED = 14
    CALL_SAVED_IN_DB = 15
    RAW_DATA = 16
    CALL_INFO_CHANGED = 17
    DTMF_ENTERED = 18


class MsgErrorType(IntEnum):
    GENERAL_ERROR = 0
    LOAD_LIBRARY_ERROR = 1
    #: the client starts its reconnect timer on this one
    OPEN_CONNECTION_ERROR = 2
    COMMAND_ERROR = 3
    COMMAND_NOT_IMPLEMENTED_ERROR = 4
    #: the client starts its reconnect timer on this one too
    CALL_CENTRE_NOT_AVAILABLE_ERROR = 5
    AUTHENTICATION_ERROR = 6
    CALL_SAVING_ERROR = 7
    EVENT_HANDLER_ERROR = 8
    CONNECTION_CONFIG_ERROR = 9


class GeneralizedCallState(IntEnum):
    NONE = 0
    ALERTING = 1
    CONNECTED = 2
    HOLDED = 3
    CONFERENCED = 4
    UNKNOWN = 5
    BUSY = 6


class CallFeaturesSet(IntFlag):
    CAN_NOTHING = 0
    CAN_RECALL = 0x1
    CAN_DIAL = 0x2
    CAN_ANSWER = 0x4
    CAN_DROP = 0x8
    CAN_HOLD = 0x10
    CAN_UNHOLD = 0x20
    CAN_SETUP_TRANSFER = 0x40
    CAN_COMPLETE_TRANSFER = 0x80
    CAN_BLIND_TRANSFER = 0x100
    CAN_MAKE_CONSULT_CALL = 0x200
    CAN_DTMF = 0x400
    CAN_VIDEO = 0x800
    CAN_MUTE = 0x1000
    CAN_CANCEL_COMPLETE_TRANSFER = 0x2000


class AgentFeaturesSet(IntFlag):
    CAN_NOTHING = 0
    CAN_WRAP_UP = 0x1
    HAS_CALL_CENTRE_MODE = 0x2
    CAN_GET_CALL_RECORDS = 0x4


class CreatioCallDirection(StrEnum):
    """``Terrasoft.CallDirection``: GUID strings, not numbers."""

    UNKNOWN = "c072be2c-3d82-4468-9d4a-6db47d1f4cca"
    OUT = "53f71b5f-7e17-4cf5-bf14-6a59212db422"
    IN = "1d96a65f-2131-4916-8825-2d142b1000b2"


class CtiCommand(StrEnum):
    LOAD_LIBRARY = "LoadLibrary"
    OPEN_CONNECTION = "OpenConnection"
    REGISTER_CONNECTION_SESSION = "RegisterConnectionSession"
    CLOSE_CONNECTION = "CloseConnection"
    MAKE_CALL = "MakeCall"
    HOOKUP = "Hookup"
    PROCESS_LOGS = "ProcessLogs"
    ANSWER_CALL = "AnswerCall"
    HOLD_CALL = "HoldCall"
    DROP_CALL = "DropCall"
    SETUP_TRANSFER_CALL = "SetupTransferCall"
    MAKE_CONSULT_CALL = "MakeConsultCall"
    TRANSFER_CALL = "TransferCall"
    CANCEL_TRANSFER = "CancelTransfer"
    BLIND_TRANSFER_CALL = "BlindTransferCall"
    SET_DND = "SetDnd"
    QUERY_LINE_STATE = "QueryLineState"
    QUERY_ACTIVE_CALL_SNAPSHOT = "QueryActiveCallSnapshot"
    SET_MSG_USER_STATE = "SetMsgUserState"
    QUERY_MSG_USER_STATE = "QueryMsgUserState"
    LIBRARY_SPECIFIC_SERVICE = "LibrarySpecificService"
    POST_RAW_DATA = "PostRawData"
    SEND_DTMF = "SendDtmf"
    SET_LOG_FILE_PATH = "SetLogFilePath"
    SET_WRAP_UP_USER_STATE = "SetWrapUpUserState"


#: ``Terrasoft.MessagingCommandExecutorType.CALL``, sent in ``commandExecutorType``.
EXECUTOR_TYPE_CALL: Final = "Terrasoft.Messaging.Common.Call, Terrasoft.Messaging.Common"

_COMMAND_NAMES: Final[frozenset[str]] = frozenset(c.value for c in CtiCommand)

#: Parameters the client serialises to a JSON string before putting them in ``parameters``.
JSON_IN_JSON_PARAMS: Final[frozenset[str]] = frozenset(
    {"connectionParams", "sessionServiceParams", "consultationCall", "currentCall", "consultCall"}
)

#: Fixed namespace for call GUIDs: uuid5(CALL_ID_NAMESPACE, call.id). Never change it: a
#: reconnecting client matches calls from the snapshot against the ids it already holds.
CALL_ID_NAMESPACE: Final = uuid.UUID("6f1d3c52-8a0e-5b7e-9c4d-2b8e1f0a7d35")
#: Namespace for the per-line connection uid (see :func:`connection_uid_for_line`).
CONNECTION_ID_NAMESPACE: Final = uuid.UUID("0b4e7f7a-53c1-5d2e-8f6b-7a1c9e3d2f40")

ERROR_SOURCE: Final = "asterisk-cms"

# --------------------------------------------------------------------------------------
# Client -> server
# --------------------------------------------------------------------------------------


class ProtocolError(Exception):
    """A client frame that cannot be accepted; ``error_type`` is what the client is told."""

    def __init__(self, error_type: MsgErrorType, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message

    def __repr__(self) -> str:
        return f"ProtocolError({self.error_type.name}, {self.message!r})"


@dataclass(frozen=True, slots=True)
class ClientCommand:
    """One decoded ``MsgCommandInfo``.

    ``params`` is the ``parameters`` object with the JSON-in-JSON values decoded (a
    decoded value is a dict, or None for a JSON ``null``). ``executor`` is the decoded
    ``commandExecutor`` (the call a call command acts on), ``executor_id`` the
    ``commandExecutorId`` (the same call's ``id``).
    """

    name: str
    params: dict[str, Any]
    raw: dict[str, Any]
    executor: dict[str, Any] | None = None
    executor_id: str = ""
    connection_uid: str = ""
    library_instance_uid: str = ""
    command_uid: str = field(default="")


def decode_client_message(text: str | bytes, *, max_bytes: int) -> ClientCommand:
    """Decode and validate one client frame. Raises only :class:`ProtocolError`."""
    if _too_big(text, max_bytes):
        raise ProtocolError(MsgErrorType.GENERAL_ERROR, f"message exceeds {max_bytes} bytes")
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(MsgErrorType.GENERAL_ERROR, f"message is not JSON: {json_error_text(exc)}") from None
    if not isinstance(data, dict):
        raise ProtocolError(MsgErrorType.GENERAL_ERROR, "message is not a JSON object")
    name = data.get("command")
    if not isinstance(name, str) or not name:
        raise ProtocolError(MsgErrorType.GENERAL_ERROR, "message has no command name")
    if name not in _COMMAND_NAMES:
        raise ProtocolError(MsgErrorType.COMMAND_NOT_IMPLEMENTED_ERROR, f"unknown command {name[:64]!r}")

    raw_params = data.get("parameters")
    if raw_params is None:
        params: dict[str, Any] = {}
    elif isinstance(raw_params, dict):
        params = dict(raw_params)
        for key in JSON_IN_JSON_PARAMS.intersection(params):
            params[key] = _json_object(params[key], key)
    else:
        raise ProtocolError(MsgErrorType.COMMAND_ERROR, f"{name}: parameters is not an object")

    executor = _json_object(data.get("commandExecutor"), "commandExecutor")
    return ClientCommand(
        name=name,
        params=params,
        raw=data,
        executor=executor,
        executor_id=_opt_str(data.get("commandExecutorId")),
        connection_uid=_opt_str(data.get("connectionUId")),
        library_instance_uid=_opt_str(data.get("libraryInstanceUId")),
        command_uid=_opt_str(data.get("commandUId")),
    )


def json_error_text(exc: Exception) -> str:
    """What a client is told about its bad JSON: the position of a syntax error, never the text of
    an interpreter limit (recursion depth, integer digits), which describes us, not the input."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return "not valid UTF-8"
    return "a value is out of range (e.g. a number too long)"


def _too_big(text: str | bytes, max_bytes: int) -> bool:
    if isinstance(text, bytes | bytearray):
        return len(text) > max_bytes
    # A str of n chars takes n to 4n UTF-8 bytes: only encode when the answer depends on it.
    n = len(text)
    if n > max_bytes:
        return True
    if n * 4 <= max_bytes:
        return False
    return len(text.encode("utf-8", "surrogatepass")) > max_bytes


def _json_object(value: Any, key: str) -> dict[str, Any] | None:
    """A JSON-in-JSON value: a JSON text of an object (or null). An object is accepted as is."""
    if value is None or isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise ProtocolError(MsgErrorType.COMMAND_ERROR, f"{key} must be a JSON string")
    if value == "":
        return None
    try:
        decoded = json.loads(value)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(MsgErrorType.COMMAND_ERROR, f"{key} is not valid JSON: {json_error_text(exc)}") from None
    if decoded is not None and not isinstance(decoded, dict):
        raise ProtocolError(MsgErrorType.COMMAND_ERROR, f"{key} is not a JSON object")
    return decoded


def _opt_str(value: Any) -> str:
    return value if isinstance(value, str) else ""


# --------------------------------------------------------------------------------------
# Server -> client
# --------------------------------------------------------------------------------------

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def encode_server_event(
    event_type: MsgEventType | int,
    content: Any,
    *,
    connection_uid: str = "",
    command_uid: str = "",
    content_type: str = "",
    private_data: Mapping[str, Any] | None = None,
) -> str:
    """One server frame, compact strict JSON.

    ``content`` that is a ``str`` goes on the wire as that string (callers pass JSON text
    or, for LIBRARY_INITIALIZED, the raw library uid); anything else is JSON-encoded into
    a string first, because the client ``JSON.parse``-s string content.
    """
    if not isinstance(content, str):
        content = _dumps(content)
    return _dumps(
        {
            "eventType": int(event_type),
            "content": content,
            "connectionUId": connection_uid,
            "commandUId": command_uid,
            "contentType": content_type,
            "privateData": None if private_data is None else dict(private_data),
        }
    )


@lru_cache(maxsize=8192)
def call_guid(call_id: str) -> str:
    """The GUID the client sees for our call id (deterministic, so it survives reconnects)."""
    return str(uuid.uuid5(CALL_ID_NAMESPACE, call_id))


@lru_cache(maxsize=4096)
def connection_uid_for_line(line: str) -> str:
    """The connection uid given to every connection of ``line``.

    The client reads it only from CONNECTION_CREATED and echoes it in commands; making it
    a function of the line lets one encoded event frame serve every tab of that line.
    """
    return str(uuid.uuid5(CONNECTION_ID_NAMESPACE, line))


_STATE_MAP: Final[dict[CallState, GeneralizedCallState]] = {
    CallState.RINGING: GeneralizedCallState.ALERTING,
    CallState.CONNECTED: GeneralizedCallState.CONNECTED,
    CallState.HELD: GeneralizedCallState.HOLDED,
    CallState.BUSY: GeneralizedCallState.BUSY,
    CallState.FINISHED: GeneralizedCallState.NONE,
}


def creatio_direction(call: Call) -> CreatioCallDirection:
    """IN/OUT as the client needs it (it shows ``callerId`` for IN, ``calledId`` for OUT).

    An internal call is OUT on the line that placed it (caller number is the line) and IN
    on the other.
    """
    if call.direction is Direction.INBOUND:
        return CreatioCallDirection.IN
    if call.direction is Direction.OUTBOUND:
        return CreatioCallDirection.OUT
    return CreatioCallDirection.OUT if call.caller_number == call.line else CreatioCallDirection.IN


_TRANSFER_FEATURES: Final = CallFeaturesSet.CAN_BLIND_TRANSFER | CallFeaturesSet.CAN_MAKE_CONSULT_CALL


def call_features(call: Call, *, consulting: bool = False) -> CallFeaturesSet:
    """Buttons the client may enable for ``call``.

    ``consulting``: the line has another active call, so connected/held calls offer
    completing the transfer instead of starting a new one.
    """
    state = call.state
    if state is CallState.RINGING:
        if creatio_direction(call) is CreatioCallDirection.IN:
            return CallFeaturesSet.CAN_ANSWER | CallFeaturesSet.CAN_DROP
        return CallFeaturesSet.CAN_DROP
    if state is CallState.CONNECTED:
        base = CallFeaturesSet.CAN_DROP | CallFeaturesSet.CAN_HOLD | CallFeaturesSet.CAN_DTMF
    elif state is CallState.HELD:
        base = CallFeaturesSet.CAN_DROP | CallFeaturesSet.CAN_UNHOLD
    elif state is CallState.BUSY:
        return CallFeaturesSet.CAN_DROP
    else:
        return CallFeaturesSet.CAN_NOTHING
    return base | (CallFeaturesSet.CAN_COMPLETE_TRANSFER if consulting else _TRANSFER_FEATURES)


#: What an idle line (no active call) offers.
IDLE_LINE_FEATURES: Final = CallFeaturesSet.CAN_DIAL


def call_to_creatio(call: Call, *, features: int | None = None) -> dict[str, Any]:
    """Our :class:`Call` as the client's call object (only properties its class declares).

    ``callContext`` holds, as a JSON object text, what the client has no field for: queue,
    names, linked id and ``extra``. The client never interprets it; it only echoes it.
    """
    direction = creatio_direction(call)
    caller = call.caller_number
    called = call.called_number
    if direction is CreatioCallDirection.OUT and not caller:
        caller = call.line
    elif direction is CreatioCallDirection.IN and not called:
        called = call.line
    obj: dict[str, Any] = {
        "id": call_guid(call.id),
        "deviceId": call.line,
        "callerId": caller,
        "calledId": called,
        "direction": direction.value,
        "state": int(_STATE_MAP[call.state]),
        "callFeaturesSet": int(call_features(call) if features is None else features),
    }
    if call.database_uid:
        obj["databaseUId"] = call.database_uid
    if call.redirecting_number:
        obj["redirectingId"] = call.redirecting_number
    if call.redirection_number:
        obj["redirectionId"] = call.redirection_number
    context = _call_context(call)
    if context:
        obj["callContext"] = _dumps(context)
        obj["callContextType"] = "application/json"
    return obj


def _call_context(call: Call) -> dict[str, str]:
    ctx: dict[str, str] = {}
    if call.queue:
        ctx["queue"] = call.queue
    if call.caller_name:
        ctx["callerName"] = call.caller_name
    if call.called_name:
        ctx["calledName"] = call.called_name
    if call.linked_id:
        ctx["linkedId"] = call.linked_id
    if call.hangup_cause_text:
        ctx["hangupCause"] = call.hangup_cause_text
    for key, value in call.extra.items():
        ctx.setdefault(key, value)
    return ctx


# --- frame helpers ----------------------------------------------------------------------


def library_initialized_frame(library_instance_uid: str) -> str:
    # content is taken raw as libraryInstanceUId (no JSON.parse)
    return encode_server_event(MsgEventType.LIBRARY_INITIALIZED, library_instance_uid)


def connection_created_frame(connection_uid: str, *, private_data: Mapping[str, Any] | None = None) -> str:
    # the client reads connectionUId from the envelope and ignores content
    return encode_server_event(
        MsgEventType.CONNECTION_CREATED, "", connection_uid=connection_uid, private_data=private_data
    )


def error_frame(
    error_type: MsgErrorType,
    message: str,
    *,
    connection_uid: str = "",
    internal_error_code: str | None = None,
) -> str:
    content = {
        "errorType": int(error_type),
        "internalErrorCode": internal_error_code,
        "data": message,
        "source": ERROR_SOURCE,
    }
    return encode_server_event(MsgEventType.ERROR, content, connection_uid=connection_uid)


def disconnected_frame(failure_code: str, *, connection_uid: str = "", reconnect: bool = True) -> str:
    """DISCONNECTED. ``reconnect=False`` sets ``privateData.ignoreTryReconnection``."""
    private = None if reconnect else {"ignoreTryReconnection": True}
    # content is JSON.parse-d: an empty or bare string would throw inside the client
    return encode_server_event(
        MsgEventType.DISCONNECTED, _dumps(failure_code), connection_uid=connection_uid, private_data=private
    )


def line_state_frame(features: int, *, connection_uid: str = "", call_id: str | None = None) -> str:
    """LINE_STATE_CHANGED; without ``call_id`` it sets the line's features (idle line)."""
    content: dict[str, Any] = {"callFeaturesSet": int(features)}
    if call_id is not None:
        content["callId"] = call_id
    return encode_server_event(MsgEventType.LINE_STATE_CHANGED, content, connection_uid=connection_uid)


def agent_state_frame(code: str, *, connection_uid: str = "") -> str:
    # content must itself be JSON: the client JSON.parse-s it, a bare string is dropped
    return encode_server_event(MsgEventType.AGENT_STATE_CHANGED, _dumps(code), connection_uid=connection_uid)


def snapshot_frame(calls: Sequence[Call], current: Call | None, connection_uid: str) -> str:
    """ACTIVE_CALL_SNAPSHOT: ``{"ActiveCalls": [...], "CurrentCall": {...}|null}``.

    Only active calls are listed; ``current`` is listed too (the client looks it up among
    ActiveCalls) and is dropped if it is not active.
    """
    # a busy call is listed too: Creatio keeps it, with Drop, until RING_FINISHED
    active = [c for c in calls if c.on_line]
    if current is not None and current.on_line and all(c.id != current.id for c in active):
        active.insert(0, current)
    consulting = sum(1 for c in active if c.active) > 1
    objs = {c.id: call_to_creatio(c, features=call_features(c, consulting=consulting)) for c in active}
    cur = objs.get(current.id) if current is not None else None
    content = {"ActiveCalls": list(objs.values()), "CurrentCall": cur}
    return encode_server_event(MsgEventType.ACTIVE_CALL_SNAPSHOT, content, connection_uid=connection_uid)


_CALL_EVENTS: Final[dict[EventType, MsgEventType]] = {
    EventType.RING_STARTED: MsgEventType.RING_STARTED,
    EventType.COMMUTATION_STARTED: MsgEventType.COMMUTATION_STARTED,
    EventType.RING_FINISHED: MsgEventType.RING_FINISHED,
    EventType.HOLD_STARTED: MsgEventType.PUT_HOLD_ACTION,
    EventType.HOLD_ENDED: MsgEventType.END_HOLD_ACTION,
    EventType.CALL_INFO_CHANGED: MsgEventType.CALL_INFO_CHANGED,
    EventType.ABONENT_BUSY: MsgEventType.ABONENT_BUSY,
}


def line_event_to_frames(
    event: LineEvent,
    connection_uid: str,
    *,
    other_calls: Iterable[Call] = (),
    agent_codes: AgentStateCodes = DEFAULT_AGENT_CODES,
) -> list[str]:
    """The client frames for one line event.

    ``other_calls``: the line's other calls as known *after* this event (the session's
    view). They decide whether transfer completion is offered, and each active one gets a
    LINE_STATE_CHANGED with its callId after the event, since its buttons may have
    changed. When the line is left without an active call, a LINE_STATE_CHANGED without
    callId re-enables dialling (the client does not do it by itself).

    CALL_INFO_CHANGED is matched by the client on ``databaseUId``: without one (the call is not
    saved in Creatio yet, or records are off) it could update the wrong call when the line has
    several, so it is then only sent when the call is the line's only active call.

    CALL_SAVED becomes CALL_SAVED_IN_DB with the call object (its ``databaseUId`` set);
    CALL_SAVE_FAILED becomes ERROR with errorType CALL_SAVING_ERROR.
    """
    etype = event.type
    if etype is EventType.CALL_SAVED:
        if event.call is None or not event.call.database_uid:
            return []
        return [encode_server_event(MsgEventType.CALL_SAVED_IN_DB, call_to_creatio(event.call),
                                    connection_uid=connection_uid)]
    if etype is EventType.CALL_SAVE_FAILED:
        return [error_frame(MsgErrorType.CALL_SAVING_ERROR, _save_failed_text(event.call),
                            connection_uid=connection_uid)]
    if etype is EventType.DTMF_ENTERED:
        return [encode_server_event(MsgEventType.DTMF_ENTERED, _dumps(event.digits), connection_uid=connection_uid)]
    if etype is EventType.AGENT_STATE_CHANGED:
        if event.agent is None:
            return []
        return [agent_state_frame(agent_codes.code_for(event.agent), connection_uid=connection_uid)]
    call = event.call
    msg_type = _CALL_EVENTS.get(etype)
    if call is None or msg_type is None:
        return []
    others = [c for c in other_calls if c.id != call.id and c.active]
    if etype is EventType.RING_FINISHED and call.state is not CallState.FINISHED:
        call = call.evolve(state=CallState.FINISHED)
    if etype is EventType.CALL_INFO_CHANGED and others and not call.database_uid:
        return []
    this_active = call.active
    consulting = bool(others) and this_active
    frames = [
        encode_server_event(
            msg_type,
            call_to_creatio(call, features=call_features(call, consulting=consulting)),
            connection_uid=connection_uid,
        )
    ]
    if etype is EventType.CALL_INFO_CHANGED:
        return frames
    other_consulting = len(others) + (1 if this_active else 0) > 1
    for other in others:
        frames.append(
            line_state_frame(
                call_features(other, consulting=other_consulting),
                connection_uid=connection_uid,
                call_id=call_guid(other.id),
            )
        )
    if not others and not call.on_line:
        # idle only once the call is over: after ABONENT_BUSY the busy call keeps its Drop until RING_FINISHED
        frames.append(line_state_frame(IDLE_LINE_FEATURES, connection_uid=connection_uid))
    return frames


def _save_failed_text(call: Call | None) -> str:
    if call is None:
        return "A call could not be saved in Creatio"
    view = call_to_creatio(call)
    return f"The call {view['callerId']} -> {view['calledId']} could not be saved in Creatio"


__all__ = [
    "CALL_ID_NAMESPACE",
    "DEFAULT_AGENT_CODES",
    "EXECUTOR_TYPE_CALL",
    "IDLE_LINE_FEATURES",
    "JSON_IN_JSON_PARAMS",
    "AgentFeaturesSet",
    "AgentStateCodes",
    "CallFeaturesSet",
    "ClientCommand",
    "CreatioCallDirection",
    "CtiCommand",
    "GeneralizedCallState",
    "MsgErrorType",
    "MsgEventType",
    "ProtocolError",
    "agent_state_frame",
    "call_features",
    "call_guid",
    "call_to_creatio",
    "connection_created_frame",
    "connection_uid_for_line",
    "creatio_direction",
    "decode_client_message",
    "disconnected_frame",
    "encode_server_event",
    "error_frame",
    "library_initialized_frame",
    "line_event_to_frames",
    "line_state_frame",
    "snapshot_frame",
]
