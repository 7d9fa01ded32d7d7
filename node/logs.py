"""Structured logging: one line per event, as key=value text or as JSON.

Modules log `event=<name> job=<id> series=<uid> ...` messages; this module only decides how a
line looks. Tracebacks are folded into the same line, so a log shipper never splits an event.
Patient names are never passed to a logger (the spool does not even keep them).

Values come from peers (AE titles, error comments, file names), so every argument but a number is
escaped before it reaches the line: one with a space, quote, "=" or control character is written
as a JSON string, so a calling AE of `Z event=echo_ok` stays one value and cannot add a field,
and a NUL or newline is written as its escape. `%r` arguments are Python reprs, quoted already.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import sys
import time

from node.config import LoggingConfig

_PAIR = re.compile(r"""(\w+)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S+)""")
_BARE = re.compile(r"""[^\s"'=\\\x00-\x1f\x7f-\x9f\u2028\u2029]+""")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_RESERVED = ("ts", "level", "logger", "message", "exc")


class _Escaped(str):
    """A string argument as it may appear in a line: bare when that is safe, else a JSON string."""

    __slots__ = ()

    def __str__(self) -> str:
        text = str.__str__(self)
        return text if _BARE.fullmatch(text) else _CONTROL.sub(_escape_char, json.dumps(text, ensure_ascii=False))

    def __repr__(self) -> str:
        return _CONTROL.sub(_escape_char, str.__repr__(self))


def _escape_char(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _escaped(value: object) -> object:
    """Numbers stay numbers (for %d and %.1f); anything else is text and is escaped."""
    return value if isinstance(value, (int, float)) else _Escaped(value)


def message(record: logging.LogRecord) -> str:
    """The record's message with every string argument escaped (see the module docstring)."""
    args = record.args
    if isinstance(args, tuple) and args:
        args = tuple(_escaped(a) for a in args)
    elif isinstance(args, dict) and args:
        args = {k: _escaped(v) for k, v in args.items()}
    text = str(record.msg)
    if args:
        try:
            text = text % args
        except (TypeError, ValueError):  # a malformed call: show it rather than lose the line
            text = f"{text} args={_Escaped(repr(record.args))}"
    return text


def fields(text: str) -> dict[str, str]:
    """The key=value pairs of a message, quotes and escapes removed (for the JSON form)."""
    pairs = {}
    for key, value in _PAIR.findall(text):
        pairs[key] = _unquote(value)
    return pairs


def _unquote(value: str) -> str:
    if len(value) < 2 or value[0] not in "'\"" or value[-1] != value[0]:
        return value
    try:
        decoded = json.loads(value) if value[0] == '"' else ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value[1:-1]
    return decoded if isinstance(decoded, str) else value[1:-1]


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class KeyValueFormatter(logging.Formatter):
    """`ts=... level=... logger=... event=... key=value`, exceptions escaped onto the line."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"ts={_timestamp(record)} level={record.levelname} logger={record.name} {_one_line(message(record))}"
        if record.exc_info:
            line += f" exc={json.dumps(self.formatException(record.exc_info))}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message and the message's key=value pairs."""

    def format(self, record: logging.LogRecord) -> str:
        text = message(record)
        pairs = {key: value for key, value in fields(text).items() if key not in _RESERVED}
        payload = {"ts": _timestamp(record), "level": record.levelname, "logger": record.name, **pairs,
                   "message": text}
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


def _one_line(text: str) -> str:
    """Newlines and other control characters of a literal message as escapes (arguments are escaped already)."""
    return _CONTROL.sub(_escape_char, text.replace("\r", "\\r").replace("\n", "\\n"))


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
