"""The node process as a supervisor sees it: a start that fails is a non-zero exit."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from local_cluster.infra import Infrastructure

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_a_node_whose_port_is_taken_exits_non_zero(infra: Infrastructure, prefix: str, tmp_path: Path) -> None:
    settings = tmp_path / "appsettings.json"
    settings.write_text(json.dumps({"Cluster": {"amqpUrl": infra.amqp_url, "redisUrl": infra.redis_url,
                                                "prefix": prefix}}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "ws_node", "--config", str(settings), "--port", str(port)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "node failed to start" in done.stderr


def test_a_node_queues_a_reconnect_storms_worth_of_connections(infra: Infrastructure, prefix: str,
                                                               tmp_path: Path) -> None:
    """A killed node's agents arrive through HAProxy by the thousand within a second: a listen backlog of 50
    (Twisted's default) drops most of their SYNs, HAProxy's health checks among them."""
    settings = tmp_path / "appsettings.json"
    settings.write_text(json.dumps({"Cluster": {"amqpUrl": infra.amqp_url, "redisUrl": infra.redis_url,
                                                "prefix": prefix}}))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "node.log"
    with log.open("w") as sink:
        node = subprocess.Popen([sys.executable, "-m", "ws_node", "--config", str(settings), "--port", str(port)],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=sink)
    try:
        deadline = time.monotonic() + 30
        listening = ""
        while time.monotonic() < deadline and not listening:
            assert node.poll() is None, "the node exited"
            listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                                       check=True).stdout.strip()
            time.sleep(0.2)
        assert listening, "the node never listened"
        # A listening socket's Send-Q in ss is its backlog.
        backlog = int(listening.split()[2])
        assert backlog >= 1024, listening
        # And a SIGTERM drains and stops it cleanly (the listening port's Deferred once failed the drain).
        node.terminate()
        assert node.wait(20) == 0
        assert "ERROR" not in log.read_text(), log.read_text()[-2000:]
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(5)
