"""Agents' client logs (``ProcessLogs`` / ``SetLogFilePath``), written only where allowed.

Creatio's client can ask the messaging service to write its logs (``ProcessLogs``) and to choose
the file (``SetLogFilePath``). A browser choosing server file paths is a hole, so the feature is
off unless the administrator names a folder (``--client-log-dir``), and then every path is a
plain relative file name inside that folder: no absolute paths, no ``..``, no separators, no
symlink or hard link leading out. Files are capped in size; what does not fit is refused, not truncated
silently.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class ClientLogRefused(ValueError):
    """The path or the write is not allowed; the message says why."""


def validate_name(name: str) -> str:
    """A client-chosen log file name reduced to what is allowed, or ClientLogRefused."""
    candidate = name.strip().replace("\\", "/")
    # Creatio may send a Windows-style full path: only its last component is ever used.
    base = candidate.rsplit("/", 1)[-1]
    if not _NAME_RE.fullmatch(base) or base in (".", "..") or ".." in base:
        raise ClientLogRefused(f"log file name {name[:80]!r} is not allowed: use letters, digits, '.', '_', '-'")
    return base if base.endswith(".log") else f"{base}.log"


class ClientLogStore:
    def __init__(self, root: Path, max_file_bytes: int = 10 * 1024 * 1024, max_entry_bytes: int = 64 * 1024) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_file_bytes = max_file_bytes
        self.max_entry_bytes = max_entry_bytes

    def path_for(self, name: str) -> Path:
        path = (self.root / validate_name(name)).resolve()
        if path.parent != self.root:
            raise ClientLogRefused("log file would be outside the configured folder")
        return path

    def append(self, name: str, text: str) -> None:
        data = (text.replace("\r", " ").replace("\n", " ") + "\n").encode("utf-8", errors="replace")
        if len(data) > self.max_entry_bytes:
            raise ClientLogRefused(f"log entry of {len(data)} bytes exceeds {self.max_entry_bytes}")
        path = self.path_for(name)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags, 0o640)
        except OSError as exc:
            raise ClientLogRefused(f"cannot open the log file: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            # A hard link made beforehand by someone with access to the folder would let us
            # append to a file elsewhere (O_NOFOLLOW only stops symlinks): write only to a
            # regular file that has no other name.
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                raise ClientLogRefused("the log file is not a plain file of this folder")
            if info.st_size + len(data) > self.max_file_bytes:
                raise ClientLogRefused("log file is full")
            os.write(fd, data)
        finally:
            os.close(fd)
