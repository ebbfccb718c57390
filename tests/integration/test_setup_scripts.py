"""The setup scripts wait for another apt/dpkg (unattended upgrades on a fresh machine) instead
of failing at once: the real apt-get against the real dpkg lock, held here for a few seconds.
``apt-get check`` takes that lock and changes nothing."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCK = Path("/var/lib/dpkg/lock-frontend")

pytestmark = pytest.mark.skipif(
    shutil.which("apt-get") is None or os.geteuid() != 0 or not LOCK.exists(),
    reason="needs apt-get and root (as the setup scripts do)",
)


@pytest.fixture
def dpkg_busy() -> Iterator[float]:
    """Another package manager holding dpkg's frontend lock for ``HOLD`` seconds."""
    hold = 4.0
    fd = os.open(LOCK, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    timer = threading.Timer(hold, os.close, (fd,))
    timer.start()
    try:
        yield hold
    finally:
        timer.join()


def run_lib(command: str, timeout_seconds: int = 60) -> subprocess.CompletedProcess[str]:
    script = f'set -euo pipefail; source scripts/apt-lib.sh; {command}'
    return subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "APT_LOCK_TIMEOUT": str(timeout_seconds)})


def test_an_apt_command_waits_for_the_lock_and_then_runs(dpkg_busy: float) -> None:
    started = time.monotonic()
    result = run_lib("apt_locked_retry setup apt-get check -qq")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started >= dpkg_busy - 0.5
    assert "another apt/dpkg is running" in result.stderr
    assert result.stderr.count("waiting up to") == 1  # said once, not once per retry


def test_apts_own_lock_timeout_is_honoured_on_this_apt(dpkg_busy: float) -> None:
    """What apt_install passes to every install: apt itself waits for the frontend lock."""
    result = run_lib('apt-get -o "DPkg::Lock::Timeout=$APT_LOCK_TIMEOUT" check -qq')
    assert result.returncode == 0, result.stderr


def test_a_lock_held_past_the_timeout_fails_with_apts_own_message(dpkg_busy: float) -> None:
    result = run_lib("apt_locked_retry setup apt-get check -qq", timeout_seconds=1)
    assert result.returncode != 0
    assert "Could not get lock" in result.stderr


def test_other_failures_are_not_retried() -> None:
    started = time.monotonic()
    result = run_lib("apt_locked_retry setup apt-get install -y --no-download no-such-package-cms-test")
    assert result.returncode != 0
    assert "waiting" not in result.stderr
    assert time.monotonic() - started < 30
