"""Hourly rollups of the heartbeat table: kept for years while raw rows are pruned after weeks.

One row per (service, ip, hour): heartbeats, expected heartbeats, the first and last report_time,
every gap longer than the rollup's gap inside the hour, and latency sum/max/count where kept.
Whole hours' gaps can so be joined to the neighbours' exactly, and `report` finds the same gaps
from rollups as from raw rows for any --gap at least the rollup's. A server's gap is classified
by the hosts' 后端 heartbeats; those of all hosts together are rolled up as one more series, the
"watcher" (service 后端, ip `*`): a server's gap is no data exactly where the watcher has a gap.

A pass recomputes whole hours, so it is idempotent; which hours is found by `created_at` (a row
spooled hours late lands in its own hour), re-reading a margin behind the last pass for rows whose
transaction committed after that pass looked.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Optional, Sequence

from psycopg2 import sql

from heartbeatd.heartbeat import BACKEND, LATENCY, SERVICES, as_utc
from heartbeatd.ledger import GIVEN, NO_BEFORE, NO_JIT, PAIRS, PRUNE_SERVICES, Ledger, TableMissing, _Report, only
from heartbeatd.outage import PairReport, Span, classify, edge_gaps
from heartbeatd.pg import deadline
from heartbeatd.schema import column_types, object_name, run_ddl

UTC = timezone.utc
HOUR = timedelta(hours=1)
WATCHER = "*"  # the ip_address of the all-hosts 后端 series: no real address is `*`
# How far behind the last pass's clock a pass re-reads by created_at, beyond HEARTBEAT_TIMEOUT:
# a daemon sets created_at from its own clock, so a host whose clock lags this much is still seen.
CLOCK_SKEW = timedelta(minutes=15)
BACKFILL_SLICE = timedelta(days=7)
# `status` reads every raw row after the hours the rollup covers to find pairs new since: with no pass for
# longer than this (the rollup timer runs hourly), it scans the table for its pairs instead.
STALLED = timedelta(hours=3)
# The table's services, partitions included: prune's list reads each table ONLY (a partitioned
# parent holds no row itself, so on one it found no service and a pass rolled up only `*`).
TABLE_SERVICES = PRUNE_SERVICES.replace("FROM ONLY {t}", "FROM {t}")
# The rollup's (service, ip) pairs by a loose scan of its key, as PAIRS scans the table's.
ROLLUP_PAIR_SCAN = PAIRS.replace("{t}", "{r}")

CREATE_ROLLUP = """\
CREATE TABLE IF NOT EXISTS {r} (
    service_name  varchar(50) NOT NULL,
    ip_address    varchar(64) NOT NULL,
    hour          timestamp   NOT NULL,   -- UTC, the hour's start
    heartbeats    integer     NOT NULL,
    expected      integer     NOT NULL,   -- a host's: cycles in an hour; a server's: the watcher's heartbeats
    first_time    timestamp   NOT NULL,
    last_time     timestamp   NOT NULL,
    gap_starts    timestamp[] NOT NULL,   -- each gap longer than the state's gap_seconds, in the hour
    gap_ends      timestamp[] NOT NULL,
    latency_sum   double precision,
    latency_max   double precision,
    latency_count integer     NOT NULL,
    prev_last     timestamp,              -- the pair's last heartbeat before this hour (NULL: none)
    has_gap       boolean     NOT NULL DEFAULT false,  -- a kept gap in the hour, or from prev_last to first_time
    PRIMARY KEY (service_name, ip_address, hour)
);
CREATE INDEX IF NOT EXISTS {hour_index} ON {r} (hour);
-- A year's report reads only the hours with a gap, not every hour of every pair.
CREATE INDEX IF NOT EXISTS {gap_index} ON {r} (hour) WHERE has_gap;
CREATE INDEX IF NOT EXISTS {ip_index} ON {r} (ip_address, hour);  -- `report --ip` of one host
CREATE TABLE IF NOT EXISTS {s} (
    rollup        text        PRIMARY KEY,
    gap_seconds   double precision NOT NULL,  -- fixed at the first pass: the gaps kept in the rollup
    watermark     timestamp   NOT NULL,   -- the server's UTC clock when the last pass began
    covered_until timestamp   NOT NULL,   -- every hour before it has been rolled up
    passed_at     timestamp   NOT NULL
)"""
# `report --ip`: one host's gap hours. A rollup made before 1.6.2 lacks it: init-db adds it.
IP_GAP_INDEX = "CREATE INDEX IF NOT EXISTS {ip_gap_index} ON {r} (ip_address, hour) WHERE has_gap"
# 1.6.0 and 1.6.1 kept an `inet` column's address as inet::text, a host's with its mask (10.1.0.1/32),
# where the rows read 10.1.0.1: a pass on such a table first rewrites them as the column prints them (an
# IPv4 address's /32, an IPv6 one's /128 dropped), before it writes any hour in the new form, where the
# rollup holds such an address (MASKED: the loose scan of its pairs, not of its rows). An hour held in both
# forms (a 1.6.1 pass after a 1.6.2 one, in a rolling upgrade) keeps its masked row: the pass may not
# delete; the owner does (README).
WITH_MASK = "(ip_address ~ '^[0-9.]+/32$' OR ip_address ~ ':.*/128$')"
MASKED = ROLLUP_PAIR_SCAN + "SELECT EXISTS (SELECT 1 FROM pairs WHERE " + WITH_MASK + ")"
HOST_MASKS = """\
UPDATE {r} r SET ip_address = split_part(r.ip_address, '/', 1)
 WHERE """ + WITH_MASK + """
   AND NOT EXISTS (SELECT 1 FROM {r} n WHERE n.service_name = r.service_name
                      AND n.ip_address = split_part(r.ip_address, '/', 1) AND n.hour = r.hour)"""
LOCK = "SELECT pg_try_advisory_xact_lock(hashtext(%s))"
STATE = "SELECT gap_seconds, watermark, covered_until, passed_at FROM {s} WHERE rollup = %(name)s"
CLOCK = "SELECT now() AT TIME ZONE 'UTC'"
ALL_HOURS = "SELECT date_trunc('hour', min(report_time)::timestamp), max(report_time)::timestamp FROM {t}"
NEW_HOURS = "SELECT DISTINCT date_trunc('hour', report_time::timestamp) FROM {t} WHERE created_at >= %(since)s ORDER BY 1"
# Every row of [lo, hi), grouped by (service, ip, hour), plus the watcher: distinct 后端 times. The address
# as its type prints it, as the raw rows read (an `inet` column's ::text would add `/32`).
# By service, so that the (service_name, report_time) index reads the hour, not the whole table.
UPSERT = """\
INSERT INTO {r} AS r (service_name, ip_address, hour, heartbeats, expected, first_time, last_time,
                      gap_starts, gap_ends, latency_sum, latency_max, latency_count)
SELECT service_name, ip_address, hour, count(*)::int,
       CASE WHEN service_name = %(backend)s AND ip_address <> %(all)s THEN %(cycles)s ELSE 0 END,
       min(t), max(t),
       coalesce(array_agg(prev ORDER BY t) FILTER (WHERE t - prev > %(gap)s), ARRAY[]::timestamp[]),
       coalesce(array_agg(t ORDER BY t) FILTER (WHERE t - prev > %(gap)s), ARRAY[]::timestamp[]),
       sum(ms), max(ms), count(ms)::int
  FROM (SELECT *, lag(t) OVER (PARTITION BY service_name, ip_address, hour ORDER BY t) AS prev FROM (
          SELECT service_name::text, format('%%s', ip_address) AS ip_address, report_time::timestamp AS t,
                 date_trunc('hour', report_time::timestamp) AS hour, {ms} AS ms
            FROM {t} WHERE service_name = ANY(%(services)s) AND report_time >= %(lo)s AND report_time < %(hi)s
          UNION ALL
          SELECT DISTINCT %(backend)s, %(all)s, report_time::timestamp,
                 date_trunc('hour', report_time::timestamp), NULL::float8
            FROM {t} WHERE service_name = %(backend)s AND report_time >= %(lo)s AND report_time < %(hi)s) x) y
 GROUP BY service_name, ip_address, hour
ON CONFLICT (service_name, ip_address, hour) DO UPDATE SET
       heartbeats = EXCLUDED.heartbeats, expected = EXCLUDED.expected, first_time = EXCLUDED.first_time,
       last_time = EXCLUDED.last_time, gap_starts = EXCLUDED.gap_starts, gap_ends = EXCLUDED.gap_ends,
       latency_sum = EXCLUDED.latency_sum, latency_max = EXCLUDED.latency_max, latency_count = EXCLUDED.latency_count
 -- An hour whose raw rows prune has removed (in part) keeps what it knew: never shrink it.
 WHERE EXCLUDED.heartbeats >= r.heartbeats"""
# Each recomputed hour's link to the pair's previous heartbeat, and that of the pair's next kept
# hour after the range (a late row may have changed where its gap from the past starts).
LINK = """\
UPDATE {r} r SET prev_last = x.prev,
       has_gap = cardinality(r.gap_starts) > 0 OR coalesce(r.first_time - x.prev > %(gap)s, false)
  FROM (SELECT t.service_name, t.ip_address, t.hour FROM {r} t WHERE t.hour >= %(hlo)s AND t.hour < %(hhi)s
        UNION
        SELECT n.service_name, n.ip_address, n.hour
          FROM (SELECT DISTINCT service_name, ip_address FROM {r} WHERE hour >= %(hlo)s AND hour < %(hhi)s) p,
               LATERAL (SELECT service_name, ip_address, hour FROM {r} WHERE service_name = p.service_name
                           AND ip_address = p.ip_address AND hour >= %(hhi)s ORDER BY hour LIMIT 1) n) k,
       LATERAL (SELECT (SELECT b.last_time FROM {r} b WHERE b.service_name = k.service_name
                           AND b.ip_address = k.ip_address AND b.hour < k.hour ORDER BY b.hour DESC LIMIT 1) AS prev) x
 WHERE r.service_name = k.service_name AND r.ip_address = k.ip_address AND r.hour = k.hour"""
# A server's expected heartbeats: the cycles some daemon ran that hour.
EXPECTED = """\
UPDATE {r} r SET expected = w.heartbeats FROM {r} w
 WHERE w.service_name = %(backend)s AND w.ip_address = %(all)s AND w.hour = r.hour
   AND r.hour >= %(hlo)s AND r.hour < %(hhi)s AND (r.service_name <> %(backend)s OR r.ip_address = %(all)s)
   AND r.expected <> w.heartbeats"""
SAVE_STATE = """\
INSERT INTO {s} (rollup, gap_seconds, watermark, covered_until, passed_at)
VALUES (%(name)s, %(gap_seconds)s, %(watermark)s, %(covered)s, clock_timestamp() AT TIME ZONE 'UTC')
ON CONFLICT (rollup) DO UPDATE SET watermark = EXCLUDED.watermark, passed_at = EXCLUDED.passed_at,
       covered_until = greatest({s}.covered_until, EXCLUDED.covered_until)"""

# -- report: whole hours from the rollup, the rest from raw rows --------------------------------
# Each pair's first and last heartbeat in [h0, h1): a loose scan of the key, two descents a pair.
ROLLUP_SPAN = ROLLUP_PAIR_SCAN + """\
SELECT p.service_name, p.ip_address, f.first_time, l.last_time FROM pairs p,
       LATERAL (SELECT first_time FROM {r} WHERE service_name = p.service_name AND ip_address = p.ip_address
                   AND hour >= %(h0)s AND hour < %(h1)s ORDER BY hour LIMIT 1) f,
       LATERAL (SELECT last_time FROM {r} WHERE service_name = p.service_name AND ip_address = p.ip_address
                   AND hour >= %(h0)s AND hour < %(h1)s ORDER BY hour DESC LIMIT 1) l
 WHERE true {filters}"""
# The gaps longer than --gap, in the hours that have one (by the partial index): inside an hour,
# and from the pair's previous heartbeat, where that is in [h0, h1) too (one before h0 is the
# report's to join, from the raw edge or the heartbeat before the window).
ROLLUP_GAPS = """\
SELECT p.service_name, p.ip_address, g.s, g.e
  FROM {r} p, LATERAL (SELECT p.prev_last, p.first_time WHERE p.prev_last >= %(h0)s
                       UNION ALL SELECT * FROM unnest(p.gap_starts, p.gap_ends)) g(s, e)
 WHERE p.has_gap AND p.hour >= %(h0)s AND p.hour < %(h1)s {filters} AND g.e - g.s > %(gap)s"""
# Per pair, by the primary key backwards: the hour `since` falls in may end after it, the one
# before it cannot.
ROLLUP_BEFORE = """\
SELECT p.s, p.ip, (SELECT max(last_time) FROM (
         SELECT last_time FROM {r} WHERE service_name = p.s AND ip_address = p.ip AND hour < %(h0)s
          ORDER BY hour DESC LIMIT 2) x WHERE last_time < %(since)s)
  FROM unnest(%(services)s::text[], %(ips)s::text[]) p(s, ip)"""
# The pairs: those of the rollup (a loose scan of its key; the all-hosts series left out)...
ROLLUP_PAIRS = ROLLUP_PAIR_SCAN + """\
SELECT service_name, ip_address FROM pairs p WHERE p.ip_address <> %(all)s {filters}"""
# ... and any other with raw rows in the window after the hours the rollup covers (a host added since
# the last pass): those rows only, by the (service_name, report_time) index.
NEW_PAIRS = """\
SELECT DISTINCT service_name, ip_address FROM {t}
 WHERE service_name = ANY(%(services)s) AND report_time >= %(lo)s AND report_time < %(hi)s {filters}"""
# Each pair's last heartbeat before the window in the raw rows of the hour `since` falls in: the
# rollup holds every hour before it (ROLLUP_BEFORE).
RAW_BEFORE = GIVEN + """\
SELECT p.service_name, p.ip_address, b.report_time
  FROM pairs p, LATERAL (SELECT report_time FROM {t} WHERE service_name = p.service_name
                            AND ip_address = p.ip_address AND report_time >= %(before_from)s AND report_time < %(since)s
                          ORDER BY report_time DESC LIMIT 1) b"""
ALIVE_RAW = """\
SELECT DISTINCT report_time FROM {t}
 WHERE service_name = %(backend)s AND report_time > %(start)s AND report_time < %(end)s ORDER BY 1"""
# The oldest raw row of one hour, by one descent of the (service_name, report_time) index per service;
# and the rollup's first heartbeat in that hour: earlier than the oldest raw row, prune has been there.
OLDEST_RAW = """\
SELECT min((SELECT report_time::timestamp FROM {t} WHERE service_name = s
               AND report_time >= %(lo)s AND report_time < %(hi)s ORDER BY report_time LIMIT 1))
  FROM unnest(%(services)s::text[]) s"""
READABLE = """SELECT coalesce(pg_catalog.has_table_privilege(pg_catalog.to_regclass(%(r)s), 'SELECT')
                AND pg_catalog.has_table_privilege(pg_catalog.to_regclass(%(s)s), 'SELECT'), false)"""
ROLLUP_FIRST = "SELECT min(first_time) FROM {r} WHERE hour = %(hour)s"
WATCH_RAW = """\
SELECT DISTINCT report_time FROM {t} WHERE service_name = %(backend)s
   AND report_time >= %(lo)s AND report_time < %(hi)s ORDER BY 1"""


def names(table: Sequence[str]) -> tuple[sql.Identifier, sql.Identifier, str]:
    """The rollup table, its state table (both in the table's schema), and the rollup's display name."""
    rollup, state = object_name(table[-1], "hourly"), object_name(table[-1], "hourly_state")
    return (sql.Identifier(*table[:-1], rollup), sql.Identifier(*table[:-1], state), ".".join((*table[:-1], rollup)))


def init_db(conn: Any, table: Sequence[str], timeout: float, helper: Optional[Callable[[], Any]] = None) -> list[str]:
    """Create the rollup tables if missing (idempotent); say what was created.

    The created_at index a pass reads by is one of schema.INDEXES, made with the table's others."""
    rollup, state, shown = names(table)
    ip_gap_index = object_name(table[-1], "hourly_ip_gap_idx")
    with deadline(timeout), conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s), to_regclass(%s)",
                    (rollup.as_string(cur), sql.Identifier(*table[:-1], ip_gap_index).as_string(cur)))
        made, indexed = cur.fetchone()
    if made is not None:
        if indexed is not None:
            return []
        run_ddl(conn, sql.SQL(IP_GAP_INDEX).format(r=rollup, ip_gap_index=sql.Identifier(ip_gap_index)),
                f"CREATE INDEX {ip_gap_index}", timeout, helper)
        return [f"created index {ip_gap_index} on rollup table {shown}"]
    run_ddl(conn, sql.SQL(CREATE_ROLLUP + ";\n" + IP_GAP_INDEX).format(
        r=rollup, s=state, hour_index=sql.Identifier(object_name(table[-1], "hourly_hour_idx")),
        ip_index=sql.Identifier(object_name(table[-1], "hourly_ip_idx")), ip_gap_index=sql.Identifier(ip_gap_index),
        gap_index=sql.Identifier(object_name(table[-1], "hourly_gap_idx"))), f"CREATE TABLE {shown}", timeout, helper)
    return [f"created rollup table {shown}"]


@dataclass(frozen=True)
class State:
    """Where the rollup stands: its gap, and the hours it covers."""

    gap_seconds: float
    watermark: datetime
    covered_until: datetime  # aware UTC: every hour before it is rolled up
    passed_at: datetime


@dataclass(frozen=True)
class Pass:
    """What one rollup pass did."""

    hours: int  # hours recomputed
    rows: int  # rollup rows written (an hour's pairs, and the watcher)
    covered_until: datetime
    first: bool  # the first pass: every hour of the table


def _hour(value: datetime) -> datetime:
    return value.replace(minute=0, second=0, microsecond=0)


def _ranges(hours: Sequence[datetime]) -> list[tuple[datetime, datetime]]:
    """Consecutive hours joined into [lo, hi) ranges, so a backfill is one statement, not thousands."""
    found: list[list[datetime]] = []
    for h in hours:
        if found and found[-1][1] == h:
            found[-1][1] = h + HOUR
        else:
            found.append([h, h + HOUR])
    return [(lo, hi) for lo, hi in found]


def _slices(lo: datetime, hi: datetime) -> list[tuple[datetime, datetime]]:
    """[lo, hi) in weeks: a first pass over years sorts a week's rows at a time, not the whole table's."""
    return [(a, min(a + BACKFILL_SLICE, hi)) for a in (lo + BACKFILL_SLICE * n
                                                       for n in range(int((hi - lo) / BACKFILL_SLICE) + 1)) if a < hi]


class Rollup:
    """The hourly rollup of one heartbeat table, on a Ledger's connection."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.rollup, self.state, self.name = names(ledger.table)
        self.lock_key = f"heartbeatd-rollup:{ledger.name}"

    def _q(self, text: str, **parts: sql.Composable) -> sql.Composed:
        return sql.SQL(text).format(t=self.ledger._t, r=self.rollup, s=self.state, **parts)

    def pairs(self, cur: Any, covered: datetime, since: datetime, end: datetime, service: Optional[str] = None,
              ip: Optional[str] = None) -> list[Key]:
        """The (service, ip) pairs that may have heartbeats in [since, end): the rollup's, and those with raw
        rows there after the hours it covers (`covered`). Never a scan of the whole raw table (see PAIRS).
        (A host whose first rows come late from its spool, all before `covered`, is in the next pass's.)"""
        params = {"all": WATCHER, "service": service, "ip": ip}
        cur.execute(self._q(ROLLUP_PAIRS, filters=only(service, ip)), params)
        keys = {(svc, addr) for svc, addr in cur.fetchall()}
        lo = max(since, covered)
        if lo < end:
            services = [service] if service else sorted(set(SERVICES) | {svc for svc, _ in keys})
            cur.execute(self.ledger._q(NEW_PAIRS, filters=only(service, ip, prefix="")),
                        dict(params, services=services, lo=self.ledger._param(lo), hi=self.ledger._param(end)))
            keys |= {(svc, addr) for svc, addr in cur.fetchall()}
        return sorted(keys)

    def readable_pairs(self, cur: Any, since: datetime, end: datetime) -> Optional[list[Key]]:
        """`status`: pairs() where a pass has run and this role may read the rollup; None (scan the raw
        table for them) where not."""
        cur.execute(READABLE, {"r": self.rollup.as_string(cur), "s": self.state.as_string(cur)})
        if not cur.fetchone()[0]:
            return None
        state = self.read_state(cur)
        if state is None or end - state.passed_at > STALLED:
            return None
        return self.pairs(cur, state.covered_until, since, end)

    def read_state(self, cur: Any, missing_ok: bool = False) -> Optional[State]:
        """The state row; None before the first pass. TableMissing when init-db has not made the rollup."""
        cur.execute("SELECT to_regclass(%s)", (self.state.as_string(cur),))
        if cur.fetchone()[0] is None:
            if missing_ok:
                return None
            raise TableMissing(f"rollup table {self.name} does not exist: run `heartbeatd init-db`")
        cur.execute(self._q(STATE), {"name": self.name})
        row = cur.fetchone()
        return None if row is None else State(float(row[0]), as_utc(row[1]), as_utc(row[2]), as_utc(row[3]))

    def run(self, gap: float, timeout: float, interval: float, seconds: float) -> Optional[Pass]:
        """One pass: recompute every hour with rows written since the last pass; None if another holds the lock."""
        conn = self.ledger.conn
        conn.set_session(isolation_level="READ COMMITTED", readonly=False, autocommit=False)
        pid = conn.get_backend_pid()
        try:
            with deadline(seconds), conn.cursor() as cur:
                cur.execute("SET LOCAL statement_timeout = %s", (max(1, int(seconds * 1000)),))
                cur.execute("SET LOCAL TimeZone = 'UTC'")
                cur.execute(NO_JIT)  # as every read's: see ledger.NO_JIT
                # A transaction lock: it goes with the COMMIT, through a transaction pooler too.
                cur.execute(LOCK, (self.lock_key,))
                if not cur.fetchone()[0]:
                    return None
                done = self._pass(cur, gap, timeout, interval)
            conn.commit()
            return done
        except KeyboardInterrupt:
            self.ledger._cancel(pid)  # as prune's: not left running (and holding the lock) on the server
            raise
        finally:
            if not conn.closed:
                conn.rollback()

    def _pass(self, cur: Any, gap: float, timeout: float, interval: float) -> Pass:
        ledger = self.ledger
        ledger._describe(cur)
        types = column_types(cur, ledger._t)
        state = self.read_state(cur)
        if state is not None and types.get("ip_address") == "inet":
            cur.execute(self._q(MASKED))
            if cur.fetchone()[0]:
                cur.execute(self._q(HOST_MASKS))
        cur.execute(CLOCK)
        clock = as_utc(cur.fetchone()[0])  # the transaction's start: what committed before it is seen
        if state is None:
            cur.execute(self._q(ALL_HOURS))
            lo, hi = cur.fetchone()
            ranges = [] if lo is None else _slices(as_utc(lo), _hour(as_utc(hi)) + HOUR)
        else:
            gap = state.gap_seconds  # the kept gaps stay one threshold, whatever the config says now
            since = state.watermark - timedelta(seconds=timeout) - CLOCK_SKEW
            since_param = since.replace(tzinfo=None) if types.get("created_at") != "timestamptz" else since
            cur.execute(self._q(NEW_HOURS), {"since": since_param})
            ranges = _ranges([as_utc(r[0]) for r in cur.fetchall()])
        ms = sql.SQL(f"{LATENCY}::float8") if ledger.has_latency else sql.SQL("NULL::float8")
        cur.execute(ledger._q(TABLE_SERVICES))
        services = [r[0] for r in cur.fetchall()]
        rows = hours = 0
        for lo, hi in ranges:
            params = {"lo": ledger._param(lo), "hi": ledger._param(hi), "hlo": lo.replace(tzinfo=None),
                      "hhi": hi.replace(tzinfo=None), "backend": BACKEND, "all": WATCHER,
                      "cycles": round(3600 / interval), "gap": timedelta(seconds=gap), "services": services}
            cur.execute(self._q(UPSERT, ms=ms), params)
            rows += cur.rowcount
            cur.execute(self._q(EXPECTED), params)
            cur.execute(self._q(LINK), params)
            hours += int((hi - lo) / HOUR)
        covered = _hour(clock - timedelta(seconds=timeout) - CLOCK_SKEW)
        cur.execute(self._q(SAVE_STATE), {"name": self.name, "gap_seconds": gap, "watermark": clock.replace(tzinfo=None),
                                          "covered": covered.replace(tzinfo=None)})
        return Pass(hours, rows, covered, state is None)


@dataclass
class _Series:
    """One (service, ip)'s heartbeats over the window, as chunks joined in time order."""

    first: Optional[datetime] = None
    last: Optional[datetime] = None
    gaps: Optional[list[tuple[datetime, datetime]]] = None

    def add(self, first: datetime, last: datetime, inner: Sequence[tuple[datetime, datetime]], gap: float) -> None:
        """Append a later chunk: its gaps, and the gap from this series' last heartbeat to its first."""
        gaps = self.gaps if self.gaps is not None else []
        if self.last is not None and (first - self.last).total_seconds() > gap:
            gaps.append((self.last, first))
        gaps += inner
        self.first = first if self.first is None else self.first
        self.last = last
        self.gaps = gaps


def watched(start: datetime, stop: datetime, ongoing: bool, watcher: Sequence[tuple[datetime, datetime]],
            gap: float) -> tuple[list[Span], list[Span]]:
    """A server's gap split into (outages, no-data stretches) by the watcher's gaps longer than `gap`.

    The same split as outage.classify by the 后端 moments inside the gap: a stretch with no daemon
    is each watcher gap (a, b) cut to [start, stop], where it is still longer than `gap` (a moment
    at `start` or `stop` itself is not inside, as there). `watcher` includes the open ends before its
    first and after its last heartbeat.
    """
    holes = []
    for a, b in watcher:
        lo, hi = max(a, start), min(b, stop)
        if hi > lo and (hi - lo).total_seconds() > gap:
            holes.append(Span(lo, hi))
    # Between two holes a daemon was watching: an outage, of no length when one moment parts them.
    outages = [Span(a.end, b.start) for a, b in zip(holes, holes[1:])]
    if not holes:
        return [Span(start, stop, ongoing)], []
    if holes[0].start > start:
        outages.insert(0, Span(start, holes[0].start))
    if holes[-1].end < stop:
        outages.append(Span(holes[-1].end, stop, ongoing))
    return outages, holes


_PAST, _FUTURE = datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)
Key = tuple[str, str]


def _ceil_hour(value: datetime) -> datetime:
    return value if _hour(value) == value else _hour(value) + HOUR


class RollupReport:
    """`report` from whole rolled-up hours and the window's edges in raw rows: the raw report's figures."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.rollup = Rollup(ledger)
        # Where the last run's window started: `since`, or later where it was rounded up (the raw rows of its
        # first hour pruned), so that the report's header and JSON give the window its figures are of.
        self.since: Optional[datetime] = None

    def run(self, since: datetime, until: datetime, gap: float, now: datetime, service: Optional[str] = None,
            ip: Optional[str] = None, seconds: Optional[float] = None) -> tuple[list[PairReport], str]:
        """The report, and which rows it read (rollup hours, raw rows) in one line."""
        end = min(until, now)
        self.since = since
        state, pruned = self.ledger._read(lambda cur: self._state(cur, since))
        if state is None:
            return self.ledger.report(since, until, gap, now, service, ip, seconds), \
                "read raw rows only (no rollup yet: `heartbeatd rollup` makes it)"
        h0, h1 = _ceil_hour(since), min(_hour(end), state.covered_until)
        if gap < state.gap_seconds:
            return self.ledger.report(since, until, gap, now, service, ip, seconds), \
                f"read raw rows only (--gap {gap:g} is below the rollup's {state.gap_seconds:g} s)"
        if h1 <= h0:
            return self.ledger.report(since, until, gap, now, service, ip, seconds), \
                "read raw rows only (no whole rolled-up hour in the window)"
        note = ""
        if pruned:  # raw rows of the window's first (part) hour are pruned: start at its first whole hour
            since, note = h0, f"; --since rounded up to {_iso(h0)}: the raw rows before it are pruned"
            self.since = since
        found = self.ledger._read(lambda cur: self._work(cur, since, end, h0, h1, state.covered_until, gap,
                                                         service, ip), seconds)
        edges = " and ".join(f"{_iso(a)} .. {_iso(b)}" for a, b in ((since, h0), (h1, end)) if b > a)
        return list(found), (f"read hourly rollups for {_iso(h0)} .. {_iso(h1)} (pass of {_iso(state.passed_at)})"
                             + (f", raw rows for {edges}" if edges else "") + note)

    def _state(self, cur: Any, since: datetime) -> tuple[Optional[State], bool]:
        """The rollup's state, and whether prune has removed raw rows of the hour `since` falls in."""
        state = self.rollup.read_state(cur, missing_ok=True)
        if state is None or _hour(since) == since:
            return state, False
        hour = _hour(since)
        cur.execute(self.ledger._q(OLDEST_RAW), {"services": list(SERVICES), "lo": self.ledger._param(hour),
                                                 "hi": self.ledger._param(hour + HOUR)})
        oldest = cur.fetchone()[0]
        cur.execute(self.rollup._q(ROLLUP_FIRST), {"hour": hour.replace(tzinfo=None)})
        first = cur.fetchone()[0]
        return state, first is not None and (oldest is None or as_utc(first) < as_utc(oldest)) and \
            (oldest is None or as_utc(oldest) > since)

    def _work(self, cur: Any, since: datetime, end: datetime, h0: datetime, h1: datetime, covered: datetime,
              gap: float, service: Optional[str], ip: Optional[str]) -> list[PairReport]:
        ledger = self.ledger
        params: dict[str, Any] = {"gap": timedelta(seconds=gap), "backend": BACKEND, "all": WATCHER,
                                  "service": service, "ip": ip, "since": ledger._param(since),
                                  "until": ledger._param(end), "h0": h0.replace(tzinfo=None),
                                  "h1": h1.replace(tzinfo=None), "before_from": ledger._param(_hour(since)),
                                  "recent": ledger._param(max(since, end - timedelta(hours=1)))}
        filters = sql.SQL(" AND p.ip_address <> %(all)s") + only(service, ip)
        keys = self.rollup.pairs(cur, covered, since, end, service, ip)
        series: dict[Key, _Series] = {}
        if since < h0:
            self._raw(cur, since, h0, keys, params, series)
        self._rolled(cur, filters, params, series)
        if h1 < end:
            self._raw(cur, h1, end, keys, params, series)
        befores = self._befores(cur, sorted(series), params)
        watcher = self._watcher(cur, since, h0, h1, end, params) if any(k[0] != BACKEND for k in series) else []
        return self._assemble(cur, series, befores, watcher, since, end, gap, params)

    def _raw(self, cur: Any, lo: datetime, hi: datetime, keys: Sequence[Key], params: dict[str, Any],
             series: dict[Key, _Series]) -> None:
        """One edge's chunk of each pair from raw rows: first, last and gaps, as the raw report finds them."""
        raw = _Report(self.ledger)
        edge = dict(params, since=self.ledger._param(lo), until=self.ledger._param(hi))
        inner: dict[Key, list[tuple[datetime, datetime]]] = {}
        for svc, addr, prev, nxt in raw.gaps(cur, keys, edge):
            inner.setdefault((svc, addr), []).append((as_utc(prev), as_utc(nxt)))
        for svc, addr, first, last, _ in raw.spans(cur, keys, edge, before=NO_BEFORE):
            series.setdefault((svc, addr), _Series()).add(first, last, sorted(inner.get((svc, addr), [])),
                                                          params["gap"].total_seconds())

    def _rolled(self, cur: Any, filters: sql.Composable, params: dict[str, Any], series: dict[Key, _Series]) -> None:
        """The whole hours' chunk of each pair from the rollup."""
        for svc, addr, first, last, inner in self._rolled_rows(cur, filters, params):
            series.setdefault((svc, addr), _Series()).add(first, last, inner, params["gap"].total_seconds())

    def _rolled_rows(self, cur: Any, filters: sql.Composable, params: dict[str, Any]
                     ) -> list[tuple[str, str, datetime, datetime, list[tuple[datetime, datetime]]]]:
        cur.execute(self.rollup._q(ROLLUP_GAPS, filters=filters), params)
        inner: dict[Key, list[tuple[datetime, datetime]]] = {}
        for svc, addr, prev, nxt in cur.fetchall():
            inner.setdefault((svc, addr), []).append((as_utc(prev), as_utc(nxt)))
        cur.execute(self.rollup._q(ROLLUP_SPAN, filters=filters), params)
        return [(svc, addr, as_utc(first), as_utc(last), sorted(inner.get((svc, addr), [])))
                for svc, addr, first, last in sorted(cur.fetchall())]

    def _befores(self, cur: Any, keys: list[Key], params: dict[str, Any]) -> dict[Key, datetime]:
        """Each pair's last heartbeat before the window: in the raw rows of since's hour, else in the rollup."""
        found: dict[Key, datetime] = {}
        if not keys:
            return found
        cur.execute(self.ledger._q(RAW_BEFORE), dict(params, **self.ledger.given(keys)))
        rows = cur.fetchall()
        cur.execute(self.rollup._q(ROLLUP_BEFORE), dict(params, services=[k[0] for k in keys], ips=[k[1] for k in keys]))
        for svc, addr, when in rows + cur.fetchall():
            if when is not None:
                found[(svc, addr)] = max(found.get((svc, addr), _PAST), as_utc(when))
        return found

    def _watcher(self, cur: Any, since: datetime, h0: datetime, h1: datetime, end: datetime,
                 params: dict[str, Any]) -> list[tuple[datetime, datetime]]:
        """The gaps of all hosts' 后端 heartbeats together over the window, with its open ends."""
        gap = params["gap"].total_seconds()
        watcher = _Series()
        for lo, hi in ((since, h0), (h0, h1), (h1, end)):
            if hi <= lo:
                continue
            if (lo, hi) == (h0, h1):
                for _, _, first, last, inner in self._rolled_rows(
                        cur, sql.SQL(" AND p.service_name = %(backend)s AND p.ip_address = %(all)s"), params):
                    watcher.add(first, last, inner, gap)
                continue
            cur.execute(self.ledger._q(WATCH_RAW), dict(params, lo=self.ledger._param(lo), hi=self.ledger._param(hi)))
            moments = [as_utc(r[0]) for r in cur.fetchall()]
            if moments:
                watcher.add(moments[0], moments[-1], [(a, b) for a, b in zip(moments, moments[1:])
                                                      if (b - a).total_seconds() > gap], gap)
        if watcher.first is None or watcher.last is None:
            return [(_PAST, _FUTURE)]
        return [(_PAST, watcher.first)] + (watcher.gaps or []) + [(watcher.last, _FUTURE)]

    def _assemble(self, cur: Any, series: dict[Key, _Series], befores: dict[Key, datetime],
                  watcher: list[tuple[datetime, datetime]], since: datetime, end: datetime, gap: float,
                  params: dict[str, Any]) -> list[PairReport]:
        """The pairs' reports from their gaps, as ledger._Report.run makes them from raw rows."""
        pairs: dict[Key, PairReport] = {}
        edges: dict[Key, tuple[datetime, datetime, Optional[datetime]]] = {}
        found: list[tuple[Key, datetime, datetime, bool]] = []
        for key, s in sorted(series.items()):
            if s.first is None or s.last is None:
                continue
            before = befores.get(key)
            pairs[key] = PairReport(key[0], key[1], since if before is not None else s.first, end)
            edges[key] = (s.first, s.last, before)
            found += [(key, a, b, False) for a, b in s.gaps or []]
            found += [(key, a, b, ongoing) for a, b, ongoing in edge_gaps(s.first, s.last, before, end, gap)]
        for key, start, stop, ongoing in sorted(found, key=lambda g: (g[0], g[1])):
            report = pairs[key]
            start = max(start, since)
            if key[0] == BACKEND:
                report.outages.append(Span(start, stop, ongoing))
                continue
            if (stop - start).total_seconds() <= gap:
                # Only a gap cut short by the window's start: whether any daemon wrote inside it is
                # not in the watcher's gaps (they are all longer), so ask the raw rows as the raw report does.
                cur.execute(self.ledger._q(ALIVE_RAW), dict(params, start=self.ledger._param(start),
                                                            end=self.ledger._param(stop)))
                outages, no_data = classify(start, stop, ongoing, [as_utc(r[0]) for r in cur.fetchall()], gap)
            else:
                outages, no_data = watched(start, stop, ongoing, watcher, gap)
            report.outages += outages
            report.no_data += no_data
        raw = _Report(self.ledger)
        raw._reporters(cur, params, pairs)
        if self.ledger.has_latency:
            raw._latency(cur, pairs, edges)
        return list(pairs.values())


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"
