"""Structured logging: one line per event, as key=value text or as JSON.

Modules log `event=<name> job=<id> series=<uid> ...` messages; this module only decides how a
line looks. Tracebacks are folded into the same line, so a log shipper never splits an event.
Patient names are never passed to a logger (the spool does not even keep them).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from node.config import LoggingConfig

_PAIR = re.compile(r"""(\w+)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S+)""")


def fields(message: str) -> dict[str, str]:
    """The key=value pairs of a message, quotes removed (for the JSON form)."""
    pairs = {}
    for key, value in _PAIR.findall(message):
        pairs[key] = value[1:-1] if value[:1] in "'\"" and value[-1:] == value[:1] else value
    return pairs


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class KeyValueFormatter(logging.Formatter):
    """`ts=... level=... logger=... event=... key=value`, exceptions escaped onto the line."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"ts={_timestamp(record)} level={record.levelname} logger={record.name} {_one_line(record.getMessage())}"
        if record.exc_info:
            line += f" exc={json.dumps(self.formatException(record.exc_info))}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message and the message's key=value pairs."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        payload = {"ts": _timestamp(record), "level": record.levelname, "logger": record.name,
                   **fields(message), "message": message}
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def configure(config: LoggingConfig) -> None:
    """Send every log record to stderr (journald picks it up under systemd) in the configured form."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    for chatty in ("pynetdicom", "highdicom"):  # per-PDU and per-module chatter at INFO
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
