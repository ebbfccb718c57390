"""Render haproxy.cfg for the compose deployment, where ws_node replicas come and go with `--scale`.

Under Docker Compose the nodes are not known in advance: every replica of the `ws_node` service
answers to the same DNS name on the compose network, and Docker's embedded DNS server (127.0.0.11)
returns one A record per running replica. So this script describes the cluster with DNS discovery
(`balancer.cluster.DnsDiscovery`) and renders it through the balancer (same template, same checks,
same key/Origin/TLS rules): a `server-template` whose slots HAProxy fills from DNS, and a `resolvers`
section that points at Docker's DNS. A replica that starts appears within `hold valid` seconds; one
that is removed frees its slot.

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
import sys
from collections.abc import Mapping
from pathlib import Path

from balancer.cluster import ClusterConfigError, ClusterDescription, DnsDiscovery
from balancer.haproxy_ctl import ConfigCheckError, HAProxyNotFoundError, check_config
from balancer.render import render_config, write_config

#: DnsDiscovery's fields, as the variables that set them
_DISCOVERY_VARIABLES = {"name": "CMS_NODE_DNS_NAME", "port": "CMS_NODE_PORT", "slots": "CMS_NODE_SLOTS",
                        "resolver": "CMS_DNS_RESOLVER"}


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
    # The compose file gives the ws_node service the network alias `ws-node`: HAProxy's resolver does not take '_'.
    try:
        discovery = DnsDiscovery(
            name=env.get("CMS_NODE_DNS_NAME", "").strip() or "ws-node",
            port=_integer(env, "CMS_NODE_PORT", 8081, 1, 65535),
            slots=_integer(env, "CMS_NODE_SLOTS", 16, 1, 1000),
            resolver=env.get("CMS_DNS_RESOLVER", "").strip() or "127.0.0.11:53",
        )
    except ClusterConfigError as exc:
        raise SettingsError(f"{_DISCOVERY_VARIABLES[exc.key]}: {exc.problem}") from None
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
            nodes=(),
            discovery=discovery,
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

    return render_config(description)


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
