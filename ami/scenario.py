"""Scenario files: recorded or hand-written AMI event streams, optionally templated, with timing.

Format
------
A scenario file is raw AMI bytes, exactly what Asterisk writes on the wire (CRLF or LF line endings). A
capture taken with a plain TCP client (banner, ``Login`` response, events, ``Response: Goodbye``) is a valid
scenario as it is: the loader drops the banner and every message without an ``Event:`` header (the
responses), and keeps the events in order.

Lines starting with ``#`` are never AMI (no AMI header name starts with ``#``), so they carry extras:

``# any text``
    A comment.
``#@ +1.5``
    Wait 1.5 s before the next message (instead of the default gap).
``#@ gap 0.2``
    From here on, the default wait between messages is 0.2 s.
``#@ var caller=79161234567``
    Default value of a placeholder (the player's variables override it).
``#@ raw Event: Broken\\r\\nno colon here\\r\\n\\r\\n``
    Emit these bytes verbatim (Python escapes), e.g. to feed a consumer garbage on purpose.

Without directives, messages follow each other at the loader's ``default_gap``; the first one starts at once.
A directive applies to the next message that completes after it; put directives between messages.

Templates
---------
Header values (and raw steps) may contain ``{{...}}`` placeholders, replaced every time the scenario is
rendered, so one file plays for any line, many times, concurrently, with fresh ids:

``{{line}}``, ``{{caller}}``, ``{{callerName}}``, ``{{did}}``, ``{{queue}}``, ``{{agent2}}``, ``{{number}}``, any name
    Variables given to the player, else ``#@ var`` defaults, else :data:`DEFAULT_VARS`.
``{{tech}}``
    Channel technology, ``SIP`` or ``PJSIP`` (a player option).
``{{uid:N}}``
    The N-th Uniqueid of this play: ``<epoch>.<sequence>`` like Asterisk, the epoch being the moment the
    message that first mentions it is due, the sequence global to the allocator. A variable named ``uid:N``
    sets it instead (what ``Originate``'s ``ChannelId`` does).
``{{chan:N}}``
    The N-th channel-name suffix of this play, 8 hex digits (``SIP/305-{{chan:2}}`` -> ``SIP/305-0000001a``).
``{{bridge:N}}``
    The N-th bridge id of this play (a UUID, as Asterisk 12+ uses).
``{{epoch}}``
    Integer Unix time of the play's start (``LastCall``-style fields).
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ami.protocol import AmiMessage, AmiParser, Banner, MalformedMessage

__all__ = [
    "DEFAULT_VARS",
    "IdAllocator",
    "RenderedScenario",
    "Scenario",
    "ScenarioError",
    "Step",
    "load_scenario",
    "play_steps",
]

log = logging.getLogger(__name__)

DEFAULT_GAP = 0.05

# Values used when neither the player nor the file sets a variable.
DEFAULT_VARS: Mapping[str, str] = {
    "line": "305",
    "lineName": "Agent {{line}}",
    "caller": "79161234567",
    "callerName": "Ivan Petrov",
    "did": "4950000{{line}}",
    "queue": "support",
    "agent2": "306",
    "agent2Name": "Agent {{agent2}}",
    "number": "5551234",
    "trunk": "trunk-in",
    "carrier": "carrier",
    "context": "from-internal",
    "actionid": "",
}

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)(?::(\d+))?\s*\}\}")
_SEQUENCE_KINDS = frozenset({"uid", "chan", "bridge"})


class ScenarioError(ValueError):
    """A scenario file or its variables are invalid; the message names the line or placeholder."""


class Step(NamedTuple):
    """Wait ``delay`` seconds, then emit ``item`` (a message, or raw bytes from ``#@ raw``)."""

    delay: float
    item: AmiMessage | bytes


@dataclass(frozen=True)
class Scenario:
    """A loaded scenario; iterating gives its :class:`Step` values."""

    name: str
    steps: tuple[Step, ...]
    defaults: Mapping[str, str] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def duration(self) -> float:
        return sum(step.delay for step in self.steps)

    @property
    def is_template(self) -> bool:
        return any(_PLACEHOLDER.search(text) for text in _texts(self.steps))

    def render(
        self,
        ids: IdAllocator,
        variables: Mapping[str, str] | None = None,
        *,
        tech: str = "SIP",
        start: float | None = None,
    ) -> RenderedScenario:
        """Replace placeholders with concrete values; every call allocates fresh ids from ``ids``."""
        return _Renderer(self, ids, variables or {}, tech, time.time() if start is None else start).run()


@dataclass(frozen=True)
class RenderedScenario:
    """A scenario with every placeholder filled in, plus what the play will create."""

    name: str
    steps: tuple[Step, ...]
    linkedid: str | None
    channels: tuple[str, ...]
    variables: Mapping[str, str]


def _texts(steps: tuple[Step, ...]) -> Iterator[str]:
    for step in steps:
        if isinstance(step.item, AmiMessage):
            for _name, value in step.item.headers:
                yield value
        else:
            yield step.item.decode("utf-8", "replace")


class IdAllocator:
    """Asterisk-like identifiers: Uniqueid ``<epoch>.<seq>``, 8-hex channel suffixes, bridge UUIDs.

    One allocator per simulated PBX, shared by all plays, so ids never repeat within a run.
    """

    def __init__(self, first_sequence: int = 0, first_suffix: int = 0) -> None:
        self._seq = first_sequence
        self._suffix = first_suffix

    def uniqueid(self, at: float | None = None) -> str:
        seq = self._seq
        self._seq += 1
        return f"{int(time.time() if at is None else at)}.{seq}"

    def channel_suffix(self) -> str:
        n = self._suffix
        self._suffix = (self._suffix + 1) & 0xFFFFFFFF
        return f"{n:08x}"

    @staticmethod
    def bridge_id() -> str:
        return str(uuid.uuid4())


class _Renderer:
    def __init__(
        self, scenario: Scenario, ids: IdAllocator, variables: Mapping[str, str], tech: str, start: float
    ) -> None:
        self.scenario = scenario
        self.ids = ids
        self.start = start
        self.now = start
        self.sequences: dict[tuple[str, int], str] = {}
        merged: dict[str, str] = dict(DEFAULT_VARS)
        merged.update(scenario.defaults)
        merged.update({k: str(v) for k, v in variables.items()})
        merged["tech"] = tech
        merged["epoch"] = str(int(start))
        self.raw_vars = merged
        self.vars: dict[str, str] = {}

    def var(self, name: str, depth: int = 0) -> str:
        if name in self.vars:
            return self.vars[name]
        if name not in self.raw_vars:
            raise ScenarioError(f"scenario {self.scenario.name!r}: no value for placeholder {{{{{name}}}}}")
        if depth > 8:
            raise ScenarioError(f"scenario {self.scenario.name!r}: placeholder {{{{{name}}}}} refers to itself")
        # Defaults may themselves refer to variables ("Agent {{line}}").
        value = _PLACEHOLDER.sub(lambda m: self.sub(m, depth + 1), self.raw_vars[name])
        self.vars[name] = value
        return value

    def sub(self, match: re.Match[str], depth: int = 0) -> str:
        name, number = match.group(1), match.group(2)
        if number is None:
            return self.var(name, depth)
        if name not in _SEQUENCE_KINDS:
            raise ScenarioError(f"scenario {self.scenario.name!r}: unknown placeholder {match.group(0)}")
        key = (name, int(number))
        value = self.sequences.get(key)
        if value is None:
            preset = self.raw_vars.get(f"{name}:{number}")
            if preset:
                value = preset
            elif name == "uid":
                value = self.ids.uniqueid(self.now)
            elif name == "chan":
                value = self.ids.channel_suffix()
            else:
                value = self.ids.bridge_id()
            self.sequences[key] = value
        return value

    def text(self, value: str) -> str:
        if "{{" not in value:
            return value
        return _PLACEHOLDER.sub(self.sub, value)

    def run(self) -> RenderedScenario:
        steps: list[Step] = []
        channels: list[str] = []
        linkedid: str | None = None
        for step in self.scenario.steps:
            self.now += step.delay
            item = step.item
            if isinstance(item, AmiMessage):
                rendered = AmiMessage(tuple((n, self.text(v)) for n, v in item.headers), item.body)
                if rendered.event == "Newchannel":
                    channel = rendered.get("Channel")
                    if channel:
                        channels.append(channel)
                    if linkedid is None:
                        linkedid = rendered.get("Linkedid")
                steps.append(Step(step.delay, rendered))
            else:
                steps.append(Step(step.delay, self.text(item.decode("utf-8")).encode("utf-8")))
        # Resolve every variable so the caller can report what was played.
        for name in self.raw_vars:
            self.var(name)
        return RenderedScenario(self.scenario.name, tuple(steps), linkedid, tuple(channels), dict(self.vars))


def load_scenario(
    source: str | os.PathLike[str] | bytes,
    *,
    default_gap: float = DEFAULT_GAP,
    name: str | None = None,
) -> Scenario:
    """Load a scenario from a file path or from the bytes of one.

    Raises :class:`ScenarioError` for a malformed message or directive, ``OSError`` if the file is unreadable.
    """
    if isinstance(source, bytes):
        data = source
        label = name or "<bytes>"
    else:
        path = Path(source)
        data = path.read_bytes()
        label = name or path.stem
    return _load(data, label, default_gap)


def _load(data: bytes, label: str, default_gap: float) -> Scenario:
    parser = AmiParser(max_message_bytes=1024 * 1024, expect_banner=True)
    steps: list[Step] = []
    defaults: dict[str, str] = {}
    gap = default_gap
    pending: float | None = None
    lineno = 0

    def next_delay() -> float:
        nonlocal pending
        if pending is not None:
            delay, pending = pending, None
            return delay
        return gap if steps else 0.0

    def drain() -> None:
        while (item := parser.next_event()) is not None:
            if isinstance(item, Banner):
                continue
            if isinstance(item, MalformedMessage):
                if parser.eof and item.reason.startswith("truncated"):
                    log.warning("scenario=%s: ignoring a truncated last message", label)
                    continue
                raise ScenarioError(f"{label}: malformed message before line {lineno}: {item.reason}: {item.raw!r}")
            if item.event is None:
                continue  # responses (login, Goodbye...) belong to the recording client, not the scenario
            steps.append(Step(next_delay(), item))

    for lineno, line in enumerate(data.splitlines(keepends=True), start=1):  # noqa: B007
        if not line.startswith(b"#"):
            parser.receive_data(line)
            continue
        drain()
        if not line.startswith(b"#@"):
            continue
        directive = line[2:].decode("utf-8", "replace").strip()
        try:
            if directive.startswith("+"):
                pending = _seconds(directive[1:])
            elif directive.startswith("gap "):
                gap = _seconds(directive[4:])
            elif directive.startswith("var "):
                key, sep, value = directive[4:].partition("=")
                if not sep or not key.strip():
                    raise ValueError("expected '#@ var name=value'")
                defaults[key.strip()] = value.strip()
            elif directive.startswith("raw "):
                raw = codecs.decode(directive[4:], "unicode_escape").encode("latin-1")
                steps.append(Step(next_delay(), raw))
            else:
                raise ValueError("unknown directive")
        except (ValueError, UnicodeError) as exc:
            raise ScenarioError(f"{label}:{lineno}: bad directive {directive!r}: {exc}") from exc
    parser.receive_data(b"")
    drain()
    return Scenario(label, tuple(steps), defaults)


def _seconds(text: str) -> float:
    value = float(text.strip())
    if not value >= 0 or value == float("inf"):
        raise ValueError("delay must be a finite number of seconds >= 0")
    return value


async def play_steps(
    steps: tuple[Step, ...] | Scenario | RenderedScenario,
    emit: Callable[[AmiMessage | bytes], Awaitable[None] | None],
    *,
    time_scale: float = 1.0,
) -> None:
    """Emit each step after its delay (times ``time_scale``); ``emit`` may be sync or async.

    Delays are measured from the scenario start, so a slow ``emit`` does not stretch the whole play.
    """
    loop = asyncio.get_running_loop()
    seq = steps.steps if isinstance(steps, Scenario | RenderedScenario) else steps
    due = loop.time()
    for step in seq:
        due += step.delay * time_scale
        wait = due - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        result = emit(step.item)
        if result is not None:
            await result
