"""The asyncio shell around the sans-I/O AMI parser: one manager session to Asterisk.

Theory of operation:

* ``run()`` loops forever: connect, read the banner, log in (MD5 challenge when asked, else
  plain), turn events on, hand the session to ``on_connected`` (the gateway resyncs there),
  then read until the peer goes away; then back off (exponential, jittered) and retry.
* Reading never waits on anything but the socket. Every event goes to ``on_event``
  synchronously; that callback must only do in-memory work (the tracker plus an in-memory
  outbox). This is what keeps Asterisk from dropping us: it cuts a manager session that does
  not read within its write timeout (100 ms by default).
* Actions are correlated by ActionID. ``send_action`` resolves with the response; event
  lists (``EventList: start`` ... ``...Complete``) are collected and returned whole.
* A Ping every ``ping_interval`` seconds without an answer within ``ping_timeout`` means the
  TCP session is dead even if the kernel has not noticed: close and reconnect.
* Some answers come as an event after the response: ``Originate`` with ``Async: true`` is
  answered at once ("successfully queued") and its outcome arrives later as ``OriginateResponse``
  carrying our ActionID. ``send_action(..., until_event="OriginateResponse")`` waits for both, so
  a command learns whether the call really started.

Hot standby (ami_gateway/lease.py): the gateway logs in with ``Events: off`` and turns events on
with the ``Events`` action only once it holds the lease. ``action_guard`` is asked before every
action that changes something (anything outside ``READ_ONLY_ACTIONS``); when it says no, the action
is not sent and :class:`AmiFenced` is raised, so a gateway that lost its lease cannot act on the PBX.

Less work for Asterisk and for us: ``Events:`` at login is an event *mask* (``call,agent,dtmf`` by
default; Asterisk ANDs it with the user's read classes, so a user without ``dtmf`` still works), so
Asterisk never formats the classes we ignore (``dialplan`` - Newexten and VarSet on every dialplan
step -, ``reporting`` - RTCP -, ``cdr``, ``cel``, ``log``, ``verbose``...).
``event_filters`` adds AMI ``Filter`` actions (``!Event: Foo`` excludes) after login when the
user has the ``system`` write class; a refused filter is logged and skipped (the mask already did
the heavy lifting). An ``eventfilter`` line in manager.conf does the same without that permission.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

from ami.protocol import (
    AmiMessage,
    AmiParser,
    Banner,
    MalformedMessage,
    encode_action,
    md5_login_key,
)
from services.backoff import Backoff

log = logging.getLogger(__name__)

AMI_CONNECTED = Gauge("cms_ami_connected", "1 while the gateway holds a logged-in AMI session")
AMI_RECONNECTS = Counter("cms_ami_reconnects_total", "AMI connection attempts after the first")
AMI_EVENTS = Counter("cms_ami_events_received_total", "AMI events received", ["event"])
AMI_MALFORMED = Counter("cms_ami_malformed_messages_total", "AMI messages that could not be parsed")
AMI_ACTIONS = Counter("cms_ami_actions_total", "AMI actions sent", ["action", "outcome"])
AMI_DISCONNECTS = Counter(
    "cms_ami_disconnects_total", "AMI sessions lost or refused, by reason", ["reason"]
)
AMI_CONNECT_SECONDS = Histogram(
    "cms_ami_connect_seconds",
    "Time from starting a connection attempt to a logged-in, resynced session",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
AMI_PING_SECONDS = Histogram(
    "cms_ami_ping_seconds",
    "Round trip of the keepalive Ping",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
#: Event classes the gateway needs: channels, bridges, dials, parking, transfers (call), queues (agent)
#: and key presses (dtmf, for DTMF_ENTERED; only delivered if the user may read them).
#: seconds between logins Asterisk refused (a wrong secret does not fix itself; see AmiClient's backoff)
_AUTH_RETRY = 15.0
DEFAULT_EVENT_MASK = "call,agent,dtmf"  # dtmf only if the user may read it: Asterisk ANDs mask and read

# Event names we count individually; the rest fall into "other" so the label set stays bounded.
_COUNTED_EVENTS = frozenset(
    {
        "Newchannel", "Newstate", "Hangup", "DialBegin", "DialEnd", "BridgeEnter", "BridgeLeave",
        "NewConnectedLine", "NewCallerid", "Hold", "Unhold", "QueueCallerJoin", "QueueCallerLeave",
        "AgentCalled", "AgentConnect", "AgentComplete", "AgentRingNoAnswer", "QueueMemberPause",
        "QueueMemberStatus", "BlindTransfer", "AttendedTransfer", "OriginateResponse", "LocalBridge",
        "CoreShowChannel", "QueueMember", "VarSet",
    }
)
for _event in (*_COUNTED_EVENTS, "other"):
    AMI_EVENTS.labels(event=_event)


class AmiError(Exception):
    """An action failed or the session is not usable."""


class AmiAuthError(AmiError):
    """Asterisk refused our credentials: retrying quickly will not help."""


class AmiFenced(AmiError):
    """The action changes something and this gateway does not hold the lease: not sent."""


#: Actions that only read or manage our own session: a standby (or a fenced gateway) may send them.
READ_ONLY_ACTIONS = frozenset(
    {"challenge", "login", "logoff", "ping", "events", "filter", "coreshowchannels", "status", "queuestatus",
     "queuesummary", "dbget", "getvar"}
)


class AmiKeepaliveError(AmiError):
    """The keepalive Ping went unanswered: the session is dead even if TCP has not noticed."""


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[list[AmiMessage]]
    collecting: bool = False
    items: list[AmiMessage] = field(default_factory=list)
    until_event: str = ""  # lower-case name of the event that completes the action after its response


class AmiSession:
    """One logged-in connection. Created by :class:`AmiClient`; valid until it closes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, parser: AmiParser) -> None:
        self._reader = reader
        self._writer = writer
        self._parser = parser
        self._ids = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self.banner = ""
        self.closed = asyncio.Event()
        #: set once Asterisk accepted our login
        self.logged_in = False
        #: asked before every action outside READ_ONLY_ACTIONS; False means "not ours to send" (the lease)
        self.guard: Callable[[str], bool] | None = None

    def _next_id(self) -> str:
        return f"cms-{next(self._ids)}"

    async def send_action(
        self,
        action: str,
        fields: Iterable[tuple[str, str]] | Mapping[str, str] = (),
        *,
        timeout: float = 10.0,
        expect_list: bool = False,
        until_event: str = "",
    ) -> list[AmiMessage]:
        """Send an action; return ``[response]``, or ``[response, *list_events]`` for event lists.

        With ``until_event``, a successful response is followed by waiting for that event with our
        ActionID (``OriginateResponse``): the result is then ``[response, event]``. The event still
        reaches the event handler too. ``timeout`` bounds the whole wait.
        """
        if self.closed.is_set():
            raise AmiError("AMI session is closed")
        if self.guard is not None and action.lower() not in READ_ONLY_ACTIONS and not self.guard(action):
            AMI_ACTIONS.labels(action=action, outcome="fenced").inc()
            raise AmiFenced(f"{action} not sent: this gateway does not hold the lease")
        action_id = self._next_id()
        loop = asyncio.get_running_loop()
        pending = _Pending(future=loop.create_future(), collecting=expect_list, until_event=until_event.lower())
        self._pending[action_id] = pending
        self._writer.write(encode_action(action, fields, action_id=action_id))
        try:
            async with asyncio.timeout(timeout):
                result = await pending.future
        except TimeoutError:
            AMI_ACTIONS.labels(action=action, outcome="timeout").inc()
            raise AmiError(f"{action}: no response within {timeout:.0f}s") from None
        finally:
            self._pending.pop(action_id, None)
        outcome = "success" if (result[0].response or "").lower() in ("success", "follows", "goodbye") else "error"
        AMI_ACTIONS.labels(action=action, outcome=outcome).inc()
        return result

    def dispatch_response(self, msg: AmiMessage) -> bool:
        """Route a message that belongs to one of our actions. True if it was ours."""
        action_id = msg.action_id
        if action_id is None:
            return False
        pending = self._pending.get(action_id)
        if pending is None or pending.future.done():
            return False
        if pending.until_event and msg.event is not None and msg.event.lower() == pending.until_event:
            pending.future.set_result([*pending.items, msg])
            return False  # an event like any other for the tracker
        if msg.response is not None:
            if pending.collecting and (msg.get("EventList") or "").lower() == "start":
                pending.items.append(msg)
                return True
            if pending.until_event and (msg.response or "").lower() == "success":
                pending.items.append(msg)
                return True
            pending.future.set_result([msg])
            return True
        if pending.collecting and msg.event is not None:
            pending.items.append(msg)
            if (msg.get("EventList") or "").lower() == "complete" or msg.event.endswith("Complete"):
                pending.future.set_result(pending.items)
            return True
        return False

    def fail_all(self, reason: str) -> None:
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(AmiError(reason))
        self._pending.clear()

    def close(self) -> None:
        if not self._writer.is_closing():
            self._writer.close()


EventHandler = Callable[[AmiMessage, float], None]
ConnectedHandler = Callable[[AmiSession], Awaitable[None]]


class AmiClient:
    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        secret: str,
        *,
        on_event: EventHandler,
        on_connected: ConnectedHandler,
        on_disconnected: Callable[[], None] = lambda: None,
        ping_interval: float = 10.0,
        ping_timeout: float = 5.0,
        backoff: Backoff | None = None,
        auth_retry: float = _AUTH_RETRY,
        max_message_bytes: int = 256 * 1024,
        event_mask: str = DEFAULT_EVENT_MASK,
        event_filters: Iterable[str] = (),
        connect_timeout: float = 10.0,
        action_guard: Callable[[str], bool] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._username = username
        self._secret = secret
        self._on_event = on_event
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        # A gateway without AMI is deaf: every call meanwhile is lost for good (Asterisk replays nothing), and a
        # refused connect costs the PBX nothing, so retries stay within 2 s. A refused login waits longer
        # (_AUTH_RETRY): Asterisk logs each one, and fail2ban-style guards ban an address that keeps failing.
        self._backoff = backoff or Backoff(initial=0.25, maximum=2.0)
        self._auth_retry = auth_retry
        self._max_message_bytes = max_message_bytes
        self._event_mask = event_mask
        self._event_filters = tuple(event_filters)
        self._connect_timeout = connect_timeout
        self._action_guard = action_guard
        self.session: AmiSession | None = None
        #: sessions that reached "logged in and resynced" (tests and health read it).
        self.sessions_established = 0
        self._stopping = False
        self._stopped = asyncio.Event()  # wakes the reconnect wait, so a stop never waits out a backoff
        self.ready = asyncio.Event()

    async def run(self) -> None:
        first = True
        while not self._stopping:
            auth_refused = False
            if not first:
                AMI_RECONNECTS.inc()
            first = False
            try:
                await self._run_once()
                self._backoff.reset()
            except AmiAuthError as exc:
                AMI_DISCONNECTS.labels(reason="auth").inc()
                log.error("AMI login refused by %s:%s: %s", self._host, self._port, exc)
                auth_refused = True
            except AmiKeepaliveError as exc:
                AMI_DISCONNECTS.labels(reason="ping_timeout").inc()
                log.warning("AMI connection to %s:%s dead: %s", self._host, self._port, exc)
            except (OSError, AmiError, asyncio.IncompleteReadError, TimeoutError) as exc:
                if self._stopping:
                    log.info("AMI session to %s:%s closed", self._host, self._port)
                else:
                    # never logged in: a PBX that refuses the connection, or a port that accepts and closes
                    # (not Asterisk's manager) is the same "cannot connect" to the admin
                    never_in = self.session is None or not self.session.logged_in
                    AMI_DISCONNECTS.labels(reason="connect" if never_in else "lost").inc()
                    log.warning("AMI connection to %s:%s lost: %s", self._host, self._port, exc)
            finally:
                self.ready.clear()
                AMI_CONNECTED.set(0)
                if self.session is not None:
                    self.session.fail_all("AMI connection lost")
                    self.session.close()
                    self.session = None
                    self._on_disconnected()
            if self._stopping:
                break
            delay = self._backoff.next_delay()
            if auth_refused:
                delay = max(delay, self._auth_retry * random.uniform(0.8, 1.2))
            log.info("AMI reconnect in %.1fs", delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopped.wait()

    async def stop(self) -> None:
        self._stopping = True
        self._stopped.set()
        session = self.session
        if session is not None:
            try:
                async with asyncio.timeout(1.0):
                    await session.send_action("Logoff")
            except (AmiError, TimeoutError, OSError):
                pass
            session.close()

    async def _run_once(self) -> None:
        started = time.perf_counter()
        async with asyncio.timeout(self._connect_timeout):
            reader, writer = await asyncio.open_connection(self._host, self._port)
        parser = AmiParser(max_message_bytes=self._max_message_bytes)
        session = AmiSession(reader, writer, parser)
        session.guard = self._action_guard
        self.session = session
        read_task = asyncio.create_task(self._read_loop(session))
        try:
            await self._login(session)
            session.logged_in = True
            AMI_CONNECTED.set(1)
            log.info("AMI logged in to %s:%s (%s)", self._host, self._port, session.banner)
            await self._add_filters(session)
            await self._on_connected(session)
            self.ready.set()
            # A session that worked restarts the backoff: the next loss retries quickly (still jittered).
            self._backoff.reset()
            self.sessions_established += 1
            AMI_CONNECT_SECONDS.observe(time.perf_counter() - started)
            ping_task = asyncio.create_task(self._keepalive(session))
            try:
                done, _ = await asyncio.wait({read_task, ping_task}, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            finally:
                ping_task.cancel()
        finally:
            if not read_task.done():
                read_task.cancel()
            elif not read_task.cancelled():
                read_task.exception()  # the read loop's end is this session's end, reported above; not an orphan
            session.close()
            session.closed.set()

    async def _login(self, session: AmiSession) -> None:
        challenge = await session.send_action("Challenge", {"AuthType": "MD5"}, timeout=10)
        if (challenge[0].response or "").lower() == "success" and challenge[0].get("Challenge"):
            fields = {
                "AuthType": "MD5",
                "Username": self._username,
                "Key": md5_login_key(challenge[0]["Challenge"], self._secret),
                "Events": self._event_mask,
            }
        else:
            fields = {"Username": self._username, "Secret": self._secret, "Events": self._event_mask}
        response = (await session.send_action("Login", fields, timeout=10))[0]
        if (response.response or "").lower() != "success":
            raise AmiAuthError(response.get("Message") or "authentication failed")

    async def _add_filters(self, session: AmiSession) -> None:
        for text in self._event_filters:
            answer = (await session.send_action("Filter", {"Operation": "Add", "Filter": text}))[0]
            if (answer.response or "").lower() != "success":
                log.warning("AMI Filter %r refused (%s); continuing with the event mask only", text,
                            answer.get("Message"))
                return

    async def _read_loop(self, session: AmiSession) -> None:
        try:
            await self._read_messages(session)
        finally:
            session.closed.set()
            session.fail_all("AMI connection lost")

    async def _read_messages(self, session: AmiSession) -> None:
        parser = session._parser
        while True:
            data = await session._reader.read(65536)
            received_at = time.time()
            parser.receive_data(data)
            while True:
                item = parser.next_event()
                if item is None:
                    break
                if isinstance(item, Banner):
                    session.banner = f"Asterisk Call Manager/{item.version}"
                    continue
                if isinstance(item, MalformedMessage):
                    AMI_MALFORMED.inc()
                    log.warning("malformed AMI message skipped: %s", item.reason)
                    continue
                if session.dispatch_response(item):
                    continue
                name = item.event
                if name is None:
                    continue
                AMI_EVENTS.labels(event=name if name in _COUNTED_EVENTS else "other").inc()
                self._on_event(item, received_at)
            if not data:
                raise AmiError("Asterisk closed the connection")

    async def _keepalive(self, session: AmiSession) -> None:
        while True:
            await asyncio.sleep(self._ping_interval)
            sent = time.perf_counter()
            try:
                await session.send_action("Ping", timeout=self._ping_timeout)
            except AmiError as exc:
                raise AmiKeepaliveError(f"keepalive failed: {exc}") from None
            AMI_PING_SECONDS.observe(time.perf_counter() - sent)
