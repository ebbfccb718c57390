"""Render haproxy.cfg for the compose deployment, where ws_node replicas come and go with `--scale`.

The balancer renders one `server` line per known node. Under Docker Compose the nodes are not
known in advance: every replica of the `ws_node` service answers to the same DNS name on the
compose network, and Docker's embedded DNS server (127.0.0.11) returns one A record per running
replica. So this script renders the cluster through the balancer (same template, same checks,
same key/Origin/TLS rules), then replaces the single placeholder server with a `server-template`
whose slots HAProxy fills from DNS, and adds the `resolvers` section that points at Docker's DNS.
A replica that starts appears within `hold valid` seconds; one that is removed frees its slot.

TODO(balancer): once `ClusterDescription` has a `discovery` option (see compose/README.md), this
post-processing goes away and the entrypoint calls `python -m balancer render` directly.

Settings come from the environment (the compose file sets them; see compose/.env.example):

    CMS_NODE_DNS_NAME      DNS name shared by the node replicas         (ws-node)
    CMS_NODE_PORT          the nodes' HTTP/WebSocket port               (8081)
    CMS_NODE_SLOTS         most replicas HAProxy will track             (16)
    CMS_DNS_RESOLVER       resolver address                             (127.0.0.11:53)
    CMS_TLS_CERT           PEM (chain + key); enables 2014 when set     (unset)
    CMS_DEPLOYMENT_KEY_FILE  file holding the ?key= value               (unset)
    CMS_ALLOWED_ORIGINS    comma-separated Origin allowlist             (unset)
    CMS_HAPROXY_MAXCONN    global maxconn                               (50000)
    CMS_RUN_DIR            runtime socket + pidfile directory           (/run/cms)
    CMS_BIND, CMS_WS_PORT, CMS_WSS_PORT        client listeners         (0.0.0.0, 2013, 2014)
    CMS_STATS_BIND, CMS_STATS_PORT             stats + /metrics         (0.0.0.0, 8404)

Exit codes: 0 written (and checked unless --no-check), 1 haproxy rejected it, 2 bad settings.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from balancer.cluster import ClusterConfigError, ClusterDescription, Node
from balancer.haproxy_ctl import ConfigCheckError, HAProxyNotFoundError, check_config
from balancer.render import render_config, write_config

# Rendered through the balancer with this stand-in node, then swapped for the server-template.
_PLACEHOLDER = Node(name="ws-placeholder", host="placeholder.invalid", port=8081)
_DNS_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_RESOLVER_RE = re.compile(r"^[0-9A-Fa-f.:\[\]]+:[0-9]{1,5}$")


class SettingsError(ValueError):
    """A CMS_* variable is invalid; the message names it."""


def _integer(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}: expected an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}: expected {low}-{high}, got {value}")
    return value


def render(env: Mapping[str, str]) -> str:
    """The complete haproxy.cfg for these settings (not yet checked by haproxy)."""
    dns_name = env.get("CMS_NODE_DNS_NAME", "").strip() or "ws-node"
    if not _DNS_NAME_RE.match(dns_name):
        # HAProxy's resolver accepts letters, digits, '-' and '.'; Compose service names with '_'
        # need a network alias (the compose file gives ws_node the alias `ws-node`).
        raise SettingsError(f"CMS_NODE_DNS_NAME: {dns_name!r} must be letters, digits, '-' and '.' only")
    port = _integer(env, "CMS_NODE_PORT", 8081, 1, 65535)
    slots = _integer(env, "CMS_NODE_SLOTS", 16, 1, 1000)
    resolver = env.get("CMS_DNS_RESOLVER", "").strip() or "127.0.0.11:53"
    if not _RESOLVER_RE.match(resolver):
        raise SettingsError(f"CMS_DNS_RESOLVER: expected ip:port, got {resolver!r}")
    maxconn = _integer(env, "CMS_HAPROXY_MAXCONN", 50000, 1, 1_000_000)
    run_dir = Path(env.get("CMS_RUN_DIR", "").strip() or "/run/cms")
    ws_port = _integer(env, "CMS_WS_PORT", 2013, 1, 65535)
    wss_port = _integer(env, "CMS_WSS_PORT", 2014, 1, 65535)
    stats_port = _integer(env, "CMS_STATS_PORT", 8404, 1, 65535)
    # Inside the container the listeners take every interface; the compose file decides what the
    # host publishes (the stats port only on the host's loopback).
    bind = env.get("CMS_BIND", "").strip() or "0.0.0.0"
    stats_bind = env.get("CMS_STATS_BIND", "").strip() or "0.0.0.0"

    tls_cert: Path | None = None
    if env.get("CMS_TLS_CERT", "").strip():
        tls_cert = Path(env["CMS_TLS_CERT"].strip())
        if not tls_cert.is_file():
            raise SettingsError(f"CMS_TLS_CERT: {tls_cert} is not a readable file (PEM with chain and key)")
    key: str | None = None
    if env.get("CMS_DEPLOYMENT_KEY_FILE", "").strip():
        key_file = Path(env["CMS_DEPLOYMENT_KEY_FILE"].strip())
        try:
            key = key_file.read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise SettingsError(f"CMS_DEPLOYMENT_KEY_FILE: cannot read {key_file}: {exc.strerror}") from None
    origins = tuple(o.strip() for o in env.get("CMS_ALLOWED_ORIGINS", "").split(",") if o.strip())

    try:
        description = ClusterDescription(
            nodes=(_PLACEHOLDER,),
            bind=bind,
            ws_port=ws_port,
            wss_port=wss_port,
            tls_cert=tls_cert,
            deployment_key=key,
            allowed_origins=origins,
            stats_port=stats_port,
            stats_bind=stats_bind,
            runtime_socket=run_dir / "haproxy.sock",
            pidfile=run_dir / "haproxy.pid",
            master_worker=True,
            maxconn=maxconn,
            log_target="stdout",
        )
    except ClusterConfigError as exc:
        raise SettingsError(f"cluster description: {exc}") from None

    text = render_config(description)
    placeholder = f"    server {_PLACEHOLDER.name} {_PLACEHOLDER.address} check\n"
    if text.count(placeholder) != 1:
        raise RuntimeError("the balancer template no longer renders `server NAME ADDR check`; update this script")
    # `init-addr none`: start even while no replica resolves yet (slots stay in MAINT until DNS
    # answers). Server names ws1..wsN are what `python -m balancer drain` takes.
    template = f"    server-template ws 1-{slots} {dns_name}:{port} check resolvers docker init-addr none\n"
    text = text.replace(placeholder, template)
    text = text.replace(f"# Nodes: {_PLACEHOLDER.name}", f"# Nodes: discovered from DNS name {dns_name}")
    resolvers = (
        "\n"
        "# Docker's embedded DNS: one A record per running ws_node replica.\n"
        "resolvers docker\n"
        f"    nameserver dns {resolver}\n"
        "    accepted_payload_size 8192\n"
        "    resolve_retries 3\n"
        "    timeout resolve 1s\n"
        "    timeout retry 1s\n"
        # A removed replica's record vanishes: free its slot after 10 s instead of the default 30 s.
        "    hold valid 10s\n"
        "    hold nx 10s\n"
        "    hold obsolete 10s\n"
        "    hold other 10s\n"
        "    hold refused 10s\n"
        "    hold timeout 10s\n"
    )
    return text + resolvers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where to write haproxy.cfg (atomically)")
    parser.add_argument("--no-check", action="store_true", help="skip `haproxy -c -dW`")
    args = parser.parse_args(argv)
    try:
        text = render(os.environ)
    except SettingsError as exc:
        print(f"render_haproxy: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    write_config(text, out)
    # The runtime socket and pidfile go there; haproxy does not create the directory.
    (Path(os.environ.get("CMS_RUN_DIR", "").strip() or "/run/cms")).mkdir(parents=True, exist_ok=True)
    if not args.no_check:
        try:
            check_config(out)
        except (ConfigCheckError, HAProxyNotFoundError) as exc:
            print(f"render_haproxy: haproxy rejected {out}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
