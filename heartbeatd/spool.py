"""The local durable spool: rows PostgreSQL could not take, kept until it can.

Append, oldest first, bounded, set aside: the semantics live here; the SQLite file's care (lock,
integrity, inode watch) is `heartbeatd.spoolfile`. Each held row has one identity until it is
written or set aside: its id in the file (> 0), or, while the file cannot be written (a full
disk, EIO), its id in memory (< 0, never reused). Rows in memory are written to the file (or
straight to PostgreSQL) later.
"""

from __future__ import annotations

import itertools
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from heartbeatd.heartbeat import EXTRA, Row, utcnow
from heartbeatd.spoolfile import (COUNTS, FILE_ERRORS, INSERT, PENDING, REJECTED, SET_ASIDE, Damaged, SpoolFile,
                                  SpoolUnavailable, check_path, log, reason)

__all__ = ["Spool", "SpoolUnavailable", "SpoolWriteFailed", "check_path", "rejected_raw", "rejected_rows"]

MEMORY_MAX_ROWS = 10_000  # rows held in memory while the file cannot be written (~28 h of one host)
_WIDTH = 3 + len(EXTRA)  # a row's stored values


def stored(row: Row, rejected: Optional[str] = None) -> tuple[Any, ...]:
    """A row as the file holds it: key columns (report_time as ISO text), extras, then the reason if set aside."""
    extra = tuple(row.extra) + (None,) * (len(EXTRA) - len(row.extra))
    return (row.service, row.ip, row.report_time.isoformat()) + extra[:len(EXTRA)] + (rejected,)


def _parse(found: Sequence[Sequence[Any]]) -> tuple[list[tuple[int, Row]], list[tuple[str, int]]]:
    """File rows (id, stored values...) as (id, Row), and (reason, id) for those that cannot be read back."""
    rows: list[tuple[int, Row]] = []
    unreadable: list[tuple[str, int]] = []
    for i, service, ip, when, *extra in found:
        try:
            # No extra value stored (a row from before the column, or a check without one): as made.
            row = Row(service, ip, datetime.fromisoformat(when), tuple(extra) if any(v is not None for v in extra) else ())
            if not isinstance(service, str) or not isinstance(ip, str) or row.report_time.tzinfo is None \
                    or "\ufffd" in service + ip:  # text that was not UTF-8 (see SpoolFile's text_factory)
                raise ValueError("not a heartbeat of this daemon's")
            rows.append((i, row._replace(report_time=row.report_time.astimezone(timezone.utc))))
        except (TypeError, ValueError, OverflowError) as exc:
            unreadable.append((f"unreadable in the spool: {exc}", i))
    return rows, unreadable


class Spool:
    """Append on failure, replay oldest first, bounded; a damaged file is set aside, not fatal."""

    def __init__(self, path: Path, max_rows: int, now: Callable[[], datetime] = utcnow, lock: bool = True) -> None:
        self.path = path
        self.max_rows = max_rows
        self._memory: dict[int, Row] = {}  # rows the file could not take, by their own ids (< 0)
        self._memory_ids = itertools.count(-1, -1)
        self.write_error: Optional[str] = None  # why the file cannot be written right now
        self._disk = 0  # rows in the file awaiting replay; kept so a cycle without backlog never touches SQLite
        self.rejected = 0  # rows the table refused, kept aside in the file
        self.file = SpoolFile(path, now, lock, on_open=self._counted, on_lost=self._hold_lost)
        try:
            self.file.db = self.file.open_or_reset()
        except (sqlite3.Error, OSError) as exc:
            # A full disk or EIO at start is not a configuration problem: rows wait in memory and
            # the file is opened again at every write, as after the same failure later on.
            self.write_error = f"open: {reason(exc)}"
        except BaseException:
            self.file.close()
            raise

    def _counted(self, db: sqlite3.Connection) -> None:
        counts = db.execute(COUNTS).fetchone()
        self._disk, self.rejected = int(counts[0]), int(counts[1])

    def _recount(self) -> None:
        self._counted(self.file.database())

    def _hold(self, rows: Sequence[Row]) -> None:
        for row in rows:
            self._memory[next(self._memory_ids)] = row

    def _hold_lost(self, held: Sequence[tuple[Any, ...]]) -> None:
        """The rows of a file that went away and could not be carried over: held in memory."""
        self._disk = 0
        rows, _ = _parse([(0, *values[:_WIDTH]) for values in held])
        self._hold([row for _, row in rows])

    @property
    def count(self) -> int:
        """Rows waiting to be written (in the file and in memory), not counting rejected ones."""
        return self._disk + len(self._memory)

    @property
    def in_memory(self) -> int:
        """Rows only in memory because the file cannot be written."""
        return len(self._memory)

    def append(self, rows: Sequence[Row]) -> int:
        """Store rows durably (fsync'd), or in memory if the file cannot take them; return how many dropped.

        Beyond the bound the rows written longest ago are dropped. `write_error` says whether the
        file took them.
        """
        held = list(self._memory.values()) + list(rows)
        if not held:
            return 0
        try:
            count, dropped = _append(self.file.database(), held, self.max_rows)
        except FILE_ERRORS as exc:
            self.write_error = self.file.why(exc, "write")
            self._hold(rows)
            dropped = max(0, len(self._memory) - min(self.max_rows, MEMORY_MAX_ROWS))
            for key in list(itertools.islice(self._memory, dropped)):  # the oldest held
                del self._memory[key]
            return dropped
        self.write_error = None
        self._memory.clear()
        self._disk = count - dropped
        return dropped

    def oldest(self, limit: int) -> list[tuple[int, Row]]:
        """Up to `limit` waiting rows, first written first: the file's (ids > 0), then memory's (ids < 0)."""
        found: list[tuple[int, Row]] = []
        if self._disk:
            try:
                db = self.file.database()
                found, unreadable = _parse(db.execute(PENDING + " ORDER BY id LIMIT ?", (limit,)).fetchall())
                if unreadable:  # a row this daemon cannot read back is set aside, never a failed cycle
                    _set_aside_unreadable(db, unreadable, self.path)
                    self._recount()
            except FILE_ERRORS as exc:
                if isinstance(exc, (sqlite3.Error, Damaged)):
                    log.error("心跳缓存错误 - cannot read %s: %s", self.path, self.file.failed(exc, "read"))
                    if self.file.db is not None:  # set aside and started anew: what it held is no longer ours
                        self._disk = 0
        found += itertools.islice(self._memory.items(), max(0, limit - len(found)))
        return found

    def delete(self, ids: Sequence[int]) -> None:
        """Forget rows now known to be in the table; a failure leaves them for a later (deduplicated) replay."""
        for i in ids:
            if i < 0:
                self._memory.pop(i, None)
        on_disk = [(i,) for i in ids if i > 0]
        if on_disk:
            self._change(lambda db: db.executemany("DELETE FROM spool WHERE id = ?", on_disk), "delete")

    def reject(self, rejected: Sequence[tuple[int, Row, str]]) -> None:
        """Keep rows the table refused aside in the file, with the reason; they are not replayed.

        Ids are those `oldest` gave (> 0 in the file, < 0 in memory), or 0 for a row never spooled.
        Memory rows leave memory only once the file holds them.
        """
        def change(db: sqlite3.Connection) -> None:
            db.executemany("UPDATE spool SET rejected = ? WHERE id = ?", [(why, i) for i, _, why in rejected if i > 0])
            db.executemany(SET_ASIDE, [stored(r, why) for i, r, why in rejected if i <= 0])

        self._change(change, "write")
        for i, _, _ in rejected:
            if i < 0:
                self._memory.pop(i, None)

    def _change(self, change: Callable[[sqlite3.Connection], object], what: str) -> None:
        """One transaction on the file, then a recount; SpoolWriteFailed (nothing changed) if it fails."""
        try:
            db = self.file.database()
            with db:
                db.execute("BEGIN IMMEDIATE")
                change(db)
            self._recount()
        except FILE_ERRORS as exc:
            raise SpoolWriteFailed(self.file.why(exc, what)) from exc

    def refresh(self) -> None:
        """Before a replay: open the file if it could not be opened (a full disk at start), and read
        the rejected count again (`heartbeatd rejected --retry` may have changed it)."""
        try:
            if self.file.db is None:
                self.file.database()  # counts what the file holds
            elif self.rejected:
                self._recount()
        except FILE_ERRORS as exc:
            if self.file.db is not None and isinstance(exc, (sqlite3.Error, Damaged)):
                self.file.failed(exc, "read")

    def take_over(self, old: "Spool") -> int:
        """Move everything another spool holds into this one (HEARTBEAT_SPOOL_PATH changed on reload)."""
        return _move(old, self)

    def close(self) -> None:
        """Put rows held in memory into the file if it takes them now, close it and release the lock."""
        if self._memory:
            self.append([])
            if self._memory:
                log.error("心跳缓存不可写 - %s cannot be written (%s); %d row(s) held in memory only are lost",
                          self.path, self.write_error, len(self._memory))
                self._memory.clear()
        self.file.close()


def _append(db: sqlite3.Connection, held: Sequence[Row], max_rows: int) -> tuple[int, int]:
    """Rows into the file in one fsync'd transaction, the oldest beyond `max_rows` dropped: (waiting, dropped)."""
    with db:
        db.execute("BEGIN IMMEDIATE")
        db.executemany(INSERT, [stored(r) for r in held])
        count = int(db.execute("SELECT count(*) FROM spool WHERE rejected IS NULL").fetchone()[0])
        dropped = max(0, count - max_rows)
        if dropped:  # by insertion order: a wall clock that stepped back must not matter
            db.execute("DELETE FROM spool WHERE id IN (SELECT id FROM spool WHERE rejected IS NULL "
                       "ORDER BY id LIMIT ?)", (dropped,))
    return count, dropped


def _set_aside_unreadable(db: sqlite3.Connection, unreadable: Sequence[tuple[str, int]], path: Path) -> None:
    log.error("心跳缓存错误 - %d row(s) in %s cannot be read back (%s); kept aside with the rejected rows",
              len(unreadable), path, unreadable[0][0])
    with db:
        db.execute("BEGIN IMMEDIATE")
        db.executemany("UPDATE spool SET rejected = ? WHERE id = ?", unreadable)


def rejected_raw(spool: Spool) -> list[tuple[Any, ...]]:
    """Every row set aside, as stored (id, service, ip, report_time text, extras..., reason), first first."""
    return [tuple(r) for r in spool.file.database().execute(REJECTED).fetchall()]


def rejected_rows(spool: Spool) -> list[tuple[int, Row, str]]:
    """Every row the table refused that can be read back, with the reason, first written first."""
    raw = rejected_raw(spool)
    why = {r[0]: r[-1] for r in raw}
    readable, _ = _parse([r[:-1] for r in raw])
    return [(i, row, why[i]) for i, row in readable]


def _move(old: Spool, new: Spool) -> int:
    """Move what `old` holds into `new`; rows leave the old file only once the new file holds them.

    If it cannot hold them (a full disk), this raises SpoolUnavailable and both spools are as they were.
    """
    try:  # what the old file holds, read whatever its counters say; an error keeps everything there
        found = old.file.database().execute(PENDING + " ORDER BY id").fetchall()
        refused = rejected_raw(old)
    except FILE_ERRORS as exc:
        raise SpoolUnavailable(f"cannot read the rows held in {old.path}: {reason(exc)}") from exc
    on_disk, unreadable = _parse(found)
    copied = [i for i, _ in on_disk] + [i for _, i in unreadable] + [r[0] for r in refused]
    waiting = [row for _, row in on_disk] + list(old._memory.values())
    by_id = {r[0]: r for r in found}
    refused += [(*by_id[i], why) for why, i in unreadable]  # moved as set aside
    new.append(waiting)
    if new.write_error is None and refused:
        try:
            new._change(lambda db: db.executemany(SET_ASIDE, [r[1:] for r in refused]), "write")
        except SpoolWriteFailed as exc:
            new.write_error = str(exc)
    if new.write_error is not None:
        new._memory.clear()
        raise SpoolUnavailable(f"{new.path} cannot take the {len(waiting) + len(refused)} row(s) held by "
                               f"{old.path} ({new.write_error})")
    old._memory.clear()
    try:
        old._change(lambda db: db.executemany("DELETE FROM spool WHERE id = ?", [(i,) for i in copied]), "delete")
    except SpoolWriteFailed as exc:
        # Both files hold them now; a replay from either writes each row once (deduplicated).
        log.error("心跳缓存错误 - the rows moved to %s are still in %s (%s)", new.path, old.path,
                  reason(exc.__cause__ or exc))
    return len(waiting) + len(refused)


class SpoolWriteFailed(Exception):
    """The file could not be changed (full disk, EIO); nothing is lost, the change is retried later."""
