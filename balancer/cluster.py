"""Typed, validated description of the cluster that HAProxy fronts.

One frozen dataclass tree, built in one place (`ClusterDescription.from_dict`), so that a JSON file and
the command-line flags go through the same checks. Every error names the offending key
(`nodes[1].port`, `deployment_key`, ...).

Every string here ends up verbatim in haproxy.cfg, so the validators are strict on purpose: no
whitespace, quotes or comment characters can reach the config, and the deployment key is limited to
URL-unreserved characters so that the client sends it in the URL exactly as written (HAProxy's
`urlp()` compares raw, undecoded query values).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BACKEND_NAME",
    "ClusterConfigError",
    "ClusterDescription",
    "DnsDiscovery",
    "Node",
    "load_cluster",
    "parse_node_flag",
]

#: Name of the HAProxy backend holding the ws_node servers; the runtime API commands use it.
BACKEND_NAME = "ws_nodes"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
# RFC 3986 "unreserved": survives any URL handling unchanged, and is safe inside haproxy.cfg.
_KEY_RE = re.compile(r"^[A-Za-z0-9._~-]{16,256}$")
_ORIGIN_RE = re.compile(r"^https?://[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?$")
# Paths and log targets: anything printable except what would break a haproxy.cfg token.
_TOKEN_RE = re.compile(r"^[^\s\"'#\\]+$")
_RESOLVER_RE = re.compile(r"^[0-9A-Fa-f.:\[\]]+:[0-9]{1,5}$")


class ClusterConfigError(ValueError):
    """The cluster description is invalid; the message starts with the key at fault."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def _check_port(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ClusterConfigError(key, f"expected an integer port 1-65535, got {value!r}")
    return value


def _check_host(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ClusterConfigError(key, f"expected a host name or IP address, got {value!r}")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME_RE.match(value):
            raise ClusterConfigError(key, f"not a valid host name or IP address: {value!r}") from None
    return value


def _check_path(key: str, value: object) -> Path:
    if not isinstance(value, str | Path) or not str(value) or not _TOKEN_RE.match(str(value)):
        raise ClusterConfigError(
            key, f"expected a file path without whitespace, quotes, '#' or backslashes, got {value!r}"
        )
    return Path(value)


def _format_addr(host: str, port: int) -> str:
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Node:
    """One ws_node process: its HTTP/WebSocket port (the one serving `/`, `/health`, `/negotiate`)."""

    name: str
    host: str
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ClusterConfigError(
                "name", f"expected 1-63 characters [A-Za-z0-9_.-] starting alphanumeric, got {self.name!r}"
            )
        _check_host("host", self.host)
        _check_port("port", self.port)

    @property
    def address(self) -> str:
        """`host:port` as HAProxy wants it (IPv6 in brackets)."""
        return _format_addr(self.host, self.port)


@dataclass(frozen=True, slots=True)
class DnsDiscovery:
    """Nodes found by DNS instead of listed: every replica answers to one name with an A record of its own
    (Docker Compose's embedded DNS, a Kubernetes headless service). HAProxy keeps ``slots`` servers
    ``ws1..wsN`` (what ``python -m balancer drain`` takes) and fills them from the answers."""

    name: str
    port: int = 8081
    slots: int = 16
    #: the DNS server HAProxy asks (Docker's embedded one by default)
    resolver: str = "127.0.0.11:53"

    def __post_init__(self) -> None:
        # HAProxy's resolver takes letters, digits, '-' and '.'; a Compose service name with '_' needs an alias.
        if not isinstance(self.name, str) or not _HOSTNAME_RE.match(self.name):
            raise ClusterConfigError("name", f"{self.name!r} must be a DNS name: letters, digits, '-' and '.' only")
        _check_port("port", self.port)
        if isinstance(self.slots, bool) or not isinstance(self.slots, int) or not 1 <= self.slots <= 1000:
            raise ClusterConfigError("slots", f"expected an integer 1-1000, got {self.slots!r}")
        if not isinstance(self.resolver, str) or not _RESOLVER_RE.match(self.resolver):
            raise ClusterConfigError("resolver", f"expected ip:port, got {self.resolver!r}")


@dataclass(frozen=True, slots=True)
class ClusterDescription:
    """Everything `render_config` needs. Defaults suit a local run on 127.0.0.1."""

    nodes: tuple[Node, ...]
    bind: str = "127.0.0.1"
    ws_port: int = 2013
    wss_port: int = 2014
    #: PEM with certificate chain and private key; None means no TLS frontend on `wss_port`.
    tls_cert: Path | None = None
    #: When set, every request on the client ports must carry `?key=<deployment_key>`, else 403.
    deployment_key: str | None = None
    #: When non-empty, a request whose Origin header is not listed gets 403 (no Origin: allowed).
    allowed_origins: tuple[str, ...] = ()
    #: HAProxy stats page (`/stats`) and Prometheus exporter (`/metrics`); None disables both.
    stats_port: int | None = 8404
    stats_bind: str = "127.0.0.1"
    runtime_socket: Path = Path("/run/haproxy/admin.sock")
    pidfile: Path = Path("/run/haproxy/haproxy.pid")
    #: `master-worker` in `global`: reload by SIGUSR2 to the master (see haproxy_ctl.reload).
    master_worker: bool = True
    maxconn: int = 50000
    #: `stdout`/`stderr` (raw format, for containers and supervisors) or a syslog target such as `/dev/log`.
    log_target: str = "stdout"
    health_path: str = "/health"
    #: nodes found by DNS (``nodes`` is then empty); None: the ``nodes`` listed are all there are
    discovery: DnsDiscovery | None = None

    def __post_init__(self) -> None:
        if self.discovery is not None:
            if not isinstance(self.discovery, DnsDiscovery):
                raise ClusterConfigError("discovery", f"expected a DnsDiscovery, got {self.discovery!r}")
            if self.nodes:
                raise ClusterConfigError("nodes", "list nodes or discover them by DNS, not both")
        elif not isinstance(self.nodes, tuple) or not self.nodes:
            raise ClusterConfigError("nodes", "at least one node is required")
        seen_names: set[str] = set()
        seen_addrs: set[str] = set()
        for i, node in enumerate(self.nodes):
            if not isinstance(node, Node):
                raise ClusterConfigError(f"nodes[{i}]", f"expected a Node, got {node!r}")
            if node.name in seen_names:
                raise ClusterConfigError(f"nodes[{i}].name", f"duplicate node name {node.name!r}")
            if node.address in seen_addrs:
                raise ClusterConfigError(f"nodes[{i}]", f"duplicate node address {node.address}")
            seen_names.add(node.name)
            seen_addrs.add(node.address)
        for key in ("bind", "stats_bind"):
            value = getattr(self, key)
            if not isinstance(value, str):
                raise ClusterConfigError(key, f"expected an IP address, got {value!r}")
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ClusterConfigError(key, f"expected an IP address, got {value!r}") from None
        _check_port("ws_port", self.ws_port)
        _check_port("wss_port", self.wss_port)
        if self.stats_port is not None:
            _check_port("stats_port", self.stats_port)
        ports = {"ws_port": self.ws_port}
        if self.tls_cert is not None:
            ports["wss_port"] = self.wss_port
        if self.stats_port is not None:
            ports["stats_port"] = self.stats_port
        by_port: dict[int, str] = {}
        for key, port in ports.items():
            if port in by_port:
                raise ClusterConfigError(key, f"port {port} is already used by {by_port[port]}")
            by_port[port] = key
        if self.tls_cert is not None:
            _check_path("tls_cert", self.tls_cert)
        if self.deployment_key is not None and (
            not isinstance(self.deployment_key, str) or not _KEY_RE.match(self.deployment_key)
        ):
            raise ClusterConfigError(
                "deployment_key", "expected 16-256 characters from [A-Za-z0-9._~-] (URL-safe, no encoding)"
            )
        if not isinstance(self.allowed_origins, tuple):
            raise ClusterConfigError("allowed_origins", "expected a list of origins")
        for i, origin in enumerate(self.allowed_origins):
            if not isinstance(origin, str) or not _ORIGIN_RE.match(origin):
                raise ClusterConfigError(
                    f"allowed_origins[{i}]",
                    f"expected a lowercase origin like 'https://crm.example.com' or "
                    f"'http://host:8080' (no path, no trailing slash), got {origin!r}",
                )
        if not _check_path("runtime_socket", self.runtime_socket).is_absolute():
            # HAProxy reads an address without a leading '/' as host:port ("missing port specification")
            raise ClusterConfigError(
                "runtime_socket", f"expected an absolute path (HAProxy reads a relative one as host:port), "
                f"got {str(self.runtime_socket)!r}"
            )
        _check_path("pidfile", self.pidfile)
        if not isinstance(self.master_worker, bool):
            raise ClusterConfigError("master_worker", f"expected true or false, got {self.master_worker!r}")
        if isinstance(self.maxconn, bool) or not isinstance(self.maxconn, int) or not 1 <= self.maxconn <= 1_000_000:
            raise ClusterConfigError("maxconn", f"expected an integer 1-1000000, got {self.maxconn!r}")
        if not isinstance(self.log_target, str) or not _TOKEN_RE.match(self.log_target):
            raise ClusterConfigError(
                "log_target", f"expected 'stdout', 'stderr' or a syslog target, got {self.log_target!r}"
            )
        if not isinstance(self.health_path, str) or not re.match(r"^/[A-Za-z0-9._~/-]*$", self.health_path):
            raise ClusterConfigError("health_path", f"expected an absolute URL path, got {self.health_path!r}")

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClusterDescription:
        """Build from JSON-shaped data; unknown keys and wrong types are errors naming the key."""
        if not isinstance(data, Mapping):
            raise ClusterConfigError("<root>", "expected a JSON object")
        unknown = sorted(set(data) - _FIELDS)
        if unknown:
            raise ClusterConfigError(unknown[0], f"unknown key (known keys: {', '.join(sorted(_FIELDS))})")
        if "nodes" not in data and "discovery" not in data:
            raise ClusterConfigError("nodes", "required key is missing")
        raw_nodes = data.get("nodes", ())
        if not isinstance(raw_nodes, Sequence) or isinstance(raw_nodes, str):
            raise ClusterConfigError("nodes", "expected a list of {name, host, port} objects")
        nodes = tuple(_node_from_dict(f"nodes[{i}]", raw) for i, raw in enumerate(raw_nodes))
        kwargs: dict[str, Any] = {"nodes": nodes}
        for key in _FIELDS - {"nodes"}:
            if key not in data:
                continue
            value = data[key]
            if key == "allowed_origins":
                if not isinstance(value, Sequence) or isinstance(value, str):
                    raise ClusterConfigError(key, "expected a list of origins")
                value = tuple(value)
            elif key == "discovery" and value is not None:
                value = _discovery_from_dict(value)
            elif key in ("tls_cert", "runtime_socket", "pidfile"):
                if value is None and key == "tls_cert":
                    pass
                else:
                    value = _check_path(key, value)
            kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-shaped form; `from_dict(to_dict())` round-trips."""
        return {
            "nodes": [{"name": n.name, "host": n.host, "port": n.port} for n in self.nodes],
            "bind": self.bind,
            "ws_port": self.ws_port,
            "wss_port": self.wss_port,
            "tls_cert": None if self.tls_cert is None else str(self.tls_cert),
            "deployment_key": self.deployment_key,
            "allowed_origins": list(self.allowed_origins),
            "stats_port": self.stats_port,
            "stats_bind": self.stats_bind,
            "runtime_socket": str(self.runtime_socket),
            "pidfile": str(self.pidfile),
            "master_worker": self.master_worker,
            "maxconn": self.maxconn,
            "log_target": self.log_target,
            "health_path": self.health_path,
            "discovery": None if self.discovery is None else {
                "name": self.discovery.name, "port": self.discovery.port, "slots": self.discovery.slots,
                "resolver": self.discovery.resolver,
            },
        }


_FIELDS = frozenset(ClusterDescription.__dataclass_fields__)


def _node_from_dict(key: str, raw: object) -> Node:
    if not isinstance(raw, Mapping):
        raise ClusterConfigError(key, f"expected an object with name, host, port, got {raw!r}")
    unknown = sorted(set(raw) - {"name", "host", "port"})
    if unknown:
        raise ClusterConfigError(f"{key}.{unknown[0]}", "unknown key (known keys: name, host, port)")
    for sub in ("name", "host", "port"):
        if sub not in raw:
            raise ClusterConfigError(f"{key}.{sub}", "required key is missing")
    try:
        return Node(name=raw["name"], host=raw["host"], port=raw["port"])
    except ClusterConfigError as exc:
        raise ClusterConfigError(f"{key}.{exc.key}", exc.problem) from None


def _discovery_from_dict(raw: object) -> DnsDiscovery:
    known = ("name", "port", "slots", "resolver")
    if not isinstance(raw, Mapping):
        raise ClusterConfigError("discovery", f"expected an object with name, port, slots, resolver, got {raw!r}")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ClusterConfigError(f"discovery.{unknown[0]}", f"unknown key (known keys: {', '.join(known)})")
    if "name" not in raw:
        raise ClusterConfigError("discovery.name", "required key is missing")
    try:
        return DnsDiscovery(**{k: raw[k] for k in known if k in raw})
    except ClusterConfigError as exc:
        raise ClusterConfigError(f"discovery.{exc.key}", exc.problem) from None


def parse_node_flag(text: str) -> dict[str, Any]:
    """Parse a `--node name=host:port` flag (IPv6 as `name=[::1]:9001`) into JSON-shaped data."""
    name, sep, addr = text.partition("=")
    if not sep:
        raise ClusterConfigError("--node", f"expected name=host:port, got {text!r}")
    host, sep, port_text = addr.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ClusterConfigError("--node", f"expected name=host:port, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return {"name": name, "host": host, "port": int(port_text)}


def load_cluster(path: str | Path) -> ClusterDescription:
    """Read and validate a cluster description from a JSON file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ClusterConfigError(str(path), f"cannot read: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ClusterConfigError(str(path), f"invalid JSON: {exc}") from None
    return ClusterDescription.from_dict(data)
