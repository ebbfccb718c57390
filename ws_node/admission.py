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
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter

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

    def take(self) -> bool:
        if self.rate <= 0:
            return True
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


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

    def check(self) -> RateVerdict:
        if self._bucket.take():
            return RateVerdict.ACCEPT
        RATE_LIMITED.inc()
        now = self._clock()
        if now - self._window_start > self._window:
            self._window_start = now
            self._refused = 0
        self._refused += 1
        if self._refused > self._tolerance:
            RATE_DISCONNECTS.inc()
            return RateVerdict.DISCONNECT
        return RateVerdict.REFUSE_AND_WARN if self._refused == 1 else RateVerdict.REFUSE
