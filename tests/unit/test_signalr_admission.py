"""Admission rules shared by the raw-WebSocket and SignalR transports (ws_node.admission): pure."""

from __future__ import annotations

import pytest

from ws_node.admission import (
    AdmissionPolicy,
    RateGuard,
    RateVerdict,
    TokenBucket,
    admit,
    key_matches,
    origin_allowed,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_key_is_compared_exactly() -> None:
    assert key_matches("", None)
    assert key_matches("abc-123", "abc-123")
    assert not key_matches("abc-123", "abc-12")
    assert not key_matches("abc-123", None)
    assert not key_matches("abc-123", "ABC-123")


def test_origins() -> None:
    allowed = ("https://crm.example.com", "http://localhost:8080/")
    assert origin_allowed((), "https://evil.example")
    assert origin_allowed(allowed, None)  # not a browser
    assert origin_allowed(allowed, "HTTPS://CRM.example.com")
    assert origin_allowed(allowed, "http://localhost:8080")
    assert not origin_allowed(allowed, "https://crm.example.com.evil.example")
    assert not origin_allowed(allowed, "null")
    assert origin_allowed(("*",), "null")


def test_admit_order_and_reasons() -> None:
    policy = AdmissionPolicy(deployment_key="k" * 16, allowed_origins=("https://a.example",), max_connections=2)
    ok = {"key": "k" * 16, "origin": "https://a.example", "open_connections": 1, "draining": False}
    assert admit(policy, **ok) is None  # type: ignore[arg-type]
    cases = [
        ({"draining": True}, 503, "node draining"),
        ({"key": "wrong"}, 403, "bad key"),
        ({"origin": "https://b.example"}, 403, "origin not allowed"),
        ({"open_connections": 2}, 503, "node full"),
    ]
    for change, status, reason in cases:
        refusal = admit(policy, **{**ok, **change})  # type: ignore[arg-type]
        assert refusal is not None and (refusal.status, refusal.reason) == (status, reason)


def test_policy_validates_and_hides_the_key() -> None:
    with pytest.raises(ValueError, match="max_message_bytes"):
        AdmissionPolicy(max_message_bytes=-1)
    with pytest.raises(ValueError, match="messages_per_second"):
        AdmissionPolicy(messages_per_second=float("nan"))
    with pytest.raises(ValueError, match="message_burst"):
        AdmissionPolicy(message_burst=0)
    assert "very-secret-key-1" not in repr(AdmissionPolicy(deployment_key="very-secret-key-1"))


def test_token_bucket_refills_at_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert [bucket.take() for _ in range(6)] == [True] * 5 + [False]
    clock.now = 0.1
    assert bucket.take() and not bucket.take()
    clock.now = 100.0
    assert sum(bucket.take() for _ in range(20)) == 5
    assert all(TokenBucket(0, 1, clock).take() for _ in range(1000))


def test_rate_guard_warns_once_then_disconnects_a_persistent_flood() -> None:
    clock = Clock()
    guard = RateGuard(AdmissionPolicy(messages_per_second=1, message_burst=2, flood_tolerance=3), clock)
    verdicts = [guard.check() for _ in range(7)]
    assert verdicts == [
        RateVerdict.ACCEPT, RateVerdict.ACCEPT,
        RateVerdict.REFUSE_AND_WARN, RateVerdict.REFUSE, RateVerdict.REFUSE,
        RateVerdict.DISCONNECT, RateVerdict.DISCONNECT,
    ]


def test_rate_guard_forgives_a_short_burst_after_the_window() -> None:
    clock = Clock()
    guard = RateGuard(
        AdmissionPolicy(messages_per_second=1, message_burst=1, flood_tolerance=2, flood_window_seconds=10), clock
    )
    assert guard.check() is RateVerdict.ACCEPT
    assert guard.check() is RateVerdict.REFUSE_AND_WARN
    assert guard.check() is RateVerdict.REFUSE
    clock.now = 11.0
    assert guard.check() is RateVerdict.ACCEPT
    assert guard.check() is RateVerdict.REFUSE_AND_WARN  # a new window: warned again, not cut
