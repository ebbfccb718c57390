"""The node process as a supervisor sees it: a start that fails is a non-zero exit."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
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
