"""``python -m doctor`` as an admin runs it, against the AMI simulator (with good and broken
manager users), the real RabbitMQ and Redis, haproxy -c, a real certificate and a Creatio-shaped
site. Output and exit code are what is checked."""

from __future__ import annotations

import asyncio
import datetime as dt
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from local_cluster.infra import Infrastructure, free_port, port_open
from tests.support.certs import make_pem

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SECRET = "doctor-secret"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def simulator_factory(tmp_path: Path) -> Iterator[Any]:
    """Starts ``python -m ami_simulator`` with a manager user's read/write classes; demo traffic on 305/306."""
    started: list[subprocess.Popen[bytes]] = []

    def start(read: str = "all", write: str = "all") -> int:
        port = free_port()
        log = open(tmp_path / f"simulator-{port}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            [sys.executable, "-m", "ami_simulator", "--port", str(port), "--control-port", "-1",
             "--username", "cms", "--secret", SECRET, "--read", read, "--write", write,
             "--demo-lines", "305,306", "--loop", "--pause", "0.1", "0.5", "--time-scale", "0.2"],
            stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT,
        )
        log.close()
        started.append(process)
        deadline = time.monotonic() + 20
        while not port_open(port):
            assert process.poll() is None, (tmp_path / f"simulator-{port}.log").read_text()
            assert time.monotonic() < deadline, "simulator did not start"
            time.sleep(0.1)
        return port

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def cluster_file(tmp_path: Path) -> Path:
    """A balancer description on free ports, so the port checks do not meet other runs on this machine."""
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({
        "nodes": [{"name": "n1", "host": "127.0.0.1", "port": free_port()},
                  {"name": "n2", "host": "127.0.0.1", "port": free_port()}],
        "ws_port": free_port(), "wss_port": free_port(), "stats_port": free_port(),
        "runtime_socket": str(tmp_path / "haproxy.sock"), "pidfile": str(tmp_path / "haproxy.pid"),
    }))
    return path


def write_settings(tmp_path: Path, infra: Infrastructure, prefix: str, ami_port: int, *,
                   secret: str = SECRET, amqp_url: str | None = None) -> Path:
    path = tmp_path / "appsettings.json"
    path.write_text(json.dumps({
        "Asterisk": {"url": "127.0.0.1", "port": str(ami_port), "userName": "cms", "secret": secret,
                     "protocol": "SIP"},
        "Cluster": {"amqpUrl": amqp_url or infra.amqp_url, "redisUrl": infra.redis_url, "prefix": prefix},
    }))
    return path


def run_doctor(*args: str, env: dict[str, str] | None = None, timeout: float = 90) -> tuple[int, str, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "doctor", "--gateway-metrics-port", str(free_port()), *args],
        capture_output=True, text=True, timeout=timeout,
        env={**_env(), **(env or {})}, cwd=ROOT, check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


def line_of(output: str, start: str) -> str:
    found = [line for line in output.splitlines() if line.startswith(start)]
    assert found, f"no line starting {start!r} in:\n{output}"
    return found[0]


@pytest.fixture(autouse=True)
def _clean_broker(infra: Infrastructure, prefix: str) -> Iterator[None]:
    """doctor declares the events exchange the cluster would; the test's namespace is removed after."""
    yield
    from local_cluster.launcher import delete_broker_objects

    asyncio.run(delete_broker_objects(infra.amqp_url, prefix))


def test_all_good(tmp_path: Path, infra: Infrastructure, prefix: str, simulator_factory: Any,
                  cluster_file: Path) -> None:
    settings = write_settings(tmp_path, infra, prefix, simulator_factory())
    code, out, _ = run_doctor("--config", str(settings), "--cluster", str(cluster_file), "--listen", "4")
    assert code == 0, out
    assert "[FAIL]" not in out, out
    assert line_of(out, "[ ok ] AMI login").endswith("as cms")
    assert line_of(out, "[ ok ] AMI write: click to dial")
    assert line_of(out, "[ ok ] AMI write: queue pause")
    assert line_of(out, "[ ok ] AMI events: call")
    assert "RabbitMQ" in line_of(out, "[ ok ] RabbitMQ reachable")
    assert line_of(out, "[ ok ] Redis reachable")
    assert line_of(out, "[ ok ] HAProxy configuration validates")
    assert SECRET not in out
    assert out.rstrip().splitlines()[-1].startswith("ready:")


def test_wrong_secret(tmp_path: Path, infra: Infrastructure, prefix: str, simulator_factory: Any,
                      cluster_file: Path) -> None:
    settings = write_settings(tmp_path, infra, prefix, simulator_factory(), secret="not-the-secret")
    code, out, elapsed = run_doctor("--config", str(settings), "--cluster", str(cluster_file), "--listen", "1")
    assert code == 1, out
    assert "Authentication failed" in line_of(out, "[FAIL] AMI login")
    assert "manager.conf" in out and "manager reload" in out
    assert "not-the-secret" not in out
    # the rest is still checked: the admin sees every problem in one run
    assert line_of(out, "[ ok ] RabbitMQ reachable") and line_of(out, "[ ok ] Redis reachable")
    assert elapsed < 30


def test_missing_write_class(tmp_path: Path, infra: Infrastructure, prefix: str, simulator_factory: Any,
                             cluster_file: Path) -> None:
    """The user CMS documents minus originate (and without system): click to dial fails, answer/DND warn."""
    settings = write_settings(tmp_path, infra, prefix, simulator_factory(read="call,agent", write="call,agent"))
    code, out, _ = run_doctor("--config", str(settings), "--cluster", str(cluster_file), "--listen", "3")
    assert code == 1, out
    dial = line_of(out, "[FAIL] AMI write: click to dial")
    assert "Permission denied for Originate" in dial
    assert "add originate to write= of [cms]" in out
    assert line_of(out, "[ ok ] AMI write: blind transfer")
    assert line_of(out, "[warn] AMI write: answer from the CRM (SIPnotify)")
    assert line_of(out, "[warn] AMI write: do not disturb")
    assert line_of(out, "[ ok ] AMI events: call")
    # dtmf is not in this user's read classes: no DTMF event can arrive
    assert line_of(out, "[warn] AMI events: dtmf")


def test_unreachable_broker(tmp_path: Path, infra: Infrastructure, prefix: str, simulator_factory: Any,
                            cluster_file: Path) -> None:
    closed = free_port()
    settings = write_settings(tmp_path, infra, prefix, simulator_factory(),
                              amqp_url=f"amqp://guest:guest@127.0.0.1:{closed}/")
    code, out, elapsed = run_doctor("--config", str(settings), "--cluster", str(cluster_file), "--listen", "1")
    assert code == 1, out
    broker = line_of(out, "[FAIL] RabbitMQ reachable")
    assert f"127.0.0.1:{closed}" in broker and "guest:guest" not in out
    assert "Cluster.amqpUrl" in out
    assert line_of(out, "[ ok ] AMI login")
    assert elapsed < 30


def test_bad_config_file(tmp_path: Path, cluster_file: Path) -> None:
    bad = tmp_path / "appsettings.json"
    bad.write_text('{"Asterisk": {"url": "pbx", "port": "fifty"}}')
    code, out, _ = run_doctor("--config", str(bad), "--cluster", str(cluster_file))
    assert code == 1, out
    assert "Asterisk.port" in line_of(out, "[FAIL] configuration parses")
    assert line_of(out, "[skip] PBX, RabbitMQ, Redis")


def test_port_taken_and_tls_certificate(tmp_path: Path, infra: Infrastructure, prefix: str, cluster_file: Path) -> None:
    """No PBX (simulator) configured; a certificate for the wrong name; a node port held by someone else."""
    settings = tmp_path / "appsettings.json"
    settings.write_text(json.dumps({"Cluster": {"amqpUrl": infra.amqp_url, "redisUrl": infra.redis_url,
                                                "prefix": prefix}}))
    now = dt.datetime.now(dt.UTC)
    cert = tmp_path / "haproxy.pem"
    cert.write_bytes(make_pem(["cms.example.com"], not_before=now - dt.timedelta(days=1),
                              not_after=now + dt.timedelta(days=200)))
    node_port = json.loads(cluster_file.read_text())["nodes"][0]["port"]
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", node_port))
        holder.listen(1)
        code, out, _ = run_doctor("--config", str(settings), "--cluster", str(cluster_file), "--tls-cert", str(cert),
                                  "--public-host", "crm.other.org")
    assert code == 1, out
    assert line_of(out, "[skip] PBX")
    assert "TLS on" in line_of(out, "[ ok ] HAProxy configuration validates")
    assert f"127.0.0.1:{node_port} is already in use" in line_of(out, f"[FAIL] port {node_port} free")
    assert line_of(out, "[ ok ] TLS certificate readable, with its key")
    assert "crm.other.org is not among cms.example.com" in line_of(out, "[FAIL] TLS certificate matches")
    assert line_of(out, "[ ok ] TLS certificate not expiring soon")


class _CreatioSite(http.server.BaseHTTPRequestHandler):
    """Creatio's AuthService login and OData Call, as far as the doctor uses them."""

    user, password = "Supervisor", "creatio-pass"

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ok = body == {"UserName": self.user, "UserPassword": self.password}
        answer = {"Code": 0, "Message": ""} if ok else {"Code": 1, "Message": "Invalid username or password specified."}
        data = json.dumps(answer).encode()
        self.send_response(200)
        if ok:
            self.send_header("Set-Cookie", ".ASPXAUTH=session; path=/")
            self.send_header("Set-Cookie", "BPMCSRF=csrf-token; path=/")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        cookies = self.headers.get("Cookie") or ""
        authed = ".ASPXAUTH=session" in cookies and self.headers.get("BPMCSRF") == "csrf-token"
        if self.path.startswith("/0/odata/Call") and authed:
            data = b'{"value": []}'
            self.send_response(200)
        else:
            data = b"{}"
            self.send_response(401 if self.path.startswith("/0/odata/") else 404)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_creatio_service_account(tmp_path: Path, cluster_file: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CreatioSite)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    site = f"http://127.0.0.1:{server.server_address[1]}/0/"
    settings = tmp_path / "empty.json"
    settings.write_text("{}")
    try:
        good = run_doctor("--config", str(settings), "--skip-ports", "--cluster", str(cluster_file),
                          "--creatio-url", site, "--creatio-user", "Supervisor",
                          env={"CMS_DOCTOR_CREATIO_PASSWORD": "creatio-pass", "CMS_REDIS_URL": "redis://127.0.0.1:1/0",
                               "CMS_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"})
        assert line_of(good[1], "[ ok ] Creatio login as Supervisor")
        assert line_of(good[1], "[ ok ] Creatio call records readable")
        assert "creatio-pass" not in good[1]
        bad = run_doctor("--config", str(settings), "--skip-ports", "--cluster", str(cluster_file),
                         "--creatio-url", site, "--creatio-user", "Supervisor",
                         env={"CMS_DOCTOR_CREATIO_PASSWORD": "wrong", "CMS_REDIS_URL": "redis://127.0.0.1:1/0",
                              "CMS_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"})
        assert bad[0] == 1
        assert "Invalid username or password" in line_of(bad[1], "[FAIL] Creatio login as Supervisor")
        # Without flags the config's own CallRecords block is what doctor logs in with.
        records = tmp_path / "records.json"
        records.write_text(json.dumps({"CallRecords": {"siteUrl": site.removesuffix("/0/"),
                                                       "userName": "Supervisor", "password": "creatio-pass"}}))
        configured = run_doctor("--config", str(records), "--skip-ports", "--cluster", str(cluster_file),
                                env={"CMS_REDIS_URL": "redis://127.0.0.1:1/0",
                                     "CMS_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"})
        assert line_of(configured[1], "[ ok ] Creatio login as Supervisor")
        assert "creatio-pass" not in configured[1]
    finally:
        server.shutdown()
        server.server_close()


def test_namespace_in_use_and_replay_file(tmp_path: Path, infra: Infrastructure, prefix: str,
                                          cluster_file: Path) -> None:
    """A gateway of a running cluster beats under the prefix: a warning, with the fix. filePath: the
    capture is loaded instead of the PBX checks (and a missing one fails)."""
    import redis.asyncio as aioredis

    from services.heartbeat import Heartbeat

    async def register() -> None:
        client = aioredis.from_url(infra.redis_url)
        await Heartbeat(client, prefix, "gateway", "running-gw", lambda: {"role": "active"}).beat()
        await client.aclose()

    asyncio.run(register())
    capture = ROOT / "ami_simulator" / "scenarios" / "inbound-direct-answered.ami"
    settings = tmp_path / "appsettings.json"
    settings.write_text(json.dumps({"Asterisk": {"filePath": str(capture)},
                                    "Cluster": {"amqpUrl": infra.amqp_url, "redisUrl": infra.redis_url,
                                                "prefix": prefix}}))
    code, out, _ = run_doctor("--config", str(settings), "--cluster", str(cluster_file))
    assert code == 0, out
    assert "steps" in line_of(out, "[ ok ] Asterisk.filePath replay loads")
    assert "1 gateway (running-gw)" in line_of(out, f"[warn] namespace '{prefix}' not used by a running cluster")
    assert "another Cluster.prefix" in out

    settings.write_text(json.dumps({"Asterisk": {"filePath": str(tmp_path / "missing.ami")},
                                    "Cluster": {"amqpUrl": infra.amqp_url, "redisUrl": infra.redis_url,
                                                "prefix": prefix}}))
    code, out, _ = run_doctor("--config", str(settings), "--cluster", str(cluster_file))
    assert code == 1 and "No such file" in line_of(out, "[FAIL] Asterisk.filePath replay loads"), out

    async def cleanup() -> None:
        client = aioredis.from_url(infra.redis_url)
        keys = [k async for k in client.scan_iter(f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()

    asyncio.run(cleanup())
