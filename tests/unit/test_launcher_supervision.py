"""The launcher's pure parts: when to restart a dead process, when it is crash-looping, how an
exit is described, and a stop flag that many signals in a row cannot deadlock."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from local_cluster.__main__ import StopFlag
from local_cluster.supervisor import RestartPolicy, describe_exit


def policy(**overrides: float) -> RestartPolicy:
    # rand=1.0: the top of each jitter range, so the growth is visible
    return RestartPolicy(initial=0.5, maximum=8.0, stable_after=30.0, loop_exits=3, loop_window=60.0,
                         rand=lambda: 1.0, **overrides)  # type: ignore[arg-type]


def test_a_process_that_dies_right_after_each_start_waits_ever_longer_up_to_the_cap() -> None:
    p = policy()
    delays = [p.exited(now=float(i), uptime=1.0).delay for i in range(7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_the_delay_is_jittered_within_its_range() -> None:
    low = RestartPolicy(initial=0.5, maximum=8.0, rand=lambda: 0.0)
    assert low.exited(now=0.0, uptime=1.0).delay == 0.25  # never zero: no hot restart loop


def test_a_process_that_had_stayed_up_restarts_at_once_again() -> None:
    p = policy()
    for i in range(4):
        p.exited(now=float(i), uptime=1.0)
    decision = p.exited(now=100.0, uptime=45.0)
    assert decision.delay == 0.5
    assert decision.exits_in_window == 1
    assert not p.crash_looping


def test_crash_looping_is_reported_once_when_exits_pile_up_in_the_window() -> None:
    p = policy()
    decisions = [p.exited(now=float(i * 5), uptime=2.0) for i in range(5)]
    assert [d.crash_loop_started for d in decisions] == [False, False, True, False, False]
    assert p.crash_looping


def test_exits_spread_wider_than_the_window_are_not_a_loop() -> None:
    p = policy()
    decisions = [p.exited(now=float(i * 40), uptime=10.0) for i in range(5)]
    assert not any(d.crash_loop_started for d in decisions)
    assert max(d.exits_in_window for d in decisions) == 2


def test_staying_up_ends_the_crash_loop_and_the_backoff() -> None:
    p = policy()
    for i in range(3):
        p.exited(now=float(i), uptime=1.0)
    assert p.crash_looping
    p.stayed_up()
    assert not p.crash_looping
    assert p.exited(now=200.0, uptime=1.0).delay == 0.5


@pytest.mark.parametrize(
    ("code", "text"),
    [(1, "exit code 1"), (0, "exit code 0"), (-9, "killed by SIGKILL"), (-15, "killed by SIGTERM"),
     (-200, "killed by signal 200")],
)
def test_an_exit_says_whether_it_was_a_crash_or_a_kill(code: int, text: str) -> None:
    assert describe_exit(code) == text


@pytest.fixture
def stop_flag() -> Iterator[StopFlag]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    flag = StopFlag()
    flag.install()
    try:
        yield flag
    finally:
        flag.close()
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_burst_of_signals_only_counts_and_wakes_the_waiter(stop_flag: StopFlag) -> None:
    """Issue 10 item 5: the second SIGTERM used to land inside the first handler's Event.set()
    and deadlock. Here a burst of them, to ourselves, while the main thread is in wait()."""
    assert not stop_flag.is_set()
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        os.kill(os.getpid(), sig)
    started = time.monotonic()
    stop_flag.wait(30.0)
    assert time.monotonic() - started < 5.0
    assert stop_flag.signals == 5


def test_wait_sleeps_its_timeout_when_nothing_arrives(stop_flag: StopFlag) -> None:
    started = time.monotonic()
    stop_flag.wait(0.2)
    assert time.monotonic() - started >= 0.15
    assert not stop_flag.is_set()


def test_a_relative_run_dir_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # HAProxy's admin socket is in the run dir, and HAProxy reads a relative socket path as host:port
    # (make chaos on a clean checkout, run dir .run/chaos: "missing port specification")
    from local_cluster.launcher import ClusterOptions, LocalCluster

    monkeypatch.chdir(tmp_path)
    cluster = LocalCluster(ClusterOptions.ephemeral(Path(".run/chaos/cluster")))
    assert cluster.run_dir == tmp_path.resolve() / ".run/chaos/cluster"
    assert cluster.haproxy_config.is_absolute()
