"""Logging to stderr: `levelname:logger:message`, with `<N>` syslog priorities under journald."""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, Optional, TextIO

FORMAT = "%(levelname)s:%(name)s:%(message)s"
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def stderr_is_journal(stream: TextIO, journal_stream: Optional[str]) -> bool:
    """True when `stream` is the journald stream named by $JOURNAL_STREAM ("dev:inode")."""
    if not journal_stream:
        return False
    try:
        st = os.fstat(stream.fileno())
        dev, ino = (int(x) for x in journal_stream.split(":"))
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class _Formatter(logging.Formatter):
    """Adds the syslog priority prefix and keeps every record on one line, secrets masked."""

    def __init__(self, journal: bool) -> None:
        super().__init__(FORMAT)
        self.journal = journal
        self.secrets: tuple[str, ...] = ()

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self.secrets:
            text = text.replace(secret, "***")
        # One event, one line: a multi-line driver message would split into several journal entries.
        text = text.replace("\r", "").replace("\n", " | ")
        if self.journal:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{text}"
        return text


_formatter: Optional[_Formatter] = None


def setup(level: str = "INFO", stream: Optional[TextIO] = None) -> None:
    """Install the single stderr handler on the `heartbeatd` logger."""
    global _formatter
    # Our format uses none of these; computing them for every record is most of logging's cost
    # (the "Optimization" section of the logging docs).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    stream = stream or sys.stderr
    _formatter = _Formatter(stderr_is_journal(stream, os.environ.get("JOURNAL_STREAM")))
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_formatter)
    root = logging.getLogger("heartbeatd")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.propagate = False
    set_level(level)


def set_level(level: str) -> None:
    """Change the log level (on start and on reload)."""
    logging.getLogger("heartbeatd").setLevel(level)


def set_secrets(secrets: Iterable[str]) -> None:
    """Mask these strings in every line logged from now on."""
    if _formatter is not None:
        _formatter.secrets = tuple(s for s in secrets if s)
