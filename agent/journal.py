"""Logging: journald with structured fields under systemd, key=value lines on stderr otherwise.

Context goes in `extra=` with UPPER_SNAKE keys (DYNO_ID, APP, …); under journald they become
journal fields, on stderr they are appended as key=value pairs.
"""

from __future__ import annotations

import atexit
import copy
import logging
import logging.handlers
import os
import queue
import sys
import time
from typing import Any

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class KeyValueFormatter(logging.Formatter):
    """`ts=… level=… logger=… msg="…" KEY=value …` — one line per record, greppable."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"ts={stamp}.{int(record.msecs):03d}Z", f"level={record.levelname.lower()}",
                 f"logger={record.name}", f"msg={_quote(record.getMessage())}"]
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key.isupper():
                parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def under_journald() -> bool:
    """systemd sets JOURNAL_STREAM when stderr is connected to the journal."""
    return bool(os.environ.get("JOURNAL_STREAM")) and os.path.exists("/run/systemd/journal/socket")


class _Handoff(logging.handlers.QueueHandler):
    """Hands each record to the writer thread: the event loop never waits for a write to
    stderr or the journal (a mass delete logs hundreds of lines at once, and each write
    gives the GIL away to the busy threads of the delete). The message is rendered here,
    while its arguments are as they were; the writer formats the rest."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        record.msg = record.getMessage()
        record.args = None
        return record


_writer: logging.handlers.QueueListener | None = None


def _stop_writer() -> None:
    """Write what is queued and end the writer thread (at exit, or before a new one)."""
    global _writer
    if _writer is not None:
        _writer.stop()
        _writer = None


def configure(level: str) -> None:
    global _writer
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    _stop_writer()
    handler: logging.Handler
    if under_journald():
        from systemd.journal import JournalHandler

        handler = JournalHandler(SYSLOG_IDENTIFIER="dynoagent")
    else:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(KeyValueFormatter())
        handler = stream
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _writer = logging.handlers.QueueListener(records, handler)
    _writer.start()
    atexit.register(_stop_writer)
    root.addHandler(_Handoff(records))
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


def extra(**fields: Any) -> dict[str, Any]:
    """`log.info("...", extra=extra(dyno_id=x))` → DYNO_ID=x."""
    return {key.upper(): value for key, value in fields.items()}
