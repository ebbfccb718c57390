"""Keep every process of a local cluster running: a death is logged, counted and followed by a
restart after a jittered, growing delay; everything else keeps serving meanwhile.

Theory of operation. ``RestartPolicy`` is the pure part (clock in, decisions out): on each exit
it says how long to wait before the next start. The delay comes from ``services.backoff``
(growing, full jitter), and the backoff starts over when the process had stayed up for
``stable_after`` seconds, so one crash a day restarts at once while a process that dies right
after every start is retried ever more slowly, up to ``maximum``. ``loop_exits`` exits within
``loop_window`` seconds mark it *crash-looping*: reported once, loudly, with its log, and shown
as a gauge until it stays up again. It is never given up on: whatever made it crash (a port
taken, a PBX away) may go away.

``Supervisor`` is the thin shell: ``poll()`` (called from the launcher's main loop, never from a
signal handler) looks at the children, restarts those whose delay is over, and notices when a
restarted one is ready again (HAProxy then sees a node come back by its own health checks).
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from local_cluster.launcher import LaunchError
from services.backoff import Backoff

log = logging.getLogger(__name__)


def describe_exit(returncode: int) -> str:
    """``exit code 1`` or ``killed by SIGKILL``: what an operator needs to tell a crash from a kill."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


@dataclass(frozen=True)
class ExitDecision:
    delay: float
    #: True only on the exit that made the process crash-looping (report it once)
    crash_loop_started: bool
    exits_in_window: int


@dataclass
class RestartPolicy:
    initial: float = 0.5
    maximum: float = 30.0
    stable_after: float = 30.0
    loop_exits: int = 3
    loop_window: float = 60.0
    rand: Callable[[], float] = random.random
    crash_looping: bool = False
    _exits: deque[float] = field(default_factory=deque)
    _backoff: Backoff | None = None

    def exited(self, now: float, uptime: float) -> ExitDecision:
        backoff = self._backoff_of()
        if uptime >= self.stable_after:
            backoff.reset()
            self._exits.clear()
            self.crash_looping = False
        self._exits.append(now)
        while self._exits and self._exits[0] < now - self.loop_window:
            self._exits.popleft()
        started = not self.crash_looping and len(self._exits) >= self.loop_exits
        self.crash_looping = self.crash_looping or started
        return ExitDecision(backoff.next_delay(), started, len(self._exits))

    def stayed_up(self) -> None:
        """The process has run ``stable_after`` seconds since its last start: no longer looping."""
        self._backoff_of().reset()
        self._exits.clear()
        self.crash_looping = False

    def _backoff_of(self) -> Backoff:
        if self._backoff is None:
            self._backoff = Backoff(initial=self.initial, maximum=self.maximum, rand=self.rand)
        return self._backoff


class SupervisedChild(Protocol):
    name: str

    @property
    def pid(self) -> int: ...

    def returncode(self) -> int | None: ...


class Cluster(Protocol):
    """What the supervisor needs from the launcher."""

    @property
    def stopping(self) -> bool: ...

    def supervised(self) -> Iterable[SupervisedChild]: ...

    def respawn(self, name: str) -> SupervisedChild: ...

    def ready(self, name: str) -> bool: ...

    def log_path(self, name: str) -> str: ...


@dataclass
class _Watch:
    policy: RestartPolicy
    started_at: float
    restart_at: float | None = None
    awaiting_ready: bool = False
    died_at: float = 0.0


class Supervisor:
    def __init__(
        self,
        cluster: Cluster,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        policy: Callable[[], RestartPolicy] = RestartPolicy,
    ) -> None:
        self._cluster = cluster
        self._clock = clock
        self._policy = policy
        self._watches: dict[str, _Watch] = {}
        self._restart_counts: dict[str, int] = {}
        self.registry = registry or CollectorRegistry()
        self.exits = Counter("cms_launcher_process_exits_total", "Unexpected exits of a supervised process",
                             ["process"], registry=self.registry)
        self.restarts = Counter("cms_launcher_restarts_total", "Restarts of a supervised process after it died",
                                ["process"], registry=self.registry)
        self.up = Gauge("cms_launcher_process_up", "1 while the supervised process is running",
                        ["process"], registry=self.registry)
        self.looping = Gauge("cms_launcher_crash_looping", "1 while the process keeps dying soon after each start",
                             ["process"], registry=self.registry)

    def restart_count(self, name: str) -> int:
        return self._restart_counts.get(name, 0)

    def in_background(self, interval: float = 0.5) -> Callable[[], None]:
        """Poll from a thread of its own (for tests and harnesses that drive a LocalCluster in
        process; `make run` polls from its main loop). Returns the function that stops it."""
        done = threading.Event()

        def loop() -> None:
            while not done.wait(interval):
                self.poll()

        thread = threading.Thread(target=loop, name="supervisor", daemon=True)
        thread.start()

        def stop() -> None:
            done.set()
            thread.join(timeout=30)

        return stop

    def poll(self) -> None:
        now = self._clock()
        if self._cluster.stopping:
            return
        for child in list(self._cluster.supervised()):
            watch = self._watches.get(child.name)
            if watch is None:
                watch = self._watches[child.name] = _Watch(self._policy(), started_at=now)
                self.up.labels(process=child.name).set(1)
                self.looping.labels(process=child.name).set(0)
            if watch.restart_at is not None:
                if now >= watch.restart_at:
                    self._restart(child.name, watch, now)
                continue
            code = child.returncode()
            if code is not None:
                self._died(child, code, watch, now)
            elif watch.awaiting_ready and self._cluster.ready(child.name):
                watch.awaiting_ready = False
                log.info("%s is back (pid %d, ready %.1fs after it died)", child.name, child.pid, now - watch.died_at)
            elif watch.policy.crash_looping and now - watch.started_at >= watch.policy.stable_after:
                watch.policy.stayed_up()
                self.looping.labels(process=child.name).set(0)
                log.info("%s has stayed up %.0fs: no longer crash-looping", child.name, now - watch.started_at)

    def _died(self, child: SupervisedChild, code: int, watch: _Watch, now: float) -> None:
        uptime = now - watch.started_at
        decision = watch.policy.exited(now, uptime)
        watch.restart_at = now + decision.delay
        watch.died_at = now
        watch.awaiting_ready = False
        self.exits.labels(process=child.name).inc()
        self.up.labels(process=child.name).set(0)
        restarts = self.restart_count(child.name)
        log.error("%s (pid %d) died: %s after %.1fs up; restart #%d in %.1fs", child.name, child.pid,
                  describe_exit(code), uptime, restarts + 1, decision.delay)
        if decision.crash_loop_started:
            self.looping.labels(process=child.name).set(1)
            log.error("%s is CRASH-LOOPING: %d exits in %.0fs; still restarting, at most every %.0fs; "
                      "last lines of %s:\n%s", child.name, decision.exits_in_window, watch.policy.loop_window,
                      watch.policy.maximum, self._cluster.log_path(child.name),
                      _tail(self._cluster.log_path(child.name)))

    def _restart(self, name: str, watch: _Watch, now: float) -> None:
        watch.restart_at = None
        if self._cluster.stopping:
            return
        try:
            child = self._cluster.respawn(name)
        except LaunchError:  # the cluster started stopping meanwhile
            return
        except OSError as exc:
            # Could not even fork/exec: count it as another death, so the backoff grows.
            decision = watch.policy.exited(now, 0.0)
            watch.restart_at = now + decision.delay
            log.error("%s could not be started: %s; next try in %.1fs", name, exc, decision.delay)
            return
        self.restarts.labels(process=name).inc()
        self._restart_counts[name] = self._restart_counts.get(name, 0) + 1
        self.up.labels(process=name).set(1)
        watch.started_at = now
        watch.awaiting_ready = True
        log.warning("%s restarted (pid %d, restart #%d)", name, child.pid, self.restart_count(name))


def _tail(path: str, lines: int = 8) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - 4000))
            text = handle.read().decode(errors="replace")
    except OSError as exc:
        return f"    (cannot read it: {exc.strerror})"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])
