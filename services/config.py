"""Typed, validated configuration, loaded once per process.

The Asterisk block is read exactly as the Creatio Messaging Service's ``appsettings.json``
spells it, so an administrator's existing file works unchanged:

* the block is found under a key named ``Asterisk`` (any case, at any depth), or is the
  whole document when that already holds ``url``/``userName``;
* key names are matched case-insensitively, as .NET configuration binding does;
* values may be JSON strings (``"5038"``, ``"true"``) as in CMS's sample, or native JSON;
* ``protocol`` may be written as Creatio's guide writes it, ``SIP/`` or ``PJSIP/``;
* the .NET Framework CMS's ``Terrasoft.Messaging.Service.exe.config`` works too: the same keys
  are the attributes of its ``<asterisk .../>`` element;
* keys we do not use (a real CMS file holds some) are warnings, with the known key suggested
  when one looks like a typo, never a refusal to start.

Our own settings live beside it in an optional ``Cluster`` block; environment variables
(``CMS_AMQP_URL``, ``CMS_REDIS_URL``, ``CMS_PREFIX``) override both. Every error names the
offending key, so a typo fails at start with a message, not at 3 a.m.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import urllib.parse
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.agent_states import DEFAULT_AGENT_CODES, AgentStateCodes
from services.line_access import CONTEXT_RE, SecurityConfig, parse_security

ASTERISK_KEYS = (
    "url",
    "port",
    "userName",
    "secret",
    "originateContext",
    "autoPauseOnCommutationStart",
    "queueExtensionFormat",
    "asyncOriginate",
    "sendRingStartedOnRingingState",
    "traceQueuesState",
    "protocol",
    "packetInfoConfig",
    "filePath",
    "parkingLotContext",
    # ours, not CMS's: the only dialplan contexts a user's OriginateContext may name (docs/security.md)
    "allowedOriginateContexts",
)

_HOST_PORT_RE = re.compile(r"[A-Za-z0-9_.-]+:[0-9]{1,5}|\[[0-9A-Fa-f:.]+\]:[0-9]{1,5}")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the file, the key and the fix."""


@dataclass(frozen=True, slots=True)
class AsteriskConfig:
    """CMS's Asterisk block, with CMS's meaning for every key."""

    url: str = ""
    port: int = 5038
    user_name: str = ""
    secret: str = field(default="", repr=False)
    originate_context: str = "from-internal"
    auto_pause_on_commutation_start: bool = False
    queue_extension_format: str = "Local/{0}@from-queue/n"
    async_originate: bool = True
    send_ring_started_on_ringing_state: bool = True
    trace_queues_state: bool = False
    protocol: str = "SIP"
    packet_info_config: str = ""
    file_path: str = ""
    parking_lot_context: str = ""
    #: contexts an agent's own OriginateContext may name besides ``originate_context`` (docs/security.md)
    allowed_originate_contexts: tuple[str, ...] = ()

    @property
    def uses_pbx(self) -> bool:
        """True when a live AMI peer is configured (not a replay file, not the simulator)."""
        return bool(self.url) and not self.file_path

    def redacted(self) -> dict[str, Any]:
        """The block as it may appear in logs: the secret never does."""
        out: dict[str, Any] = {}
        for name in self.__slots__:
            value = getattr(self, name)
            out[name] = "***" if name == "secret" and value else value
        return out


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Where the shared infrastructure is, and the namespace this deployment uses in it."""

    #: the first broker address (what single-address tools such as the doctor and the launcher use)
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    #: a plain Redis URL, or ``redis+sentinel://host1:26379,host2:26379/master/db`` (services/redis_client.py)
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: prefix of every exchange, queue and Redis key: lets several clusters (or test runs) share servers.
    prefix: str = "cms"
    #: how many recent events each line keeps in Redis for gap repair.
    history_length: int = 1000
    #: commands older than this when they reach the gateway are refused, not executed late.
    command_ttl_seconds: float = 5.0
    #: every broker address, the members of a RabbitMQ cluster (services/broker.py); empty: ``amqp_url`` alone
    amqp_urls: tuple[str, ...] = ()

    @property
    def broker_urls(self) -> tuple[str, ...]:
        return self.amqp_urls or (self.amqp_url,)


@dataclass(frozen=True, slots=True)
class CallRecordsConfig:
    """Optional ``CallRecords`` block: the gateway saves every call of a line whose agent opened a
    session as a record in Creatio (docs/creatio-setup.md). Absent block = off."""

    enabled: bool = False
    #: Creatio site root (``https://crm.example.com``); overrides the agents' ServiceUrl
    site_url: str = ""
    #: other site roots an agent's ServiceUrl may name (the service account's password is only
    #: ever sent to these and to site_url)
    allowed_site_urls: tuple[str, ...] = ()
    user_name: str = ""
    password: str = field(default="", repr=False)
    #: "msgutil" (MsgUtilService.svc/UpdateCall, as CMS does) or "odata" (OData 4 /0/odata/Call)
    api: str = "msgutil"
    #: a record still not saved after this long is given up and the agent told (CALL_SAVING_ERROR)
    retry_for_seconds: float = 900.0
    request_timeout_seconds: float = 10.0
    #: concurrent HTTP requests to Creatio
    concurrency: int = 4

    def redacted(self) -> dict[str, Any]:
        return {name: ("***" if name == "password" and getattr(self, name) else getattr(self, name))
                for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class Settings:
    asterisk: AsteriskConfig
    cluster: ClusterConfig
    source: str = ""
    security: SecurityConfig = field(default_factory=lambda: SecurityConfig())
    call_records: CallRecordsConfig = CallRecordsConfig()
    agent_states: AgentStateCodes = DEFAULT_AGENT_CODES
    #: things worth an administrator's look that do not stop the start (unknown keys, typos)
    warnings: tuple[str, ...] = ()


_GIVE_PATH = "give the path of your CMS appsettings.json or Terrasoft.Messaging.Service.exe.config"


def load_settings(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read a CMS configuration: ``appsettings.json`` (any layout CMS uses) or the .NET Framework
    service's ``*.exe.config`` XML. Every :class:`ConfigError` starts with the file's name."""
    env = os.environ if env is None else env
    document: Any = {}
    source = ""
    warnings: list[str] = []
    if path:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise ConfigError(f"{source}: cannot read: no such file; {_GIVE_PATH}") from None
        except IsADirectoryError:
            raise ConfigError(f"{source}: cannot read: it is a folder; {_GIVE_PATH}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{source}: cannot read: not UTF-8 text; save the file as UTF-8") from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read the configuration file: {exc.strerror}") from None
        document = _parse_xml(text, source) if text.lstrip().startswith("<") else _parse_json(text, source)
    try:
        asterisk_block = _find_block(document, "asterisk") or _bare_asterisk_block(document) or {}
        cluster_block = _find_block(document, "cluster") or {}
        asterisk = parse_asterisk(asterisk_block, warnings=warnings)
        cluster = parse_cluster(cluster_block, env, warnings=warnings)
        security = parse_security(_find_block(document, "security") or {}, asterisk)
        records_block = _find_block(document, "callrecords")
        call_records = parse_call_records(records_block, env) if records_block is not None else CallRecordsConfig()
        states_block = _find_block(document, "agentstates")
        agent_states = parse_agent_states(states_block) if states_block is not None else DEFAULT_AGENT_CODES
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None
    if source:
        warnings = [f"{source}: {w}" for w in warnings]
    return Settings(asterisk=asterisk, cluster=cluster, source=source, security=security, call_records=call_records,
                    agent_states=agent_states, warnings=tuple(warnings))


_STATES_KEYS = ("ready", "wrapUp", "paused", "pbxPaused", "onConnect")
_CODE_RE = re.compile(r"^[^\r\n]{1,100}$")


def parse_agent_states(block: Mapping[str, Any], where: str = "AgentStates") -> AgentStateCodes:
    """``{"ready": "Active" | [...], "wrapUp": "WrapUp", "paused": {"Lunch": "lunch", ...},
    "pbxPaused": "Paused", "onConnect": "pbx" | "profile"}`` (services/agent_states.py has the rules)."""
    values = _fold_keys(block, where)
    unknown = sorted(k for k in values if k not in {n.lower() for n in _STATES_KEYS})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(_STATES_KEYS)}")
    defaults = DEFAULT_AGENT_CODES
    ready_raw = values.get("ready", defaults.ready)
    ready = [ready_raw] if isinstance(ready_raw, str) else ready_raw
    if not isinstance(ready, list) or not ready or not all(isinstance(c, str) and _CODE_RE.match(c) for c in ready):
        raise ConfigError(f"{where}.ready: expected a state code or a list of codes, e.g. \"Active\"")
    paused_raw = values.get("paused", {})
    if not isinstance(paused_raw, Mapping) or not all(
        isinstance(k, str) and _CODE_RE.match(k) and isinstance(v, str) for k, v in paused_raw.items()
    ):
        raise ConfigError(
            f"{where}.paused: expected an object code -> QueuePause reason, e.g. {{\"Lunch\": \"lunch\"}}"
        )
    reader = _Reader(values, where)
    codes = AgentStateCodes(
        ready=ready[0],
        other_ready=tuple(ready[1:]),
        wrap_up=reader.text("wrapUp", defaults.wrap_up),
        paused=reader.text("pbxPaused", defaults.paused),
        pause_reasons=tuple((k, v.strip()) for k, v in paused_raw.items()),
        on_connect=reader.text("onConnect", defaults.on_connect).lower(),
    )
    if codes.on_connect not in ("pbx", "profile"):
        raise ConfigError(f"{where}.onConnect: {codes.on_connect!r} must be \"pbx\" or \"profile\"")
    reasons = [(r or c).casefold() for c, r in codes.pause_reasons] + [codes.wrap_up_reason.casefold()]
    if len(set(reasons)) != len(reasons):
        raise ConfigError(f"{where}.paused: two states pause with the same reason; give each its own, or the "
                          "state cannot be told back from the PBX")
    everything = [*ready, codes.wrap_up, *(c for c, _ in codes.pause_reasons)]
    if len(set(everything)) != len(everything):
        raise ConfigError(f"{where}: a code is listed twice (ready, wrapUp and paused must differ)")
    return codes


_RECORDS_KEYS = ("enabled", "siteUrl", "allowedSiteUrls", "userName", "password", "api", "retryForSeconds",
                 "requestTimeoutSeconds", "concurrency")


def parse_call_records(
    block: Mapping[str, Any], env: Mapping[str, str], where: str = "CallRecords"
) -> CallRecordsConfig:
    """``CMS_CALL_RECORDS_PASSWORD`` (better than the file) and ``CMS_CALL_RECORDS_USER`` override the block."""
    values = _fold_keys(block, where)
    unknown = sorted(k for k in values if k not in {n.lower() for n in _RECORDS_KEYS})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(_RECORDS_KEYS)}")
    if env.get("CMS_CALL_RECORDS_PASSWORD"):
        values["password"] = env["CMS_CALL_RECORDS_PASSWORD"]
    if env.get("CMS_CALL_RECORDS_USER"):
        values["username"] = env["CMS_CALL_RECORDS_USER"]
    reader = _Reader(values, where)
    defaults = CallRecordsConfig()
    allowed_raw = values.get("allowedsiteurls") or []
    if isinstance(allowed_raw, str):
        allowed_raw = [u for u in allowed_raw.split(",") if u.strip()]
    if not isinstance(allowed_raw, list) or not all(isinstance(u, str) for u in allowed_raw):
        raise ConfigError(f"{where}.allowedSiteUrls: expected a list of URLs such as [\"https://crm.example.com\"]")
    cfg = CallRecordsConfig(
        enabled=reader.boolean("enabled", True),
        site_url=site_root(reader.text("siteUrl", ""), f"{where}.siteUrl") if values.get("siteurl") else "",
        allowed_site_urls=tuple(site_root(u, f"{where}.allowedSiteUrls") for u in allowed_raw),
        user_name=reader.text("userName", ""),
        password=reader.text("password", ""),
        api=reader.text("api", defaults.api).lower(),
        retry_for_seconds=reader.number("retryForSeconds", defaults.retry_for_seconds, low=1, high=7 * 86400),
        request_timeout_seconds=reader.number(
            "requestTimeoutSeconds", defaults.request_timeout_seconds, low=0.5, high=120
        ),
        concurrency=reader.integer("concurrency", defaults.concurrency, low=1, high=64),
    )
    if not cfg.enabled:
        return cfg
    if cfg.api not in ("msgutil", "odata"):
        raise ConfigError(f"{where}.api: {cfg.api!r} must be \"msgutil\" (MsgUtilService, as CMS) or \"odata\"")
    if not cfg.user_name:
        raise ConfigError(f"{where}.userName: required (the Creatio service account that writes call records)")
    if not cfg.password:
        raise ConfigError(f"{where}.password: required; set it in the file or in CMS_CALL_RECORDS_PASSWORD")
    if not cfg.site_url and not cfg.allowed_site_urls:
        raise ConfigError(
            f"{where}.siteUrl: required (e.g. \"https://crm.example.com\"), or list the sites agents may name "
            f"in {where}.allowedSiteUrls; the service account's password is sent nowhere else"
        )
    return cfg


def site_root(url: str, where: str) -> str:
    """A Creatio site root from what an admin or a client gives: scheme://host[:port][/path], without
    the workspace suffix ``/0`` and trailing slashes (``https://crm/0/`` -> ``https://crm``)."""
    text = url.strip().rstrip("/")
    if text.endswith("/0"):
        text = text[:-2]
    if not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~\-/]*)?", text):
        raise ConfigError(f"{where}: {url!r} must be an http:// or https:// site URL such as https://crm.example.com")
    return text


def _parse_json(text: str, source: str) -> dict[str, Any]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{source}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg}); fix the file at that line and column"
        ) from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid JSON (nested too deeply)") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object {{...}} holding the Asterisk block")
    return document


def _parse_xml(text: str, source: str) -> dict[str, Any]:
    """The .NET Framework CMS keeps the block as ``<asterisk url=".." port=".." .../>`` somewhere
    in its ``.exe.config``; our ``<cluster .../>`` element may sit beside it. Entities are not
    expanded: a configuration file has no use for them and they are the usual XML attack."""
    if "<!ENTITY" in text or "<!DOCTYPE" in text:
        raise ConfigError(f"{source}: DOCTYPE/ENTITY declarations are not allowed in the configuration file")
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        line, column = exc.position
        raise ConfigError(f"{source}:{line}:{column + 1}: not well-formed XML; fix the file at that line") from None
    document: dict[str, Any] = {}
    for element in root.iter():
        tag = element.tag.rsplit("}", 1)[-1].lower() if isinstance(element.tag, str) else ""
        if tag in ("asterisk", "cluster") and tag not in document:
            document[tag] = dict(element.attrib)
    if "asterisk" not in document:
        raise ConfigError(f"{source}: no <asterisk .../> element; add the one from CMS's setup guide")
    return document


def parse_asterisk(
    block: Mapping[str, Any], where: str = "Asterisk", *, warnings: list[str] | None = None
) -> AsteriskConfig:
    """Read CMS's block. Unknown keys go to ``warnings`` when a list is given, else they are errors
    (callers that build a block themselves want to hear of a typo at once)."""
    values = _fold_keys(block, where)
    _unknown_keys(values, ASTERISK_KEYS, where, warnings)
    reader = _Reader(values, where)
    defaults = AsteriskConfig()
    cfg = AsteriskConfig(
        url=reader.text("url", defaults.url),
        port=reader.integer("port", defaults.port, low=1, high=65535),
        user_name=reader.text("userName", defaults.user_name),
        secret=reader.text("secret", defaults.secret),
        originate_context=reader.text("originateContext", defaults.originate_context),
        auto_pause_on_commutation_start=reader.boolean(
            "autoPauseOnCommutationStart", defaults.auto_pause_on_commutation_start
        ),
        queue_extension_format=reader.text("queueExtensionFormat", defaults.queue_extension_format),
        async_originate=reader.boolean("asyncOriginate", defaults.async_originate),
        send_ring_started_on_ringing_state=reader.boolean(
            "sendRingStartedOnRingingState", defaults.send_ring_started_on_ringing_state
        ),
        trace_queues_state=reader.boolean("traceQueuesState", defaults.trace_queues_state),
        protocol=_channel_technologies(reader.text("protocol", defaults.protocol), where),
        packet_info_config=reader.text("packetInfoConfig", defaults.packet_info_config),
        file_path=reader.text("filePath", defaults.file_path),
        parking_lot_context=reader.text("parkingLotContext", defaults.parking_lot_context),
        allowed_originate_contexts=reader.names("allowedOriginateContexts", CONTEXT_RE, "a dialplan context"),
    )
    if cfg.queue_extension_format and "{0}" not in cfg.queue_extension_format:
        raise ConfigError(
            f"{where}.queueExtensionFormat: {cfg.queue_extension_format!r} must contain {{0}} "
            "where the line number goes, e.g. Local/{0}@from-queue/n"
        )
    if cfg.url and not cfg.file_path and not cfg.user_name:
        raise ConfigError(f"{where}.userName: required when {where}.url names a PBX")
    return cfg


CLUSTER_KEYS = (
    "amqpUrl", "amqpUrls", "redisUrl", "sentinels", "sentinelMaster", "prefix", "historyLength", "commandTtlSeconds",
)


def parse_cluster(
    block: Mapping[str, Any], env: Mapping[str, str], where: str = "Cluster", *, warnings: list[str] | None = None
) -> ClusterConfig:
    values = _fold_keys(block, where)
    defaults = ClusterConfig()
    _unknown_keys(values, CLUSTER_KEYS, where, warnings)
    for env_name, key in (("CMS_AMQP_URL", "amqpurl"), ("CMS_REDIS_URL", "redisurl"), ("CMS_PREFIX", "prefix")):
        if env.get(env_name):
            values[key] = env[env_name]
            if key == "amqpurl":
                values.pop("amqpurls", None)  # the environment's list replaces the file's
            if key == "redisurl":
                values.pop("sentinels", None)
    reader = _Reader(values, where)
    amqp_urls = _amqp_urls(reader, values, where, defaults.amqp_url)
    cfg = ClusterConfig(
        amqp_url=amqp_urls[0],
        amqp_urls=amqp_urls if len(amqp_urls) > 1 else (),
        redis_url=_redis_url(reader, values, where, defaults.redis_url),
        prefix=reader.text("prefix", defaults.prefix),
        history_length=reader.integer("historyLength", defaults.history_length, low=10, high=1_000_000),
        command_ttl_seconds=reader.number("commandTtlSeconds", defaults.command_ttl_seconds, low=0.1, high=600),
    )
    if not _PREFIX_RE.match(cfg.prefix):
        raise ConfigError(f"{where}.prefix: {cfg.prefix!r} must be 1-64 letters, digits, '_', '.', '-'")
    return cfg


def _amqp_urls(reader: _Reader, values: Mapping[str, Any], where: str, default: str) -> tuple[str, ...]:
    """``amqpUrls`` (a list or a comma-separated string) or ``amqpUrl`` (one, or comma-separated)."""
    key = "amqpUrls" if values.get("amqpurls") not in (None, "", []) else "amqpUrl"
    raw = values.get(key.lower())
    if raw is None or raw == "":
        items: list[Any] = [default]
    elif isinstance(raw, str):
        items = raw.split(",")
    elif isinstance(raw, list):
        items = raw
    else:
        raise ConfigError(f"{where}.{key}: expected a URL, a list of URLs or a comma-separated string")
    urls = tuple(str(i).strip() for i in items if isinstance(i, str) and i.strip())
    if len(urls) != len([i for i in items if not isinstance(i, str) or i.strip()]):
        raise ConfigError(f"{where}.{key}: every broker address must be a string like amqp://user:pass@host:5672/")
    for url in urls:
        if not url.startswith(("amqp://", "amqps://")):
            raise ConfigError(f"{where}.{key}: {redact_url(url)!r} must start with amqp:// or amqps://")
    if len(set(urls)) != len(urls):
        raise ConfigError(f"{where}.{key}: a broker address is listed twice; list each cluster member once")
    return urls


def _redis_url(reader: _Reader, values: Mapping[str, Any], where: str, default: str) -> str:
    """``redisUrl``, or Sentinel discovery from ``sentinels`` + ``sentinelMaster`` (the URL then gives
    the password and database)."""
    url = reader.text("redisUrl", default)
    raw = values.get("sentinels")
    items = raw.split(",") if isinstance(raw, str) else raw if raw is not None else []
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{where}.sentinels: expected a list of host:port strings or a comma-separated string")
    sentinels = [i.strip() for i in items if i.strip()]
    for address in sentinels:
        if not _HOST_PORT_RE.fullmatch(address):
            raise ConfigError(f"{where}.sentinels: {address!r} is not host:port (e.g. 10.0.0.5:26379)")
    master = reader.text("sentinelMaster", "")
    if sentinels or master:
        if not (sentinels and master):
            raise ConfigError(f"{where}.sentinels and {where}.sentinelMaster: give both (the Sentinels' host:port "
                              "list and the name they monitor), or neither")
        if not url.startswith(("redis://", "rediss://")):
            raise ConfigError(f"{where}.redisUrl: with sentinels it must be redis://[:password@]host/db "
                              "(only its password and database are used)")
        parts = urllib.parse.urlsplit(url)
        auth = f"{parts.netloc.rsplit('@', 1)[0]}@" if "@" in parts.netloc else ""
        db = parts.path.strip("/") or "0"
        scheme = "rediss+sentinel" if url.startswith("rediss://") else "redis+sentinel"
        url = f"{scheme}://{auth}{','.join(sentinels)}/{master}/{db}"
    if not url.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://")):
        raise ConfigError(f"{where}.redisUrl: must start with redis://, rediss://, unix:// or redis+sentinel://")
    if url.startswith(("redis+sentinel://", "rediss+sentinel://")):
        from services.redis_client import RedisUrlError, parse_sentinel_url

        try:
            parse_sentinel_url(url)
        except RedisUrlError as exc:
            raise ConfigError(f"{where}.redisUrl: {exc}") from None
    return url


def redact_url(url: str) -> str:
    """amqp://user:secret@host/ -> amqp://user:***@host/ (for logs)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def _channel_technologies(value: str, where: str) -> str:
    """``SIP``, ``PJSIP``, ``PJSIP/`` (the guide's spelling) or a list ``SIP, PJSIP`` -> ``PJSIP`` / ``SIP,PJSIP``."""
    techs = [t.strip().removesuffix("/").strip() for t in value.split(",")]
    techs = [t for t in techs if t]
    if not techs or any(not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", t) for t in techs):
        raise ConfigError(
            f"{where}.protocol: {value!r} is not a channel technology; write SIP/ or PJSIP/ (or SIP, PJSIP)"
        )
    return ",".join(techs)


def _unknown_keys(values: Mapping[str, Any], known: tuple[str, ...], where: str, warnings: list[str] | None) -> None:
    by_folded = {k.lower(): k for k in known}
    for key in sorted(k for k in values if k not in by_folded):
        close = difflib.get_close_matches(key, list(by_folded), n=1, cutoff=0.75)
        hint = f"; did you mean {by_folded[close[0]]}?" if close else "; it is ignored"
        message = f"{where}.{key}: unknown key{hint}"
        if warnings is None:
            raise ConfigError(f"{message} (known keys: {', '.join(known)})")
        warnings.append(message)


def _find_block(document: Any, name: str) -> dict[str, Any] | None:
    """Depth-first search for a key called ``name`` (any case) whose value is an object."""
    if not isinstance(document, dict):
        return None
    for key, value in document.items():
        if isinstance(key, str) and key.lower() == name and isinstance(value, dict):
            return value
    for value in document.values():
        found = _find_block(value, name)
        if found is not None:
            return found
    return None


def _bare_asterisk_block(document: dict[str, Any]) -> dict[str, Any] | None:
    """A document that is itself the Asterisk block (it holds url or userName at the top). CMS's
    values are all scalars: an object beside them is another block (Cluster, Security, Logging...)."""
    if any(str(k).lower() in ("url", "username") for k in document):
        return {k: v for k, v in document.items() if not isinstance(v, dict)}
    return None


def _fold_keys(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(block, Mapping):
        raise ConfigError(f"{where}: must be a JSON object")
    folded: dict[str, Any] = {}
    for key, value in block.items():
        low = str(key).lower()
        if low in folded:
            raise ConfigError(f"{where}.{key}: given twice (keys are case-insensitive)")
        folded[low] = value
    return folded


class _Reader:
    def __init__(self, values: dict[str, Any], where: str) -> None:
        self._values = values
        self._where = where

    def _get(self, key: str) -> Any:
        return self._values.get(key.lower())

    def text(self, key: str, default: str) -> str:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{self._where}.{key}: expected a string, got {type(value).__name__}")
        return str(value).strip()

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None or value == "":
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{self._where}.{key}: expected true or false, got {value!r}")

    def names(self, key: str, pattern: re.Pattern[str], kind: str) -> tuple[str, ...]:
        """A JSON list of names, or one comma-separated string (as CMS-style configs spell lists)."""
        value = self._get(key)
        if value is None or value == "":
            return ()
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{self._where}.{key}: expected a list of strings or a comma-separated string")
        names = tuple(i.strip() for i in items if i.strip())
        for name in names:
            if not pattern.fullmatch(name):
                raise ConfigError(f"{self._where}.{key}: {name!r} is not {kind} (letters, digits, '_', '-')")
        return names

    def integer(self, key: str, default: int, *, low: int, high: int) -> int:
        return int(self._bounded(key, default, int, "a whole number", low, high))

    def number(self, key: str, default: float, *, low: float, high: float) -> float:
        return float(self._bounded(key, default, float, "a number", low, high))

    def _bounded(
        self, key: str, default: float, convert: type[int] | type[float], kind: str, low: float, high: float
    ) -> float:
        value = self._get(key)
        if value is None or value == "":
            return default
        try:
            if isinstance(value, bool):
                raise ValueError
            number = convert(str(value).strip())
        except ValueError:
            raise ConfigError(f"{self._where}.{key}: expected {kind}, got {value!r}") from None
        if not low <= number <= high:
            raise ConfigError(f"{self._where}.{key}: {number} is outside {low}..{high}")
        return number
