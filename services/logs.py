"""Logging set-up, done once in each process's entry point.

One line per event; ``--log-json`` gives JSON lines with the stable context keys (``line``,
``call``, ``conn``) passed through ``extra=``. Known secrets are registered at start and masked
in every record, whatever code path formats them.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from typing import Any

CONTEXT_KEYS = ("line", "call", "conn", "node", "action_id", "command")

_secrets: set[str] = set()


def register_secret(value: str) -> None:
    if value and len(value) >= 3:
        _secrets.add(value)


def _mask(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


class _SecretFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _secrets:
            record.msg = _mask(record.getMessage())
            record.args = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in CONTEXT_KEYS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _mask(json.dumps(out, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__(f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = " ".join(f"{k}={getattr(record, k)}" for k in CONTEXT_KEYS if getattr(record, k, None) is not None)
        return _mask(f"{text} [{context}]" if context else text)


def configure(
    process: str,
    *,
    json_lines: bool = False,
    level: str = "INFO",
    log_file: str = "",
    max_bytes: int = 20 * 1024 * 1024,
    backups: int = 5,
) -> None:
    """Log to stderr; with ``log_file``, to that file, rotated at ``max_bytes`` keeping ``backups``
    old files (so no client can fill the disk through the log), and only warnings to stderr."""
    formatter = JsonFormatter() if json_lines else TextFormatter(process)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        rotating = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
        handlers[0].setLevel(logging.WARNING)
        handlers.append(rotating)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(_SecretFilter())
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level.upper())
    for noisy in ("aiormq", "aio_pika", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
