"""The local durable spool: rows PostgreSQL could not take, kept in SQLite until it can.

What can go wrong with a file, and what each means here:
- SQLite says the file is damaged (SQLITE_CORRUPT, SQLITE_NOTADB): the file is set aside and a new
  spool started. Nothing else is ever renamed.
- The disk is full, or EIO, EACCES, a read-only file system: the file is kept as it is; rows wait
  in a bounded in-memory queue and are written to the file (or straight to PostgreSQL) later.
- The path is a directory, or a file we may not read and write: a configuration problem,
  refused before anything starts.
- The file is deleted or replaced under us: noticed before the next write, reopened at the path
  with what the old file held.
- A second daemon on the same spool: refused, naming the holder's PID (an flock on `PATH.lock`).
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import sqlite3
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

from heartbeatd.heartbeat import Row, utcnow

log = logging.getLogger(__name__)

SCHEMA = """\
CREATE TABLE IF NOT EXISTS spool (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    service_name TEXT NOT NULL,
    ip_address   TEXT NOT NULL,
    report_time  TEXT NOT NULL,
    rejected     TEXT,
    UNIQUE (service_name, ip_address, report_time)
)"""
INSERT = "INSERT OR IGNORE INTO spool (service_name, ip_address, report_time, rejected) VALUES (?, ?, ?, ?)"
SET_ASIDE = ("INSERT INTO spool (service_name, ip_address, report_time, rejected) VALUES (?, ?, ?, ?) "
             "ON CONFLICT (service_name, ip_address, report_time) DO UPDATE SET rejected = excluded.rejected")
PENDING = "SELECT id, service_name, ip_address, report_time FROM spool WHERE rejected IS NULL"
# SQLite primary result codes that mean "this file is damaged" (extended codes carry them in the low byte).
DAMAGED = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
MEMORY_MAX_ROWS = 10_000  # rows held in memory while the file cannot be written (~28 h of one host)
BUSY_TIMEOUT = 1.0  # seconds SQLite waits for a lock another process (`heartbeatd rejected`) holds


class SpoolUnavailable(Exception):
    """The spool cannot be used at this path: a configuration problem."""


class _Damaged(Exception):
    """SQLite says the file is not a sound database."""


def is_damage(exc: BaseException) -> bool:
    """True when SQLite reports the file itself as damaged (not full, not unreadable)."""
    if isinstance(exc, _Damaged):
        return True
    code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
    if isinstance(code, int):
        return (code & 0xFF) in DAMAGED
    text = str(exc)
    return "malformed" in text or "not a database" in text


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _row(service: str, ip: str, report_time: str) -> Row:
    return Row(service, ip, datetime.fromisoformat(report_time))


def _parse(found: Sequence[tuple[int, str, str, str]]) -> tuple[list[tuple[int, Row]], list[tuple[str, int]]]:
    """File rows as (id, Row), and (reason, id) for those that cannot be read back (set aside, never fatal)."""
    rows: list[tuple[int, Row]] = []
    unreadable: list[tuple[str, int]] = []
    for i, service, ip, when in found:
        try:
            row = _row(service, ip, when)
            if not isinstance(service, str) or not isinstance(ip, str) or row.report_time.tzinfo is None \
                    or "\ufffd" in service + ip:  # text that was not UTF-8 (see _open's text_factory)
                raise ValueError("not a heartbeat of this daemon's")
            rows.append((i, row._replace(report_time=row.report_time.astimezone(timezone.utc))))
        except (TypeError, ValueError, OverflowError) as exc:
            unreadable.append((f"unreadable in the spool: {exc}", i))
    return rows, unreadable


def check_path(path: Path) -> None:
    """Refuse a path that cannot be this daemon's spool (a directory, a file we may not use)."""
    directory = path.parent if str(path.parent) else Path(".")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpoolUnavailable(f"cannot create directory {directory}: {_reason(exc)}") from exc
    if not directory.is_dir():
        raise SpoolUnavailable(f"{directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise SpoolUnavailable(f"directory {directory} is not writable")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SpoolUnavailable(f"{path}: {_reason(exc)}") from exc
    if stat.S_ISDIR(mode):
        raise SpoolUnavailable(f"{path} is a directory, not a spool file")
    if not stat.S_ISREG(mode):
        raise SpoolUnavailable(f"{path} is not a regular file")
    if not os.access(path, os.R_OK | os.W_OK):
        raise SpoolUnavailable(f"{path} cannot be read and written by this user")


class Spool:
    """Append on failure, replay oldest first, bounded; a damaged file is set aside, not fatal."""

    def __init__(self, path: Path, max_rows: int, now: Callable[[], datetime] = utcnow, lock: bool = True) -> None:
        self.path = path
        self.max_rows = max_rows
        self._now = now
        check_path(path)
        self._lock_fd = self._lock() if lock else None
        # Rows the file could not take (full disk, EIO): retried at every append, replayed too. Each
        # has its own id (< 0, never reused), so that writing or refusing some of them, in any
        # order, removes exactly those.
        self._memory: dict[int, Row] = {}
        self._memory_ids = itertools.count(-1, -1)
        self.write_error: Optional[str] = None  # why the file cannot be written right now
        self._db: Optional[sqlite3.Connection] = None
        self._inode: Optional[tuple[int, int]] = None
        self._disk = 0  # rows in the file awaiting replay; kept so a cycle without backlog never touches SQLite
        self.rejected = 0  # rows the table refused, kept aside in the file
        try:
            self._db = self._open_or_reset()
        except (sqlite3.Error, OSError) as exc:
            # A full disk or EIO at start is not a configuration problem: rows wait in memory and
            # the file is opened again at every write, as after the same failure later on.
            self.write_error = f"open: {_reason(exc)}"
        except BaseException:
            self.close()
            raise

    # -- the file ----------------------------------------------------------------------

    def _lock(self) -> int:
        lock_path = f"{self.path}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SpoolUnavailable(f"cannot open lock file {lock_path}: {_reason(exc)}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise SpoolUnavailable(f"{self.path} is in use by another heartbeatd (PID {holder})") from None
        try:  # who holds it, for the refusal line of a second daemon; the lock holds without it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:  # a full disk
            pass
        return fd

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), isolation_level=None, timeout=BUSY_TIMEOUT)
        # Text that is not UTF-8 (a row another program wrote) must not fail every read of the file.
        db.text_factory = lambda raw: raw.decode("utf-8", "replace")
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(SCHEMA)
            columns = {r[1] for r in db.execute("PRAGMA table_info(spool)")}
            if "rejected" not in columns:  # a spool written by heartbeatd 1.0
                db.execute("ALTER TABLE spool ADD COLUMN rejected TEXT")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise _Damaged("quick_check failed")
            counts = db.execute("SELECT count(*) - count(rejected), count(rejected) FROM spool").fetchone()
        except BaseException:
            db.close()
            raise
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._disk, self.rejected = int(counts[0]), int(counts[1])
        return db

    def _open_or_reset(self) -> sqlite3.Connection:
        try:
            return self._open()
        except (sqlite3.Error, _Damaged) as exc:
            if not is_damage(exc):
                raise
            return self._reset(exc)

    def _reset(self, exc: BaseException) -> sqlite3.Connection:
        """Rename the damaged file aside with a timestamp and start a new, empty spool."""
        if not self.path.is_file():  # never rename anything but a spool file
            raise SpoolUnavailable(f"{self.path} is not a regular file")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{self._now():%Y%m%dT%H%M%SZ}")
        try:
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                if os.path.exists(f"{self.path}{suffix}"):
                    os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
        except OSError as err:
            raise SpoolUnavailable(f"spool {self.path} is damaged ({exc}) and cannot be moved aside: {err}") from err
        log.error("心跳缓存文件损坏 - %s: %s; moved aside to %s, starting a new spool", self.path, exc, aside)
        return self._open()

    def _database(self) -> sqlite3.Connection:
        """The open file, reopened first if it was closed after a failure or deleted under us."""
        if self._db is not None:
            try:
                st = os.stat(self.path)
                same = (st.st_dev, st.st_ino) == self._inode
            except FileNotFoundError:
                same = False
            if same:
                return self._db
            self._reopen_moved()
        if self._db is None:
            self._db = self._open_or_reset()
        return self._db

    def _reopen_moved(self) -> None:
        """The path no longer names our file: carry what the old file holds over to a new one there."""
        assert self._db is not None
        old = self._db
        held = old.execute("SELECT service_name, ip_address, report_time, rejected FROM spool ORDER BY id").fetchall()
        old.close()
        self._db = None
        log.error("心跳缓存文件丢失 - %s no longer names the open spool (deleted or replaced); "
                  "reopening it there with the %d row(s) the old file held", self.path, len(held))
        try:
            check_path(self.path)
            db = self._open_or_reset()
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(INSERT, held)
        except BaseException:
            # The old file's rows must not go with it: held in memory (refused ones too, to be
            # refused and set aside again) until a file takes them.
            self._disk = 0
            rows, _ = _parse([(0, s, ip, t) for s, ip, t, _ in held])
            for _, row in rows:
                self._memory[next(self._memory_ids)] = row
            raise
        self._db = db
        self._recount()

    def _recount(self) -> None:
        counts = self._database().execute("SELECT count(*) - count(rejected), count(rejected) FROM spool").fetchone()
        self._disk, self.rejected = int(counts[0]), int(counts[1])

    def _failed(self, exc: BaseException, what: str) -> str:
        """After an SQLite error: set a damaged file aside; otherwise keep it. Return the reason."""
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None
        if is_damage(exc):
            try:
                self._db = self._reset(exc)
            except (sqlite3.Error, OSError, SpoolUnavailable) as err:
                return f"{what}: {_reason(err)}"
        return f"{what}: {_reason(exc)}"

    # -- what the daemon uses ----------------------------------------------------------------

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
            db = self._database()
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(INSERT, [(r.service, r.ip, r.report_time.isoformat(), None) for r in held])
                count = db.execute("SELECT count(*) FROM spool WHERE rejected IS NULL").fetchone()[0]
                dropped = max(0, count - self.max_rows)
                if dropped:  # by insertion order: a wall clock that stepped back must not matter
                    db.execute("DELETE FROM spool WHERE id IN (SELECT id FROM spool WHERE rejected IS NULL "
                               "ORDER BY id LIMIT ?)", (dropped,))
        except (sqlite3.Error, OSError, _Damaged, SpoolUnavailable) as exc:
            self.write_error = self._failed(exc, "write") if isinstance(exc, (sqlite3.Error, _Damaged)) \
                else _reason(exc)
            for row in rows:
                self._memory[next(self._memory_ids)] = row
            limit = min(self.max_rows, MEMORY_MAX_ROWS)
            dropped = max(0, len(self._memory) - limit)
            for key in list(itertools.islice(self._memory, dropped)):  # the oldest held
                del self._memory[key]
            return dropped
        self.write_error = None
        self._memory.clear()
        self._disk = int(count) - int(dropped)
        return int(dropped)

    def oldest(self, limit: int) -> list[tuple[int, Row]]:
        """Up to `limit` waiting rows, first written first: the file's (ids > 0), then memory's (ids < 0)."""
        found: list[tuple[int, Row]] = []
        if self._disk:
            try:
                db = self._database()
                found, unreadable = _parse(db.execute(PENDING + " ORDER BY id LIMIT ?", (limit,)).fetchall())
                if unreadable:  # a row this daemon cannot read back is set aside, never a failed cycle
                    log.error("心跳缓存错误 - %d row(s) in %s cannot be read back (%s); kept aside with the "
                              "rejected rows", len(unreadable), self.path, unreadable[0][0])
                    with db:
                        db.execute("BEGIN IMMEDIATE")
                        db.executemany("UPDATE spool SET rejected = ? WHERE id = ?", unreadable)
                    self._recount()
            except (sqlite3.Error, OSError, _Damaged, SpoolUnavailable) as exc:
                if isinstance(exc, (sqlite3.Error, _Damaged)):
                    log.error("心跳缓存错误 - cannot read %s: %s", self.path, self._failed(exc, "read"))
                    if self._db is not None:  # set aside and started anew: what it held is no longer ours
                        self._disk = 0
        found += itertools.islice(self._memory.items(), max(0, limit - len(found)))
        return found

    def delete(self, ids: Sequence[int]) -> None:
        """Forget rows now known to be in the table; a failure leaves them for a later (deduplicated) replay."""
        for i in ids:
            if i < 0:
                self._memory.pop(i, None)
        on_disk = [(i,) for i in ids if i > 0]
        if not on_disk:
            return
        try:
            db = self._database()
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.executemany("DELETE FROM spool WHERE id = ?", on_disk)
            self._recount()
        except (sqlite3.Error, OSError, _Damaged, SpoolUnavailable) as exc:
            reason = self._failed(exc, "delete") if isinstance(exc, (sqlite3.Error, _Damaged)) else _reason(exc)
            raise SpoolWriteFailed(reason) from exc

    def reject(self, rejected: Sequence[tuple[int, Row, str]]) -> None:
        """Keep rows the table refused aside in the file, with the reason; they are not replayed.

        Ids are those `oldest` gave (> 0 in the file, < 0 in memory), or 0 for a row never spooled.
        """
        new = [(r.service, r.ip, r.report_time.isoformat(), why) for i, r, why in rejected if i <= 0]
        try:
            db = self._database()
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.executemany("UPDATE spool SET rejected = ? WHERE id = ?", [(why, i) for i, _, why in rejected if i > 0])
                db.executemany(SET_ASIDE, new)
            self._recount()
        except (sqlite3.Error, OSError, _Damaged, SpoolUnavailable) as exc:
            # Memory rows stay where they are and are tried again; the others are not lost either.
            reason = self._failed(exc, "write") if isinstance(exc, (sqlite3.Error, _Damaged)) else _reason(exc)
            raise SpoolWriteFailed(reason) from exc
        for i, _, _ in rejected:
            if i < 0:
                self._memory.pop(i, None)

    def refresh(self) -> None:
        """Before a replay: open the file if it could not be opened (a full disk at start), and read
        the rejected count again (`heartbeatd rejected --retry` may have changed it)."""
        if self._db is None:
            try:
                self._database()  # counts what the file holds
            except (sqlite3.Error, OSError, _Damaged, SpoolUnavailable):
                pass
            return
        if self.rejected:
            try:
                self._recount()
            except (sqlite3.Error, OSError, _Damaged, SpoolUnavailable) as exc:
                if isinstance(exc, (sqlite3.Error, _Damaged)):
                    self._failed(exc, "read")

    # -- what `heartbeatd rejected` uses ---------------------------------------------------------

    def rejected_raw(self) -> list[tuple[int, str, str, str, str]]:
        """Every row set aside, as stored (id, service, ip, report_time text, reason), first written first."""
        db = self._database()
        return [tuple(r) for r in db.execute(
            "SELECT id, service_name, ip_address, report_time, rejected FROM spool "
            "WHERE rejected IS NOT NULL ORDER BY id").fetchall()]

    def rejected_rows(self) -> list[tuple[int, Row, str]]:
        """Every row the table refused that can be read back, with the reason, first written first."""
        raw = self.rejected_raw()
        why = {i: reason for i, _, _, _, reason in raw}
        readable, _ = _parse([(i, s, ip, t) for i, s, ip, t, _ in raw])
        return [(i, row, why[i]) for i, row in readable]

    def take_over(self, old: "Spool") -> int:
        """Move everything another spool holds into this one (HEARTBEAT_SPOOL_PATH changed on reload).

        Rows leave the old file only once this file holds them: if it cannot (a full disk), this
        raises SpoolUnavailable and both spools are as they were.
        """
        try:  # what the old file holds, read whatever its counters say; an error keeps everything there
            db = old._database()
            found = db.execute(PENDING + " ORDER BY id").fetchall()
            refused = old.rejected_raw()
        except (sqlite3.Error, OSError, _Damaged, SpoolUnavailable) as exc:
            raise SpoolUnavailable(f"cannot read the rows held in {old.path}: {_reason(exc)}") from exc
        on_disk, unreadable = _parse(found)
        copied = [i for i, _ in on_disk] + [i for _, i in unreadable] + [r[0] for r in refused]
        waiting = [row for _, row in on_disk] + list(old._memory.values())
        by_id = {r[0]: r for r in found}
        refused += [(i, by_id[i][1], by_id[i][2], by_id[i][3], why) for why, i in unreadable]  # moved as set aside
        self.append(waiting)
        if self.write_error is None and refused:
            try:
                with self._database() as db:
                    db.execute("BEGIN IMMEDIATE")
                    db.executemany(SET_ASIDE, [(s, ip, t, why) for _, s, ip, t, why in refused])
                self._recount()
            except (sqlite3.Error, OSError, _Damaged, SpoolUnavailable) as exc:
                self.write_error = self._failed(exc, "write") if isinstance(exc, (sqlite3.Error, _Damaged)) \
                    else _reason(exc)
        if self.write_error is not None:
            self._memory.clear()
            raise SpoolUnavailable(f"{self.path} cannot take the {len(waiting) + len(refused)} row(s) held by "
                                   f"{old.path} ({self.write_error})")
        old._memory.clear()
        try:
            with old._database() as db:
                db.execute("BEGIN IMMEDIATE")
                db.executemany("DELETE FROM spool WHERE id = ?", [(i,) for i in copied])  # only what was copied
            old._recount()
        except (sqlite3.Error, OSError, _Damaged, SpoolUnavailable) as exc:
            # Both files hold them now; a replay from either writes each row once (deduplicated).
            log.error("心跳缓存错误 - the rows moved to %s are still in %s (%s)", self.path, old.path, _reason(exc))
        return len(waiting) + len(refused)

    def close(self) -> None:
        """Put rows held in memory into the file if it takes them now, close it and release the lock."""
        if self._memory:
            self.append([])
            if self._memory:
                log.error("心跳缓存不可写 - %s cannot be written (%s); %d row(s) held in memory only are lost",
                          self.path, self.write_error, len(self._memory))
                self._memory.clear()
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class SpoolWriteFailed(Exception):
    """The file could not be changed (full disk, EIO); nothing is lost, the change is retried later."""
