"""The read side of the table: status, outage report, prune. SQL as constants; reads are read-only.

What the ledger can know: a `后端` row is one host's heartbeat; `redis` and `postgres` rows carry
the server's address and are written by every host that reached it, so they interleave across a
fleet. A gap in a server's rows is an outage only while some daemon was alive to see it (some
`后端` row in that span); when no daemon reported at all it is "no data".
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Optional, Sequence

import psycopg2
from psycopg2 import sql

from heartbeatd.heartbeat import BACKEND, LATENCY, as_utc
from heartbeatd.outage import Latency, PairReport, Span, classify, edge_gaps, empty_runs
from heartbeatd.pg import deadline
from heartbeatd.schema import (DdlFailed, NotMade, declared_types, partition_maker, partitions_ahead, run_ddl,
                               run_locking)

UTC = timezone.utc
PRUNE_BATCH = 10_000
# Every read and rollup pass runs without JIT. The reads are index look-ups that JIT never speeds up, but
# on a partitioned table their cost is summed over every partition, above jit_above_cost: on a year of day
# partitions (336) PostgreSQL compiled 1,333 functions for one statement, 4.5 s of a 4.6 s query (108 ms
# without), and `report --since 24h` took 7.4 s. Any role may set it, and SET LOCAL ends with the transaction.
NO_JIT = "SET LOCAL jit = off"

# `status`: the table's DEFAULT partition (a partitioned table's, at the top level), if it has one...
# ... whether this role may read it (by oid: no error for a role without it), whether the table is
# partitioned by RANGE (report_time) alone (on any other key the DEFAULT holds rows by design: a LIST
# partition's "every other service"), and there where the first partition starts (NULL: a partition
# FROM (MINVALUE): nothing is older than every partition).
DEFAULT_OF = r"""SELECT n.nspname, c.relname, pg_catalog.has_table_privilege(c.oid, 'SELECT'),
       pg_catalog.min(pn.nspname || '.' || pc.relname),  -- the table, schema-qualified (as part_config names it)
       CASE WHEN NOT bool_or(b.bound LIKE 'FOR VALUES FROM (MINVALUE%%')
            THEN min(substring(b.bound from $$^FOR VALUES FROM \('([^']+)'\) TO$$)) END,
       k.partstrat = 'r' AND k.partnatts = 1
         AND (SELECT a.attname FROM pg_catalog.pg_attribute a
               WHERE a.attrelid = k.partrelid AND a.attnum = k.partattrs[0]) = 'report_time'
  FROM pg_catalog.pg_partitioned_table k
  JOIN pg_catalog.pg_class c ON c.oid = k.partdefid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_catalog.pg_class pc ON pc.oid = k.partrelid JOIN pg_catalog.pg_namespace pn ON pn.oid = pc.relnamespace
  LEFT JOIN (SELECT i.inhparent, pg_catalog.pg_get_expr(p.relpartbound, 0) AS bound
               FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class p ON p.oid = i.inhrelid) b
         ON b.inhparent = k.partrelid AND b.bound <> 'DEFAULT'
 WHERE k.partrelid = pg_catalog.to_regclass(%s)
 GROUP BY n.nspname, c.relname, c.oid, k.partrelid, k.partstrat, k.partnatts, k.partattrs"""
# ... and what it holds: rows no partition covers (normally none: a count of an empty table is
# microseconds), and of them the backfilled ones, which mean no partition is missing: older than the
# first partition and than RECENT (see below).
DEFAULT_ROWS = """SELECT count(*), min(report_time), max(report_time),
       count(*) FILTER (WHERE report_time < CAST(%(first)s AS {time_type}) AND report_time < %(recent)s)
  FROM ONLY {d}"""
# A row of the last day in the DEFAULT partition is never backfill, whatever the first partition: a
# cycle wrote it as it ran (or a spool, after a short outage), so a partition for the present is missing
# -- the current one detached or dropped, which leaves "the first partition" tomorrow's and every row
# written now older than it. A row that is older than both was backfilled (a spool's rows from before
# the table was partitioned, history copied in) and waits for prune.
RECENT = timedelta(days=1)
# Distinct (service, ip) by a loose index scan, then each one's newest report_time by one index
# descent: milliseconds on 26 million rows, where GROUP BY ... max() reads them all. (On a table
# partitioned by day each step is a Merge Append over every partition: a report finds its pairs once,
# and one read from the hourly rollups finds them there instead.)
PAIRS = """\
WITH RECURSIVE pairs AS (
    (SELECT service_name, ip_address FROM {t} ORDER BY service_name, ip_address LIMIT 1)
    UNION ALL
    SELECT n.service_name, n.ip_address FROM pairs p, LATERAL (
        SELECT service_name, ip_address FROM {t}
         WHERE (service_name, ip_address) > (p.service_name, p.ip_address)
         ORDER BY service_name, ip_address LIMIT 1) n
)
"""
# Each pair's newest heartbeat in the window (bounded inside: a descent that plans only the window's
# partitions), and its newest not too far ahead of the clock ({sane}: one row stamped days ahead, a clock's
# bad step, would otherwise hide the pair's live rows behind it), the pairs from PAIRS or handed in
# (LATEST_GIVEN).
NEWEST = """\
SELECT p.service_name, p.ip_address, l.report_time, s.report_time
  FROM pairs p
 CROSS JOIN LATERAL (SELECT report_time FROM {t}
                      WHERE service_name = p.service_name AND ip_address = p.ip_address AND report_time >= %(since)s
                      ORDER BY report_time DESC LIMIT 1) l
  LEFT JOIN LATERAL (SELECT report_time FROM {t}
                      WHERE service_name = p.service_name AND ip_address = p.ip_address AND report_time >= %(since)s
                        AND report_time <= %(sane)s
                      ORDER BY report_time DESC LIMIT 1) s ON true
 ORDER BY 1, 2"""
LATEST = PAIRS + NEWEST
ALL_PAIRS = PAIRS + "SELECT service_name, ip_address FROM pairs p WHERE true {filters} ORDER BY 1, 2"
# The pairs a report has found, handed to each of its statements as arrays of the columns' own types
# (so that the comparisons use the (service_name, ip_address, report_time) index), each statement's
# reads bounded by constant times: on a partitioned table the planner then keeps only the partitions
# of those times (a statement planned over 330 partitions took 40-70 ms to plan).
GIVEN = """\
WITH pairs AS (SELECT * FROM unnest(%(pair_services)s::{service_type}[], %(pair_ips)s::{ip_type}[])
                             AS p(service_name, ip_address))
"""
LATEST_GIVEN = GIVEN + NEWEST
# Per (service, ip), through the (service_name, ip_address, report_time) index so that only the
# window's rows are read: its first and last heartbeat in the window and ({before}) the one before it...
SPAN = GIVEN + """\
SELECT p.service_name, p.ip_address, e.first, e.last, e.before
  FROM pairs p, LATERAL (SELECT
       (SELECT report_time FROM {t} WHERE service_name = p.service_name AND ip_address = p.ip_address
           AND report_time >= %(since)s AND report_time < %(until)s ORDER BY report_time LIMIT 1) AS first,
       (SELECT report_time FROM {t} WHERE service_name = p.service_name AND ip_address = p.ip_address
           AND report_time >= %(since)s AND report_time < %(until)s ORDER BY report_time DESC LIMIT 1) AS last,
       {before} AS before) e
 WHERE e.first IS NOT NULL
 ORDER BY 1, 2"""
BEFORE = """(SELECT report_time FROM {t} WHERE service_name = p.service_name AND ip_address = p.ip_address
           AND report_time < %(since)s ORDER BY report_time DESC LIMIT 1)"""
NO_BEFORE = "NULL"  # a rollup report's raw edge: the heartbeat before the window is found on its own
# ... and every gap longer than the threshold (found by the database, so only the gaps travel).
GAPS = GIVEN + """\
SELECT p.service_name, p.ip_address, g.prev, g.report_time
  FROM pairs p, LATERAL (
       SELECT report_time, prev FROM (
              SELECT report_time, lag(report_time) OVER (ORDER BY report_time) AS prev FROM {t}
               WHERE service_name = p.service_name AND ip_address = p.ip_address
                 AND report_time >= %(since)s AND report_time < %(until)s) x
        WHERE report_time - prev > %(gap)s) g
 ORDER BY 1, 2, 3"""
# A server's rows (every host writes them: one every 0.3 s for 100 hosts) are too many to read
# one by one over a month. A gap longer than G holds at least one whole empty slot of G/2, so
# probe the index once per slot, then measure each run of empty slots exactly.
EMPTY_SLOTS = """\
SELECT b FROM generate_series(%(first)s, %(last)s, %(half)s) b
 WHERE NOT EXISTS (SELECT 1 FROM {t} WHERE service_name = %(s)s AND ip_address = %(ip)s
                     AND report_time >= b AND report_time < b + %(half)s)"""
AROUND = """\
SELECT (SELECT report_time FROM {t} WHERE service_name = %(s)s AND ip_address = %(ip)s AND report_time < %(start)s
         ORDER BY report_time DESC LIMIT 1),
       (SELECT report_time FROM {t} WHERE service_name = %(s)s AND ip_address = %(ip)s AND report_time >= %(end)s
         ORDER BY report_time LIMIT 1)"""
ALIVE = """\
SELECT DISTINCT report_time FROM {t}
 WHERE service_name = %(backend)s AND report_time > %(start)s AND report_time < %(end)s ORDER BY 1"""
# Which hosts wrote a server's rows in the last hour of the window: a cycle gives all its rows one
# report_time, so the 后端 row sharing it names the host. (An hour, not the window: a join over
# a month of a fleet's rows would cost more than the whole report.)
# (A lookup per server row, fenced by OFFSET 0 so that the planner cannot make it a join: with both sides
# bounded by the hour, an estimate of one row (a partition not analyzed yet) made it a nested loop with the
# times compared as a filter, every row against every row: 29 s on a fleet's hour.)
REPORTERS = GIVEN + """\
SELECT p.service_name, p.ip_address,
       (SELECT count(DISTINCT b.ip_address)
          FROM {t} s, LATERAL (SELECT b.ip_address FROM {t} b
                                WHERE b.service_name = %(backend)s AND b.report_time = s.report_time
                                  AND b.report_time >= %(recent)s AND b.report_time < %(until)s OFFSET 0) b
         WHERE s.service_name = p.service_name AND s.ip_address = p.ip_address
           AND s.report_time >= %(recent)s AND s.report_time < %(until)s)
  FROM pairs p"""
# Every relation under the table, parents first: the table itself and its partitions (declarative) or
# children (inheritance), at every level. `below`: a partition of a table partitioned by RANGE
# (report_time) alone whose upper bound is at or before the cut (NULL for DEFAULT, MAXVALUE, another key);
# `above`: one whose lower bound is at or after it (no row to remove: not looked into, nor its partitions):
# PostgreSQL reads back the bound it printed, in this session's DateStyle and TimeZone.
PRUNE_TREE = """\
WITH RECURSIVE tree AS (
    SELECT pg_catalog.to_regclass(%(t)s)::oid AS rel, 0::oid AS parent, 0 AS depth
    UNION ALL
    SELECT i.inhrelid, i.inhparent, tree.depth + 1 FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.rel
)
SELECT tree.rel, tree.parent, c.relkind, n.nspname, c.relname,
       CASE WHEN k.partstrat = 'r' AND k.partnatts = 1 AND k.partattrs[0] = a.attnum
            THEN substring(pg_catalog.pg_get_expr(c.relpartbound, 0) FROM $$TO \\('(.*)'\\)$$)::{type}
                 <= %(cutoff)s END AS below,
       CASE WHEN k.partstrat = 'r' AND k.partnatts = 1 AND k.partattrs[0] = a.attnum
            THEN substring(pg_catalog.pg_get_expr(c.relpartbound, 0) FROM $$FROM \\('(.*)'\\) TO$$)::{type}
                 >= %(cutoff)s END AS above
  FROM tree JOIN pg_catalog.pg_class c ON c.oid = tree.rel JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_catalog.pg_partitioned_table k ON c.relispartition AND k.partrelid = tree.parent
  LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = tree.parent AND a.attname = 'report_time'
 ORDER BY tree.depth, n.nspname, c.relname"""
# The services of one table or partition, by a loose scan of the (service_name, report_time) index.
PRUNE_SERVICES = """\
WITH RECURSIVE services AS (
    (SELECT service_name FROM ONLY {t} ORDER BY service_name LIMIT 1)
    UNION ALL
    SELECT n.service_name FROM services s, LATERAL (
        SELECT service_name FROM ONLY {t} WHERE service_name > s.service_name ORDER BY service_name LIMIT 1) n
)
SELECT service_name FROM services"""
PRUNE_COUNT = "SELECT count(*) FROM ONLY {t} WHERE service_name = %(s)s AND report_time < %(cutoff)s"
PRUNE_ROWS = "SELECT count(*) FROM ONLY {t}"
# A partition about to be dropped: the rows of each table in it (itself, or its own partitions', at every
# level) as the planner estimates them: the rows a page at the last VACUUM or ANALYZE (reltuples / relpages)
# times the pages it has now. Counting them exactly reads the whole partition (a day of 100 hosts: 0.1 s;
# the DROP that follows takes 40 ms). reltuples -1 (PostgreSQL 14 and later: never vacuumed nor analyzed), a
# table analyzed empty that has pages since, or a foreign table: no estimate, those are counted exactly.
PRUNE_ESTIMATE = """SELECT n.nspname, c.relname, c.relkind, c.reltuples, c.relpages,
       CASE WHEN c.relkind = 'r' THEN pg_catalog.pg_relation_size(c.oid)
                                      / pg_catalog.current_setting('block_size')::int END
  FROM pg_catalog.pg_partition_tree(pg_catalog.to_regclass(%s)) t
  JOIN pg_catalog.pg_class c ON c.oid = t.relid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE t.isleaf"""
# Oldest first per service through the (service_name, report_time) index: the heap is laid out
# by time, so each batch dirties the pages the previous one did (per (service, ip) instead, every
# old page would be rewritten once per host). Keyset on report_time, so no batch rescans what
# earlier ones deleted. Each row is addressed by its physical id: a TID scan, about twice as fast
# as the same batch by primary key (rows are never updated, so a ctid read in the statement is the
# row it deletes), and a table without `id` works the same. A ctid names a row only within one
# table, so each table and partition is pruned on its own (ONLY), never through its parent.
PRUNE_BATCH_SQL = """\
WITH gone AS (
    DELETE FROM ONLY {t} WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM ONLY {t} WHERE service_name = %(s)s AND report_time >= %(after)s AND report_time < %(cutoff)s
         ORDER BY report_time LIMIT %(n)s))
    RETURNING report_time)
SELECT count(*), max(report_time) FROM gone"""
PRUNE_LOCK = "SELECT pg_try_advisory_lock(hashtext(%s))"
# The check's latency per (service, ip): the first heartbeat in each of LATENCY_SLOTS equal slots of
# the pair's span in the window, one index descent each. So the figures cost the same for a day as for
# a year of a fleet's rows (reading every row's latency would read the whole heap); they are a sample,
# of at most LATENCY_SLOTS heartbeats, and the report says how many. One statement, a part per slot:
# each pair's slot bounds are computed from its first heartbeat and step, and each part is also bounded
# by constants, the slot's span over all the pairs ({lo}, {hi}), so on a partitioned table each part
# plans only those partitions. (With the expressions alone, every descent rescanned an Append over
# every partition: 0.2 ms each on a year of day partitions, 5 s for 100 hosts.)
LATENCY_SLOTS = 250
LATENCY_SLOT = """SELECT p.service_name, p.ip_address, x.ms FROM pairs p, LATERAL (
       SELECT latency_ms::float8 AS ms FROM {t} WHERE service_name = p.service_name AND ip_address = p.ip_address
          {own}AND report_time >= {lo} AND report_time < {hi} ORDER BY report_time LIMIT 1) x"""
# The pair's own slot, where the pairs' spans differ (where they are one, {lo} and {hi} are its bounds).
OWN_SLOT = "AND report_time >= p.first + p.step * {k} AND report_time < p.first + p.step * {k1}\n          "
LATENCY_SAMPLE = """\
WITH pairs AS (SELECT * FROM unnest(%(pair_services)s::{service_type}[], %(pair_ips)s::{ip_type}[],
                                    %(firsts)s::{time_type}[], %(steps)s::interval[])
                             AS p(service_name, ip_address, first, step))
SELECT service_name, ip_address,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.95) WITHIN GROUP (ORDER BY ms), max(ms), count(ms)
  FROM ({slots}) s
 GROUP BY 1, 2"""


class TableMissing(Exception):
    """The table (or its report_time column) is not there: the operator runs `heartbeatd init-db`."""


@dataclass(frozen=True)
class Latest:
    """`status`: one (service, ip)'s newest heartbeat."""

    service: str
    ip: str
    last: datetime
    age: float  # seconds (negative: report_time is ahead of the clock)
    fresh: bool
    # report_time more than the staleness limit ahead of the clock (a host whose clock runs ahead): not fresh,
    # since a row stamped days ahead would otherwise look fresh for days after its host died.
    ahead: bool = False


@dataclass(frozen=True)
class DefaultRows:
    """`status`: the rows in the DEFAULT partition of a table partitioned by RANGE (report_time) (strays: a
    partition is missing), their span."""

    name: str  # the partition's name (schema-qualified outside public)
    rows: Optional[int]  # None: this role may not read the partition
    first: Optional[datetime]
    last: Optional[datetime]
    # Of `rows`, those older than the table's first partition and than RECENT: backfilled, no partition is
    # missing (not on a table pg_partman manages: its partition_data_proc makes them one); None with `rows`.
    older: Optional[int] = 0
    table: str = ""  # the partitioned table, schema-qualified
    # Where it holds rows: who makes the table's partitions ahead: "heartbeatd" (prune: a table init-db
    # --partitioned made), "pg_partman" (partman_schema: the extension's schema), "pg_partman?" (installed,
    # its part_config not readable by this role), None (the operator).
    maker: Optional[str] = None
    partman_schema: Optional[str] = None


class Ledger:
    """Reads (and prunes) the heartbeat table on a connection it is handed."""

    def __init__(self, conn: Any, table: Sequence[str], timeout: float,
                 helper: Optional[Callable[[], Any]] = None) -> None:
        self.conn = conn
        # A second connection for reading in parallel, on the same snapshot (None: read alone).
        self._helper = helper
        self.table = tuple(table)
        self.timeout = timeout
        self._t = sql.Identifier(*self.table)
        self.naive = True  # report_time is `timestamp` (naive UTC), not `timestamptz`
        self.has_latency = False  # the table has a latency_ms column
        self._time_type = "timestamp"  # report_time's type, for reading a partition's bound
        # service_name's and ip_address's declared types: a report's pairs are handed in as arrays of them
        self._key_types = ("text", "text")
        self._timeout_ms = 1000
        self._snapshot: Optional[str] = None  # exported by the current read, for a helper to import
        # Set by latest(): what the DEFAULT partition holds; None where the table is not partitioned or has none.
        self.default_rows: Optional[DefaultRows] = None

    @property
    def name(self) -> str:
        return ".".join(self.table)

    def _param(self, value: datetime) -> datetime:
        # The column's own type, so the index on report_time can be used for the comparison.
        return value.astimezone(UTC).replace(tzinfo=None) if self.naive else value.astimezone(UTC)

    def _q(self, text: str, **parts: sql.Composable) -> sql.Composed:
        return sql.SQL(text).format(t=self._t, service_type=sql.SQL(self._key_types[0]),
                                    ip_type=sql.SQL(self._key_types[1]), time_type=sql.SQL(self._time_type), **parts)

    @staticmethod
    def given(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
        """The parameters of GIVEN: these (service, ip) pairs."""
        keys = list(pairs)
        return {"pair_services": [k[0] for k in keys], "pair_ips": [k[1] for k in keys]}

    def _read(self, work: Callable[[Any], Any], seconds: Optional[float] = None, export: bool = False) -> Any:
        """One read-only transaction under the deadline (works on a hot standby too)."""
        limit = seconds or self.timeout
        self._timeout_ms = max(1, int(limit * 1000))
        self.conn.autocommit = False
        # Repeatable read: one snapshot for every statement, which a helper connection can share.
        self.conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        self._snapshot = None
        try:
            with deadline(limit), self.conn.cursor() as cur:
                if export and self._helper is not None:
                    try:  # first, and not in a savepoint: PostgreSQL exports from neither a subtransaction
                        cur.execute("SELECT pg_export_snapshot()")
                        self._snapshot = cur.fetchone()[0]
                    except psycopg2.Error:  # a server that cannot export: read alone, in a new transaction
                        self.conn.rollback()
                cur.execute("SET LOCAL statement_timeout = %s", (self._timeout_ms,))
                cur.execute("SET LOCAL TimeZone = 'UTC'")
                cur.execute(NO_JIT)
                self._describe(cur)
                return work(cur)
        finally:
            if not self.conn.closed:
                self.conn.rollback()

    def _describe(self, cur: Any) -> None:
        declared = declared_types(cur, self._t)
        types = {name: typ.name for name, typ in declared.items()}
        found = types.get("report_time")
        self.has_latency = LATENCY in types
        service, ip = (declared.get(c) for c in ("service_name", "ip_address"))
        self._key_types = (service.declared if service else "text", ip.declared if ip else "text")
        if found is None:
            raise TableMissing(f"table {self.name} does not exist (or has no report_time column): "
                              "run `heartbeatd init-db`")
        self.naive = found != "timestamptz"
        self._time_type = "timestamptz" if found == "timestamptz" else "timestamp"

    # -- status ---------------------------------------------------------------------------

    def latest(self, window: timedelta, stale_after: float, now: datetime,
               pairs: Optional[Callable[[Any, datetime, datetime], Optional[list[tuple[str, str]]]]] = None
               ) -> list[Latest]:
        """Every (service, ip) seen within `window`, with its newest heartbeat and whether it is fresh.

        `pairs(cur, since, now)`: the pairs to look at (from the hourly rollups: Rollup.readable_pairs), each
        read within the window only; None from it, or no `pairs`, scans the table for them (PAIRS)."""
        def work(cur: Any) -> list[Latest]:
            keys = pairs(cur, now - window, now) if pairs is not None else None
            # As far ahead as the limit behind: clocks a little apart, a row written during this read.
            bounds = {"since": self._param(now - window), "sane": self._param(now + timedelta(seconds=stale_after))}
            if keys is None:
                cur.execute(self._q(LATEST), bounds)
            else:
                cur.execute(self._q(LATEST_GIVEN), dict(self.given(keys), **bounds))
            found = []
            for service, ip, last, sane in cur.fetchall():
                age = (now - as_utc(last)).total_seconds()
                sane_age = (now - as_utc(sane)).total_seconds() if sane is not None else math.inf
                if sane_age <= stale_after:  # fresh, whatever row ahead of the clock there is besides
                    found.append(Latest(service, ip, as_utc(sane), sane_age, True, False))
                elif age < -stale_after:  # only rows far ahead of the clock since: not fresh
                    found.append(Latest(service, ip, as_utc(last), age, False, True))
                else:
                    found.append(Latest(service, ip, as_utc(last), age, False, False))
            self.default_rows = self._default_rows(cur, now)
            return found
        return list(self._read(work))

    def _default_rows(self, cur: Any, now: datetime) -> Optional[DefaultRows]:
        """The DEFAULT partition's rows and their span, in the read (under its deadline); None if the table has
        none, or is partitioned by another key than RANGE (report_time): its DEFAULT's rows are not strays."""
        cur.execute(DEFAULT_OF, (self._t.as_string(cur),))
        found = cur.fetchone()
        if found is None or not found[5]:
            return None
        schema, name, readable, table, first_partition, _ = found
        shown = name if schema == "public" else f"{schema}.{name}"
        if not readable:  # said, not failed: the rest of status stands
            return DefaultRows(shown, None, None, None, None)
        cur.execute(sql.SQL(DEFAULT_ROWS).format(d=sql.Identifier(schema, name), time_type=sql.SQL(self._time_type)),
                    {"first": first_partition, "recent": self._param(now - RECENT)})
        rows, first, last, older = cur.fetchone()
        found = DefaultRows(shown, int(rows), as_utc(first) if first is not None else None,
                            as_utc(last) if last is not None else None, int(older or 0))
        if rows:  # who makes the partitions, for status's hint
            maker, partman = partition_maker(cur, self._t)
            found = replace(found, table=table, maker=maker, partman_schema=partman,
                            # pg_partman makes a partition for any of them (partition_data_proc): none is backfill
                            older=0 if maker in ("pg_partman", "pg_partman?") else found.older)
        return found

    # -- report -----------------------------------------------------------------------------

    def report(self, since: datetime, until: datetime, gap: float, now: datetime, service: Optional[str] = None,
               ip: Optional[str] = None, seconds: Optional[float] = None) -> list[PairReport]:
        """Outages and no-data stretches of every (service, ip) with heartbeats in [since, until)."""
        return _Report(self).run(since, until, gap, now, service, ip, seconds)

    # -- prune ------------------------------------------------------------------------------

    def prune(self, cutoff: datetime, dry_run: bool, progress: Callable[[int], None],
              dropped: Callable[[str, int, bool], None] = lambda name, rows, estimated: None,
              ahead: Callable[[list[str], list[str], list[NotMade]], None] = lambda made, said, failed: None
              ) -> Optional[int]:
        """Remove rows older than `cutoff`: whole partitions below it dropped (each told to `dropped`, with its
        rows and whether that figure is an estimate: see PRUNE_ESTIMATE), the rest deleted in batches; how many
        rows (the dropped partitions' as told), or None if another prune holds the lock. First, on a
        table init-db --partitioned made, the partitions ahead that are missing are made and every partition
        given the table's SELECT and INSERT grants (told to `ahead`: the names made, the lines of rows moved into
        them and of the grants, and each partition that could not be made: pruning goes on)."""
        conn = self.conn
        conn.autocommit = True
        conn.set_session(readonly=False, autocommit=True)
        with deadline(self.timeout), conn.cursor() as cur:
            self._describe(cur)
            when = self._param(cutoff)
            cur.execute("SET TimeZone = 'UTC'")  # a timestamptz bound is printed and read back in UTC
            cur.execute(PRUNE_LOCK, (f"heartbeatd-prune:{self.name}",))
            if not cur.fetchone()[0]:
                return None
        try:  # under the prune lock: two prunes never make the same partition
            found = partitions_ahead(conn, self.table, self.timeout, datetime.now(UTC), dry_run, self._helper)
            if found is not None:  # partitions not made among them: said, and pruning goes on
                ahead(*found)
        except DdlFailed as exc:
            if conn.closed:  # a lock not had (its holder named): as for a partition's DROP, prune stops
                raise
            ahead([], [], [NotMade(str(exc), "the DEFAULT partition takes the rows meanwhile", "")])
        # A partition held by another session (a long reader, an ALTER) holds these reads up too: bounded,
        # cancelled on the server, its holder named, as the DROP's lock is.
        drop, tables = run_locking(conn, lambda cur: self._prune_plan(cur, when), f"reading {self.name}'s partitions",
                                   self.timeout, self._helper)
        pid = conn.get_backend_pid()
        try:
            removed = 0
            for table in drop:
                rows, estimated = self._drop(table, dry_run)
                dropped(".".join(table.strings), rows, estimated)
                removed += rows
            for table in tables:
                removed = self._prune_batches(table, when, dry_run, progress, removed)
            return removed
        except KeyboardInterrupt:
            self._cancel(pid)
            raise

    def _prune_plan(self, cur: Any, when: Any) -> tuple[list[sql.Identifier], list[sql.Identifier]]:
        """The partitions wholly below the cut (to drop), and the tables and partitions to delete from."""
        cur.execute(sql.SQL(PRUNE_TREE).format(type=sql.SQL(self._time_type)),
                    {"t": self._t.as_string(cur), "cutoff": when})
        gone: set[int] = set()
        kept: set[int] = set()
        drop, tables = [], []
        for rel, parent, kind, schema, name, below, above in cur.fetchall():
            if parent in gone or below:  # dropping a partition drops its own partitions
                if parent not in gone:
                    drop.append(sql.Identifier(schema, name))
                gone.add(rel)
            elif parent in kept or above:  # the partitions made ahead, say: every row is after the cut
                kept.add(rel)
            elif kind == "r":  # "p" holds no rows itself; a foreign table's rows are its server's to keep
                tables.append(sql.Identifier(schema, name))
        return drop, tables

    def _drop(self, table: sql.Identifier, dry_run: bool) -> tuple[int, bool]:
        """Its rows, and whether that is an estimate (PRUNE_ESTIMATE), and (unless a dry run) the partition
        dropped: one catalog change, whatever its size."""
        rows, estimated = self._partition_rows(table)
        if not dry_run:
            # DROP, not DETACH then DROP: a plain DETACH takes the same ACCESS EXCLUSIVE lock on the
            # parent, and DETACH ... CONCURRENTLY is refused where a DEFAULT partition exists and
            # leaves a half-detached partition if interrupted. The lock wait is bounded (run_ddl).
            run_ddl(self.conn, sql.SQL("DROP TABLE {}").format(table), f"DROP TABLE {'.'.join(table.strings)}",
                    self.timeout, self._helper)
        return rows, estimated

    def _partition_rows(self, table: sql.Identifier) -> tuple[int, bool]:
        """A partition's rows (its own partitions' at every level): estimated where the statistics allow it,
        counted where not; and whether any of it is an estimate."""
        return run_locking(self.conn, lambda cur: self._count_partition(cur, table),
                           f"counting {'.'.join(table.strings)}", self.timeout, self._helper)

    def _count_partition(self, cur: Any, table: sql.Identifier) -> tuple[int, bool]:
        rows, estimated = 0, False
        cur.execute(PRUNE_ESTIMATE, (table.as_string(cur),))
        for schema, name, kind, tuples, pages, pages_now in cur.fetchall():
            if kind == "r" and pages_now == 0:
                continue  # no page, no row: exact
            if kind == "r" and tuples >= 0 and pages > 0:
                rows += round(tuples / pages * pages_now)
                estimated = True
            elif kind in ("r", "f"):  # no statistics (or none that tell a density): counted
                cur.execute(sql.SQL(PRUNE_ROWS).format(t=sql.Identifier(schema, name)))
                rows += int(cur.fetchone()[0])
        return rows, estimated

    def _cancel(self, pid: int) -> None:
        """Ctrl-C in a batch: a DELETE the client stopped waiting for is the server's to finish (one
        stuck behind a lock runs once the lock goes), so cancel it from a second connection, by the
        same deadline. psycopg2 has closed ours by now, and its own cancel() blocks the whole process
        with no timeout while a frozen server does not answer."""
        if self._helper is None:
            return
        try:
            with deadline(self.timeout):
                other = self._helper()
                try:
                    with other.cursor() as cur:
                        cur.execute("SELECT pg_cancel_backend(%s)", (pid,))
                finally:
                    other.close()
        except Exception:  # noqa: BLE001 - best effort: what was removed stays removed either way
            pass

    def _prune_batches(self, table: sql.Identifier, when: Any, dry_run: bool,
                       progress: Callable[[int], None], removed: int) -> int:
        """Delete (or count) one table's or partition's rows older than the cut, service by service."""
        conn = self.conn

        def q(text: str) -> sql.Composed:
            return sql.SQL(text).format(t=table)

        with deadline(self.timeout), conn.cursor() as cur:
            cur.execute(q(PRUNE_SERVICES))
            services = [r[0] for r in cur.fetchall()]
        for service in services:
            after = self._param(datetime(1, 1, 2, tzinfo=UTC))
            while True:
                with deadline(self.timeout), conn.cursor() as cur:
                    if dry_run:
                        cur.execute(q(PRUNE_COUNT), {"s": service, "cutoff": when})
                        removed += int(cur.fetchone()[0])
                        break
                    cur.execute(q(PRUNE_BATCH_SQL), {"s": service, "after": after, "cutoff": when, "n": PRUNE_BATCH})
                    count, last = cur.fetchone()
                removed += int(count)
                progress(removed)
                if count < PRUNE_BATCH:
                    break
                after = last
        return removed


def only(service: Optional[str], ip: Optional[str], prefix: str = "p.") -> sql.SQL:
    """`report --service/--ip`: the conditions on the pairs' columns (params `service` and `ip`)."""
    return sql.SQL((f" AND {prefix}service_name = %(service)s" if service else "")
                   + (f" AND {prefix}ip_address = %(ip)s" if ip else ""))


class _Report:
    """`report`'s reads on the ledger's connection: spans, gaps, who was watching, who reported."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def run(self, since: datetime, until: datetime, gap: float, now: datetime, service: Optional[str] = None,
               ip: Optional[str] = None, seconds: Optional[float] = None) -> list[PairReport]:
        """Outages and no-data stretches of every (service, ip) with heartbeats in [since, until)."""
        end = min(until, now)
        params: dict[str, Any] = {"since": self.ledger._param(since), "until": self.ledger._param(until),
                                  "gap": timedelta(seconds=gap), "backend": BACKEND, "service": service, "ip": ip,
                                  "recent": self.ledger._param(max(since, end - timedelta(hours=1)))}
        filters = only(service, ip)

        def work(cur: Any) -> list[PairReport]:
            cur.execute(self.ledger._q(ALL_PAIRS, filters=filters), params)  # once: see PAIRS
            pairs, edges = self._spans(cur, [(svc, addr) for svc, addr in cur.fetchall()], params, since, end)
            gaps = [((svc, addr), as_utc(prev), as_utc(nxt), False)
                    for svc, addr, prev, nxt in self._gaps(cur, params, edges, gap)]
            for key, (first, last, before) in edges.items():
                gaps += [(key, start, stop, ongoing) for start, stop, ongoing in edge_gaps(first, last, before, end, gap)]
            for key, start, stop, ongoing in sorted(gaps, key=lambda g: (g[0], g[1])):
                report = pairs[key]
                start = max(start, since)
                if key[0] == BACKEND:  # a host's own heartbeat missing: that host (or its backend) was down
                    report.outages.append(Span(start, stop, ongoing))
                else:
                    cur.execute(self.ledger._q(ALIVE), {"backend": BACKEND, "start": self.ledger._param(start),
                                                 "end": self.ledger._param(stop)})
                    outages, no_data = classify(start, stop, ongoing, [as_utc(r[0]) for r in cur.fetchall()], gap)
                    report.outages += outages
                    report.no_data += no_data
            self._reporters(cur, params, pairs)
            if self.ledger.has_latency:
                self._latency(cur, pairs, edges)
            return list(pairs.values())

        return list(self.ledger._read(work, seconds, export=True))

    def spans(self, cur: Any, keys: Sequence[tuple[str, str]], params: dict[str, Any], before: str = BEFORE
              ) -> list[tuple[str, str, datetime, datetime, Optional[datetime]]]:
        """Each of these pairs with a heartbeat in [since, until): its first and last there, and (`before`:
        BEFORE, or NO_BEFORE) its last before since."""
        if not keys:
            return []
        cur.execute(self.ledger._q(SPAN, before=self.ledger._q(before)), dict(params, **self.ledger.given(keys)))
        return [(svc, addr, as_utc(first), as_utc(last), as_utc(prior) if prior is not None else None)
                for svc, addr, first, last, prior in cur.fetchall()]

    def _spans(self, cur: Any, keys: Sequence[tuple[str, str]], params: dict[str, Any], since: datetime, end: datetime
               ) -> tuple[dict[tuple[str, str], PairReport], dict[tuple[str, str], tuple[datetime, datetime, Any]]]:
        """Each pair's report, and its first and last heartbeat in the window and the one before it."""
        pairs: dict[tuple[str, str], PairReport] = {}
        edges: dict[tuple[str, str], tuple[datetime, datetime, Optional[datetime]]] = {}
        for svc, addr, first, last, before in self.spans(cur, keys, params):
            # A pair that reported before the window is observed from the window's start.
            pairs[(svc, addr)] = PairReport(svc, addr, since if before is not None else first, end)
            edges[(svc, addr)] = (first, last, before)
        return pairs, edges

    def gaps(self, cur: Any, keys: Sequence[tuple[str, str]], params: dict[str, Any]) -> list[Any]:
        """Every gap longer than params' gap in these pairs' rows in [since, until): (service, ip, prev, next).
        With many pairs, half of them are read on a second connection meanwhile."""
        if not keys:
            return []
        side = self._beside(cur, self.ledger._q(GAPS), dict(params, **self.ledger.given(keys[::2]),
                                                             timeout_ms=self.ledger._timeout_ms)) if len(keys) >= 8 else None
        cur.execute(self.ledger._q(GAPS), dict(params, **self.ledger.given(keys[1::2] if side is not None else keys)))
        found: list[Any] = cur.fetchall()
        if side is not None:
            found += side.result()
        return found

    def _gaps(self, cur: Any, params: dict[str, Any], edges: dict[tuple[str, str], tuple[datetime, datetime, Any]],
              gap: float) -> list[Any]:
        """Every gap longer than `gap` inside the window: (service, ip, previous, next)."""
        # 后端 rows (one host's, every 30 s) are read in one pass; servers' by empty slots.
        found = self.gaps(cur, sorted(key for key in edges if key[0] == BACKEND), params)
        for key, (first, last, _) in edges.items():
            if key[0] != BACKEND:
                found += [(key[0], key[1], prev, nxt) for prev, nxt in self._server_gaps(cur, key, first, last, gap)]
        return found

    def _reporters(self, cur: Any, params: dict[str, Any], pairs: dict[tuple[str, str], PairReport]) -> None:
        """How many hosts wrote each server's rows in the last hour of the window."""
        servers = sorted(key for key in pairs if key[0] != BACKEND)
        if not servers:
            return
        cur.execute(self.ledger._q(REPORTERS), dict(params, **self.ledger.given(servers)))
        for svc, addr, hosts in cur.fetchall():
            if (svc, addr) in pairs:
                pairs[(svc, addr)].reporters = int(hosts)

    def _latency(self, cur: Any, pairs: dict[tuple[str, str], PairReport],
                 edges: dict[tuple[str, str], tuple[datetime, datetime, Any]]) -> None:
        """p50/p95/max of each pair's latency, over its first heartbeat in each of LATENCY_SLOTS slots."""
        if not edges:
            return
        keys = sorted(edges)
        firsts = [edges[k][0] for k in keys]
        # The last heartbeat inside the last slot: a step a little longer than span / slots.
        steps = [max((edges[k][1] - edges[k][0]) / LATENCY_SLOTS, timedelta(microseconds=1)) + timedelta(microseconds=1)
                 for k in keys]
        ledger = self.ledger
        # One pair, or pairs seen over the same span: the constants alone (each part then plans no pruning
        # by the pair's values; one host's year: 40 ms against 150).
        alike = len(set(zip(firsts, steps))) == 1
        parts = []
        for n in range(LATENCY_SLOTS):
            lo = min(first + step * n for first, step in zip(firsts, steps))
            hi = max(first + step * (n + 1) for first, step in zip(firsts, steps))
            own = sql.SQL(OWN_SLOT).format(k=sql.Literal(n), k1=sql.Literal(n + 1)) if not alike else sql.SQL("")
            parts.append(ledger._q(LATENCY_SLOT, own=own, lo=sql.Literal(ledger._param(lo)),
                                   hi=sql.Literal(ledger._param(hi))))
        cur.execute(ledger._q(LATENCY_SAMPLE, slots=sql.SQL(" UNION ALL ").join(parts)),
                    dict(ledger.given(keys), firsts=[ledger._param(f) for f in firsts], steps=steps))
        for svc, addr, p50, p95, top, count in cur.fetchall():
            if count and (svc, addr) in pairs:
                pairs[(svc, addr)].latency = Latency(float(p50), float(p95), float(top), int(count))

    def _beside(self, cur: Any, query: sql.Composed, params: dict[str, Any]) -> Optional["_Beside"]:
        """Run `query` on a helper connection that shares this transaction's snapshot; None if none."""
        snapshot = self.ledger._snapshot
        if self.ledger._helper is None or snapshot is None:
            return None
        try:
            helper = self.ledger._helper()  # connected here: the deadline's state belongs to this thread
        except Exception:  # noqa: BLE001 - no free connection slot, say: read alone
            return None
        if helper is None:
            return None
        return _Beside(helper, snapshot, query, params)

    def _server_gaps(self, cur: Any, key: tuple[str, str], first: datetime, last: datetime,
                     gap: float) -> list[tuple[datetime, datetime]]:
        """Gaps longer than `gap` between `first` and `last` in one server's rows, by empty slots."""
        half = timedelta(seconds=gap / 2)
        cur.execute(self.ledger._q(EMPTY_SLOTS), {"first": self.ledger._param(first), "last": self.ledger._param(last), "half": half,
                                           "s": key[0], "ip": key[1]})
        runs = empty_runs([as_utc(r[0]) for r in cur.fetchall()], half)
        found = []
        for start, end in runs:
            cur.execute(self.ledger._q(AROUND), {"s": key[0], "ip": key[1], "start": self.ledger._param(start),
                                          "end": self.ledger._param(end)})
            prev, nxt = cur.fetchone()
            if prev is not None and nxt is not None and (as_utc(nxt) - as_utc(prev)).total_seconds() > gap:
                found.append((as_utc(prev), as_utc(nxt)))
        return found


class _Beside(threading.Thread):
    """One query on a second connection, in the same snapshot, while the first goes on."""

    def __init__(self, conn: Any, snapshot: str, query: sql.Composed, params: dict[str, Any]) -> None:
        super().__init__(name="ledger helper", daemon=True)
        self.conn, self.snapshot, self.query, self.params = conn, snapshot, query, params
        self.rows: list[Any] = []
        self.error: Optional[BaseException] = None
        self.start()

    def run(self) -> None:
        try:
            self.conn.set_session(isolation_level="REPEATABLE READ", readonly=True, autocommit=False)
            # This thread's own deadline (a deadline belongs to the thread that set it): the
            # statement_timeout below, and a little more for the round trips around it.
            with deadline(self.params["timeout_ms"] / 1000 + 1.0), self.conn.cursor() as cur:
                cur.execute("SET TRANSACTION SNAPSHOT %s", (self.snapshot,))
                cur.execute("SET LOCAL TimeZone = 'UTC'")
                cur.execute("SET LOCAL statement_timeout = %s", (self.params["timeout_ms"],))
                cur.execute(NO_JIT)
                cur.execute(self.query, self.params)
                self.rows = cur.fetchall()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller in result()
            self.error = exc
        finally:
            self.conn.close()

    def result(self) -> list[Any]:
        """The rows, once the query is done; its error raised here if it failed."""
        self.join()
        if self.error is not None:
            raise self.error
        return self.rows


def parse_when(text: str, now: datetime) -> datetime:
    """`24h`, `7d`, `90m` (that long before now), or a date/time in UTC such as `2026-11-01`."""
    from heartbeatd.config import parse_duration
    seconds = parse_duration(text)
    if seconds is not None:
        return now - timedelta(seconds=seconds)
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a duration (24h, 7d) or a date (2026-11-01): {text!r}") from None
    return as_utc(value)
