"""Who may open which line: the administrator's assignments and the first-come rule (pure).

Creatio keeps each user's line ("Number"), outgoing call context and debug switch in the user's
Call Centre parameters, and its client sends them to us in ``connectionParams``: a browser can
put anything there. The ``Security`` block of our configuration restates the part that decides
access, so the server, not the browser, has the last word::

    "Security": {
      "users": [
        {"userUId": "410006e1-...", "name": "Jane Roe", "line": "305",
         "originateContext": "from-internal", "debug": false}
      ],
      "sharedLines": ["100"],
      "requireAssignment": false
    }

Rules (:func:`decide`), checked every time a connection opens a line:

1. A line assigned to users (``users[].line``) is opened only by those users.
2. A user with assignments opens only the lines assigned to them.
3. Other lines: refused when ``requireAssignment`` is true; otherwise the first user to open the
   line holds it while any of their tabs is open (and for ``holderTtlSeconds`` after a node dies
   under them), and a different user is refused unless the line is in ``sharedLines``.

Users are Creatio UserUIds, compared case-insensitively; ``name`` is for the administrator only.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

_LINE_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_UID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: A dialplan context name wherever one is accepted: Asterisk.allowedOriginateContexts, Security.users[],
#: connectionParams.OriginateContext and the commands the gateway plans. Nothing that could end an AMI header.
CONTEXT_RE = re.compile(r"[A-Za-z0-9_.-]{1,80}")


class ContextPolicy(Protocol):
    """The Asterisk block's say on contexts (services.config.AsteriskConfig)."""

    @property
    def originate_context(self) -> str: ...

    @property
    def allowed_originate_contexts(self) -> tuple[str, ...]: ...


def originate_context_refusal(context: str, policy: ContextPolicy) -> str | None:
    """Why an agent may not originate into ``context`` (``None``: it may): the server's ``originateContext``
    and the contexts in ``allowedOriginateContexts``, nothing else, as a browser can name any context in
    connectionParams (``from-trunk`` would dial out for free). The one check of the node (at
    OpenConnection, to tell the agent early), the gateway (before any Originate) and the configuration
    (a user's assigned context)."""
    if not CONTEXT_RE.fullmatch(context):
        return f"bad dialplan context {context[:80]!r}"
    if context == policy.originate_context or context in policy.allowed_originate_contexts:
        return None
    allowed = ", ".join(dict.fromkeys((policy.originate_context, *policy.allowed_originate_contexts)))
    return (
        f"dialplan context {context[:80]!r} is not allowed on this server (allowed: {allowed}); "
        "the administrator adds it to Asterisk.allowedOriginateContexts or clears the user's "
        "Outgoing call context"
    )


@dataclass(frozen=True, slots=True)
class UserAssignment:
    """One row of the administrator's line-to-user table."""

    user_uid: str
    line: str
    name: str = ""
    #: the user's outgoing call context; empty = the server's ``originateContext``
    originate_context: str = ""
    #: whether this user's ``debugMode`` is honoured (bounded per user, see SecurityConfig)
    debug: bool = False


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    users: tuple[UserAssignment, ...] = ()
    shared_lines: frozenset[str] = frozenset()
    require_assignment: bool = False
    #: how long a line stays held by a user whose node died without releasing it
    holder_ttl_seconds: float = 60.0
    #: a debugging user's traffic lines logged per minute, and the longest line logged
    debug_lines_per_minute: int = 120
    debug_max_chars: int = 2000
    _by_user: Mapping[str, tuple[UserAssignment, ...]] = field(default_factory=dict, repr=False, compare=False)
    _by_line: Mapping[str, frozenset[str]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_user: dict[str, list[UserAssignment]] = {}
        by_line: dict[str, set[str]] = {}
        for entry in self.users:
            by_user.setdefault(entry.user_uid.lower(), []).append(entry)
            by_line.setdefault(entry.line, set()).add(entry.user_uid.lower())
        object.__setattr__(self, "_by_user", {k: tuple(v) for k, v in by_user.items()})
        object.__setattr__(self, "_by_line", {k: frozenset(v) for k, v in by_line.items()})

    def assignments_of(self, user_uid: str) -> tuple[UserAssignment, ...]:
        return self._by_user.get(user_uid.lower(), ()) if user_uid else ()

    def assignment(self, user_uid: str, line: str) -> UserAssignment | None:
        for entry in self.assignments_of(user_uid):
            if entry.line == line:
                return entry
        return None

    def users_of(self, line: str) -> frozenset[str]:
        return self._by_line.get(line, frozenset())

    def debug_allowed(self, user_uid: str, line: str) -> bool:
        entry = self.assignment(user_uid, line)
        return entry is not None and entry.debug


class Verdict(enum.Enum):
    ALLOW = "allow"
    REFUSE = "refuse"
    #: allowed by configuration alone, if no other user holds the line (ask the holder store)
    FIRST_COME = "first-come"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    #: short, stable: a metric label and a log key
    reason: str
    #: for the agent's ERROR frame
    message: str = ""

    @property
    def allowed(self) -> bool:
        return self.verdict is not Verdict.REFUSE


def decide(config: SecurityConfig, line: str, user_uid: str, holders: Collection[str] | None = None) -> Decision:
    """May ``user_uid`` open ``line``? ``holders`` are the users holding the line now (``None``:
    not asked yet, or unknown because the holder store is down: the first-come rule then admits)."""
    user = user_uid.lower()
    assigned = config.users_of(line)
    if assigned:
        if user and user in assigned:
            return Decision(Verdict.ALLOW, "assigned")
        return Decision(Verdict.REFUSE, "assigned_to_other", f"line {line} is assigned to another user")
    own = config.assignments_of(user)
    if own:
        lines = ", ".join(sorted({entry.line for entry in own}))
        return Decision(Verdict.REFUSE, "not_your_line", f"this user is assigned line(s) {lines}, not {line}")
    if config.require_assignment:
        return Decision(Verdict.REFUSE, "unassigned", f"line {line} is not assigned to this user")
    if line in config.shared_lines:
        return Decision(Verdict.ALLOW, "shared")
    if holders is None:
        return Decision(Verdict.FIRST_COME, "first_come")
    others = {h.lower() for h in holders} - {user}
    if others:
        return Decision(Verdict.REFUSE, "held_by_other", f"line {line} is in use by another user")
    return Decision(Verdict.ALLOW, "first_come")


def parse_security(block: Mapping[str, Any], asterisk: Any, where: str = "Security") -> SecurityConfig:
    """The ``Security`` block; ``asterisk`` (an AsteriskConfig) checks each user's context."""
    from services.config import ConfigError, _fold_keys

    values = _fold_keys(block, where)
    known = {
        "users": "users", "sharedlines": "sharedLines", "requireassignment": "requireAssignment",
        "holderttlseconds": "holderTtlSeconds", "debuglinesperminute": "debugLinesPerMinute",
        "debugmaxchars": "debugMaxChars",
    }
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(known.values())}")
    users_raw = values.get("users")
    users_raw = [] if users_raw is None else users_raw
    if not isinstance(users_raw, list):
        raise ConfigError(f"{where}.users: expected a list of {{userUId, line, ...}} objects")
    users = tuple(_parse_user(item, f"{where}.users[{i}]", asterisk) for i, item in enumerate(users_raw))
    seen: set[tuple[str, str]] = set()
    for i, entry in enumerate(users):
        pair = (entry.user_uid.lower(), entry.line)
        if pair in seen:
            raise ConfigError(f"{where}.users[{i}]: user {entry.user_uid} is given line {entry.line} twice")
        seen.add(pair)
    shared_raw = values.get("sharedlines")
    shared_raw = [] if shared_raw is None else shared_raw
    if isinstance(shared_raw, str):
        shared_raw = [s for s in shared_raw.split(",") if s.strip()]
    if not isinstance(shared_raw, list) or not all(isinstance(s, str) and _LINE_RE.fullmatch(s.strip())
                                                   for s in shared_raw):
        raise ConfigError(f"{where}.sharedLines: expected a list of line names (letters, digits, '_', '-')")
    return SecurityConfig(
        users=users,
        shared_lines=frozenset(s.strip() for s in shared_raw),
        require_assignment=_flag(values.get("requireassignment"), f"{where}.requireAssignment"),
        holder_ttl_seconds=_number(values.get("holderttlseconds"), 60.0, 5.0, 3600.0, f"{where}.holderTtlSeconds"),
        debug_lines_per_minute=int(
            _number(values.get("debuglinesperminute"), 120, 1, 100_000, f"{where}.debugLinesPerMinute")
        ),
        debug_max_chars=int(_number(values.get("debugmaxchars"), 2000, 100, 1_000_000, f"{where}.debugMaxChars")),
    )


def _parse_user(item: Any, where: str, asterisk: Any) -> UserAssignment:
    from services.config import ConfigError, _fold_keys

    if not isinstance(item, Mapping):
        raise ConfigError(f"{where}: expected an object such as {{\"userUId\": \"...\", \"line\": \"305\"}}")
    values = _fold_keys(item, where)
    allowed = {"useruid": "userUId", "name": "name", "line": "line", "originatecontext": "originateContext",
               "debug": "debug"}
    unknown = sorted(k for k in values if k not in allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; expected some of "
                          f"{', '.join(allowed.values())}")
    uid, line = values.get("useruid"), values.get("line")
    if not isinstance(uid, str) or not _UID_RE.fullmatch(uid.strip()):
        raise ConfigError(f"{where}.userUId: required, the user's Creatio UserUId (the Id of SysAdminUnit)")
    if isinstance(line, int) and not isinstance(line, bool):
        line = str(line)
    if not isinstance(line, str) or not _LINE_RE.fullmatch(line.strip()):
        raise ConfigError(f"{where}.line: required, the line as in Creatio's 'Number' field, e.g. \"305\"")
    context = values.get("originatecontext") or ""
    if not isinstance(context, str) or (context and not CONTEXT_RE.fullmatch(context.strip())):
        raise ConfigError(f"{where}.originateContext: not a dialplan context name (letters, digits, '_', '-', '.')")
    context = context.strip()
    if context:
        refusal = originate_context_refusal(context, asterisk)
        if refusal is not None:
            raise ConfigError(f"{where}.originateContext: {context!r} must also be listed in "
                              "Asterisk.allowedOriginateContexts")
    name = values.get("name") or ""
    if not isinstance(name, str):
        raise ConfigError(f"{where}.name: expected a string")
    return UserAssignment(
        user_uid=uid.strip(), line=line.strip(), name=name.strip()[:200], originate_context=context,
        debug=_flag(values.get("debug"), f"{where}.debug"),
    )


def _flag(value: Any, where: str) -> bool:
    from services.config import ConfigError

    if value is None or value == "":
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise ConfigError(f"{where}: expected true or false, got {value!r}")


def _number(value: Any, default: float, low: float, high: float, where: str) -> float:
    from services.config import ConfigError

    if value is None or value == "":
        return default
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(str(value).strip())
    except ValueError:
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if not low <= number <= high:
        raise ConfigError(f"{where}: {number:g} is outside {low:g}..{high:g}")
    return number
