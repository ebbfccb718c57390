"""Sans-I/O core of the Asterisk Manager Interface (AMI) wire protocol.

Bytes go in (:meth:`AmiParser.receive_data`), messages come out (:meth:`AmiParser.next_event`); nothing here
touches a socket, a thread or an event loop, so the same code serves the asyncio gateway, the simulator, the
``filePath`` replay and the tests, which feed it recorded captures.

Theory of operation
-------------------
On connect Asterisk writes one banner line (``Asterisk Call Manager/9.0.0\\r\\n``), then a stream of
messages. A message is a block of ``Name: value`` lines ended by an empty line. Names repeat
(``ChanVariable``, ``Output``...), so headers are kept as an ordered tuple of pairs. Old Asterisk (<= 13)
answers ``Action: Command`` with ``Response: Follows``: a few header lines, then raw command output that may
itself contain blank lines, closed by ``--END COMMAND--``; that form is framed on the marker, not on the
blank line.

The receive buffer is a ``bytearray`` that is consumed from the front (CPython makes ``del buf[:n]`` O(1)
there) and searched only from where the previous search stopped, so feeding a message one byte at a time
costs linear time. A message that grows past ``max_message_bytes`` without its terminator is reported once as
``MalformedMessage("oversized")`` and its bytes are thrown away until the next blank line (resync): the buffer
never holds more than about ``max_message_bytes`` plus the last chunk handed to :meth:`receive_data`.

Bad content is the peer's problem, not a crash: a message with a line that has no colon becomes a
:class:`MalformedMessage` and parsing continues with the next one, so the codec has no exception for the
peer's input (a session that cannot go on is the client's ``AmiError``); ``ValueError`` is for our own
output only (a CR or LF in an action we encode). Line endings may be CRLF (Asterisk) or
bare LF (some proxies and hand-written files).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

__all__ = [
    "AmiMessage",
    "AmiParser",
    "Banner",
    "MalformedMessage",
    "encode_action",
    "encode_message",
    "md5_login_key",
]

# How many bytes of a bad message MalformedMessage.raw keeps (enough to log, never a memory hazard).
_RAW_KEEP = 200
_FOLLOWS = b"Response: Follows"
_END_COMMAND = "--END COMMAND--"
_END_COMMAND_B = _END_COMMAND.encode()
# Header names that may precede the raw output of a "Response: Follows" answer.
_FOLLOWS_HEADERS = frozenset({"response", "privilege", "actionid", "message"})


@dataclass(frozen=True, slots=True)
class AmiMessage:
    """One AMI message: an event (``Event:``), an action answer (``Response:``) or an action."""

    headers: tuple[tuple[str, str], ...]
    body: tuple[str, ...] = ()
    # Lazily built {lower-case name: first value}; not part of equality or repr.
    _index: dict[str, str] | None = field(default=None, init=False, repr=False, compare=False)

    def _lookup(self) -> dict[str, str]:
        index = self._index
        if index is None:
            index = {}
            for name, value in self.headers:
                index.setdefault(name.lower(), value)
            object.__setattr__(self, "_index", index)
        return index

    def get(self, name: str, default: str | None = None) -> str | None:
        """Value of the first header called ``name`` (case-insensitive), or ``default``."""
        return self._lookup().get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return self._lookup()[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._lookup()

    def getall(self, name: str) -> list[str]:
        """Values of every header called ``name``, in wire order."""
        key = name.lower()
        return [v for n, v in self.headers if n.lower() == key]

    def items(self) -> Iterator[tuple[str, str]]:
        return iter(self.headers)

    @property
    def event(self) -> str | None:
        # Fast path: Asterisk always writes Event first.
        if self.headers and self.headers[0][0] == "Event":
            return self.headers[0][1]
        return self.get("Event")

    @property
    def response(self) -> str | None:
        if self.headers and self.headers[0][0] == "Response":
            return self.headers[0][1]
        return self.get("Response")

    @property
    def action_id(self) -> str | None:
        return self.get("ActionID")

    def variables(self) -> dict[str, str]:
        """Channel variables carried by the message.

        Understands ``ChanVariable: name=value`` (Asterisk 12+), ``ChanVariable(SIP/305-0001): name=value``
        (1.8/11), ``Variable: name=value`` (actions, Originate) and the ``VarSet`` event's
        ``Variable: name`` / ``Value: value`` pair.
        """
        result: dict[str, str] = {}
        for name, value in self.headers:
            key = name.lower()
            if key == "chanvariable" or key.startswith("chanvariable(") or key == "variable":
                var, sep, val = value.partition("=")
                if sep:
                    result[var] = val
        if not result and self.event == "VarSet":
            var_name = self.get("Variable")
            if var_name is not None:
                result[var_name] = self.get("Value") or ""
        return result

    def with_headers(self, headers: Iterable[tuple[str, str]]) -> AmiMessage:
        return AmiMessage(tuple(headers), self.body)

    def encode(self) -> bytes:
        """The message as Asterisk writes it (CRLF, blank line at the end)."""
        return encode_message(self.headers, self.body)


@dataclass(frozen=True, slots=True)
class Banner:
    """The greeting line, ``Asterisk Call Manager/<version>``."""

    version: str


@dataclass(frozen=True, slots=True)
class MalformedMessage:
    """A message that could not be parsed; ``raw`` is its start, truncated to about 200 bytes."""

    reason: str
    raw: bytes


ParserEvent = AmiMessage | Banner | MalformedMessage


def _find_terminator(buf: bytearray, start: int, end: int | None = None) -> tuple[int, int]:
    """Find the first blank line at or after ``start``.

    Returns ``(content_end, consumed)``: the message content is ``buf[:content_end]`` and ``consumed`` bytes
    are removed from the buffer. ``(-1, -1)`` when absent. A blank line is LF, optional CR, LF.
    """
    crlf = buf.find(b"\n\r\n", start) if end is None else buf.find(b"\n\r\n", start, end)
    # Bare-LF terminators are searched only up to the CRLF one, so CRLF streams pay a bounded extra scan.
    lf_end = crlf + 2 if crlf >= 0 else end
    lf = buf.find(b"\n\n", start) if lf_end is None else buf.find(b"\n\n", start, lf_end)
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf, lf + 2
    if crlf >= 0:
        return crlf, crlf + 3
    return -1, -1


def _split_lines(text: str) -> list[str]:
    if "\r" in text:
        lines = text.split("\n")
        return [line[:-1] if line.endswith("\r") else line for line in lines]
    return text.split("\n")


class AmiParser:
    """Incremental AMI parser: ``receive_data(bytes)``, then ``next_event()`` until it returns ``None``."""

    def __init__(self, max_message_bytes: int = 64 * 1024, expect_banner: bool = True) -> None:
        if max_message_bytes < 64:
            raise ValueError("max_message_bytes must be at least 64")
        self._max = max_message_bytes
        self._buf = bytearray()
        self._scan = 0  # where the next terminator search starts
        self._want_banner = expect_banner
        self._discarding = False  # dropping an oversized message until the next blank line
        self._eof = False

    @property
    def eof(self) -> bool:
        """True once ``receive_data(b"")`` was called (the peer closed)."""
        return self._eof

    @property
    def buffered(self) -> int:
        """Bytes currently held (for tests and metrics)."""
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer; ``b""`` means end of stream."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("receive_data() after EOF")
        buf = self._buf
        buf += data
        if self._discarding:
            self._discard()

    def _discard(self) -> None:
        """Drop bytes of an oversized message until its blank line; keep a tail that may start one."""
        buf = self._buf
        content_end, consumed = _find_terminator(buf, 0)
        if consumed >= 0:
            del buf[:consumed]
            self._discarding = False
        elif len(buf) > 2:
            del buf[: len(buf) - 2]
        self._scan = 0

    def next_event(self) -> ParserEvent | None:
        """The next complete message, or ``None`` when more data is needed (or at the end)."""
        while True:
            if self._discarding:
                self._discard()
                if self._discarding:
                    if self._eof:
                        self._buf.clear()
                    return None
            buf = self._buf
            # Blank lines between messages carry nothing.
            skip = 0
            n = len(buf)
            while skip < n and buf[skip] in b"\r\n":
                skip += 1
            if skip:
                del buf[:skip]
                self._scan = max(0, self._scan - skip)
                n -= skip
            if not n:
                return None
            if self._want_banner:
                return self._next_banner()
            if buf.startswith(_FOLLOWS):
                result = self._next_follows()
            elif n < len(_FOLLOWS) and _FOLLOWS.startswith(bytes(buf)) and not self._eof:
                return None  # cannot tell a Follows answer from a normal one yet
            else:
                result = self._next_plain()
            if result is not None:
                return result
            # Nothing complete yet: enforce the cap, or report a truncated tail at EOF.
            if len(buf) > self._max:
                raw = bytes(buf[:_RAW_KEEP])
                self._discarding = True
                self._discard()
                return MalformedMessage("oversized", raw)
            if self._eof:
                raw = bytes(buf[:_RAW_KEEP])
                buf.clear()
                self._scan = 0
                return MalformedMessage("truncated at end of stream", raw)
            return None

    def _next_banner(self) -> ParserEvent | None:
        buf = self._buf
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > self._max:
                raw = bytes(buf[:_RAW_KEEP])
                self._want_banner = False
                self._discarding = True
                self._discard()
                return MalformedMessage("oversized", raw)
            if self._eof:
                raw = bytes(buf)
                buf.clear()
                return MalformedMessage("truncated at end of stream", raw)
            return None
        line = buf[:nl].decode("utf-8", "replace").rstrip("\r")
        self._want_banner = False
        if "/" in line and ": " not in line:
            del buf[: nl + 1]
            self._scan = 0
            return Banner(line.rsplit("/", 1)[1].strip())
        if ":" in line:
            # No banner (a proxy, or a file without one): this is already a message.
            return self.next_event()
        del buf[: nl + 1]
        self._scan = 0
        return MalformedMessage("bad banner", line.encode()[:_RAW_KEEP])

    def _next_plain(self) -> ParserEvent | None:
        buf = self._buf
        content_end, consumed = _find_terminator(buf, self._scan)
        if consumed < 0:
            # Resume 2 bytes back: a terminator may straddle two chunks.
            self._scan = max(0, len(buf) - 2)
            return None
        return self._take(content_end, consumed, _parse_block)

    def _next_follows(self) -> ParserEvent | None:
        buf = self._buf
        marker = buf.find(_END_COMMAND_B, max(0, self._scan - len(_END_COMMAND_B)))
        if marker < 0:
            self._scan = len(buf)
            return None
        # The marker line ends the output; the message ends at the blank line after it.
        content_end, consumed = _find_terminator(buf, marker)
        if consumed < 0:
            self._scan = marker  # rescan from the marker; it is found again immediately
            return None
        return self._take(content_end, consumed, _parse_follows)

    def _take(self, content_end: int, consumed: int,
              parse: Callable[[bytearray], ParserEvent]) -> ParserEvent:
        """Cut one complete message off the buffer; one over the size limit is reported, not parsed."""
        buf = self._buf
        self._scan = 0
        if consumed > self._max:
            raw = bytes(buf[:_RAW_KEEP])
            del buf[:consumed]
            return MalformedMessage("oversized", raw)
        block = buf[:content_end]
        del buf[:consumed]
        return parse(block)


# One header line: a non-empty name without colon, ":", at most one space that is not part of the value,
# the value, an optional CR. A stray CR inside a value does not match, so the message is reported malformed.
_HEADER_RE = re.compile(r"^([^:\r\n]+):[ ]?([^\r\n]*)\r?$", re.MULTILINE)


def _parse_block(block: bytearray) -> AmiMessage | MalformedMessage:
    text = block.decode("utf-8", "replace")
    headers = _HEADER_RE.findall(text)
    # A block holds no blank line (that would have ended it), so every line must be a header.
    if len(headers) != text.count("\n") + 1:
        return MalformedMessage("line without a header name and colon", bytes(block[:_RAW_KEEP]))
    return AmiMessage(tuple(headers))


def _parse_follows(block: bytearray) -> AmiMessage | MalformedMessage:
    lines = _split_lines(block.decode("utf-8", "replace"))
    headers: list[tuple[str, str]] = []
    i = 0
    while i < len(lines):
        name, sep, value = lines[i].partition(":")
        if not sep or name.lower() not in _FOLLOWS_HEADERS:
            break
        headers.append((name, value[1:] if value.startswith(" ") else value))
        i += 1
    body = lines[i:]
    # The marker closes the output; Asterisk glues it to the last output line if that had no newline.
    while body and not body[-1]:
        body.pop()
    if body and body[-1].endswith(_END_COMMAND):
        rest = body.pop()[: -len(_END_COMMAND)]
        if rest:
            body.append(rest)
    if not headers:
        return MalformedMessage("Follows answer without headers", bytes(block[:_RAW_KEEP]))
    return AmiMessage(tuple(headers), tuple(body))


def _check(text: str, what: str) -> str:
    if "\r" in text or "\n" in text:
        raise ValueError(f"AMI {what} must not contain CR or LF: {text!r}")
    return text


def encode_message(headers: Iterable[tuple[str, str]], body: Iterable[str] = ()) -> bytes:
    """Serialise headers (and an old-style ``Follows`` body) the way Asterisk does."""
    parts = [f"{_check(name, 'header name')}: {_check(value, 'header value')}\r\n" for name, value in headers]
    body_lines = list(body)
    if body_lines:
        parts.extend(f"{_check(line, 'body line')}\r\n" for line in body_lines)
        parts.append(_END_COMMAND + "\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("utf-8")


def encode_action(
    action: str,
    fields: Iterable[tuple[str, str]] | Mapping[str, str] = (),
    action_id: str | None = None,
) -> bytes:
    """Encode an action. ``fields`` may be a mapping or pairs (pairs allow repeats, e.g. ``Variable``).

    Raises ``ValueError`` if a name or value contains CR/LF (header injection is always our bug).
    """
    headers: list[tuple[str, str]] = [("Action", action)]
    if action_id is not None:
        headers.append(("ActionID", action_id))
    pairs = fields.items() if isinstance(fields, Mapping) else fields
    headers.extend((str(k), str(v)) for k, v in pairs)
    return encode_message(headers)


def md5_login_key(challenge: str, secret: str) -> str:
    """``Key`` for ``Login`` with ``AuthType: MD5``: hex MD5 of challenge followed by secret."""
    return hashlib.md5((challenge + secret).encode("utf-8"), usedforsecurity=False).hexdigest()
