"""An asyncio AMI server that behaves like Asterisk 13-20, driven by scenarios.

Theory of operation
-------------------
* Every AMI client gets a :class:`_Session`: banner, then actions parsed by the sans-I/O
  :class:`~ami.protocol.AmiParser`, answered with Asterisk's exact wording (``Authentication
  failed``, ``Missing action in request``, ``Invalid/unknown command``, ``Permission denied``...), ActionID
  echoed on every answer.
* Calls are scenario plays (:mod:`ami.scenario`): a task renders the template with fresh ids and
  emits its events on time. Each event first goes through :class:`~ami_simulator.model.PbxModel`, so the
  model (live channels, bridges, queue members) is always what the clients were told, and list actions
  (``CoreShowChannels``, ``Status``, ``QueueStatus``) tell the truth at any moment.
* Actions that change a call (``Hangup``, ``Redirect``, ``BlindTransfer``, ``Atxfer``) cancel the call's play
  and continue it with synthesised events built from the model's channel snapshots.
* Writes never block the simulator: each client has a bounded user-space write buffer, and a client whose
  buffer overflows is dropped (Asterisk drops a client that does not read within its write timeout).
* A tiny JSON-over-HTTP control endpoint (separate loopback port) plays scenarios and reports ground truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from ami.permissions import WRITE_CLASSES
from ami.protocol import AmiMessage, AmiParser, MalformedMessage, encode_message, md5_login_key
from ami.scenario import IdAllocator, Scenario, ScenarioError, Step, load_scenario, play_steps
from ami_simulator import features
from ami_simulator.builtin import builtin_scenario, builtin_scenario_names
from ami_simulator.features import Consult, Parked
from ami_simulator.model import CAUSE_TEXT, STATE_DESC, Call, Channel, PbxModel, event

__all__ = ["AmiSimulator", "User"]

log = logging.getLogger(__name__)

ALL_CLASSES = frozenset(
    {
        "system",
        "call",
        "log",
        "verbose",
        "command",
        "agent",
        "user",
        "config",
        "dtmf",
        "reporting",
        "cdr",
        "dialplan",
        "originate",
        "agi",
        "cc",
        "aoc",
        "test",
        "security",
        "message",
    }
)
TALK_AFTER_TRANSFER = 5.0
# How long a call picked up from the parking lot goes on before the simulator ends it.
TALK_AFTER_RESUME = 60.0
# How long res_parking takes to read the parking space out to the parker before the parker leaves.
ANNOUNCE_SPACE = 1.5
# How long a consultation or a parked call waits for the agent's next step before the simulator ends the call.
WAIT_FOR_AGENT = 120.0
PARKING_SPACES = tuple(str(n) for n in range(701, 751))


def parse_classes(text: str) -> frozenset[str]:
    """``"call,agent,originate"`` -> classes; ``"all"`` -> every class."""
    items = {p.strip().lower() for p in text.split(",") if p.strip()}
    if "all" in items:
        return ALL_CLASSES
    return frozenset(items & ALL_CLASSES)


@dataclass(frozen=True)
class User:
    """A manager.conf user: secret and read/write class permissions."""

    secret: str
    read: frozenset[str] = ALL_CLASSES
    write: frozenset[str] = ALL_CLASSES


def _privilege_classes(msg: AmiMessage) -> frozenset[str] | None:
    privilege = msg.get("Privilege")
    if privilege is None:
        return None
    return frozenset(p for p in privilege.split(",") if p and p != "all")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on", "y", "t")


class _Session:
    """One AMI client connection."""

    def __init__(self, sim: AmiSimulator, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sim = sim
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.user: User | None = None
        self.username = ""
        self.challenge: str | None = None
        self.eventmask: frozenset[str] | None = ALL_CLASSES  # classes wanted; empty = Events off
        self.closed = False
        # Filter action (manager.c): events must match one include filter (if any) and no exclude filter.
        self.include_filters: list[re.Pattern[str]] = []
        self.exclude_filters: list[re.Pattern[str]] = []

    @property
    def authenticated(self) -> bool:
        return self.user is not None

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        self.writer.write(data)
        if data.startswith(b"Event:"):
            self.sim.metrics.events_sent.inc()
        transport = self.writer.transport
        if transport.get_write_buffer_size() > self.sim.max_client_buffer:
            self.sim.metrics.clients_dropped.inc()
            log.warning(
                "conn=%s user=%s: not reading, write buffer over %d bytes; dropping the client",
                self.peer,
                self.username,
                self.sim.max_client_buffer,
            )
            self.close(abort=True)

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if abort:
            self.writer.transport.abort()
        else:
            self.writer.close()

    def wants(self, msg: AmiMessage) -> bool:
        if self.user is None or not self.eventmask:
            return False
        classes = _privilege_classes(msg)
        if classes is not None and not classes & self.user.read & self.eventmask:
            return False
        if self.include_filters or self.exclude_filters:
            text = "\r\n".join(f"{k}: {v}" for k, v in msg.headers)
            if self.include_filters and not any(f.search(text) for f in self.include_filters):
                return False
            if any(f.search(text) for f in self.exclude_filters):
                return False
        return True

    def respond(self, request: AmiMessage, response: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        out: list[tuple[str, str]] = [("Response", response)]
        action_id = request.action_id
        if action_id is not None:
            out.append(("ActionID", action_id))
        out.extend(headers)
        self.send(encode_message(out))

    def success(self, request: AmiMessage, message: str | None = None, *more: tuple[str, str]) -> None:
        headers = [("Message", message)] if message is not None else []
        self.respond(request, "Success", [*headers, *more])

    def error(self, request: AmiMessage, message: str) -> None:
        self.respond(request, "Error", [("Message", message)])

    def list_event(self, request: AmiMessage, name: str, headers: Iterable[tuple[str, str]]) -> None:
        out: list[tuple[str, str]] = [("Event", name)]
        if request.action_id is not None:
            out.append(("ActionID", request.action_id))
        out.extend(headers)
        self.send(encode_message(out))

    async def run(self) -> None:
        parser = AmiParser(max_message_bytes=self.sim.max_action_bytes, expect_banner=False)
        self.send(f"Asterisk Call Manager/{self.sim.version}\r\n".encode())
        try:
            while not self.closed:
                data = await self.reader.read(65536)
                parser.receive_data(data)
                while not self.closed and (msg := parser.next_event()) is not None:
                    if isinstance(msg, MalformedMessage):
                        # Asterisk cannot parse it either; it ends up without an Action header.
                        self.send(encode_message([("Response", "Error"), ("Message", "Missing action in request")]))
                        continue
                    if isinstance(msg, AmiMessage):
                        self.sim._handle_action(self, msg)
                if not data:
                    break
                if not self.closed:
                    await self.writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.close()
            self.sim._sessions.discard(self)
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
            log.info("conn=%s user=%s: disconnected", self.peer, self.username)


@dataclass
class _Play:
    call: Call
    task: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    on_event: Callable[[AmiMessage], None] | None = None
    suppress: frozenset[str] = frozenset()


class SimulatorMetrics:
    """Prometheus counters of one simulator (a private registry, so several simulators can share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections = Counter(
            "ami_simulator_connections_total", "AMI client connections accepted", registry=self.registry
        )
        self.actions = Counter(
            "ami_simulator_actions_total", "AMI actions received", ["action", "response"], registry=self.registry
        )
        self.events_sent = Counter(
            "ami_simulator_events_sent_total", "AMI events written to clients (one per client)", registry=self.registry
        )
        self.clients_dropped = Counter(
            "ami_simulator_clients_dropped_total", "Clients cut because they did not read", registry=self.registry
        )
        self.plays = Counter("ami_simulator_plays_total", "Scenario plays started", registry=self.registry)
        self.clients = Gauge("ami_simulator_clients", "AMI clients connected", registry=self.registry)
        self.calls = Gauge("ami_simulator_calls", "Calls in progress", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class AmiSimulator:
    """A scenario-driven Asterisk AMI server.

    Use as ``async with AmiSimulator(...) as sim:`` or ``await sim.start()`` / ``await sim.stop()``.
    ``port`` / ``control_port`` give the bound ports (pass 0 for an ephemeral one).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 5038,
        control_port: int | None = None,
        users: Mapping[str, str | User] | None = None,
        version: str = "9.0.0",
        tech: str = "SIP",
        time_scale: float = 1.0,
        queues: Mapping[str, Sequence[str]] | None = None,
        max_client_buffer: int = 1024 * 1024,
        max_action_bytes: int = 64 * 1024,
        scenario_dir: str | Path | None = None,
    ) -> None:
        if tech not in ("SIP", "PJSIP"):
            raise ValueError(f"tech must be SIP or PJSIP, not {tech!r}")
        self.host = host
        self._port = port
        self._control_port = control_port
        self.users: dict[str, User] = {
            name: (u if isinstance(u, User) else User(u)) for name, u in (users or {"admin": "amp111"}).items()
        }
        self.version = version
        self.tech = tech
        self.time_scale = time_scale
        self.max_client_buffer = max_client_buffer
        self.max_action_bytes = max_action_bytes
        self.scenario_dir = Path(scenario_dir) if scenario_dir else None
        # Asterisk 13 (AMI 2.x) still wrote the old "Reason" header in QueueMemberPause.
        self.model = PbxModel(tech, legacy_pause_reason=version.startswith(("1.", "2.")))
        for queue, lines in (queues if queues is not None else {"support": ["305", "306"]}).items():
            for line in lines:
                self.model.add_member(queue, line)
        self.ids = IdAllocator(first_sequence=random.randint(0, 50) * 10)
        self.started = time.time()
        self._sessions: set[_Session] = set()
        self._plays: dict[str, _Play] = {}
        self._server: asyncio.Server | None = None
        self._control: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._globals: dict[str, str] = {}
        self.metrics = SimulatorMetrics()
        #: Atxfer consultations in progress, by transferer channel name.
        self.consults: dict[str, Consult] = {}
        #: parked calls by space (the single lot "default", context ``parking_context``).
        self.parked: dict[str, Parked] = {}
        self.parking_context = "parkedcalls"
        #: AstDB (DBGet/DBPut/DBDel), by (family, key).
        self.astdb: dict[tuple[str, str], str] = {}
        #: lines whose phone is not registered: Originate to them fails like chan_sip/chan_pjsip would.
        self.unregistered: set[str] = set()
        #: actions (lower case) of modules not loaded: Asterisk answers them as unknown (app_queue absent: QueueStatus)
        self.unloaded_actions: set[str] = set()
        self._restart_task: asyncio.Task[int] | None = None  # a restart asked for on the control port

    # ---- lifecycle ---------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._server is None:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def control_port(self) -> int | None:
        if self._control is None:
            return self._control_port
        return int(self._control.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_client, self.host, self._port)
        if self._control_port is not None:
            self._control = await asyncio.start_server(self._on_control, "127.0.0.1", self._control_port)
        log.info(
            "AMI simulator listening on %s:%d (control %s), banner %s, tech %s",
            self.host,
            self.port,
            self.control_port,
            self.version,
            self.tech,
        )

    async def stop(self) -> None:
        """Stop accepting, end the plays, say Shutdown to the clients and close them. Idempotent."""
        if self._restart_task is not None and not self._restart_task.done():
            self._restart_task.cancel()
            await asyncio.gather(self._restart_task, return_exceptions=True)
        for server in (self._server, self._control):
            if server is not None:
                server.close()
        for play in list(self._plays.values()):
            if play.task is not None:
                play.task.cancel()
        for task in list(self._tasks):
            task.cancel()
        pending = [p.task for p in self._plays.values() if p.task is not None] + list(self._tasks)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self.broadcast(event("Shutdown", "system,all", Shutdown="Cleanly", Restart="False"))
        for session in list(self._sessions):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await session.writer.drain()
            session.close()
        for server in (self._server, self._control):
            if server is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2.0):
                        await server.wait_closed()
        self._server = self._control = None

    def drop_clients(self) -> int:
        """The manager connections break (a network cut, a firewall's idle timeout) while Asterisk runs on: every
        session is aborted without a Shutdown event, and calls carry on. Returns how many sessions were dropped."""
        sessions = list(self._sessions)
        for session in sessions:
            session.close(abort=True)
        return len(sessions)

    async def restart(self, down_for: float = 0.0) -> int:
        """Asterisk restarting (``core restart now``): every manager session gets ``Shutdown`` (Restart: True)
        and is closed, every call vanishes without a Hangup (the PBX just went away), static queue members come
        back unpaused, and the manager port refuses connections for ``down_for`` seconds. Returns how many
        calls were lost."""
        port = self.port
        plays = list(self._plays.values())
        for play in plays:
            if play.task is not None:
                play.task.cancel()
        for task in list(self._tasks):
            task.cancel()
        pending = [p.task for p in plays if p.task is not None] + list(self._tasks)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self.broadcast(event("Shutdown", "system,all", Shutdown="Cleanly", Restart="True"))
        for session in list(self._sessions):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await session.writer.drain()
            session.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()
            self._server = None
        lost = list(self.model.calls.values())
        membership = [(q.name, m.name, m.state_interface.split("/", 1)[-1])
                      for q in self.model.queues.values() for m in q.members.values()]
        self.model = PbxModel(self.tech, legacy_pause_reason=self.model.legacy_pause_reason)
        for queue, name, line in membership:
            self.model.add_member(queue, line, name=name)
        for call in lost:
            call.state, call.playing, call.live = "lost", False, set()
            self.model.maybe_finish(call, "lost")
        for play in plays:
            play.done.set()
        self._plays.clear()
        self.consults.clear()
        self.parked.clear()
        self.ids = IdAllocator(first_sequence=random.randint(0, 50) * 10)
        self.metrics.calls.set(0)
        log.warning("simulated Asterisk restart: %d calls lost, manager port down for %.1fs", len(lost), down_for)
        if down_for > 0:
            await asyncio.sleep(down_for)
        self.started = time.time()
        self._server = await asyncio.start_server(self._on_client, self.host, port)
        return len(lost)

    async def __aenter__(self) -> AmiSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- event fan-out -----------------------------------------------------------------------------
    def broadcast(self, msg: AmiMessage | bytes) -> None:
        if isinstance(msg, bytes):
            for session in list(self._sessions):
                if session.authenticated and session.eventmask:
                    session.send(msg)
            return
        data = msg.encode()
        for session in list(self._sessions):
            if session.wants(msg):
                session.send(data)

    def emit(self, msg: AmiMessage | bytes, call: Call | None = None) -> None:
        """Apply an event to the model, then send what results to the clients that want it."""
        if isinstance(msg, bytes):
            self.broadcast(msg)
            return
        for out in self.model.apply(msg, call):
            self.broadcast(out)

    # ---- plays -------------------------------------------------------------------------------------
    def scenario(self, name: str) -> Scenario:
        if self.scenario_dir is not None:
            path = self.scenario_dir / f"{name}.ami"
            if path.is_file():
                return load_scenario(path)
        return builtin_scenario(name)

    def scenario_names(self) -> list[str]:
        names = set(builtin_scenario_names())
        if self.scenario_dir is not None:
            names.update(p.stem for p in self.scenario_dir.glob("*.ami"))
        return sorted(names)

    def play(self, scenario: str | Scenario, *, tech: str | None = None, **variables: str) -> Call:
        """Start playing a scenario now (needs a running loop); returns the call it creates.

        ``call.id`` is its Linkedid, ``call.planned`` the channels it will create; ``await sim.wait_call(call)``
        waits for its end. Raises :class:`ScenarioError` for an unknown scenario or a missing variable.
        """
        return self.start_play(scenario, variables, tech=tech)

    def start_play(
        self,
        scenario: str | Scenario,
        variables: Mapping[str, str],
        *,
        tech: str | None = None,
        on_event: Callable[[AmiMessage], None] | None = None,
        suppress: Iterable[str] = (),
    ) -> Call:
        """:meth:`play` with a hook called on each scenario event and event names not to send."""
        sc = self.scenario(scenario) if isinstance(scenario, str) else scenario
        rendered = sc.render(self.ids, variables, tech=tech or self.tech)
        call_id = rendered.linkedid or self.ids.uniqueid()
        call = self.model.new_call(call_id, sc.name, {k: rendered.variables[k] for k in variables})
        call.planned = list(rendered.channels)
        play = _Play(call, on_event=on_event, suppress=frozenset(suppress))
        self._plays[call_id] = play
        play.task = asyncio.get_running_loop().create_task(self._run_steps(play, rendered.steps))
        self.metrics.plays.inc()
        log.info(
            "call=%s scenario=%s vars=%s channels=%s", call_id, sc.name, call.variables, ",".join(rendered.channels)
        )
        return call

    async def _run_steps(self, play: _Play, steps: Sequence[Step], state: str = "finished") -> None:
        call = play.call

        def emit(item: AmiMessage | bytes) -> None:
            if isinstance(item, AmiMessage):
                name = item.event or ""
                if play.on_event is not None:
                    play.on_event(item)
                if name in play.suppress:
                    return
            self.emit(item, call)

        try:
            await play_steps(tuple(steps), emit, time_scale=self.time_scale)
        finally:
            if asyncio.current_task() is play.task:
                call.playing = False
                self.model.maybe_finish(call, state)
                if call.ended is not None:
                    self._plays.pop(call.id, None)
                    play.done.set()

    def _continue(self, play: _Play, steps: Sequence[Step], state: str) -> None:
        """Replace a call's running play with new steps (after Hangup, transfers...)."""
        old = play.task
        play.task = None
        if old is not None and old is not asyncio.current_task():
            old.cancel()
        play.call.playing = True
        play.task = asyncio.get_running_loop().create_task(self._run_steps(play, steps, state))
        if state != "finished":
            play.call.state = state

    async def wait_call(self, call: Call, timeout: float | None = None) -> None:
        play = self._plays.get(call.id)
        if play is not None and call.ended is None:
            async with asyncio.timeout(timeout):
                await play.done.wait()

    @property
    def calls(self) -> list[Call]:
        return list(self.model.calls.values())

    def hangup_all(self) -> int:
        count = 0
        for play in list(self._plays.values()):
            channels = self.model.call_channels(play.call.id)
            if channels:
                self._hangup(channels[0], "16")
            elif play.task is not None:
                play.call.state = "hungup"
                play.task.cancel()
            count += 1
        return count

    def hangup_call(self, linked_id: str, cause: str = "16") -> bool:
        """Hang up one call (all its channels) as if its first channel hung up; False if it is not live."""
        channels = self.model.call_channels(linked_id)
        if not channels:
            return False
        self._hangup(channels[0], cause)
        return True

    # ---- synthesised sequences ---------------------------------------------------------------------
    def _hangup_steps(self, channels: list[Channel], first: Channel | None, cause: str) -> list[Step]:
        """End every given channel like Asterisk does when ``first`` hangs up (bridges dissolve)."""
        msgs: list[AmiMessage] = []
        if first is not None:
            msgs.append(event("HangupRequest", "call,all", first.block(), Cause=cause))
        seen_bridges: list[str] = []
        for ch in channels:
            if ch.bridge and ch.bridge not in seen_bridges:
                seen_bridges.append(ch.bridge)
        # Bridges of the call that nobody has entered yet go too.
        call_ids = {ch.call_id for ch in channels if ch.call_id}
        seen_bridges.extend(
            uid for uid, b in self.model.bridges.items() if b.call_id in call_ids and uid not in seen_bridges
        )
        for uid in seen_bridges:
            bridge = self.model.bridges.get(uid)
            if bridge is None:
                continue
            members = list(bridge.channels)
            for i, name in enumerate(members):
                ch2 = self.model.channels.get(name)
                if ch2 is None:
                    continue
                headers = dict(bridge.headers)
                headers["BridgeNumChannels"] = str(len(members) - i - 1)
                msgs.append(event("BridgeLeave", "call,all", headers.items(), ch2.block()))
            destroyed = dict(bridge.headers)
            destroyed["BridgeNumChannels"] = "0"
            msgs.append(event("BridgeDestroy", "call,all", destroyed.items()))
        for ch in channels:
            for q in self.model.queues.values():
                if ch.name in q.callers:
                    position = str(q.callers.index(ch.name) + 1)
                    msgs.append(
                        event(
                            "QueueCallerAbandon",
                            "agent,all",
                            ch.block(),
                            Queue=q.name,
                            Position=position,
                            OriginalPosition=position,
                            HoldTime="1",
                        )
                    )
                    msgs.append(
                        event(
                            "QueueCallerLeave",
                            "agent,all",
                            ch.block(),
                            Queue=q.name,
                            Position=position,
                            Count=str(len(q.callers) - 1),
                        )
                    )
        for ch in channels:
            for space, parked in list(self.parked.items()):
                if parked.channel == ch.name:
                    del self.parked[space]
                    msgs.append(
                        event(
                            "ParkedCallGiveUp",
                            "call,all",
                            ch.block("Parkee"),
                            ParkerDialString="",
                            Parkinglot=parked.lot,
                            ParkingSpace=space,
                            ParkingTimeout="0",
                            ParkingDuration=str(int(time.monotonic() - parked.parked_at)),
                        )
                    )
            self.consults.pop(ch.name, None)
        for ch in channels:
            msgs.extend(self._hangup_tail(ch, cause if ch is first else "16"))
        return [Step(0.0, m) for m in msgs]

    def _hangup_tail(self, ch: Channel, cause: str) -> list[AmiMessage]:
        """``Hangup`` of one channel and, for a phone, its device and queue member state."""
        msgs = [event("Hangup", "call,all", ch.block(), Cause=cause, Cause_txt=CAUSE_TEXT.get(cause, "Unknown"))]
        if ch.device:
            msgs.append(event("DeviceStateChange", "call,all", Device=ch.device, State="NOT_INUSE"))
            line = ch.device.split("/", 1)[1]
            if self.model.find_members(line):
                msgs.append(event("QueueMemberStatus", "agent,all", Interface=f"{self.tech}/{line}", Status="1"))
        return msgs

    def _with_partners(self, channels: list[Channel]) -> list[Channel]:
        """``channels`` and whoever shares a bridge with them: a two-party basic bridge dissolves on hangup."""
        result = list(channels)
        for ch in channels:
            for partner in self.model.bridge_partners(ch):
                if partner not in result:
                    result.append(partner)
        return result

    def _hangup(self, channel: Channel, cause: str) -> None:
        call = self.model.call_of(channel)
        play = self._plays.get(call.id) if call else None
        channels = self._with_partners(self.model.call_channels(call.id) if call else [channel])
        # The hung-up channel first, like Asterisk tears down from the requester outwards.
        channels.sort(key=lambda c: c is not channel)
        steps = self._hangup_steps(channels, channel, cause)
        if play is not None:
            self._continue(play, steps, "hungup")
        else:
            for step in steps:
                self.emit(step.item)

    def _dial_leg_steps(self, caller: Channel, target: str, context: str) -> tuple[list[Step], Channel]:
        """``caller`` dials ``{tech}/target``: ring 1 s, answer, bridge, talk, then both hang up."""
        tech = self.tech
        uid = self.ids.uniqueid()
        linked = caller.snapshot.get("Linkedid", caller.snapshot.get("Uniqueid", ""))
        # Extensions are phones of the PBX; longer numbers leave through the carrier trunk.
        is_phone = len(target) <= 6
        name = f"{tech}/{target if is_phone else 'carrier'}-{self.ids.channel_suffix()}"
        dest = Channel(
            {
                "Channel": name,
                "ChannelState": "0",
                "ChannelStateDesc": "Down",
                "CallerIDNum": target,
                "CallerIDName": f"Agent {target}",
                "ConnectedLineNum": caller.snapshot.get("CallerIDNum", ""),
                "ConnectedLineName": caller.snapshot.get("CallerIDName", ""),
                "Language": "en",
                "AccountCode": "",
                "Context": context,
                "Exten": target,
                "Priority": "1",
                "Uniqueid": uid,
                "Linkedid": linked,
            },
            0.0,
            caller.call_id,
        )
        src = Channel(dict(caller.snapshot), 0.0, caller.call_id)
        src.snapshot.update(ConnectedLineNum=target, ConnectedLineName=f"Agent {target}")

        def dblock(state: str) -> list[tuple[str, str]]:
            dest.snapshot.update(ChannelState=state, ChannelStateDesc=STATE_DESC[state])
            return dest.block("Dest")

        bridge = self.ids.bridge_id()
        bh = {
            "BridgeUniqueid": bridge,
            "BridgeType": "basic",
            "BridgeTechnology": "simple_bridge",
            "BridgeCreator": "<unknown>",
            "BridgeName": "<unknown>",
            "BridgeNumChannels": "0",
            "BridgeVideoSourceMode": "none",
        }
        steps = [
            Step(0.0, event("Newchannel", "call,all", dest.block())),
            Step(
                0.01,
                event(
                    "DialBegin", "call,all", src.block(), dblock("0"),
                    DialString=target if is_phone else f"carrier/{target}",
                ),
            ),
            Step(
                0.01,
                event(
                    "Newstate",
                    "call,all",
                    (dest.snapshot | {"ChannelState": "5", "ChannelStateDesc": "Ringing"}).items(),
                ),
            ),
            Step(0.0, event("DeviceStateChange", "call,all", Device=name.rsplit("-", 1)[0], State="RINGING")),
            Step(0.01, event("DialState", "call,all", src.block(), dblock("5"), DialStatus="RINGING")),
            Step(
                1.0,
                event(
                    "Newstate", "call,all", (dest.snapshot | {"ChannelState": "6", "ChannelStateDesc": "Up"}).items()
                ),
            ),
            Step(0.0, event("DeviceStateChange", "call,all", Device=name.rsplit("-", 1)[0], State="INUSE")),
            Step(0.01, event("DialEnd", "call,all", src.block(), dblock("6"), DialStatus="ANSWER")),
            Step(0.01, event("BridgeCreate", "call,all", bh.items())),
            Step(0.0, event("BridgeEnter", "call,all", (bh | {"BridgeNumChannels": "1"}).items(), dest.block())),
            Step(0.0, event("BridgeEnter", "call,all", (bh | {"BridgeNumChannels": "2"}).items(), src.block())),
        ]
        return steps, dest

    def _schedule_after(self, play: _Play, talk: float, coro: Callable[[], Any]) -> None:
        async def runner() -> None:
            task = play.task
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(task)
            if play.task is not task:
                return  # the call was changed again meanwhile
            await asyncio.sleep(talk * self.time_scale)
            if play.task is task and play.call.live:
                await coro()

        t = asyncio.get_running_loop().create_task(runner())
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _transfer(
        self, moved: Channel, leaving: list[Channel], target: str, context: str, prelude: list[AmiMessage]
    ) -> None:
        """``moved`` leaves its bridge, ``leaving`` hang up, ``moved`` dials ``target``."""
        call = self.model.call_of(moved)
        play = self._plays.get(call.id) if call else None
        msgs: list[AmiMessage] = list(prelude)
        bridge = self.model.bridges.get(moved.bridge)
        if bridge is not None:
            n = len(bridge.channels)
            for ch in [moved, *leaving]:
                if ch.name in bridge.channels:
                    n -= 1
                    msgs.append(
                        event(
                            "BridgeLeave",
                            "call,all",
                            (bridge.headers | {"BridgeNumChannels": str(n)}).items(),
                            ch.block(),
                        )
                    )
            msgs.append(event("BridgeDestroy", "call,all", (bridge.headers | {"BridgeNumChannels": "0"}).items()))
        for ch in leaving:
            msgs.append(event("Hangup", "call,all", ch.block(), Cause="16", Cause_txt="Normal Clearing"))
            if ch.device:
                msgs.append(event("DeviceStateChange", "call,all", Device=ch.device, State="NOT_INUSE"))
        steps = [Step(0.0, m) for m in msgs]
        leg, _dest = self._dial_leg_steps(moved, target, context)
        steps.extend(leg)
        if play is None:
            for s in steps:
                self.emit(s.item)
            return
        self._continue(play, steps, "transferred")
        self._schedule_after(play, TALK_AFTER_TRANSFER, self._ending(play))

    def _ending(self, play: _Play) -> Callable[[], Any]:
        async def ending() -> None:
            channels = self._with_partners(self.model.call_channels(play.call.id))
            if channels:
                self._continue(play, self._hangup_steps(channels, channels[0], "16"), play.call.state)

        return ending

    # ---- AMI actions -------------------------------------------------------------------------------
    def _handle_action(self, s: _Session, m: AmiMessage) -> None:
        action = (m.get("Action") or "").strip()
        if not action:
            s.error(m, "Missing action in request")
            return
        key = action.lower()
        if key not in ("login", "logoff", "challenge") and not s.authenticated:
            s.error(m, "Permission denied")
            return
        handler = getattr(self, f"_act_{key}", None) if key not in self.unloaded_actions else None
        if handler is None:
            s.error(m, "Invalid/unknown command")
            return
        needed = WRITE_CLASSES.get(key, ())
        if needed and s.user is not None and s.user.write.isdisjoint(needed):
            self.metrics.actions.labels(action=key, response="denied").inc()
            s.error(m, "Permission denied")
            return
        self.metrics.actions.labels(action=key, response="handled").inc()
        handler(s, m)

    def _act_login(self, s: _Session, m: AmiMessage) -> None:
        if s.authenticated:
            s.success(m, "Already authenticated")
            return
        username = m.get("Username") or ""
        user = self.users.get(username)
        ok = False
        if user is not None:
            if (m.get("AuthType") or "").lower() == "md5":
                ok = s.challenge is not None and (m.get("Key") or "").lower() == md5_login_key(s.challenge, user.secret)
            else:
                ok = secrets.compare_digest(m.get("Secret") or "", user.secret)
        if not ok:
            log.info("conn=%s: authentication failed for %r", s.peer, username)
            s.error(m, "Authentication failed")
            s.close()  # Asterisk ends the session after a failed login
            return
        s.user, s.username = user, username
        events = m.get("Events")
        if events is not None:
            s.eventmask = self._eventmask(events)
        s.success(m, "Authentication accepted")
        log.info("conn=%s user=%s: logged in", s.peer, username)
        if s.wants(event("FullyBooted", "system,all")):
            s.send(
                event(
                    "FullyBooted",
                    "system,all",
                    Uptime=str(int(time.time() - self.started)),
                    LastReload=str(int(time.time() - self.started)),
                    Status="Fully Booted",
                ).encode()
            )

    @staticmethod
    def _eventmask(value: str) -> frozenset[str]:
        v = value.strip().lower()
        if v in ("on", "yes", "true", "1"):
            return ALL_CLASSES
        if v in ("off", "no", "false", "0", "none", ""):
            return frozenset()
        return parse_classes(v)

    def _act_challenge(self, s: _Session, m: AmiMessage) -> None:
        if (m.get("AuthType") or "").lower() != "md5":
            s.error(m, "Must specify AuthType")
            return
        s.challenge = str(random.randint(100000000, 999999999))
        s.success(m, None, ("Challenge", s.challenge))

    def _act_logoff(self, s: _Session, m: AmiMessage) -> None:
        s.respond(m, "Goodbye", [("Message", "Thanks for all the fish.")])
        s.close()

    def _act_ping(self, s: _Session, m: AmiMessage) -> None:
        s.success(m, None, ("Ping", "Pong"), ("Timestamp", f"{time.time():.6f}"))

    def _act_events(self, s: _Session, m: AmiMessage) -> None:
        mask = m.get("EventMask")
        if mask is None:
            s.error(m, "Invalid event mask")
            return
        s.eventmask = self._eventmask(mask)
        s.respond(m, "Success", [("Events", "On" if s.eventmask else "Off")])

    def _channel(self, s: _Session, m: AmiMessage, header: str = "Channel") -> Channel | None:
        name = m.get(header)
        if not name:
            s.error(m, "No channel specified")
            return None
        channel = self.model.channels.get(name)
        if channel is None:
            s.error(m, "No such channel")
        return channel

    def _act_hangup(self, s: _Session, m: AmiMessage) -> None:
        channel = self._channel(s, m)
        if channel is None:
            return
        cause = m.get("Cause") or "16"
        s.success(m, "Channel Hungup")
        consult = self.consults.get(channel.name)
        if consult is not None:
            self._complete_consult(consult, cause if cause.isdigit() else "16")
            return
        consult = self._consult_with_leg(channel.name)
        if consult is not None:
            self._cancel_consult(consult)
            return
        self._hangup(channel, cause if cause.isdigit() else "16")

    def _act_originate(self, s: _Session, m: AmiMessage) -> None:
        dial = m.get("Channel")
        if not dial:
            s.error(m, "Channel not specified")
            return
        tech, sep, rest = dial.partition("/")
        line = rest.split("@", 1)[0].split("/", 1)[0]
        if not sep or not line:
            s.error(m, "Invalid channel")
            return
        exten = m.get("Exten") or m.get("Data") or ""
        if not exten and not m.get("Application"):
            s.error(m, "Exten not specified")
            return
        variables = {
            "line": line,
            "number": exten or "s",
            "context": m.get("Context") or "from-internal",
            "actionid": m.action_id or "",
        }
        channel_id = (m.get("ChannelId") or "").strip()
        if channel_id:
            if len(channel_id) > 150 or channel_id in self.model.by_uniqueid:
                s.error(m, "Uniqueid already in use or too long" if len(channel_id) <= 150 else "Uniqueid too long")
                return
            variables["uid:1"] = channel_id  # the originated channel's Uniqueid (and so its Linkedid)
        tech = tech.upper() if tech.upper() in ("SIP", "PJSIP") else self.tech
        if line in self.unregistered:
            # The phone cannot be reached (chan_sip/chan_pjsip refuse the request): no channel is created.
            if _truthy(m.get("Async")):
                s.success(m, "Originate successfully queued")
                self.broadcast(
                    event(
                        "OriginateResponse",
                        "call,all",
                        [("ActionID", m.action_id or "")] if m.action_id else [],
                        Response="Failure",
                        Channel=dial,
                        Context=variables["context"],
                        Exten=exten,
                        Reason="0",
                        Uniqueid="<null>",
                        CallerIDNum="<unknown>",
                        CallerIDName="<unknown>",
                    )
                )
            else:
                s.error(m, "Originate failed")
            return
        if variables["context"] == self.parking_context:
            self._originate_retriever(s, m, variables, tech)
            return
        if _truthy(m.get("Async")):
            s.success(m, "Originate successfully queued")
            self.start_play("outbound-originate", variables, tech=tech)
            return

        def answered(msg: AmiMessage) -> None:
            if msg.event == "OriginateResponse" and not s.closed:
                s.success(m, "Originate successfully queued")

        # A synchronous Originate answers when the channel is up and raises no OriginateResponse.
        self.start_play("outbound-originate", variables, tech=tech, on_event=answered, suppress=("OriginateResponse",))

    def _originate_retriever(self, s: _Session, m: AmiMessage, variables: dict[str, str], tech: str) -> None:
        """Originate into the parking context: the phone rings; answered, it runs ParkedCall(<exten>)."""
        space = variables["number"]
        click_to_dial = self.scenario("outbound-originate")
        answered_at = next(
            i for i, step in enumerate(click_to_dial.steps)
            if isinstance(step.item, AmiMessage) and step.item.event == "DialEnd"
        )
        ring = dataclasses.replace(click_to_dial, name="originate-parked", steps=click_to_dial.steps[: answered_at + 1])
        synchronous = not _truthy(m.get("Async"))
        loop = asyncio.get_running_loop()

        def on_event(msg: AmiMessage) -> None:
            if msg.event == "OriginateResponse" and synchronous and not s.closed:
                s.success(m, "Originate successfully queued")
            elif msg.event == "DialEnd":
                # The phone is up and its dialplan starts: ParkedCall(space) (after this play step is out).
                loop.call_soon(self._pick_up_parked, msg.get("DestChannel") or "", space)

        if not synchronous:
            s.success(m, "Originate successfully queued")
        self.start_play(ring, variables, tech=tech, on_event=on_event,
                        suppress=("OriginateResponse",) if synchronous else ())

    def _pick_up_parked(self, name: str, space: str) -> None:
        retriever = self.model.channels.get(name)
        if retriever is not None:
            self._retrieve_parked(retriever, space)

    def _act_redirect(self, s: _Session, m: AmiMessage) -> None:
        channel = self._channel(s, m)
        if channel is None:
            return
        exten = m.get("Exten")
        if not exten:
            s.error(m, "Exten not set")
            return
        s.success(m, "Redirect successful")
        if (m.get("Context") or "") == self.parking_context:
            self._retrieve_parked(channel, exten)
            return
        partners = self.model.bridge_partners(channel)
        self._transfer(channel, partners, exten, m.get("Context") or "from-internal", [])

    def _act_blindtransfer(self, s: _Session, m: AmiMessage) -> None:
        transferer = self._channel(s, m)
        if transferer is None:
            return
        exten = m.get("Exten")
        if not exten:
            s.error(m, "No extension specified")
            return
        partners = self.model.bridge_partners(transferer)
        if not partners:
            s.error(m, "Transfer failed")
            return
        context = m.get("Context") or "from-internal"
        s.success(m, "Transfer succeeded")
        bridge = self.model.bridges.get(transferer.bridge)
        bridge_headers = bridge.headers if bridge is not None else {}
        prelude = [
            event(
                "BlindTransfer",
                "call,all",
                [("Result", "Success")],
                transferer.block("Transferer"),
                partners[0].block("Transferee"),
                bridge_headers.items(),
                IsExternal="No",
                Context=context,
                Extension=exten,
            )
        ]
        self._transfer(partners[0], [transferer], exten, context, prelude)

    def _act_atxfer(self, s: _Session, m: AmiMessage) -> None:
        transferer = self._channel(s, m)
        if transferer is None:
            return
        exten = m.get("Exten")
        if not exten:
            s.error(m, "No extension specified")
            return
        if transferer.name in self.consults or not self.model.bridge_partners(transferer):
            # Asterisk 12+: the transferer must be bridged, and not already transferring.
            s.error(m, "Transferer is not in a bridge" if transferer.name not in self.consults
                    else "Transfer already in progress")
            return
        context = m.get("Context") or "from-internal"
        s.success(m, "Atxfer successfully queued")
        self._start_consult(transferer, exten, context)

    def _start_consult(self, transferer: Channel, exten: str, context: str) -> None:
        call = self.model.call_of(transferer)
        play = self._plays.get(call.id) if call else None
        linked = transferer.snapshot.get("Linkedid", transferer.snapshot.get("Uniqueid", ""))
        suffix = self.ids.channel_suffix()
        base = {
            "CallerIDNum": transferer.snapshot.get("CallerIDNum", ""),
            "CallerIDName": transferer.snapshot.get("CallerIDName", ""),
            "ConnectedLineNum": "<unknown>",
            "ConnectedLineName": "<unknown>",
            "Language": "en",
            "AccountCode": "",
            "Context": context,
            "Exten": exten,
            "Priority": "1",
            "Linkedid": linked,
        }
        local1 = {"Channel": f"Local/{exten}@{context}-{suffix};1", "ChannelState": "0", "ChannelStateDesc": "Down",
                  **base, "Uniqueid": self.ids.uniqueid()}
        local2 = {"Channel": f"Local/{exten}@{context}-{suffix};2", "ChannelState": "4", "ChannelStateDesc": "Ring",
                  **base, "Uniqueid": self.ids.uniqueid()}
        # Asterisk's order of headers in a channel snapshot.
        local1 = {k: local1[k] for k in Channel.block_keys()}
        local2 = {k: local2[k] for k in Channel.block_keys()}
        consult_bridge = features.new_bridge()
        msgs = features.consult_prelude(self.model, transferer, local1, local2, consult_bridge)
        steps = [Step(0.0, x) for x in msgs]
        leg, dest = self._dial_leg_steps(Channel(dict(local2), 0.0, transferer.call_id), exten, context)
        steps.extend(leg)
        self.consults[transferer.name] = Consult(
            transferer=transferer.name,
            orig_bridge=transferer.bridge,
            local1=local1["Channel"],
            local2=local2["Channel"],
            consult_bridge=consult_bridge["BridgeUniqueid"],
            target=dest.name,
        )
        if play is None:
            for st in steps:
                self.emit(st.item)
            return
        self._continue(play, steps, "consulting")
        self._schedule_after(play, WAIT_FOR_AGENT, self._ending(play))

    def _consult_with_leg(self, name: str) -> Consult | None:
        return next((c for c in self.consults.values() if name in (c.local1, c.local2, c.target)), None)

    def _complete_consult(self, consult: Consult, cause: str) -> None:
        """The transferer hangs up in the consultation: the transfer completes, the call goes on."""
        self.consults.pop(consult.transferer, None)
        transferer = self.model.channels.get(consult.transferer)
        if transferer is None:
            return
        msgs = features.complete_consult_events(self.model, consult)
        msgs.append(event("Hangup", "call,all", transferer.block(), Cause=cause,
                          Cause_txt=CAUSE_TEXT.get(cause, "Unknown")))
        if transferer.device:
            msgs.append(event("DeviceStateChange", "call,all", Device=transferer.device, State="NOT_INUSE"))
        self._run_feature(transferer, msgs, "transferred", TALK_AFTER_TRANSFER)

    def _cancel_consult(self, consult: Consult) -> None:
        self.consults.pop(consult.transferer, None)
        transferer = self.model.channels.get(consult.transferer)
        msgs = features.cancel_consult_events(self.model, consult)
        if transferer is not None:
            self._run_feature(transferer, msgs, "talking", TALK_AFTER_TRANSFER)

    def _run_feature(self, channel: Channel, msgs: list[AmiMessage], state: str, then_end_after: float) -> None:
        """Play synthesised events in the call of ``channel``; end the call after a while unless changed again."""
        call = self.model.call_of(channel)
        play = self._plays.get(call.id) if call else None
        if play is None:
            for msg in msgs:
                self.emit(msg)
            return
        self._continue(play, [Step(0.0, x) for x in msgs], state)
        self._schedule_after(play, then_end_after, self._ending(play))

    def _act_cancelatxfer(self, s: _Session, m: AmiMessage) -> None:
        transferer = self._channel(s, m)
        if transferer is None:
            return
        consult = self.consults.get(transferer.name)
        if consult is None:
            s.error(m, "No attended transfer to cancel")
            return
        s.success(m, "CancelAtxfer successfully queued")
        self._cancel_consult(consult)

    def _act_park(self, s: _Session, m: AmiMessage) -> None:
        channel = self._channel(s, m)
        if channel is None:
            return
        lot = m.get("Parkinglot") or "default"
        if lot != "default":
            s.error(m, f"Could not find parking lot '{lot}'")
            return
        timeout = 45
        timeout_ms = (m.get("Timeout") or "").strip()
        if timeout_ms:
            if not timeout_ms.isdigit():
                s.error(m, "Invalid Timeout value.")
                return
            timeout = max(1, int(timeout_ms) // 1000) if int(timeout_ms) > 0 else 0
        timeout_channel = m.get("TimeoutChannel") or m.get("Channel2") or ""
        free = [x for x in PARKING_SPACES if x not in self.parked]
        space = free[0] if free else ""
        if not space or any(p.channel == channel.name for p in self.parked.values()):
            s.error(m, "Park action failed")
            return
        parked = Parked(space, lot, channel.name, features.new_bridge()["BridgeUniqueid"], time.monotonic(), timeout)
        self.parked[space] = parked
        s.success(m, "Park successful")
        partners = features.left_behind(self.model, channel)
        dissolve = features.dissolve_events(self.model, channel, partners)
        msgs = features.park_events(self.model, channel, parked, features.dial_string(timeout_channel))
        steps = [Step(0.0, x) for x in msgs]
        # TimeoutChannel = the bridge peer: the peer parks the call (manager_park_bridged), hears the space
        # read out, then leaves. Without it the old bridge dissolves at once (the parkee was stolen from it).
        announce = ANNOUNCE_SPACE if any(p.name == timeout_channel for p in partners) else 0.0
        for i, x in enumerate(dissolve):
            steps.append(Step(announce if i == 0 else 0.0, x))
        for partner in partners:
            # The partner's Dial() is over: a dialled phone hangs up, so does a caller whose dialplan ends there.
            steps.extend(Step(0.0, x) for x in self._hangup_tail(partner, "16"))
        self._run_steps_for(channel, steps, "parked", WAIT_FOR_AGENT)

    def _run_steps_for(self, channel: Channel, steps: list[Step], state: str, then_end_after: float) -> None:
        """:meth:`_run_feature` with timed steps."""
        call = self.model.call_of(channel)
        play = self._plays.get(call.id) if call else None
        if play is None:
            for step in steps:
                self.emit(step.item)
            return
        self._continue(play, steps, state)
        self._schedule_after(play, then_end_after, self._ending(play))

    def _retrieve_parked(self, retriever: Channel, space: str) -> None:
        """``retriever`` runs ParkedCall(space): picks the parked call up, or hangs up if the space is empty."""
        parked = self.parked.pop(space, None)
        parkee = self.model.channels.get(parked.channel) if parked is not None else None
        if parked is None or parkee is None:
            self._hangup(retriever, "16")
            return
        msgs = features.unpark_events(self.model, parked, retriever, int(time.monotonic() - parked.parked_at))
        parkee_call = self.model.call_of(parkee)
        parkee_play = self._plays.get(parkee_call.id) if parkee_call else None
        retriever_call = self.model.call_of(retriever)
        if parkee_play is not None and (retriever_call is None or retriever_call.id != parkee_play.call.id):
            # The parkee's own play no longer ends the call: whoever picked it up does, with the bridge.
            self._continue(parkee_play, [], "talking")
        self._run_feature(retriever, msgs, "talking", TALK_AFTER_RESUME)

    def _act_bridge(self, s: _Session, m: AmiMessage) -> None:
        names = (m.get("Channel1") or "", m.get("Channel2") or "")
        if not all(names):
            s.error(m, "Channel1 and Channel2 must be specified")
            return
        found = [self.model.channels.get(n) for n in names]
        for i, ch in enumerate(found, start=1):
            if ch is None:
                s.error(m, f"Channel{i} does not exist: {names[i - 1]}")
                return
        first, second = found
        assert first is not None and second is not None
        if first is second:
            s.error(m, "Unable to bridge a channel with itself")
            return
        s.success(m, "Channels have been bridged")
        for space, parked in list(self.parked.items()):
            if parked.channel in names:
                del self.parked[space]
        self._run_feature(first, features.bridge_events(self.model, first, second), "transferred",
                          TALK_AFTER_TRANSFER)

    def _act_playdtmf(self, s: _Session, m: AmiMessage) -> None:
        channel = self._channel(s, m)
        if channel is None:
            return
        digit = m.get("Digit") or ""
        if not digit:
            s.error(m, "No digit specified")
            return
        duration = m.get("Duration") or ""
        call = self.model.call_of(channel)
        if call is not None:
            call.dtmf += digit[0]
        s.success(m, "DTMF successfully queued")
        for msg in features.dtmf_events(channel, digit[0], int(duration) if duration.isdigit() else 250):
            self.emit(msg)

    def _ring_answered_by_notify(self, peer: str, m: AmiMessage) -> None:
        """A phone that supports it answers a ringing call when told ``Event: talk`` (SIP NOTIFY)."""
        if "event=talk" not in {v.replace(" ", "").lower() for v in m.getall("Variable")}:
            return
        for channel in list(self.model.channels.values()):
            if channel.device is None or channel.device.split("/", 1)[1] != peer:
                continue
            msgs = features.answer_events(self.model, channel)
            if msgs:
                self._run_feature(channel, msgs, "talking", TALK_AFTER_TRANSFER)
                return

    def _act_sipnotify(self, s: _Session, m: AmiMessage) -> None:
        peer = m.get("Channel")
        if not peer:
            s.error(m, "SIPNotify requires a channel name")
            return
        if not m.getall("Variable"):
            s.error(m, "At least one variable required")
            return
        s.success(m, "Notify Sent")
        self._ring_answered_by_notify(peer, m)

    def _act_pjsipnotify(self, s: _Session, m: AmiMessage) -> None:
        endpoint = m.get("Endpoint")
        if not (endpoint or m.get("URI") or m.get("Channel")):
            s.error(m, "PJSIPNotify requires either an endpoint name, a SIP URI, or a channel.")
            return
        if not (m.getall("Variable") or m.get("Option")):
            s.error(m, "PJSIPNotify requires either an Option or Variable(s)")
            return
        s.success(m, "NOTIFY sent")
        if endpoint:
            self._ring_answered_by_notify(endpoint, m)

    def _act_dbget(self, s: _Session, m: AmiMessage) -> None:
        family, key = m.get("Family"), m.get("Key")
        if not family:
            s.error(m, "No family specified.")
            return
        if not key:
            s.error(m, "No key specified.")
            return
        value = self.astdb.get((family, key))
        if value is None:
            s.error(m, "Database entry not found")
            return
        s.success(m, "Result will follow", ("EventList", "start"))
        s.list_event(m, "DBGetResponse", [("Family", family), ("Key", key), ("Val", value)])
        s.list_event(m, "DBGetComplete", [("EventList", "Complete"), ("ListItems", "1")])

    def _act_dbput(self, s: _Session, m: AmiMessage) -> None:
        family, key = m.get("Family"), m.get("Key")
        if not family:
            s.error(m, "No family specified")
            return
        if not key:
            s.error(m, "No key specified")
            return
        self.astdb[(family, key)] = m.get("Val") or ""
        s.success(m, "Updated database successfully")

    def _act_dbdel(self, s: _Session, m: AmiMessage) -> None:
        family, key = m.get("Family"), m.get("Key")
        if not family:
            s.error(m, "No family specified.")
            return
        if not key:
            s.error(m, "No key specified.")
            return
        if self.astdb.pop((family, key), None) is None:
            s.error(m, "Database entry not found")
            return
        s.success(m, "Key deleted successfully")

    def _act_filter(self, s: _Session, m: AmiMessage) -> None:
        operation = (m.get("Operation") or "").lower()
        if operation != "add":
            s.error(m, "Unknown operation")
            return
        text = m.get("Filter") or ""
        if not text:
            s.error(m, "Filter must be specified")
            return
        exclude = text.startswith("!")
        try:
            pattern = re.compile(text[1:] if exclude else text)
        except re.error:
            s.error(m, "Filter Not Added")
            return
        (s.exclude_filters if exclude else s.include_filters).append(pattern)
        s.success(m, "Filter Added Successfully")

    def _variable_store(self, s: _Session, m: AmiMessage) -> tuple[str, dict[str, str]] | None:
        """Setvar/Getvar's common checks: the variable's name and the channel's (or global) store."""
        name = m.get("Variable")
        if not name:
            s.error(m, "No variable specified")
            return None
        target = m.get("Channel")
        if target and target not in self.model.channels:
            s.error(m, "No such channel")
            return None
        return name, (self.model.variables.setdefault(target, {}) if target else self._globals)

    def _act_setvar(self, s: _Session, m: AmiMessage) -> None:
        found = self._variable_store(s, m)
        if found is not None:
            found[1][found[0]] = m.get("Value") or ""
            s.success(m, "Variable Set")

    def _act_getvar(self, s: _Session, m: AmiMessage) -> None:
        found = self._variable_store(s, m)
        if found is not None:
            s.success(m, None, ("Variable", found[0]), ("Value", found[1].get(found[0], "")))

    def _act_command(self, s: _Session, m: AmiMessage) -> None:
        command = " ".join((m.get("Command") or "").split()).lower()
        if command == "core show version":
            out = [f"Asterisk {'20.20.1' if self.version.startswith('9') else '13.38.3'} (simulated)"]
        elif command in ("core show channels", "core show channels concise"):
            out = [c.name for c in self.model.channels.values()]
            out.append(f"{len(out)} active channels")
        elif command == "core show uptime":
            out = [f"System uptime: {int(time.time() - self.started)} seconds"]
        else:
            s.respond(
                m,
                "Error",
                [
                    ("Message", "Command output follows"),
                    (
                        "Output",
                        f"No such command '{command}' (type 'core show help {command}' for other possible commands)",
                    ),
                ],
            )
            return
        s.success(m, "Command output follows", *[("Output", line) for line in out])

    def _act_coreshowchannels(self, s: _Session, m: AmiMessage) -> None:
        s.success(m, "Channels will follow", ("EventList", "start"))
        now = time.monotonic()
        channels = list(self.model.channels.values())
        for ch in channels:
            d = int(now - ch.created)
            s.list_event(
                m,
                "CoreShowChannel",
                [
                    *ch.block(),
                    ("BridgeId", ch.bridge),
                    ("Application", ch.application),
                    ("ApplicationData", ch.application_data),
                    ("Duration", f"{d // 3600:02d}:{d // 60 % 60:02d}:{d % 60:02d}"),
                ],
            )
        s.list_event(m, "CoreShowChannelsComplete", [("EventList", "Complete"), ("ListItems", str(len(channels)))])

    def _act_status(self, s: _Session, m: AmiMessage) -> None:
        name = m.get("Channel")
        if name:
            found = self.model.channels.get(name)
            if found is None:
                s.error(m, "No such channel")
                return
            channels = [found]
        else:
            channels = list(self.model.channels.values())
        s.success(m, "Channel status will follow", ("EventList", "start"))
        now = time.monotonic()
        for ch in channels:
            partners = self.model.bridge_partners(ch)
            s.list_event(
                m,
                "Status",
                [
                    *ch.block(),
                    ("Type", ch.name.split("/", 1)[0]),
                    ("DNID", ""),
                    ("EffectiveConnectedLineNum", ch.snapshot.get("ConnectedLineNum", "")),
                    ("EffectiveConnectedLineName", ch.snapshot.get("ConnectedLineName", "")),
                    ("TimeToHangup", "0"),
                    ("BridgeID", ch.bridge),
                    ("Application", ch.application),
                    ("Data", ch.application_data),
                    ("Nativeformats", "(ulaw)"),
                    ("Readformat", "ulaw"),
                    ("Readtrans", ""),
                    ("Writeformat", "ulaw"),
                    ("Writetrans", ""),
                    ("Callgroup", "0"),
                    ("Pickupgroup", "0"),
                    ("Seconds", str(int(now - ch.created))),
                    *(
                        [("BridgedChannel", partners[0].name), ("BridgedUniqueid", partners[0].snapshot["Uniqueid"])]
                        if partners
                        else []
                    ),
                ],
            )
        s.list_event(
            m,
            "StatusComplete",
            [("EventList", "Complete"), ("ListItems", str(len(channels))), ("Items", str(len(channels)))],
        )

    def _act_queuestatus(self, s: _Session, m: AmiMessage) -> None:
        only_queue = m.get("Queue")
        only_member = m.get("Member")
        s.success(m, "Queue status will follow", ("EventList", "start"))
        items = 0
        for q in self.model.queues.values():
            if only_queue and q.name != only_queue:
                continue
            s.list_event(
                m,
                "QueueParams",
                [
                    ("Queue", q.name),
                    ("Max", "0"),
                    ("Strategy", q.strategy),
                    ("Calls", str(len(q.callers))),
                    ("Holdtime", "0"),
                    ("TalkTime", "0"),
                    ("Completed", str(q.completed)),
                    ("Abandoned", str(q.abandoned)),
                    ("ServiceLevel", "60"),
                    ("ServicelevelPerf", "0.0"),
                    ("ServicelevelPerf2", "0.0"),
                    ("Weight", "0"),
                ],
            )
            items += 1
            for member in q.members.values():
                if only_member and only_member not in (member.interface, member.name, member.state_interface):
                    continue
                h = member.headers()
                h[1] = ("Name", member.name)
                h[2] = ("Location", member.interface)
                s.list_event(m, "QueueMember", [x for x in h if x[0] not in ("Ringinuse",)])
                items += 1
            for pos, chan_name in enumerate(q.callers, start=1):
                ch = self.model.channels.get(chan_name)
                if ch is None:
                    continue
                s.list_event(
                    m,
                    "QueueEntry",
                    [
                        ("Queue", q.name),
                        ("Position", str(pos)),
                        ("Channel", ch.name),
                        ("Uniqueid", ch.snapshot.get("Uniqueid", "")),
                        ("CallerIDNum", ch.snapshot.get("CallerIDNum", "")),
                        ("CallerIDName", ch.snapshot.get("CallerIDName", "")),
                        ("ConnectedLineNum", ch.snapshot.get("ConnectedLineNum", "")),
                        ("ConnectedLineName", ch.snapshot.get("ConnectedLineName", "")),
                        ("Wait", str(int(time.monotonic() - ch.created))),
                        ("Priority", "0"),
                    ],
                )
                items += 1
        s.list_event(m, "QueueStatusComplete", [("EventList", "Complete"), ("ListItems", str(items))])

    def _act_queuesummary(self, s: _Session, m: AmiMessage) -> None:
        only_queue = m.get("Queue")
        s.success(m, "Queue summary will follow", ("EventList", "start"))
        items = 0
        for q in self.model.queues.values():
            if only_queue and q.name != only_queue:
                continue
            members = list(q.members.values())
            s.list_event(
                m,
                "QueueSummary",
                [
                    ("Queue", q.name),
                    ("LoggedIn", str(len(members))),
                    ("Available", str(sum(1 for x in members if not x.paused and x.status == 1))),
                    ("Callers", str(len(q.callers))),
                    ("HoldTime", "0"),
                    ("TalkTime", "0"),
                    ("LongestHoldTime", "0"),
                ],
            )
            items += 1
        s.list_event(m, "QueueSummaryComplete", [("EventList", "Complete"), ("ListItems", str(items))])

    def _act_queuepause(self, s: _Session, m: AmiMessage) -> None:
        interface = m.get("Interface")
        paused = m.get("Paused")
        if not interface or paused is None:
            s.error(m, "Need 'Interface' and 'Paused' parameters.")
            return
        members = self.model.find_members(interface, m.get("Queue"))
        if not members:
            s.error(m, "Interface not found")
            return
        pause = _truthy(paused)
        reason = m.get("Reason") or ""
        s.success(m, "Interface paused successfully" if pause else "Interface unpaused successfully")
        for member in members:
            member.paused = pause
            member.paused_reason = reason if pause else ""
            if pause:
                member.last_pause = int(time.time())
            self.broadcast(
                event("QueueMemberPause", "agent,all", member.headers(legacy_reason=self.model.legacy_pause_reason))
            )

    def _act_queueadd(self, s: _Session, m: AmiMessage) -> None:
        queue, interface = m.get("Queue"), m.get("Interface")
        if not queue or not interface:
            s.error(m, "'Queue' and 'Interface' not specified.")
            return
        if self.model.find_members(interface, queue):
            s.error(m, "Unable to add interface: Already there")
            return
        line = interface.split("/", 1)[-1].split("@", 1)[0]
        member = self.model.add_member(queue, line, name=m.get("MemberName"), paused=_truthy(m.get("Paused")))
        member.interface = interface if "/" in interface else member.interface
        member.membership = "dynamic"
        if m.get("Penalty", "").isdigit():  # type: ignore[union-attr]
            member.penalty = int(m["Penalty"])
        s.success(m, "Added interface to queue")
        self.broadcast(event("QueueMemberAdded", "agent,all", member.headers()))

    def _act_queueremove(self, s: _Session, m: AmiMessage) -> None:
        queue, interface = m.get("Queue"), m.get("Interface")
        if not queue or not interface:
            s.error(m, "Need 'Queue' and 'Interface' parameters.")
            return
        members = self.model.find_members(interface, queue)
        if not members:
            s.error(m, "Unable to remove interface: Not there")
            return
        for member in members:
            self.model.queues[queue].members.pop(member.interface, None)
            self.broadcast(event("QueueMemberRemoved", "agent,all", member.headers()))
        s.success(m, "Removed interface from queue")

    # ---- connections -------------------------------------------------------------------------------
    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = _Session(self, reader, writer)
        self._sessions.add(session)
        self.metrics.connections.inc()
        log.info("conn=%s: connected", session.peer)
        await session.run()

    async def _on_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        status, body = 500, {"error": "internal"}
        try:
            async with asyncio.timeout(5):
                request_line = await reader.readline()
            method, path, *_ = request_line.decode("latin-1").split() + ["", ""]
            length = 0
            while True:
                async with asyncio.timeout(5):
                    header = await reader.readline()
                if header in (b"\r\n", b"\n", b""):
                    break
                name, _, value = header.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if length > 65536:
                raise ValueError("body too large")
            raw = b""
            if length:
                async with asyncio.timeout(5):
                    raw = await reader.readexactly(length)
            payload = json.loads(raw) if raw.strip() else {}
            if not isinstance(payload, dict):
                raise ValueError("JSON body must be an object")
            if method.upper() == "GET" and path.split("?", 1)[0] == "/metrics":
                self.metrics.clients.set(len(self._sessions))
                self.metrics.calls.set(len(self.model.calls))
                text = self.metrics.render()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                    + f"Content-Length: {len(text)}\r\nConnection: close\r\n\r\n".encode()
                    + text
                )
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                writer.close()
                return
            status, body = self._control_request(method.upper(), path.split("?", 1)[0], payload)
        except (ValueError, ScenarioError, KeyError) as exc:
            status, body = 400, {"error": str(exc)}
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            writer.close()
            return
        data = json.dumps(body).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}"
            f"\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    def _control_request(self, method: str, path: str, payload: dict[str, Any]) -> tuple[int, Any]:
        if method == "GET" and path == "/health":
            return 200, {"ok": True, "clients": len(self._sessions), "calls": len(self.model.calls)}
        if method == "GET" and path == "/scenarios":
            return 200, {"scenarios": self.scenario_names()}
        if method == "GET" and path == "/calls":
            return 200, {
                "live": [c.to_json() for c in self.model.calls.values()],
                "finished": [c.to_json() for c in self.model.finished],
            }
        if method == "GET" and path == "/channels":
            return 200, {
                "channels": [
                    {**c.snapshot, "BridgeId": c.bridge, "Application": c.application, "call": c.call_id}
                    for c in self.model.channels.values()
                ]
            }
        if method == "GET" and path == "/queues":
            return 200, {
                q.name: {"members": [dict(mm.headers()) for mm in q.members.values()], "callers": q.callers}
                for q in self.model.queues.values()
            }
        if method == "POST" and path == "/play":
            name = payload.get("scenario")
            if not isinstance(name, str):
                raise ValueError("'scenario' (a name) is required")
            variables = payload.get("vars") or {}
            if not isinstance(variables, dict):
                raise ValueError("'vars' must be an object")
            tech = payload.get("tech")
            call = self.start_play(
                name, {str(k): str(v) for k, v in variables.items()}, tech=tech if isinstance(tech, str) else None
            )
            return 200, {"linkedid": call.id, "channels": call.planned, "call": call.to_json()}
        if method == "POST" and path == "/restart":
            down_for = float(payload.get("down_for", 0.0))
            if not 0 <= down_for <= 600:
                raise ValueError("'down_for' must be between 0 and 600 seconds")
            self._restart_task = asyncio.get_running_loop().create_task(self.restart(down_for))
            return 200, {"restarting": True, "down_for": down_for}
        if method == "POST" and path == "/hangup-all":
            return 200, {"hungup": self.hangup_all()}
        if method == "POST" and path == "/hangup":
            target = payload.get("channel")
            channel = self.model.channels.get(str(target)) if target else None
            if channel is None and payload.get("linkedid"):
                chans = self.model.call_channels(str(payload["linkedid"]))
                channel = chans[0] if chans else None
            if channel is None:
                return 404, {"error": "no such channel or call"}
            self._hangup(channel, str(payload.get("cause", "16")))
            return 200, {"hungup": channel.name}
        return 404, {"error": f"no route {method} {path}"}
