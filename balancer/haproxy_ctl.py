"""Drive the haproxy binary and its runtime API.

* `check_config` runs `haproxy -c -dW -f FILE`: a warning is a failure (plain `-c` exits 0 on warnings).
* `reload` does a seamless reload. Two modes, read from the config (`master-worker` keyword):
  - master-worker (the default of `ClusterDescription`; `haproxy -W`, Debian's systemd unit uses
    `-Ws`): SIGUSR2 to the master, which re-executes itself with the new config and hands the
    listeners to the new worker; the old worker finishes its sessions (bounded by `hard-stop-after`);
  - standalone daemon (`haproxy -D`; a foreground standalone process writes no pidfile): start a new
    daemon with `-x <runtime socket>` (it takes the listening sockets over from the old process
    through `expose-fd listeners`, so no SYN is refused) and `-sf <old pids>` (the old processes stop
    accepting and finish their sessions, bounded by `hard-stop-after`).
* `RuntimeAPI` is a tiny client of the admin socket (`stats socket ... level admin`): one command per
  connection (non-interactive mode: HAProxy answers and closes).
"""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from balancer.cluster import BACKEND_NAME

__all__ = [
    "ConfigCheckError",
    "HAProxyError",
    "HAProxyNotFoundError",
    "ReloadError",
    "RuntimeAPI",
    "RuntimeAPIError",
    "ServerState",
    "ServerStatus",
    "check_config",
    "declares_master_worker",
    "find_haproxy",
    "read_pids",
    "reload",
]

log = logging.getLogger(__name__)

ServerState = Literal["ready", "drain", "maint"]
_SERVER_STATES: frozenset[str] = frozenset({"ready", "drain", "maint"})
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_MAX_RESPONSE = 16 * 1024 * 1024


class HAProxyError(Exception):
    """Base class for failures talking to haproxy."""


class HAProxyNotFoundError(HAProxyError):
    pass


class ConfigCheckError(HAProxyError):
    """`haproxy -c -dW` rejected the file; `output` holds what haproxy printed."""

    def __init__(self, path: Path, returncode: int, output: str) -> None:
        super().__init__(f"haproxy rejected {path} (exit {returncode}):\n{output.rstrip()}")
        self.path = path
        self.returncode = returncode
        self.output = output


class ReloadError(HAProxyError):
    pass


class RuntimeAPIError(HAProxyError):
    """The runtime API refused a command or could not be reached."""


def find_haproxy(explicit: str | os.PathLike[str] | None = None) -> str:
    """The haproxy binary: `explicit`, else `$HAPROXY_BIN`, else PATH, else /usr/sbin/haproxy."""
    candidates = [str(explicit)] if explicit else []
    if os.environ.get("HAPROXY_BIN"):
        candidates.append(os.environ["HAPROXY_BIN"])
    found = shutil.which("haproxy")
    if found:
        candidates.append(found)
    candidates.append("/usr/sbin/haproxy")
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise HAProxyNotFoundError(
        f"haproxy binary not found (tried {', '.join(candidates)}); install it (apt-get install haproxy) "
        "or set HAPROXY_BIN"
    )


def check_config(path: str | os.PathLike[str], *, haproxy: str | None = None) -> None:
    """Validate `path` with `haproxy -c -dW -f`; raise `ConfigCheckError` with haproxy's output."""
    cfg = Path(path)
    proc = subprocess.run(
        [find_haproxy(haproxy), "-c", "-dW", "-f", str(cfg)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 or "[WARNING]" in output or "[ALERT]" in output:
        raise ConfigCheckError(cfg, proc.returncode, output)


def read_pids(pidfile: str | os.PathLike[str]) -> list[int]:
    """PIDs listed in a haproxy pidfile (one per line); [] if the file is absent."""
    try:
        text = Path(pidfile).read_text(encoding="ascii")
    except FileNotFoundError:
        return []
    return [int(line) for line in text.split() if line.strip().isdigit()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def declares_master_worker(config: str | os.PathLike[str]) -> bool:
    """True if the config file turns on master-worker mode (`master-worker` in `global`)."""
    text = Path(config).read_text(encoding="utf-8", errors="replace")
    return re.search(r"^\s*master-worker\s*(#.*)?$", text, flags=re.MULTILINE) is not None


def _worker_pid(socket_path: str | os.PathLike[str]) -> int | None:
    try:
        info = RuntimeAPI(socket_path, timeout=1.0).execute("show info")
    except RuntimeAPIError:
        return None
    match = re.search(r"^Pid: (\d+)$", info, flags=re.MULTILINE)
    return int(match.group(1)) if match else None


def reload(
    config: str | os.PathLike[str],
    pidfile: str | os.PathLike[str],
    *,
    socket_path: str | os.PathLike[str] | None = None,
    master_worker: bool | None = None,
    haproxy: str | None = None,
    check: bool = True,
    timeout: float = 10.0,
) -> list[int]:
    """Reload the running haproxy with `config` without dropping connections.

    `master_worker=None` reads the mode from the config (`master-worker` keyword).

    * master-worker: SIGUSR2 to the master (first pid in `pidfile`). The master re-executes itself with
      the command line it was started with, so `config` must be the file it was started with. With
      `socket_path`, waits until a new worker answers on the runtime socket, else `ReloadError`.
      Returns `[master pid]`.
    * standalone: starts `haproxy -D -f config -p pidfile -x socket_path -sf <old pids>` and returns
      the pids it wrote. `socket_path` is required.
    """
    binary = find_haproxy(haproxy)
    if check:
        check_config(config, haproxy=binary)
    if master_worker is None:
        master_worker = declares_master_worker(config)
    old = [pid for pid in read_pids(pidfile) if _alive(pid)]
    if not old:
        raise ReloadError(f"no running haproxy found through pidfile {pidfile}")
    if master_worker:
        master = old[0]
        before = _worker_pid(socket_path) if socket_path is not None else None
        log.info("reload master-worker master=%s worker=%s config=%s", master, before, config)
        os.kill(master, signal.SIGUSR2)
        if socket_path is not None:
            deadline = time.monotonic() + timeout
            while (now := _worker_pid(socket_path)) is None or now == before:
                if time.monotonic() > deadline:
                    raise ReloadError(
                        f"master {master} did not start a new worker within {timeout}s "
                        "(see its log; the old worker keeps serving)"
                    )
                time.sleep(0.05)
        return [master]
    if socket_path is None:
        raise ReloadError("a standalone reload needs the runtime socket path (-x) to take the listeners over")
    cmd = [binary, "-D", "-f", str(config), "-p", str(pidfile), "-x", str(socket_path), "-sf", *map(str, old)]
    log.info("reload standalone old_pids=%s config=%s", old, config)
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise ReloadError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return read_pids(pidfile)


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """One row of `show stat` for a server."""

    backend: str
    name: str
    address: str
    #: UP, DOWN, DRAIN, MAINT, "UP 1/2" (going down), "no check", ...
    status: str
    #: last health check result, e.g. L7OK, L7STS, L4CON
    check_status: str
    current_sessions: int
    total_sessions: int
    weight: int


def _int(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0


class RuntimeAPI:
    """Client for HAProxy's runtime API on a unix socket (`stats socket ... level admin`)."""

    def __init__(self, socket_path: str | os.PathLike[str], *, timeout: float = 5.0) -> None:
        self.socket_path = os.fspath(socket_path)
        self.timeout = timeout

    def execute(self, command: str) -> str:
        """Send one command, return the full answer (HAProxy closes the connection after it)."""
        if "\n" in command or "\r" in command:
            raise ValueError("one command per call; no newlines")
        chunks: list[bytes] = []
        size = 0
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(self.socket_path)
                sock.sendall(command.encode("ascii") + b"\n")
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > _MAX_RESPONSE:
                        raise RuntimeAPIError(f"answer to {command!r} exceeds {_MAX_RESPONSE} bytes")
                    chunks.append(chunk)
        except OSError as exc:
            raise RuntimeAPIError(f"runtime API at {self.socket_path}: {exc}") from exc
        return b"".join(chunks).decode("utf-8", errors="replace")

    def set_server_state(self, server: str, state: ServerState, *, backend: str = BACKEND_NAME) -> None:
        """`set server BACKEND/SERVER state ready|drain|maint`; raise if HAProxy answers anything."""
        if state not in _SERVER_STATES:
            raise ValueError(f"state must be one of {sorted(_SERVER_STATES)}, got {state!r}")
        for what, value in (("backend", backend), ("server", server)):
            if not _NAME_RE.match(value):
                raise ValueError(f"invalid {what} name {value!r}")
        answer = self.execute(f"set server {backend}/{server} state {state}").strip()
        if answer:
            raise RuntimeAPIError(f"set server {backend}/{server} state {state}: {answer}")

    def drain(self, server: str, *, backend: str = BACKEND_NAME) -> None:
        """Stop sending new connections to `server`; existing ones (WebSockets) stay."""
        self.set_server_state(server, "drain", backend=backend)

    def enable(self, server: str, *, backend: str = BACKEND_NAME) -> None:
        """Back to `ready` (undoes drain and maint)."""
        self.set_server_state(server, "ready", backend=backend)

    def servers(self, backend: str = BACKEND_NAME) -> list[ServerStatus]:
        """Servers of `backend` from `show stat` (CSV)."""
        text = self.execute("show stat")
        lines = text.splitlines()
        if not lines or not lines[0].startswith("# "):
            raise RuntimeAPIError(f"unexpected answer to 'show stat': {text[:200]!r}")
        rows = csv.DictReader([lines[0][2:], *lines[1:]])
        result = [
            ServerStatus(
                backend=row["pxname"],
                name=row["svname"],
                address=row.get("addr") or "",
                status=row["status"],
                check_status=row.get("check_status") or "",
                current_sessions=_int(row.get("scur")),
                total_sessions=_int(row.get("stot")),
                weight=_int(row.get("weight")),
            )
            for row in rows
            if row.get("pxname") == backend and row.get("svname") not in ("FRONTEND", "BACKEND", None)
        ]
        if not result and not any(row.startswith(f"{backend},") for row in lines[1:]):
            raise RuntimeAPIError(f"no backend named {backend!r}")
        return result

    def server(self, name: str, *, backend: str = BACKEND_NAME) -> ServerStatus:
        for status in self.servers(backend):
            if status.name == name:
                return status
        raise RuntimeAPIError(f"no server {backend}/{name}")


def format_status(rows: Sequence[ServerStatus]) -> str:
    """A fixed-width table for `python -m balancer status`."""
    header = ("server", "address", "status", "check", "sessions", "total", "weight")
    table = [header] + [
        (
            r.name,
            r.address,
            r.status,
            r.check_status,
            str(r.current_sessions),
            str(r.total_sessions),
            str(r.weight),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table)
