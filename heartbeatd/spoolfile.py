"""The spool's file: the SQLite database, its lock, its integrity, and the watch on its inode.

What can go wrong with a file, and what each means here:
- SQLite says the file is damaged (SQLITE_CORRUPT, SQLITE_NOTADB): the file is set aside and a new
  spool started. Nothing else is ever renamed.
- The disk is full, or EIO, EACCES, a read-only file system: the file is kept as it is (the
  spool holds rows in memory meanwhile: `heartbeatd.spool`).
- The path is a directory, or a file we may not read and write: a configuration problem,
  refused before anything starts.
- The file is deleted or replaced under us: noticed before the next use, reopened at the path
  with what the old file held.
- A second daemon on the same spool: refused, naming the holder's PID (an flock on `PATH.lock`).

The file's columns are derived from heartbeat.COLUMNS: a row's key and extra columns, and the
reason it was set aside (NULL while it waits to be written).
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import stat
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from heartbeatd.heartbeat import EXTRA, KEY

log = logging.getLogger("heartbeatd.spool")

FIELDS = tuple(c.name for c in KEY + EXTRA)  # a row as stored, before its `rejected`
_KEYS = ", ".join(c.name for c in KEY)
SCHEMA = ("CREATE TABLE IF NOT EXISTS spool (\n    id           INTEGER PRIMARY KEY AUTOINCREMENT,\n"
          + "".join(f"    {c.name:<12} TEXT NOT NULL,\n" for c in KEY)
          + "".join(f"    {c.name:<12},\n" for c in EXTRA)  # no type: SQLite keeps a number a number
          + f"    rejected     TEXT,\n    UNIQUE ({_KEYS})\n)")
_ALL = ", ".join(FIELDS + ("rejected",))
_MARKS = ", ".join("?" * (len(FIELDS) + 1))
INSERT = f"INSERT OR IGNORE INTO spool ({_ALL}) VALUES ({_MARKS})"
SET_ASIDE = (f"INSERT INTO spool ({_ALL}) VALUES ({_MARKS}) "
             f"ON CONFLICT ({_KEYS}) DO UPDATE SET rejected = excluded.rejected")
PENDING = f"SELECT id, {', '.join(FIELDS)} FROM spool WHERE rejected IS NULL"
HELD = f"SELECT {_ALL} FROM spool ORDER BY id"
REJECTED = f"SELECT id, {', '.join(FIELDS)}, rejected FROM spool WHERE rejected IS NOT NULL ORDER BY id"
COUNTS = "SELECT count(*) - count(rejected), count(rejected) FROM spool"
# SQLite primary result codes that mean "this file is damaged" (extended codes carry them in the low byte).
DAMAGED = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
BUSY_TIMEOUT = 1.0  # seconds SQLite waits for a lock another process (`heartbeatd rejected`) holds
FILE_ERRORS: tuple[type[BaseException], ...]  # set below: what a failing file raises


class SpoolUnavailable(Exception):
    """The spool cannot be used at this path: a configuration problem."""


class Damaged(Exception):
    """SQLite says the file is not a sound database."""


FILE_ERRORS = (sqlite3.Error, OSError, Damaged, SpoolUnavailable)


def is_damage(exc: BaseException) -> bool:
    """True when SQLite reports the file itself as damaged (not full, not unreadable)."""
    if isinstance(exc, Damaged):
        return True
    code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
    if isinstance(code, int):
        return (code & 0xFF) in DAMAGED
    text = str(exc)
    return "malformed" in text or "not a database" in text


def reason(exc: BaseException) -> str:
    """What went wrong, in a few words (`No space left on device`)."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def check_path(path: Path) -> None:
    """Refuse a path that cannot be this daemon's spool (a directory, a file we may not use)."""
    directory = path.parent if str(path.parent) else Path(".")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpoolUnavailable(f"cannot create directory {directory}: {reason(exc)}") from exc
    if not directory.is_dir():
        raise SpoolUnavailable(f"{directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise SpoolUnavailable(f"directory {directory} is not writable")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SpoolUnavailable(f"{path}: {reason(exc)}") from exc
    if stat.S_ISDIR(mode):
        raise SpoolUnavailable(f"{path} is a directory, not a spool file")
    if not stat.S_ISREG(mode):
        raise SpoolUnavailable(f"{path} is not a regular file")
    if not os.access(path, os.R_OK | os.W_OK):
        raise SpoolUnavailable(f"{path} cannot be read and written by this user")


class SpoolFile:
    """The open SQLite file at a path: opened (again) on use, set aside when damaged, followed when moved."""

    def __init__(self, path: Path, now: Callable[[], datetime], lock: bool,
                 on_open: Callable[[sqlite3.Connection], None],
                 on_lost: Callable[[Sequence[tuple[Any, ...]]], None]) -> None:
        self.path = path
        self._now = now
        self._on_open = on_open  # a file was opened: the spool counts what it holds
        self._on_lost = on_lost  # rows of a moved file that no file holds now: the spool keeps them
        check_path(path)
        self._lock_fd = self._lock() if lock else None
        self.db: Optional[sqlite3.Connection] = None
        self._inode: Optional[tuple[int, int]] = None

    def _lock(self) -> int:
        lock_path = f"{self.path}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SpoolUnavailable(f"cannot open lock file {lock_path}: {reason(exc)}") from exc
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
            for name in FIELDS[len(KEY):] + ("rejected",):  # a spool written before the column was added
                if name not in columns:
                    db.execute(f"ALTER TABLE spool ADD COLUMN {name}" + (" TEXT" if name == "rejected" else ""))
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise Damaged("quick_check failed")
            self._on_open(db)
        except BaseException:
            db.close()
            raise
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        return db

    def open_or_reset(self) -> sqlite3.Connection:
        """Open the file, or set a damaged one aside and start anew."""
        try:
            return self._open()
        except (sqlite3.Error, Damaged) as exc:
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

    def database(self) -> sqlite3.Connection:
        """The open file, reopened first if it was closed after a failure or deleted under us."""
        if self.db is not None:
            try:
                st = os.stat(self.path)
                same = (st.st_dev, st.st_ino) == self._inode
            except FileNotFoundError:
                same = False
            if same:
                return self.db
            self._reopen_moved(self.db)
        if self.db is None:
            self.db = self.open_or_reset()
        return self.db

    def _reopen_moved(self, old: sqlite3.Connection) -> None:
        """The path no longer names our file: carry what the old file holds over to a new one there."""
        held = old.execute(HELD).fetchall()
        old.close()
        self.db = None
        log.error("心跳缓存文件丢失 - %s no longer names the open spool (deleted or replaced); "
                  "reopening it there with the %d row(s) the old file held", self.path, len(held))
        try:
            check_path(self.path)
            db = self.open_or_reset()
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(INSERT, held)
        except BaseException:
            # The old file's rows must not go with it: the spool holds them (refused ones too, to
            # be refused and set aside again) until a file takes them.
            self._on_lost(held)
            raise
        self.db = db
        self._on_open(db)

    def failed(self, exc: BaseException, what: str) -> str:
        """After an SQLite error: set a damaged file aside; otherwise keep it. Return the reason."""
        if self.db is not None:
            try:
                self.db.close()
            except sqlite3.Error:
                pass
            self.db = None
        if is_damage(exc):
            try:
                self.db = self._reset(exc)
            except (sqlite3.Error, OSError, SpoolUnavailable) as err:
                return f"{what}: {reason(err)}"
        return f"{what}: {reason(exc)}"

    def why(self, exc: BaseException, what: str) -> str:
        """The reason for a failure of the file, after `failed`'s care if it was SQLite's."""
        return self.failed(exc, what) if isinstance(exc, (sqlite3.Error, Damaged)) else reason(exc)

    def close(self) -> None:
        """Close the file and release the lock."""
        if self.db is not None:
            self.db.close()
            self.db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
