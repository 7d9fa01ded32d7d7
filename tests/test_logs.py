"""Log lines: one line per event, key=value or JSON, tracebacks folded into the line."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from node.config import LoggingConfig
from node.logs import JsonFormatter, KeyValueFormatter, configure, fields


def record(message: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("first line\nsecond line")
        except RuntimeError:
            exc_info = sys.exc_info()
    return logging.LogRecord("node.worker", logging.WARNING, __file__, 1, message, args, exc_info)


def test_key_value_line_keeps_the_event_and_folds_the_traceback() -> None:
    line = KeyValueFormatter().format(record("event=job_retry job=%d series=%s reason=%r", 7, "1.2.3", "disk\nfull",
                                             exc=True))
    assert "\n" not in line
    assert line.startswith("ts=") and " level=WARNING logger=node.worker event=job_retry job=7 series=1.2.3 " in line
    assert "exc=" in line and "second line" in line


def test_json_line_carries_the_message_pairs() -> None:
    line = JsonFormatter().format(record("event=delivered job=%d destination=%s reason=%r", 3, "PACS@h:104", "a b"))
    payload = json.loads(line)
    assert (payload["event"], payload["job"], payload["destination"]) == ("delivered", "3", "PACS@h:104")
    assert payload["reason"] == "a b" and payload["level"] == "WARNING"


def test_fields_parses_quoted_values() -> None:
    assert fields("event=x reason='no space left' path=\"/a b\" n=1") == {
        "event": "x", "reason": "no space left", "path": "/a b", "n": "1"}


def test_configure_selects_the_format(capsys: pytest.CaptureFixture) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure(LoggingConfig(level="INFO", format="json"))
        logging.getLogger("node.test").info("event=hello job=%d", 1)
        assert json.loads(capsys.readouterr().err.strip())["event"] == "hello"
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
