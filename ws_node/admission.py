"""Who may connect and how much they may send, the same for both transports.

Creatio's client sends no credentials, so what protects a node is: an optional deployment key
the administrator puts in the server URL (the client uses that URL verbatim, so the key rides in
``?key=`` on every request), an Origin allowlist, a cap on open connections, and per-connection
limits on message size and rate. Everything here is pure (an injected clock) so the rules are
tested without sockets; the transports only ask and act on the answers.
"""

from __future__ import annotations

import enum
import hmac
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter

from services.wire import CommandName

REFUSED = Counter("cms_node_refused_requests_total", "Handshakes and negotiations refused at admission", ["reason"])
for _reason in ("node_draining", "bad_key", "origin_not_allowed", "node_full", "bad_connection_token"):
    REFUSED.labels(reason=_reason)
RATE_LIMITED = Counter("cms_node_rate_limited_messages_total", "Client messages dropped for exceeding the rate")
RATE_DISCONNECTS = Counter("cms_node_rate_limit_disconnects_total", "Clients disconnected for flooding")
OVERSIZED = Counter("cms_node_oversized_messages_total", "Client messages over the size limit (connection closed)")
PROTOCOL_VIOLATIONS = Counter(
    "cms_node_protocol_violations_total", "Connections closed for frames the transport cannot accept", ["kind"]
)


@dataclass(frozen=True, slots=True)
class AdmissionPolicy:
    """Limits for one node. Zero disables a numeric limit; an empty key or allowlist disables that check."""

    deployment_key: str = ""
    allowed_origins: tuple[str, ...] = ()
    max_connections: int = 20_000
    max_message_bytes: int = 64 * 1024
    #: sustained client messages per second per connection, and the burst allowed above it
    messages_per_second: float = 20.0
    message_burst: int = 60
    #: messages refused within ``flood_window_seconds`` before the connection is closed
    flood_tolerance: int = 50
    flood_window_seconds: float = 10.0
    #: from the socket opening to the first message (raw) or the SignalR handshake record
    handshake_timeout_seconds: float = 15.0

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_message_bytes", "message_burst", "flood_tolerance"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("messages_per_second", "flood_window_seconds", "handshake_timeout_seconds"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0")
        if self.messages_per_second > 0 and self.message_burst < 1:
            raise ValueError("message_burst must be >= 1 when a rate is set")

    def __repr__(self) -> str:  # the key never reaches a log through a repr
        key = "set" if self.deployment_key else "none"
        return (
            f"AdmissionPolicy(key={key}, origins={self.allowed_origins!r}, max_connections={self.max_connections}, "
            f"max_message_bytes={self.max_message_bytes}, rate={self.messages_per_second}/s "
            f"burst={self.message_burst})"
        )


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is not admitted: the HTTP status to answer and a short reason (also a metric label)."""

    status: int
    reason: str


def normalize_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def key_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison, so response timing tells nothing about how much of a guess was right."""
    if not expected:
        return True
    return hmac.compare_digest(expected.encode("utf-8"), (given or "").encode("utf-8", errors="replace"))


def origin_allowed(allowed: tuple[str, ...], origin: str | None) -> bool:
    """No allowlist, or no Origin header (a server-side client, not a browser): allowed.

    Entries are exact origins (``https://crm.example.com``) or ``*`` for any; a browser page
    opened from a file sends ``null``, which only ``*`` admits.
    """
    if not allowed or origin is None:
        return True
    wanted = normalize_origin(origin)
    return any(entry == "*" or normalize_origin(entry) == wanted for entry in allowed)


def admit(
    policy: AdmissionPolicy, *, key: str | None, origin: str | None, open_connections: int, draining: bool
) -> Refusal | None:
    """The verdict on a new socket or negotiation; ``None`` admits it. Counts refusals."""
    refusal: Refusal | None = None
    if draining:
        refusal = Refusal(503, "node draining")
    elif not key_matches(policy.deployment_key, key):
        refusal = Refusal(403, "bad key")
    elif not origin_allowed(policy.allowed_origins, origin):
        refusal = Refusal(403, "origin not allowed")
    elif policy.max_connections and open_connections >= policy.max_connections:
        refusal = Refusal(503, "node full")
    if refusal is not None:
        REFUSED.labels(reason=refusal.reason.replace(" ", "_")).inc()
    return refusal


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; each message takes one. ``rate=0`` never limits."""

    __slots__ = ("rate", "burst", "_clock", "_tokens", "_at")  # one per connection

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self, cost: int = 1) -> bool:
        """Take ``cost`` tokens if all are there; otherwise take none."""
        if self.rate <= 0:
            return True
        self._refill()
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False

    def has(self, cost: int = 1) -> bool:
        if self.rate <= 0:
            return True
        self._refill()
        return self._tokens >= cost

    @property
    def full(self) -> bool:
        self._refill()
        return self._tokens >= self.burst

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def seconds_until(self, cost: int = 1) -> float:
        """How long until ``cost`` tokens are there (for telling a client when to retry)."""
        if self.rate <= 0:
            return 0.0
        self._refill()
        return max(0.0, (cost - self._tokens) / self.rate)


class RateVerdict(enum.Enum):
    ACCEPT = "accept"
    #: drop this message and tell the client (once per flood window, so a flood is not answered in kind)
    REFUSE_AND_WARN = "refuse-and-warn"
    REFUSE = "refuse"
    DISCONNECT = "disconnect"


class RateGuard:
    """One connection's message-rate rule: a token bucket, then a tolerance for refused messages.

    Over the rate, a message is dropped; the first drop of a window is answered with an ERROR so
    a misbehaving script learns why; when more than ``flood_tolerance`` drops pile up within
    ``flood_window_seconds`` the client is disconnected.
    """

    __slots__ = ("_bucket", "_clock", "_tolerance", "_window", "_window_start", "_refused")  # one per connection

    def __init__(self, policy: AdmissionPolicy, clock: Callable[[], float]) -> None:
        self._bucket = TokenBucket(policy.messages_per_second, policy.message_burst, clock)
        self._clock = clock
        self._tolerance = policy.flood_tolerance
        self._window = policy.flood_window_seconds
        self._window_start = -math.inf
        self._refused = 0

    def check(self, cost: int = 1) -> RateVerdict:
        """One client message, or ``cost`` of them arriving together (SignalR records batched in
        one WebSocket message: each counts, so batching buys a flood nothing)."""
        if self._bucket.take(cost):
            return RateVerdict.ACCEPT
        RATE_LIMITED.inc(cost)
        now = self._clock()
        if now - self._window_start > self._window:
            self._window_start = now
            self._refused = 0
        first = self._refused == 0
        self._refused += cost
        if self._refused > self._tolerance:
            RATE_DISCONNECTS.inc()
            return RateVerdict.DISCONNECT
        return RateVerdict.REFUSE_AND_WARN if first else RateVerdict.REFUSE


# ---- commands per line and per user ------------------------------------------------------------

COMMANDS_LIMITED = Counter(
    "cms_node_commands_rate_limited_total",
    "Agent commands refused for exceeding the per-line or per-user limit (never sent to the PBX)",
    ["kind", "scope"],
)

#: what each command costs the PBX, grouped: an Originate rings a phone, DTMF plays tones...
COMMAND_KINDS: dict[CommandName, str] = {
    CommandName.MAKE_CALL: "originate",
    CommandName.CONSULT_CALL: "originate",
    CommandName.BLIND_TRANSFER: "transfer",
    CommandName.COMPLETE_TRANSFER: "transfer",
    CommandName.CANCEL_TRANSFER: "transfer",
    CommandName.DTMF: "dtmf",
    CommandName.SET_DND: "state",
    CommandName.AGENT_PAUSE: "state",
    CommandName.AGENT_UNPAUSE: "state",
    CommandName.WRAP_UP: "state",
    CommandName.HANGUP: "call",
    CommandName.ANSWER: "call",
    CommandName.HOLD: "call",
    CommandName.UNHOLD: "call",
}
for _kind in set(COMMAND_KINDS.values()):
    for _scope in ("line", "user"):
        COMMANDS_LIMITED.labels(kind=_kind, scope=_scope)


@dataclass(frozen=True, slots=True)
class CommandLimit:
    """``burst`` commands at once, then ``per_minute`` sustained."""

    burst: int
    per_minute: float


#: generous for a person clicking, tight for a script: a human dials a few numbers a minute
DEFAULT_COMMAND_LIMITS: dict[str, CommandLimit] = {
    "originate": CommandLimit(5, 12),
    "transfer": CommandLimit(6, 30),
    "dtmf": CommandLimit(40, 300),
    "state": CommandLimit(10, 30),
    "call": CommandLimit(20, 120),
}

_LIMIT_RE = re.compile(r"\s*([a-z]+)\s*=\s*(\d+)\s*:\s*(\d+(?:\.\d+)?)\s*")


def parse_command_limits(spec: str) -> dict[str, CommandLimit]:
    """``"originate=5:12,dtmf=40:300"`` (kind=burst:per_minute) over the defaults; ``0:0`` turns a kind off."""
    limits = dict(DEFAULT_COMMAND_LIMITS)
    for item in (part for part in spec.split(",") if part.strip()):
        match = _LIMIT_RE.fullmatch(item)
        if match is None or match.group(1) not in DEFAULT_COMMAND_LIMITS:
            raise ValueError(
                f"command limit {item.strip()!r}: expected kind=burst:per_minute with kind one of "
                f"{', '.join(DEFAULT_COMMAND_LIMITS)}, e.g. originate=5:12"
            )
        burst, per_minute = int(match.group(2)), float(match.group(3))
        if (burst == 0) != (per_minute == 0):
            raise ValueError(f"command limit {item.strip()!r}: burst and rate must both be 0 (off) or both > 0")
        limits[match.group(1)] = CommandLimit(burst, per_minute)
    return limits


@dataclass(slots=True)
class CommandLimiter:
    """Node-wide command budgets, one bucket per (kind, line) and per (kind, user), whatever socket
    the command comes from: three tabs on one line share the line's budget.

    A command is admitted only when both its line's and its user's buckets have a token, and then
    takes one from each. Full buckets are forgotten now and then, so memory follows active lines.
    """

    limits: dict[str, CommandLimit] = field(default_factory=lambda: dict(DEFAULT_COMMAND_LIMITS))
    clock: Callable[[], float] = field(default=lambda: 0.0)
    _buckets: dict[tuple[str, str, str], TokenBucket] = field(default_factory=dict)
    _checks: int = 0

    def check(self, line: str, user: str, name: CommandName) -> str | None:
        """``None`` admits the command; otherwise the message for the agent."""
        kind = COMMAND_KINDS.get(name)
        limit = self.limits.get(kind) if kind is not None else None
        if kind is None or limit is None or limit.burst == 0:
            return None
        self._checks += 1
        if self._checks % 1024 == 0:
            self._forget_idle()
        scopes = [("line", line)] + ([("user", user.lower())] if user else [])
        buckets = [(scope, self._bucket(kind, scope, who, limit)) for scope, who in scopes]
        for scope, bucket in buckets:
            if not bucket.has():
                COMMANDS_LIMITED.labels(kind=kind, scope=scope).inc()
                wait = max(1, math.ceil(bucket.seconds_until()))
                whose = f"line {line}" if scope == "line" else "this user"
                return (f"too many {kind} commands from {whose} (limit {limit.burst} at once, "
                        f"{limit.per_minute:g} a minute): try again in {wait} s")
        for _scope, bucket in buckets:
            bucket.take()
        return None

    def _bucket(self, kind: str, scope: str, who: str, limit: CommandLimit) -> TokenBucket:
        key = (kind, scope, who)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(limit.per_minute / 60.0, limit.burst, self.clock)
        return bucket

    def _forget_idle(self) -> None:
        for key in [k for k, b in self._buckets.items() if b.full]:
            del self._buckets[key]


# ---- one user's debug traffic log -------------------------------------------------------------

DEBUG_SUPPRESSED = Counter(
    "cms_node_debug_lines_suppressed_total", "Debug traffic lines not logged: the user's budget was spent"
)
CONTEXT_REFUSED = Counter(
    "cms_node_originate_context_refusals_total",
    "OpenConnection named a dialplan context the administrator does not allow (dialling refused)",
)
DEBUG_REFUSED = Counter(
    "cms_node_debug_mode_refused_total", "OpenConnection asked for debugMode for a user the admin did not allow"
)


@dataclass(slots=True)
class DebugBudget:
    """Per user: at most ``lines_per_minute`` debug lines (burst of as many), each cut to ``max_chars``.

    Node-wide, keyed by user, so four tabs of one user share one budget. :meth:`admit` answers
    whether to log a line, and once per exhaustion returns a notice to log instead.
    """

    lines_per_minute: int = 120
    max_chars: int = 2000
    clock: Callable[[], float] = field(default=lambda: 0.0)
    _buckets: dict[str, TokenBucket] = field(default_factory=dict)
    _muted: dict[str, int] = field(default_factory=dict)

    def admit(self, user: str) -> tuple[bool, int]:
        """(log this line?, lines suppressed since the last logged one)."""
        bucket = self._buckets.get(user)
        if bucket is None:
            if len(self._buckets) > 10_000:
                self._buckets = {k: b for k, b in self._buckets.items() if not b.full}
            bucket = self._buckets[user] = TokenBucket(self.lines_per_minute / 60.0, self.lines_per_minute, self.clock)
        if bucket.take():
            return True, self._muted.pop(user, 0)
        DEBUG_SUPPRESSED.inc()
        self._muted[user] = self._muted.get(user, 0) + 1
        return False, 0

    def cut(self, text: str) -> str:
        if len(text) <= self.max_chars:
            return text
        return f"{text[: self.max_chars]}... ({len(text) - self.max_chars} more characters)"
