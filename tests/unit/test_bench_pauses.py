"""GC pauses and event-loop lag recorded inside a child process (bench/pauses.py via bench/_site)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench import pauses
from bench.pauses import ProcessPauses, read_all, role_of, window

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import asyncio, gc, time
async def main():
    await asyncio.sleep(0.3)
    time.sleep(0.25)                 # holds the loop: one lag of about 250 ms
    junk = [[i] for i in range(300_000)]
    gc.collect()                     # a full collection over many objects
    await asyncio.sleep(0.3)
asyncio.run(main())
time.sleep(pauses_wait)
"""


def test_a_child_records_its_gc_pauses_and_loop_lag(tmp_path: Path) -> None:
    env = {**os.environ, **pauses.child_env(tmp_path, {"PYTHONPATH": str(ROOT)})}
    code = CHILD.replace("pauses_wait", str(pauses.WRITE_INTERVAL * 3))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60, cwd=ROOT)
    found = read_all(tmp_path)
    assert len(found) == 1
    (seen,) = found.values()
    assert seen.gc_count >= 1 and seen.gc_seconds > 0
    assert seen.probes >= 3
    assert max(d for _, d in seen.lag) >= 0.2
    assert all(d >= pauses.RECORD_GC_FROM for _, d in seen.gc)


def test_without_the_variable_nothing_is_installed(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{pauses.SITE_DIR}{os.pathsep}{ROOT}"}
    env.pop(pauses.ENV_DIR, None)
    subprocess.run([sys.executable, "-c", "import asyncio; asyncio.run(asyncio.sleep(0.2))"], env=env,
                   check=True, timeout=60, cwd=ROOT)
    assert pauses.install(None) is None if pauses.ENV_DIR not in os.environ else True
    assert list(tmp_path.iterdir()) == []


def test_role_of_and_window_arithmetic() -> None:
    assert role_of(["python", "-m", "ami_gateway", "--config", "x"]) == "gateway"
    assert role_of(["/venv/bin/python", "-m", "ws_node"]) == "node"
    assert role_of(["python", "-c", "pass"]) == "python"
    now = time.time()
    before = {1: ProcessPauses(1, "node", 10, 0.010, 100, ((now - 100, 0.002),), ())}
    after = {
        1: ProcessPauses(1, "node", 30, 0.050, 300, ((now - 100, 0.002), (now - 5, 0.012)), ((now - 4, 0.030),)),
        2: ProcessPauses(2, "node", 5, 0.004, 50, ((now - 3, 0.001),), ((now - 200, 0.5),)),
        3: ProcessPauses(3, "gateway", 7, 0.007, 70, (), ()),
    }
    out = window(before, after, now - 10, now)
    node = out["node"]
    assert node.processes == 2
    assert node.gc_count == 25 and abs(node.gc_seconds - 0.044) < 1e-9
    assert node.gc.count == 2 and node.gc.maximum == 0.012  # the pause before the window is left out
    assert node.lag.count == 1 and node.lag.maximum == 0.030 and node.lag.over == 1  # the 0.5 s lag is older
    assert out["gateway"].gc_count == 7 and out["gateway"].lag.count == 0


def test_read_all_skips_broken_files(tmp_path: Path) -> None:
    (tmp_path / "1.json").write_text("{not json")
    (tmp_path / "2.json").write_text('{"pid": 2}')
    assert read_all(tmp_path) == {}
    assert read_all(tmp_path / "absent") == {}
