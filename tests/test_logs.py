"""Log lines: one line per event, key=value or JSON, tracebacks folded into the line."""

from __future__ import annotations

import json
import logging
import sys
import threading
import warnings

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
        logging.captureWarnings(False)
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.parametrize("formatter", [KeyValueFormatter(), JsonFormatter()])
def test_a_peer_cannot_add_a_field_or_a_raw_control_character(formatter: logging.Formatter) -> None:
    line = formatter.format(record("event=association_accepted calling_ae=%s peer=%s", "Z event=echo_ok", "a\x00b\x1b"))
    assert "\x00" not in line and "\x1b" not in line and "\n" not in line
    pairs = json.loads(line) if isinstance(formatter, JsonFormatter) else fields(line)
    assert pairs["event"] == "association_accepted"
    assert pairs["calling_ae"] == "Z event=echo_ok" and pairs["peer"] == "a\x00b\x1b"


def test_a_peer_cannot_overwrite_the_fixed_json_keys() -> None:
    payload = json.loads(JsonFormatter().format(record("event=x level=%s ae=%s", "ERROR", "level=ERROR")))
    assert payload["level"] == "WARNING" and payload["ae"] == "level=ERROR"


def test_json_reason_keeps_every_word() -> None:
    payload = json.loads(JsonFormatter().format(record("event=instance_refused status=0x%04X reason=%s", 0xA700,
                                                       "spool disk below receiver.min_free_disk_mb")))
    assert payload["reason"] == "spool disk below receiver.min_free_disk_mb" and payload["status"] == "0xA700"


def library_record(logger: str, text: str) -> logging.LogRecord:
    return logging.LogRecord(logger, logging.WARNING, __file__, 1, text, None, None)


@pytest.mark.parametrize("formatter", [KeyValueFormatter(), JsonFormatter()])
def test_a_library_message_quoting_a_peer_value_is_one_escaped_field(formatter: logging.Formatter) -> None:
    text = "Invalid 'Calling AE Title' value 'Z\nevent=forged\x00X' level=ERROR event=forged6"
    line = formatter.format(library_record("pynetdicom.utils", text))
    assert "\x00" not in line and "\n" not in line
    pairs = json.loads(line) if isinstance(formatter, JsonFormatter) else fields(line)
    assert set(pairs) == {"ts", "level", "logger", "message"}
    assert pairs["level"] == "WARNING" and pairs["message"] == text


@pytest.mark.parametrize("formatter", [KeyValueFormatter(), JsonFormatter()])
def test_a_library_message_quoting_a_person_name_keeps_its_reason_but_not_the_name(formatter: logging.Formatter) -> None:
    # pydicom's wording for a value it finds invalid (pydicom.valuerep.validate_regex), and a possessive form
    for text in (f"Invalid value for VR PN: {'Doe^Jane' + chr(10)!r}.", "Invalid Patient's Name 'Doe^Jane'"):
        line = formatter.format(library_record("py.warnings", text))
        assert "Doe" not in line and "Jane" not in line and "<value redacted>" in line


def test_warnings_thread_crashes_and_lines_outside_associations_all_reach_the_formatter(capsys: pytest.CaptureFixture) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure(LoggingConfig(level="INFO", format="kv"))
        for n in range(30):  # the watch folder or a worker: not an association, nothing is held back
            logging.getLogger("node.ingest.watch").warning("event=watch_file_rejected file=%s", f"f{n}")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("value 'a\nlevel=ERROR'", UserWarning, stacklevel=1)
        crashing = threading.Thread(target=lambda: 1 / 0, name="crashing")
        crashing.start()
        crashing.join()
    finally:
        logging.captureWarnings(False)
        threading.excepthook = threading.__excepthook__
        root.handlers[:] = handlers
        root.setLevel(level)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 32 and all(line.startswith("ts=") for line in lines)
    assert fields(lines[-2])["logger"] == "py.warnings" and "level=ERROR" in fields(lines[-2])["message"]
    assert fields(lines[-1])["event"] == "thread_failed" and "ZeroDivisionError" in fields(lines[-1])["exc"]
