"""Which Asterisk channels are agent lines, and which line each belongs to.

A *line* is an agent's extension (``305``): the thing a Creatio user is bound to. Asterisk shows it in
three shapes, all handled here so the tracker never parses a channel name itself:

* a phone channel, ``SIP/305-00000004`` or ``PJSIP/305-0000001a``: ``<tech>/<peer>-<sequence>``. The peer is a
  line when ``tech`` is one of the configured protocols (CMS's ``protocol`` setting: ``SIP``, ``PJSIP`` or a
  comma list) and the peer is either a configured line or matches the line pattern (default: 2-8 digits).
  ``SIP/trunk-in-00000003`` is therefore a trunk, not a line.
* a queue member interface, ``SIP/305``, ``PJSIP/305`` or whatever ``queueExtensionFormat`` produces
  (``Local/305@from-queue/n``).
* a Local channel created for such a member, ``Local/305@from-queue-00000012;1``: Local channel names keep
  ``<exten>@<context>`` but drop the ``/n`` options and add ``-<sequence>;<1|2>``.

``queueExtensionFormat`` follows CMS (.NET ``String.Format``): ``{0}`` is the line, ``{{``/``}}`` are
literal braces; everything else is literal text, so it is regex-escaped before use.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["LineMatcher", "LineMatcherError", "split_channel"]

DEFAULT_LINE_PATTERN = r"\d{2,8}"

# Asterisk appends "-" and a hex sequence number to a peer to name a channel (SIP/305-0000000a). Local
# channels add ";1" or ";2" after it.
_CHANNEL_RE = re.compile(r"^(?P<tech>[^/]+)/(?P<resource>.+?)-(?P<seq>[0-9a-fA-F]+)(?P<half>;[12])?$")


class LineMatcherError(ValueError):
    """The line settings (protocol, queueExtensionFormat, line pattern) are unusable; the message names the key."""


def split_channel(channel: str) -> tuple[str, str, str] | None:
    """``SIP/trunk-in-00000003`` -> ``("SIP", "trunk-in", "")``; ``Local/305@q-0000000a;2`` -> ``(..., ";2")``.

    Returns ``None`` for anything that is not a channel name (a bare interface such as ``SIP/305``).
    """
    m = _CHANNEL_RE.match(channel.strip())
    if m is None:
        return None
    return m.group("tech"), m.group("resource"), m.group("half") or ""


def _format_to_regex(fmt: str, group: str, key: str) -> str:
    """Turn a .NET-style format with ``{0}`` into a regex; literal text is escaped, ``{0}`` captures the line."""
    out: list[str] = []
    seen = False
    i = 0
    while i < len(fmt):
        if fmt.startswith("{{", i):
            out.append(re.escape("{"))
            i += 2
        elif fmt.startswith("}}", i):
            out.append(re.escape("}"))
            i += 2
        elif fmt.startswith("{0}", i):
            # The line never contains the separators around it in a dial string or a channel name.
            out.append(f"(?P={group})" if seen else f"(?P<{group}>[^/@;&,|]+?)")
            seen = True
            i += 3
        elif fmt[i] in "{}":
            raise LineMatcherError(f"{key}: {fmt!r} has a stray {fmt[i]!r} at {i}; use {{0}} for the line")
        else:
            out.append(re.escape(fmt[i]))
            i += 1
    if not seen:
        raise LineMatcherError(f"{key}: {fmt!r} must contain {{0}} where the line number goes")
    return "".join(out)


class LineMatcher:
    """Maps channel names and queue member interfaces to agent lines. Immutable after construction."""

    def __init__(
        self,
        protocol: str | Iterable[str] = "SIP",
        queue_extension_format: str = "Local/{0}@from-queue/n",
        lines: Iterable[str] = (),
        line_pattern: str | None = DEFAULT_LINE_PATTERN,
    ) -> None:
        techs = protocol.split(",") if isinstance(protocol, str) else list(protocol)
        self.protocols: tuple[str, ...] = tuple(t.strip() for t in techs if t.strip())
        if not self.protocols:
            raise LineMatcherError(f"protocol: {protocol!r} must name a channel technology such as SIP or PJSIP")
        for tech in self.protocols:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", tech):
                raise LineMatcherError(f"protocol: {tech!r} is not a channel technology name")
        self._techs = frozenset(t.lower() for t in self.protocols)
        self.known_lines: frozenset[str] = frozenset(x.strip() for x in lines if x.strip())
        try:
            self._pattern = re.compile(line_pattern) if line_pattern else None
        except re.error as exc:
            raise LineMatcherError(f"linePattern: {line_pattern!r} is not a regular expression: {exc}") from exc
        self.queue_extension_format = queue_extension_format
        self._interface_re: re.Pattern[str] | None = None
        self._local_re: re.Pattern[str] | None = None
        if queue_extension_format:
            key = "queueExtensionFormat"
            tech, sep, rest = queue_extension_format.partition("/")
            if not sep or not tech or "{0}" in tech:
                raise LineMatcherError(
                    f"{key}: {queue_extension_format!r} must look like TECH/..., e.g. Local/{{0}}@ctx/n"
                )
            # The interface exactly as configured (tech case-insensitive, as Asterisk treats it).
            self._interface_re = re.compile("(?i:" + re.escape(tech) + ")/" + _format_to_regex(rest, "line", key) + "$")
            if tech.lower() == "local":
                # A Local channel's name drops the "/options" part and appends "-<seq>;<half>".
                resource = rest.split("/", 1)[0]
                self._local_re = re.compile(
                    "(?i:local)/" + _format_to_regex(resource, "line", key) + r"-[0-9a-fA-F]+;[12]$"
                )

    # ---- predicates ------------------------------------------------------------------------------

    def is_line(self, peer: str) -> bool:
        """Is this peer/extension an agent line (configured, or matching the line pattern)?"""
        if peer in self.known_lines:
            return True
        return self._pattern is not None and self._pattern.fullmatch(peer) is not None

    @staticmethod
    def is_local(channel: str) -> bool:
        return channel[:6].lower() == "local/"

    # ---- lookups ---------------------------------------------------------------------------------

    def line_of_channel(self, channel: str) -> str | None:
        """The line whose phone this channel is (``SIP/305-00000004`` -> ``305``); ``None`` for trunks and Local."""
        parts = split_channel(channel)
        if parts is None:
            return None
        tech, peer, half = parts
        if half or tech.lower() not in self._techs:
            return None
        return peer if self.is_line(peer) else None

    def line_of_local(self, channel: str) -> str | None:
        """The line a Local channel was created for via queueExtensionFormat (``Local/305@from-queue-0a;1``)."""
        if self._local_re is None:
            return None
        m = self._local_re.match(channel.strip())
        if m is None:
            return None
        line = m.group("line")
        return line if self.is_line(line) else None

    def line_of_interface(self, interface: str) -> str | None:
        """The line of a queue member interface: ``SIP/305``, ``PJSIP/305`` or the queueExtensionFormat form."""
        interface = interface.strip()
        if self._interface_re is not None:
            m = self._interface_re.match(interface)
            if m is not None:
                line = m.group("line")
                return line if self.is_line(line) else None
        tech, sep, peer = interface.partition("/")
        if sep and tech.lower() in self._techs and self.is_line(peer):
            return peer
        return None

    def line_of(self, channel_or_interface: str) -> str | None:
        """Any of the three shapes: a phone channel, a Local channel for a member, or a member interface."""
        return (
            self.line_of_channel(channel_or_interface)
            or self.line_of_local(channel_or_interface)
            or self.line_of_interface(channel_or_interface)
        )

    def interface_for(self, line: str) -> str:
        """The queue member interface of a line (for QueuePause/QueueAdd), per queueExtensionFormat."""
        if self.queue_extension_format:
            return (
                self.queue_extension_format.replace("{{", "\0")
                .replace("}}", "\1")
                .replace("{0}", line)
                .replace("\0", "{")
                .replace("\1", "}")
            )
        return f"{self.protocols[0]}/{line}"

    def __repr__(self) -> str:
        return (
            f"LineMatcher(protocol={','.join(self.protocols)!r}, "
            f"queue_extension_format={self.queue_extension_format!r}, lines={len(self.known_lines)})"
        )
