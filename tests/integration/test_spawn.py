"""Children of the launcher die with it, however it dies, even when they were started from a
worker thread that has ended since (the parent-death signal belongs to the forking thread)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PARENT = r"""
import json, sys, threading, time
from pathlib import Path
from local_cluster.spawn import spawn

log = Path(sys.argv[1])
pids = {}
pids["main"] = spawn(["sleep", "300"], log).pid
# The trap: a child started from a thread that ends later (asyncio.to_thread, a pool) ...
def work():
    pids["worker"] = spawn(["sleep", "300"], log).pid
    time.sleep(1.0)  # the child is fully started (its death signal armed) before this thread ends

worker = threading.Thread(target=work)
worker.start()
worker.join()
time.sleep(0.5)  # ... must still be running after that thread has ended.
print(json.dumps(pids), flush=True)
time.sleep(300)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ", 1)[1].startswith("Z"))


def test_children_outlive_their_spawning_thread_but_not_the_launcher(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "children.log")], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pids = json.loads(parent.stdout.readline())
        assert all(alive(pid) for pid in pids.values()), "a child died with its spawning thread"
        # Each runs in a session of its own: a terminal's Ctrl-C reaches only the launcher.
        assert all(os.getsid(pid) == pid for pid in pids.values())
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in pids.values() if alive(pid)], "a child outlived the SIGKILLed launcher"
    finally:
        parent.kill()
        parent.wait(timeout=10)
        if parent.stdout is not None:
            parent.stdout.close()


def test_a_child_that_outlives_its_sigterm_is_killed_not_left_running(tmp_path: Path) -> None:
    """make chaos's cluster-restart sent a gateway SIGTERM; it did not finish within 10 s and the harness
    crashed on the launcher's timeout, leaving the run without a table. A supervisor escalates to SIGKILL."""
    from local_cluster.launcher import ClusterOptions, LocalCluster

    cluster = LocalCluster(ClusterOptions.ephemeral(tmp_path))
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); " \
               "time.sleep(120)"
    child = cluster._spawn("stubborn", [sys.executable, "-c", stubborn])
    deadline = time.monotonic() + 10
    while "up" not in child.log_path.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    cluster.kill("stubborn", signal.SIGTERM, timeout=1.0)
    assert child.process.poll() == -signal.SIGKILL
    assert time.monotonic() - started < 5
