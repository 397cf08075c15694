"""Raw-SQL writer: heartbeat rows into the table, UTC right for timestamp and timestamptz."""

from __future__ import annotations

import time
import zlib
from bisect import bisect_right
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

import psycopg2
import psycopg2.errors
import psycopg2.extensions as ext
from psycopg2 import sql

from heartbeatd.heartbeat import COLUMNS, EPOCH, EXTRA, KEY, NAIVE_EPOCH, REQUIRED, Column, Row, to_naive_utc, utcnow
from heartbeatd.pg import deadline
from heartbeatd.schema import ColumnType, declared_types

# Every write takes transaction-scoped advisory locks, as a statement of its own, and inserts only
# the rows not already there. The INSERT's snapshot is taken once the locks are held, so it sees
# what another writer holding one of them committed: check-and-insert is atomic against any other
# writer of the same rows (two daemons, `heartbeatd rejected --retry` beside the daemon), with or
# without a unique index. Live rows are no exception: an INSERT whose client gave up can still reach
# the server later (a frozen path that delivers what it held, a daemon killed after sending), after
# the replay of the same rows from the spool; it then inserts nothing (the soak, seed 7, 60
# minutes). A frozen commit holds its locks, so the replay waits for it. Both statements go in one
# round trip after the server-side timeout: when our deadline gives up on a stalled INSERT (a lock,
# a frozen backend), the server cancels it too instead of committing much later.
#
# The locks are per row key, not per table: only writers of the same row need to be ordered, and
# a fleet's hosts write different rows (their report_times differ; (service, address) alone would
# not do: every host writes a row for the same Redis and PostgreSQL). A row's key falls in one of
# STRIPES locks of the table by its report_time (lock_keys): a cycle's rows take one, a batch of
# 500 spooled rows a few hundred at most, and the fleet never more than STRIPES of PostgreSQL's
# shared lock table. A writer takes its stripes in ascending order (unnest keeps the array's
# order), so two writers cannot deadlock. The lock statement is written whole for each write, the
# stripes in it as numbers, into a slot of a composed statement (Stated): they are our own integers,
# with nothing to quote, and a list parameter would cost psycopg2 a Python adapter for the list and
# for each of its elements, every cycle (the largest client cost a write had: about 14,000
# instructions). A cycle's rows take one stripe: one call, which costs the server half what planning
# the unnest() does (pg_stat_statements, a pooled fleet: 16 against 33 us a cycle).
TIMEOUT = "SET LOCAL statement_timeout = {timeout};\n"
LOCK_ONE = "SELECT pg_advisory_xact_lock({space}, {stripe})"
LOCK = "SELECT pg_advisory_xact_lock({space}, s) FROM unnest(ARRAY[{stripes}]::int4[]) AS s"
# NOT EXISTS sees only what the table held before the statement: two rows of one batch with the
# same key as stored (two cycles within a second into a `timestamp(0)` column: times are sent as
# stored, see _as_stored; addresses are normalized before a row is made, normalize_ip, so an `inet`
# column stores no two spellings of one) are sent once (_Shape.values), as they would be written
# one at a time. It
# looks only within the seconds of the batch's first and last report_time, written into the
# statement as constants (slots again: whole seconds since the epoch, a second wider each way than
# the times as stored, and to_timestamp() of them, which the planner folds): on a partitioned table
# it then plans and locks the one partition they fall in, not every partition and its indexes (a
# year of daily partitions: 30 ms of the server's CPU a write, against 0.3 ms).
#
# What it reads is a slot too: the one partition the batch's rows fall in, where the table is
# partitioned and that partition is known (PARTITIONS), else the table. PostgreSQL plans a read of a
# partitioned table by opening it and pruning its partitions at every statement, which cost a pooled
# fleet's server more a write than the rest of the difference from a plain table (a session writing 3
# rows a statement: 275 against 245 us of backend CPU a write; read from the partition: 255). The rows
# go into that partition too where it may take them (GUARD, below). Where it may not, the INSERT goes
# to the table, which routes each row itself, and a partition read is only as right as the list it
# came from, so such a write returns where its rows went (the returning slot: RETURNING tableoid): rows
# that went elsewhere than the partition read (one detached since, its range now going to the DEFAULT
# partition; one dropped and made again under its name) make the writer look the partitions up again
# before its next write. (A check on pg_inherits first would cost a new backend a million instructions
# of catalog lookups.) What a stale read can do before it is seen: a row the write finds in the old
# partition counts as written, and a replay in that very write of a row written elsewhere is written
# again; a dropped partition fails the write (42P01), its rows spooled for the next cycle.
MISSING = ("SELECT {picked} FROM (VALUES {values}) AS v ({columns})"
           " WHERE NOT EXISTS (SELECT 1 FROM {read} h WHERE {same} AND h.{report} BETWEEN {first} AND {last})")
RETURNING = " RETURNING tableoid"
INSERT_MISSING = TIMEOUT + "{hold}{lock}{guard};\nINSERT INTO {into} ({columns}) " + MISSING + "{returning}"
# Where the partition read may take the rows itself (PARTITIONS' `direct`), the INSERT goes into it. On a
# direct connection (a new backend every cycle) an INSERT through the partitioned table makes PostgreSQL
# build the table's partition descriptor first, reading every partition's catalog row and bound: 37,000
# instructions a partition, so a year of daily partitions cost a cycle 2.5 to 2.6 times the server's work
# on a plain table (tests/README.md, Fleet). Into the partition, that no longer grows with their number.
# What the table would do for the rows and the partition would not is left to the table: a partition
# goes into only where the table has no trigger on INSERT (its statement triggers would not fire), no
# rules, no row security, is not a partition itself, and this role may INSERT into it; and where the
# partition has no rules nor triggers of its own, this role may INSERT into it, no column is an
# identity (an ATTACHed table's would give ids of its own sequence) and each has the table's default
# and generation (a table ATTACHed keeps its own defaults: README's migration attaches one). Those are
# as of the lookup (hourly, after a failed write, at a reload: README says so). Every such write
# first takes the table's ROW EXCLUSIVE lock, as an INSERT through it does, then the partition's, in one
# statement (HOLD): the same waits on other sessions, the table's lock before the partition's as DROP
# and DETACH take them (written into first, the partition would be held while the table is waited for:
# a deadlock with either), and INSERT, UPDATE, DELETE or TRUNCATE on the table checked. Then the guard,
# in the statement that takes the advisory locks (their WHERE: none is taken if it fails): the names
# written (the table's and the partition's, both locked, so no RENAME can come before the INSERT) are
# still those of the relations looked up (one renamed and another made under its name, found in review:
# rows went into the old table for an hour), the partition is still one of the table's and not being
# detached, and no row security has come to the table. A name's literal is resolved when the statement
# is parsed; pg_partition_root() is immutable, so the planner evaluates it then too and folds it;
# row_security_active() runs once (a one-time filter). Otherwise the ELSE's cast fails (42P01), nothing
# is written, and the partitions are looked up again (the lock and the guard: about 0.2 M instructions
# a pooled write, 0.5 M in a new backend; in the INSERT, planned with its subquery, the guard cost 0.03
# and 0.07 M more: tests/benchmark_write.py). A partition whose bounds are no longer
# those looked up (detached and attached again for other times) refuses the rows (23514, no
# constraint named): the write goes through the table at once, and the partitions are looked up again.
# judge() always goes through the table, which decides.
HOLD = "LOCK TABLE ONLY {table}, {partition} IN ROW EXCLUSIVE MODE;\n"
GUARD = (" WHERE CASE WHEN {partition_name}::regclass::oid = {partition}::oid AND {table_name}::regclass::oid = {table}::oid"
         " AND pg_catalog.pg_partition_root({partition}::oid::regclass)::oid = {table}::oid"
         " AND NOT pg_catalog.row_security_active({table}::oid) THEN true"
         " ELSE 'pg_catalog.heartbeatd_partition_detached'::text::regclass IS NULL END")
# A BEFORE INSERT trigger that puts the row elsewhere and returns NULL (old-style partitioning by
# inheritance) makes an INSERT's own count 0: on a table with such a trigger the statement returns
# one empty row for each row missing, and that count is what the table got. (Not everywhere: it
# costs the server a CTE and the client a result of rows, and PostgreSQL refuses an INSERT in WITH
# on a table with conditional rules, the other old way to partition, 0A000: there the rows are
# written uncounted, as before.)
INSERT_MISSING_COUNTED = TIMEOUT + "{lock};\nWITH missing AS (" + MISSING + """),
     inserted AS (INSERT INTO {table} ({columns}) SELECT * FROM missing)
SELECT FROM missing"""
ROUTED = """SELECT NOT c.relhasrules AND EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
  WHERE t.tgrelid = c.oid AND t.tgtype & 7 = 7 AND t.tgenabled <> 'D'),  -- a row-level BEFORE INSERT trigger
       c.relkind = 'p' AND NOT c.relhasrules  -- partitioned, its partitions looked up (PARTITIONS) ...
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t  -- ... where it can return where rows went
                        WHERE t.tgrelid = c.oid AND t.tgtype & 7 = 7 AND t.tgenabled <> 'D'),
       NOT c.relispartition AND pg_catalog.has_table_privilege(c.oid, 'INSERT')  -- ... and rows may go into them
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t  -- (GUARD): not a partition itself, no INSERT trigger
                        WHERE t.tgrelid = c.oid AND NOT t.tgisinternal AND t.tgtype & 4 = 4 AND t.tgenabled <> 'D'),
       c.oid::int8
  FROM pg_catalog.pg_class c WHERE c.oid = pg_catalog.to_regclass(%s)"""
# The partitions a write may read instead of the table: those of a table partitioned by RANGE
# (report_time) alone that hold rows themselves (not partitioned again, not foreign), not being
# detached, that this role may read (their schema too), on a table without row security and with
# none of their own (read by itself, a partition would show what the table's policies hide, or hide
# what the table shows), each with its bounds (NULL for MINVALUE, MAXVALUE) as the column's type, and
# its oid (RETURNING). A bound is read with pg_get_expr(relpartbound, 0), as prune
# reads them (schema.COVERED): no partition is opened or locked. A name with a % is left out (the
# statement's text goes through psycopg2's parameter formatting, as the table's own name cannot have
# one). Looked up with the table's columns (a partitioned one only), again each hour (a partition
# made since; a write then reads through the table meanwhile) and after any failed write but a
# refusal, or whose rows went elsewhere (RETURNING). A bound beyond what a Python datetime holds
# (infinity, BC, year 10000) leaves its partition out. `direct`: whether rows may go into it (GUARD),
# asked of the NEWEST partitions only (by upper bound, MAXVALUE first): the days a cycle's rows and a
# spool's replays fall in, whatever is made ahead. Asked of each, it doubled the lookup on a year of
# daily partitions (a new backend, in one run: 32 ms, against 15 ms without it and 21 ms for the 100
# newest; tests/README.md, Fleet). Rows of older times go through the table, which routes them
# (RETURNING), as every row did in 1.6.3.
NEWEST = 100
PARTITIONS = r"""SELECT name, part, lower, upper, {direct} AS direct
  FROM (SELECT *, pg_catalog.row_number() OVER (ORDER BY upper DESC NULLS FIRST) AS newest FROM (
SELECT pg_catalog.format('%%I.%%I', n.nspname, c.relname) AS name, c.oid::int8 AS part, t.oid AS parent,
       CASE WHEN b[1] LIKE '''%%' THEN pg_catalog.btrim(b[1], '''')::{type} END AS lower,
       CASE WHEN b[2] LIKE '''%%' THEN pg_catalog.btrim(b[2], '''')::{type} END AS upper
  FROM pg_catalog.pg_partitioned_table k
  JOIN pg_catalog.pg_class t ON t.oid = k.partrelid
  JOIN pg_catalog.pg_attribute a ON a.attrelid = k.partrelid AND a.attnum = k.partattrs[0]
  JOIN pg_catalog.pg_inherits i ON i.inhparent = k.partrelid
  JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  CROSS JOIN LATERAL pg_catalog.regexp_match(pg_catalog.pg_get_expr(c.relpartbound, 0),
                                             $$^FOR VALUES FROM \(([^)]*)\) TO \(([^)]*)\)$$) AS b
 WHERE k.partrelid = pg_catalog.to_regclass(%s) AND k.partstrat = 'r' AND k.partnatts = 1
   AND a.attname = 'report_time' AND c.relkind = 'r' AND b IS NOT NULL
   AND NOT t.relrowsecurity AND NOT c.relrowsecurity{pending}
   AND pg_catalog.has_schema_privilege(n.oid, 'USAGE') AND pg_catalog.has_table_privilege(c.oid, 'SELECT')
   AND pg_catalog.has_table_privilege(t.oid, 'SELECT')  -- RETURNING tableoid: not column privileges alone
   AND pg_catalog.strpos(pg_catalog.format('%%I.%%I', n.nspname, c.relname), '%%') = 0) AS q
 WHERE (lower IS NULL OR lower BETWEEN '0001-01-02' AND '9999-12-30')  -- a Python datetime, in any time zone
   AND (upper IS NULL OR upper BETWEEN '0001-01-02' AND '9999-12-30')) AS p"""
PENDING = " AND NOT i.inhdetachpending"  # PostgreSQL 14 and later: a DETACH ... CONCURRENTLY under way
# PostgreSQL 12 and later (pg_partition_root, attgenerated): whether rows may go into a partition (GUARD).
DIRECT = """NOT c.relhasrules AND pg_catalog.has_table_privilege(c.oid, 'INSERT')
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g
                        WHERE g.tgrelid = c.oid AND NOT g.tgisinternal AND g.tgtype & 4 = 4 AND g.tgenabled <> 'D')
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute ta
                         JOIN pg_catalog.pg_attribute pa ON pa.attrelid = c.oid AND pa.attname = ta.attname
                        WHERE ta.attrelid = t.oid AND ta.attnum > 0 AND NOT ta.attisdropped
                          AND (ta.attidentity <> '' OR pa.attidentity <> '' OR ta.attgenerated <> pa.attgenerated
                               OR (SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid) FROM pg_catalog.pg_attrdef d
                                    WHERE d.adrelid = ta.attrelid AND d.adnum = ta.attnum)
                                  IS DISTINCT FROM (SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid)
                                                      FROM pg_catalog.pg_attrdef d
                                                     WHERE d.adrelid = pa.attrelid AND d.adnum = pa.attnum)))"""
NEWEST_DIRECT = """CASE WHEN p.newest <= {newest} THEN (SELECT {direct}
  FROM pg_catalog.pg_class c, pg_catalog.pg_class t WHERE c.oid = p.part AND t.oid = p.parent) ELSE false END"""
PARTITIONS_AGAIN = 3600.0  # seconds: how long the partitions looked up are taken as all there are
STRIPES = 1024
OUT_OF_LOCKS = "53200"  # out of shared memory: "You might need to increase max_locks_per_transaction"
# A refused row's last try (Writer.judge) is one transaction that holds the table's shape still:
# a SELECT of nothing from it takes ACCESS SHARE until the transaction ends (as LOCK TABLE would,
# but with no more than the SELECT privilege the deduplication needs, column privileges too), and
# that conflicts with what ALTER TABLE takes to make a table refuse rows (a NOT NULL column added
# or its default dropped, a CHECK added, a plain DETACH PARTITION): between the row's refusal and
# the witness's acceptance those cannot land. (A trigger's function replaced, or a partition
# detached CONCURRENTLY, can; only a row already refused once and again alone is then set aside on
# that word.) The row's advisory locks first, as every write takes them, so no writer waits on us
# in between. ROLLBACK TO SAVEPOINT releases only what was taken after it: both locks stay. Deferred
# constraints are checked at each INSERT, not at COMMIT, so a refusal is the row's answer, not the
# commit's. The row's INSERT follows in the same round trip (an error leaves the transaction open
# and aborted, its savepoint there to go back to), as the witness's does its ROLLBACK TO: two round
# trips in all, three when the table refuses every row. A client that stalls between them (frozen,
# its network gone) must not leave the locks held by an idle transaction until TCP gives up, so
# the server ends that too within the timeout.
JUDGE_BEGIN = "BEGIN;\n" + TIMEOUT + """SET LOCAL idle_in_transaction_session_timeout = {timeout};
{lock};
SET CONSTRAINTS ALL IMMEDIATE;
SELECT FROM {table} WHERE false;
SAVEPOINT heartbeatd_row;
"""
JUDGE_WITNESS = "ROLLBACK TO SAVEPOINT heartbeatd_row;\n{insert};\nROLLBACK"


SLOTS = ("lock", "first", "last", "read", "returning", "hold", "into", "guard")  # what each write fills in
_SLOT_AT = {name: at for at, name in enumerate(SLOTS)}
READ, RETURNS, INTO = _SLOT_AT["read"], _SLOT_AT["returning"], _SLOT_AT["into"]  # in a write's filling


class Stated(NamedTuple):
    """A composed statement with slots (SLOTS) that each write fills: the text between them, which slot each is."""

    pieces: tuple[str, ...]
    slots: tuple[int, ...]  # positions in SLOTS

    @classmethod
    def compose(cls, cur: Any, template: str, **parts: Any) -> "Stated":
        # Each slot marked by NUL bytes, which no identifier or literal can hold, then cut there.
        marks = {name: cls.mark(name) for name in SLOTS}
        cut = sql.SQL(template).format(**{**marks, **parts}).as_string(cur).split("\0")
        return cls(tuple(cut[0::2]), tuple(_SLOT_AT[name] for name in cut[1::2]))

    @staticmethod
    def mark(name: str) -> sql.Composable:
        """Where slot `name` stands in a template's part."""
        return sql.SQL(f"\0{name}\0")

    def filled(self, values: Sequence[str]) -> str:
        """The statement, each slot filled with its value's text (`values` in the order of SLOTS)."""
        pieces = self.pieces
        text = pieces[0]
        for at, slot in enumerate(self.slots, 1):
            text += values[slot] + pieces[at]
        return text


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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class Refusal(NamedTuple):
    """Why the table refused a row, and whether the row is at fault (the table took a witness beside it)."""

    why: str
    row_at_fault: bool


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
        # A batch whose advisory locks do not fit the server's shared lock table (53200, while a
        # fleet replays at once) is halved, as a refused one is: fewer rows take fewer stripes.
        if exc.sqlstate == OUT_OF_LOCKS and len(batch) > 1:
            pass
        elif not exc.data_error:
            raise
        elif len(batch) == 1 or not split:
            return [], [(i, row, str(exc)) for i, row in batch]
    if clock() >= until:
        return [], []
    between()
    half = len(batch) // 2
    first_ok, first_bad = write_split(writer, conn, batch[:half], dedupe, between, split, until, clock)
    second_ok, second_bad = write_split(writer, conn, batch[half:], dedupe, between, split, until, clock)
    return first_ok + second_ok, first_bad + second_bad


class Writer:
    """Inserts rows on a connection it is handed; learns the table's columns and time types once."""

    def __init__(self, table: Sequence[str], timeout: float, clock: Callable[[], datetime] = utcnow) -> None:
        self.table = tuple(table)
        self.timeout = timeout
        self._ident = sql.Identifier(*self.table)
        self._clock = clock
        # Looked up once, again only after an error: which columns of COLUMNS the table has, and
        # whether each time column is `timestamp` (naive UTC) rather than `timestamptz`.
        self._shape: Optional[_Shape] = None
        # A little under our own deadline, so the server gives up first and says so.
        self._server_timeout_ms = max(1, int(timeout * 800))
        # The table's own space of advisory locks (the two-key form: apart from prune's lock).
        self._space = lock_space(self.name)
        self._queries: dict[int, Stated] = {}
        self._begin: Optional[Stated] = None  # JUDGE_BEGIN for this table
        self._reading = ""  # what the last write read (the table, or one of its partitions)
        self.inserted = 0  # rows inserted since this writer was made
        # A row of the last statement that inserted rows: what `judge` shows the table takes rows like.
        self.witness: Optional[Row] = None

    @property
    def name(self) -> str:
        """The table's name as configured."""
        return ".".join(self.table)

    def _missing_table(self) -> WriteError:
        return WriteError(f"table {self.name} does not exist: run `heartbeatd init-db`", kind="missing table")

    def _lookup(self, cur: Any) -> "_Shape":
        types = declared_types(cur, self._ident)
        if not types:
            raise self._missing_table()
        missing = [c for c in REQUIRED if c not in types]
        if missing:
            raise WriteError(f"table {self.name} lacks column(s) {', '.join(missing)}", kind="missing columns")
        whole = self._ident.as_string(cur)
        cur.execute(ROUTED, (whole,))
        found = cur.fetchone()
        self._queries.clear()  # composed for the columns the table had
        # A write that reads a partition returns where its rows went (RETURNING): not on a table with rules
        # (a conditional DO INSTEAD one refuses RETURNING) nor one whose trigger may put rows elsewhere
        # (INSERT_MISSING_COUNTED returns rows of its own); found in review.
        partitioned = bool(found and found[1])
        return _Shape(types, counted=bool(found and found[0]), space=self._space, whole=whole,
                      partitioned=partitioned, oid=found[3] if found else 0,
                      literal=lambda text: sql.Literal(text).as_string(cur),
                      partitions=_partitions(cur, whole, types["report_time"].name, bool(found[2]))
                      if partitioned else ())

    def _query(self, cur: Any, shape: "_Shape", count: int) -> Stated:
        """The INSERT for `count` rows, composed once per shape (composing costs more than sending)."""
        query = self._queries.get(count)
        if query is None:
            # Out of a VALUES list in a subquery a string is text and a NULL is text: every value is
            # cast to its column's type (shape.slots), so the INSERT and the replay's comparison see
            # it as the column holds it.
            row = sql.SQL("({})").format(sql.SQL(", ").join(shape.slots))
            values = sql.SQL(", ").join([row] * count)
            names = [sql.Identifier(c.name) for c in shape.columns]
            query = Stated.compose(
                cur, INSERT_MISSING_COUNTED if shape.counted else INSERT_MISSING,
                timeout=sql.Literal(self._server_timeout_ms), table=self._ident,
                values=values, columns=sql.SQL(", ").join(names),
                picked=sql.SQL(", ").join(sql.SQL("v.") + n for n in names),
                same=sql.SQL(" AND ").join(sql.SQL("h.{0} = v.{0}").format(sql.Identifier(c.name)) for c in KEY),
                report=sql.Identifier("report_time"), first=shape.bound.format(Stated.mark("first")),
                last=shape.bound.format(Stated.mark("last")), read=Stated.mark("read"),
                returning=Stated.mark("returning"), hold=Stated.mark("hold"), into=Stated.mark("into"),
                guard=Stated.mark("guard"))
            if len(self._queries) < 16:
                self._queries[count] = query
        return query

    def write(self, conn: Any, rows: Sequence[Row], dedupe: bool = False) -> None:
        """Insert those of `rows` not in the table yet, within the timeout; raise WriteError if not committed.

        `dedupe` says the rows come from the spool (the caller's bookkeeping); every write
        deduplicates whatever it says (see INSERT_MISSING)."""
        if not rows:
            return
        try:
            with deadline(self.timeout), conn.cursor() as cur:
                shape = self._shape
                if shape is None:
                    shape = self._shape = self._lookup(cur)
                sent = shape.values(rows, self._clock())
                count = len(sent.times)  # fewer than rows where two are one as stored
                query = self._query(cur, shape, count)
                filling = shape.filling(sent)
                self._reading = read = filling[READ]
                try:
                    cur.execute(query.filled(filling), sent.params)
                except psycopg2.errors.CheckViolation as exc:
                    if filling[INTO] in shape.oids and exc.diag.constraint_name is None and conn.autocommit:
                        # The partition's bounds are not those looked up (GUARD): the table puts the rows.
                        # (On a connection in a transaction, that one is aborted: the rows are refused
                        # and judge() tries each through the table.)
                        self._shape = None
                        filling = shape.filling(sent, known=False)
                        cur.execute(query.filled(filling), sent.params)
                    else:
                        raise
                if filling[RETURNS] and any(oid != shape.oids[read] for oid, in cur.fetchall()):
                    self._shape = None  # rows went elsewhere than the partition read: a stale list (RETURNING)
                if shape.partitioned and time.monotonic() > shape.until:  # a partition made since: found next time
                    self._shape = None
                # Rows the statement inserted (INSERT_MISSING_COUNTED says why not always the
                # INSERT's own count): a replay of rows already in the table inserts none, which is
                # no sign that the table takes rows.
                inserted = cur.rowcount
                if inserted > 0:
                    self.inserted += inserted
                    if inserted == count:  # each one inserted now, the last one too: a row it takes
                        self.witness = rows[-1]
        except Exception as exc:  # noqa: BLE001 - any driver failure means "not written"
            raise self._write_error(exc) from exc

    def judge(self, conn: Any, row: Row) -> Optional[Refusal]:
        """A refused row tried once more, alone, with the table held still: None once it is written.

        If the table refuses it again, a fresh copy of the last row the table took (`witness`,
        report_time now) is tried in the same transaction and rolled back: taken, the row is at
        fault (Refusal with the row's reason); refused too, the table is (it refuses every row:
        Refusal with the witness's reason). The table can change between two statements of an
        attempt, so only a refusal beside an acceptance in one transaction says which. WriteError
        for any other failure, as for write().
        """
        witness = self.witness
        try:
            with deadline(self.timeout), conn.cursor() as cur:
                shape = self._shape
                if shape is None:
                    shape = self._shape = self._lookup(cur)
                insert = self._query(cur, shape, 1)
                # The witness's stripe is taken with the row's, in ascending order, at the start:
                # taken later it would break the order every writer keeps (a deadlock with a replay).
                now = self._clock()
                copy = witness._replace(report_time=now) if witness is not None else None
                mine = shape.values([row], now)
                theirs = shape.values([copy], now) if copy else mine
                taken = shape.lock(sorted({*shape.stripes(mine), *shape.stripes(theirs)}))
                filling = shape.filling(mine, known=False)  # through the table, which decides
                self._reading = filling[READ]
                why = self._refused(cur, self._judge_begin(cur).filled((taken, *filling[1:]))
                                    + insert.filled((taken, *filling[1:])), mine.params)
                if why is None:
                    count = cur.rowcount
                    cur.execute("COMMIT")
                    if count > 0:
                        self.inserted += count
                        self.witness = row
                    return None
                if copy is None:  # nothing taken by this writer yet: nothing proves the row at fault
                    cur.execute("ROLLBACK")
                    return Refusal(why, False)
                # The witness never stays: taken, its ROLLBACK follows in the same round trip.
                filling = shape.filling(theirs, known=False)
                self._reading = filling[READ]
                table_why = self._refused(cur, JUDGE_WITNESS.format(insert=insert.filled((taken, *filling[1:]))),
                                          theirs.params)
                if table_why is None:
                    return Refusal(why, True)
                cur.execute("ROLLBACK")
                return Refusal(table_why, False)
        except Exception as exc:  # noqa: BLE001 - any driver failure means "not written"
            self._abandon(conn)
            raise self._write_error(exc) from exc

    def _judge_begin(self, cur: Any) -> Stated:
        begin = self._begin
        if begin is None:
            begin = self._begin = Stated.compose(
                cur, JUDGE_BEGIN, timeout=sql.Literal(self._server_timeout_ms), table=self._ident)
        return begin

    def _refused(self, cur: Any, query: str, params: Sequence[Any]) -> Optional[str]:
        """One row's INSERT (with what goes before or after it): None if taken, the reason if refused for a
        data reason."""
        try:
            cur.execute(query, params)
        except Exception as exc:  # noqa: BLE001 - sorted here: a data reason is an answer, the rest is not
            error = self._write_error(exc)
            if not error.data_error:
                raise error from exc
            return str(error)
        return None

    def _abandon(self, conn: Any) -> None:
        """Leave no transaction open on a connection that may be used again (best effort, bounded)."""
        try:
            if conn.info.transaction_status != ext.TRANSACTION_STATUS_IDLE:
                with deadline(self.timeout), conn.cursor() as cur:
                    cur.execute("ROLLBACK")
        except Exception:  # noqa: BLE001 - a connection that cannot roll back is discarded by its owner
            pass

    def _write_error(self, exc: BaseException) -> WriteError:
        """Any failure of a write as the WriteError that says what the operator should know."""
        error = self._classify(exc)
        if not error.data_error:
            # The table may have changed: look its columns up again. A refusal of the values says
            # nothing of them, and a lookup after each would cost a split or a last try a round trip.
            self._shape = None
        return error

    def _classify(self, exc: BaseException) -> WriteError:
        if isinstance(exc, WriteError):
            return exc
        if isinstance(exc, psycopg2.errors.UndefinedTable):
            shape = self._shape
            if shape is not None and self._reading in shape.oids:
                # Dropped or detached since it was looked up, or the table given row security (GUARD; every
                # failure but a refusal looks them up again).
                return WriteError(f"partition {self._reading} of table {self.name} was dropped or detached, or the "
                                  "table changed, while written: its partitions are looked up again",
                                  kind="missing partition")
            return self._missing_table()
        if isinstance(exc, (ValueError, OverflowError)):
            # A value the driver cannot send (a NUL byte, a time out of range): refused by us,
            # before the server saw it - this row's fault, like a data exception (class 22).
            return WriteError(_one_line(exc), "22000", type(exc).__name__)
        return WriteError(_one_line(exc), getattr(exc, "pgcode", None), type(exc).__name__)


def lock_space(table: str) -> int:
    """The first key of the table's advisory locks: the same in every process (no hash seed), a signed int4."""
    return zlib.crc32(f"heartbeatd:{table}".encode()) - (1 << 31)


def lock_keys(times: Iterable[datetime]) -> list[int]:
    """The stripes of rows with these report_times (as stored), distinct and ascending.

    Rows with the same key have the same report_time, so they share a stripe; the rows of one
    cycle share one, and two hosts' cycles share one only by chance (1 in STRIPES). The time
    within the hour, to the microsecond, is the same number for naive and aware UTC, in every
    process (no hash seed), and cheap: this runs every cycle.
    """
    return sorted({((t.minute * 60 + t.second) * 1_000_000 + t.microsecond) % STRIPES for t in set(times)})


def _as_stored(typ: ColumnType) -> Optional[Callable[[datetime], datetime]]:
    """How a time is sent to a column of that type: as it stores it, or None for as the Row holds it.

    A Row's times are aware UTC, what a `timestamptz` column takes; a `timestamp` column gets the
    UTC wall time (naive), whatever the session's TimeZone. Both rounded to the column's digits of
    fraction, as PostgreSQL rounds (half up, for times after 2000), so the value sent is the value
    stored: the lock stripes of two copies of a row are the same whatever the column's precision.
    """
    naive = typ.name != "timestamptz"
    if not 0 <= typ.typmod < 6:  # all six digits: nothing to round (the usual case, kept cheap)
        return to_naive_utc if naive else None
    scale = 10 ** (6 - typ.typmod)

    def stored(value: datetime) -> datetime:
        if naive:
            value = to_naive_utc(value)
        fraction = value.microsecond
        return value + timedelta(microseconds=(fraction + scale // 2) // scale * scale - fraction)
    return stored


def _slot(column: Column, typ: ColumnType) -> sql.Composable:
    """Where a column's value stands in the VALUES list: the parameter, cast to the column's type.

    A time (sent as text, see _Shape.values) is cast to the type as declared (`timestamp(0) without
    time zone`): the replay then compares what is stored with what it would store. Any other value
    goes to the bare type name: a length (varchar(50)) would truncate instead of refusing what is too
    long (22001).
    """
    return sql.SQL("CAST({} AS {})").format(sql.Placeholder(),
                                            sql.SQL(typ.declared) if column.time else sql.Identifier(typ.name))


class Sent(NamedTuple):
    """A write's rows as sent: the statement's parameters, row after row, and each row's report_time."""

    params: list[Any]
    times: list[datetime]  # as stored (what the lock stripes and the NOT EXISTS's bounds are made of)


class _Shape:
    """What the table has of COLUMNS, and how each value is sent to it."""

    __slots__ = ("types", "counted", "columns", "slots", "bound", "partitioned", "until", "_convert", "_stamps",
                 "_extras", "_report_at", "_key_times", "_epoch", "_lock_one", "_lock", "_whole", "_lowers",
                 "_uppers", "_names", "_guards", "_holds", "oids")

    def __init__(self, types: dict[str, ColumnType], counted: bool = False, space: int = 0, whole: str = "",
                 partitioned: bool = False, partitions: Sequence["Partition"] = (), oid: int = 0,
                 literal: Optional[Callable[[str], str]] = None) -> None:
        # `counted`: the table has a trigger that may route rows elsewhere (INSERT_MISSING_COUNTED).
        # `space`: the first key of the table's advisory locks (lock_space).
        # `whole`: the table's name as SQL, `oid` its oid; `partitions`: those a write may read instead
        # (PARTITIONS), and write into (GUARD) where `literal` makes a string an SQL literal.
        self.types, self.counted, self.partitioned = types, counted, partitioned
        self.until = time.monotonic() + PARTITIONS_AGAIN  # when the partitions are looked up again
        self._whole = whole
        ordered = sorted(partitions)  # by lower bound: they do not overlap
        self._lowers = [p.lower for p in ordered]
        self._uppers = [p.upper for p in ordered]
        self._names = [p.name for p in ordered]
        named = literal(whole) if literal else ""
        self._guards = [GUARD.format(partition_name=literal(p.name), partition=p.oid, table_name=named, table=oid)
                        if p.direct and literal else "" for p in ordered]
        self._holds = [HOLD.format(table=whole, partition=p.name) if guard else ""  # where rows go into it
                       for p, guard in zip(ordered, self._guards)]
        self.oids = {p.name: p.oid for p in ordered}  # what a write may read, and where its rows should go
        self._lock_one = LOCK_ONE.format(space=space, stripe="\0").split("\0")
        self._lock = LOCK.format(space=space, stripes="\0").split("\0")
        # A row's values in the order a Row holds them: the key columns, the stamps (set by the
        # write), then the extra columns this table has; each group in COLUMNS' order.
        extras = [c for c in EXTRA if c.name in types]
        self.columns = [*KEY, *(c for c in COLUMNS if c.kind == "stamp"), *extras]
        self.slots = [_slot(c, types[c.name]) for c in self.columns]
        # The key fields sent otherwise than as the Row holds them (times, as the column stores them).
        self._convert = [(at, stored) for at, stored in enumerate(_as_stored(types[c.name]) if c.time else None
                                                                  for c in KEY) if stored is not None]
        self._stamps = [_as_stored(types[c.name]) or _as_it_is for c in COLUMNS if c.kind == "stamp"]
        # Where in Row.extra each extra column's value is: None when the table has all of them.
        self._extras = None if len(extras) == len(EXTRA) else [EXTRA.index(c) for c in extras]
        self._report_at = KEY.index(next(c for c in KEY if c.name == "report_time"))  # the lock stripes' time
        self._key_times = [at for at, c in enumerate(KEY) if c.time]
        # The NOT EXISTS's bounds on report_time (MISSING): whole seconds since the epoch, of the times
        # as sent (naive UTC for `timestamp`), as the column's type; AT TIME ZONE 'UTC' with a constant
        # zone, like to_timestamp(), is immutable, so the planner folds them and prunes partitions.
        naive = types["report_time"].name != "timestamptz"
        self.bound = sql.SQL("(to_timestamp({}) AT TIME ZONE 'UTC')" if naive else "to_timestamp({})")
        self._epoch = NAIVE_EPOCH if naive else EPOCH

    def values(self, rows: Sequence[Row], now: datetime) -> Sent:
        """The values of every row, one row after the other, each in the order of `columns`; a row the
        same as stored as one before it is left out (MISSING).

        Each distinct time is sent as its text, made once a write: psycopg2 adapts a datetime
        parameter for 20,000 instructions, a string for 7,000, and a cycle's rows share their two
        times (a cycle's 3 rows: 60,000 instructions less, 5 % of the cycle). One pass over the rows,
        without a comprehension per row (in Python 3.11 each is a function made and called): this
        runs every cycle."""
        texts: dict[datetime, str] = {}
        stamps = []
        for stored in self._stamps:  # set by the write: the same for every row
            stamps.append(str(stored(now)))
        convert, extras, n_extra, n_key = self._convert, self._extras, len(EXTRA), len(KEY)
        key_times, report_at = self._key_times, self._report_at
        some_extra = extras is None or bool(extras)
        params: list[Any] = []
        times: list[datetime] = []
        seen = set()
        for row in rows:
            key: list[Any] = [*row[:n_key]]
            for at, stored in convert:
                key[at] = stored(key[at])
            one = tuple(key)
            if one in seen:  # the same row as stored as one before it: sent once (MISSING)
                continue
            seen.add(one)
            times.append(key[report_at])
            for at in key_times:
                when = key[at]
                text = texts.get(when)
                if text is None:
                    text = texts[when] = str(when)  # ISO 8601, `+00:00` when aware: any DateStyle reads it
                key[at] = text
            params += key
            params += stamps
            if some_extra:
                extra = row.extra
                if len(extra) < n_extra:  # a row spooled before the column existed: NULL
                    extra = (*extra, *[None] * (n_extra - len(extra)))
                params += extra if extras is None else [extra[at] for at in extras]
        return Sent(params, times)

    def stripes(self, sent: Sent) -> list[int]:
        """The lock stripes of rows as sent (their report_times as stored)."""
        return lock_keys(sent.times)

    def filling(self, sent: Sent, known: bool = True) -> tuple[str, str, str, str, str, str, str, str]:
        """What a write of rows as sent fills into its statement's slots (Stated), in SLOTS' order: its lock
        statement, the seconds of its first and last report_time (as stored), what it reads (the
        partition they fall in, where `known`), RETURNING where the rows go into it through the table, and
        where they go into it (GUARD) the table's lock, it, and the guard; else the table and nothing."""
        times = sent.times
        earliest, latest = min(times), max(times)
        first, last = earliest - self._epoch, latest - self._epoch  # whole days and seconds: no division
        read = target = self._whole
        returning = hold = guard = ""
        if self._lowers and known:  # the partition holding the first row, if it holds the last one too
            at = bisect_right(self._lowers, earliest) - 1
            if at >= 0 and latest < self._uppers[at]:
                read, guard = self._names[at], self._guards[at]
                if guard:
                    hold, target = self._holds[at], read
                else:
                    returning = RETURNING
        return (self.lock(lock_keys(times)), str(first.days * 86400 + first.seconds - 1),
                str(last.days * 86400 + last.seconds + 2), read, returning, hold, target, guard)

    def lock(self, stripes: Sequence[int]) -> str:
        """The statement that takes these stripes' advisory locks (ascending), in the table's space."""
        if len(stripes) == 1:
            return self._lock_one[0] + str(stripes[0]) + self._lock_one[1]
        return self._lock[0] + ",".join(map(str, stripes)) + self._lock[1]


def _as_it_is(value: datetime) -> datetime:
    return value


class Partition(NamedTuple):
    """A partition a write may read instead of the table: from `lower` (inclusive) to `upper`, as the
    report_time column holds them, its name as SQL, its oid (RETURNING, GUARD), and whether rows may go
    into it (GUARD)."""

    lower: datetime
    upper: datetime
    name: str
    oid: int
    direct: bool = False


def _partitions(cur: Any, table: str, report_type: str, direct: bool = False) -> list[Partition]:
    """The partitions of `table` a write may read instead of it (PARTITIONS), and whether it may write into
    each (where `direct`: the table allows it); none where a bound cannot be read back as a time (the table
    is read then, as before)."""
    if report_type not in ("timestamp", "timestamptz"):
        return []
    version = cur.connection.server_version
    pending = PENDING if version >= 140000 else ""
    into = NEWEST_DIRECT.format(newest=NEWEST, direct=DIRECT) if direct and version >= 120000 else "false"
    try:
        cur.execute(sql.SQL(PARTITIONS).format(type=sql.SQL(report_type), pending=sql.SQL(pending),
                                               direct=sql.SQL(into)), (table,))
        found = cur.fetchall()
    except (psycopg2.DataError, psycopg2.ProgrammingError, psycopg2.NotSupportedError, ValueError, OverflowError):
        return []  # a bound PostgreSQL prints but does not read back (autocommit: nothing else undone)
    zone = timezone.utc if report_type == "timestamptz" else None
    least, most = datetime.min.replace(tzinfo=zone), datetime.max.replace(tzinfo=zone)
    parts = []
    for name, oid, lower, upper, into in found:
        parts.append(Partition(least if lower is None else lower, most if upper is None else upper, name, int(oid),
                               bool(into)))
    return parts
