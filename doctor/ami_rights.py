"""What the AMI user may do, judged from Asterisk's own answers (pure: answers in, verdicts out).

Asterisk checks an action's write class before it reads any argument (manager.c answers
``Permission denied`` first), so each probe below is a real action sent *without* its required
argument: a user who holds the class gets an argument error ("Channel not specified", "No family
specified"...) and nothing happens on the PBX; a user who lacks it gets ``Permission denied``;
``Invalid/unknown command`` means the module that provides the action is not loaded. This is what
the PBX enforces, whatever manager.conf is believed to say.

Read classes cannot be asked for: they decide which events reach us. The doctor logs in with the
gateway's event mask and records the ``Privilege`` classes of the events that arrive.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ami.permissions import write_classes


class Grant(enum.Enum):
    GRANTED = "granted"
    DENIED = "denied"
    #: the action does not exist on this PBX (its module is not loaded)
    MISSING = "missing"


@dataclass(frozen=True, slots=True)
class Probe:
    """A harmless action: ``fields`` leave out the argument the action needs, so it does nothing."""

    action: str
    fields: tuple[tuple[str, str], ...] = ()

    @property
    def classes(self) -> tuple[str, ...]:
        """Write classes Asterisk accepts for it (any one; the first is the one to grant)."""
        return write_classes(self.action)


PROBES: dict[str, Probe] = {
    p.action: p
    for p in (
        Probe("Originate"),
        Probe("Hangup"),
        Probe("Redirect"),
        Probe("BlindTransfer"),
        Probe("Atxfer"),
        Probe("CancelAtxfer"),
        Probe("Park"),
        Probe("Bridge"),
        Probe("PlayDTMF"),
        Probe("SetVar"),
        Probe("DBGet"),
        Probe("DBPut"),
        Probe("DBDel"),
        Probe("SIPnotify"),
        Probe("PJSIPNotify"),
        Probe("QueuePause"),
        # Listings: harmless even when they run (they only describe the channels).
        Probe("Status", (("Channel", "doctor-no-such-channel"),)),
        Probe("CoreShowChannels"),
    )
}


@dataclass(frozen=True, slots=True)
class Need:
    """A feature of ours and the AMI actions it sends (all of them must be granted)."""

    feature: str
    actions: tuple[str, ...]
    #: False: the cluster runs without it, the feature alone is lost (a warning, not a failure)
    required: bool = True


def needs_for(protocols: Iterable[str]) -> tuple[Need, ...]:
    """Our commands' needs (see ami_gateway/command_plan.py); the answer action depends on the technology."""
    techs = {p.strip().upper().rstrip("/") for p in protocols}
    notify = tuple(a for t, a in (("SIP", "SIPnotify"), ("PJSIP", "PJSIPNotify")) if t in techs) or ("SIPnotify",)
    return (
        Need("click to dial (make_call)", ("Originate",)),
        Need("hang up", ("Hangup",)),
        Need("hold / resume (Park, Originate into the lot, Redirect)", ("Park", "Originate", "Redirect")),
        Need("blind transfer", ("BlindTransfer",)),
        Need("consultation call / transfer (Atxfer, CancelAtxfer, Bridge)", ("Atxfer", "CancelAtxfer", "Bridge")),
        Need("DTMF", ("PlayDTMF",)),
        Need("queue pause / unpause / wrap-up (QueuePause)", ("QueuePause",)),
        Need("list live calls after a reconnect (Status)", ("Status",)),
        Need("answer from the CRM (" + "/".join(notify) + ")", notify, required=False),
        Need("do not disturb (DBGet/DBPut/DBDel, SetVar)", ("DBGet", "DBPut", "DBDel", "SetVar"), required=False),
    )


def judge_answer(response: str | None, message: str | None) -> Grant:
    """One probe's answer: ``Permission denied`` is the only refusal; an unknown action is missing."""
    text = (message or "").strip().lower()
    if (response or "").lower() == "error":
        if text.startswith("permission denied"):
            return Grant.DENIED
        if text.startswith("invalid/unknown command"):
            return Grant.MISSING
    return Grant.GRANTED


@dataclass(frozen=True, slots=True)
class NeedVerdict:
    need: Need
    denied: tuple[str, ...]
    missing: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.denied and not self.missing

    def classes_to_add(self) -> tuple[str, ...]:
        """The smallest write classes that would let the denied actions through (the first listed of each)."""
        out: list[str] = []
        for action in self.denied:
            first = PROBES[action].classes[0] if PROBES[action].classes else ""
            if first and first not in out:
                out.append(first)
        return tuple(out)


def judge_needs(needs: Iterable[Need], grants: Mapping[str, Grant]) -> list[NeedVerdict]:
    verdicts = []
    for need in needs:
        denied = tuple(a for a in need.actions if grants.get(a) is Grant.DENIED)
        missing = tuple(a for a in need.actions if grants.get(a) is Grant.MISSING)
        verdicts.append(NeedVerdict(need, denied, missing))
    return verdicts


def privilege_classes(privilege: str | None) -> frozenset[str]:
    """``Privilege: call,all`` -> {"call"} (Asterisk appends "all" to every event's classes)."""
    if not privilege:
        return frozenset()
    return frozenset(p.strip().lower() for p in privilege.split(",") if p.strip() and p.strip().lower() != "all")


#: read classes whose events the gateway needs, and what is lost without each
READ_NEEDS: dict[str, str] = {
    "call": "calls on agents' lines (Newchannel, Dial, Bridge, Hangup...)",
    "agent": "queue calls and pause states (AgentCalled, QueueMember*)",
}
#: wanted but optional
READ_OPTIONAL: dict[str, str] = {"dtmf": "DTMF_ENTERED (the digits dialled during a call)"}
