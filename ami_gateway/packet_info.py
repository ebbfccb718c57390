"""``packetInfoConfig``: which AMI headers and channel variables travel with a call to the clients.

Syntax (one string, as CMS keeps it in appsettings.json)::

    item (";" item)*
    item   = source ":" name [ "=" key ]
    source = "header" | "var"          (case-insensitive; "h" and "v" are accepted as short forms)

* ``header:AccountCode`` copies the AMI header ``AccountCode`` (matched case-insensitively) of the call's
  channels; for a dialled channel the ``Dest``-prefixed header of Dial events counts too (``DestAccountCode``).
* ``var:CRM_ID`` copies the channel variable ``CRM_ID``. Asterisk only sends variables listed in
  ``channelvars`` of manager.conf (as ``ChanVariable: CRM_ID=...``); the names are case-sensitive, as in
  Asterisk.
* ``=key`` names the field in ``Call.extra`` (default: the header or variable name). Keys must be unique.

Spaces around items and around ``:`` / ``=`` are ignored; empty items (``a;;b``, a trailing ``;``) are
skipped. Example: ``header:AccountCode=account; var:CRM_ID=crmId; header:Queue``.

Where values come from: the tracker remembers, per channel, the latest non-empty value of every requested
header or variable seen in events about that channel, and fills ``Call.extra`` from the channels of the call
(the remote side first, the agent's own channel last, so the agent's channel wins on a clash).
Errors raise :class:`PacketInfoError` naming the bad item and its position.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["PacketInfoError", "PacketInfoItem", "PacketInfoSpec", "Source", "parse_packet_info"]

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


class PacketInfoError(ValueError):
    """packetInfoConfig could not be parsed; the message names the offending item."""


class Source(StrEnum):
    HEADER = "header"
    VAR = "var"


_SOURCES = {"header": Source.HEADER, "h": Source.HEADER, "var": Source.VAR, "v": Source.VAR}


@dataclass(frozen=True, slots=True)
class PacketInfoItem:
    source: Source
    name: str
    key: str


@dataclass(frozen=True, slots=True)
class PacketInfoSpec:
    items: tuple[PacketInfoItem, ...] = ()

    @property
    def headers(self) -> tuple[PacketInfoItem, ...]:
        return tuple(i for i in self.items if i.source is Source.HEADER)

    @property
    def variables(self) -> tuple[PacketInfoItem, ...]:
        return tuple(i for i in self.items if i.source is Source.VAR)

    def __bool__(self) -> bool:
        return bool(self.items)


def parse_packet_info(text: str) -> PacketInfoSpec:
    """Parse a packetInfoConfig string (see the module docstring for the syntax)."""
    items: list[PacketInfoItem] = []
    keys: dict[str, int] = {}
    for position, raw in enumerate(text.split(";"), start=1):
        item = raw.strip()
        if not item:
            continue
        where = f"packetInfoConfig item {position} ({item!r})"
        source_text, colon, rest = item.partition(":")
        if not colon:
            raise PacketInfoError(f"{where}: expected header:NAME or var:NAME")
        source = _SOURCES.get(source_text.strip().lower())
        if source is None:
            raise PacketInfoError(f"{where}: unknown source {source_text.strip()!r}; use 'header' or 'var'")
        name, eq, key = (part.strip() for part in rest.partition("="))
        if not _NAME_RE.fullmatch(name):
            raise PacketInfoError(f"{where}: {name!r} is not a valid {source.value} name")
        if eq:
            if not _KEY_RE.fullmatch(key):
                raise PacketInfoError(f"{where}: {key!r} is not a valid key (letters, digits, _ . -)")
        else:
            key = name
        if key in keys:
            raise PacketInfoError(f"{where}: key {key!r} is already used by item {keys[key]}")
        keys[key] = position
        items.append(PacketInfoItem(source, name, key))
    return PacketInfoSpec(tuple(items))
