"""The table's DDL and indexes (derived from heartbeat.COLUMNS), the column lookup writer and ledger share,
and the one way heartbeatd runs DDL: lock waits bounded, cancelled on the server, the holder named."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, NamedTuple, Optional, Sequence, TypeVar

import psycopg2
from psycopg2 import sql

from heartbeatd.heartbeat import COLUMNS, LATENCY
from heartbeatd.pg import deadline, reason

TABLE_DDL = ("CREATE TABLE IF NOT EXISTS {table} (\n    id           bigserial PRIMARY KEY,\n"
             + ",\n".join(f"    {c.name:<12} {c.ddl}" for c in COLUMNS if c.kind != "extra")
             + "\n);\n")
# `init-db --partitioned`: the same columns, partitioned by report_time (a primary key must hold the partition key).
PARTITIONED_DDL = ("CREATE TABLE IF NOT EXISTS {table} (\n    id           bigserial,\n"
                   + ",\n".join(f"    {c.name:<12} {c.ddl}" for c in COLUMNS if c.kind != "extra")
                   + ",\n    PRIMARY KEY (id, report_time)\n) PARTITION BY RANGE (report_time);\n")
PARTITION = "CREATE TABLE {partition} PARTITION OF {table} FOR VALUES FROM ({start}) TO ({end})"
DEFAULT_PARTITION = "CREATE TABLE {partition} PARTITION OF {table} DEFAULT"
# The table's DEFAULT partition, if it has one: its schema and name.
DEFAULT_OF = """SELECT n.nspname, c.relname FROM pg_catalog.pg_partitioned_table k
  JOIN pg_catalog.pg_class c ON c.oid = k.partdefid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE k.partrelid = pg_catalog.to_regclass(%s)"""
# The DEFAULT partition's rows of a partition's range: where it holds some, PostgreSQL refuses the partition
# ("updated partition constraint for default partition ... would be violated"), so they are moved into it.
IN_DEFAULT = "SELECT count(*) FROM {default} WHERE report_time >= %(start)s AND report_time < %(end)s"
# Moving them, in one transaction: the table locked first (as CREATE TABLE ... PARTITION OF locks it, so no
# write or read sees the rows in neither or both, and a write waits as it would for that CREATE, bounded by
# its own timeout), then the DEFAULT partition (writes go parent first, then partition, so the order never
# deadlocks with them); the DEFAULT's rows of the range deleted into a temporary table, the partition made,
# then the rows written again through the table, which puts them in it. Each row is a DELETE and an INSERT
# of the table's: what a logical replication publication sends, a trigger or an audit sees (found in review:
# moved into a table not yet attached, a subscriber got the DELETEs and never the INSERTs). MOVING: where
# the rows begin to move, every lock had; from there the server ends what the deadline does not allow.
MOVE_INTO = ("LOCK TABLE ONLY {table} IN ACCESS EXCLUSIVE MODE",
             "LOCK TABLE {default} IN ACCESS EXCLUSIVE MODE",
             # The stored columns only, as the table's types, nothing else of it (a NOT NULL of a generated
             # column would refuse the copy); in pg_temp, whatever the search_path holds.
             "CREATE TEMPORARY TABLE pg_temp.heartbeatd_moving ON COMMIT DROP AS SELECT {columns} FROM ONLY {table} "
             "WITH NO DATA",
             "WITH moved AS (DELETE FROM {default} WHERE report_time >= %(start)s AND report_time < %(end)s "
             "RETURNING {columns}) INSERT INTO pg_temp.heartbeatd_moving ({columns}) SELECT {columns} FROM moved",
             "CREATE TABLE {partition} PARTITION OF {table} FOR VALUES FROM ({start}) TO ({end})",
             "INSERT INTO {table} ({columns}) OVERRIDING SYSTEM VALUE SELECT {columns} FROM pg_temp.heartbeatd_moving")
MOVING = 3
TAKEN = len(MOVE_INTO) - 1  # the INSERT: the table must take back every row (a trigger may drop some)
QUERY_CANCELED = "57014"  # the statement_timeout MOVE_INTO sets
# Whether this role may do what the table's owner may (CREATE TABLE ... PARTITION OF needs it), and make
# the temporary table (TEMPORARY on the database: some hardening takes it from PUBLIC).
OWNED = """SELECT pg_catalog.pg_has_role(c.relowner, 'USAGE'),
       pg_catalog.has_database_privilege(pg_catalog.current_database(), 'TEMPORARY')
  FROM pg_catalog.pg_class c WHERE c.oid = pg_catalog.to_regclass(%s)"""
# The columns a row is written with (not a generated one's).
STORED_COLUMNS = """SELECT a.attname FROM pg_catalog.pg_attribute a WHERE a.attrelid = pg_catalog.to_regclass(%s)
   AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum"""
# Each partition's bounds (NULL where not a plain FROM (...) TO (...) range, MINVALUE say), in UTC: what says
# whether the table is partitioned by day or by month.
BOUNDS = """SELECT c.relname,
       substring(pg_catalog.pg_get_expr(c.relpartbound, 0) FROM $$FROM \\('(.*)'\\) TO$$)::{type}{utc},
       substring(pg_catalog.pg_get_expr(c.relpartbound, 0) FROM $$TO \\('(.*)'\\)$$)::{type}{utc}
  FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
 WHERE i.inhparent = pg_catalog.to_regclass(%(t)s)"""
# A partition (by any name: pg_partman's too) already covering part of [start, end).
# A partition's bound is read with pg_get_expr(relpartbound, 0): its constants need no relation to be
# shown, and with the partition's oid PostgreSQL locks it, so a session holding one (a long ALTER, a
# DETACH) would hold up prune and status.
COVERED = """SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
 WHERE i.inhparent = pg_catalog.to_regclass(%(t)s)
   AND substring(pg_catalog.pg_get_expr(c.relpartbound, 0) FROM $$FROM \\('(.*)'\\) TO$$)::{type} < %(end)s
   AND substring(pg_catalog.pg_get_expr(c.relpartbound, 0) FROM $$TO \\('(.*)'\\)$$)::{type} > %(start)s)"""
# The pg_partman extension's schema, if installed: a table in its part_config has its partitions made by
# pg_partman, which finds them by its own names (<table>_p2026_12_06): one of ours there breaks its
# run_maintenance() ("timestamp out of range" in show_partitions), for every table it manages.
PARTMAN_SCHEMA = """SELECT n.nspname FROM pg_catalog.pg_extension e
  JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'pg_partman'"""
PARTMAN_MANAGED = "SELECT EXISTS (SELECT 1 FROM {config} WHERE parent_table = %(t)s)"
# pg_partman's schema, and whether this role may read its part_config: by oid, since a name (even in
# has_table_privilege or to_regclass) is looked up in its schema, which without USAGE raises 42501.
PARTMAN_READABLE = """SELECT n.nspname, c.oid IS NOT NULL AND pg_catalog.has_schema_privilege(n.oid, 'USAGE')
       AND pg_catalog.has_table_privilege(c.oid, 'SELECT')
  FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
  LEFT JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = 'part_config' AND c.relkind = 'r'
 WHERE e.extname = 'pg_partman'"""
AHEAD = {"day": 7, "month": 2}  # partitions made beyond the current one
# The table's SELECT and INSERT grants that one of its partitions lacks (grants on a table do not reach
# its partitions): init-db --partitioned and prune give them, so a role that may write the table reads
# the partition a write's rows fall in and writes into it (writer.PARTITIONS, writer.GUARD: as cheap as a
# plain table's, whatever the number of partitions). Not on a table with row security: its partitions
# read or written by themselves would pass by its policies. Each partition and privilege with whether
# this role may grant on it (a member of its owner's role: a partition another role attached is left as
# it is, and said).
UNSHARED = """SELECT pg_catalog.format('%%I.%%I', n.nspname, c.relname), pg_catalog.pg_has_role(c.relowner, 'USAGE'),
       g.privilege_type,
       pg_catalog.string_agg(CASE WHEN g.grantee = 0 THEN 'PUBLIC'
                                  ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(g.grantee)) END, ', ')
  FROM pg_catalog.pg_class t
 CROSS JOIN LATERAL pg_catalog.aclexplode(t.relacl) g
  JOIN pg_catalog.pg_inherits i ON i.inhparent = t.oid
  JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE t.oid = pg_catalog.to_regclass(%s) AND g.privilege_type IN ('SELECT', 'INSERT') AND g.grantee <> t.relowner
   AND NOT t.relrowsecurity AND c.relkind IN ('r', 'p')
   AND NOT EXISTS (SELECT 1 FROM pg_catalog.aclexplode(c.relacl) x
                    WHERE x.grantee = g.grantee AND x.privilege_type = g.privilege_type)
 GROUP BY 1, 2, 3 ORDER BY 3 DESC, 1"""
# Whether the table is partitioned by RANGE (report_time) alone, and its partitions' names (prune: is it ours).
RANGE_BY_TIME = """SELECT k.partstrat = 'r' AND k.partnatts = 1 AND a.attname = 'report_time'
  FROM pg_catalog.pg_partitioned_table k
  JOIN pg_catalog.pg_attribute a ON a.attrelid = k.partrelid AND a.attnum = k.partattrs[0]
 WHERE k.partrelid = pg_catalog.to_regclass(%s)"""
PARTITION_KEY = """SELECT pg_catalog.pg_get_partkeydef(k.partrelid) FROM pg_catalog.pg_partitioned_table k
 WHERE k.partrelid = pg_catalog.to_regclass(%s)"""
# What packaging/schema.sql gives for applying by hand (init-db runs the same, step by step).
CREATE_TABLE = TABLE_DDL + "CREATE INDEX IF NOT EXISTS {index} ON {table} (service_name, report_time);\n"
# What `heartbeatd status` and `report` read by: latest per (service, ip) in milliseconds.
PAIR_INDEX = "CREATE INDEX {concurrently} IF NOT EXISTS {index} ON {table} (service_name, ip_address, report_time)"
INDEX = "CREATE INDEX {concurrently} {index} ON {only} {table} USING {method} ({columns})"

T = TypeVar("T")


class Index(NamedTuple):
    """An index init-db makes on the table: its name's suffix, its columns, its access method."""

    suffix: str
    columns: tuple[str, ...]
    method: str = "btree"


INDEXES = (Index("service_name_report_time_idx", ("service_name", "report_time")),  # the application's reads
           Index("service_ip_time_idx", ("service_name", "ip_address", "report_time")),  # status, report
           # `heartbeatd rollup` finds new rows by created_at: a BRIN index is a few pages, costs an INSERT
           # next to nothing, and fits a heap appended in created_at order (late rows too: appended now).
           Index("created_at_brin", ("created_at",), "brin"))
RELATION = """SELECT c.relkind, n.nspname, c.relname FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = pg_catalog.to_regclass(%s)"""
CHILDREN = """SELECT c.relkind, n.nspname, c.relname FROM pg_catalog.pg_inherits i
  JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE i.inhparent = pg_catalog.to_regclass(%s) ORDER BY c.relname"""
# The index by that name: valid, and on this table (a name taken by another table's index is not ours).
INDEX_STATE = """SELECT i.indisvalid, i.indrelid = pg_catalog.to_regclass(%s) FROM pg_catalog.pg_index i
 WHERE i.indexrelid = pg_catalog.to_regclass(%s)"""
# A partition's index already attached to the parent's (PostgreSQL makes one for a partition created later).
ATTACHED = """SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits h JOIN pg_catalog.pg_index x ON x.indexrelid = h.inhrelid
 WHERE h.inhparent = pg_catalog.to_regclass(%s) AND x.indrelid = pg_catalog.to_regclass(%s))"""
HAS_ROWS = "SELECT EXISTS (SELECT 1 FROM {table})"
# Nullable, no default: PostgreSQL only records it in the catalog, however many rows there are.
ADD_COLUMN = "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {ddl}"
# The type's name, and the type as declared (format_type with the column's typmod:
# `timestamp(0) without time zone`), which is what a value must be cast to to compare as stored.
# Each column's type as declared, and the type under it where that is a domain (a domain over
# `timestamptz(0)` holds aware times, rounded to the second: what a value is sent as follows the
# base type and its digits; the cast goes to the domain as declared, its checks with it).
COLUMN_TYPES = """\
WITH RECURSIVE col AS (
  SELECT a.attname, a.atttypid AS typid, a.atttypmod AS typmod,
         pg_catalog.format_type(a.atttypid, a.atttypmod) AS declared
    FROM pg_catalog.pg_attribute a
   WHERE a.attrelid = pg_catalog.to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
  SELECT c.attname, d.typbasetype, CASE WHEN c.typmod >= 0 THEN c.typmod ELSE d.typtypmod END, c.declared
    FROM col c JOIN pg_catalog.pg_type d ON d.oid = c.typid AND d.typtype = 'd'
)
SELECT c.attname, t.typname, c.declared, c.typmod
  FROM col c JOIN pg_catalog.pg_type t ON t.oid = c.typid AND t.typtype <> 'd'"""
LOCK_TIMEOUT = "SET lock_timeout = %s"
# Who a waiting backend waits for, with the first words of what they run.
BLOCKERS = """SELECT b.pid, coalesce(a.query, '') FROM unnest(pg_catalog.pg_blocking_pids(%s)) AS b(pid)
  LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = b.pid ORDER BY b.pid"""
CANCEL = "SELECT pg_catalog.pg_cancel_backend(%s)"
WAITING = "SELECT count(*) FROM pg_catalog.pg_locks WHERE pid = %s AND NOT granted"
# Building an index over millions of rows takes minutes, not HEARTBEAT_TIMEOUT; still bounded.
INDEX_TIMEOUT = 3600.0
NAME_BYTES = 63  # PostgreSQL cuts longer identifiers (NAMEDATALEN - 1)


class DdlFailed(Exception):
    """A DDL statement did not complete; the text is one line for the operator, `pgcode` the server's
    SQLSTATE where the server refused it (None: a lock not had, the server gone)."""

    def __init__(self, text: str, pgcode: Optional[str] = None) -> None:
        super().__init__(text)
        self.pgcode = pgcode


class NotMade(NamedTuple):
    """A partition init-db --partitioned or prune could not make: why, what happens to the rows meanwhile,
    and what the operator does ("": the server's reason says it)."""

    why: str
    meanwhile: str
    todo: str

    def line(self) -> str:
        return f"{self.why}; {self.meanwhile}" + (f" ({self.todo})" if self.todo else "")


class PartitionsNotMade(Exception):
    """init-db made what it could, all but these partitions (`done`: what it did say)."""

    def __init__(self, done: list[str], failed: list[NotMade]) -> None:
        super().__init__("; ".join(f.why for f in failed))
        self.done, self.failed = done, failed


def object_name(table_name: str, suffix: str) -> str:
    """`<table>_<suffix>`, or when that is too long, the table's name cut, a hash of the whole, and the suffix."""
    full = f"{table_name}_{suffix}"
    if len(full.encode()) <= NAME_BYTES:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    room = NAME_BYTES - len(suffix.encode()) - len(digest) - 2
    head = table_name.encode()[:room].decode(errors="ignore")  # never half a character
    return f"{head}_{digest}_{suffix}"


def index_name(table: Sequence[str]) -> str:
    """The name init-db gives the (service_name, report_time) index."""
    return object_name(table[-1], INDEXES[0].suffix)


def pair_index_name(table: Sequence[str]) -> str:
    """The name init-db gives the (service_name, ip_address, report_time) index the read side uses."""
    return object_name(table[-1], INDEXES[1].suffix)


class ColumnType(NamedTuple):
    """A column's type: its name (`timestamp`), as declared (`timestamp(0) without time zone`), its typmod."""

    name: str
    declared: str
    typmod: int  # -1 when the type has none (`timestamp` alone: 6 digits of fraction)
    # For a domain: `name` and `typmod` are those of the type under it, `declared` the domain's name.


def declared_types(cur: Any, table: sql.Identifier) -> dict[str, ColumnType]:
    """The table's columns and their types; empty if it does not exist."""
    cur.execute(COLUMN_TYPES, (table.as_string(cur),))
    return {name: ColumnType(typ, declared, typmod) for name, typ, declared, typmod in cur.fetchall()}


def column_types(cur: Any, table: sql.Identifier) -> dict[str, str]:
    """The table's columns and their type names (`timestamp`, `timestamptz`, ...); empty if it does not exist."""
    return {name: typ.name for name, typ in declared_types(cur, table).items()}


def _words(query: str, count: int = 8) -> str:
    words = query.split()
    return " ".join(words[:count]) + (" …" if len(words) > count else "")


def give_up(helper: Optional[Callable[[], Any]], pid: int, seconds: float) -> str:
    """Cancel backend `pid`'s statement from a second connection; who it was waiting for, in words.

    Our own connection is closed by then (psycopg2 closes it when a wait is cut short), but its
    backend goes on waiting for the lock, and every later request queues behind it: so cancel it,
    and wait until it no longer waits.
    """
    if helper is None:
        return "(no second connection to cancel it with)"
    try:
        with deadline(seconds):
            other = helper()
            try:
                with other.cursor() as cur:
                    cur.execute(BLOCKERS, (pid,))
                    held = cur.fetchall()
                    cur.execute(CANCEL, (pid,))
                    for _ in range(100):  # the cancel is a signal: it lands within milliseconds
                        cur.execute(WAITING, (pid,))
                        if not cur.fetchone()[0]:
                            break
                        time.sleep(0.01)
            finally:
                other.close()
    except Exception as exc:  # noqa: BLE001 - the operator still gets the line about the DDL
        return f"(could not cancel it or ask who held the lock: {reason(exc)})"
    if not held:
        return "(no lock holder: the server was slow or did not answer)"
    return "held by " + "; ".join(f"pid {pid} ({_words(query)})" for pid, query in held)


def run_ddl(conn: Any, statement: sql.Composable, what: str, seconds: float,
            helper: Optional[Callable[[], Any]]) -> None:
    """One DDL statement on an autocommit connection, ended by `seconds`, its lock waits too (run_locking)."""
    run_locking(conn, lambda cur: cur.execute(statement), what, seconds, helper)


def run_locking(conn: Any, work: Callable[[Any], T], what: str, seconds: float,
                helper: Optional[Callable[[], Any]]) -> T:
    """`work` on a cursor of an autocommit connection, ended by `seconds`, its lock waits too: a DDL, or a
    read that a partition's lock may hold up (prune's).

    The server's lock_timeout is a second longer than ours, so a client killed while it waits
    leaves no request queued for long; while we live, we give up first, cancel the statement on
    the server and say who held the table (DdlFailed). Ctrl-C cancels it the same way.
    """
    pid = conn.get_backend_pid()
    try:
        with deadline(seconds), conn.cursor() as cur:
            cur.execute(LOCK_TIMEOUT, (f"{int((seconds + 1) * 1000)}ms",))
            return work(cur)
    except KeyboardInterrupt:
        give_up(helper, pid, 5.0)
        raise
    except psycopg2.Error as exc:
        if not conn.closed:  # the server's own answer: an error of the statement, said as it is
            raise DdlFailed(f"{what}: {reason(exc)}", exc.pgcode) from None
        held = give_up(helper, pid, seconds)
        raise DdlFailed(f"{what}: gave up after {seconds:g}s; {held}") from None


@dataclass(frozen=True)
class Relation:
    """A table or one of its partitions: kind (`r` plain, `p` partitioned, `f` foreign), schema, name."""

    kind: str
    schema: str
    name: str

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    def index(self, suffix: str) -> sql.Identifier:
        """Its index of that suffix, schema-qualified (an index lives in its table's schema)."""
        return sql.Identifier(self.schema, object_name(self.name, suffix))


class _Init:
    """init-db's steps on one autocommit connection: every DDL through run_ddl, every look-up bounded."""

    def __init__(self, conn: Any, timeout: float, helper: Optional[Callable[[], Any]]) -> None:
        self.conn, self.timeout, self.helper = conn, timeout, helper
        self.done: list[str] = []
        self.failed: list[NotMade] = []  # partitions not made (init-db --partitioned goes on, then fails)
        self.concurrently = False  # some index was built CONCURRENTLY (the table held rows)
        self.split = False  # an index was made ON ONLY a partitioned table, then partition by partition

    def fetch(self, query: str, *idents: sql.Composable) -> list[Any]:
        with deadline(self.timeout), self.conn.cursor() as cur:
            cur.execute(query, tuple(i.as_string(cur) for i in idents))
            return list(cur.fetchall())

    def fetch_with(self, query: sql.Composable, params: dict[str, Any]) -> list[Any]:
        with deadline(self.timeout), self.conn.cursor() as cur:
            cur.execute(query, params)
            return list(cur.fetchall())

    def relation(self, ident: sql.Identifier) -> Optional[Relation]:
        found = self.fetch(RELATION, ident)
        return Relation(*found[0]) if found else None

    def children(self, rel: Relation) -> list[Relation]:
        return [Relation(*row) for row in self.fetch(CHILDREN, rel.ident)]

    def state(self, rel: Relation, suffix: str) -> Optional[bool]:
        """True: the index is there and valid; False: there but invalid; None: missing."""
        found = self.fetch(INDEX_STATE, rel.ident, rel.index(suffix))
        if found and not found[0][1]:
            raise DdlFailed(f"index name {object_name(rel.name, suffix)} is taken by another table's index")
        return bool(found[0][0]) if found else None

    def ddl(self, statement: sql.Composable, what: str, seconds: Optional[float] = None) -> None:
        run_ddl(self.conn, statement, what, seconds or self.timeout, self.helper)

    def create_table(self, ident: sql.Identifier, name: str) -> Relation:
        rel = self.relation(ident)
        if rel is None:  # CREATE TABLE IF NOT EXISTS alone would not tell us the table's shape
            self.ddl(sql.SQL(TABLE_DDL).format(table=ident), f"CREATE TABLE {name}")
            rel = self.relation(ident)
        assert rel is not None
        return rel

    def add_latency(self, rel: Relation) -> None:
        with deadline(self.timeout), self.conn.cursor() as cur:
            if LATENCY in column_types(cur, rel.ident):
                return
        ddl = next(c.ddl for c in COLUMNS if c.name == LATENCY)
        self.ddl(sql.SQL(ADD_COLUMN).format(table=rel.ident, column=sql.Identifier(LATENCY), ddl=sql.SQL(ddl)),
                 f"ALTER TABLE {rel.name} ADD COLUMN {LATENCY}")
        self.done.append(f"added column {LATENCY} {ddl}")

    def index(self, rel: Relation, index: Index) -> int:
        """Make the index valid; how many tables got a new one built (0: it was there)."""
        suffix = index.suffix
        state = self.state(rel, suffix)
        if state:
            return 0
        name = object_name(rel.name, suffix)
        has_rows = bool(self.fetch(sql.SQL(HAS_ROWS).format(table=rel.ident).as_string(self.conn))[0][0])
        if rel.kind == "p" and (has_rows or state is False):
            return self._partitioned(rel, index, state is None)
        if state is False:  # a CONCURRENTLY build that was interrupted
            self.ddl(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(rel.index(suffix)),
                     f"DROP INDEX {name}", INDEX_TIMEOUT)
        # On a table that already holds rows, CONCURRENTLY: the daemons go on writing meanwhile.
        self.ddl(self._create(rel, index, "CONCURRENTLY" if has_rows else "", ""),
                 f"CREATE INDEX {name}", INDEX_TIMEOUT if has_rows else None)
        self.concurrently = self.concurrently or has_rows
        return 1

    def _partitioned(self, rel: Relation, index: Index, missing: bool) -> int:
        """PostgreSQL builds no index CONCURRENTLY on a partitioned table: an index ON ONLY the parent
        (invalid, instantly), each partition's own built as for a table, each attached; the parent's is
        valid once every partition's is attached."""
        suffix = index.suffix
        name = object_name(rel.name, suffix)
        self.split = True
        if missing:
            self.ddl(self._create(rel, index, "", "ONLY"), f"CREATE INDEX {name} ON ONLY {rel.name}")
        built = 0
        for child in self.children(rel):
            if child.kind not in ("r", "p") or self.fetch(ATTACHED, rel.index(suffix), child.ident)[0][0]:
                continue  # a foreign table has no index; one attached already (made with the partition)
            built += self.index(child, index)
            self.ddl(sql.SQL("ALTER INDEX {} ATTACH PARTITION {}").format(rel.index(suffix), child.index(suffix)),
                     f"ALTER INDEX {name} ATTACH PARTITION {object_name(child.name, suffix)}")
        return built

    @staticmethod
    def _create(rel: Relation, index: Index, concurrently: str, only: str) -> sql.Composed:
        # CREATE INDEX takes the index's bare name: it goes into the table's schema.
        return sql.SQL(INDEX).format(concurrently=sql.SQL(concurrently), only=sql.SQL(only), table=rel.ident,
                                     index=sql.Identifier(object_name(rel.name, index.suffix)),
                                     method=sql.SQL(index.method),
                                     columns=sql.SQL(", ").join(map(sql.Identifier, index.columns)))


def _periods(unit: str, now: datetime) -> list[tuple[datetime, datetime]]:
    """The current day (or month) and AHEAD[unit] more, as [start, end) in UTC."""
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if unit == "month":
        start = start.replace(day=1)
    found = []
    for _ in range(AHEAD[unit] + 1):
        end = start + timedelta(days=1) if unit == "day" else (start + timedelta(days=32)).replace(day=1)
        found.append((start, end))
        start = end
    return found


def _partman_managed(work: _Init, rel: Relation) -> bool:
    """Whether pg_partman manages the table (it is in partman's part_config)."""
    found = work.fetch(PARTMAN_SCHEMA)
    if not found:
        return False
    config = sql.Identifier(found[0][0], "part_config")
    try:
        return bool(work.fetch_with(sql.SQL(PARTMAN_MANAGED).format(config=config),
                                    {"t": f"{rel.schema}.{rel.name}"})[0][0])
    except psycopg2.errors.InsufficientPrivilege:  # a role that may not read it: as before pg_partman
        return False


class Ahead(NamedTuple):
    """What _ahead did: the partitions made, lines on rows moved into them, and those not made."""

    made: list[str]
    moved: list[str]
    failed: list[NotMade]


# A partition refused for want of privilege: every one would be, and only the owner can make them.
AS_OWNER = "run prune, or init-db --partitioned, as the table's owner"
SLOW_MOVE = ("run prune, or init-db --partitioned, with a --timeout long enough to move them: the table is held "
             "meanwhile, its writes wait and are spooled")


def _ahead(work: _Init, rel: Relation, unit: str, now: datetime, dry_run: bool = False) -> Ahead:
    """The partitions of the current day (month) and AHEAD[unit] more that no partition covers, and the DEFAULT
    one if there is none, made (with dry_run: only named), each on its own: one the server refuses is said
    (`failed`) and the others still made. Rows the DEFAULT partition holds in a partition's range are moved
    into it (_make). init-db --partitioned and prune run this. A lock not had ends it (DdlFailed, its holder
    named): the connection is gone with the statement."""
    with deadline(work.timeout), work.conn.cursor() as cur:
        kind = "timestamptz" if column_types(cur, rel.ident).get("report_time") == "timestamptz" else "timestamp"
    found = work.fetch(DEFAULT_OF, rel.ident)
    default = Relation("r", *found[0]) if found else None
    done = Ahead([], [], [])
    for start, end in _periods(unit, now):
        bounds = {"t": rel.ident.as_string(work.conn), "start": start, "end": end} if kind == "timestamptz" else \
            {"t": rel.ident.as_string(work.conn), "start": start.replace(tzinfo=None), "end": end.replace(tzinfo=None)}
        if work.fetch_with(sql.SQL(COVERED).format(type=sql.SQL(kind)), bounds)[0][0]:
            continue
        part = object_name(rel.name, f"p{start:%Y%m%d}" if unit == "day" else f"p{start:%Y%m}")
        wanted = f"FOR VALUES FROM ('{bounds['start']}') TO ('{bounds['end']}')"  # as the operator would write it
        _attempt(work, rel, part, wanted, done, lambda: _make(work, rel, default, part, bounds, dry_run),
                 "the DEFAULT partition takes the rows meanwhile" if default else
                 "rows of its range are refused meanwhile")
    if default is None:
        part = object_name(rel.name, "default")

        def make_default() -> list[str]:
            if not dry_run:
                work.ddl(sql.SQL(DEFAULT_PARTITION).format(partition=sql.Identifier(rel.schema, part),
                                                           table=rel.ident),
                         f"CREATE TABLE {part} PARTITION OF {rel.name} DEFAULT")
            return []

        _attempt(work, rel, part, "DEFAULT", done, make_default, "rows no partition covers are refused meanwhile")
    return done


def _attempt(work: _Init, rel: Relation, part: str, wanted: str, done: Ahead,
             make: Callable[[], list[str]], meanwhile: str) -> None:
    """One partition made by `make` (which says what rows it moved), or why not in done.failed. A name held
    by another table (one detached, say) is said with what to do: CREATE TABLE ... PARTITION OF would say
    only that it exists, and the DEFAULT's IF NOT EXISTS nothing at all."""
    if work.relation(sql.Identifier(rel.schema, part)) is not None:
        done.failed.append(NotMade(
            f"{part} exists and is not {rel.name}'s partition {wanted} (one detached, or another table)", meanwhile,
            f"attach it, ALTER TABLE {rel.name} ATTACH PARTITION {part} {wanted}, or drop it; then run "
            "init-db --partitioned again"))
        return
    try:
        moved = make()
    except DdlFailed as exc:
        if work.conn.closed:  # a lock not had: the connection went with the statement
            raise
        done.failed.append(NotMade(str(exc), meanwhile, AS_OWNER if exc.pgcode == "42501" else
                                   SLOW_MOVE if exc.pgcode == QUERY_CANCELED else ""))
        return
    done.made.append(part)
    done.moved.extend(moved)


def _make(work: _Init, rel: Relation, default: Optional[Relation], part: str, bounds: dict[str, Any],
          dry_run: bool) -> list[str]:
    """One partition of [start, end) made; where the DEFAULT partition holds rows of that range, they are moved
    into it in the same transaction (MOVE_INTO: nothing lost, nothing doubled), as pg_partman's partition_data
    does. The line saying so, if any."""
    what = f"CREATE TABLE {part} PARTITION OF {rel.name}"
    ident = sql.Identifier(rel.schema, part)
    start, end = sql.Literal(bounds["start"]), sql.Literal(bounds["end"])
    rows = 0
    if default is not None:  # read under the lock timeout: a session holding the DEFAULT would hold it up
        rows = run_locking(work.conn, lambda cur: _count(cur, sql.SQL(IN_DEFAULT).format(default=default.ident),
                                                           bounds), what, work.timeout, work.helper)
    if not rows:
        if not dry_run:
            work.ddl(sql.SQL(PARTITION).format(partition=ident, table=rel.ident, start=start, end=end), what)
        return []
    assert default is not None
    shown = default.name if default.schema == rel.schema else f"{default.schema}.{default.name}"
    if dry_run:
        return [f"would move {rows} row(s) from the DEFAULT partition {shown} into {part}"]
    owner, temporary = work.fetch(OWNED, rel.ident)[0]  # asked before the table is held
    if not owner:  # the CREATE would refuse it at the end
        raise DdlFailed(f"{what}: permission denied: moving the DEFAULT partition's {rows} row(s) of its range "
                        f"into it needs the owner of table {rel.name}", "42501")
    if not temporary:
        raise DdlFailed(f"{what}: permission denied: moving the DEFAULT partition's {rows} row(s) of its range "
                        "into it needs the TEMPORARY privilege on the database (GRANT TEMPORARY ON DATABASE ... "
                        "TO this role)")
    columns = sql.SQL(", ").join(sql.Identifier(row[0]) for row in work.fetch(STORED_COLUMNS, rel.ident))
    statements = [sql.SQL(text).format(partition=ident, table=rel.ident, default=default.ident, columns=columns,
                                       start=start, end=end) for text in MOVE_INTO]
    began = time.monotonic()
    step = [0]  # the statement under way (a cancel before MOVING is not the move's deadline)

    def move(cur: Any) -> tuple[int, int]:
        cur.execute("BEGIN")
        try:
            moved = taken = 0
            for n, statement in enumerate(statements):
                step[0] = n
                if n >= MOVING:  # ended by the server, which keeps the connection (and prune's lock on it)
                    left = work.timeout * 0.9 - (time.monotonic() - began)
                    cur.execute("SET LOCAL statement_timeout = %s", (f"{max(1, int(left * 1000))}ms",))
                cur.execute(statement, bounds)
                moved = cur.rowcount if n == MOVING else moved  # the rows the DELETE gave the temporary table
                taken = cur.rowcount if n == TAKEN else taken  # those the table took back
            cur.execute("COMMIT" if taken == moved else "ROLLBACK")
            return moved, taken
        except psycopg2.Error:
            if not cur.connection.closed:  # the server's refusal: the transaction undone, nothing moved
                cur.execute("ROLLBACK")
            raise

    try:
        moved, taken = run_locking(work.conn, move, f"{what} (moving the DEFAULT partition's {rows} row(s) of its "
                                   "range)", work.timeout, work.helper)
    except DdlFailed as exc:
        if exc.pgcode != QUERY_CANCELED or step[0] < MOVING or work.conn.closed:
            raise
        raise DdlFailed(f"{what}: moving the DEFAULT partition {shown}'s {rows} row(s) of its range did not finish "
                        f"within {work.timeout:g}s (HEARTBEAT_TIMEOUT, or --timeout): nothing moved", exc.pgcode) from None
    if taken != moved:
        raise DdlFailed(f"{what}: the table took back {taken} of the DEFAULT partition {shown}'s {moved} row(s) of "
                        "its range (a trigger on INSERT that drops rows?): nothing moved")
    return [f"moved {moved} row(s) from the DEFAULT partition {shown} into {part}"]


def _count(cur: Any, query: sql.Composable, params: dict[str, Any]) -> int:
    cur.execute(query, params)
    return int(cur.fetchone()[0])


def _share_grants(work: _Init, rel: Relation) -> list[str]:
    """The table's SELECT and INSERT grants given to each partition that lacks them (UNSHARED), each on its
    own: what was done, a line a privilege, and one for each partition that could not be given one (the
    rest go on)."""
    granted: dict[str, list[str]] = {}
    said = []
    for part, ours, privilege, grantees in work.fetch(UNSHARED, rel.ident):  # names quoted by the server
        if not ours:
            said.append(f"{privilege} not granted on partition {part} as on table {rel.schema}.{rel.name}: "
                        "owned by another role")
            continue
        try:
            work.ddl(sql.SQL("GRANT {} ON {} TO {}").format(sql.SQL(privilege), sql.SQL(part), sql.SQL(grantees)),
                     f"GRANT {privilege} ON {part}")
            granted.setdefault(privilege, []).append(part)
        except DdlFailed as exc:
            if work.conn.closed:  # a lock not had: the connection is gone, as for any DDL
                raise
            said.append(f"{privilege} not granted on partition {part} as on table {rel.schema}.{rel.name}: {exc}")
    return [f"granted {privilege} on partition(s) {', '.join(parts)} as on table {rel.schema}.{rel.name}"
            for privilege, parts in granted.items()] + said


def _unit(work: _Init, rel: Relation) -> Optional[str]:
    """"day" or "month" where the table is one init-db --partitioned made: partitioned by RANGE (report_time)
    alone, with a partition named as init-db names them; its unit read from the partitions' bounds
    (_bounds_unit), else from the newest name. None otherwise."""
    if not _range_by_time(work, rel):
        return None
    named = _unit_of(rel.name, [child.name for child in work.children(rel)])
    return named and (_bounds_unit(work, rel)[0] or named)


def _range_by_time(work: _Init, rel: Relation) -> bool:
    found = work.fetch(RANGE_BY_TIME, rel.ident)
    return bool(found and found[0][0])


def _bounds_unit(work: _Init, rel: Relation) -> tuple[Optional[str], Optional[str]]:
    """The unit of the table's partitions by their bounds, and the partition that says it: the newest (by its
    upper bound) of those that span one whole UTC day or one whole UTC month, whatever their names (an
    operator's or another tool's partitions count as init-db's do); (None, None) where none does."""
    with deadline(work.timeout), work.conn.cursor() as cur:
        timestamptz = column_types(cur, rel.ident).get("report_time") == "timestamptz"
    found = work.fetch_with(sql.SQL(BOUNDS).format(type=sql.SQL("timestamptz" if timestamptz else "timestamp"),
                                                   utc=sql.SQL(" AT TIME ZONE 'UTC'" if timestamptz else "")),
                            {"t": rel.ident.as_string(work.conn)})
    units = []
    for name, low, high in found:
        if low is None or high is None or low != low.replace(hour=0, minute=0, second=0, microsecond=0):
            continue
        if high == low + timedelta(days=1):
            units.append((high, "day", name))
        elif low.day == 1 and high == (low + timedelta(days=32)).replace(day=1):
            units.append((high, "month", name))
    return max(units)[1:] if units else (None, None)


def _unit_of(name: str, children: Sequence[str]) -> Optional[str]:
    units = []
    for child in children:
        digits = child.rsplit("_p", 1)[-1]
        if digits.isdigit() and len(digits) in (6, 8) and child == object_name(name, f"p{digits}"):
            units.append((digits.ljust(8, "0"), "day" if len(digits) == 8 else "month"))
    return max(units)[1] if units else None


def partition_maker(cur: Any, table: sql.Identifier) -> tuple[Optional[str], Optional[str]]:
    """Who makes a partitioned table's partitions ahead, read on `cur` (read-only, no statement that can fail
    on privileges): ("pg_partman", its schema) where pg_partman manages the table; ("heartbeatd", None) where
    init-db --partitioned made it (prune makes them); ("pg_partman?", its schema) where pg_partman is installed
    but this role may not read its part_config (it may manage the table); (None, None) otherwise: nobody but
    the operator."""
    cur.execute(RELATION, (table.as_string(cur),))
    found = cur.fetchone()
    if found is None:
        return None, None
    rel = Relation(*found)
    cur.execute(PARTMAN_READABLE)
    partman = cur.fetchone()
    if partman is not None:
        config = sql.Identifier(partman[0], "part_config")
        if not partman[1]:
            return "pg_partman?", str(partman[0])
        cur.execute(sql.SQL(PARTMAN_MANAGED).format(config=config), {"t": f"{rel.schema}.{rel.name}"})
        if cur.fetchone()[0]:
            return "pg_partman", str(partman[0])
    cur.execute(RANGE_BY_TIME, (table.as_string(cur),))
    ranged = cur.fetchone()
    if not ranged or not ranged[0]:
        return None, None
    cur.execute(CHILDREN, (table.as_string(cur),))
    return ("heartbeatd" if _unit_of(rel.name, [row[2] for row in cur.fetchall()]) else None), None


def partitions_ahead(conn: Any, table: Sequence[str], timeout: float, now: datetime, dry_run: bool = False,
                     helper: Optional[Callable[[], Any]] = None
                     ) -> Optional[tuple[list[str], list[str], list[NotMade]]]:
    """prune's first step on a table init-db --partitioned made (not pg_partman's): the partitions ahead that
    are missing made, as init-db --partitioned makes them (dry_run: only named), then the table's SELECT
    grants given to the partitions that lack them (not with dry_run), whatever partitions could not be made;
    the names made, the lines the rows moved and the grants said, and the partitions not made (a role that
    does not own the table, say). None where the table is not such a table. DdlFailed: a lock not had."""
    work = _Init(conn, timeout, helper)
    rel = work.relation(sql.Identifier(*table))
    if rel is None or rel.kind != "p":
        return None
    unit = _unit(work, rel)
    if unit is None or _partman_managed(work, rel):
        return None
    done = _ahead(work, rel, unit, now, dry_run)
    return done.made, done.moved + ([] if dry_run else _share_grants(work, rel)), done.failed


def _partitioned_table(work: _Init, ident: sql.Identifier, name: str, unit: str, now: datetime) -> Relation:
    """The table partitioned by report_time (made if missing, never converted), with partitions made ahead
    and a DEFAULT one that catches what no partition covers (those it could not make in work.failed)."""
    rel = work.relation(ident)
    if rel is None:
        unit = unit or "day"
        work.ddl(sql.SQL(PARTITIONED_DDL).format(table=ident), f"CREATE TABLE {name}")
        rel = work.relation(ident)
        work.done.append(f"created table {name} partitioned by range of report_time, a partition a {unit}")
    if rel is None or rel.kind != "p":
        raise DdlFailed(f"table {name} exists and is not partitioned; init-db never converts a table "
                        "(README: Partitioned table, for the steps of a live migration)")
    if _partman_managed(work, rel):
        work.done.append(f"table {name} is managed by pg_partman: its partitions are left to it "
                         "(partman.run_maintenance)")
        return rel
    if not _range_by_time(work, rel):  # a bound of ours would be refused by the key, or mean something else
        key = work.fetch(PARTITION_KEY, rel.ident)[0][0]
        raise DdlFailed(f"table {name} is partitioned by {key}, not by range of report_time alone: heartbeatd "
                        "makes no partition there and leaves them to the operator (run init-db without "
                        "--partitioned for its indexes)")
    existing, said_by = _bounds_unit(work, rel)
    unit = unit or existing or "day"
    if existing is not None and existing != unit:  # both would leave days (months) with no partition
        daily = {"day": "daily", "month": "monthly"}
        raise DdlFailed(f"table {name}'s partitions are {daily[existing]} ({said_by}), not {daily[unit]}: "
                        f"heartbeatd makes partitions of the table's own unit (init-db --partitioned={existing})")
    done = _ahead(work, rel, unit, now)
    if done.made:
        work.done.append(f"created partition(s) {', '.join(done.made)}")
    work.done += done.moved
    work.failed += done.failed
    work.done += _share_grants(work, rel)
    return rel


def init_db(conn: Any, table: Sequence[str], timeout: float, with_latency: bool = False,
            helper: Optional[Callable[[], Any]] = None, partitioned: Optional[str] = None) -> list[str]:
    """Create the table and its indexes if missing (idempotent), and the latency_ms column if asked; say what was
    created. Every index is checked to be there and valid before it returns; DdlFailed says why not.
    `partitioned` ("day" or "month"; "": the unit of the table's partitions, a day for a new table): a partitioned
    table, with partitions made ahead; PartitionsNotMade where some could not be (all else done)."""
    work = _Init(conn, timeout, helper)
    fresh = work.relation(sql.Identifier(*table)) is None
    if partitioned is not None:
        rel = _partitioned_table(work, sql.Identifier(*table), ".".join(table), partitioned,
                                 datetime.now(timezone.utc))
    else:
        rel = work.create_table(sql.Identifier(*table), ".".join(table))
    if with_latency:
        work.add_latency(rel)
    for index in INDEXES:
        name = object_name(rel.name, index.suffix)
        work.concurrently = work.split = False
        built = work.index(rel, index)
        if fresh and index == INDEXES[0]:
            continue  # part of the new table's DDL (as in schema.sql), not news
        if work.split and built:
            work.done.append(f"created index {name} on partitioned table {rel.name}: ON ONLY the table, then on "
                             f"{built} partition(s){' (CONCURRENTLY where they held rows)' if work.concurrently else ''}, "
                             "each attached")
        elif built:
            work.done.append(f"created index {name}" + (" concurrently" if work.concurrently else ""))
    for index in INDEXES:
        if not work.state(rel, index.suffix):
            raise DdlFailed(f"index {object_name(rel.name, index.suffix)} on {rel.name} is missing or invalid "
                            "after init-db")
    if work.failed:  # the rest is done: said, and init-db fails
        raise PartitionsNotMade(work.done, work.failed)
    return work.done
