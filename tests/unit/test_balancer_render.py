"""Rendering and validation of the HAProxy config, without the haproxy binary.

`tests/integration/test_haproxy.py` runs every variant through `haproxy -c -dW` and real traffic.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import jinja2
import pytest

from balancer import (
    ClusterConfigError,
    ClusterDescription,
    DnsDiscovery,
    Node,
    RuntimeAPI,
    RuntimeAPIError,
    render_config,
)
from balancer.__main__ import main
from balancer.cluster import load_cluster, parse_node_flag
from balancer.haproxy_ctl import declares_master_worker, format_status

KEY = "0123456789abcdef-XYZ_~."
BASE = ClusterDescription(nodes=(Node("a", "127.0.0.1", 9001), Node("b", "127.0.0.1", 9002)))


def lines(cfg: str) -> list[str]:
    return [line.strip() for line in cfg.splitlines() if line.strip() and not line.strip().startswith("#")]


def section(cfg: str, header: str) -> list[str]:
    """The non-comment lines of one section (`frontend fe_clients`, `backend ws_nodes`, ...)."""
    out: list[str] = []
    inside = False
    for raw in cfg.splitlines():
        if raw and not raw[0].isspace() and not raw.startswith("#"):
            inside = raw.strip() == header
            continue
        if inside and raw.strip() and not raw.strip().startswith("#"):
            out.append(raw.strip())
    return out


# --- rendering --------------------------------------------------------------------------------------


def test_defaults_render_the_required_directives() -> None:
    cfg = render_config(BASE)
    backend = section(cfg, "backend ws_nodes")
    for directive in (
        "balance leastconn",
        "option httpchk GET /health",
        "http-check expect status 200",
        "option redispatch",
        "retries 2",
        "default-server inter 1s fall 2 rise 2 slowstart 5s on-marked-down shutdown-sessions",
        "server a 127.0.0.1:9001 check",
        "server b 127.0.0.1:9002 check",
    ):
        assert directive in backend, directive
    defaults = section(cfg, "defaults")
    for timeout in (
        "timeout connect 3s",
        "timeout client 60s",
        "timeout server 60s",
        "timeout tunnel 1h",
        "timeout client-fin 5s",
        "timeout server-fin 5s",
        "timeout http-request 10s",
    ):
        assert timeout in defaults, timeout
    assert "mode http" in defaults
    glob = section(cfg, "global")
    assert "maxconn 50000" in glob
    assert "log stdout format raw local0" in glob
    assert "master-worker" in glob
    assert "stats socket /run/haproxy/admin.sock mode 600 level admin expose-fd listeners" in glob
    assert "pidfile /run/haproxy/haproxy.pid" in glob
    front = section(cfg, "frontend fe_clients")
    assert front[0] == "bind 127.0.0.1:2013 name ws"
    assert "option forwardfor" in front
    assert "http-request set-header X-Forwarded-Proto https if { ssl_fc }" in front
    assert "default_backend ws_nodes" in front


def test_no_stickiness_and_no_query_string_in_logs() -> None:
    cfg = render_config(replace(BASE, deployment_key=KEY))
    assert not re.search(r"\b(stick|cookie|appsession|balance source|hash-type)\b", "\n".join(lines(cfg)))
    log_format = next(line for line in lines(cfg) if line.startswith("log-format"))
    assert "%HP" in log_format
    assert not re.search(r"%(\{[^}]*\})?(r|HU)\b", log_format)  # %r and %HU include the query string


def test_tls_frontend_only_with_a_certificate() -> None:
    plain = render_config(BASE)
    assert "2014" not in plain and " ssl " not in plain and "ssl-default-bind" not in plain
    tls = render_config(replace(BASE, tls_cert=Path("/etc/haproxy/cms.pem"), bind="0.0.0.0"))
    # With a certificate both client ports take TLS and plain alike (the guide names either port
    # with either scheme); the sniffing frontend hands each kind to the one HTTP frontend.
    sniff = section(tls, "frontend fe_tls_or_plain")
    assert "bind 0.0.0.0:2013 name ws" in sniff and "bind 0.0.0.0:2014 name wss" in sniff
    assert "use_backend be_tls_terminator if { req.ssl_hello_type 1 }" in sniff
    front = section(tls, "frontend fe_clients")
    assert "bind abns@cms-2013-tls accept-proxy name tls ssl crt /etc/haproxy/cms.pem alpn http/1.1" in front
    assert "bind abns@cms-2013-plain accept-proxy name plain" in front
    assert "0.0.0.0:" not in front
    assert "server tls abns@cms-2013-tls send-proxy-v2" in section(tls, "backend be_tls_terminator")
    assert "server plain abns@cms-2013-plain send-proxy-v2" in section(tls, "backend be_plain_http")
    assert "ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets" in section(tls, "global")


def test_key_rule_only_with_a_key() -> None:
    assert "urlp(key)" not in render_config(BASE)
    front = section(render_config(replace(BASE, deployment_key=KEY)), "frontend fe_clients")
    assert f"acl key_ok urlp(key) -m str {KEY}" in front
    deny = front.index("http-request deny deny_status 403 if !key_ok !console_asset")
    assert deny < front.index("default_backend ws_nodes")
    assert "acl console_asset path_beg /static/" in front


def test_origin_rule_only_with_an_allowlist() -> None:
    assert "origin" not in render_config(BASE).lower()
    front = section(
        render_config(replace(BASE, allowed_origins=("https://crm.example.com", "http://localhost:8080"))),
        "frontend fe_clients",
    )
    assert "acl origin_allowed req.hdr(origin) -m str -i https://crm.example.com http://localhost:8080" in front
    assert "http-request deny deny_status 403 if origin_present !origin_allowed" in front
    assert "http-request deny deny_status 403 if { req.hdr_cnt(origin) gt 1 }" in front


def test_stats_frontend_serves_prometheus_and_can_be_disabled() -> None:
    stats = section(render_config(BASE), "frontend stats")
    assert "bind 127.0.0.1:8404 name stats" in stats
    assert "http-request use-service prometheus-exporter if { path /metrics }" in stats
    assert "stats uri /stats" in stats
    assert "frontend stats" not in render_config(replace(BASE, stats_port=None))


def test_standalone_and_syslog_variants() -> None:
    cfg = render_config(replace(BASE, master_worker=False, log_target="/dev/log", maxconn=80000))
    glob = section(cfg, "global")
    assert "master-worker" not in glob
    assert "log /dev/log local0" in glob
    assert "maxconn 80000" in glob


def test_ipv6_node_address_is_bracketed() -> None:
    cfg = render_config(replace(BASE, nodes=(Node("v6", "::1", 9001),)))
    assert "server v6 [::1]:9001 check" in section(cfg, "backend ws_nodes")


def test_strict_undefined_fails_on_unknown_variables(tmp_path: Path) -> None:
    (tmp_path / "bad.j2").write_text("global\n    maxconn {{ cluster.max_conn }}\n")
    with pytest.raises(jinja2.UndefinedError, match="max_conn"):
        render_config(BASE, template="bad.j2", templates_dir=tmp_path)
    (tmp_path / "bad2.j2").write_text("{{ not_given }}\n")
    with pytest.raises(jinja2.UndefinedError, match="not_given"):
        render_config(BASE, template="bad2.j2", templates_dir=tmp_path)


def test_dns_discovery_renders_a_server_template_and_its_resolver() -> None:
    cluster = ClusterDescription(nodes=(), discovery=DnsDiscovery("ws-node", port=8081, slots=8,
                                                                   resolver="127.0.0.11:53"))
    cfg = render_config(cluster)
    assert "# Nodes: discovered from DNS name ws-node" in cfg
    backend = section(cfg, "backend ws_nodes")
    assert "server-template ws 1-8 ws-node:8081 check resolvers docker init-addr none" in backend
    assert not any(line.startswith("server ") for line in backend)
    resolvers = section(cfg, "resolvers docker")
    assert resolvers[0] == "nameserver dns 127.0.0.11:53" and "hold valid 10s" in resolvers
    assert "resolvers" not in render_config(BASE)  # listed nodes need no DNS


def test_rendering_is_deterministic() -> None:
    assert render_config(BASE) == render_config(BASE)


# --- validation -------------------------------------------------------------------------------------


def good() -> dict[str, Any]:
    return {"nodes": [{"name": "a", "host": "127.0.0.1", "port": 9001}]}


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"nodes": []}, "nodes"),
        ({"nodes": "a"}, "nodes"),
        ({"nodes": [{"name": "a", "host": "127.0.0.1"}]}, "nodes[0].port"),
        ({"nodes": [{"name": "a b", "host": "127.0.0.1", "port": 1}]}, "nodes[0].name"),
        ({"nodes": [{"name": "a", "host": "bad host", "port": 1}]}, "nodes[0].host"),
        ({"nodes": [{"name": "a", "host": "127.0.0.1", "port": 70000}]}, "nodes[0].port"),
        ({"nodes": [{"name": "a", "host": "127.0.0.1", "port": "9001"}]}, "nodes[0].port"),
        ({"nodes": [{"name": "a", "host": "127.0.0.1", "port": 1, "weight": 3}]}, "nodes[0].weight"),
        (
            {"nodes": [{"name": "a", "host": "h", "port": 1}, {"name": "a", "host": "h", "port": 2}]},
            "nodes[1].name",
        ),
        ({"nodes": [{"name": "a", "host": "h", "port": 1}, {"name": "b", "host": "h", "port": 1}]}, "nodes[1]"),
        ({"bind": "localhost"}, "bind"),
        ({"ws_port": 0}, "ws_port"),
        ({"ws_port": True}, "ws_port"),
        ({"stats_port": 2013}, "stats_port"),
        ({"tls_cert": "/a/b.pem", "wss_port": 2013}, "wss_port"),
        ({"tls_cert": "/a b.pem"}, "tls_cert"),
        ({"deployment_key": "short"}, "deployment_key"),
        ({"deployment_key": "has space in the key!!"}, "deployment_key"),
        ({"deployment_key": "x" * 20 + "&key=y"}, "deployment_key"),
        ({"allowed_origins": "https://a.example"}, "allowed_origins"),
        ({"allowed_origins": ["https://a.example/"]}, "allowed_origins[0]"),
        ({"allowed_origins": ["https://ok.example", "ftp://x"]}, "allowed_origins[1]"),
        ({"allowed_origins": ["https://A.example"]}, "allowed_origins[0]"),
        ({"runtime_socket": "/run/x y.sock"}, "runtime_socket"),
        ({"runtime_socket": ".run/haproxy.sock"}, "runtime_socket"),
        ({"pidfile": 5}, "pidfile"),
        ({"master_worker": "yes"}, "master_worker"),
        ({"maxconn": 0}, "maxconn"),
        ({"log_target": "stdout #"}, "log_target"),
        ({"health_path": "health"}, "health_path"),
        ({"max_conn": 5}, "max_conn"),
    ],
)
def test_invalid_descriptions_name_the_key(patch: dict[str, Any], key: str) -> None:
    data = good() | patch
    with pytest.raises(ClusterConfigError) as info:
        ClusterDescription.from_dict(data)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"nodes": [], "discovery": {"name": "ws_node"}}, "discovery.name"),
        ({"nodes": [], "discovery": {"name": "ws-node", "slots": 0}}, "discovery.slots"),
        ({"nodes": [], "discovery": {"name": "ws-node", "resolver": "dns"}}, "discovery.resolver"),
        ({"nodes": [], "discovery": {"name": "ws-node", "ttl": 5}}, "discovery.ttl"),
        ({"nodes": [], "discovery": {"port": 8081}}, "discovery.name"),
        ({"discovery": {"name": "ws-node"}}, "nodes"),  # good()'s node as well: one or the other
    ],
)
def test_invalid_discovery_names_the_key(patch: dict[str, Any], key: str) -> None:
    with pytest.raises(ClusterConfigError) as info:
        ClusterDescription.from_dict(good() | patch)
    assert info.value.key == key


def test_discovery_round_trips() -> None:
    data = {"discovery": {"name": "cms-ws-node.cms.svc.cluster.local", "port": 8081, "slots": 32,
                          "resolver": "10.96.0.10:53"}}
    cluster = ClusterDescription.from_dict(data)
    assert cluster.nodes == () and cluster.discovery == DnsDiscovery("cms-ws-node.cms.svc.cluster.local", 8081, 32,
                                                                     "10.96.0.10:53")
    assert ClusterDescription.from_dict(cluster.to_dict()) == cluster


def test_missing_nodes_key() -> None:
    with pytest.raises(ClusterConfigError, match=r"^nodes: required"):
        ClusterDescription.from_dict({"bind": "0.0.0.0"})


def test_without_tls_the_wss_port_may_collide() -> None:
    # wss_port is unused without a certificate, so it does not conflict with anything.
    cluster = ClusterDescription.from_dict(good() | {"wss_port": 2013})
    assert cluster.wss_port == 2013 and not cluster.tls_enabled
    binds = [line for line in lines(render_config(cluster)) if line.startswith("bind ")]
    assert binds == ["bind 127.0.0.1:2013 name ws", "bind 127.0.0.1:8404 name stats"]


def test_round_trip_and_file_loading(tmp_path: Path) -> None:
    full = replace(
        BASE,
        tls_cert=Path("/etc/haproxy/cms.pem"),
        deployment_key=KEY,
        allowed_origins=("https://crm.example.com",),
        stats_port=None,
        master_worker=False,
    )
    assert ClusterDescription.from_dict(full.to_dict()) == full
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(full.to_dict()))
    assert load_cluster(path) == full
    path.write_text("{not json")
    with pytest.raises(ClusterConfigError, match="invalid JSON"):
        load_cluster(path)


def test_description_is_frozen() -> None:
    with pytest.raises(AttributeError):
        BASE.ws_port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("a=127.0.0.1:9001", {"name": "a", "host": "127.0.0.1", "port": 9001}),
        ("n2=ws-2.internal:8080", {"name": "n2", "host": "ws-2.internal", "port": 8080}),
        ("v6=[::1]:9001", {"name": "v6", "host": "::1", "port": 9001}),
    ],
)
def test_parse_node_flag(flag: str, expected: dict[str, Any]) -> None:
    assert parse_node_flag(flag) == expected


@pytest.mark.parametrize("flag", ["a", "a=host", "a=host:port", "=h:1x"])
def test_parse_node_flag_rejects(flag: str) -> None:
    with pytest.raises(ClusterConfigError, match="--node"):
        parse_node_flag(flag)


# --- CLI (no haproxy needed with --no-check) ------------------------------------------------------


def test_cli_render_from_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    flags = "render --no-check --node a=127.0.0.1:9001 --node b=127.0.0.1:9002 --origin https://crm.example.com"
    rc = main([*flags.split(), "--deployment-key-file", str(key_file), "--bind", "0.0.0.0", "--standalone"])
    assert rc == 0
    out = capsys.readouterr().out
    origins = ("https://crm.example.com",)
    expected = replace(BASE, bind="0.0.0.0", deployment_key=KEY, allowed_origins=origins, master_worker=False)
    assert out == render_config(expected)


def test_cli_flags_override_the_file(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.json"
    cluster.write_text(json.dumps(BASE.to_dict()))
    out = tmp_path / "haproxy.cfg"
    assert main(["render", "--no-check", "--cluster", str(cluster), "--ws-port", "3013", "--out", str(out)]) == 0
    assert out.read_text() == render_config(replace(BASE, ws_port=3013))
    assert out.stat().st_mode & 0o777 == 0o640


def test_cli_errors_name_the_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["render", "--no-check", "--node", "a=127.0.0.1:99999"]) == 2
    assert "nodes[0].port" in capsys.readouterr().err
    assert main(["render", "--no-check"]) == 2
    assert "nodes" in capsys.readouterr().err
    cluster = tmp_path / "cluster.json"
    cluster.write_text(json.dumps(good() | {"origins": []}))
    assert main(["render", "--no-check", "--cluster", str(cluster)]) == 2
    assert "origins: unknown key" in capsys.readouterr().err


def test_declares_master_worker(tmp_path: Path) -> None:
    cfg = tmp_path / "h.cfg"
    cfg.write_text(render_config(BASE))
    assert declares_master_worker(cfg)
    cfg.write_text(render_config(replace(BASE, master_worker=False)))
    assert not declares_master_worker(cfg)


# --- runtime API client against a fake socket ------------------------------------------------------

SHOW_STAT = (
    "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,"
    "status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,"
    "type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,addr\n"
    "fe_clients,FRONTEND,,,3,5,2000,40,,,,,,,,,,OPEN,,,,,,,,,1,2,0,,,,0,,,,,,,,\n"
    "ws_nodes,a,0,0,2,3,,30,,,,,,0,0,0,0,UP,1,1,0,0,0,5,0,,1,3,1,,30,,2,0,,3,L7OK,200,1,0,127.0.0.1:9001\n"
    "ws_nodes,b,0,0,1,2,,10,,,,,,0,0,0,0,DRAIN,1,1,0,0,0,5,0,,1,3,2,,10,,2,0,,3,L7OK,200,1,0,127.0.0.1:9002\n"
    "ws_nodes,BACKEND,0,0,3,5,,40,,,,,,,,,,UP,2,2,0,,0,5,0,,1,3,0,,40,,1,0,,3,,,,0,\n"
    "\n"
)


@pytest.fixture
def fake_api(tmp_path: Path) -> Iterator[tuple[RuntimeAPI, list[str], dict[str, str]]]:
    """A unix socket that answers one command per connection, like HAProxy's non-interactive mode."""
    path = tmp_path / "admin.sock"
    answers: dict[str, str] = {"show stat": SHOW_STAT}
    received: list[str] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    server.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                data = b""
                while not data.endswith(b"\n"):
                    data += conn.recv(1024)
                command = data.decode().strip()
                received.append(command)
                conn.sendall(answers.get(command, "\n").encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield RuntimeAPI(path), received, answers
    stop.set()
    thread.join(timeout=5)
    server.close()


def test_runtime_api_parses_show_stat(fake_api: tuple[RuntimeAPI, list[str], dict[str, str]]) -> None:
    api, _, _ = fake_api
    rows = api.servers()
    assert [(r.name, r.status, r.address, r.current_sessions, r.total_sessions, r.check_status) for r in rows] == [
        ("a", "UP", "127.0.0.1:9001", 2, 30, "L7OK"),
        ("b", "DRAIN", "127.0.0.1:9002", 1, 10, "L7OK"),
    ]
    assert api.server("b").status == "DRAIN"
    with pytest.raises(RuntimeAPIError, match="no backend"):
        api.servers("other")
    table = format_status(rows)
    assert table.splitlines()[0].split() == ["server", "address", "status", "check", "sessions", "total", "weight"]


def test_runtime_api_set_state(fake_api: tuple[RuntimeAPI, list[str], dict[str, str]]) -> None:
    api, received, answers = fake_api
    api.drain("a")
    api.enable("a")
    assert received == ["set server ws_nodes/a state drain", "set server ws_nodes/a state ready"]
    answers["set server ws_nodes/zz state drain"] = "No such server.\n\n"
    with pytest.raises(RuntimeAPIError, match="No such server"):
        api.drain("zz")
    with pytest.raises(ValueError, match="invalid server"):
        api.drain("a; shutdown sessions server ws_nodes/b")


def test_runtime_api_unreachable(tmp_path: Path) -> None:
    with pytest.raises(RuntimeAPIError, match="runtime API"):
        RuntimeAPI(tmp_path / "nope.sock").servers()
