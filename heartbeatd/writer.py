"""Raw-SQL writer: heartbeat rows into the table, UTC right for timestamp and timestamptz."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Callable, Optional, Sequence

import psycopg2
import psycopg2.errors
from psycopg2 import sql

from heartbeatd.pgdeadline import deadline
from heartbeatd.probes import Row, to_naive_utc, utcnow

CREATE_TABLE = """\
CREATE TABLE IF NOT EXISTS {table} (
    id           bigserial PRIMARY KEY,
    service_name varchar(50) NOT NULL,
    ip_address   varchar(64) NOT NULL,
    report_time  timestamp   NOT NULL,
    created_at   timestamp   NOT NULL DEFAULT (now() AT TIME ZONE 'utc')
);
CREATE INDEX IF NOT EXISTS {index} ON {table} (service_name, report_time);
"""
COLUMN_TYPES = """\
SELECT a.attname, t.typname
  FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
 WHERE a.attrelid = pg_catalog.to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped"""
# The live rows take the replay's advisory lock too: an INSERT whose client gave up (a backend
# frozen mid-statement) still holds it when it commits later, so the replay of the same rows
# waits for it and then sees them, instead of writing them a second time (the soak, seed 7).
INSERT = """\
SELECT pg_advisory_xact_lock(hashtext({lock_key}));
INSERT INTO {table} (service_name, ip_address, report_time, created_at) VALUES {values}"""
# Replayed rows may already be in the table (the daemon died between PostgreSQL's commit and
# the spool's delete, or a write timed out after the commit): insert only the missing ones. The
# transaction-scoped advisory lock makes check-and-insert atomic against another writer replaying
# the same rows (two daemons, or `heartbeatd rejected --retry` beside the daemon), with or
# without a unique index on the table.
INSERT_MISSING = """\
SELECT pg_advisory_xact_lock(hashtext({lock_key}));
INSERT INTO {table} (service_name, ip_address, report_time, created_at)
SELECT v.s, v.i, v.r, v.c FROM (VALUES {values}) AS v (s, i, r, c)
 WHERE NOT EXISTS (SELECT 1 FROM {table} h
                    WHERE h.service_name = v.s AND h.ip_address = v.i AND h.report_time = v.r)"""
REQUIRED = ("service_name", "ip_address", "report_time", "created_at")
# Sent in the same round trip as the INSERT. When our deadline gives up on a stalled INSERT (a
# lock, a frozen backend), the server cancels it too instead of committing it much later,
# behind the back of the replay that will write the same rows.
STATEMENT_TIMEOUT = "SET LOCAL statement_timeout = {}; "


class WriteError(Exception):
    """Rows were not (known to be) written."""

    def __init__(self, message: str, sqlstate: Optional[str] = None, kind: Optional[str] = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        # What repeated-error throttling compares: the kind of failure, not text with row ids in it.
        self.kind = sqlstate or kind or message

    @property
    def data_error(self) -> bool:
        """The table refused these values (SQLSTATE class 22 data exception, 23 constraint violation)."""
        return self.sqlstate is not None and self.sqlstate[:2] in ("22", "23")


def index_name(table: Sequence[str]) -> str:
    """The name init-db gives the (service_name, report_time) index."""
    return f"{table[-1]}_service_name_report_time_idx"[:63]


def pair_index_name(table: Sequence[str]) -> str:
    """The name init-db gives the (service_name, ip_address, report_time) index the read side uses."""
    return f"{table[-1]}_service_ip_time_idx"[:63]


# What `heartbeatd status` and `report` read by: latest per (service, ip) in milliseconds.
PAIR_INDEX = "CREATE INDEX {concurrently} IF NOT EXISTS {index} ON {table} (service_name, ip_address, report_time)"
INDEX_STATE = """SELECT i.indisvalid FROM pg_catalog.pg_index i
 WHERE i.indexrelid = pg_catalog.to_regclass(%s)"""
HAS_ROWS = "SELECT EXISTS (SELECT 1 FROM {table})"
# Building an index over millions of rows takes minutes, not HEARTBEAT_TIMEOUT; still bounded.
INDEX_TIMEOUT = 3600.0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


Batch = Sequence[tuple[int, Row]]  # rows with the caller's ids (spool ids, or 0 for live rows)
Refused = tuple[int, Row, str]  # a row the table refused, with the reason


def write_split(writer: "Writer | Any", conn: Any, batch: Batch, dedupe: bool,
                between: Callable[[], None] = lambda: None, split: bool = True, until: float = float("inf"),
                clock: Callable[[], float] = time.monotonic) -> tuple[list[tuple[int, Row]], list[Refused]]:
    """Write a batch; one the table refuses for a data reason is split until the refused rows stand alone.

    Returns (written, refused with the reason); rows in neither were not tried (no split once
    `clock()` passes `until`: they stay where they are). Without `split` a refused batch is
    refused whole. Any other failure raises WriteError. `between` runs between the statements of
    a split (the daemon pings its watchdog there).
    """
    if not batch:
        return [], []
    try:
        writer.write(conn, [row for _, row in batch], dedupe=dedupe)
        return list(batch), []
    except WriteError as exc:
        if not exc.data_error:
            raise
        if len(batch) == 1 or not split:
            return [], [(i, row, str(exc)) for i, row in batch]
    if clock() >= until:
        return [], []
    between()
    half = len(batch) // 2
    first_ok, first_bad = write_split(writer, conn, batch[:half], dedupe, between, split, until, clock)
    second_ok, second_bad = write_split(writer, conn, batch[half:], dedupe, between, split, until, clock)
    return first_ok + second_ok, first_bad + second_bad


class Writer:
    """Inserts rows on a connection it is handed; remembers the time columns' types."""

    def __init__(self, table: Sequence[str], timeout: float, clock: Callable[[], datetime] = utcnow) -> None:
        self.table = tuple(table)
        self.timeout = timeout
        self._ident = sql.Identifier(*self.table)
        self._clock = clock
        # Whether report_time and created_at are `timestamp` (naive UTC) rather than `timestamptz`
        # (the aware instant): looked up once, again only after an error.
        self._naive: Optional[tuple[bool, bool]] = None
        # A little under our own deadline, so the server gives up first and says so.
        self._server_timeout_ms = max(1, int(timeout * 800))
        self._queries: dict[tuple[int, bool], str] = {}
        self.inserted = 0  # rows inserted since this writer was made

    @property
    def name(self) -> str:
        """The table's name as configured."""
        return ".".join(self.table)

    def _missing_table(self) -> WriteError:
        return WriteError(f"table {self.name} does not exist: run `heartbeatd init-db`", kind="missing table")

    def _lookup(self, cur: Any) -> tuple[bool, bool]:
        cur.execute(COLUMN_TYPES, (self._ident.as_string(cur),))
        types = {name: typ for name, typ in cur.fetchall()}
        if not types:
            raise self._missing_table()
        missing = [c for c in REQUIRED if c not in types]
        if missing:
            raise WriteError(f"table {self.name} lacks column(s) {', '.join(missing)}", kind="missing columns")
        return types["report_time"] != "timestamptz", types["created_at"] != "timestamptz"

    def _query(self, cur: Any, count: int, dedupe: bool) -> str:
        """The INSERT for `count` rows, composed once per shape (composing costs more than sending)."""
        key = (count, dedupe)
        query = self._queries.get(key)
        if query is None:
            values = sql.SQL(", ").join([sql.SQL("(%s, %s, %s, %s)")] * count)
            query = sql.SQL(STATEMENT_TIMEOUT + (INSERT_MISSING if dedupe else INSERT)).format(
                sql.Literal(self._server_timeout_ms), table=self._ident, values=values,
                lock_key=sql.Literal(f"heartbeatd:{self.name}")).as_string(cur)
            if len(self._queries) < 16:
                self._queries[key] = query
        return query

    def write(self, conn: Any, rows: Sequence[Row], dedupe: bool = False) -> None:
        """Insert `rows` in one statement within the timeout; raise WriteError if not committed."""
        if not rows:
            return
        try:
            with deadline(self.timeout), conn.cursor() as cur:
                if self._naive is None:
                    self._naive = self._lookup(cur)
                # timestamptz gets the aware instant; timestamp gets naive UTC wall time. Neither
                # depends on the server's or the session's TimeZone.
                naive_report, naive_created = self._naive
                created = to_naive_utc(self._clock()) if naive_created else self._clock()
                params: list[Any] = []
                for row in rows:
                    params += (row.service, row.ip, to_naive_utc(row.report_time) if naive_report else row.report_time,
                               created)
                cur.execute(self._query(cur, len(rows), dedupe), params)
                # Rows the statement inserted: a replay of rows already in the table inserts none,
                # which is no sign that the table takes rows.
                self.inserted += max(0, cur.rowcount)
        except Exception as exc:  # noqa: BLE001 - any driver failure means "not written"
            self._naive = None  # the table may have changed: look its columns up again
            if isinstance(exc, WriteError):
                raise
            if isinstance(exc, psycopg2.errors.UndefinedTable):
                raise self._missing_table() from exc
            if isinstance(exc, (ValueError, OverflowError)):
                # A value the driver cannot send (a NUL byte, a time out of range): refused by us,
                # before the server saw it - this row's fault, like a data exception (class 22).
                raise WriteError(_one_line(exc), "22000", type(exc).__name__) from exc
            raise WriteError(_one_line(exc), getattr(exc, "pgcode", None), type(exc).__name__) from exc

    def init_db(self, conn: Any) -> list[str]:
        """Create the table and its indexes if missing (idempotent); say what was created."""
        done: list[str] = []
        pair = sql.Identifier(*self.table[:-1], pair_index_name(self.table))
        with deadline(self.timeout), conn.cursor() as cur:
            cur.execute(sql.SQL(CREATE_TABLE).format(table=self._ident, index=sql.Identifier(index_name(self.table))))
            cur.execute(INDEX_STATE, (pair.as_string(cur),))
            state = cur.fetchone()
            if state is not None and not state[0]:  # a CONCURRENTLY build that was interrupted
                cur.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(pair))
                state = None
            cur.execute(sql.SQL(HAS_ROWS).format(table=self._ident))
            has_rows = bool(cur.fetchone()[0])
        if state is None:
            # On a table that already holds rows, CONCURRENTLY: the daemons go on writing meanwhile.
            with deadline(INDEX_TIMEOUT), conn.cursor() as cur:
                # The index lives in the table's schema; CREATE INDEX takes its bare name.
                cur.execute(sql.SQL(PAIR_INDEX).format(
                    concurrently=sql.SQL("CONCURRENTLY" if has_rows else ""),
                    index=sql.Identifier(pair_index_name(self.table)), table=self._ident))
            done.append(f"created index {pair_index_name(self.table)}" + (" concurrently" if has_rows else ""))
        self._naive = None
        return done
