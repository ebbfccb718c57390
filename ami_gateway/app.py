"""The gateway process: AMI in, line events out, commands executed.

Start order (each step waits for the one before): Redis (claim an epoch), metrics endpoint,
outbox drain task, command consumer, queue-pause worker, AMI client (or the ``filePath``
replay). Ready means "logged in to AMI and resynced". Stop is the reverse, with a deadline for
the outbox to flush.

The AMI read path (``_on_ami_event``) is synchronous and in-memory only: tracker, outbox put,
auto-pause policy, queue trace. Whatever needs I/O (QueuePause for autoPauseOnCommutationStart)
is queued to a worker task, so reading never waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable

import aio_pika
import redis.asyncio as aioredis
from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import Counter, Gauge, Histogram

from ami_gateway.ami_client import AmiClient, AmiError, AmiSession
from ami_gateway.ami_protocol import AmiMessage, AmiParser
from ami_gateway.call_records import CallRecordSaver
from ami_gateway.command_executor import CommandExecutor
from ami_gateway.command_plan import REASON_MAX
from ami_gateway.event_outbox import (
    EventOutbox,
    EventPublisher,
    Sequencer,
)
from ami_gateway.lines import LineMatcher
from ami_gateway.packet_info import parse_packet_info
from ami_gateway.queue_policy import AutoPausePolicy, PauseRequest, QueueChange, QueueStateTrace, agent_choice
from ami_gateway.tracker import CallTracker, TrackerOptions
from services.backoff import Backoff
from services.config import Settings, redact_url
from services.infra_metrics import BROKER_ERRORS, BROKER_RECONNECTS
from services.line_state import LineKeys, LineStateWriter
from services.observability import ObservabilityServer
from services.topology import Topology
from services.wire import (
    AgentState,
    Call,
    CallState,
    Command,
    CommandName,
    CommandResult,
    EventType,
    LineEvent,
    WireError,
)

log = logging.getLogger(__name__)

CALLS_IN_PROGRESS = Gauge("cms_calls_in_progress", "Calls the gateway currently tracks on agent lines")
GATEWAY_READY = Gauge("cms_gateway_ready", "1 when the gateway is logged in to AMI and resynced")
AUTO_PAUSES = Counter("cms_auto_pause_actions_total", "QueuePause actions sent by autoPauseOnCommutationStart",
                      ["paused", "outcome"])
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
    ) -> None:
        self.settings = settings
        self._ping = (ping_interval, ping_timeout)
        ast = settings.asterisk
        self.topology = Topology(settings.cluster.prefix)
        self.redis = aioredis.from_url(settings.cluster.redis_url)
        self.writer = LineStateWriter(self.redis, settings.cluster.prefix, settings.cluster.history_length)
        self.matcher = LineMatcher(protocol=ast.protocol, queue_extension_format=ast.queue_extension_format)
        self.tracker = CallTracker(
            self.matcher,
            TrackerOptions(
                send_ring_started_on_ringing_state=ast.send_ring_started_on_ringing_state,
                packet_info=parse_packet_info(ast.packet_info_config) if ast.packet_info_config else None,
                agent_codes=settings.agent_states,
            ),
        )
        self.sequencer = Sequencer(epoch="")
        self.outbox = EventOutbox(
            self.writer,
            EventPublisher(settings.cluster.amqp_url, self.topology),
            self.sequencer,
            on_continuity_lost=self._restate_all_lines,
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
        self.ready = asyncio.Event()
        self.replay_done = asyncio.Event()
        self._resync_buffer: list[tuple[AmiMessage, float]] | None = None
        self._stale_calls: dict[str, list[Call]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._command_tasks: set[asyncio.Task[None]] = set()
        # Call records in Creatio (optional CallRecords block): its own tasks, fed from _emit.
        self.records: CallRecordSaver | None = None
        if settings.call_records.enabled:
            self.records = CallRecordSaver(
                settings.call_records, self.redis, settings.cluster.prefix,
                on_saved=self._record_saved, on_failed=self._record_failed,
            )

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        epoch = await self._claim_epoch()
        self.sequencer.restart(epoch)
        self._stale_calls = {line: await self.writer.stored_calls(line) for line in await self.writer.known_lines()}
        await self._restore_agent_codes()
        await self.observability.start()
        if self.records is not None:
            await self.records.start()
        self._tasks.append(asyncio.create_task(self.outbox.run(), name="outbox"))
        self._tasks.append(asyncio.create_task(self._consume_commands(), name="commands"))
        self._tasks.append(asyncio.create_task(self._pause_worker(), name="queue-pause"))
        ast = self.settings.asterisk
        if ast.file_path:
            self._tasks.append(asyncio.create_task(self._replay(ast.file_path), name="replay"))
        else:
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
            )
            self._tasks.append(asyncio.create_task(self.ami.run(), name="ami"))
        log.info(
            "gateway started: epoch %s, AMI %s, broker %s, metrics on :%d",
            epoch,
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
                self.tracker.expect_agent_code(line, agent.code, agent.reason)

    async def stop(self, flush_timeout: float = 5.0) -> None:
        GATEWAY_READY.set(0)
        if self.ami is not None:
            await self.ami.stop()
        if not await self.outbox.wait_idle(flush_timeout):
            log.warning("stopping with %d events not yet published", self.outbox.depth)
        if self.records is not None:
            await self.records.stop()
        for task in [*self._tasks, *self._command_tasks]:
            task.cancel()
        for task in [*self._tasks, *self._command_tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.outbox.close()
        await self.observability.stop()
        await self.redis.aclose()

    async def _claim_epoch(self) -> str:
        backoff = Backoff(initial=0.2, maximum=5.0)
        while True:
            try:
                return await self.writer.new_epoch()
            except (OSError, aioredis.RedisError) as exc:
                delay = backoff.next_delay()
                log.warning("Redis unavailable at start (%s); retry in %.1fs", exc, delay)
                await asyncio.sleep(delay)

    def _health(self) -> tuple[bool, dict[str, object]]:
        connected = self.ami.ready.is_set() if self.ami is not None else self.ready.is_set()
        return connected, {"ami": "connected" if connected else "down", "outbox": self.outbox.depth}

    # ---- AMI path (synchronous, in-memory only) --------------------------------------------

    def _session(self) -> AmiSession | None:
        return self.ami.session if self.ami is not None and self.ami.ready.is_set() else None

    def _on_ami_event(self, msg: AmiMessage, received_at: float) -> None:
        if self._resync_buffer is not None:
            self._resync_buffer.append((msg, received_at))
            return
        self._handle(msg, received_at)

    def _handle(self, msg: AmiMessage, received_at: float) -> None:
        if self.queue_trace is not None:
            self._trace(self.queue_trace.observe(msg))
        self._emit(self.tracker.handle(msg, received_at))

    def _trace(self, changes: list[QueueChange]) -> None:
        for change in changes:
            queue_log.info(change.log_text(), extra={"line": change.line})

    def _emit(self, events: list[LineEvent]) -> None:
        if not events:
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
                    event, self.tracker.agent_state(line), len(self.tracker.calls_of(line))
                ):
                    self._pause_requests.put_nowait(request)

    async def _pause_worker(self) -> None:
        """Carries out autoPauseOnCommutationStart's QueuePause requests in order, off the read path."""
        while True:
            request = await self._pause_requests.get()
            outcome = "error"
            try:
                session = self._session()
                if session is None:
                    log.warning("auto pause of line %s skipped: AMI not connected", request.line)
                    continue
                fields = {"Interface": self.matcher.interface_for(request.line),
                          "Paused": "true" if request.paused else "false"}
                if request.paused and request.reason:
                    fields["Reason"] = request.reason
                answer = (await session.send_action("QueuePause", fields))[0]
                if (answer.response or "").lower() == "success":
                    outcome = "success"
                else:
                    log.warning("auto %s of line %s refused: %s", "pause" if request.paused else "unpause",
                                request.line, answer.get("Message"), extra={"line": request.line})
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
        if command.name is CommandName.WRAP_UP and result.ok:
            self.auto_pause.set_wrap_up(command.line, command.args.get("active", "true").lower() == "true")
        if command.name is CommandName.DTMF and result.ok:
            # DTMF_ENTERED is "DTMF characters sent": the panel shows what the agent dialled (tracker Rule 12).
            # PlayDTMF's own events are "Sent" ones the tracker never reports, so this is the only echo.
            call = next((c for c in self.tracker.calls_of(command.line) if c.id == command.args.get("call_id")), None)
            self._emit([LineEvent(line=command.line, type=EventType.DTMF_ENTERED, call=call,
                                  digits=command.args.get("digits", ""), ami_received_at=time.time())])

    async def _on_ami_connected(self, session: AmiSession) -> None:
        """Rebuild the truth before emitting deltas: what ended or started while we were away."""
        self._resync_buffer = []
        started = time.perf_counter()
        try:
            channels = await self._live_channels(session)
            members = await self._queue_members(session)
            now = time.time()
            RESYNC_SECONDS.observe(time.perf_counter() - started)
            if channels is None:
                log.error("cannot list live channels (the AMI user needs write = call for Status, or reporting); "
                          "calls that ended while disconnected stay open until their next event")
            else:
                self._emit(self.tracker.resync(channels, members or [], now))
                self._finish_stale_calls(now)
            if self.queue_trace is not None and members is not None:
                self._trace(self.queue_trace.resync(members))
        finally:
            buffered, self._resync_buffer = self._resync_buffer or [], None
            for msg, received_at in buffered:
                self._handle(msg, received_at)
        self.ready.set()
        GATEWAY_READY.set(1)

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
        self.ready.clear()
        GATEWAY_READY.set(0)

    def _finish_stale_calls(self, now: float) -> None:
        """Calls a previous gateway run left in Redis that are no longer live get their end."""
        stale, self._stale_calls = self._stale_calls or {}, None
        for line, calls in stale.items():
            live = {c.id for c in self.tracker.calls_of(line)}
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
        epoch = await self._claim_epoch()
        self.sequencer.restart(epoch)
        now = time.time()
        events: list[LineEvent] = []
        for line in self.tracker.lines():
            for call in self.tracker.calls_of(line):
                events.append(LineEvent(line=line, type=EventType.CALL_INFO_CHANGED, call=call, ami_received_at=now))
            agent = self.tracker.agent_state(line)
            if agent is not None:
                events.append(
                    LineEvent(line=line, type=EventType.AGENT_STATE_CHANGED, agent=agent, ami_received_at=now)
                )
        self.outbox.put(self.records.stamp(events) if self.records is not None else events)

    async def _replay(self, path: str) -> None:
        """``filePath``: play a scenario file (a raw AMI capture is one) through the same path as live AMI."""
        from ami_simulator.scenario import ScenarioError, load_scenario

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
        backoff = Backoff(initial=0.2, maximum=10.0)
        first = True
        while True:
            try:
                if not first:
                    BROKER_RECONNECTS.inc()
                first = False
                connection = await aio_pika.connect(self.settings.cluster.amqp_url, timeout=10)
                async with connection:
                    channel = await connection.channel()
                    await channel.set_qos(prefetch_count=64)
                    queue = await channel.declare_queue(self.topology.commands_queue, durable=True)
                    backoff.reset()
                    async with queue.iterator() as messages:
                        async for message in messages:
                            # Concurrently (at most prefetch_count at a time): a click-to-dial that waits
                            # for the phone to answer must not hold up another agent's hangup.
                            task = asyncio.create_task(self._handle_command(channel, message))
                            self._command_tasks.add(task)
                            task.add_done_callback(self._command_tasks.discard)
            except asyncio.CancelledError:
                raise
            except (aio_pika.exceptions.AMQPError, OSError, RuntimeError) as exc:
                BROKER_ERRORS.inc()
                delay = backoff.next_delay()
                log.warning("command queue unavailable (%s); retry in %.1fs", exc, delay)
                await asyncio.sleep(delay)

    async def _handle_command(self, channel: aio_pika.abc.AbstractChannel, message: AbstractIncomingMessage) -> None:
        try:
            async with message.process(ignore_processed=True):
                try:
                    command = Command.decode(message.body)
                except WireError as exc:
                    log.warning("dropping undecodable command: %s", exc)
                    return
                choice = agent_choice(command, self.settings.agent_states, REASON_MAX)
                if choice is not None:  # before the QueuePause: its events may come before its answer
                    self.tracker.expect_agent_code(choice.line, choice.code, choice.reason, choice.paused)
                if command.name is CommandName.RECORD_OWNER:
                    result = (await self.records.set_owner(command) if self.records is not None
                              else CommandResult(command.id, True))
                else:
                    result = await self.executor.execute(command)
                if message.reply_to:
                    await channel.default_exchange.publish(
                        aio_pika.Message(
                            body=result.encode(), correlation_id=command.id, content_type="application/json"
                        ),
                        routing_key=message.reply_to,
                        mandatory=False,
                    )
        except (aio_pika.exceptions.AMQPError, OSError, RuntimeError) as exc:
            # The broker went away mid-command: the answer (or the ack) is lost; the node times the command out.
            BROKER_ERRORS.inc()
            log.warning("command answer or ack lost: %s", exc)


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
                      on_ready: Callable[[Gateway], None] | None = None) -> None:
    gateway = Gateway(settings, metrics_host=metrics_host, metrics_port=metrics_port)
    await gateway.start()
    if on_ready is not None:
        on_ready(gateway)
    try:
        await stop.wait()
    finally:
        await gateway.stop()



