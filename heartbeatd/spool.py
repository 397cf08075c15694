"""The local durable spool: rows PostgreSQL could not take, kept in SQLite until it can."""

from __future__ import annotations

import logging
import os
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from heartbeatd.probes import Row, utcnow

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA = """\
CREATE TABLE IF NOT EXISTS spool (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    service_name TEXT NOT NULL,
    ip_address   TEXT NOT NULL,
    report_time  TEXT NOT NULL,
    UNIQUE (service_name, ip_address, report_time)
)"""


class SpoolUnavailable(Exception):
    """The spool's directory cannot be created or written."""


class Spool:
    """Append on failure, replay oldest first, bounded; a corrupt file is set aside, not fatal."""

    def __init__(self, path: Path, max_rows: int, now: Callable[[], datetime] = utcnow) -> None:
        self.path = path
        self.max_rows = max_rows
        self._now = now
        directory = path.parent if str(path.parent) else Path(".")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolUnavailable(f"cannot create directory {directory}: {exc.strerror or exc}") from exc
        if not os.access(directory, os.W_OK | os.X_OK):
            raise SpoolUnavailable(f"directory {directory} is not writable")
        self._db = self._open_or_reset()
        # Kept in memory so that a cycle with no backlog never touches SQLite.
        self.count = self._db.execute("SELECT count(*) FROM spool").fetchone()[0]

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), isolation_level=None, timeout=5)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(SCHEMA)
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
        except BaseException:
            db.close()
            raise
        return db

    def _open_or_reset(self) -> sqlite3.Connection:
        try:
            return self._open()
        except sqlite3.DatabaseError as exc:
            return self._reset(exc)

    def _reset(self, exc: BaseException) -> sqlite3.Connection:
        """Rename the damaged file aside with a timestamp and start a new, empty spool."""
        aside = self.path.with_name(f"{self.path.name}.corrupt-{self._now():%Y%m%dT%H%M%SZ}")
        try:
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                if os.path.exists(f"{self.path}{suffix}"):
                    os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
        except OSError as err:
            raise SpoolUnavailable(f"spool {self.path} is unreadable ({exc}) and cannot be moved aside: {err}") from err
        log.error("心跳缓存文件损坏 - %s: %s; moved aside to %s, starting a new spool", self.path, exc, aside)
        self.count = 0
        return self._open()

    def _guard(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except sqlite3.DatabaseError as exc:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = self._reset(exc)
            raise SpoolUnavailable(f"spool {what} failed: {exc}") from exc

    def append(self, rows: Sequence[Row]) -> int:
        """Store rows durably (fsync'd); drop the oldest beyond the bound; return how many dropped."""
        if not rows:
            return 0

        def run() -> int:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(
                    "INSERT OR IGNORE INTO spool (service_name, ip_address, report_time) VALUES (?, ?, ?)",
                    [(r.service, r.ip, r.report_time.isoformat()) for r in rows],
                )
                count = self._db.execute("SELECT count(*) FROM spool").fetchone()[0]
                dropped = max(0, count - self.max_rows)
                if dropped:
                    self._db.execute(
                        "DELETE FROM spool WHERE id IN (SELECT id FROM spool ORDER BY report_time, id LIMIT ?)",
                        (dropped,),
                    )
            self.count = count - dropped
            return int(dropped)

        return self._guard("append", run)

    def oldest(self, limit: int) -> list[tuple[int, Row]]:
        """Up to `limit` rows, oldest report_time first, with their spool ids."""
        def run() -> list[tuple[int, Row]]:
            found = self._db.execute(
                "SELECT id, service_name, ip_address, report_time FROM spool ORDER BY report_time, id LIMIT ?",
                (limit,),
            ).fetchall()
            return [(i, Row(s, ip, datetime.fromisoformat(t))) for i, s, ip, t in found]

        return self._guard("read", run)

    def delete(self, ids: Sequence[int]) -> None:
        """Forget rows now known to be in the table."""
        def run() -> None:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("DELETE FROM spool WHERE id = ?", [(i,) for i in ids])
            self.count = self._db.execute("SELECT count(*) FROM spool").fetchone()[0]

        self._guard("delete", run)

    def close(self) -> None:
        """Close the SQLite file."""
        self._db.close()

