"""`make run` as an operator (or a supervisor, or a test harness) meets it: the real launcher,
``python -m local_cluster`` (once through ``make run`` itself), as a subprocess in its own
session, on free ports and a namespace of its own, on the session's RabbitMQ and Redis.

Reproductions of issue 10 (items 4, 5) and issue 13 (make run's errors, Cluster block, ports):
a SIGTERM to the whole process group, twice; the launcher SIGKILLed; a node SIGKILLed; a node
that cannot start again; a config that is missing, broken or wrong; an AMI login refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from local_cluster.infra import Infrastructure, free_port, port_open
from local_cluster.launcher import delete_broker_objects, http_get
from tests.support.creatio_client import RING_STARTED, CreatioAgent

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CALLER = "79161234567"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (dead, not yet reaped by its parent) is not a process that serves anything.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Launch:
    """One `make run`: its output read as it comes, the PIDs and URLs it announced."""

    def __init__(self, args: list[str], env: dict[str, str], run_dir: Path, prefix: str) -> None:
        self.run_dir = run_dir
        self.prefix = prefix
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.process = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )
        self.started_at = time.monotonic()
        self._readers = [
            threading.Thread(target=self._pump, args=(self.process.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._pump, args=(self.process.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self.pids: dict[str, int] = {}

    @staticmethod
    def _pump(stream: object, into: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            into.append(line)

    @property
    def out(self) -> str:
        return "".join(self.stdout)

    @property
    def err(self) -> str:
        return "".join(self.stderr)

    def wait_up(self, timeout: float = 120) -> None:
        wait_until(lambda: "Ctrl-C stops everything" in self.out or self.process.poll() is not None, timeout,
                   "the cluster to come up")
        assert self.process.poll() is None, f"launcher exited {self.process.returncode}:\n{self.out}\n{self.err}"
        self.pids = self.current_pids()

    def current_pids(self) -> dict[str, int]:
        pids: dict[str, int] = json.loads((self.run_dir / f"{self.prefix}-processes.json").read_text())
        return pids

    def url(self, name: str) -> str:
        match = re.search(rf"^  {re.escape(name)}\s+(\S+)$", self.out, re.MULTILINE)
        assert match, f"no {name!r} in the output:\n{self.out}"
        return match.group(1)

    def port(self, name: str) -> int:
        match = re.search(r":(\d+)", self.url(name))
        assert match
        return int(match.group(1))

    def finish(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        self._close()
        return code

    def _close(self) -> None:
        for reader in self._readers:
            reader.join(timeout=5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()

    def kill_leftovers(self) -> None:
        """Teardown only: whatever a failed test left running must not outlive it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        pids = dict(self.pids)
        with contextlib.suppress(OSError, ValueError):
            pids.update(self.current_pids())
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self._close()


@pytest.fixture
def launch(infra: Infrastructure, tmp_path: Path) -> Iterator[Callable[..., Launch]]:
    started: list[Launch] = []
    prefixes: list[str] = []

    def start(*extra: str, command: list[str] | None = None, env: dict[str, str] | None = None,
              prefix: str | None = None, cluster_from_env: bool = True) -> Launch:
        """``cluster_from_env=False``: no CMS_* variables, the config file's Cluster block decides."""
        prefix = prefix or f"t{uuid.uuid4().hex[:10]}"
        prefixes.append(prefix)
        run_dir = tmp_path / f"run-{len(started)}"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CMS_")}
        full_env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        if cluster_from_env:
            full_env.update(CMS_PREFIX=prefix, CMS_AMQP_URL=infra.amqp_url, CMS_REDIS_URL=infra.redis_url)
        full_env.update(env or {})
        args = command or [sys.executable, "-m", "local_cluster", "--auto-ports", "--run-dir", str(run_dir),
                           "--demo-lines", "", *extra]
        one = Launch(args, full_env, run_dir, prefix)
        started.append(one)
        return one

    yield start
    for one in started:
        one.kill_leftovers()
    # `make run` keeps an operator's namespace at stop; these are ours, so they go.
    client = redis.Redis.from_url(infra.redis_url)
    for prefix in prefixes:
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        asyncio.run(delete_broker_objects(infra.amqp_url, prefix))
    client.close()


def assert_all_gone(pids: dict[str, int], ports: list[int], timeout: float) -> None:
    wait_until(lambda: not [n for n, p in pids.items() if pid_alive(p)], timeout,
               f"every child to be gone; alive: {[n for n, p in pids.items() if pid_alive(p)]}")
    assert not [p for p in ports if port_open(p)], "a port is still served"


def served_ports(one: Launch) -> list[int]:
    return [one.port(name) for name in ("client, Creatio 7.x (raw WebSocket)", "HAProxy stats", "gateway metrics",
                                         "node1 metrics", "node2 metrics", "launcher metrics (restarts per process)")]


# ---- issue 10 item 5: stopping never hangs and never leaves an orphan --------------------------

def test_two_sigterms_to_the_process_group_stop_everything_within_the_deadline(launch: Callable[..., Launch]) -> None:
    """As the issue saw it: the PBX playing calls, an agent connected, a key configured."""
    one = launch("--demo-lines", "305", "--key", "k3y-of-this-deployment")
    one.wait_up()
    ports = served_ports(one)
    config = one.run_dir / f"haproxy-{one.prefix}.cfg"
    # It holds the deployment key: owner-only while it exists...
    assert config.stat().st_mode & 0o777 == 0o600
    assert "k3y-of-this-deployment" in config.read_text()

    async def stop_with_an_agent_connected() -> int:
        agent = CreatioAgent(one.url("client, Creatio 7.x (raw WebSocket)"), "305")
        await agent.connect()
        try:
            await agent.open()
            await agent.wait_for(RING_STARTED, timeout=30)  # a demo call is on
            # ...as a supervisor or test harness stops make: the group gets it, then again a moment later.
            os.killpg(one.process.pid, signal.SIGTERM)
            await asyncio.sleep(0.05)
            os.killpg(one.process.pid, signal.SIGTERM)
            return await asyncio.to_thread(one.finish, 30)
        finally:
            await agent.close()

    code = asyncio.run(stop_with_an_agent_connected())
    assert code == 0, one.err
    assert_all_gone(one.pids, ports, timeout=5)
    # ...and gone with the run, like every generated file.
    assert not config.exists()
    assert not (one.run_dir / f"{one.prefix}-processes.json").exists()
    assert "Traceback" not in one.err


def test_sigterm_to_make_runs_process_group_twice_stops_everything(
    launch: Callable[..., Launch], infra: Infrastructure, tmp_path: Path
) -> None:
    """The same through `make run` (``-o setup``: the shared virtualenv is ready and must not be
    reinstalled from this checkout): make and the launcher in one group, both get the signal."""
    run_dir = tmp_path / "make-run"
    one = launch(command=["make", "-s", "-o", "setup", "run",
                          f"RUN_ARGS=--auto-ports --run-dir {run_dir} --demo-lines ''"])
    one.run_dir = run_dir
    one.wait_up()
    ports = served_ports(one)
    for _ in range(2):
        os.killpg(one.process.pid, signal.SIGTERM)
        time.sleep(0.02)
    one.finish(timeout=30)
    assert_all_gone(one.pids, ports, timeout=15)


def test_sigkill_of_the_launcher_takes_every_child_with_it(launch: Callable[..., Launch]) -> None:
    one = launch()
    one.wait_up()
    ports = served_ports(one)
    os.kill(one.process.pid, signal.SIGKILL)
    one.finish(timeout=10)
    assert_all_gone(one.pids, ports, timeout=10)


def test_a_run_after_a_killed_one_starts_over_its_leftovers(launch: Callable[..., Launch]) -> None:
    """The life of a deployment: the launcher SIGKILLed leaves its generated files and the
    namespace's state in Redis; the next `make run` on the same prefix and folder starts over them."""
    first = launch()
    first.wait_up()
    os.kill(first.process.pid, signal.SIGKILL)
    first.finish(timeout=10)
    assert_all_gone(first.pids, [], timeout=10)
    leftovers = first.run_dir / f"{first.prefix}-processes.json"
    assert leftovers.exists()

    again = launch("--run-dir", str(first.run_dir), prefix=first.prefix)
    again.run_dir = first.run_dir
    again.wait_up()
    assert again.pids != first.pids
    assert (first.run_dir / f"haproxy-{first.prefix}.cfg").stat().st_mode & 0o777 == 0o600

    async def agent_opens() -> None:
        agent = CreatioAgent(again.url("client, Creatio 7.x (raw WebSocket)"), "311")
        await agent.connect()
        try:
            await agent.open()
        finally:
            await agent.close()

    asyncio.run(agent_opens())
    os.killpg(again.process.pid, signal.SIGTERM)
    assert again.finish(timeout=30) == 0
    assert not leftovers.exists()


def test_sigterm_while_starting_stops_what_was_started(launch: Callable[..., Launch]) -> None:
    one = launch()
    wait_until(lambda: (one.run_dir / f"{one.prefix}-processes.json").exists(), 60, "the first child")
    pids = one.current_pids()
    os.killpg(one.process.pid, signal.SIGTERM)
    os.killpg(one.process.pid, signal.SIGTERM)
    assert one.finish(timeout=30) == 0
    with contextlib.suppress(FileNotFoundError):
        pids.update(one.current_pids())
    assert_all_gone(pids, [], timeout=5)


# ---- issue 10 item 4: a dead process is restarted, the rest keeps serving ---------------------

def _launcher_metric(one: Launch, name: str, process: str) -> float:
    _, body = http_get(one.url("launcher metrics (restarts per process)"))
    match = re.search(rf'^{name}{{process="{process}"}} (\S+)$', body.decode(), re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _node_serving(one: Launch, agent_count: int) -> tuple[str, str]:
    """(node holding the agents, the other node)"""
    for name, other in (("node1", "node2"), ("node2", "node1")):
        status, body = http_get(f"http://127.0.0.1:{one.port(f'{name} metrics')}/health")
        if status == 200 and json.loads(body)["clients"] >= agent_count:
            return name, other
    raise AssertionError("no node reports the agent")


def test_a_killed_node_is_restarted_while_the_other_keeps_serving(launch: Callable[..., Launch]) -> None:
    one = launch()
    one.wait_up()
    client_url = one.url("client, Creatio 7.x (raw WebSocket)")
    control = one.url("simulator calls (ground truth)").rsplit("/", 1)[0]

    def play(line: str) -> None:
        body = json.dumps({"scenario": "inbound-direct-answered", "vars": {"line": line, "caller": CALLER}})
        request = urllib.request.Request(
            f"{control}/play", data=body.encode(), method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5):  # noqa: S310 - loopback
            pass

    async def main() -> None:
        agent = CreatioAgent(client_url, "311")
        await agent.connect()
        try:
            await agent.open()
            serving, victim = _node_serving(one, 1)
            victim_pid = one.pids[victim]
            os.kill(victim_pid, signal.SIGKILL)
            # The death is logged with the signal, and the node is started again...
            await asyncio.to_thread(wait_until, lambda: f"{victim} (pid {victim_pid}) died: killed by SIGKILL"
                                    in one.err, 20, "the death to be logged")
            # ...while the agent on the other node keeps its session and still gets its calls.
            mark = len(agent.events)
            await asyncio.to_thread(play, "311")
            ring = await agent.wait_for(RING_STARTED, after=mark, timeout=20)
            assert ring.content["callerId"] == CALLER
            assert not agent.closed
            await asyncio.to_thread(wait_until, lambda: f"{victim} is back" in one.err, 60, "the node to be back")
        finally:
            await agent.close()

        pids = one.current_pids()
        assert pids[victim] != victim_pid and pid_alive(pids[victim])
        for name in ("gateway", serving, "haproxy", "simulator"):
            assert pids[name] == one.pids[name], f"{name} was restarted too"
        assert _launcher_metric(one, "cms_launcher_restarts_total", victim) == 1
        assert _launcher_metric(one, "cms_launcher_process_exits_total", victim) == 1

        # HAProxy sees it come back, and agents can connect to it again.
        stats = one.url("HAProxy stats")

        def both_up() -> bool:
            _, body = http_get(stats + ";csv")
            return sum(1 for row in body.decode().splitlines()
                       if row.startswith("ws_nodes,node") and ",UP," in row) == 2

        await asyncio.to_thread(wait_until, both_up, 30, "HAProxy to mark the restarted node UP")
        direct = CreatioAgent(f"ws://127.0.0.1:{one.port(f'{victim} metrics')}/", "312")
        await direct.connect()
        try:
            await direct.open()
            mark = len(direct.events)
            await asyncio.to_thread(play, "312")
            await direct.wait_for(RING_STARTED, after=mark, timeout=20)
        finally:
            await direct.close()

    asyncio.run(main())
    os.killpg(one.process.pid, signal.SIGTERM)
    assert one.finish(timeout=30) == 0


def test_a_node_that_cannot_start_again_is_reported_crash_looping_then_recovers(
    launch: Callable[..., Launch],
) -> None:
    one = launch()
    one.wait_up()
    port = one.port("node2 metrics")
    os.kill(one.pids["node2"], signal.SIGKILL)
    # Another program grabs the node's port the moment it is free: every restart fails.
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # health checks leave TIME_WAITs
    deadline = time.monotonic() + 10
    while True:
        try:
            squatter.bind(("127.0.0.1", port))
            break
        except OSError:
            assert time.monotonic() < deadline, "the killed node's port never came free"
            time.sleep(0.01)
    squatter.listen()
    try:
        wait_until(lambda: "node2 is CRASH-LOOPING" in one.err, 90, "the crash loop to be reported")
        assert _launcher_metric(one, "cms_launcher_crash_looping", "node2") == 1
        assert _launcher_metric(one, "cms_launcher_restarts_total", "node2") >= 2
        # The report shows why: the end of the node's own log.
        report = one.err[one.err.index("node2 is CRASH-LOOPING"):]
        assert f"{one.prefix}-node2.log" in report
        # The rest keeps serving meanwhile.
        assert http_get(f"http://127.0.0.1:{one.port('node1 metrics')}/health")[0] == 200
    finally:
        squatter.close()
    wait_until(lambda: "node2 is back" in one.err, 90, "node2 to come back once its port is free")
    os.killpg(one.process.pid, signal.SIGTERM)
    assert one.finish(timeout=30) == 0


# ---- issue 13: errors that say what to fix -------------------------------------------------------

def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "appsettings.json"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, r"appsettings\.json.*(no such file|No such file)"),
        ('{\n  "Asterisk": {\n    "url": "pbx.example.com"\n    "port": "5038"\n  }\n}\n',
         r"appsettings\.json.*(line 4|:4:)"),
        ('{"Asterisk": {"url": "pbx.example.com", "userName": "cms", "port": "fifty"}}', r"appsettings\.json.*port"),
        ('{"Asterisk": {"url": "pbx.example.com", "userName": "cms"}, "Cluster": {"prefix": "no spaces"}}',
         r"appsettings\.json.*Cluster\.prefix"),
    ],
    ids=["missing-file", "invalid-json", "bad-value", "bad-cluster-value"],
)
def test_a_bad_config_is_one_clear_line_and_a_non_zero_exit(
    launch: Callable[..., Launch], tmp_path: Path, text: str | None, expected: str
) -> None:
    path = tmp_path / "appsettings.json" if text is None else _write(tmp_path, text)
    one = launch("--config", str(path), cluster_from_env=False)
    code = one.finish(timeout=20)
    assert code != 0
    assert time.monotonic() - one.started_at < 15
    assert "Traceback" not in one.err
    lines = [line for line in one.err.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2, one.err
    assert re.search(expected, one.err), one.err


def test_a_bad_deployment_key_is_one_clear_line(launch: Callable[..., Launch]) -> None:
    one = launch("--key", "short")
    assert one.finish(timeout=30) != 0
    assert "Traceback" not in one.err
    assert re.search(r"--key \(CMS_RUN_KEY\): expected 16-256 characters", one.err), one.err
    assert len(one.err.strip().splitlines()) <= 2, one.err


def test_make_run_with_a_missing_config_says_so(launch: Callable[..., Launch], tmp_path: Path) -> None:
    one = launch(command=["make", "-s", "-o", "setup", "run", f"CONFIG={tmp_path}/nowhere.json"])
    assert one.finish(timeout=30) != 0
    assert "Traceback" not in one.err
    assert "nowhere.json" in one.err


@pytest.fixture
def pbx(tmp_path: Path) -> Iterator[int]:
    """A PBX of our own (the simulator) whose AMI user is cms/right-secret."""
    port = free_port()
    log = open(tmp_path / "pbx.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "ami_simulator", "--port", str(port), "--control-port", "-1", "--username", "cms",
         "--secret", "right-secret"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        wait_until(lambda: port_open(port), 20, "the PBX")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.mark.parametrize(("secret", "hint"), [("wrong-secret", "do not match"), ("", "secret is empty")])
def test_an_ami_login_refused_is_reported_quickly_with_the_manager_conf_hint(
    launch: Callable[..., Launch], tmp_path: Path, pbx: int, secret: str, hint: str
) -> None:
    path = _write(tmp_path, json.dumps({"Asterisk": {"url": "127.0.0.1", "port": str(pbx), "userName": "cms",
                                                     "secret": secret}}))
    one = launch("--config", str(path))
    code = one.finish(timeout=40)
    assert code != 0
    assert time.monotonic() - one.started_at < 30
    assert "refused the AMI login of user 'cms'" in one.err, one.err
    assert hint in one.err and "manager.conf" in one.err
    assert "Traceback" not in one.err
    assert secret not in one.err or not secret


def test_a_pbx_that_does_not_answer_is_named(launch: Callable[..., Launch], tmp_path: Path) -> None:
    # Held bound, never listening, for the whole test: a connection to it is refused, and nothing else (the
    # launcher's own --auto-ports among them: CI once gave HAProxy this very port) can take it meanwhile.
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))
        closed = reserved.getsockname()[1]
        path = _write(tmp_path, json.dumps({"Asterisk": {"url": "127.0.0.1", "port": str(closed),
                                                         "userName": "cms", "secret": "x"}}))
        one = launch("--config", str(path))
        assert one.finish(timeout=60) != 0
    assert f"AMI at 127.0.0.1:{closed} does not answer" in one.err, one.err


def test_a_port_that_accepts_and_closes_is_named_like_one_that_does_not_answer(
    launch: Callable[..., Launch], tmp_path: Path
) -> None:
    """Asterisk.port pointing at something that is not Asterisk's manager (it accepts, then hangs up): the
    gateway never logs in, which is "cannot connect" to the admin, named at start like a closed port."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        port = server.getsockname()[1]
        stop = threading.Event()

        def hang_up() -> None:
            server.settimeout(0.2)
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    conn, _ = server.accept()
                    conn.close()

        thread = threading.Thread(target=hang_up, daemon=True)
        thread.start()
        try:
            path = _write(tmp_path, json.dumps({"Asterisk": {"url": "127.0.0.1", "port": str(port),
                                                             "userName": "cms", "secret": "x"}}))
            one = launch("--config", str(path))
            assert one.finish(timeout=60) != 0
        finally:
            stop.set()
            thread.join(2)
    assert f"AMI at 127.0.0.1:{port} does not answer" in one.err, one.err


def test_the_cluster_block_is_honoured(launch: Callable[..., Launch], infra: Infrastructure, tmp_path: Path) -> None:
    """Prefix and URLs from the admin's file (the CMS_* variables are not set here)."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    # No PBX named (an empty url in a nested block, as a CMS file may have): the simulator plays it.
    path = _write(tmp_path, json.dumps({"Messaging": {"Asterisk": {"url": "", "originateContext": "from-internal"}},
                                        "Cluster": {"prefix": prefix, "amqpUrl": infra.amqp_url,
                                                    "redisUrl": infra.redis_url}}))
    one = launch("--config", str(path), prefix=prefix, cluster_from_env=False)
    one.wait_up()
    assert f"namespace '{prefix}'" in one.out
    assert "built-in Asterisk simulator" in one.out
    assert http_get(f"http://127.0.0.1:{one.port('gateway metrics')}/health")[0] == 200
    assert (one.run_dir / f"{prefix}-gateway.log").exists()
    client = redis.Redis.from_url(infra.redis_url)
    wait_until(lambda: bool(list(client.scan_iter(f"{prefix}:*", count=1000))), 20,
               f"the gateway to write under {prefix}:")
    client.close()
    os.killpg(one.process.pid, signal.SIGTERM)
    assert one.finish(timeout=30) == 0


def test_an_unreachable_broker_in_the_cluster_block_is_named(launch: Callable[..., Launch], tmp_path: Path) -> None:
    closed = free_port()
    path = _write(tmp_path, json.dumps({"Cluster": {"amqpUrl": f"amqp://guest:guest@127.0.0.1:{closed}/"}}))
    one = launch("--config", str(path), cluster_from_env=False)
    assert one.finish(timeout=30) != 0
    assert f"RabbitMQ at 127.0.0.1:{closed} (Cluster.amqpUrl in {path})" in one.err, one.err


def test_a_port_taken_is_named_with_the_way_to_choose_another(tmp_path: Path, infra: Infrastructure) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CMS_PREFIX": f"t{uuid.uuid4().hex[:10]}",
               "CMS_AMQP_URL": infra.amqp_url, "CMS_REDIS_URL": infra.redis_url,
               "CMS_RUN_STATS_PORT": str(free_port()), "CMS_RUN_NODE_PORT": str(free_port()),
               "CMS_RUN_GATEWAY_METRICS_PORT": str(free_port()), "CMS_RUN_AMI_PORT": str(free_port()),
               "CMS_RUN_SIMULATOR_CONTROL_PORT": str(free_port()), "CMS_RUN_METRICS_PORT": str(free_port())}
        result = subprocess.run(
            [sys.executable, "-m", "local_cluster", "--port", str(port), "--nodes", "1",
             "--run-dir", str(tmp_path / "run")],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
        )
    assert result.returncode != 0
    assert f"port {port} (HAProxy client port) is taken" in result.stderr, result.stderr
    assert "--port N" in result.stderr and "CMS_RUN_PORT=N" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_gateway_gets_its_own_metrics_port_and_is_supervised(launch: Callable[..., Launch]) -> None:
    """``--gateways 2`` (the default once the gateway's Redis lease is in): each gateway has its
    own /metrics and /health, each is restarted when it dies. Which one is active is the
    gateways' business, not the launcher's."""
    one = launch("--gateways", "2")
    one.wait_up()
    ports = {one.port("gateway metrics"), one.port("gateway2 metrics")}
    assert len(ports) == 2
    for port in ports:
        assert http_get(f"http://127.0.0.1:{port}/health")[0] == 200
    old = one.pids["gateway2"]
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: "gateway2 is back" in one.err, 60, "gateway2 to be back")
    now = one.current_pids()
    assert now["gateway"] == one.pids["gateway"]
    assert now["gateway2"] != old
    os.killpg(one.process.pid, signal.SIGTERM)
    assert one.finish(timeout=30) == 0
    assert_all_gone(now, list(ports), timeout=5)


def test_a_supervisor_in_process_restarts_a_killed_node_and_never_outlives_stop(
    infra: Infrastructure, tmp_path: Path
) -> None:
    """What a harness (make chaos) gets: LocalCluster + Supervisor.in_background()."""
    import psutil

    from local_cluster.supervisor import Supervisor
    from tests.e2e.conftest import running_cluster

    with running_cluster(infra, tmp_path / "run") as cluster:
        supervisor = Supervisor(cluster)
        stop_supervising = supervisor.in_background(interval=0.2)
        try:
            old = cluster.child("node1").pid
            cluster.kill("node1")
            wait_until(lambda: cluster.child("node1").pid != old and cluster.ready("node1"), 60,
                       "node1 to be restarted")
            assert supervisor.restart_count("node1") == 1
            # A death right before stop: the restart it schedules must never happen.
            cluster.kill("node2")
            time.sleep(0.3)
        finally:
            cluster.stop()
            time.sleep(1.0)
            stop_supervising()
    ours = [p for p in psutil.Process().children(recursive=True)
            if any(cluster.prefix in part for part in p.cmdline())]
    assert ours == [], [p.cmdline() for p in ours]


def test_a_private_redis_that_dies_is_restarted_and_the_cluster_serves_again(launch: Callable[..., Launch]) -> None:
    """`--private redis`: the run's own Redis (as on a machine without one) is supervised too; it
    comes back empty, as the machine's Redis would, and agents can open their lines again."""
    one = launch("--private", "redis")
    one.wait_up()
    assert "private-redis" in one.pids
    os.kill(one.pids["private-redis"], signal.SIGKILL)
    wait_until(lambda: "private-redis is back" in one.err, 60, "the private Redis to be back")
    assert one.current_pids()["private-redis"] != one.pids["private-redis"]
    for name in ("gateway", "node1", "node2", "haproxy"):
        assert one.current_pids()[name] == one.pids[name], f"{name} was restarted"

    async def agent_opens() -> None:
        agent = CreatioAgent(one.url("client, Creatio 7.x (raw WebSocket)"), "311")
        await agent.connect()
        try:
            await agent.open(timeout=20)
        finally:
            await agent.close()

    asyncio.run(agent_opens())
    now = one.current_pids()
    os.killpg(one.process.pid, signal.SIGTERM)
    assert one.finish(timeout=40) == 0
    assert_all_gone(now, [], timeout=5)


# ---- issue 13: Creatio's setup guide, as written ------------------------------------------------

GUIDE_FIXTURES = ROOT / "tests" / "fixtures" / "cms"


@pytest.mark.parametrize("name", ["guide-appsettings.json", "Terrasoft.Messaging.Service.exe.config"])
def test_the_guides_sample_configs_start_the_cluster_unchanged(launch: Callable[..., Launch], name: str) -> None:
    """The guide's .NET Core appsettings.json (flat, "protocol": "PJSIP/") and its .NET Framework
    <asterisk .../> element, byte for byte. They name a PBX at 10.0.15.185 that a test may not reach,
    so ``--simulator`` plays the built-in one in its place, logging in with the file's own AMI user
    (creatio/creatio) and speaking PJSIP as the file says; nothing else of the file is replaced."""
    one = launch("--config", str(GUIDE_FIXTURES / name), "--simulator")
    one.wait_up()
    assert "configuration warning" not in one.err and "configuration error" not in one.err
    control = one.url("simulator calls (ground truth)").rsplit("/", 1)[0]

    async def main() -> None:
        agent = CreatioAgent(one.url("client, Creatio 7.x (raw WebSocket)"), "305")
        await agent.connect()
        try:
            await agent.open()
            body = json.dumps({"scenario": "inbound-direct-answered", "vars": {"line": "305", "caller": CALLER}})
            request = urllib.request.Request(f"{control}/play", data=body.encode(), method="POST",
                                             headers={"Content-Type": "application/json"})
            await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=5).close())  # noqa: S310
            ring = await agent.wait_for(RING_STARTED, timeout=30)
            assert ring.content["callerId"] == CALLER
        finally:
            await agent.close()

    asyncio.run(main())
    # The simulator took only the guide's user (creatio/creatio), and played PJSIP channels.
    calls = json.loads(http_get(f"{control}/calls")[1])
    assert "PJSIP/305" in json.dumps(calls)
    # The guide's secret is also its user name: masked wherever it would appear in the logs.
    gateway_log = (one.run_dir / f"{one.prefix}-gateway.log").read_text()
    assert "'secret': '***'" in gateway_log and "creatio" not in gateway_log
    os.killpg(one.process.pid, signal.SIGTERM)
    assert one.finish(timeout=30) == 0
