"""One Creatio client connection as a sans-I/O state machine.

Theory of operation
-------------------
The I/O shell owns the WebSocket, RabbitMQ and Redis. It feeds this object what happened
(``on_text``, ``on_line_event``, ``on_snapshot``, ``on_command_result``, ``on_disconnect``)
and carries out what it asks through :class:`SessionEnvironment` (send a frame, claim or
release a line, fetch a snapshot, submit a command, close). Nothing here blocks, awaits
or raises on bad input: a bad frame becomes an ERROR frame.

States::

    NEW --LoadLibrary--> LIBRARY --OpenConnection--> OPEN --CloseConnection--> LIBRARY
     \\________________________\\_________________________\\--on_disconnect--> CLOSED

Rules, from the client's source (docs/creatio-protocol.md has the details):

1. LoadLibrary is answered with LIBRARY_INITIALIZED, whose content the client keeps raw as
   its library instance uid; every such answer makes the client send OpenConnection.
2. OpenConnection carries ``connectionParams`` (JSON in JSON). ``ExtensionName`` is the
   line. The answer is CONNECTION_CREATED with the connection uid *in the envelope*; the
   client then asks for QueryActiveCallSnapshot. A repeated OpenConnection for the same
   line is answered again without claiming the line twice.
3. Commands other than LoadLibrary/OpenConnection need an open connection.
4. Call commands name the call by the GUID we gave it; the session keeps the calls of its
   line (from the snapshot and from events) keyed by that GUID and refuses calls it does
   not know. The same table decides the HoldCall toggle (the client sends HoldCall for
   both hold and unhold) and the snapshot's CurrentCall (the oldest active call, as the
   client keeps its first call current while consulting).
5. ``commandUId`` is always empty, so results cannot be correlated by the client: a
   failed command is reported as an ERROR frame with the gateway's message, a success
   is silent (the call events tell the story).
6. Catch-up after a reconnect. Claiming the line starts a *catch-up*: the shell follows the
   line, reads where this agent stood when it left (``services.delivery_log``) and the line's
   history since, and calls :meth:`AgentSession.on_claimed` exactly once. Until then live
   events are held back (in order) and a snapshot request waits, so the client sees the live
   events that came meanwhile, then the snapshot it asked for: the calls live now, in their
   current state. Calls that rang and ended during the gap are *not* replayed (Creatio would
   show each as a new incoming call); they are in Creatio's call records. With
   ``SessionOptions.replay_missed_calls`` they are sent first (RING_STARTED ... RING_FINISHED).
   A connection whose stream broke while it stayed open is still repaired event by event
   (``ws_node.line_feed``): that is not a reconnect.
7. ``debugMode`` in ``connectionParams`` logs this session's traffic (both ways), and only this
   session's, when the administrator allowed debugging for this user (``Security.users[].debug``);
   the lines are bounded per user in number and length (:class:`DebugBudget`).
8. The dialplan context comes from the administrator: the user's ``originateContext`` in the
   Security block, else ``connectionParams.OriginateContext`` if the server allows it
   (``services.line_access.originate_context_refusal``, the gateway's own check), else the server's default,
   which is not sent (the gateway owns it). A context the server does not allow is reported at
   OpenConnection and refuses every dialling command.
9. Who may open a line is decided by the shell (``services.line_access``); a refusal arrives as
   :meth:`AgentSession.on_line_refused`: an ERROR, a DISCONNECTED without reconnect, nothing of the
   line was sent.
10. Restatements are not news. After a gateway restart the new epoch announces every live call
    again (RING_STARTED or COMMUTATION_STARTED, same call id); for a call this session already
    *announced* in that state (sent that very event), or showed in that state in a snapshot of an
    earlier epoch, the call is updated silently, since the client pops up every RING_STARTED. A call
    seen in a snapshot of the event's own epoch was not announced yet: the line's state in Redis is
    written before the event is published, so a snapshot can show a call whose RING_STARTED is still
    on its way (always so for calls that start while the broker is away), and that RING_STARTED is
    news: it pops the call up.
11. Agent states (``services.agent_states``). SetMsgUserState codes map to unpause / wrap-up / pause
    with the code's reason; states are reported as the code the gateway decided (kept with the
    agent state in Redis). Creatio's header re-sends the state saved in the user's profile on every
    connect. With ``onConnect: "pbx"`` (the default) the first SetMsgUserState within
    ``PROFILE_STATE_WINDOW`` seconds of OpenConnection is taken as that re-send: when the PBX's
    state was last changed by the PBX side (a supervisor's QueueMemberPause, ``set_by == "pbx"``)
    and differs, the PBX wins and its state is reported back (a stale "Paused" must not re-pause an
    agent a supervisor unpaused); otherwise it is carried out. Later choices are always carried
    out. With ``"profile"`` the re-sent state is always carried out.
12. ProcessLogs / SetLogFilePath (Creatio: "start processing logs", "the file from which logs will be
    processed", i.e. CMS replaying a recorded PBX log) are refused with ERROR(4), open or not: a browser
    must not make the cluster replay calls, and nothing a client sends is written to a file.
13. A call ends once. After this session sent a leg's RING_FINISHED, nothing more of that leg's story (ring,
    answer, hold, busy, end, info; same call id, one of its channels) is sent, and a snapshot that still lists
    it leaves it out (its record's CALL_SAVED, which often comes after the end, still goes): a takeover
    without an earlier term publishes whole the calls it cannot prove were published
    (``ami_gateway.takeover``), and right after a Redis stall a snapshot may be read from a Redis that
    lags what the broker delivered. Either would pop an ended call up again. A new leg of the call on
    this line has a new channel, and rings.
14. A snapshot the shell read from a store behind the events this session was sent (Redis stalled, or a
    term fenced before its writes landed) does not take the panel back: calls the session knows from
    events are shown as the events left them, and calls it was told of after the snapshot's position
    stay. Otherwise a talking call would show as ringing again, and the next term's restatement of it
    would be news.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from services.config import AsteriskConfig
from services.delivery_log import AgentKey, clean_id
from services.line_access import CONTEXT_RE, SecurityConfig, originate_context_refusal
from services.wire import (
    AgentState,
    Call,
    CallArgs,
    CallState,
    Command,
    CommandArgs,
    CommandName,
    CommandResult,
    DialArgs,
    DndArgs,
    DndMode,
    DtmfArgs,
    EventType,
    LineEvent,
    NoArgs,
    PauseArgs,
    RecordOwnerArgs,
    StreamPosition,
    TransferArgs,
    TransferPairArgs,
    WrapUpArgs,
)
from ws_node import creatio_protocol as cp
from ws_node.admission import CONTEXT_REFUSED, DEBUG_REFUSED, DebugBudget
from ws_node.creatio_protocol import CtiCommand, MsgErrorType, ProtocolError

log = logging.getLogger(__name__)


class SessionEnvironment(Protocol):
    """What the I/O shell does for a session."""

    def send_frame(self, text: str) -> None: ...

    def claim_line(self, session: AgentSession, line: str) -> None: ...

    def release_line(self, session: AgentSession, line: str) -> None: ...

    def request_snapshot(self, session: AgentSession, line: str) -> None: ...

    def request_agent_state(self, session: AgentSession, line: str) -> None: ...

    def submit_command(self, session: AgentSession, command: Command) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


class SessionState(enum.Enum):
    NEW = "new"
    LIBRARY = "library"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SessionOptions:
    max_message_bytes: int = 64 * 1024
    agent_codes: cp.AgentStateCodes = cp.DEFAULT_AGENT_CODES
    #: longest line name accepted from ``connectionParams.ExtensionName``
    max_line_length: int = 32
    #: channel technologies of the lines (the Asterisk block's ``protocol``): ExtensionName may be
    #: ``305`` or ``<tech>/305`` with one of these, as admins type it in Creatio's Call Centre parameters
    line_protocols: tuple[str, ...] = ("SIP",)
    #: live events held back while a catch-up runs; past this the catch-up is given up
    max_held_events: int = 1000
    #: which dialplan contexts an agent may use: originateContext and allowedOriginateContexts (rule 8)
    asterisk: AsteriskConfig = AsteriskConfig()
    #: per-user settings from the administrator: line, context, debugging
    security: SecurityConfig = SecurityConfig()
    #: node-wide, shared by every session: bounds each user's debug lines
    debug_budget: DebugBudget | None = None
    #: after a reconnect, replay the calls that rang and ended while the agent was away (RING_STARTED ...
    #: RING_FINISHED). Off: Creatio shows each replayed ring as a new incoming call (notification, panel
    #: switch, a history entry stamped with the replay time); the saved call records are the history.
    replay_missed_calls: bool = False


class FrameMemo:
    """Optional node-wide memo of encoded line-event frames.

    Every tab of a line receives the same event and, with the same view of the line,
    would encode the same frames; one memo per node makes that happen once. The key is
    the event's stream position plus the calls that shape the output, so it is only used
    for positioned events (non-empty epoch).
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self._max = max_entries
        self._entries: OrderedDict[tuple[Any, ...], list[str]] = OrderedDict()

    def get_or_build(self, key: tuple[Any, ...], build: Callable[[], list[str]]) -> list[str]:
        frames = self._entries.get(key)
        if frames is None:
            frames = build()
            self._entries[key] = frames
            if len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return frames


#: rule 8: how long after OpenConnection a SetMsgUserState counts as the header re-sending the profile's state
PROFILE_STATE_WINDOW = 15.0

_LINE_RE = re.compile(r"[A-Za-z0-9_-]+")
_TARGET_RE = re.compile(r"[0-9A-Za-z+*#_]{1,64}")
_DTMF_RE = re.compile(r"[0-9A-Da-d*#]{1,32}")

_CALL_CENTRE_COMMANDS = frozenset(
    {CtiCommand.SET_MSG_USER_STATE, CtiCommand.QUERY_MSG_USER_STATE, CtiCommand.SET_WRAP_UP_USER_STATE}
)
_NOT_IMPLEMENTED = frozenset(
    {
        CtiCommand.HOOKUP,
        CtiCommand.SETUP_TRANSFER_CALL,
        CtiCommand.REGISTER_CONNECTION_SESSION,
        CtiCommand.POST_RAW_DATA,
        CtiCommand.LIBRARY_SPECIFIC_SERVICE,
    }
)
#: Creatio defines ProcessLogs as "start processing logs" and SetLogFilePath as "the file from which logs will be
#: processed": CMS replaying a recorded PBX log as if it were live. Taking that from a browser would let any
#: agent inject fake calls into every agent's panel on a live PBX, and the admin's way to replay a capture is
#: the gateway's own Asterisk.filePath; so both are refused, and nothing a client sends is ever written to a file.
_LOG_REPLAY = frozenset({CtiCommand.PROCESS_LOGS, CtiCommand.SET_LOG_FILE_PATH})
_LOG_REPLAY_REFUSAL = (
    "{name} is refused: replaying PBX logs from the CRM is not allowed on this server "
    "(an administrator replays a capture with the gateway's Asterisk.filePath instead)"
)

#: Events of a gap worth replaying: what a call went through. Not CALL_INFO_CHANGED (the client
#: matches it by databaseUId, which could pick the wrong call), not DTMF or agent state (the
#: snapshot that follows carries the agent state; past digits mean nothing).
_REPLAYED = frozenset(
    {
        EventType.RING_STARTED,
        EventType.COMMUTATION_STARTED,
        EventType.HOLD_STARTED,
        EventType.HOLD_ENDED,
        EventType.ABONENT_BUSY,
        EventType.RING_FINISHED,
    }
)


class _Refused(Exception):
    """Internal: a command that is answered with an ERROR frame."""

    def __init__(self, error_type: MsgErrorType, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


_DEFAULT_OPTIONS = SessionOptions()
#: call events that only make sense for a call the client shows (rule 10): the rest announce one
_ABOUT_A_SHOWN_CALL = frozenset({
    EventType.RING_FINISHED, EventType.ABONENT_BUSY, EventType.HOLD_STARTED, EventType.HOLD_ENDED,
    EventType.CALL_INFO_CHANGED,
})
#: rule 13: what a call goes through, which ends with its RING_FINISHED (its record's CALL_SAVED may come after)
_A_CALLS_STORY = _ABOUT_A_SHOWN_CALL | {EventType.RING_STARTED, EventType.COMMUTATION_STARTED}
#: rule 10: announced calls remembered per session (a line has a handful of live calls)
_MAX_ANNOUNCED = 64
#: rule 13: ended calls remembered per session (a repeat comes within seconds of the end: a takeover's
#: publication, a snapshot read from a Redis that lags the broker)
_MAX_FINISHED = 32


class AgentSession:
    # One per agent connection, thousands per node: no per-instance dict.
    __slots__ = (
        "_env", "_opts", "_memo", "_clock", "_new_id", "state", "library_instance_uid", "connection_uid", "line",
        "debug_mode", "call_centre_enabled", "user_uid", "_calls",
        "_agent", "_catching_up", "_held", "_snapshot_wanted", "replayed", "_context_override",
        "_context_refusal", "_announced", "_agent_known", "_profile_state_until", "_deferred_state", "_finished",
    )

    def __init__(
        self,
        env: SessionEnvironment,
        *,
        options: SessionOptions | None = None,
        frame_memo: FrameMemo | None = None,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self._env = env
        self._opts = options or _DEFAULT_OPTIONS
        self._memo = frame_memo
        self._clock = clock
        self._new_id = new_id
        self.state = SessionState.NEW
        self.library_instance_uid = ""
        self.connection_uid = ""
        self.line: str | None = None
        #: the user's own context, sent with dialling commands; "" = the gateway's originateContext (rule 8)
        self._context_override = ""
        self._context_refusal: str | None = None
        self.debug_mode = False
        self.call_centre_enabled = True
        self.user_uid = ""
        #: calls of the line, client GUID -> Call, oldest first (a dict keeps insertion order)
        self._calls: dict[str, Call] = {}
        #: rule 10: client GUID -> (call state the client was shown, epoch of the snapshot that showed it,
        #: "" when an event announced it)
        #: (a dict keeps its order: oldest first; made on first use, thousands of sessions per node are idle)
        self._announced: dict[str, tuple[CallState, str]] | None = None
        #: rule 13: calls whose RING_FINISHED this session sent, client GUID -> the leg's channels (one or two
        #: names: a tuple, 48-56 bytes, where a frozenset took 216 - 32 of them in each of thousands of
        #: sessions); made on the first end (most sessions are idle)
        self._finished: dict[str, tuple[str, ...]] | None = None
        self._agent: AgentState | None = None
        #: between claiming the line and ``on_claimed``: live events held back, snapshot waiting
        self._catching_up = False
        self._held: list[LineEvent] = []
        self._snapshot_wanted = False
        #: events replayed at the last catch-up (for tests and logs)
        self.replayed = 0
        #: rule 8: the line's agent state has been read since the line was claimed (it may be None)
        self._agent_known = False
        #: rule 8: until then a SetMsgUserState is taken as the header re-sending the profile's state
        self._profile_state_until = 0.0
        #: rule 8: that re-sent (code, reason), waiting for the line's agent state
        self._deferred_state: tuple[str, str] | None = None

    # ---- introspection ---------------------------------------------------------------

    @property
    def calls(self) -> list[Call]:
        return list(self._calls.values())

    @property
    def agent(self) -> AgentState | None:
        return self._agent

    @property
    def originate_context(self) -> str:
        """Where this user's calls are dialled from (rule 8)."""
        return self._context_override or self._opts.asterisk.originate_context

    @property
    def agent_key(self) -> AgentKey | None:
        """Who this session is, for the delivery log: (line, Creatio user, browser tab)."""
        if self.line is None:
            return None
        return AgentKey(self.line, self.user_uid, self.library_instance_uid)

    @property
    def catching_up(self) -> bool:
        return self._catching_up

    @property
    def current_call(self) -> Call | None:
        for call in self._calls.values():
            if call.active:
                return call
        # a busy call is still the line's call (with Drop) until its RING_FINISHED
        return next(iter(self._calls.values()), None)

    # ---- inputs from the shell ---------------------------------------------------------

    def on_text(self, text: str | bytes) -> None:
        if self.state is SessionState.CLOSED:
            return
        if self.debug_mode:
            self._debug("in", text if isinstance(text, str) else text.decode("utf-8", "replace"))
        try:
            cmd = cp.decode_client_message(text, max_bytes=self._opts.max_message_bytes)
        except ProtocolError as exc:
            log.info("bad client frame conn=%s line=%s: %s", self.connection_uid, self.line, exc.message)
            self._error(exc.error_type, exc.message)
            return
        try:
            self._dispatch(cmd)
        except _Refused as exc:
            log.info("refused %s conn=%s line=%s: %s", cmd.name, self.connection_uid, self.line, exc.message)
            self._error(exc.error_type, exc.message)

    def on_line_event(self, event: LineEvent) -> None:
        if self.state is not SessionState.OPEN or event.line != self.line:
            return
        if self._catching_up:
            if len(self._held) < self._opts.max_held_events:
                self._held.append(event)
                return
            log.warning("catch-up of line %s took too long; live events resume", self.line)
            self._end_catch_up(())
        if event.type is EventType.AGENT_STATE_CHANGED:
            if event.agent is not None:
                self._agent = event.agent
            if not self.call_centre_enabled:
                return
        elif event.call is not None:
            if event.type in _A_CALLS_STORY and self._ended_here(event.call):
                return  # rule 13: a call published again after its end (a takeover), or a late repeat
            if event.type in _ABOUT_A_SHOWN_CALL and not self._shows(event.call):
                # The client has no such call (it ended here already, or was never shown): an end, hold or
                # change of it would be a stray frame, or a second RING_FINISHED of one call. This is what
                # lets a new gateway term publish ends it cannot prove were published (ami_gateway.takeover).
                return
            restated = self._restates(event)
            self._track(event)
            if restated:
                return
            self._note_announced(event)
        frames = self._frames_for(event)
        send = self._send if self.debug_mode else self._env.send_frame
        for frame in frames:
            send(frame)

    def on_snapshot(self, calls: Sequence[Call], agent: AgentState | None = None, *, epoch: str = "",
                    behind: bool = False) -> None:
        """The line's calls (and, if known, agent state) as read by the shell; ``epoch``: the line's
        epoch when they were read (rule 10); ``behind``: read from a store that stands behind the events this
        session was sent (rule 14)."""
        if self.state is not SessionState.OPEN:
            return
        listed = [c for c in calls if c.line == self.line and c.on_line and not self._ended_here(c)]
        if behind:
            known = self._calls
            listed = [known.get(cp.call_guid(c.id), c) for c in listed]
            have = {cp.call_guid(c.id) for c in listed}
            listed += [c for guid, c in known.items() if guid not in have]
        mine = sorted(listed, key=lambda c: c.started_at)
        self._calls = {cp.call_guid(c.id): c for c in mine}
        self._shown_in_snapshot(mine, epoch)
        self._send(cp.snapshot_frame(mine, self.current_call, self.connection_uid))
        if not mine:
            self._send(cp.line_state_frame(cp.IDLE_LINE_FEATURES, connection_uid=self.connection_uid))
        if agent is not None:
            self._agent = agent
            if self.call_centre_enabled:
                self._send_agent_state()
        self._agent_learned()

    def _agent_learned(self) -> None:
        self._agent_known = True
        if self._deferred_state is not None:
            code, reason = self._deferred_state
            self._deferred_state = None
            self._profile_state(code, reason)

    def on_calls_known(self, calls: Sequence[Call], *, epoch: str = "") -> None:
        """Seed the call table (e.g. from the snapshot taken when the line was claimed)
        without telling the client; it asks for its own snapshot after CONNECTION_CREATED."""
        if self.state is not SessionState.OPEN:
            return
        mine = sorted((c for c in calls if c.line == self.line and c.on_line and not self._ended_here(c)),
                      key=lambda c: c.started_at)
        self._calls = {cp.call_guid(c.id): c for c in mine}
        self._shown_in_snapshot(mine, epoch)

    def on_claimed(self, calls: Sequence[Call], missed: Sequence[LineEvent] = (), *, epoch: str = "") -> None:
        """The shell followed the line: ``calls`` are its active calls at position S, ``missed``
        the line's events between where this agent stood when it left and S (empty when nothing
        was missed or it cannot be known). Ends the catch-up (rule 6)."""
        if self.state is not SessionState.OPEN:
            return
        self.on_calls_known(calls, epoch=epoch)
        self._end_catch_up(missed)

    def _end_catch_up(self, missed: Sequence[LineEvent]) -> None:
        if not self._catching_up:
            return
        self._catching_up = False
        held, self._held = self._held, []
        # Without the full replay, a call the agent saw before it left and that ended in the gap still
        # gets its RING_FINISHED: otherwise the panel keeps it ringing. That closes, it announces nothing.
        self.replayed = self._replay(missed, held[0] if held else None,
                                     closing_only=not self._opts.replay_missed_calls)
        for event in held:
            self.on_line_event(event)
        if self._snapshot_wanted:
            self._snapshot_wanted = False
            assert self.line is not None
            self._env.request_snapshot(self, self.line)

    def _replay(self, missed: Sequence[LineEvent], first_live: LineEvent | None, *, closing_only: bool = False) -> int:
        """Send the gap's ended calls. Calls still active are left to the snapshot; events the
        session gets live anyway (from ``first_live`` on) are not sent twice. ``closing_only``: just
        the RING_FINISHED of calls that began before the gap (the agent saw them ring), nothing of
        calls that began and ended inside it (Creatio would pop each up as a new call)."""
        active = {c.id for c in self._calls.values()}
        ended = {
            e.call.id
            for e in missed
            if e.call is not None and e.call.id not in active
        }
        if closing_only:
            # A call whose ring is among the missed events began in the gap, unless that ring is a new term
            # restating a call older than the term (a restarted gateway restates every live call): the agent
            # saw that one ring before it left, and without its end the panel keeps it ringing.
            ended -= {e.call.id for e in missed
                      if e.call is not None and e.type is EventType.RING_STARTED and not _restatement(e)}
        sent = 0
        for event in missed:
            if first_live is not None and event.epoch == first_live.epoch and event.seq >= first_live.seq:
                break
            if event.call is None or event.call.id not in ended or event.type not in _REPLAYED:
                continue
            if closing_only and event.type is not EventType.RING_FINISHED:
                continue
            call = event.call
            if event.type is EventType.RING_FINISHED and call.state is not CallState.FINISHED:
                call = call.evolve(state=CallState.FINISHED)
            frames = cp.line_event_to_frames(
                LineEvent(line=event.line, type=event.type, call=call), self.connection_uid,
                agent_codes=self._opts.agent_codes,
            )
            # only the call event itself: the buttons are set by the snapshot that follows
            self._send(frames[0])
            self._note_announced(LineEvent(line=event.line, type=event.type, call=call))
            sent += 1
        if sent:
            log.info("%s %d missed events conn=%s line=%s user=%s", "closed" if closing_only else "replayed", sent,
                     self.connection_uid, self.line, self.user_uid)
        return sent

    def on_snapshot_failed(self, message: str) -> None:
        """The shell could not read the line's state: tell the client, keep the session."""
        if self.state is not SessionState.OPEN:
            return
        self._error(MsgErrorType.GENERAL_ERROR, message or "active call snapshot unavailable")

    def on_agent_state(self, agent: AgentState | None) -> None:
        """Answer to ``request_agent_state`` (QueryMsgUserState when the state was not known)."""
        if self.state is not SessionState.OPEN:
            return
        if agent is not None and agent.line == self.line:
            self._agent = agent
        if self._agent is not None and self.call_centre_enabled and self._deferred_state is None:
            self._send_agent_state()
        self._agent_learned()

    def on_command_result(self, result: CommandResult, command: Command) -> None:
        if self.state is SessionState.CLOSED or result.ok:
            return
        message = result.error or f"{command.name.value} failed"
        log.info("command failed conn=%s line=%s cmd=%s: %s", self.connection_uid, self.line, command.name, message)
        saving = command.name is CommandName.RECORD_OWNER
        self._error(MsgErrorType.CALL_SAVING_ERROR if saving else MsgErrorType.COMMAND_ERROR, message)

    def on_disconnect(self) -> None:
        if self.state is SessionState.CLOSED:
            return
        if self.debug_mode:
            self._debug("closed", "")
        self._release()
        self.state = SessionState.CLOSED

    # ---- command dispatch --------------------------------------------------------------

    def _dispatch(self, cmd: cp.ClientCommand) -> None:
        name = CtiCommand(cmd.name)
        if name is CtiCommand.LOAD_LIBRARY:
            self._load_library(cmd)
            return
        if name is CtiCommand.OPEN_CONNECTION:
            self._open_connection(cmd)
            return
        if name in _LOG_REPLAY:
            # open or not, the answer is the same: say why rather than "connection is not open"
            raise _Refused(MsgErrorType.COMMAND_NOT_IMPLEMENTED_ERROR, _LOG_REPLAY_REFUSAL.format(name=cmd.name))
        if self.state is not SessionState.OPEN:
            raise _Refused(MsgErrorType.COMMAND_ERROR, f"{cmd.name}: connection is not open")
        if name in _NOT_IMPLEMENTED:
            raise _Refused(MsgErrorType.COMMAND_NOT_IMPLEMENTED_ERROR, f"{cmd.name} is not supported")
        if name in _CALL_CENTRE_COMMANDS and not self.call_centre_enabled:
            # The error type the issue asks for. The stock client never connects a user with
            # disableCallCentre, and on this error it runs its reconnect timer (a fresh
            # connection and snapshot 5 s later), which is harmless.
            raise _Refused(
                MsgErrorType.CALL_CENTRE_NOT_AVAILABLE_ERROR, f"{cmd.name}: call centre is disabled for this user"
            )
        handler = self._handlers[name]
        handler(self, cmd)

    def _load_library(self, cmd: cp.ClientCommand) -> None:
        if not self.library_instance_uid:
            # After a drop the client reconnects with the uid we gave this tab before: keeping
            # it lets the delivery log recognise the tab on any node (rule 6).
            self.library_instance_uid = clean_id(cmd.library_instance_uid) or str(uuid.uuid4())
        if self.state is SessionState.NEW:
            self.state = SessionState.LIBRARY
        self._send(cp.library_initialized_frame(self.library_instance_uid))

    def _open_connection(self, cmd: cp.ClientCommand) -> None:
        params = cmd.params.get("connectionParams") or {}
        line = _get_ci(params, "ExtensionName")
        if not isinstance(line, str) or not line.strip():
            raise _Refused(MsgErrorType.CONNECTION_CONFIG_ERROR, "connectionParams.ExtensionName is missing")
        line = self._line_of(line)
        context = _get_ci(params, "OriginateContext")
        if context is None or context == "":
            context = ""
        elif not isinstance(context, str) or not CONTEXT_RE.fullmatch(context):
            raise _Refused(MsgErrorType.CONNECTION_CONFIG_ERROR, "bad OriginateContext")
        session_params = cmd.params.get("sessionServiceParams") or {}
        user = _get_ci(session_params, "UserUId")
        user_uid = clean_id(user)
        security = self._opts.security

        debug = _truthy(_get_ci(params, "debugMode"))
        if debug and not security.debug_allowed(user_uid, line):
            if not self.debug_mode:
                DEBUG_REFUSED.inc()
                log.info("debugMode refused conn=%s line=%s user=%s: not allowed for this user by the administrator",
                         self.connection_uid, line, user_uid or "-")
            debug = False
        newly_debugging = debug and not self.debug_mode
        self.debug_mode = debug
        self._choose_context(user_uid, line, context)
        self.call_centre_enabled = not _truthy(_get_ci(params, "disableCallCentre"))
        if not self.library_instance_uid:
            self.library_instance_uid = clean_id(cmd.library_instance_uid) or str(uuid.uuid4())
        if self.line != line or self.user_uid != user_uid:
            self._release()
            self.line = line
            self.user_uid = user_uid
            self.connection_uid = cp.connection_uid_for_line(line)
            self.state = SessionState.OPEN
            log.info("connection open conn=%s line=%s user=%s", self.connection_uid, line, self.user_uid)
            self._catching_up = True
            self._agent_known = False
            self._deferred_state = None
            self._profile_state_until = self._clock() + PROFILE_STATE_WINDOW
            self._env.claim_line(self, line)
            self._submit_record_owner(session_params)
        self.state = SessionState.OPEN
        if newly_debugging:
            self._debug("in", json.dumps(cmd.raw, ensure_ascii=False))
        self._send(cp.connection_created_frame(self.connection_uid))
        if self._context_refusal is not None:
            self._error(MsgErrorType.CONNECTION_CONFIG_ERROR, f"OriginateContext: {self._context_refusal}")

    def _choose_context(self, user_uid: str, line: str, requested: str) -> None:
        """Rule 8: the administrator's context for this user, else the browser's if allowed."""
        assignment = self._opts.security.assignment(user_uid, line)
        wanted = (assignment.originate_context if assignment is not None else "") or requested
        default = self._opts.asterisk.originate_context
        self._context_override = wanted if wanted and wanted != default else ""
        self._context_refusal = None
        if self._context_override:
            self._context_refusal = originate_context_refusal(self._context_override, self._opts.asterisk)
            if self._context_refusal is not None:
                CONTEXT_REFUSED.inc()
                log.warning("OriginateContext refused conn=%s line=%s user=%s: %r is not allowed",
                            self.connection_uid, line, user_uid or "-", self._context_override)

    def on_line_refused(self, line: str, message: str) -> None:
        """The shell refused this user the line (rule 9): nothing of it was sent, nothing is kept."""
        if self.state is not SessionState.OPEN or self.line != line:
            return
        uid = self.connection_uid
        self.line = None
        self._calls.clear()
        self._announced = None
        self._finished = None
        self._agent = None
        self._catching_up = False
        self._held = []
        self._snapshot_wanted = False
        self.state = SessionState.LIBRARY
        self._error(MsgErrorType.CONNECTION_CONFIG_ERROR, message)
        self._send(cp.disconnected_frame("LineRefused", connection_uid=uid, reconnect=False))

    def _submit_record_owner(self, session_params: Any) -> None:
        """Whose calls these are and which site keeps them: the gateway saves the line's calls for this
        contact (its CallRecords block decides whether, and which site is trusted)."""
        contact = _get_ci(session_params, "UserContactUId")
        if not isinstance(contact, str) or not contact.strip():
            return
        service_url = _get_ci(session_params, "ServiceUrl")
        assert self.line is not None
        args = RecordOwnerArgs(
            contact=contact.strip()[:64],
            service_url=service_url.strip()[:512] if isinstance(service_url, str) else "",
            user=self.user_uid,
        )
        # Not the agent's command: its own id space, so the agent's command ids stay as they were.
        command = Command(id=uuid.uuid4().hex, line=self.line, name=CommandName.RECORD_OWNER, args=args,
                          issued_at=self._clock())
        self._env.submit_command(self, command)

    def _line_of(self, extension: str) -> str:
        """``305``, ``SIP/305``, ``PJSIP/305`` (the technology must be a configured one), trimmed -> ``305``."""
        text = extension.strip()
        techs = self._opts.line_protocols
        allowed = f"the line number (e.g. 305) or {' or '.join(f'{t}/305' for t in techs)}"
        if "/" in text:
            tech, _, text = text.partition("/")
            tech, text = tech.strip(), text.strip()
            if tech.upper() not in (t.upper() for t in techs):
                raise _Refused(MsgErrorType.CONNECTION_CONFIG_ERROR,
                               f"ExtensionName {extension.strip()[:40]!r}: {tech[:12]!r} is not this PBX's channel "
                               f"technology; use {allowed}")
        if not text or len(text) > self._opts.max_line_length or not _LINE_RE.fullmatch(text):
            raise _Refused(MsgErrorType.CONNECTION_CONFIG_ERROR,
                           f"bad ExtensionName {extension.strip()[:40]!r}: use {allowed}")
        return text

    def _close_connection(self, cmd: cp.ClientCommand) -> None:
        uid = self.connection_uid
        self._release()
        self.state = SessionState.LIBRARY
        # ignoreTryReconnection: CloseConnection is sent on logout; the panel must not retry.
        self._send(cp.disconnected_frame("CloseConnection", connection_uid=uid, reconnect=False))

    def _make_call(self, cmd: cp.ClientCommand) -> None:
        target = self._target(cmd)
        self._submit(CommandName.MAKE_CALL, DialArgs(target, context=self._context_for(CommandName.MAKE_CALL)))

    def _answer(self, cmd: cp.ClientCommand) -> None:
        call = self._executor_call(cmd)
        if call.state is not CallState.RINGING:
            raise _Refused(MsgErrorType.COMMAND_ERROR, "AnswerCall: the call is not ringing")
        self._submit(CommandName.ANSWER, CallArgs(call.id))

    def _hold_toggle(self, cmd: cp.ClientCommand) -> None:
        call = self._executor_call(cmd)
        if call.state is CallState.HELD:
            self._submit(CommandName.UNHOLD, CallArgs(call.id))
        elif call.state is CallState.CONNECTED:
            self._submit(CommandName.HOLD, CallArgs(call.id))
        else:
            raise _Refused(MsgErrorType.COMMAND_ERROR, "HoldCall: the call is neither connected nor held")

    def _drop(self, cmd: cp.ClientCommand) -> None:
        call = self._executor_call(cmd)
        self._submit(CommandName.HANGUP, CallArgs(call.id))

    def _blind_transfer(self, cmd: cp.ClientCommand) -> None:
        call = self._executor_call(cmd)
        target = self._target(cmd)
        self._submit(CommandName.BLIND_TRANSFER,
                     TransferArgs(target, call.id, context=self._context_for(CommandName.BLIND_TRANSFER)))

    def _consult(self, cmd: cp.ClientCommand) -> None:
        call = self._executor_call(cmd)
        target = self._target(cmd)
        self._submit(CommandName.CONSULT_CALL,
                     TransferArgs(target, call.id, context=self._context_for(CommandName.CONSULT_CALL)))

    def _transfer(self, cmd: cp.ClientCommand) -> None:
        call = self._executor_call(cmd)
        consult = self._call_param(cmd, "consultationCall")
        if consult.id == call.id:
            raise _Refused(MsgErrorType.COMMAND_ERROR, "TransferCall: consultation call is the call itself")
        self._submit(CommandName.COMPLETE_TRANSFER, TransferPairArgs(call.id, consult.id))

    def _cancel_transfer(self, cmd: cp.ClientCommand) -> None:
        call = self._call_param(cmd, "currentCall")
        consult = self._call_param(cmd, "consultCall")
        if consult.id == call.id:
            raise _Refused(MsgErrorType.COMMAND_ERROR, "CancelTransfer: consultation call is the call itself")
        self._submit(CommandName.CANCEL_TRANSFER, TransferPairArgs(call.id, consult.id))

    def _dtmf(self, cmd: cp.ClientCommand) -> None:
        call = self._executor_call(cmd)
        digits = cmd.params.get("digits")
        if isinstance(digits, int) and not isinstance(digits, bool):
            digits = str(digits)
        if not isinstance(digits, str) or not _DTMF_RE.fullmatch(digits):
            raise _Refused(MsgErrorType.COMMAND_ERROR, "SendDtmf: bad digits")
        self._submit(CommandName.DTMF, DtmfArgs(digits, call.id))

    def _set_dnd(self, cmd: cp.ClientCommand) -> None:
        # The client sends no parameter: SetDnd is a toggle, as with TAPI.
        self._submit(CommandName.SET_DND, DndArgs(DndMode.TOGGLE))

    def _query_line_state(self, cmd: cp.ClientCommand) -> None:
        current = self.current_call
        if current is None:
            frame = cp.line_state_frame(cp.IDLE_LINE_FEATURES, connection_uid=self.connection_uid)
        else:
            consulting = sum(1 for c in self._calls.values() if c.active) > 1
            frame = cp.line_state_frame(
                cp.call_features(current, consulting=consulting),
                connection_uid=self.connection_uid,
                call_id=cp.call_guid(current.id),
            )
        self._send(frame)

    def _query_snapshot(self, cmd: cp.ClientCommand) -> None:
        assert self.line is not None
        if self._catching_up:
            self._snapshot_wanted = True  # answered once the gap is replayed (rule 6)
            return
        self._env.request_snapshot(self, self.line)

    def _set_user_state(self, cmd: cp.ClientCommand) -> None:
        code = cmd.params.get("code")
        reason = cmd.params.get("reason")
        if not isinstance(code, str) or not code or len(code) > 100:
            raise _Refused(MsgErrorType.COMMAND_ERROR, "SetMsgUserState: bad code")
        reason = reason if isinstance(reason, str) else ""
        if self._opts.agent_codes.on_connect == "pbx" and self._clock() < self._profile_state_until:
            self._profile_state_until = 0.0
            if not self._agent_known:
                self._deferred_state = (code, reason)
                assert self.line is not None
                self._env.request_agent_state(self, self.line)
                return
            self._profile_state(code, reason)
            return
        self._carry_out_state(code, reason)

    def _profile_state(self, code: str, reason: str) -> None:
        """Rule 8: the state the header re-sends on connect, against what the PBX says now."""
        codes = self._opts.agent_codes
        agent = self._agent
        if agent is None or not agent.queues or agent.set_by != "pbx" or codes.code_for(agent) == code:
            # the PBX has nothing to say, or its state is the agent's own last choice (or not known to be
            # anyone else's): the re-sent state is carried out
            self._carry_out_state(code, reason)
            return
        log.info("line %s: profile state %r not applied on connect: the PBX changed it to %r since "
                 "(onConnect=pbx)", self.line, code, codes.code_for(agent))
        if self.call_centre_enabled:
            self._send_agent_state()

    def _carry_out_state(self, code: str, reason: str) -> None:
        codes = self._opts.agent_codes
        if codes.is_ready(code):
            self._submit(CommandName.AGENT_UNPAUSE, NoArgs())
        elif codes.is_wrap_up(code):
            self._submit(CommandName.WRAP_UP, WrapUpArgs(active=True))
        else:
            self._submit(CommandName.AGENT_PAUSE, PauseArgs(codes.reason_for(code, reason)[:200], state_code=code))

    def _set_wrap_up(self, cmd: cp.ClientCommand) -> None:
        active = cmd.params.get("isWrapUpActive")
        if not isinstance(active, bool):
            raise _Refused(MsgErrorType.COMMAND_ERROR, "SetWrapUpUserState: isWrapUpActive must be a boolean")
        self._submit(CommandName.WRAP_UP, WrapUpArgs(active=active))

    def _query_user_state(self, cmd: cp.ClientCommand) -> None:
        if self._agent is not None:
            self._send_agent_state()
            return
        # Not known to this session yet: the gateway keeps it in Redis. If Redis does not know
        # either (the line is in no queue), nothing is sent rather than a guess.
        assert self.line is not None
        self._env.request_agent_state(self, self.line)

    _handlers: dict[CtiCommand, Callable[[AgentSession, cp.ClientCommand], None]] = {
        CtiCommand.CLOSE_CONNECTION: _close_connection,
        CtiCommand.MAKE_CALL: _make_call,
        CtiCommand.ANSWER_CALL: _answer,
        CtiCommand.HOLD_CALL: _hold_toggle,
        CtiCommand.DROP_CALL: _drop,
        CtiCommand.BLIND_TRANSFER_CALL: _blind_transfer,
        CtiCommand.MAKE_CONSULT_CALL: _consult,
        CtiCommand.TRANSFER_CALL: _transfer,
        CtiCommand.CANCEL_TRANSFER: _cancel_transfer,
        CtiCommand.SEND_DTMF: _dtmf,
        CtiCommand.SET_DND: _set_dnd,
        CtiCommand.QUERY_LINE_STATE: _query_line_state,
        CtiCommand.QUERY_ACTIVE_CALL_SNAPSHOT: _query_snapshot,
        CtiCommand.SET_MSG_USER_STATE: _set_user_state,
        CtiCommand.SET_WRAP_UP_USER_STATE: _set_wrap_up,
        CtiCommand.QUERY_MSG_USER_STATE: _query_user_state,
    }

    # ---- helpers -----------------------------------------------------------------------

    def _submit(self, name: CommandName, args: CommandArgs) -> None:
        assert self.line is not None
        command = Command(id=self._new_id(), line=self.line, name=name, args=args, issued_at=self._clock())
        if self.debug_mode:
            self._debug("command", command.encode().decode())
        else:
            log.debug("submit conn=%s line=%s cmd=%s args=%s", self.connection_uid, self.line, name, args)
        self._env.submit_command(self, command)

    def _context_for(self, name: CommandName) -> str:
        """The user's own context for a dialling command ("" = the gateway's default); rule 8."""
        if self._context_refusal is not None:
            raise _Refused(MsgErrorType.COMMAND_ERROR, f"{name.value}: {self._context_refusal}")
        return self._context_override

    def _target(self, cmd: cp.ClientCommand) -> str:
        target = cmd.params.get("targetAddress")
        if isinstance(target, int) and not isinstance(target, bool):
            target = str(target)
        if not isinstance(target, str):
            raise _Refused(MsgErrorType.COMMAND_ERROR, f"{cmd.name}: targetAddress is missing")
        # The panel passes what the user typed or clicked: "+7 (495) 123-45-67" and the like.
        cleaned = re.sub(r"[\s().-]", "", target)
        if not _TARGET_RE.fullmatch(cleaned):
            raise _Refused(MsgErrorType.COMMAND_ERROR, f"{cmd.name}: bad targetAddress")
        return cleaned

    def _lookup(self, guid: Any, what: str) -> Call:
        call = self._calls.get(guid) if isinstance(guid, str) else None
        if call is None:
            raise _Refused(MsgErrorType.COMMAND_ERROR, f"{what}: unknown call")
        return call

    def _executor_call(self, cmd: cp.ClientCommand) -> Call:
        guid: Any = cmd.executor_id
        if not guid and cmd.executor is not None:
            guid = cmd.executor.get("id")
        return self._lookup(guid, cmd.name)

    def _call_param(self, cmd: cp.ClientCommand, key: str) -> Call:
        obj = cmd.params.get(key)
        if not isinstance(obj, dict):
            raise _Refused(MsgErrorType.COMMAND_ERROR, f"{cmd.name}: {key} is missing")
        return self._lookup(obj.get("id"), f"{cmd.name} {key}")

    def _restates(self, event: LineEvent) -> bool:
        """Whether ``event`` announces a call this session already announced in that very state.

        The tracker announces each call (RING_STARTED, COMMUTATION_STARTED) at most once, so
        this only happens when a restarted gateway restates its live calls in a new epoch. The
        client must not get them again: every RING_STARTED pops the call up as new (rule 10).
        What a snapshot showed does not count (rule 10): it may be ahead of the events."""
        if event.type not in (EventType.RING_STARTED, EventType.COMMUTATION_STARTED) or event.call is None:
            return False
        shown = self._announced.get(cp.call_guid(event.call.id)) if self._announced else None
        if shown is None or shown[0] is not event.call.state:
            return False
        # an unknown epoch on either side counts as later: the conservative answer for rule 10 is silence
        return not shown[1] or not event.epoch or event.position.newer_epoch_than(StreamPosition(shown[1]))

    def _shows(self, call: Call) -> bool:
        guid = cp.call_guid(call.id)
        return guid in self._calls or (self._announced is not None and guid in self._announced)

    def _note_announced(self, event: LineEvent) -> None:
        call = event.call
        assert call is not None
        guid = cp.call_guid(call.id)
        if event.type is EventType.RING_FINISHED or call.state is CallState.FINISHED:
            if self._announced:
                self._announced.pop(guid, None)
            return
        self._remember_shown(guid, call.state, "")

    def _remember_shown(self, guid: str, state: CallState, snapshot_epoch: str) -> None:
        if self._announced is None:
            self._announced = {}
        self._announced.pop(guid, None)  # to the end: the newest
        self._announced[guid] = (state, snapshot_epoch)
        # calls whose end never reached this session (ended in a gap) must not grow it without bound
        while len(self._announced) > _MAX_ANNOUNCED:
            del self._announced[next(iter(self._announced))]

    def _shown_in_snapshot(self, calls: Sequence[Call], epoch: str) -> None:
        for call in calls:
            guid = cp.call_guid(call.id)
            shown = self._announced.get(guid) if self._announced else None
            if shown is None or shown[0] is not call.state:
                self._remember_shown(guid, call.state, epoch)

    def _track(self, event: LineEvent) -> None:
        call = event.call
        assert call is not None
        guid = cp.call_guid(call.id)
        if event.type is EventType.RING_FINISHED or call.state is CallState.FINISHED:
            before = self._calls.pop(guid, None)
            channels = dict.fromkeys(c.channel for c in (call, before) if c is not None and c.channel)
            self._remember_ended(guid, tuple(channels))
        else:
            self._calls[guid] = call  # an existing key keeps its place: oldest stays first

    def _remember_ended(self, guid: str, channels: tuple[str, ...]) -> None:
        if not channels:
            return
        if self._finished is None:
            self._finished = {}
        self._finished.pop(guid, None)
        self._finished[guid] = channels
        while len(self._finished) > _MAX_FINISHED:
            del self._finished[next(iter(self._finished))]

    def _ended_here(self, call: Call) -> bool:
        """Rule 13: this session sent the end of this very leg (same call id, one of its channels)."""
        if self._finished is None:
            return False
        channels = self._finished.get(cp.call_guid(call.id))
        return channels is not None and call.channel in channels

    def _frames_for(self, event: LineEvent) -> list[str]:
        own_id = event.call.id if event.call is not None else None
        others = [c for c in self._calls.values() if c.id != own_id and c.active]

        def build() -> list[str]:
            return cp.line_event_to_frames(
                event, self.connection_uid, other_calls=others, agent_codes=self._opts.agent_codes
            )

        if self._memo is None or not event.epoch:
            return build()
        key = (
            event.line,
            event.epoch,
            event.seq,
            event.type,
            self.connection_uid,
            self._opts.agent_codes,
            tuple((c.id, c.state, c.direction) for c in others),
        )
        return self._memo.get_or_build(key, build)

    def _send_agent_state(self) -> None:
        assert self._agent is not None
        code = self._opts.agent_codes.code_for(self._agent)
        self._send(cp.agent_state_frame(code, connection_uid=self.connection_uid))

    def _error(self, error_type: MsgErrorType, message: str) -> None:
        self._send(cp.error_frame(error_type, message, connection_uid=self.connection_uid))

    def _send(self, frame: str) -> None:
        if self.debug_mode:
            self._debug("out", frame)
        self._env.send_frame(frame)

    def _debug(self, direction: str, text: str) -> None:
        # INFO, not DEBUG: the point is to see one agent's traffic without turning the whole
        # node's log level down. Frames carry no secrets (the deployment key is in the URL).
        # Bounded per user (rule 7): a client cannot turn the node's log into a disk filler.
        budget = self._opts.debug_budget
        if budget is not None:
            admitted, muted = budget.admit(self.user_uid or f"lib:{self.library_instance_uid}")
            if not admitted:
                return
            if muted:
                log.info("debug line=%s user=%s: %d lines not logged (over %d a minute)", self.line,
                         self.user_uid, muted, budget.lines_per_minute)
            text = budget.cut(text)
        # one line per frame: a client's raw newlines must not forge log lines
        text = text.replace("\r", "\\r").replace("\n", "\\n")
        log.info("debug %s line=%s user=%s lib=%s: %s", direction, self.line, self.user_uid,
                 self.library_instance_uid, text)

    def _release(self) -> None:
        line = self.line
        self.line = None
        self._calls.clear()
        self._announced = None
        self._finished = None
        self._agent = None
        self._catching_up = False
        self._held = []
        self._snapshot_wanted = False
        if line is not None:
            log.info("connection released conn=%s line=%s", self.connection_uid, line)
            self._env.release_line(self, line)


def _restatement(event: LineEvent) -> bool:
    """Whether ``event`` states a call that began before its term did (epochs are the term's start in ms)."""
    assert event.call is not None
    try:
        return 0 < event.call.started_at * 1000 < int(event.epoch)
    except ValueError:
        return False


def _get_ci(obj: Any, key: str) -> Any:
    """``obj[key]`` with the key matched case-insensitively (Creatio configs vary in case)."""
    if not isinstance(obj, dict):
        return None
    if key in obj:
        return obj[key]
    lowered = key.lower()
    for k, v in obj.items():
        if isinstance(k, str) and k.lower() == lowered:
            return v
    return None


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


__all__ = ["AgentSession", "FrameMemo", "SessionEnvironment", "SessionOptions", "SessionState"]
