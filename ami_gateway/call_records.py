"""The call-record saver: every call of a line whose agent opened a session becomes a record in Creatio.

Theory of operation
-------------------
The gateway hands every batch of line events to :meth:`CallRecordSaver.observe` on its AMI read path; that
call is synchronous and in-memory (the record is folded by :mod:`ami_gateway.call_record_model` and the
call id queued), so saving never delays event delivery. Worker tasks (``concurrency``) take call ids off
the queue; one call is written by one worker at a time, always with its newest state, so changes that
pile up while Creatio is slow are coalesced into one write.

Before each write the record goes to the journal in Redis (``P:record:<call id>`` + the ``P:records:pending``
set): a gateway that restarts, or another that takes over, loads the pending records and carries on, with
the ids Creatio already gave. Every write of a record asks for the same id (``proposed_uid``) and is an
update once Creatio has answered one, so retries, restarts and failovers give one record per call and line.

A failed write is retried with backoff and jitter. A record Creatio refuses outright (a 4xx other than
401/403), or that is still unsaved ``retry_for_seconds`` after its first failure, is given up: the line
gets CALL_SAVE_FAILED (the agent sees ERROR CALL_SAVING_ERROR) and the id moves to ``P:records:failed``.
The first id Creatio answers for a call is announced on the line as CALL_SAVED (CALL_SAVED_IN_DB for the
client) and from then on stamped on every event of that call (``database_uid``), so snapshots and later
call objects carry it.

Who a line's calls belong to comes from the agent's OpenConnection (``sessionServiceParams``: contact and
site) through the RECORD_OWNER command, kept in ``P:records:owners`` so saving goes on with no tab open.

Redis keys (``P`` = deployment prefix)::

    P:records:owners     hash  line -> {"contact", "site", "user"}
    P:record:<call id>   CallRecord JSON (expires 7 days after the record's last write once it is complete)
    P:records:pending    set of call ids whose last state is not written yet
    P:records:failed     set of call ids given up
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge, Histogram

from ami_gateway.call_record_model import CallRecord, RecordOwner, apply, is_guid
from ami_gateway.creatio_api import CreatioSite, Credentials, SaveError
from services.config import CallRecordsConfig, ConfigError, site_root
from services.tasks import stop_tasks
from services.wire import Command, CommandResult, LineEvent, RecordOwnerArgs

log = logging.getLogger(__name__)

RECORD_WRITES = Counter("cms_call_record_writes_total", "Writes of call records to Creatio", ["outcome"])
RECORDS_GIVEN_UP = Counter("cms_call_records_failed_total", "Call records given up (never saved in Creatio)")
RECORD_LOGINS = Counter("cms_call_record_logins_total", "Service-account logins to Creatio")
RECORDS_PENDING = Gauge("cms_call_records_pending", "Call records whose latest state is not saved in Creatio yet")
RECORD_WRITE_SECONDS = Histogram(
    "cms_call_record_write_seconds", "Time of one call-record write to Creatio (login included)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
for _outcome in ("success", "retry", "rejected"):
    RECORD_WRITES.labels(outcome=_outcome)

_DONE_TTL_SECONDS = 7 * 86400
#: a journal write that takes longer is given up (the record is written to Creatio anyway)
_JOURNAL_TIMEOUT = 5.0
#: a record that is open this long without an event is written as it is and forgotten from memory
_STALE_OPEN_SECONDS = 12 * 3600
#: record ids remembered after their record is done (late events of a call still get stamped)
_UIDS_KEPT = 50_000


@dataclass(slots=True)
class _Entry:
    record: CallRecord
    saved_version: int = 0
    failing_since: float | None = None
    attempts: int = 0
    busy: bool = False
    announced: bool = False
    retry_handle: asyncio.TimerHandle | None = field(default=None, repr=False)


class CallRecordSaver:
    def __init__(
        self,
        config: CallRecordsConfig,
        redis: aioredis.Redis,
        prefix: str,
        *,
        on_saved: Callable[[str, str, str], None],
        on_failed: Callable[[str, str, str], None],
        clock: Callable[[], float] = time.time,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
    ) -> None:
        """``on_saved(line, call_id, record_uid)`` and ``on_failed(line, call_id, why)`` run on the loop."""
        self.config = config
        self._redis = redis
        self._prefix = prefix
        self._on_saved = on_saved
        self._on_failed = on_failed
        self._clock = clock
        self._backoff = (backoff_initial, backoff_max)
        self._credentials = Credentials(config.user_name, config.password)
        self._owners: dict[str, RecordOwner] = {}
        self._entries: dict[str, _Entry] = {}
        #: call id -> Creatio's record id, for stamping events (kept after the record is done: late events)
        self._uids: OrderedDict[str, str] = OrderedDict()
        #: calls given up: their later events do not start the record again (the agent was told it failed)
        self._given_up: OrderedDict[str, None] = OrderedDict()
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._sites: dict[str, CreatioSite] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._persist_failed_logged = False
        self._bg: set[asyncio.Task[None]] = set()

    # ---- keys -----------------------------------------------------------------------------

    @property
    def _owners_key(self) -> str:
        return f"{self._prefix}:records:owners"

    @property
    def _pending_key(self) -> str:
        return f"{self._prefix}:records:pending"

    @property
    def _failed_key(self) -> str:
        return f"{self._prefix}:records:failed"

    def _record_key(self, call_id: str) -> str:
        return f"{self._prefix}:record:{call_id}"

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Load owners and the pending journal (a previous run's unfinished work), start the workers."""
        for line, raw in (await self._redis.hgetall(self._owners_key)).items():
            try:
                self._owners[_text(line)] = RecordOwner.from_json(raw)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring a bad record owner of line %s in Redis: %s", _text(line), exc)
        pending = [_text(v) for v in await self._redis.smembers(self._pending_key)]
        for call_id in pending:
            stored = await self._redis.get(self._record_key(call_id))
            if stored is None:
                await self._redis.srem(self._pending_key, call_id)
                continue
            try:
                record = CallRecord.from_json(stored)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("call record %s in Redis cannot be read (%s); dropped", call_id, exc)
                await self._redis.srem(self._pending_key, call_id)
                continue
            self._entries[call_id] = _Entry(record, announced=bool(record.record_uid))
            if record.record_uid:
                self._remember_uid(call_id, record.record_uid)
            self._schedule(call_id)
        if pending:
            log.info("resuming %d call records not yet saved in Creatio", len(pending))
        RECORDS_PENDING.set(len(self._entries))
        for i in range(self.config.concurrency):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"call-records-{i}"))
        self._tasks.append(asyncio.create_task(self._sweep(), name="call-records-sweep"))

    async def stop(self) -> None:
        for entry in self._entries.values():
            if entry.retry_handle is not None:
                entry.retry_handle.cancel()
        await stop_tasks(self._tasks)
        self._tasks.clear()

    async def wait_idle(self, timeout: float) -> bool:
        """True once nothing is queued or being written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._queued and not any(e.busy for e in self._entries.values()):
                return True
            await asyncio.sleep(0.05)
        return False

    # ---- owners (RECORD_OWNER command) -------------------------------------------------------

    async def set_owner(self, command: Command) -> CommandResult:
        line = command.line
        args = command.args_as(RecordOwnerArgs)
        contact = args.contact.strip().lower()
        if not is_guid(contact):
            return CommandResult(command.id, False, "call records: sessionServiceParams.UserContactUId is not a GUID")
        try:
            site = self._site_for(args.service_url)
        except ConfigError as exc:
            return CommandResult(command.id, False, f"call records: {exc}")
        owner = RecordOwner(contact=contact, site=site, user=args.user[:64])
        if self._owners.get(line) != owner:
            self._owners[line] = owner
            try:
                await self._redis.hset(self._owners_key, line, owner.to_json())
            except (OSError, aioredis.RedisError) as exc:
                # Saving goes on from memory; only a gateway restart before the next connect forgets it.
                log.warning("line %s: record owner not stored in Redis (%s)", line, exc, extra={"line": line})
            log.info("line %s: calls are saved in %s for contact %s", line, site, contact, extra={"line": line})
        return CommandResult(command.id, True)

    def _site_for(self, service_url: str) -> str:
        """The configured site wins; an agent's ServiceUrl is only used when the admin allowed that site."""
        if self.config.site_url:
            return self.config.site_url
        site = site_root(service_url, "sessionServiceParams.ServiceUrl")
        if site not in self.config.allowed_site_urls:
            raise ConfigError(f"ServiceUrl {site} is not in CallRecords.allowedSiteUrls")
        return site

    def owner_of(self, line: str) -> RecordOwner | None:
        return self._owners.get(line)

    # ---- the read path (synchronous) ------------------------------------------------------------

    def observe(self, events: Sequence[LineEvent]) -> None:
        for event in events:
            call = event.call
            if call is None:
                continue
            entry = self._entries.get(call.id)
            line_calls = None
            if entry is None and call.id in self._given_up:
                continue
            if entry is None:
                owner = self._owners.get(event.line)
                if owner is None:
                    continue
                line_calls = {k: e.record for k, e in self._entries.items() if e.record.line == event.line}
                record = apply(None, event, owner=owner, prefix=self._prefix, line_calls=line_calls)
                if record is None:
                    continue
                known_uid = self._uids.get(call.id, "")
                if known_uid:  # a late event of a call whose record is already written
                    record = replace(record, record_uid=known_uid)
                entry = _Entry(record, announced=bool(known_uid))
                self._entries[call.id] = entry
                RECORDS_PENDING.set(len(self._entries))
            else:
                updated = apply(entry.record, event, owner=None, prefix=self._prefix)
                if updated is None or updated is entry.record:
                    continue
                entry.record = updated
            self._schedule(call.id)

    def stamp(self, events: list[LineEvent]) -> list[LineEvent]:
        """The events with each call's Creatio record id filled in, once known."""
        if not self._uids:
            return events
        out = events
        for i, event in enumerate(events):
            call = event.call
            if call is None or call.database_uid:
                continue
            uid = self._uids.get(call.id)
            if uid:
                if out is events:
                    out = list(events)
                out[i] = replace(event, call=call.evolve(database_uid=uid))
        return out

    def record_of(self, call_id: str) -> CallRecord | None:
        entry = self._entries.get(call_id)
        return entry.record if entry is not None else None

    # ---- workers ------------------------------------------------------------------------------

    def _schedule(self, call_id: str) -> None:
        if call_id not in self._queued:
            self._queued.add(call_id)
            self._queue.put_nowait(call_id)

    async def _sweep(self, every: float = 5.0) -> None:
        """A safety net: a record whose newest state is neither written, being written, queued nor waiting for
        a retry is queued again (and said, as it means a change slipped past the workers)."""
        while True:
            await asyncio.sleep(every)
            for call_id, entry in list(self._entries.items()):
                idle = not entry.busy and entry.retry_handle is None and call_id not in self._queued
                if idle and entry.record.version != entry.saved_version:
                    log.warning("call record %s v%d was not queued; writing it now", call_id, entry.record.version)
                    self._schedule(call_id)

    async def _worker(self) -> None:
        while True:
            call_id = await self._queue.get()
            self._queued.discard(call_id)
            entry = self._entries.get(call_id)
            if entry is None or entry.busy:
                continue  # a busy entry is looked at again by its worker when it is done
            if entry.retry_handle is not None:
                entry.retry_handle.cancel()
                entry.retry_handle = None
            entry.busy = True
            try:
                await self._write(call_id, entry)
            except Exception:  # a bug here must not kill the worker: the record is retried
                log.exception("call record %s: unexpected error while saving", call_id)
                self._retry_later(call_id, entry)
            finally:
                entry.busy = False
            # Changes that came while this worker awaited were passed over by the others (busy): write them,
            # unless a retry is already scheduled (its backoff stands).
            if (self._entries.get(call_id) is entry and entry.record.version != entry.saved_version
                    and entry.retry_handle is None):
                self._schedule(call_id)

    async def _write(self, call_id: str, entry: _Entry) -> None:
        record = entry.record
        await self._persist(record)
        site = self._site(record.site)
        parent_uid = self._uids.get(record.parent_call_id, "") if record.parent_call_id else ""
        started = time.perf_counter()
        logins = site.logins
        try:
            uid = await site.save(record, parent_uid)
        except SaveError as exc:
            RECORD_LOGINS.inc(site.logins - logins)
            RECORD_WRITE_SECONDS.observe(time.perf_counter() - started)
            self._failed(call_id, entry, exc)
            return
        RECORD_LOGINS.inc(site.logins - logins)
        RECORD_WRITE_SECONDS.observe(time.perf_counter() - started)
        RECORD_WRITES.labels(outcome="success").inc()
        entry.failing_since = None
        entry.attempts = 0
        entry.saved_version = record.version
        if uid != entry.record.record_uid:
            entry.record = replace(entry.record, record_uid=uid)
        self._remember_uid(call_id, uid)
        log.info("call %s of line %s saved in Creatio as %s (v%d)", call_id, record.line, uid, record.version,
                 extra={"line": record.line, "call": call_id})
        if not entry.announced:
            entry.announced = True
            self._on_saved(record.line, call_id, uid)
        if entry.record.version != entry.saved_version:
            self._schedule(call_id)  # changed while we were writing
            return
        saved = entry.record
        await self._persist(saved, done=saved.ended)
        if entry.record.version != entry.saved_version:
            # An event came during the journal write (an end, say): the worker writes the new state, and it is
            # the state written, not the one that merely arrived, that may let the call be forgotten.
            return
        if saved.ended:
            self._forget(call_id)
        elif self._clock() - saved.started_at > _STALE_OPEN_SECONDS:
            log.warning("call record %s open for 12 h without an end; no longer followed", call_id)
            self._forget(call_id)

    def _failed(self, call_id: str, entry: _Entry, exc: SaveError) -> None:
        now = self._clock()
        entry.attempts += 1
        if entry.failing_since is None:
            entry.failing_since = now
        record = entry.record
        out_of_time = now - entry.failing_since >= self.config.retry_for_seconds
        if exc.permanent or out_of_time:
            RECORD_WRITES.labels(outcome="rejected").inc()
            RECORDS_GIVEN_UP.inc()
            why = str(exc) if exc.permanent else f"not saved after {entry.attempts} tries: {exc}"
            log.error("call %s of line %s could not be saved in Creatio: %s", call_id, record.line, why,
                      extra={"line": record.line, "call": call_id})
            self._on_failed(record.line, call_id, why)
            self._given_up[call_id] = None
            while len(self._given_up) > _UIDS_KEPT:
                self._given_up.popitem(last=False)
            self._forget(call_id)
            self._background(self._mark_failed(call_id))
            return
        RECORD_WRITES.labels(outcome="retry").inc()
        log.warning("call %s of line %s not saved yet (try %d): %s", call_id, record.line, entry.attempts, exc,
                    extra={"line": record.line, "call": call_id})
        self._retry_later(call_id, entry)

    def _retry_later(self, call_id: str, entry: _Entry) -> None:
        initial, maximum = self._backoff
        delay = min(maximum, initial * 2 ** min(entry.attempts, 16))
        delay = delay / 2 + random.uniform(0, delay / 2)
        entry.retry_handle = asyncio.get_running_loop().call_later(delay, self._schedule, call_id)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def _remember_uid(self, call_id: str, uid: str) -> None:
        self._uids[call_id] = uid
        self._uids.move_to_end(call_id)
        while len(self._uids) > _UIDS_KEPT:
            self._uids.popitem(last=False)

    def _forget(self, call_id: str) -> None:
        entry = self._entries.pop(call_id, None)
        if entry is not None and entry.retry_handle is not None:
            entry.retry_handle.cancel()
        RECORDS_PENDING.set(len(self._entries))

    # ---- journal ---------------------------------------------------------------------------------

    async def _persist(self, record: CallRecord, *, done: bool = False) -> None:
        key = self._record_key(record.call_id)
        try:
            pipe = self._redis.pipeline(transaction=True)
            if done:
                pipe.set(key, record.to_json(), ex=_DONE_TTL_SECONDS)
                pipe.srem(self._pending_key, record.call_id)
            else:
                pipe.set(key, record.to_json())
                pipe.sadd(self._pending_key, record.call_id)
            async with asyncio.timeout(_JOURNAL_TIMEOUT):
                await pipe.execute()
            self._persist_failed_logged = False
        except (OSError, aioredis.RedisError, TimeoutError) as exc:
            # Saving in Creatio matters more than the journal: go on, the next write persists again.
            if not self._persist_failed_logged:
                log.warning("call record journal unavailable (%s); records are saved but a restart may lose "
                            "unsaved changes", exc)
                self._persist_failed_logged = True

    async def _mark_failed(self, call_id: str) -> None:
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.srem(self._pending_key, call_id)
            pipe.sadd(self._failed_key, call_id)
            pipe.expire(self._record_key(call_id), _DONE_TTL_SECONDS)
            async with asyncio.timeout(_JOURNAL_TIMEOUT):
                await pipe.execute()
        except (OSError, aioredis.RedisError, TimeoutError) as exc:
            log.warning("could not mark call record %s as failed in Redis: %s", call_id, exc)

    def _site(self, site: str) -> CreatioSite:
        client = self._sites.get(site)
        if client is None:
            client = CreatioSite(site, self._credentials, api=self.config.api,
                                 timeout=self.config.request_timeout_seconds)
            self._sites[site] = client
        return client


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
