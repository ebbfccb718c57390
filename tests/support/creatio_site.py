"""A Creatio-shaped HTTP site for tests: the login, UpdateCall and OData endpoints the call-record saver uses.

Real HTTP on a loopback port (stdlib ThreadingHTTPServer in a thread), so the gateway, in-process or as
a child process, talks to it as to Creatio:

* ``POST /ServiceModel/AuthService.svc/Login`` ``{"UserName","UserPassword"}``: ``{"Code": 0}`` and the
  cookies ``.ASPXAUTH``, ``BPMCSRF``, ``BPMLOADER``, ``UserName``; a wrong password is ``{"Code": 1}``.
* Every other endpoint needs a live ``.ASPXAUTH`` cookie (else 401) and, on POST/PATCH, the ``BPMCSRF``
  header equal to its cookie (else 403), as Creatio does.
* ``POST /0/ServiceModel/MsgUtilService.svc/UpdateCall``: the call object; updates the row whose Id is
  ``databaseUId`` or creates it (with that Id when it is a GUID); answers the Id as a JSON string.
* ``POST /0/odata/Call`` (409 on a duplicate Id), ``PATCH /0/odata/Call(<id>)`` (404 if missing),
  ``GET /0/odata/Call`` (``{"value": [...]}``).

Rows keep Creatio's column names. Columns are checked as Creatio would (GUIDs, dates, whole seconds), and a
bad one is a 400, so a test cannot pass on garbage. Failures on demand: :meth:`fail_next` (status codes
for the next N writes), :meth:`expire_sessions` (next request gets 401), :meth:`answer_next` (a raw body).
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
DIRECTIONS = {"1d96a65f-2131-4916-8825-2d142b1000b2", "53f71b5f-7e17-4cf5-bf14-6a59212db422",
              "c072be2c-3d82-4468-9d4a-6db47d1f4cca"}
COLUMNS = ("IntegrationId", "CallerId", "CalledId", "StartDate", "EndDate", "Duration", "BeforeConnectionTime",
           "TalkTime", "HoldTime", "DirectionId", "RedirectingId", "RedirectionId", "CreatedById", "ParentCallId")
#: UpdateCall body field -> Call column
_MSGUTIL_FIELDS = {
    "integrationId": "IntegrationId", "callerId": "CallerId", "calledId": "CalledId", "startDate": "StartDate",
    "endDate": "EndDate", "duration": "Duration", "beforeConnectionTime": "BeforeConnectionTime",
    "talkTime": "TalkTime", "holdTime": "HoldTime", "direction": "DirectionId", "redirectingId": "RedirectingId",
    "redirectionId": "RedirectionId", "userContactUId": "CreatedById", "parentCallId": "ParentCallId",
}


class BadColumn(ValueError):
    pass


class RawBody:
    """An answer sent as it is, not JSON-encoded."""

    def __init__(self, text: str) -> None:
        self.text = text


class CreatioSite:
    def __init__(self, user: str = "Supervisor", password: str = "Supervisor-secret") -> None:
        self.user = user
        self.password = password
        self.rows: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.logins = 0
        self.failed_logins = 0
        self.writes = 0
        self.requests: list[tuple[str, str, int]] = []
        self._sessions: dict[str, str] = {}  # .ASPXAUTH -> csrf
        self._fail: list[int] = []
        self._answers: list[str] = []
        #: seconds each write takes (a slow Creatio)
        self.write_delay = 0.0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- test controls -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail_next(self, *statuses: int) -> None:
        """The next writes (UpdateCall / OData) answer these statuses, one each, without storing anything."""
        with self.lock:
            self._fail.extend(statuses)

    def answer_next(self, body: str) -> None:
        """The next UpdateCall answers 200 with this raw body (e.g. an error text) and stores nothing."""
        with self.lock:
            self._answers.append(body)

    def expire_sessions(self) -> None:
        with self.lock:
            self._sessions.clear()

    def rows_of(self, integration_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(r) for r in self.rows.values() if r.get("IntegrationId") == integration_id]

    def all_rows(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(r) for r in self.rows.values()]

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        site = self

        class Handler(_Handler):
            pass

        Handler.site = site
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="creatio-site", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    # ---- endpoints (called from the handler threads) --------------------------------------------

    def login(self, body: Any) -> tuple[int, Any, list[str]]:
        ok = isinstance(body, dict) and body.get("UserName") == self.user and body.get("UserPassword") == self.password
        with self.lock:
            if not ok:
                self.failed_logins += 1
                return 200, {"Code": 1, "Message": "Invalid username or password specified."}, []
            self.logins += 1
            auth, csrf = uuid.uuid4().hex, uuid.uuid4().hex[:22]
            self._sessions[auth] = csrf
        cookies = [f".ASPXAUTH={auth}; path=/; HttpOnly", f"BPMCSRF={csrf}; path=/",
                   "BPMLOADER=loader; path=/; HttpOnly", f"UserName={self.user}; path=/"]
        return 200, {"Code": 0, "Message": "", "Exception": None, "PasswordChangeUrl": None,
                     "RedirectUrl": None}, cookies

    def check_auth(self, cookies: dict[str, str], csrf_header: str | None, method: str) -> int:
        with self.lock:
            csrf = self._sessions.get(cookies.get(".ASPXAUTH", ""))
        if csrf is None:
            return 401
        if method != "GET" and (csrf_header != csrf or cookies.get("BPMCSRF") != csrf):
            return 403
        return 0

    def _injected(self) -> int:
        with self.lock:
            return self._fail.pop(0) if self._fail else 0

    def update_call(self, body: Any) -> tuple[int, Any]:
        if self.write_delay:
            time.sleep(self.write_delay)
        failed = self._injected()
        if failed:
            return failed, {"error": "injected failure"}
        with self.lock:
            if self._answers:
                return 200, RawBody(self._answers.pop(0))
        if not isinstance(body, dict):
            return 400, {"error": "body is not a call object"}
        row = {column: body[field] for field, column in _MSGUTIL_FIELDS.items() if field in body}
        uid = body.get("databaseUId")
        try:
            _check(row)
        except BadColumn as exc:
            return 400, {"error": str(exc)}
        with self.lock:
            self.writes += 1
            if isinstance(uid, str) and uid.lower() in self.rows:
                self.rows[uid.lower()].update(row)
                return 200, uid.lower()
            new_id = uid.lower() if isinstance(uid, str) and GUID.fullmatch(uid) else str(uuid.uuid4())
            self.rows[new_id] = {"Id": new_id, **row}
            return 200, new_id

    def odata_create(self, body: Any) -> tuple[int, Any]:
        failed = self._injected()
        if failed:
            return failed, {"error": {"message": "injected failure"}}
        if not isinstance(body, dict):
            return 400, {"error": {"message": "not an entity"}}
        uid = str(body.get("Id") or uuid.uuid4()).lower()
        row = {k: v for k, v in body.items() if k in COLUMNS}
        unknown = sorted(set(body) - set(COLUMNS) - {"Id"})
        if unknown:
            return 400, {"error": {"message": f"unknown properties {unknown}"}}
        try:
            _check(row)
        except BadColumn as exc:
            return 400, {"error": {"message": str(exc)}}
        with self.lock:
            self.writes += 1
            if uid in self.rows:
                return 409, {"error": {"message": "duplicate key"}}
            self.rows[uid] = {"Id": uid, **row}
            return 201, dict(self.rows[uid])

    def odata_update(self, uid: str, body: Any) -> tuple[int, Any]:
        failed = self._injected()
        if failed:
            return failed, {"error": {"message": "injected failure"}}
        if not isinstance(body, dict):
            return 400, {"error": {"message": "not an entity"}}
        row = {k: v for k, v in body.items() if k in COLUMNS}
        try:
            _check(row)
        except BadColumn as exc:
            return 400, {"error": {"message": str(exc)}}
        with self.lock:
            self.writes += 1
            if uid.lower() not in self.rows:
                return 404, {"error": {"message": "not found"}}
            self.rows[uid.lower()].update(row)
            return 204, None


def _check(row: dict[str, Any]) -> None:
    """Column types as Creatio's Call entity has them."""
    for column in ("StartDate", "EndDate"):
        value = row.get(column)
        if value is None:
            continue
        if not isinstance(value, str):
            raise BadColumn(f"{column}: not a date")
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise BadColumn(f"{column}: {value!r} is not an ISO date") from None
    for column in ("Duration", "BeforeConnectionTime", "TalkTime", "HoldTime"):
        value = row.get(column)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise BadColumn(f"{column}: {value!r} is not a whole number of seconds")
    for column in ("CreatedById", "ParentCallId"):
        value = row.get(column)
        if value is not None and (not isinstance(value, str) or not GUID.fullmatch(value)):
            raise BadColumn(f"{column}: {value!r} is not a GUID")
    direction = row.get("DirectionId")
    if direction is not None and direction not in DIRECTIONS:
        raise BadColumn(f"DirectionId: {direction!r} is not a CallDirection")
    for column in ("CallerId", "CalledId", "RedirectingId", "RedirectionId", "IntegrationId"):
        value = row.get(column)
        if value is not None and (not isinstance(value, str) or len(value) > 250):
            raise BadColumn(f"{column}: {value!r} is not a text")


class _Handler(BaseHTTPRequestHandler):
    site: CreatioSite
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", "replace")

    def _reply(self, status: int, payload: Any, cookies: list[str] | None = None) -> None:
        if payload is None:
            data = b""
        elif isinstance(payload, RawBody):
            data = payload.text.encode()
        else:
            data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for cookie in cookies or []:
            self.send_header("Set-Cookie", cookie)
        self.end_headers()
        self.wfile.write(data)
        with self.site.lock:
            self.site.requests.append((self.command, self.path, status))

    def _cookies(self) -> dict[str, str]:
        jar: SimpleCookie = SimpleCookie()
        jar.load(self.headers.get("Cookie") or "")
        return {k: m.value for k, m in jar.items()}

    def _authorised(self) -> bool:
        status = self.site.check_auth(self._cookies(), self.headers.get("BPMCSRF"), self.command)
        if status:
            self._reply(status, {"error": "unauthorised" if status == 401 else "CSRF token mismatch"})
            return False
        return True

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = self._body()
        if self.path == "/ServiceModel/AuthService.svc/Login":
            status, answer, cookies = self.site.login(body)
            self._reply(status, answer, cookies)
            return
        if not self._authorised():
            return
        if self.path == "/0/ServiceModel/MsgUtilService.svc/UpdateCall":
            self._reply(*self.site.update_call(body))
        elif self.path == "/0/odata/Call":
            self._reply(*self.site.odata_create(body))
        else:
            self._reply(404, {"error": f"no such service {self.path}"})

    def do_PATCH(self) -> None:  # noqa: N802
        body = self._body()
        if not self._authorised():
            return
        match = re.fullmatch(r"/0/odata/Call\(([0-9a-fA-F-]{36})\)", self.path)
        if match is None:
            self._reply(404, {"error": f"no such resource {self.path}"})
            return
        self._reply(*self.site.odata_update(match.group(1), body))

    def do_GET(self) -> None:  # noqa: N802
        if not self._authorised():
            return
        if self.path.startswith("/0/odata/Call"):
            self._reply(200, {"value": self.site.all_rows()})
        else:
            self._reply(404, {"error": "not found"})


@contextmanager
def running_site(**kwargs: Any) -> Iterator[CreatioSite]:
    site = CreatioSite(**kwargs)
    site.start()
    try:
        yield site
    finally:
        site.stop()
