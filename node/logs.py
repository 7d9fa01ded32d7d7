"""Structured logging: one line per event, as key=value text or as JSON.

Modules log `event=<name> job=<id> series=<uid> ...` messages; this module only decides how a
line looks. Tracebacks are folded into the same line, so a log shipper never splits an event.
Patient names are never passed to a logger (the spool does not even keep them).

Values come from peers (AE titles, error comments, file names), so every argument but a number is
escaped before it reaches the line: one with a space, quote, "=" or control character is written
as a JSON string, so a calling AE of `Z event=echo_ok` stays one value and cannot add a field,
and a NUL or newline is written as its escape. `%r` arguments are Python reprs, quoted already.
Libraries (pynetdicom, pydicom, Python warnings through `logging.captureWarnings`) quote peer
values inside their own text, so a line from any logger outside `node` is never read for fields:
its whole text is one escaped `message` value, in both formats. An exception no code caught in a
thread is logged too, on one line, instead of a raw traceback on stderr.

A peer can make a library log once per item it sends (6,000 bogus transfer syntaxes in one
A-ASSOCIATE-RQ were 30,000 lines), so each association may log `PER_KIND` lines of one kind
and `LIBRARY_LINES` library lines in all; the rest are counted and reported in one line,
"... and 5,998 more", before the association's next line from the node or once it has ended.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass, field

from node.config import LoggingConfig

_PAIR = re.compile(r"""(\w+)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S+)""")
_BARE = re.compile(r"""[^\s"'=\\\x00-\x1f\x7f-\x9f\u2028\u2029]+""")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_RESERVED = ("ts", "level", "logger", "message", "exc")
_SHAPE = re.compile(r"""'[^']*'?|"[^"]*"?|[0-9A-Fa-fx.]*[0-9][0-9A-Fa-fx.]*""")
PER_KIND = 10  # lines of one kind (logger, level, text with quoted values and numbers masked) per association
LIBRARY_LINES = 40  # lines from loggers outside `node` per association, whatever their kind


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


def _is_library(record: logging.LogRecord) -> bool:
    """A record from a logger outside the node's own (pynetdicom, pydicom, py.warnings, ...)."""
    return record.name != "node" and not record.name.startswith("node.")


def _library_text(record: logging.LogRecord) -> str:
    """A library record's text as the library meant it (escaped as a whole afterwards), person names redacted."""
    try:
        text = record.getMessage()
    except (TypeError, ValueError):  # a malformed call: show it rather than lose the line
        text = f"{record.msg} args={record.args!r}"
    if _ABOUT_A_PERSON.search(text):  # everything from the first quote on may be the name: cut it
        return _QUOTE.split(text, maxsplit=1)[0] + "<value redacted>"
    return text


# pydicom quotes the value it finds invalid ("Invalid value for VR PN: 'Doe^Jane\n'."): never a name in the log.
_ABOUT_A_PERSON = re.compile(r"\bPN\b|Person ?Name|Patient'?s? ?Name", re.IGNORECASE)
_QUOTE = re.compile(r"""['"]""")


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
        text = f"message={_Escaped(_library_text(record))}" if _is_library(record) else _one_line(message(record))
        line = f"ts={_timestamp(record)} level={record.levelname} logger={_Escaped(record.name)} {text}"
        if record.exc_info:
            line += f" exc={json.dumps(self.formatException(record.exc_info))}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message and the message's key=value pairs."""

    def format(self, record: logging.LogRecord) -> str:
        library = _is_library(record)
        text = _library_text(record) if library else message(record)
        pairs = {} if library else {key: value for key, value in fields(text).items() if key not in _RESERVED}
        payload = {"ts": _timestamp(record), "level": record.levelname, "logger": record.name, **pairs,
                   "message": text}
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


def _one_line(text: str) -> str:
    """Newlines and other control characters of a literal message as escapes (arguments are escaped already)."""
    return _CONTROL.sub(_escape_char, text.replace("\r", "\\r").replace("\n", "\\n"))


@dataclass
class _Budget:
    """What one association has logged, and what was held back since its last summary."""

    shown: dict[tuple[str, int, str], int] = field(default_factory=dict)
    library: int = 0
    held: int = 0
    like: str = ""


class RepeatLimiter(logging.Filter):
    """Holds back repeats from one association and reports them in one line (see the module docstring)."""

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self._handler = handler
        self._lock = threading.Lock()
        self._budgets: dict[threading.Thread, _Budget] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "repeat_summary", False) or record.levelno < logging.INFO:
            return True
        association = _association()
        summaries = self._ended()
        with self._lock:
            show = True
            if association is not None:
                budget = self._budgets.setdefault(association, _Budget())
                show = self._admit(budget, record)
                if show and budget.held and not _is_library(record):  # the node's next event line, not every library one
                    summaries.append(self._summary(budget, association.name))
        for summary in summaries:
            self._handler.handle(summary)
        return show

    def _admit(self, budget: _Budget, record: logging.LogRecord) -> bool:
        kind = (record.name, record.levelno, _SHAPE.sub("\u2026", str(record.msg)))
        library = _is_library(record)
        if budget.shown.get(kind, 0) >= PER_KIND or (library and budget.library >= LIBRARY_LINES):
            budget.held += 1
            budget.like = budget.like or _library_text(record)[:200]
            return False
        budget.shown[kind] = budget.shown.get(kind, 0) + 1
        budget.library += library
        return True

    def _ended(self) -> list[logging.LogRecord]:
        """Forget associations that have ended; a summary for those with lines held back (nothing of theirs follows)."""
        with self._lock:
            ended = [association for association in self._budgets if not association.is_alive()]
            budgets = [(association.name, self._budgets.pop(association)) for association in ended]
            return [self._summary(budget, name) for name, budget in budgets if budget.held]

    @staticmethod
    def _summary(budget: _Budget, association: str) -> logging.LogRecord:
        """The line for what `budget` held back; the receiver names an association's thread after its ID."""
        record = logging.LogRecord("node.logs", logging.WARNING, __file__, 0,
                                   "event=log_lines_held_back association=%s reason=%s like=%s",
                                   (association, f"... and {budget.held:,} more lines like this", budget.like), None)
        record.repeat_summary = True
        budget.held, budget.like = 0, ""
        return record


def _association() -> threading.Thread | None:
    """The pynetdicom association the current thread serves (its own thread or its DUL reactor), if any."""
    module = sys.modules.get("pynetdicom.association")
    if module is None:  # pynetdicom not even imported: no association is running
        return None
    thread = threading.current_thread()
    if isinstance(thread, module.Association):
        return thread
    association = getattr(thread, "assoc", None)
    return association if isinstance(association, module.Association) else None


def configure(config: LoggingConfig) -> None:
    """Send every log record to stderr (journald picks it up under systemd) in the configured form,
    Python warnings included; repeats from one association are held back."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else KeyValueFormatter())
    handler.addFilter(RepeatLimiter(handler))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    logging.captureWarnings(True)  # else warnings.warn writes raw text to stderr, past the formatter
    threading.excepthook = _log_thread_exception  # else a thread's traceback goes to stderr raw, over many lines
    for chatty in ("pynetdicom", "highdicom"):  # per-PDU and per-module chatter at INFO
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """An exception no code caught in a thread, as one line (a thread that ends quietly, SystemExit, is not one)."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "unknown"
    logging.getLogger("node.thread").error("event=thread_failed thread=%s", name,
                                           exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
