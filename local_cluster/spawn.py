"""Start the launcher's children so that none can outlive it.

Each child gets its own session (signals from the terminal reach only the launcher, which
stops the children in order) and runs under ``deathsig.py``, which arms Linux's parent-death
signal before exec. That signal is tied to the *thread* that forked the child, not to the
process: a child forked from a short-lived worker thread (``asyncio.to_thread``, a thread pool)
would be killed when that thread ends. So every child is forked from one long-lived thread,
which ends only with the process.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

DEATHSIG = Path(__file__).resolve().with_name("deathsig.py")


class _Spawner:
    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[tuple[dict[str, Any], Future[subprocess.Popen[bytes]]]] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name="child-spawner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            kwargs, result = self._requests.get()
            try:
                result.set_result(subprocess.Popen(**kwargs))
            except BaseException as exc:  # handed back to the caller, who raises it
                result.set_exception(exc)

    def popen(self, **kwargs: Any) -> subprocess.Popen[bytes]:
        result: Future[subprocess.Popen[bytes]] = Future()
        self._requests.put((kwargs, result))
        return result.result()


_spawner: _Spawner | None = None
_lock = threading.Lock()


def spawn(
    args: list[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``args`` in a new session, output appended to ``log_path``, killed if we die."""
    global _spawner
    with _lock:
        if _spawner is None:
            _spawner = _Spawner()
        spawner = _spawner
    wrapped = [sys.executable, "-I", "-S", str(DEATHSIG), str(os.getpid()), *args]
    with open(log_path, "ab") as out:
        return spawner.popen(
            args=wrapped, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=cwd, start_new_session=True,
        )
