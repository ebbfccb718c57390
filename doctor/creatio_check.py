"""The Creatio site and service account that call records are written with: log in through
Creatio's public ``AuthService.svc/Login`` and read one row of ``Call`` over OData with the
session it gives (its ``BPMCSRF`` cookie echoed as a header, as Creatio requires)."""

from __future__ import annotations

import asyncio
import http.cookiejar
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from doctor.report import Result, failed, passed, skipped


@dataclass(frozen=True, slots=True)
class CreatioAccount:
    site: str
    user: str
    password: str = field(repr=False)


def site_root(url: str) -> str:
    """``https://crm.example.com/0/`` -> ``https://crm.example.com`` (AuthService lives at the root)."""
    root = url.strip().rstrip("/")
    return root[:-2] if root.endswith("/0") else root


def _login_and_read(account: CreatioAccount, timeout: float) -> list[Result]:
    root = site_root(account.site)
    parsed = urllib.parse.urlsplit(root)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        return [failed("Creatio site", f"{account.site!r} is not an http(s) URL",
                       "give the site's address as in the browser, e.g. https://crm.example.com")]
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    body = json.dumps({"UserName": account.user, "UserPassword": account.password}).encode()
    request = urllib.request.Request(
        f"{root}/ServiceModel/AuthService.svc/Login", data=body, method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    name = f"Creatio login as {account.user}"
    try:
        with opener.open(request, timeout=timeout) as response:
            answer = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return [failed(name, f"{root}: HTTP {exc.code} from AuthService.svc/Login",
                       "is this the Creatio site's root address (what the browser shows before /0/...)?")]
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        return [failed(name, f"cannot reach {root}: {reason}",
                       "the site address, and that this machine can reach it (proxy, firewall, DNS)")]
    except ValueError:
        return [failed(name, f"{root}: the login answer is not JSON", "is this a Creatio site?")]
    code = answer.get("Code") if isinstance(answer, dict) else None
    if code != 0:
        message = answer.get("Message") if isinstance(answer, dict) else None
        return [failed(name, f"refused: {message or answer!r}",
                       "the service account's user name and password (a Creatio user allowed to log in, "
                       "license assigned)")]
    csrf = next((c.value for c in jar if c.name == "BPMCSRF"), None)
    results = [passed(name, f"{root}")]
    headers = {"Accept": "application/json"}
    if csrf:
        headers["BPMCSRF"] = csrf
    read_name = "Creatio call records readable (OData Call)"
    last = ""
    for path in ("/0/odata/Call?$top=1&$select=Id", "/odata/Call?$top=1&$select=Id"):
        try:
            with opener.open(urllib.request.Request(root + path, headers=headers), timeout=timeout) as response:
                json.loads(response.read() or b"{}")
            results.append(passed(read_name, f"{root}{path.split('?')[0]}"))
            return results
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code} on {path.split('?')[0]}"
            if exc.code != 404:
                break
        except (urllib.error.URLError, OSError, TimeoutError, ValueError) as exc:
            last = f"{path.split('?')[0]}: {exc}"
            break
    results.append(failed(read_name, last,
                          "give the service account read and write access to the Call object "
                          "(Object permissions in Creatio's System Designer)"))
    return results


async def check_creatio(account: CreatioAccount | None, timeout: float = 10.0) -> list[Result]:
    if account is None:
        return [skipped("Creatio call records", "no site configured (--creatio-url, --creatio-user, "
                                               "CMS_DOCTOR_CREATIO_PASSWORD)")]
    return await asyncio.to_thread(_login_and_read, account, timeout)
