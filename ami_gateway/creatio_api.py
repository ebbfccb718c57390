"""Creatio's HTTP API as the call-record saver uses it: a service-account session and two ways to write a call.

Authentication is Creatio's own: ``POST <site>/ServiceModel/AuthService.svc/Login`` with
``{"UserName", "UserPassword"}`` answers ``{"Code": 0}`` and sets cookies (``.ASPXAUTH``, ``BPMCSRF``...);
every later request sends those cookies and echoes ``BPMCSRF`` as a header. A 401 or 403 means the session
expired (or was never valid): log in again once and repeat the request.

Writes:

* ``msgutil`` (default, what CMS does): ``POST <site>/0/ServiceModel/MsgUtilService.svc/UpdateCall`` with the
  call object; the answer is the record id (a JSON string), anything else is Creatio's error text.
* ``odata``: ``POST <site>/0/odata/Call`` with our id on the first write (a 409 there means an earlier try
  already created it), ``PATCH <site>/0/odata/Call(<id>)`` afterwards.

The password is only sent to the site it belongs to and never appears in a message or a log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Any

from ami_gateway.call_record_model import CallRecord, msgutil_body, odata_body, parse_update_call_answer
from ami_gateway.http_request import HttpError, HttpResponse, request

log = logging.getLogger(__name__)

#: statuses that say "this request will never succeed as it is": the record is given up
_REJECTED = frozenset({400, 404, 405, 410, 413, 415, 422})


class SaveError(Exception):
    """A write did not succeed. ``permanent``: Creatio refused the data itself (retrying cannot help)."""

    def __init__(self, message: str, *, permanent: bool = False, auth: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.auth = auth


@dataclass(frozen=True, slots=True)
class Credentials:
    user_name: str
    password: str

    def __repr__(self) -> str:
        return f"Credentials({self.user_name!r}, ***)"


class CreatioSite:
    """One Creatio site and the service account's session on it."""

    def __init__(self, site: str, credentials: Credentials, *, api: str = "msgutil", timeout: float = 10.0) -> None:
        self.site = site.rstrip("/")
        self._credentials = credentials
        self._api = api
        self._timeout = timeout
        self._cookies: dict[str, str] = {}
        self._login_lock = asyncio.Lock()
        #: bumped at each login, so concurrent 401s cause one login, not one each
        self._session_no = 0
        self.logins = 0

    # ---- session -----------------------------------------------------------------------------

    async def login(self) -> None:
        body = json.dumps({"UserName": self._credentials.user_name, "UserPassword": self._credentials.password})
        try:
            resp = await request(
                "POST", f"{self.site}/ServiceModel/AuthService.svc/Login",
                headers=[("Content-Type", "application/json"), ("Accept", "application/json")],
                body=body.encode(), timeout=self._timeout,
            )
        except HttpError as exc:
            raise SaveError(f"login to {self.site} failed: {exc}") from None
        answer: Any = None
        try:
            answer = json.loads(resp.body or b"null")
        except ValueError:
            pass
        code = answer.get("Code") if isinstance(answer, dict) else None
        if resp.status != 200 or code not in (0, "0"):
            detail = answer.get("Message") if isinstance(answer, dict) else resp.body[:200].decode("utf-8", "replace")
            raise SaveError(
                f"login to {self.site} as {self._credentials.user_name!r} refused "
                f"(HTTP {resp.status}, Code {code}): {detail}",
                auth=True,
            )
        cookies = _set_cookies(resp)
        if "BPMCSRF" not in cookies:
            log.warning("login to %s gave no BPMCSRF cookie (CSRF protection off?); going on without it", self.site)
        self._cookies = cookies
        self._session_no += 1
        self.logins += 1
        log.info("logged in to %s as %s", self.site, self._credentials.user_name)

    async def _ensure_session(self, seen: int) -> None:
        async with self._login_lock:
            if self._session_no == seen:
                await self.login()

    async def _call(self, method: str, path: str, payload: dict[str, Any] | None) -> HttpResponse:
        """One authenticated request; on 401/403 a new login and one more try."""
        for attempt in (1, 2):
            seen = self._session_no
            if not self._cookies:
                await self._ensure_session(seen)
                seen = self._session_no
            headers = [("Content-Type", "application/json; charset=utf-8"), ("Accept", "application/json")]
            if self._cookies:
                headers.append(("Cookie", "; ".join(f"{k}={v}" for k, v in self._cookies.items())))
            if "BPMCSRF" in self._cookies:
                headers.append(("BPMCSRF", self._cookies["BPMCSRF"]))
            body = json.dumps(payload, ensure_ascii=False).encode() if payload is not None else b""
            try:
                resp = await request(method, f"{self.site}{path}", headers=headers, body=body, timeout=self._timeout)
            except HttpError as exc:
                raise SaveError(str(exc)) from None
            if resp.status in (401, 403) and attempt == 1:
                log.info("%s answered %d to %s: logging in again", self.site, resp.status, path)
                self._cookies = {}
                await self._ensure_session(seen)
                continue
            return resp
        raise AssertionError("unreachable")

    # ---- writes ------------------------------------------------------------------------------

    async def save(self, record: CallRecord, parent_uid: str = "") -> str:
        """Write the record; returns its id in Creatio. Raises SaveError."""
        if self._api == "odata":
            return await self._save_odata(record, parent_uid)
        return await self._save_msgutil(record, parent_uid)

    async def _save_msgutil(self, record: CallRecord, parent_uid: str) -> str:
        resp = await self._call("POST", "/0/ServiceModel/MsgUtilService.svc/UpdateCall",
                                msgutil_body(record, parent_uid))
        text = resp.body.decode("utf-8", "replace")
        if resp.status != 200:
            raise SaveError(f"UpdateCall: HTTP {resp.status}: {text[:200]}", permanent=resp.status in _REJECTED,
                            auth=resp.status in (401, 403))
        try:
            return parse_update_call_answer(text)
        except ValueError as exc:
            raise SaveError(f"UpdateCall refused: {exc}") from None

    async def _save_odata(self, record: CallRecord, parent_uid: str) -> str:
        uid = record.uid
        if not record.record_uid:
            resp = await self._call("POST", "/0/odata/Call", odata_body(record, parent_uid, create=True))
            if resp.status in (200, 201):
                return _odata_id(resp) or uid
            if resp.status != 409:
                raise _odata_error("create", resp)
            # 409: an earlier try created it and its answer was lost: update it instead
        resp = await self._call("PATCH", f"/0/odata/Call({uid})", odata_body(record, parent_uid, create=False))
        if resp.status in (200, 204):
            return uid
        raise _odata_error("update", resp)


def _odata_id(resp: HttpResponse) -> str:
    try:
        data = json.loads(resp.body or b"{}")
    except ValueError:
        return ""
    value = data.get("Id") if isinstance(data, dict) else None
    return str(value).lower() if isinstance(value, str) else ""


def _odata_error(what: str, resp: HttpResponse) -> SaveError:
    text = resp.body[:300].decode("utf-8", "replace")
    return SaveError(f"OData {what}: HTTP {resp.status}: {text}", permanent=resp.status in _REJECTED,
                     auth=resp.status in (401, 403))


def _set_cookies(resp: HttpResponse) -> dict[str, str]:
    cookies: dict[str, str] = {}
    for header in resp.header_values("set-cookie"):
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(header)
        except CookieError:
            continue
        for name, morsel in jar.items():
            cookies[name] = morsel.value
    return cookies
