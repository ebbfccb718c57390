"""The gateway process: AMI in, line events out, commands executed.

Every gateway starts as a *standby*: metrics endpoint, an AMI login (warm, so a takeover needs no
TCP or login round trips) whose events feed its tracker, and the lease loop (ami_gateway/lease.py).
A standby publishes nothing: its tracker's output is kept for a minute in a shadow log
(ami_gateway/takeover.py). When it takes the lease it becomes *active*, under the new epoch the
lease gave it: it reads what the previous term left in Redis, starts the outbox drain task, the
command consumer and the queue-pause worker, publishes what the shadow log holds that the previous
term never published (calls that rang and ended while no gateway was active), resyncs
(CoreShowChannels/Status, QueueStatus), brings every call agents were told of up to date and ends
the calls that vanished. Ready means "active, events on, resynced".

A gateway that loses the lease (another one took it after we were paused or cut off, or Redis
restarted empty) *steps down*: it stops speaking at once (no publish, no Redis write, no AMI action,
no command) and ``run_gateway`` replaces it by a fresh standby, so no state of the lost term leaks
into the next. A clean stop flushes the outbox, then releases the lease so a standby takes over
without waiting for the ttl.

The AMI read path (``_on_ami_event``) is synchronous and in-memory only: tracker, outbox put,
auto-pause policy, queue trace. Whatever needs I/O (QueuePause for autoPauseOnCommutationStart)
is queued to a worker task, so reading never waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge, Histogram

from ami.protocol import AmiMessage, AmiParser
from ami.scenario import ScenarioError, load_scenario
from ami_gateway import takeover
from ami_gateway.agent_tracker import AgentStateTracker
from ami_gateway.ami_client import DEFAULT_EVENT_MASK, AmiClient, AmiError, AmiSession
from ami_gateway.call_records import CallRecordSaver
from ami_gateway.command_executor import CommandExecutor
from ami_gateway.command_plan import REASON_MAX, CommandRefused, queue_pause
from ami_gateway.command_queue import QUEUE_FAILURES, CommandDelivery, CommandQueue, RabbitCommandQueue
from ami_gateway.event_outbox import (
    EventOutbox,
    EventPublisher,
    Sequencer,
)
from ami_gateway.lease import FENCED, TAKEOVERS, GatewayLease, LeaseLost, RenewOutcome, Term, set_lease_state
from ami_gateway.lines import LineMatcher
from ami_gateway.packet_info import parse_packet_info
from ami_gateway.queue_policy import AutoPausePolicy, PauseRequest, QueueChange, QueueStateTrace, agent_choice
from ami_gateway.tracker import CallTracker, TrackerOptions
from services.backoff import Backoff
from services.broker import Broker
from services.config import Settings, redact_url
from services.heartbeat import Heartbeat
from services.infra_metrics import BROKER_ERRORS, RedisHealth
from services.line_state import LineKeys, LineStateWriter
from services.observability import ObservabilityServer
from services.redis_client import redis_client
from services.tasks import stop_tasks
from services.topology import Topology
from services.wire import (
    AgentState,
    BadCommand,
    Call,
    CallState,
    Command,
    CommandName,
    CommandResult,
    DtmfArgs,
    EventType,
    LineEvent,
    WireError,
    WrapUpArgs,
)

Task = asyncio.Task[None]

log = logging.getLogger(__name__)

CALLS_IN_PROGRESS = Gauge("cms_calls_in_progress", "Calls the gateway currently tracks on agent lines")
GATEWAY_READY = Gauge("cms_gateway_ready", "1 when the gateway holds the lease, is logged in to AMI and resynced")
AUTO_PAUSES = Counter("cms_auto_pause_actions_total", "QueuePause actions sent by autoPauseOnCommutationStart",
                      ["paused", "outcome"])
SHADOW_EVENTS = Gauge(
    "cms_gateway_standby_shadow_events",
    "Line events a standby tracked in the last minute without publishing them (published at a takeover "
    "when the earlier term did not)",
)
SHADOW_PUBLISHED = Counter(
    "cms_gateway_takeover_shadow_events_published_total",
    "Line events a standby tracked that the earlier term never published, published at the takeover",
)
RESYNC_SECONDS = Histogram(
    "cms_ami_resync_seconds",
    "Time to list channels and queue members after an AMI (re)connect",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
queue_log = logging.getLogger("ami_gateway.queues")


class Gateway:
    def __init__(
        self,
        settings: Settings,
        *,
        metrics_host: str = "127.0.0.1",
        metrics_port: int = 0,
        ping_interval: float = 10.0,
        ping_timeout: float = 5.0,
        lease_ttl: float = 2.0,
        lease_renew_interval: float = 0.5,
        lease_poll_interval: float = 0.2,
        outbox_capacity: int = 200_000,
        inherited: Sequence[LineEvent] = (),
        unstored_since: float | None = None,
    ) -> None:
        self.settings = settings
        self._ping = (ping_interval, ping_timeout)
        ast = settings.asterisk
        self.topology = Topology(settings.cluster.prefix)
        self.redis = redis_client(settings.cluster.redis_url)
        # Its own connections with short timeouts: a renew must neither queue behind a large outbox write
        # nor hang on a silent Redis longer than the lease lasts.
        self._lease_redis = redis_client(
            settings.cluster.redis_url, socket_timeout=max(0.2, lease_ttl / 2), socket_connect_timeout=lease_ttl
        )
        self.commands: CommandQueue = RabbitCommandQueue(
            Broker(settings.cluster.broker_urls, name="gateway commands"), self.topology, prefetch_count=64
        )
        self.lease = GatewayLease(self._lease_redis, settings.cluster.prefix, ttl=lease_ttl)
        self._lease_timing = (lease_renew_interval, lease_poll_interval)
        if unstored_since is not None:
            # This process's term was just refused (Redis lost its lease: restarted empty, failed over). This
            # gateway's AMI session is new and missed what rang meanwhile; a warm standby heard it all. Like any
            # standby that saw Redis fail, it waits one ttl of Redis answering before it tries for the lease,
            # so it does not out-race the one that can publish those calls.
            self.lease.clock.unreachable()
        self.writer = LineStateWriter(self.redis, settings.cluster.prefix, settings.cluster.history_length)
        self.matcher = LineMatcher(protocol=ast.protocol, queue_extension_format=ast.queue_extension_format)
        self.tracker = CallTracker(
            self.matcher,
            TrackerOptions(
                send_ring_started_on_ringing_state=ast.send_ring_started_on_ringing_state,
                packet_info=parse_packet_info(ast.packet_info_config) if ast.packet_info_config else None,
            ),
        )
        self.agents = AgentStateTracker(self.matcher, settings.agent_states)
        self.sequencer = Sequencer(epoch="")
        self.outbox = EventOutbox(
            self.writer,
            EventPublisher(Broker(settings.cluster.broker_urls, name="gateway events"), self.topology),
            self.sequencer,
            capacity=outbox_capacity,
            on_continuity_lost=self._restate_all_lines,
            may_publish=self.lease.held,
            on_fenced=self._step_down,
        )
        self.ami: AmiClient | None = None
        self.auto_pause = AutoPausePolicy(ast.auto_pause_on_commutation_start)
        self.queue_trace = QueueStateTrace(self.matcher) if ast.trace_queues_state else None
        self._pause_requests: asyncio.Queue[PauseRequest] = asyncio.Queue()
        self.executor = CommandExecutor(
            ast,
            self.matcher,
            session=self._session,
            view=self.tracker,
            ttl_seconds=settings.cluster.command_ttl_seconds,
            on_done=self._command_done,
        )
        self.observability = ObservabilityServer(metrics_host, metrics_port, self._health)
        self._metrics_host = metrics_host
        self._metrics_base: str | None = None
        #: when the last AMI event arrived (unix time): the status page shows its age
        self.last_event_at: float | None = None
        self.heartbeat = Heartbeat(
            self.redis, settings.cluster.prefix, "gateway", f"{socket.gethostname()}-{os.getpid()}", self._describe
        )
        self.ready = asyncio.Event()
        self.replay_done = asyncio.Event()
        self._resync_buffer: list[tuple[AmiMessage, float]] | None = None
        self._stale_calls: dict[str, list[Call]] | None = None
        #: whether Redis held an earlier term when this one began: then its calls are what agents were told
        self._after_earlier_term = False
        #: when this standby last found the lease held by another gateway (time.time()); None: never. A replacement
        #: after a step-down (``unstored_since``): from when its own earlier term's events stopped being stored.
        self._holder_seen_at: float | None = unstored_since
        self._tasks: list[Task] = []
        self._command_tasks: set[Task] = set()
        self._commands_task: Task | None = None
        #: True from taking the lease until stepping down; the AMI read path and every output check it
        self.active = False
        #: set when this gateway lost its lease: it is finished, run_gateway starts a fresh standby
        self.stepped_down = asyncio.Event()
        self._term_ready = asyncio.Event()  # the previous term's calls are read: sessions may resync
        self._activation_lock = asyncio.Lock()
        self._synced_session: AmiSession | None = None
        #: a standby's tracker output (never published) of the last minute: at a takeover, the calls that rang
        #: while no gateway published (the active one dead, or cut off from Redis until its lease ran out; see
        #: ami_gateway.takeover)
        self._shadow = takeover.ShadowLog(window=max(60.0, 3 * lease_ttl))
        # What the term this process ran before stepping down tracked and never got out (see handover()).
        self._shadow.add(inherited, time.time())
        self._shadow_session: AmiSession | None = None
        #: taken over, shadow log not published yet: the tracker's output still goes to the shadow log
        self._shadow_until_activated = False
        # Call records in Creatio (optional CallRecords block): its own tasks, fed from _emit.
        self.records: CallRecordSaver | None = None
        if settings.call_records.enabled:
            self.records = CallRecordSaver(
                settings.call_records, self.redis, settings.cluster.prefix,
                on_saved=self._record_saved, on_failed=self._record_failed,
            )

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start as a standby; the lease loop makes this gateway active when the lease is free.

        The first attempt at the lease is made before /health answers, so a lone gateway never says
        "standby, healthy" for a moment before it is active: its /health turns 200 when it has resynced.
        """
        set_lease_state("standby")
        ast = self.settings.asterisk
        if not ast.file_path:
            self.ami = AmiClient(
                ast.url or "127.0.0.1",
                ast.port,
                ast.user_name,
                ast.secret,
                on_event=self._on_ami_event,
                on_connected=self._on_ami_connected,
                on_disconnected=self._on_ami_disconnected,
                ping_interval=self._ping[0],
                ping_timeout=self._ping[1],
                # a standby follows the PBX too (its shadow log): what rings while no gateway is active is known
                action_guard=self._may_act,
            )
        taken = None
        if self.lease.clock.may_try_to_take():  # not at once after a step-down (see unstored_since in __init__)
            try:
                taken = await self.lease.try_acquire()
            except (OSError, aioredis.RedisError) as exc:
                log.warning("Redis unavailable at start (%s); the lease loop keeps trying", exc)
        if taken is not None:
            self._take_over(*taken)
        await self.observability.start()
        self.heartbeat.start()
        if self.ami is not None:
            self._spawn(self.ami.run(), "ami")
        self._spawn(self._lease_loop(), "lease")
        log.info(
            "gateway %s started as %s: AMI %s, broker %s, metrics on :%d",
            self.lease.owner,
            "active" if self.active else "standby",
            f"replay of {ast.file_path}" if ast.file_path else f"{ast.url}:{ast.port} as {ast.user_name}",
            redact_url(self.settings.cluster.amqp_url),
            self.observability.port,
        )

    async def _restore_agent_codes(self) -> None:
        """The codes agents chose, from the agent states a previous run stored: a pause reported after a
        restart is still the code the agent chose (services/agent_states.py, Rule 4)."""
        keys = LineKeys(self.settings.cluster.prefix)
        for line in self._stale_calls or {}:
            raw = await self.redis.get(keys.agent(line))
            if not raw:
                continue
            try:
                agent = AgentState.from_dict(json.loads(raw))
            except (ValueError, WireError):
                continue
            if agent.paused and agent.code:
                self.agents.expect_agent_code(line, agent.code, agent.reason)

    async def stop(self, flush_timeout: float = 5.0, close_timeout: float = 3.0) -> None:
        """Drain and stop within ``flush_timeout`` + ``close_timeout``: a supervisor gives a stopping process
        about 10 s before SIGKILL. A step that outlasts what is left is abandoned with a warning naming it (a
        broker that never answers a close must not keep the lease from being released)."""
        GATEWAY_READY.set(0)
        deadline = time.monotonic() + flush_timeout + close_timeout
        if self.ami is not None:
            await self._stop_step("AMI session close", self.ami.stop(), deadline)
        # The lease loop keeps renewing while the outbox flushes: the flush may outlast one ttl.
        if self.active and not await self.outbox.wait_idle(flush_timeout):
            log.warning("stopping with %d events not yet published", self.outbox.depth)
        if self.records is not None:
            await self._stop_step("call records", self.records.stop(), deadline)
        await self._stop_step("tasks", stop_tasks([*self._tasks, *self._command_tasks],
                                                  timeout=max(0.2, deadline - time.monotonic())), deadline)
        await self._stop_step("event publisher close", self.outbox.close(), deadline)
        await self._stop_step("heartbeat", self.heartbeat.stop(), deadline)
        if self.active:
            self.active = False
            try:
                # Last of all before the lease: nothing of this term may publish or act once it is released.
                async with asyncio.timeout(max(0.5, deadline - time.monotonic())):
                    await self.lease.release()
                log.info("lease released: a standby may take over now")
            except (OSError, aioredis.RedisError, TimeoutError) as exc:
                log.warning("could not release the lease (%s); a standby takes over when it expires",
                            exc or type(exc).__name__)
        set_lease_state("standby")
        await self._stop_step("metrics server", self.observability.stop(), deadline)
        await self._stop_step("Redis connections", self._close_redis(), deadline)

    async def _close_redis(self) -> None:
        await self.redis.aclose()
        await self._lease_redis.aclose()

    @staticmethod
    async def _stop_step(what: str, step: Awaitable[Any], deadline: float) -> None:
        started = time.monotonic()
        try:
            async with asyncio.timeout(max(0.2, deadline - started)):
                await step
        except TimeoutError:
            log.warning("stop: %s did not finish within %.1fs; going on without it", what,
                        time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 - a step failing while stopping is logged, the stop goes on
            log.warning("stop: %s failed (%s)", what, exc or type(exc).__name__)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)
        return task

    def _describe(self) -> dict[str, object]:
        """The gateway's heartbeat record (services/heartbeat.py), read by every node's status page."""
        if self._metrics_base is None:  # once: getfqdn() may ask DNS, and this runs on the AMI loop
            host = self._metrics_host if self._metrics_host not in ("", "0.0.0.0", "::") else socket.getfqdn()
            self._metrics_base = f"http://{f'[{host}]' if ':' in host else host}:{self.observability.port}"
        base = self._metrics_base
        ast = self.settings.asterisk
        return {
            "metrics_url": f"{base}/metrics", "health_url": f"{base}/health",
            # One gateway holds the lease and acts; the others are warm standbys.
            "role": "active" if self.active else "standby",
            "ami_peer": f"replay of {ast.file_path}" if ast.file_path else f"{ast.url}:{ast.port}",
            "last_ami_event_at": self.last_event_at,
        }

    def _health(self) -> tuple[bool, dict[str, object]]:
        connected = self.ami.ready.is_set() if self.ami is not None else self.ready.is_set()
        ami = "connected" if connected else "down"
        if not self.active:
            # A standby is healthy: it is what makes a takeover possible. It says so for the operator.
            return True, {"role": "standby", "ami": ami, "outbox": self.outbox.depth}
        return connected, {"role": "active", "ami": ami, "outbox": self.outbox.depth, "epoch": self.sequencer.epoch,
                           "lease": "held" if self.lease.held() else "unconfirmed"}

    # ---- the lease: standby, takeover, stepping down ------------------------------------------

    async def _lease_loop(self) -> None:
        renew_every, poll_every = self._lease_timing
        backoff = Backoff(initial=poll_every, maximum=max(poll_every, 1.0))
        redis_health = RedisHealth()  # cms_redis_errors_total / cms_redis_reconnects_total, shared names
        failing = False
        while True:
            if not self.active:
                try:
                    tried = self.lease.clock.may_try_to_take()
                    taken = await self.lease.try_acquire() if tried else None
                    if tried and taken is None:
                        self._holder_seen_at = time.time()  # another term holds it: it stores what it hears
                    if taken is None and not self.lease.clock.may_try_to_take():
                        await self.lease.probe()
                except (OSError, aioredis.RedisError) as exc:
                    redis_health.failed()
                    if not failing:
                        log.warning("standby cannot reach Redis for the lease (%s); retrying", exc)
                    failing = True
                    await asyncio.sleep(backoff.next_delay())
                    continue
                redis_health.succeeded()
                if failing:
                    log.info("standby reaches Redis again")
                failing = False
                backoff.reset()
                if taken is not None:
                    self._take_over(*taken)
                    continue
                await asyncio.sleep(poll_every * (0.75 + 0.5 * random.random()))
                continue
            outcome = await self.lease.renew()
            if outcome is RenewOutcome.LOST:
                self._step_down("the lease is held by another gateway, or Redis lost it")
                return
            if outcome is RenewOutcome.UNREACHABLE:
                redis_health.failed()
                if not failing:
                    log.warning("cannot renew the lease: Redis unreachable; events wait in the outbox "
                                "and nothing is published or acted on until the lease is confirmed")
                    failing = True
                if not self.lease.held():
                    set_lease_state("suspended")
                await asyncio.sleep(backoff.next_delay())
                continue
            redis_health.succeeded()
            if outcome is RenewOutcome.MOVED:
                # A promoted replica may lack the last writes (asynchronous replication): as after a restart.
                log.warning("Redis server changed under the lease (failover or restart): restating every line")
                self._spawn(self._restate_all_lines(), "restate")
            if outcome is RenewOutcome.RESUMED or failing:
                log.warning("lease %s: epoch %s continues (nobody took over meanwhile)",
                            "resumed" if outcome is RenewOutcome.RESUMED else "confirmed again",
                            self.sequencer.epoch)
            failing = False
            backoff.reset()
            set_lease_state("active")
            await asyncio.sleep(renew_every)

    def _take_over(self, term: Term, after_earlier_term: bool) -> None:
        TAKEOVERS.inc()
        log.warning("took the gateway lease: epoch %s%s", term.epoch,
                    " (after an earlier gateway's term)" if after_earlier_term else "")
        self.active = True
        if self.ami is not None and self._shadow_session is not None:
            # A warm standby's tracker has listed the channels and followed every event since: it keeps
            # following, but what it says still goes to the shadow log until the activation has published that
            # log. Nothing is published out of order, and nothing older than the takeover's channel listing is
            # applied after it (a phone hung up before the listing would be forgotten, with its call's events).
            self._shadow_until_activated = True
        elif self.ami is not None and self._resync_buffer is None:
            # A tracker that has not listed the channels yet (a gateway starting) would take a phone whose Dial
            # it never saw for the agent dialling out: events wait for the activation's listing.
            self._resync_buffer = []
        self._after_earlier_term = after_earlier_term
        self.sequencer.restart(term.epoch)
        self.writer.fence(self.lease.key, term.token)
        set_lease_state("active")
        self._spawn(self._begin_term(), "take-over")

    async def _begin_term(self) -> None:
        """Read what the previous term left, start the outputs, then turn AMI events on and resync."""
        backoff = Backoff(initial=0.1, maximum=2.0)
        while self._stale_calls is None:
            try:
                self._stale_calls = await self.writer.all_stored_calls()
            except (OSError, aioredis.RedisError) as exc:
                delay = backoff.next_delay()
                log.warning("cannot read the previous term's calls (%s); retry in %.1fs", exc, delay)
                await asyncio.sleep(delay)
        await self._restore_agent_codes()
        if self.records is not None:
            # Only the lease holder writes to Creatio; its journal in Redis carries over from the last term.
            await self.records.start()
        self._spawn(self.outbox.run(), "outbox")
        self._commands_task = self._spawn(self._consume_commands(), "commands")
        self._spawn(self._pause_worker(), "queue-pause")
        self._term_ready.set()
        ast = self.settings.asterisk
        if ast.file_path:
            self._spawn(self._replay(ast.file_path), "replay")
            return
        session = self.ami.session if self.ami is not None else None
        if session is not None and session.logged_in:
            try:
                await self._activate(session)
            except AmiError as exc:
                # The client reconnects and resyncs through _on_ami_connected.
                log.warning("AMI resync at takeover failed: %s", exc)
                session.close()

    def _may_act(self, action: str) -> bool:
        """The AMI session's guard: only the lease holder changes anything on the PBX."""
        if self.active and self.lease.held():
            return True
        FENCED.labels(what="ami_action").inc()
        log.warning("AMI %s not sent: this gateway does not hold the lease", action)
        return False

    def _step_down(self, reason: str) -> None:
        """The lease is lost: stop every output now; run_gateway replaces this gateway by a fresh standby."""
        if self.stepped_down.is_set():
            return
        log.error("stepping down (%s): nothing more is published or acted on by this term", reason)
        self.active = False
        self.lease.term = None
        self.lease.clock.revoke()
        self.ready.clear()
        GATEWAY_READY.set(0)
        set_lease_state("standby")
        # Closing the consumer's channel puts the commands it holds back in the queue, for the new holder;
        # commands already claimed in Redis are never carried out twice (see _handle_command).
        for task in [*self._command_tasks, *([self._commands_task] if self._commands_task else [])]:
            task.cancel()
        self.stepped_down.set()

    # ---- AMI path (synchronous, in-memory only) --------------------------------------------

    def _session(self) -> AmiSession | None:
        # ready, not just logged in: a takeover's session is logged in before its events are on and resynced,
        # and a command planned against a tracker that has not seen the PBX yet would be refused wrongly.
        ok = self.ami is not None and self.ami.ready.is_set() and self.ready.is_set()
        return self.ami.session if ok and self.ami is not None else None

    def _on_ami_event(self, msg: AmiMessage, received_at: float) -> None:
        self.last_event_at = received_at
        if self._resync_buffer is not None:
            self._resync_buffer.append((msg, received_at))
            return
        self._handle(msg, received_at)

    def _handle(self, msg: AmiMessage, received_at: float) -> None:
        if self.queue_trace is not None and self.active:
            self._trace(self.queue_trace.observe(msg))
        self._emit(self.tracker.handle(msg, received_at) + self.agents.handle(msg, received_at))

    def _trace(self, changes: list[QueueChange]) -> None:
        for change in changes:
            queue_log.info(change.log_text(), extra={"line": change.line})

    def _emit(self, events: list[LineEvent]) -> None:
        if not events:
            return
        if not self.active or self._shadow_until_activated:
            # a standby (or a term that stepped down) never publishes: what it tracked waits in the shadow log
            self._shadow.add(events, time.time())
            SHADOW_EVENTS.set(len(self._shadow))
            return
        if self.records is not None:
            events = self.records.stamp(events)
            self.records.observe(events)
        self.outbox.put(events)
        CALLS_IN_PROGRESS.set(sum(len(self.tracker.calls_of(line)) for line in self.tracker.lines()))
        if self.auto_pause.enabled:
            for event in events:
                line = event.line
                for request in self.auto_pause.observe(
                    event, self.agents.agent_state(line), len(self.tracker.calls_of(line))
                ):
                    self._pause_requests.put_nowait(request)

    async def _pause_worker(self) -> None:
        """Carries out autoPauseOnCommutationStart's QueuePause requests in order, off the read path."""
        while True:
            request = await self._pause_requests.get()
            outcome = "error"
            try:
                await self.executor.carry_out(queue_pause(self.matcher, request.line, request.paused, request.reason))
                outcome = "success"
            except CommandRefused as exc:
                log.warning("auto %s of line %s not done: %s", "pause" if request.paused else "unpause",
                            request.line, exc, extra={"line": request.line})
            except AmiError as exc:
                log.warning("auto pause of line %s failed: %s", request.line, exc, extra={"line": request.line})
            finally:
                AUTO_PAUSES.labels(paused=str(request.paused).lower(), outcome=outcome).inc()
                if outcome != "success" and request.paused:
                    self.auto_pause.pause_failed(request.line)

    def _record_saved(self, line: str, call_id: str, record_uid: str) -> None:
        self._record_event(line, call_id, EventType.CALL_SAVED)

    def _record_failed(self, line: str, call_id: str, why: str) -> None:
        self._record_event(line, call_id, EventType.CALL_SAVE_FAILED)

    def _record_event(self, line: str, call_id: str, kind: EventType) -> None:
        """Tell the line's tabs, in its sequenced stream, with the call as it is now (a finished call if gone),
        so the event cannot bring back an ended call."""
        assert self.records is not None
        call = next((c for c in self.tracker.calls_of(line) if c.id == call_id), None)
        if call is None:
            record = self.records.record_of(call_id)
            if record is None:
                return
            call = record.call.evolve(state=CallState.FINISHED)
        self._emit([LineEvent(line=line, type=kind, call=call, ami_received_at=time.time())])

    def _command_done(self, command: Command, result: CommandResult) -> None:
        if not result.ok:
            return
        args = command.args
        if isinstance(args, WrapUpArgs):
            self.auto_pause.set_wrap_up(command.line, args.active)
        if isinstance(args, DtmfArgs):
            # DTMF_ENTERED is "DTMF characters sent": the panel shows what the agent dialled (tracker Rule 10).
            # PlayDTMF's own events are "Sent" ones the tracker never reports, so this is the only echo.
            call = next((c for c in self.tracker.calls_of(command.line) if c.id == args.call_id), None)
            self._emit([LineEvent(line=command.line, type=EventType.DTMF_ENTERED, call=call,
                                  digits=args.digits, ami_received_at=time.time())])

    async def _on_ami_connected(self, session: AmiSession) -> None:
        if self.active:
            await self._activate(session)
        else:
            await self._follow_as_standby(session)

    async def _follow_as_standby(self, session: AmiSession) -> None:
        """A standby learns the live channels once per AMI session, then follows the events (shadow log)."""
        async with self._activation_lock:
            if self.active or self._shadow_session is session or session.closed.is_set():
                return
            if self._resync_buffer is None:
                self._resync_buffer = []
            try:
                channels = await self._live_channels(session)
                members = await self._queue_members(session)
                if channels is not None:
                    now = time.time()
                    # straight to the shadow log even if the lease was taken meanwhile: the takeover publishes it
                    resynced = self.tracker.resync(channels, now) + self._agents_resync(members, now)
                    self._shadow.add(resynced, now)
                self._shadow_session = session
            except AmiError as exc:
                log.warning("standby could not list the live channels (%s); it learns them from events", exc)
            finally:
                if not self.active:  # else the activation, next under the lock, handles what waits
                    self._drain_resync_buffer()

    def _drain_resync_buffer(self) -> None:
        buffered, self._resync_buffer = self._resync_buffer or [], None
        for msg, received_at in buffered:
            self._handle(msg, received_at)

    async def _activate(self, session: AmiSession) -> None:
        """Events on, then rebuild the truth before emitting deltas: what ended or started while we were away."""
        await self._term_ready.wait()
        async with self._activation_lock:
            if self._synced_session is session or session.closed.is_set() or not self.active:
                return
            if self._resync_buffer is None:
                self._resync_buffer = []
            started = time.perf_counter()
            try:
                answer = (await session.send_action("Events", {"EventMask": DEFAULT_EVENT_MASK}))[0]
                if (answer.response or "").lower() != "success":
                    log.error("AMI Events action refused (%s); no call events will arrive", answer.get("Message"))
                channels = await self._live_channels(session)
                members = await self._queue_members(session)
                now = time.time()
                published = await self._publish_shadow(now)
                RESYNC_SECONDS.observe(time.perf_counter() - started)
                if channels is None:
                    log.error("cannot list live channels (the AMI user needs write = call for Status, or "
                              "reporting); calls that ended while disconnected stay open until their next event")
                else:
                    announced = self._announced_calls()
                    if announced is not None:
                        announced |= {e.call.id for e in published if e.call is not None}
                    resynced = (self.tracker.resync(channels, now, announced=announced)
                                + self._agents_resync(members, now))
                    self._emit(resynced)
                    self._reconcile(published + resynced, now)
                    self._finish_stale_calls(now, already=takeover.finished_ids(published + resynced))
                if self.queue_trace is not None and members is not None:
                    self._trace(self.queue_trace.resync(members))
            finally:
                self._drain_resync_buffer()
            if not self.active:
                return
            self._synced_session = session
            self.ready.set()
            GATEWAY_READY.set(1)
            log.info("active and resynced: epoch %s, %d calls on agent lines", self.sequencer.epoch,
                     sum(len(self.tracker.calls_of(line)) for line in self.tracker.lines()))

    @staticmethod
    async def _live_channels(session: AmiSession) -> list[AmiMessage] | None:
        """Every live channel, as CoreShowChannel events; None when the PBX will not say.

        CoreShowChannels needs the 'system' or 'reporting' class, which CMS's documented AMI user
        (call,agent,originate) lacks; Status needs only 'call' and carries the same facts.
        """
        listing = await session.send_action("CoreShowChannels", expect_list=True, timeout=30)
        if _succeeded(listing):
            return [m for m in listing if m.event == "CoreShowChannel"]
        log.info("CoreShowChannels refused (%s); listing channels with Status", listing[0].get("Message"))
        listing = await session.send_action("Status", expect_list=True, timeout=30)
        if not _succeeded(listing):
            return None
        return [status_as_core_show_channel(m) for m in listing if m.event == "Status"]

    def _agents_resync(self, members: list[AmiMessage] | None, now: float) -> list[LineEvent]:
        # A QueueStatus that failed or was refused says nothing: an empty list would be read as "every
        # membership gone" and report paused agents ready. What the tracker knew stands until the next event.
        return [] if members is None else self.agents.resync(members, now)

    @staticmethod
    async def _queue_members(session: AmiSession) -> list[AmiMessage] | None:
        try:
            listing = await session.send_action("QueueStatus", expect_list=True, timeout=30)
        except AmiError as exc:
            log.warning("QueueStatus failed (%s); agent pause states not refreshed", exc)
            return None
        if not _succeeded(listing):
            log.warning("QueueStatus refused (%s); agent pause states not refreshed", listing[0].get("Message"))
            return None
        return [m for m in listing if m.event == "QueueMember"]

    def _on_ami_disconnected(self) -> None:
        self._synced_session = None
        self.ready.clear()
        GATEWAY_READY.set(0)

    def _announced_calls(self) -> set[str] | None:
        """The calls agents were already told of, for the resync to tell a call that rang unwatched
        (announced ringing, then connected) from one being restated. None when it cannot be known."""
        if self._stale_calls is None:
            return set()  # an AMI reconnect within this term: the tracker itself knows what it announced
        if not self._after_earlier_term:
            return None  # a first start, or a Redis that came back empty: what agents saw is unknown
        return {c.id for calls in self._stale_calls.values() for c in calls}

    def unstored_since(self) -> float:
        """From when what this term heard may be missing in Redis: its oldest event the outbox still holds (not
        both stored and confirmed), or now."""
        return min((e.ami_received_at for e in self.outbox.unconfirmed() if e.ami_received_at), default=time.time())

    def handover(self) -> list[LineEvent]:
        """What this gateway tracked and never got out, for the standby that replaces it in this process: a
        term cut off from Redis until its lease ran out holds the calls of the outage in its outbox, and the
        gateway that takes over may be that very standby (its own shadow log would start empty)."""
        return [*self.outbox.unconfirmed(), *self._shadow.take(time.time())]

    async def _publish_shadow(self, now: float) -> list[LineEvent]:
        """At a takeover: publish what this gateway tracked as a standby that the earlier term did not. From here
        on the tracker's output is published (events meanwhile wait in the resync buffer)."""
        window = self._shadow.take(now)
        SHADOW_EVENTS.set(0)
        self._shadow_until_activated = False
        if not window or self._stale_calls is None:
            return []  # an AMI reconnect within the term: nothing was tracked unpublished
        if not self._after_earlier_term:
            # No earlier term (a first start, a Redis that came back empty): see takeover.after_lost_term.
            events = takeover.after_lost_term(window, self._holder_seen_at)
            log.info("takeover without an earlier term: %d events of calls that ended meanwhile are published",
                     len(events))
            SHADOW_PUBLISHED.inc(len(events))
            self._emit(events)
            return events
        lines = sorted({e.line for e in window})
        history: dict[str, list[LineEvent]] = {}
        try:
            history = await self.writer.recent_events(lines, count=500)
        except (OSError, aioredis.RedisError) as exc:
            # Unknown what the earlier term said: its rings may come twice (nodes silence repeated
            # announcements, rule 10 of ws_node.agent_session), which beats a call nobody saw.
            log.warning("cannot read the earlier term's history (%s); publishing the standby's view", exc)
        events = takeover.unpublished(window, history)
        calls = {e.call.id for e in events if e.call is not None}
        log.info("takeover: %d of %d events the standby tracked were not published by the earlier term "
                 "(%d calls)", len(events), len(window), len(calls))
        SHADOW_PUBLISHED.inc(len(events))
        self._emit(events)
        return events

    def _reconcile(self, published: list[LineEvent], now: float) -> None:
        """At a takeover: every live call agents were told of (Redis) is brought up to the tracker's view."""
        if self._stale_calls is None:
            return
        live = {line: self.tracker.calls_of(line) for line in self.tracker.lines()}
        self._emit(takeover.reconcile(live, self._stale_calls, published, now,
                                      agents_knew_stored=self._after_earlier_term))

    def _finish_stale_calls(self, now: float, already: set[tuple[str, str]] | None = None) -> None:
        """Calls a previous gateway run left in Redis that are no longer live get their end
        (unless ``already`` ended them)."""
        stale, self._stale_calls = self._stale_calls or {}, None
        done = already or set()
        for line, calls in stale.items():
            live = {c.id for c in self.tracker.calls_of(line)} | {cid for (ln, cid) in done if ln == line}
            ended = [
                LineEvent(
                    line=line,
                    type=EventType.RING_FINISHED,
                    call=c.evolve(state=CallState.FINISHED, ended_at=now),
                    ami_received_at=now,
                )
                for c in calls
                if c.id not in live
            ]
            self._emit(ended)

    async def _restate_all_lines(self) -> None:
        """After the outbox lost events: new epoch, then every line's truth as fresh events."""
        backoff = Backoff(initial=0.2, maximum=5.0)
        while True:
            while not self.lease.held():  # e.g. the overflow came from a Redis outage: the lease loop resumes it
                if self.stepped_down.is_set():
                    return
                await asyncio.sleep(0.05)
            try:
                # With the outbox's writes paused: one already sent with the old token would be refused
                # once the new epoch is claimed, and stop this gateway.
                async with self.outbox.writes_paused():
                    term = await self.lease.advance_epoch()
                    self.writer.fence(self.lease.key, term.token)
                break
            except LeaseLost as exc:
                self._step_down(f"new epoch refused: {exc}")
                return
            except (OSError, aioredis.RedisError) as exc:
                delay = backoff.next_delay()
                log.warning("cannot claim a new epoch (%s); retry in %.1fs", exc, delay)
                await asyncio.sleep(delay)
        self.sequencer.restart(term.epoch)
        now = time.time()
        events: list[LineEvent] = []
        for line in self.tracker.lines() | self.agents.lines():
            for call in self.tracker.calls_of(line):
                events.append(LineEvent(line=line, type=EventType.CALL_INFO_CHANGED, call=call, ami_received_at=now))
            agent = self.agents.agent_state(line)
            if agent is not None:
                events.append(
                    LineEvent(line=line, type=EventType.AGENT_STATE_CHANGED, agent=agent, ami_received_at=now)
                )
        self.outbox.put(self.records.stamp(events) if self.records is not None else events)

    async def _replay(self, path: str) -> None:
        """``filePath``: play a scenario file (a raw AMI capture is one) through the same path as live AMI."""
        try:
            scenario = load_scenario(path)
        except (OSError, ScenarioError) as exc:
            log.error("filePath %s cannot be replayed: %s", path, exc)
            return
        self.ready.set()
        GATEWAY_READY.set(1)
        raw_parser = AmiParser(expect_banner=False)
        replayed = 0
        for step in scenario.steps:
            if step.delay > 0:
                await asyncio.sleep(step.delay)
            item = step.item
            messages: list[AmiMessage] = []
            if isinstance(item, AmiMessage):
                messages.append(item)
            else:  # "#@ raw" bytes: parsed like bytes from a socket (garbage is skipped, as live)
                raw_parser.receive_data(item)
                while (parsed := raw_parser.next_event()) is not None:
                    if isinstance(parsed, AmiMessage):
                        messages.append(parsed)
            for msg in messages:
                if msg.event:
                    replayed += 1
                    self._handle(msg, time.time())
        self.replay_done.set()
        log.info("replay of %s finished: %d events", path, replayed)

    # ---- commands ----------------------------------------------------------------------------

    async def _consume_commands(self) -> None:
        # Not before the first resync of this term: until then the queue keeps the commands (and their
        # deadlines) rather than this gateway answering them against a tracker that knows no call yet.
        await self.ready.wait()
        async for delivery in self.commands.deliveries():
            # Concurrently (at most the queue's prefetch at a time): a click-to-dial that waits
            # for the phone to answer must not hold up another agent's hangup.
            task = asyncio.create_task(self._handle_command(delivery))
            self._command_tasks.add(task)
            task.add_done_callback(self._command_tasks.discard)

    async def _handle_command(self, delivery: CommandDelivery) -> None:
        try:
            async with delivery.processing():
                try:
                    command = Command.decode(delivery.body)
                except BadCommand as exc:
                    log.warning("refusing undecodable command: %s", exc)
                    if exc.command_id:
                        # The sender (a node of another version, a tool) is told why instead of timing out.
                        await delivery.reply(CommandResult(command_id=exc.command_id, ok=False, error=str(exc)))
                    return
                except WireError as exc:
                    log.warning("dropping undecodable command: %s", exc)
                    return
                try:
                    result = await self._carry_out(command, redelivered=delivery.redelivered)
                    if result is None:
                        # Not ours to carry out (lease unconfirmed or lost): back to the queue, for the holder,
                        # as a fresh message. A broker redelivery means "may have been carried out"
                        # (see _carry_out); this one certainly was not, so it must not look redelivered.
                        FENCED.labels(what="command").inc()
                        log.warning("command %s %s returned to the queue: this gateway does not hold the lease",
                                    command.name.value, command.id, extra={"line": command.line})
                        await asyncio.sleep(0.1)  # while our lease is unconfirmed it may come straight back
                        await delivery.hand_back()
                        return
                except asyncio.CancelledError:
                    # Stepping down or stopping: the next holder gets it (and its claim, if we made one,
                    # keeps it from running twice).
                    with contextlib.suppress(*QUEUE_FAILURES):
                        await delivery.requeue()
                    raise
                await delivery.reply(result)
        except QUEUE_FAILURES as exc:
            # The broker went away mid-command: the answer (or the ack) is lost; the node times the command out.
            BROKER_ERRORS.inc()
            log.warning("command answer or ack lost: %s", exc)

    async def _carry_out(self, command: Command, *, redelivered: bool = False) -> CommandResult | None:
        """Claim the command under the lease, then execute it; None when this gateway may not.

        The claim (a fenced SET NX of the command id) is what keeps a command from running twice: a
        message redelivered after a takeover, or after the broker lost our ack, finds it taken.
        """
        if not (self.active and self.lease.held()):
            return None
        try:
            first_time = await self.lease.claim_command(command.id)
        except LeaseLost:
            return None
        except (OSError, aioredis.RedisError) as exc:
            log.warning("command %s not carried out: Redis unreachable (%s)", command.name.value, exc,
                        extra={"line": command.line})
            return CommandResult(command_id=command.id, ok=False,
                                 error="the telephony gateway cannot reach its state store; try again")
        if first_time and redelivered:
            # The broker delivered it before (a consumer that died, stepped down or lost its channel
            # held it), yet there is no claim: the claims went with a Redis that came back empty or
            # failed over, and that consumer may have sent it. An Originate sent twice rings a customer
            # twice: at most once is the lesser harm, and the agent is told to check the call.
            log.warning("command %s %s redelivered without its claim (Redis lost it); not repeated",
                        command.name.value, command.id, extra={"line": command.line})
            first_time = False
        if not first_time:
            log.warning("command %s %s delivered again (after a takeover or a lost ack); not repeated",
                        command.name.value, command.id, extra={"line": command.line})
            return CommandResult(command_id=command.id, ok=False,
                                 error="this command was already taken by the telephony gateway (delivered "
                                       "twice during a gateway change); check the call before trying again")
        choice = agent_choice(command, self.settings.agent_states, REASON_MAX)
        if choice is not None:  # before the QueuePause: its events may come before its answer
            self.agents.expect_agent_code(choice.line, choice.code, choice.reason, choice.paused)
        if command.name is CommandName.RECORD_OWNER:
            if self.records is None:
                return CommandResult(command.id, True)
            return await self.records.set_owner(command)
        return await self.executor.execute(command)


def _succeeded(listing: list[AmiMessage]) -> bool:
    return bool(listing) and (listing[0].response or "").lower() == "success"


def status_as_core_show_channel(status: AmiMessage) -> AmiMessage:
    """A ``Status`` list entry restated as the ``CoreShowChannel`` event the tracker resyncs from."""
    headers = [("Event", "CoreShowChannel")]
    for name, value in status.headers:
        if name.lower() in ("event", "actionid"):
            continue
        if name.lower() == "seconds":
            headers.append(("Duration", _hms(value)))
        headers.append((name, value))
    return AmiMessage(headers=tuple(headers))


def _hms(seconds: str) -> str:
    try:
        total = int(seconds)
    except ValueError:
        return "00:00:00"
    return f"{total // 3600:02d}:{total // 60 % 60:02d}:{total % 60:02d}"


async def run_gateway(settings: Settings, stop: asyncio.Event, *, metrics_host: str, metrics_port: int,
                      on_ready: Callable[[Gateway], None] | None = None, **options: Any) -> None:
    """Run gateways until ``stop``: one that steps down (lease lost) is replaced by a fresh standby, which
    inherits what the lost term tracked and never published (its shadow log)."""
    inherited: list[LineEvent] = []
    unstored_since: float | None = None
    while not stop.is_set():
        gateway = Gateway(settings, metrics_host=metrics_host, metrics_port=metrics_port, inherited=inherited,
                          unstored_since=unstored_since, **options)
        await gateway.start()
        if on_ready is not None:
            on_ready(gateway)
        waits = [asyncio.create_task(stop.wait()), asyncio.create_task(gateway.stepped_down.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            await gateway.stop()
            unstored_since = gateway.unstored_since()
            inherited = gateway.handover()
        if not stop.is_set():
            log.warning("the lease was lost; starting again as a standby")
