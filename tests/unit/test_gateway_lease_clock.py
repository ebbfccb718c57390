"""The lease's timing rules, without Redis: how long a holder may act, when a standby may try to take over."""

from __future__ import annotations

import pytest

from ami_gateway.lease import LeaseClock


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_grant_is_trusted_for_one_ttl_from_when_the_request_was_sent() -> None:
    t = FakeTime()
    clock = LeaseClock(2.0, clock=t)
    assert not clock.valid()
    sent = t.now
    t.now += 0.4  # the answer took a while: the deadline still counts from the request
    clock.granted(sent)
    t.now = sent + 1.99
    assert clock.valid()
    t.now = sent + 2.0
    assert not clock.valid()


def test_a_late_answer_to_an_old_renew_never_moves_the_deadline_back() -> None:
    t = FakeTime()
    clock = LeaseClock(2.0, clock=t)
    clock.granted(101.0)
    clock.granted(100.5)
    t.now = 102.5
    assert clock.valid()


def test_revoke_ends_the_right_to_act_at_once() -> None:
    t = FakeTime()
    clock = LeaseClock(2.0, clock=t)
    clock.granted(t.now)
    clock.revoke()
    assert not clock.valid()


def test_a_standby_that_never_lost_redis_may_try_at_once() -> None:
    clock = LeaseClock(2.0, clock=FakeTime())
    assert clock.may_try_to_take()


def test_after_an_outage_a_standby_waits_one_ttl_of_redis_being_back() -> None:
    t = FakeTime()
    clock = LeaseClock(2.0, clock=t)
    clock.reachable()
    clock.unreachable()
    assert not clock.may_try_to_take()
    t.now += 10
    assert not clock.may_try_to_take()  # still unreachable
    clock.reachable()
    t.now += 1.9
    clock.reachable()  # later answers do not restart the grace
    assert not clock.may_try_to_take()
    t.now += 0.2
    assert clock.may_try_to_take()
    clock.unreachable()
    assert not clock.may_try_to_take()


def test_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError):
        LeaseClock(0)
