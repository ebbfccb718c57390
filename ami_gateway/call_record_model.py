"""A call's record in Creatio, folded from the line's events. Pure: events in, record and request bodies out.

Theory of operation
-------------------
Creatio's Calls section shows what the messaging service wrote: with the messaging library the browser
never saves calls. One :class:`CallRecord` per call *and line* (our call id ``<linkedid>:<line>`` is already
per line) is created when the call is first seen and changed by every event that moves it: connected, hold
and unhold, a transfer's new numbers, the end. Each change bumps ``version``; the saver writes the whole
record each time (an update carries every column), so coalescing changes and retrying are both harmless.

Rule 1 - times. ``started_at`` is when the call was announced (the earliest seen), ``answered_at`` the
COMMUTATION_STARTED moment, ``ended_at`` the RING_FINISHED (or ABONENT_BUSY) moment. Hold time is the sum of
closed HOLD_STARTED..HOLD_ENDED spans; a hold still open at the end is closed by the end.
BeforeConnectionTime = (answer or end) - start; TalkTime = end - answer - hold; Duration = end - start.
A call that ended with TalkTime 0 and no answer is what Creatio's panel shows as missed.

Rule 2 - numbers are sticky: an event with an empty number never blanks one already known (the tracker
does the same for the live view).

Rule 3 - consultations. A call the agent places (direction OUT) while another call of the same line is on
hold is a consultation: its ``parent_call_id`` is the held call, and its ParentCallId column is that
call's record once known.

Rule 4 - ids. ``proposed_uid`` is derived from the deployment prefix and the call id, so every retry, a
restart or another gateway asks Creatio for the same record id; ``record_uid`` is the id Creatio answered
(the one the agent's client is given).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final

from services.wire import Call, CallState, EventType, LineEvent
from ws_node.creatio_protocol import CreatioCallDirection, call_guid, call_to_creatio, creatio_direction

RECORD_ID_NAMESPACE: Final = uuid.UUID("3c0e6a1e-92b4-5f0e-a7c1-5d8f2e4b9a61")
_GUID_RE: Final = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
#: events that are ours (they report on saving) and do not change the record
_OWN_EVENTS: Final = frozenset({EventType.CALL_SAVED, EventType.CALL_SAVE_FAILED})


@dataclass(frozen=True, slots=True)
class RecordOwner:
    """Whose calls these are and where they are saved (from the agent's OpenConnection)."""

    contact: str
    site: str
    user: str = ""

    def to_json(self) -> str:
        return json.dumps({"contact": self.contact, "site": self.site, "user": self.user})

    @classmethod
    def from_json(cls, raw: str | bytes) -> RecordOwner:
        data = json.loads(raw)
        return cls(contact=str(data["contact"]), site=str(data["site"]), user=str(data.get("user", "")))


@dataclass(frozen=True, slots=True)
class CallRecord:
    call_id: str
    line: str
    contact: str
    site: str
    proposed_uid: str
    call: Call
    started_at: float
    answered_at: float | None = None
    ended_at: float | None = None
    hold_seconds: float = 0.0
    held_since: float | None = None
    parent_call_id: str = ""
    record_uid: str = ""
    version: int = 1

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    @property
    def uid(self) -> str:
        return self.record_uid or self.proposed_uid

    def columns(self) -> dict[str, Any]:
        """Creatio's Call columns, as numbers and texts (see Rule 1)."""
        start = self.started_at
        end = self.ended_at
        connected = self.answered_at
        before = (connected if connected is not None else end)
        talk = 0.0
        if connected is not None and end is not None:
            talk = max(0.0, end - connected - self.hold_seconds)
        view = call_to_creatio(self.call)
        return {
            "IntegrationId": self.call_id,
            "CallerId": view["callerId"],
            "CalledId": view["calledId"],
            "StartDate": iso(start),
            "EndDate": iso(end) if end is not None else None,
            "Duration": _secs(end - start) if end is not None else 0,
            "BeforeConnectionTime": _secs(before - start) if before is not None else 0,
            "TalkTime": _secs(talk),
            "HoldTime": _secs(self.hold_seconds),
            "DirectionId": view["direction"],
            "RedirectingId": self.call.redirecting_number,
            "RedirectionId": self.call.redirection_number,
            "CreatedById": self.contact,
        }

    def to_json(self) -> str:
        data = asdict(self)
        data["call"] = self.call.to_dict()
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> CallRecord:
        data = json.loads(raw)
        data["call"] = Call.from_dict(data["call"])
        return cls(**data)


def proposed_uid(prefix: str, call_id: str) -> str:
    return str(uuid.uuid5(RECORD_ID_NAMESPACE, f"{prefix}\n{call_id}"))


def apply(
    record: CallRecord | None,
    event: LineEvent,
    *,
    owner: RecordOwner | None,
    prefix: str,
    line_calls: dict[str, CallRecord] | None = None,
) -> CallRecord | None:
    """The record after ``event``; None when the event does not concern a recorded call.

    ``owner`` is needed to start a record (a line nobody opened a session for is not recorded);
    ``line_calls`` are the line's other open records, for Rule 3.
    """
    call = event.call
    if call is None or event.type in _OWN_EVENTS:
        return record
    at = event.ami_received_at or call.started_at
    created = record is None
    if record is None:
        if owner is None:
            return None
        if call.state is CallState.FINISHED and event.type is not EventType.RING_FINISHED:
            return None
        parent = ""
        if creatio_direction(call) is CreatioCallDirection.OUT:
            # the tracker names an Atxfer consultation "<call id>:2"; a hold may be reported after it
            base = call.id.rsplit(":", 1)[0]
            for other in (line_calls or {}).values():
                if other.call_id == call.id or other.ended:
                    continue
                if other.held_since is not None or other.call_id == base:
                    parent = other.call_id
                    break
        record = CallRecord(
            call_id=call.id,
            line=call.line,
            contact=owner.contact,
            site=owner.site,
            proposed_uid=proposed_uid(prefix, call.id),
            call=call,
            started_at=call.started_at or at,
            parent_call_id=parent,
            version=0,
        )
    changes: dict[str, Any] = {"call": _merge(record.call, call)}
    if call.started_at and call.started_at < record.started_at:
        changes["started_at"] = call.started_at
    etype = event.type
    if record.answered_at is None and (etype is EventType.COMMUTATION_STARTED or call.answered_at is not None):
        changes["answered_at"] = call.answered_at or at
    if etype is EventType.HOLD_STARTED and record.held_since is None and not record.ended:
        changes["held_since"] = at
    elif etype is EventType.HOLD_ENDED and record.held_since is not None:
        changes["hold_seconds"] = record.hold_seconds + max(0.0, at - record.held_since)
        changes["held_since"] = None
    over = etype in (EventType.RING_FINISHED, EventType.ABONENT_BUSY) or call.state is CallState.FINISHED
    if over and record.ended_at is None:
        end = call.ended_at or at
        changes["ended_at"] = end
        if record.held_since is not None:
            changes["hold_seconds"] = record.hold_seconds + max(0.0, end - record.held_since)
            changes["held_since"] = None
    updated = replace(record, **changes)
    if updated == record and not created:
        return record
    return replace(updated, version=record.version + 1)


def _merge(old: Call, new: Call) -> Call:
    """Rule 2: the newest call object, keeping numbers it does not know."""
    keep: dict[str, Any] = {}
    for name in ("caller_number", "called_number", "redirecting_number", "redirection_number"):
        if not getattr(new, name) and getattr(old, name):
            keep[name] = getattr(old, name)
    return new.evolve(**keep) if keep else new


# --- request bodies ------------------------------------------------------------------------------


def msgutil_body(record: CallRecord, parent_uid: str = "") -> dict[str, Any]:
    """``MsgUtilService.svc/UpdateCall``: the call as Creatio's client serializes it (camelCase, GUIDs
    for direction) plus the record's columns. ``databaseUId`` asks for our id on the first write."""
    view = call_to_creatio(record.call)
    cols = record.columns()
    body: dict[str, Any] = {
        "id": call_guid(record.call_id),
        "databaseUId": record.uid,
        "userContactUId": record.contact,
        "deviceId": record.line,
        "callerId": cols["CallerId"],
        "calledId": cols["CalledId"],
        "direction": view["direction"],
        "state": view["state"],
        "redirectingId": cols["RedirectingId"],
        "redirectionId": cols["RedirectionId"],
        "integrationId": record.call_id,
        "startDate": cols["StartDate"],
        "endDate": cols["EndDate"],
        "duration": cols["Duration"],
        "beforeConnectionTime": cols["BeforeConnectionTime"],
        "talkTime": cols["TalkTime"],
        "holdTime": cols["HoldTime"],
        "parentCallId": parent_uid or None,
    }
    return body


def odata_body(record: CallRecord, parent_uid: str = "", *, create: bool) -> dict[str, Any]:
    """An OData 4 ``Call`` entity: Creatio's column names, lookups as ``<Name>Id``."""
    cols = record.columns()
    body: dict[str, Any] = {k: v for k, v in cols.items() if v is not None or k == "EndDate"}
    if create:
        body["Id"] = record.uid
    if parent_uid:
        body["ParentCallId"] = parent_uid
    return body


def parse_update_call_answer(text: str) -> str:
    """UpdateCall's answer: the record id as a JSON string (or a bare GUID). Anything else is Creatio's
    error text: raises ValueError with it."""
    stripped = text.strip()
    value: Any = stripped
    try:
        value = json.loads(stripped)
    except ValueError:
        pass
    if isinstance(value, dict):
        # WCF wraps answers of BodyStyle=Wrapped methods as {"UpdateCallResult": "..."}
        value = next(iter(value.values()), "") if len(value) == 1 else value
    if isinstance(value, str) and _GUID_RE.fullmatch(value.strip()):
        return value.strip().lower()
    raise ValueError(str(value)[:300] or "empty answer")


def is_guid(text: str) -> bool:
    return bool(_GUID_RE.fullmatch(text))


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ts * 1000) % 1000:03d}Z"


def _secs(value: float) -> int:
    return max(0, round(value))
