"""HAProxy in front of two tiny HTTP backends: every rule of the rendered config, on real sockets.

Each test starts its own haproxy (foreground, `-db`, a temp dir for config, socket, pidfile and log)
so that health flips and drains cannot leak between tests. haproxy missing is a failure, not a skip.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from balancer import (
    ClusterDescription,
    ConfigCheckError,
    Node,
    RuntimeAPI,
    check_config,
    render_config,
)
from balancer.haproxy_ctl import HAProxyNotFoundError, find_haproxy, read_pids, reload

pytestmark = pytest.mark.integration

KEY = "k3y-For-Tests_0123456789"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def haproxy_bin() -> str:
    try:
        return find_haproxy()
    except HAProxyNotFoundError as exc:
        pytest.fail(f"integration tests need the real haproxy binary: {exc}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m balancer ARGS` in a subprocess, as an operator would run it."""
    return subprocess.run(
        [sys.executable, "-m", "balancer", *args], capture_output=True, text=True, cwd=REPO, check=False
    )


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


# --- backends ---------------------------------------------------------------------------------------


class Backend(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.name = name
        self.healthy = True
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        port: int = self.server_address[1]
        return port

    def handle_error(self, request: Any, client_address: Any) -> None:
        # HAProxy resets idle keep-alive connections to the servers; that is not a test failure.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Backend

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        pass

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        if self.path == "/health":
            self._reply(200 if self.server.healthy else 503, {"backend": self.server.name})
        elif self.headers.get("Upgrade", "").lower() == "websocket":
            self._upgrade()
        else:
            self._reply(200, self._echo())

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._reply(200, self._echo())

    def _echo(self) -> dict[str, Any]:
        return {
            "backend": self.server.name,
            "path": self.path,
            "xff": self.headers.get("X-Forwarded-For"),
            "xfp": self.headers.get("X-Forwarded-Proto"),
        }

    def _upgrade(self) -> None:
        accept = base64.b64encode(
            hashlib.sha1((self.headers["Sec-WebSocket-Key"] + WS_GUID).encode()).digest()
        ).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.send_header("X-Backend", self.server.name)
        self.end_headers()
        # After 101 the connection is a byte tunnel: echo until the peer closes.
        while data := self.connection.recv(4096):
            self.connection.sendall(b"echo:" + data)
        self.close_connection = True


@pytest.fixture
def backends() -> Iterator[dict[str, Backend]]:
    servers = {name: Backend(name) for name in ("a", "b")}
    for server in servers.values():
        server.thread.start()
    yield servers
    for server in servers.values():
        server.shutdown()
        server.server_close()
        server.thread.join(timeout=5)


# --- haproxy ----------------------------------------------------------------------------------------


@dataclass
class HAProxy:
    binary: str
    workdir: Path
    cluster: ClusterDescription
    proc: subprocess.Popen[bytes] | None = None
    pids: set[int] = field(default_factory=set)
    _log: Any = field(default=None, repr=False)

    @property
    def cfg(self) -> Path:
        return self.workdir / "haproxy.cfg"

    @property
    def api(self) -> RuntimeAPI:
        return RuntimeAPI(self.cluster.runtime_socket)

    def write(self, cluster: ClusterDescription) -> None:
        self.cluster = cluster
        self.cfg.write_text(render_config(cluster))
        check_config(self.cfg, haproxy=self.binary)

    def start(self) -> None:
        """Master-worker: a foreground master (`-db`) that is our child. Standalone: a daemon (`-D`),
        since a foreground standalone haproxy writes no pidfile and so cannot be reloaded."""
        self.write(self.cluster)
        self._log = open(self.workdir / "haproxy.log", "wb")  # noqa: SIM115 - closed in stop()
        if self.cluster.master_worker:
            self.proc = subprocess.Popen(
                [self.binary, "-db", "-f", str(self.cfg)], stdout=self._log, stderr=subprocess.STDOUT
            )
        else:
            subprocess.run(
                [self.binary, "-D", "-f", str(self.cfg), "-p", str(self.cluster.pidfile)],
                stdout=self._log,
                stderr=subprocess.STDOUT,
                check=True,
            )
        self.pids.update(read_pids(self.cluster.pidfile))
        self.wait_servers(lambda s: s.status == "UP", "all servers UP")

    def log_text(self) -> str:
        path = self.workdir / "haproxy.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_servers(self, ok: Callable[[Any], bool], what: str, timeout: float = 10.0) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"haproxy exited with {self.proc.returncode}:\n{self.log_text()}")
            if self.proc is None and not any(_running(p) for p in read_pids(self.cluster.pidfile)):
                pytest.fail(f"haproxy daemon is not running:\n{self.log_text()}")
            try:
                rows = self.api.servers()
            except Exception:
                return False
            return bool(rows) and all(ok(r) for r in rows)

        wait_for(ready, timeout, what)

    def wait_server(self, name: str, status: str, timeout: float = 10.0) -> None:
        wait_for(lambda: self.api.server(name).status == status, timeout, f"{name} {status}")

    def stop(self) -> None:
        pids = self.pids | set(read_pids(self.cluster.pidfile))
        if self.proc is not None:
            pids.discard(self.proc.pid)
            if self.proc.poll() is None:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in pids:  # daemons started by a standalone reload are not our children
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            wait_for(functools.partial(_exited, pid), 10, f"haproxy pid {pid} to exit")
        if self._log is not None:
            self._log.close()


def _exited(pid: int) -> bool:
    return not _running(pid)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie reparented to a non-reaping init has exited


def make_cluster(tmp: Path, backends: dict[str, Backend], **overrides: Any) -> ClusterDescription:
    base = ClusterDescription(
        nodes=tuple(Node(b.name, "127.0.0.1", b.port) for b in backends.values()),
        ws_port=free_port(),
        wss_port=free_port(),
        stats_port=free_port(),
        runtime_socket=tmp / "admin.sock",
        pidfile=tmp / "haproxy.pid",
        maxconn=2000,
        log_target="stdout",
    )
    return replace(base, **overrides)


@pytest.fixture
def start_haproxy(haproxy_bin: str, tmp_path: Path) -> Iterator[Callable[[ClusterDescription], HAProxy]]:
    started: list[HAProxy] = []

    def start(cluster: ClusterDescription) -> HAProxy:
        hap = HAProxy(haproxy_bin, tmp_path, cluster)
        started.append(hap)
        hap.start()
        return hap

    yield start
    for hap in started:
        hap.stop()


# --- clients ----------------------------------------------------------------------------------------


def request(
    port: int,
    path: str = "/",
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, Any] | str, http.client.HTTPMessage]:
    conn: http.client.HTTPConnection
    if tls is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=tls)
    try:
        conn.request(method, path, body=b"{}" if method == "POST" else None, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            body: dict[str, Any] | str = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        return resp.status, body, resp.headers
    finally:
        conn.close()


def backend_of(port: int, path: str = "/", **kw: Any) -> str:
    status, body, _ = request(port, path, **kw)
    assert status == 200, body
    assert isinstance(body, dict)
    return str(body["backend"])


@contextlib.contextmanager
def websocket(port: int, path: str = "/", tls: ssl.SSLContext | None = None) -> Iterator[tuple[socket.socket, str]]:
    """Raw WebSocket handshake; yields the socket and the backend named in the 101 answer."""
    key = base64.b64encode(os.urandom(16)).decode()
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock = tls.wrap_socket(raw, server_hostname="localhost") if tls else raw
    with sock:
        sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, f"connection closed during handshake: {head!r}"
            head += chunk
        lines = head.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
        assert lines[0].startswith("HTTP/1.1 101"), lines
        hdrs = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        expected = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        assert hdrs["sec-websocket-accept"] == expected
        yield sock, hdrs["x-backend"]


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return sock.recv(4096)


# --- config validation ------------------------------------------------------------------------------


@pytest.fixture
def tls_pem(tmp_path: Path) -> Path:
    """Self-signed cert for 127.0.0.1/localhost, generated with the openssl CLI; cert+key in one PEM."""
    key, crt, pem = tmp_path / "key.pem", tmp_path / "crt.pem", tmp_path / "haproxy.pem"
    proc = subprocess.run(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=localhost "
        "-addext subjectAltName=IP:127.0.0.1,DNS:localhost".split()
        + ["-keyout", str(key), "-out", str(crt)],
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, f"openssl failed: {proc.stderr.decode()}"
    pem.write_bytes(crt.read_bytes() + key.read_bytes())
    return pem


def _variants(tmp: Path, pem: Path) -> dict[str, ClusterDescription]:
    base = ClusterDescription(
        nodes=(Node("a", "127.0.0.1", 9001), Node("b", "127.0.0.1", 9002)),
        runtime_socket=tmp / "admin.sock",
        pidfile=tmp / "haproxy.pid",
    )
    return {
        "minimal": base,
        "production-bind": replace(base, bind="0.0.0.0"),
        "key": replace(base, deployment_key=KEY),
        "origins": replace(base, allowed_origins=("https://crm.example.com", "http://localhost:8080")),
        "tls": replace(base, tls_cert=pem),
        "everything": replace(
            base,
            tls_cert=pem,
            deployment_key=KEY,
            allowed_origins=("https://crm.example.com",),
            master_worker=True,
            maxconn=100000,
        ),
        "no-stats": replace(base, stats_port=None),
        "syslog": replace(base, log_target="/dev/log"),
        "ipv6-and-hostname": replace(base, nodes=(Node("a", "::1", 9001), Node("b", "localhost", 9002))),
        "one-node": replace(base, nodes=(Node("only", "127.0.0.1", 9001),)),
    }


VARIANTS = list(_variants(Path("/x"), Path("/x")))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_variant_passes_haproxy_check(
    variant: str, haproxy_bin: str, tmp_path: Path, tls_pem: Path
) -> None:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(render_config(_variants(tmp_path, tls_pem)[variant]))
    check_config(cfg, haproxy=haproxy_bin)


def test_check_config_fails_on_warnings_and_errors(haproxy_bin: str, tmp_path: Path) -> None:
    cluster = _variants(tmp_path, tmp_path / "none.pem")["minimal"]
    cfg = tmp_path / "haproxy.cfg"
    # A warning only (plain `haproxy -c` would accept it): a frontend without `timeout client`.
    cfg.write_text(render_config(cluster).replace("    timeout client 60s\n", ""))
    with pytest.raises(ConfigCheckError, match=r"WARNING|ALERT") as info:
        check_config(cfg, haproxy=haproxy_bin)
    assert "timeout" in info.value.output
    cfg.write_text(render_config(cluster) + "\nbackend broken\n    nonsense_keyword\n")
    with pytest.raises(ConfigCheckError, match="nonsense_keyword"):
        check_config(cfg, haproxy=haproxy_bin)
    proc = cli("check", "--config", str(cfg))
    assert proc.returncode == 1 and "nonsense_keyword" in proc.stderr


def test_cli_render_validates_and_writes(haproxy_bin: str, tmp_path: Path) -> None:
    cluster_file = tmp_path / "cluster.json"
    cluster = _variants(tmp_path, tmp_path / "none.pem")["key"]
    cluster_file.write_text(json.dumps(cluster.to_dict()))
    out = tmp_path / "out" / "haproxy.cfg"
    proc = cli("--haproxy", haproxy_bin, "render", "--cluster", str(cluster_file), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == render_config(cluster)
    # A cert that does not exist: render refuses (haproxy -c fails) and leaves no file behind.
    bad_out = tmp_path / "bad.cfg"
    missing = str(tmp_path / "missing.pem")
    proc = cli("render", "--cluster", str(cluster_file), "--tls-cert", missing, "--out", str(bad_out))
    assert proc.returncode == 1, proc.stderr
    assert "missing.pem" in proc.stderr
    assert not bad_out.exists()


# --- traffic ----------------------------------------------------------------------------------------


def test_requests_are_forwarded_to_both_nodes(backends: dict[str, Backend], start_haproxy: Any, tmp_path: Path) -> None:
    hap = start_haproxy(make_cluster(tmp_path, backends))
    port = hap.cluster.ws_port
    seen = {backend_of(port, f"/console?i={i}") for i in range(20)}
    assert seen == {"a", "b"}
    status, body, _ = request(port, "/console", headers={"X-Forwarded-For": "6.6.6.6"})
    assert status == 200 and isinstance(body, dict)
    assert body["xff"] == "127.0.0.1"  # the spoofed value was dropped
    assert body["xfp"] == "http"
    status, body, _ = request(port, "/negotiate?negotiateVersion=1", method="POST")
    assert status == 200 and isinstance(body, dict) and body["path"] == "/negotiate?negotiateVersion=1"


def test_websocket_upgrade_passes_through(backends: dict[str, Backend], start_haproxy: Any, tmp_path: Path) -> None:
    hap = start_haproxy(make_cluster(tmp_path, backends))
    with websocket(hap.cluster.ws_port) as (sock, name):
        assert name in ("a", "b")
        assert roundtrip(sock, b"hello") == b"echo:hello"
        assert roundtrip(sock, b"again") == b"echo:again"


def test_node_failing_health_is_marked_down_and_its_tunnels_cut(
    backends: dict[str, Backend], start_haproxy: Any, tmp_path: Path
) -> None:
    hap = start_haproxy(make_cluster(tmp_path, backends))
    port = hap.cluster.ws_port
    with websocket(port) as (sock, victim):
        survivor = "b" if victim == "a" else "a"
        backends[victim].healthy = False
        hap.wait_server(victim, "DOWN", timeout=6)
        # on-marked-down shutdown-sessions: the agent on the dead node is disconnected at once.
        sock.settimeout(3)
        assert sock.recv(4096) == b""
    assert {backend_of(port) for _ in range(10)} == {survivor}
    backends[victim].healthy = True
    hap.wait_server(victim, "UP", timeout=6)
    wait_for(lambda: backend_of(port) == victim, 10, f"traffic back on {victim}")


def test_deployment_key_is_required(backends: dict[str, Backend], start_haproxy: Any, tmp_path: Path) -> None:
    hap = start_haproxy(make_cluster(tmp_path, backends, deployment_key=KEY))
    port = hap.cluster.ws_port
    wrong = (
        "/",
        "/?key=",
        "/?key=wrong",
        f"/?key={KEY}x",
        f"/?key={KEY[:-1]}",
        f"/?notkey={KEY}",
        f"/negotiate?x={KEY}",
    )
    for path in wrong:
        assert request(port, path)[0] == 403, path
    assert request(port, "/negotiate", method="POST")[0] == 403
    assert backend_of(port, f"/?key={KEY}") in ("a", "b")
    assert backend_of(port, f"/console?key={KEY}") in ("a", "b")
    # The console page needs the key; its static assets (no data in them) load without it.
    assert request(port, "/console")[0] == 403
    assert backend_of(port, "/static/console.css") in ("a", "b")
    # SignalR: negotiate, then the socket URL carries the key plus the connection token.
    assert backend_of(port, f"/negotiate?key={KEY}&negotiateVersion=1", method="POST") in ("a", "b")
    with websocket(port, f"/?key={KEY}&id=token123") as (sock, _):
        assert roundtrip(sock, b"x") == b"echo:x"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(
            b"GET /?id=token123 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert raw.recv(4096).startswith(b"HTTP/1.1 403")
    # Requests are logged, but without the query string that carries the key.
    wait_for(lambda: "/negotiate" in hap.log_text(), 5, "access log lines")
    assert KEY not in hap.log_text()


def test_origin_allowlist(backends: dict[str, Backend], start_haproxy: Any, tmp_path: Path) -> None:
    hap = start_haproxy(make_cluster(tmp_path, backends, allowed_origins=("https://crm.example.com",)))
    port = hap.cluster.ws_port
    assert request(port, "/")[0] == 200  # no Origin: not a browser, allowed
    assert request(port, "/", headers={"Origin": "https://crm.example.com"})[0] == 200
    assert request(port, "/", headers={"Origin": "https://CRM.example.com"})[0] == 200  # host is case-insensitive
    for bad in ("https://evil.example.com", "http://crm.example.com", "https://crm.example.com.evil.io", "null"):
        assert request(port, "/", headers={"Origin": bad})[0] == 403, bad
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nOrigin: https://crm.example.com\r\nOrigin: https://evil.io\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 403")


def test_drain_and_enable_through_runtime_api(backends: dict[str, Backend], start_haproxy: Any, tmp_path: Path) -> None:
    hap = start_haproxy(make_cluster(tmp_path, backends))
    port, sock = hap.cluster.ws_port, str(hap.cluster.runtime_socket)
    proc = cli("drain", "a", "--socket", sock)
    assert proc.returncode == 0, proc.stderr
    assert "DRAIN" in proc.stdout
    assert hap.api.server("a").status == "DRAIN"
    assert {backend_of(port) for _ in range(10)} == {"b"}
    status = cli("status", "--json", "--socket", sock)
    rows = {r["name"]: r for r in json.loads(status.stdout)}
    assert rows["a"]["status"] == "DRAIN" and rows["b"]["status"] == "UP"
    proc = cli("enable", "a", "--socket", sock)
    assert proc.returncode == 0, proc.stderr
    assert hap.api.server("a").status == "UP"
    wait_for(lambda: backend_of(port) == "a", 10, "traffic back on a")
    bad = cli("drain", "nosuch", "--socket", sock)
    assert bad.returncode == 1 and "No such server" in bad.stderr


def test_drain_keeps_open_websockets(backends: dict[str, Backend], start_haproxy: Any, tmp_path: Path) -> None:
    hap = start_haproxy(make_cluster(tmp_path, backends))
    with websocket(hap.cluster.ws_port) as (sock, name):
        hap.api.drain(name)
        assert roundtrip(sock, b"still") == b"echo:still"
        assert hap.api.server(name).current_sessions == 1


def test_stats_page_and_prometheus_metrics(backends: dict[str, Backend], start_haproxy: Any, tmp_path: Path) -> None:
    hap = start_haproxy(make_cluster(tmp_path, backends))
    status, body, headers = request(hap.cluster.stats_port, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert isinstance(body, str)
    assert "# TYPE haproxy_process_" in body
    assert 'haproxy_server_status{proxy="ws_nodes",server="a"' in body
    status, body, _ = request(hap.cluster.stats_port, "/stats")
    assert status == 200 and "ws_nodes" in str(body)
    assert request(hap.cluster.stats_port, "/healthz")[0] == 200


def test_tls_port_terminates_https_and_wss(
    backends: dict[str, Backend], start_haproxy: Any, tmp_path: Path, tls_pem: Path
) -> None:
    hap = start_haproxy(make_cluster(tmp_path, backends, tls_cert=tls_pem, deployment_key=KEY))
    ctx = ssl.create_default_context(cafile=str(tmp_path / "crt.pem"))
    status, body, _ = request(hap.cluster.wss_port, f"/?key={KEY}", tls=ctx)
    assert status == 200 and isinstance(body, dict) and body["xfp"] == "https"
    assert request(hap.cluster.wss_port, "/", tls=ctx)[0] == 403
    with websocket(hap.cluster.wss_port, f"/?key={KEY}", tls=ctx) as (sock, _):
        assert roundtrip(sock, b"secure") == b"echo:secure"
    # An untrusting client refuses the self-signed cert: it really is TLS with our cert.
    with pytest.raises(ssl.SSLCertVerificationError):
        request(hap.cluster.wss_port, "/", tls=ssl.create_default_context())
    assert request(hap.cluster.ws_port, f"/?key={KEY}")[0] == 200  # plain port still there


@pytest.mark.parametrize("port_name", ["ws_port", "wss_port"])
def test_each_client_port_takes_tls_and_plain(
    backends: dict[str, Backend], start_haproxy: Any, tmp_path: Path, tls_pem: Path, port_name: str
) -> None:
    """Creatio's guide: wss://server:2013 (.NET Framework on HTTPS sites), http(s)://server:2013/2014
    (.NET Core). Whatever scheme the admin pairs with whichever port, the client gets through, with
    the scheme and its own address passed on to the node."""
    hap = start_haproxy(make_cluster(tmp_path, backends, tls_cert=tls_pem, deployment_key=KEY))
    port = getattr(hap.cluster, port_name)
    ctx = ssl.create_default_context(cafile=str(tmp_path / "crt.pem"))
    status, body, _ = request(port, f"/?key={KEY}", tls=ctx)
    assert status == 200 and isinstance(body, dict) and body["xfp"] == "https"
    status, body, _ = request(port, f"/?key={KEY}")
    assert status == 200 and isinstance(body, dict) and body["xfp"] == "http"
    assert body["xff"] == "127.0.0.1"
    with websocket(port, f"/?key={KEY}", tls=ctx) as (sock, _):
        assert roundtrip(sock, b"secure") == b"echo:secure"
    with websocket(port, f"/?key={KEY}") as (sock, _):
        assert roundtrip(sock, b"plain") == b"echo:plain"
    assert request(port, "/", tls=ctx)[0] == 403 and request(port, "/")[0] == 403


def test_no_tls_port_without_cert(backends: dict[str, Backend], start_haproxy: Any, tmp_path: Path) -> None:
    hap = start_haproxy(make_cluster(tmp_path, backends))
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", hap.cluster.wss_port)):
        pass


# --- reload -----------------------------------------------------------------------------------------


class Hammer(threading.Thread):
    """Sends requests in a loop and records every failure, to prove a reload refuses nothing."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.ok = 0
        self.errors: list[str] = []
        self.seen: set[str] = set()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                status, body, _ = request(self.port)
            except OSError as exc:
                self.errors.append(repr(exc))
                continue
            if status != 200 or not isinstance(body, dict):
                self.errors.append(f"{status} {body!r}")
            else:
                self.ok += 1
                self.seen.add(str(body["backend"]))


@pytest.mark.parametrize(
    ("master_worker", "tls"),
    [(True, False), (False, False), (True, True), (False, True)],
    ids=["master-worker-sigusr2", "standalone-daemon-sf-x", "master-worker-tls-sniffing", "standalone-tls-sniffing"],
)
def test_seamless_reload_adds_a_node_without_errors(
    master_worker: bool, tls: bool, backends: dict[str, Backend], start_haproxy: Any, tmp_path: Path, tls_pem: Path
) -> None:
    # With a certificate the client ports are a TCP sniffer in front of internal sockets; those
    # must survive a reload as the plain listeners do.
    full = make_cluster(tmp_path, backends, master_worker=master_worker, tls_cert=tls_pem if tls else None)
    hap = start_haproxy(replace(full, nodes=full.nodes[:1]))
    port = hap.cluster.ws_port
    before = read_pids(full.pidfile)
    assert {backend_of(port) for _ in range(5)} == {"a"}
    with websocket(port) as (tunnel, _):
        hammer = Hammer(port)
        hammer.start()
        try:
            wait_for(lambda: hammer.ok > 20, 5, "traffic before reload")
            hap.write(full)
            proc = cli(
                "reload", "--config", str(hap.cfg), "--pidfile", str(full.pidfile), "--socket", str(full.runtime_socket)
            )
            assert proc.returncode == 0, proc.stderr
            wait_for(lambda: "b" in hammer.seen, 10, "the new node b to get traffic")
            ok_after = hammer.ok
            wait_for(lambda: hammer.ok > ok_after + 20, 5, "traffic after reload")
        finally:
            hammer.stop.set()
            hammer.join(timeout=10)
        assert hammer.errors == [], hammer.errors[:5]
        # The WebSocket opened before the reload is still served (by the old process or worker).
        assert roundtrip(tunnel, b"survived") == b"echo:survived"
    after = read_pids(full.pidfile)
    if master_worker:
        assert after == before  # the master stays; only its worker was replaced
    else:
        # -sf: the old daemon leaves once its last session (the tunnel) is closed.
        assert after and not set(after) & set(before)
        wait_for(lambda: not any(_running(p) for p in before), 10, "the old haproxy to exit")
    assert {s.name for s in hap.api.servers()} == {"a", "b"}


def test_reload_refuses_an_invalid_config(backends: dict[str, Backend], start_haproxy: Any, tmp_path: Path) -> None:
    hap = start_haproxy(make_cluster(tmp_path, backends))
    before = read_pids(hap.cluster.pidfile)
    hap.cfg.write_text(hap.cfg.read_text() + "\nbackend broken\n    nonsense_keyword\n")
    with pytest.raises(ConfigCheckError):
        reload(hap.cfg, hap.cluster.pidfile, socket_path=hap.cluster.runtime_socket)
    assert hap.proc is not None and hap.proc.poll() is None
    assert read_pids(hap.cluster.pidfile) == before
    assert backend_of(hap.cluster.ws_port) in ("a", "b")
