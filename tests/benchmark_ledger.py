"""Ledger benchmark (a script, not a test): status, report and prune at fleet size.

    python tests/benchmark_ledger.py [--hosts 100] [--days 30]

Generates a history in a private PostgreSQL: every host's 后端, redis and postgres rows every
30 s (100 hosts x 30 days = 25.9 million rows), each host's daemon down 10 minutes a day, Redis
down 5 minutes a day. Then times, as the commands run them (median of 3): `status`,
`report --since 24h` and `--since 30d` for everything, the 90-day HTML page, and `prune` of everything older than
7 days; and what the (service_name, ip_address, report_time) index costs each INSERT and in size.
Targets: status <= 100 ms, report 24h <= 1 s, report 30d <= 5 s, prune >= 500,000 rows/s.

    python tests/benchmark_ledger.py --rollup [--hosts 100] [--days 365] [--cadence 600]

Hourly rollups instead: a history of --days at one heartbeat per host every --cadence seconds (a
year of 100 hosts at 30 s is 315 million rows, too many for this machine: at 600 s it is 15.8
million, and the rollup has the same rows as at 30 s, one per pair and hour), each host down 30
minutes a day and Redis 30 minutes a day (gap 2 x cadence + 5 s). Times the first pass (the whole
table), a pass after a normal hour (one hour of every host at 30 s, written now), and
`report --since 1y` (--days) for the fleet and for one host from rollups, and once from raw rows,
checking that both find the same. Targets: a pass after an hour <= 1 s, the fleet <= 1 s, one host <= 100 ms.

    python tests/benchmark_ledger.py --partitioned [--hosts 100] [--days 5]

Prune on a partitioned table instead: the table as `heartbeatd init-db --partitioned --with-latency`
makes it (indexes on the parent, a DEFAULT partition), a partition a UTC day for the --days of history
before today (generated as above, from 00:00 UTC --days ago), then `prune` as the command runs it
(Ledger.prune: partitions ahead checked, the oldest day's partition counted and dropped whole, every
other partition looked at for rows below the cut) with the cut at the end of the oldest remaining day,
three times. Target: <= 100 ms.
With --page (e.g. --hosts 20 --days 90 --cadence 30 --page): also the 90-day HTML page, from raw rows
before the first pass and from rollups after it, with latency_ms kept as the page shows it (target <= 1 s).

    python tests/benchmark_ledger.py --full --keep DIR [--hosts 100] [--days 365] [--workers 2] [--min-free 24]

Issue 26's full-scale run: --days of --hosts at 30 s (100 x 365 = 315 million rows; at ~195 bytes a
row with the indexes, measured, that is ~61 GB; it loads the newest days first and stops while --min-free GB are
left, so a smaller disk gets the most recent days it holds) in the table as `init-db
--partitioned=day --with-latency` makes it. Generated fast: init-db makes the parent (its indexes, today's
and the days ahead's partitions, DEFAULT); each history day is loaded by one of --workers connections
into a table of its own (LIKE the parent, rows in time order), indexed as PostgreSQL indexes a partition
(CREATE INDEX with the names it picks, ADD PRIMARY KEY) and attached, so it ends with exactly the
partitions' indexes init-db's would have; then VACUUM (ANALYZE). The history ends at 00:00 UTC of the
day it is generated; a measuring run first adds the hours since, up to 3 hours ago. The cluster is kept in DIR (not removed):
a second run with the same --keep DIR skips the generation and measures, with the code as it is then
(median of 3 where cheap): the first rollup pass (once; a later run skips it while the rollup has rows), a
pass after a normal hour (each of the three hours before now, deleted first if an earlier run wrote them),
`report --since 1y` for the fleet and one host (rollups; once from raw rows: the same figures only before any
prune, since rollups keep the pruned days), `report --since 24h`, the 90-day page, and prune of the oldest
day's partition, three times (each run drops three days). --generate-only stops after the generation.
Remove DIR after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from servers import PgServer, remove_template  # noqa: E402

SEED = """
INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at, latency_ms)
SELECT s.name, CASE s.name WHEN '后端' THEN '10.60.' || (h / 250) || '.' || (h %% 250 + 1)
                           WHEN 'redis' THEN '10.1.0.1' ELSE '10.2.0.1' END,
       t, t, 0.2 + ((h * 7 + c.k * 13) %% 100) / 20.0
  FROM generate_series(0, %(hosts)s - 1) h,
       LATERAL (SELECT %(start)s::timestamp + k * interval '30 s' + h * interval '300 ms' AS t, k
                  FROM generate_series(0, %(cycles)s - 1) k) c,
       (VALUES ('后端'), ('redis'), ('postgres')) s(name)
 WHERE NOT (c.k %% 2880 BETWEEN (h * 29) %% 2860 AND (h * 29) %% 2860 + 19)
   AND NOT (s.name = 'redis' AND c.k %% 2880 BETWEEN 1000 AND 1009)
 ORDER BY t  -- in the order daemons write them: the heap is laid out by time, as in production
"""


def timed(fn, runs: int = 3) -> float:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--days", type=int, default=None, help="30, or 365 with --rollup")
    parser.add_argument("--rollup", action="store_true", help="the hourly rollups' benchmark")
    parser.add_argument("--cadence", type=int, default=600, help="--rollup: seconds between a host's heartbeats")
    parser.add_argument("--partitioned", action="store_true", help="prune of a day's partition")
    parser.add_argument("--page", action="store_true", help="--rollup: the 90-day page too, raw rows and rollups")
    parser.add_argument("--full", action="store_true", help="the full-scale run (issue 26): generate into --keep, measure")
    parser.add_argument("--keep", type=Path, help="--full: the kept PostgreSQL data directory")
    parser.add_argument("--workers", type=int, default=2, help="--full: connections generating days at once")
    parser.add_argument("--min-free", type=float, default=24, help="--full: GB the disk keeps free (fewer days if not)")
    parser.add_argument("--generate-only", action="store_true", help="--full: stop after the generation")
    args = parser.parse_args()
    if args.full:
        if args.keep is None:
            parser.error("--full needs --keep DIR")
        full_scale(args.hosts, args.days or 365, args.keep, args.workers, args.generate_only, args.min_free)
        return
    if args.partitioned:
        partitioned_prune(args.hosts, args.days or 5)
        return
    if args.rollup:
        rollups(args.hosts, args.days or 365, args.cadence, args.page)
        return
    args.days = args.days or 30
    pg = PgServer()
    pg.extra_opts = "-c shared_buffers=1GB -c maintenance_work_mem=1GB -c work_mem=64MB -c max_wal_size=8GB"
    pg.start()
    try:
        from heartbeatd.ledger import Ledger
        from heartbeatd.schema import CREATE_TABLE, PAIR_INDEX, index_name
        pg.sql(CREATE_TABLE.format(table="service_heartbeat", index=index_name(("service_heartbeat",))))
        pg.sql("DROP INDEX service_heartbeat_service_name_report_time_idx")
        pg.sql("ALTER TABLE service_heartbeat ADD COLUMN latency_ms real")  # report then shows p50/p95/max
        now = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)
        cycles = args.days * 2880
        start = now - timedelta(seconds=30 * cycles)
        t0 = time.perf_counter()
        pg.sql(SEED, {"hosts": args.hosts, "cycles": cycles, "start": start})  # type: ignore[arg-type]
        pg.sql(f"CREATE INDEX {index_name(('service_heartbeat',))} ON service_heartbeat (service_name, report_time)")
        pg.sql(PAIR_INDEX.format(concurrently="", index="service_heartbeat_service_ip_time_idx", table="service_heartbeat"))
        pg.sql("VACUUM ANALYZE service_heartbeat")
        rows = pg.sql("SELECT count(*) FROM service_heartbeat")[0][0]
        sizes = pg.sql("SELECT pg_size_pretty(pg_table_size('service_heartbeat')), "
                       "pg_size_pretty(pg_relation_size('service_heartbeat_service_name_report_time_idx')), "
                       "pg_size_pretty(pg_relation_size('service_heartbeat_service_ip_time_idx'))")[0]
        print(f"history: {args.hosts} hosts x {args.days} days = {rows:,} rows, generated in "
              f"{time.perf_counter() - t0:.0f} s; table {sizes[0]}, (service, report_time) index {sizes[1]}, "
              f"(service, ip, report_time) index {sizes[2]}; {os.cpu_count()} cores")

        conn = pg.connect()
        ledger = Ledger(conn, ("service_heartbeat",), 600, helper=pg.connect)  # as `heartbeatd report` reads
        now_aware = now.replace(tzinfo=timezone.utc)
        status = timed(lambda: ledger.latest(timedelta(days=1), 65, now_aware))
        day = timed(lambda: ledger.report(now_aware - timedelta(days=1), now_aware, 65, now_aware, seconds=600))
        month = timed(lambda: ledger.report(now_aware - timedelta(days=args.days), now_aware, 65, now_aware,
                                            seconds=600), runs=1)
        found = ledger.report(now_aware - timedelta(days=1), now_aware, 65, now_aware, seconds=600)
        outages = sum(len(p.outages) for p in found)
        print(f"status (latest per service and IP):   {status * 1000:8.1f} ms  (target <= 100 ms)")
        print(f"report --since 24h, everything:       {day * 1000:8.1f} ms  (target <= 1000 ms; "
              f"{len(found)} pairs, {outages} outages)")
        print(f"report --since {args.days}d, everything:       {month * 1000:8.1f} ms  (target <= 5000 ms)")
        from heartbeatd import page  # the status page: one 90-day report, clipped to days, as HTML
        text = page.html(page.gather(ledger, now_aware, 65, now_aware, seconds=600))
        html = timed(lambda: page.html(page.gather(ledger, now_aware, 65, now_aware, seconds=600)), runs=1)
        print(f"report --format html (90 days):       {html * 1000:8.1f} ms  (target <= 1000 ms; {len(text):,} chars)")
        # The same reads of a table without latency_ms (dropping a column only changes the catalog).
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("ALTER TABLE service_heartbeat DROP COLUMN latency_ms")
        day_bare = timed(lambda: ledger.report(now_aware - timedelta(days=1), now_aware, 65, now_aware, seconds=600))
        print(f"report --since 24h without latency_ms: {day_bare * 1000:8.1f} ms")

        # What the extra index costs an INSERT: the same 3-row INSERTs, with and without it.
        conn.autocommit = True
        insert = ("INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at) VALUES "
                  "('后端', '10.99.0.1', %s, %s), ('redis', '10.1.0.1', %s, %s), ('postgres', '10.2.0.1', %s, %s)")

        def inserts() -> None:
            with conn.cursor() as cur:
                for n in range(2000):
                    at = now + timedelta(seconds=n)
                    cur.execute(insert, (at,) * 6)

        with_index = timed(inserts)
        pg.sql("DROP INDEX service_heartbeat_service_ip_time_idx")
        without = timed(inserts)
        print(f"3-row INSERT with the extra index:    {with_index / 2000 * 1e6:8.1f} us, without {without / 2000 * 1e6:.1f} us")
        pg.sql(PAIR_INDEX.format(concurrently="", index="service_heartbeat_service_ip_time_idx", table="service_heartbeat"))

        before = pg.sql("SELECT count(*) FROM service_heartbeat")[0][0]
        t0 = time.perf_counter()
        removed = Ledger(conn, ("service_heartbeat",), 600).prune(now_aware - timedelta(days=7), False, lambda n: None)
        took = time.perf_counter() - t0
        assert removed is not None
        after = pg.sql("SELECT count(*) FROM service_heartbeat")[0][0]
        assert before - after == removed
        print(f"prune older than 7d:                  {removed:,} rows in {took:.1f} s = {removed / took:,.0f} rows/s "
              "(target >= 500,000 rows/s)")
        conn.close()
    finally:
        pg.destroy()


ROLLUP_SEED = """
INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at{ms_column})
SELECT s.name, CASE s.name WHEN '后端' THEN '10.60.' || (h / 250) || '.' || (h %% 250 + 1)
                           WHEN 'redis' THEN '10.1.0.1' ELSE '10.2.0.1' END, t, t{ms_value}
  FROM generate_series(0, %(hosts)s - 1) h,
       LATERAL (SELECT %(start)s::timestamp + k * %(cadence)s + h * interval '300 ms' AS t, k
                  FROM generate_series(0, %(cycles)s - 1) k) c,
       (VALUES ('后端'), ('redis'), ('postgres')) s(name)
 WHERE NOT (c.k %% %(per_day)s BETWEEN (h * 29) %% (%(per_day)s - 3) AND (h * 29) %% (%(per_day)s - 3) + 2)
   AND NOT (s.name = 'redis' AND c.k %% %(per_day)s BETWEEN %(per_day)s / 3 AND %(per_day)s / 3 + 2)
 ORDER BY t
"""
# One normal hour of the fleet at 30 s, written now (created_at now): what an hourly pass meets.
HOUR_SEED = """
INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at)
SELECT s.name, CASE s.name WHEN '后端' THEN '10.60.' || (h / 250) || '.' || (h %% 250 + 1)
                           WHEN 'redis' THEN '10.1.0.1' ELSE '10.2.0.1' END, t, now() AT TIME ZONE 'UTC'
  FROM generate_series(0, %(hosts)s - 1) h,
       LATERAL (SELECT %(start)s::timestamp + k * interval '30 s' + h * interval '300 ms' AS t
                  FROM generate_series(0, 119) k) c,
       (VALUES ('后端'), ('redis'), ('postgres')) s(name)
 ORDER BY t
"""


def partitioned_prune(hosts: int, days: int) -> None:
    """Time prune dropping one day's partition of a partitioned history (three days, one after another)."""
    import subprocess
    from heartbeatd.ledger import Ledger
    pg = PgServer()
    pg.extra_opts = "-c shared_buffers=1GB -c maintenance_work_mem=1GB -c work_mem=64MB -c max_wal_size=8GB"
    pg.start()
    try:
        subprocess.run([sys.executable, "-m", "heartbeatd", "init-db", "--partitioned=day", "--with-latency"],
                       check=True, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, DATABASE_URL=pg.url(), HEARTBEAT_ENV_FILE="/nonexistent/heartbeatd.env"))
        today = datetime.now(timezone.utc).replace(tzinfo=None, hour=0, minute=0, second=0, microsecond=0)
        start = today - timedelta(days=days)
        for n in range(days):  # the days before today, named as init-db names them
            d = start + timedelta(days=n)
            pg.sql(f"CREATE TABLE service_heartbeat_p{d:%Y%m%d} PARTITION OF service_heartbeat "
                   f"FOR VALUES FROM ('{d:%Y-%m-%d}') TO ('{d + timedelta(days=1):%Y-%m-%d}')")
        t0 = time.perf_counter()
        pg.sql(SEED, {"hosts": hosts, "cycles": days * 2880, "start": start})  # type: ignore[arg-type]
        pg.sql("VACUUM ANALYZE service_heartbeat")
        rows = pg.sql("SELECT count(*) FROM service_heartbeat")[0][0]
        strays = pg.sql("SELECT count(*) FROM service_heartbeat_default")[0][0]
        size = pg.sql("SELECT pg_size_pretty(sum(pg_total_relation_size(relid))) "
                      "FROM pg_partition_tree('service_heartbeat')")[0][0]
        per_day = pg.sql(f"SELECT count(*) FROM service_heartbeat_p{start:%Y%m%d}")[0][0]
        print(f"history: {hosts} hosts x {days} days = {rows:,} rows ({per_day:,} a day, {strays} in DEFAULT), "
              f"partitioned by day, {size} with indexes, generated in {time.perf_counter() - t0:.0f} s; "
              f"{os.cpu_count()} cores")
        _prune_days(pg, start, min(days, 3))
    finally:
        pg.destroy()


def _prune_days(pg: Any, start: datetime, count: int) -> None:
    """prune as the command runs it, the cut at the end of the oldest day, then the next: `count` times."""
    from heartbeatd.ledger import Ledger
    samples = []
    for n in range(1, count + 1):
        conn = pg.connect()
        ledger = Ledger(conn, ("service_heartbeat",), 60, helper=pg.connect)
        dropped: list[tuple[str, int, bool]] = []
        cut = (start + timedelta(days=n)).replace(tzinfo=timezone.utc)
        began = time.perf_counter()  # a dry run first: what counting (and looking) costs, without the DROP
        ledger.prune(cut, True, lambda k: None)
        dry = time.perf_counter() - began
        conn.close()
        conn = pg.connect()
        ledger = Ledger(conn, ("service_heartbeat",), 60, helper=pg.connect)
        began = time.perf_counter()
        removed = ledger.prune(cut, False, lambda k: None, lambda name, k, about: dropped.append((name, k, about)))
        samples.append(time.perf_counter() - began)
        conn.close()
        print(f"prune, cut at {start + timedelta(days=n)}: {samples[-1] * 1000:7.1f} ms (its dry run "
              f"{dry * 1000:.1f} ms), "
              f"dropped {dropped}, {removed:,} row(s) removed", flush=True)
    print(f"prune of one day's partition: median {statistics.median(samples) * 1000:.1f} ms "
          f"(target <= 100 ms)")


def _kept_server(keep: Path) -> Any:
    """A PgServer whose data directory is `keep` (a copy of the template the first time), not removed after."""
    import shutil
    pg = PgServer()
    shutil.rmtree(pg.root, ignore_errors=True)
    pg.root = keep
    pg.data = keep / "data"
    pg.log = keep / "server.log"
    if not pg.data.exists():
        keep.mkdir(parents=True, exist_ok=True)
        pg.root = Path(str(keep))
        import subprocess
        from servers import _chown_postgres, _template
        _chown_postgres(keep)
        subprocess.run(["cp", "-a", str(_template()), str(pg.data)], check=True)
    pg.extra_opts = ("-c shared_buffers=2GB -c maintenance_work_mem=1GB -c work_mem=64MB -c max_wal_size=4GB "
                     "-c autovacuum=off -c max_parallel_maintenance_workers=0")
    return pg


# --cycles heartbeats of every host from --start at 30 s, the k-th being cycle k0 + k of its UTC day: the
# same history as SEED's, a span at a time (a day's table, or the hours before a measurement).
SPAN_SEED = """
INSERT INTO {table} (service_name, ip_address, report_time, created_at, latency_ms)
SELECT s.name, CASE s.name WHEN '后端' THEN '10.60.' || (h / 250) || '.' || (h %% 250 + 1)
                           WHEN 'redis' THEN '10.1.0.1' ELSE '10.2.0.1' END,
       t, t, 0.2 + ((h * 7 + c.k * 13) %% 100) / 20.0
  FROM generate_series(0, %(hosts)s - 1) h,
       LATERAL (SELECT %(start)s::timestamp + k * interval '30 s' + h * interval '300 ms' AS t,
                       (%(k0)s + k) %% 2880 AS k
                  FROM generate_series(0, %(cycles)s - 1) k) c,
       (VALUES ('后端'), ('redis'), ('postgres')) s(name)
 WHERE NOT (c.k BETWEEN (h * 29) %% 2860 AND (h * 29) %% 2860 + 19)
   AND NOT (s.name = 'redis' AND c.k BETWEEN 1000 AND 1009)
 ORDER BY t
"""


def _generate(pg: Any, hosts: int, days: int, workers: int, min_free: float) -> int:
    """The history of up to `days` days before today, a partition each, loaded `workers` at a time, newest first,
    while the disk keeps `min_free` GB free after the next day (see the docstring); the days loaded."""
    import shutil
    import subprocess
    import threading
    subprocess.run([sys.executable, "-m", "heartbeatd", "init-db", "--partitioned=day", "--with-latency"],
                   check=True, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, DATABASE_URL=pg.url(), HEARTBEAT_ENV_FILE="/nonexistent/heartbeatd.env"))
    today = datetime.now(timezone.utc).replace(tzinfo=None, hour=0, minute=0, second=0, microsecond=0)
    queue = [today - timedelta(days=n) for n in range(1, days + 1)]  # newest first: a history up to today
    loaded: list[datetime] = []
    lock = threading.Lock()
    failures: list[BaseException] = []
    t0 = time.perf_counter()

    def work() -> None:
        conn = pg.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SET work_mem = '256MB'")
                while True:
                    with lock:
                        day_bytes = 200 * hosts * 8640  # ~190 bytes a row with the indexes, and some
                        if not queue or failures or shutil.disk_usage(pg.root).free - (workers * day_bytes) < min_free * 1e9:
                            queue.clear()
                            return
                        d = queue.pop(0)
                    name = f"service_heartbeat_p{d:%Y%m%d}"
                    cur.execute(f"CREATE TABLE {name} (LIKE service_heartbeat INCLUDING DEFAULTS)")
                    cur.execute(SPAN_SEED.format(table=name), {"hosts": hosts, "start": d, "k0": 0, "cycles": 2880})
                    # As PostgreSQL makes a partition's indexes from the parent's: the same names and definitions.
                    cur.execute(f"ALTER TABLE {name} ADD PRIMARY KEY (id, report_time)")
                    cur.execute(f"CREATE INDEX ON {name} (service_name, report_time)")
                    cur.execute(f"CREATE INDEX ON {name} (service_name, ip_address, report_time)")
                    cur.execute(f"CREATE INDEX ON {name} USING brin (created_at)")
                    cur.execute(f"ALTER TABLE service_heartbeat ATTACH PARTITION {name} "
                                f"FOR VALUES FROM ('{d:%Y-%m-%d}') TO ('{d + timedelta(days=1):%Y-%m-%d}')")
                    with lock:
                        loaded.append(d)
                    print(f"  {name} loaded ({len(queue)} to go, {time.perf_counter() - t0:.0f} s)", flush=True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            with lock:
                failures.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    took = time.perf_counter() - t0
    pg.sql("VACUUM (ANALYZE) service_heartbeat")
    print(f"generated {len(loaded)} days in {took:.0f} s, VACUUM (ANALYZE) {time.perf_counter() - t0 - took:.0f} s; "
          f"{shutil.disk_usage(pg.root).free / 1e9:.0f} GB free", flush=True)
    return len(loaded)


def full_scale(hosts: int, days: int, keep: Path, workers: int, generate_only: bool, min_free: float) -> None:
    """Issue 26's full-scale run (see the module's docstring)."""
    pg = _kept_server(keep)
    fresh = not (pg.data / "generated").exists()
    pg.start()
    try:
        if fresh:
            days = _generate(pg, hosts, days, workers, min_free)
            end = datetime.now(timezone.utc).replace(tzinfo=None, hour=0, minute=0, second=0, microsecond=0)
            (pg.data / "generated").write_text(f"{hosts} {days} {end:%Y-%m-%dT%H:%M:%S}\n")
        words = (pg.data / "generated").read_text().split()
        hosts, days, end = int(words[0]), int(words[1]), datetime.fromisoformat(words[2])
        rows, size, parts = pg.sql("SELECT sum(c.reltuples)::bigint, pg_size_pretty(sum(pg_total_relation_size(t.relid))), "
                                   "count(*) FROM pg_partition_tree('service_heartbeat') t "
                                   "JOIN pg_class c ON c.oid = t.relid WHERE t.isleaf")[0]
        print(f"history: {hosts} hosts x {days} days at 30 s = about {rows:,} rows, partitioned by day "
              f"({parts} partitions), {size} with indexes; {os.cpu_count()} cores", flush=True)
        if generate_only:
            return
        _measure_full(pg, hosts, days, end)
    finally:
        pg.stop()


def _measure_full(pg: Any, hosts: int, days: int, end: datetime) -> None:
    from heartbeatd import rollup
    from heartbeatd.ledger import Ledger
    gap = 65.0  # HEARTBEAT_INTERVAL 30, HEARTBEAT_TIMEOUT 5: 2 x 30 + 5
    conn = pg.connect()
    conn.autocommit = True
    rollup.init_db(conn, ("service_heartbeat",), 600)
    ledger = Ledger(conn, ("service_heartbeat",), 600, helper=pg.connect)
    now = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)
    now -= timedelta(seconds=now.second % 30)  # on the history's 30-s grid
    done = pg.sql("SELECT count(*) FROM service_heartbeat_hourly")[0][0]
    if not done:  # the history up to 3 hours ago (the rows of today so far, or since it was generated), then a pass
        last = pg.sql("SELECT max(report_time) FROM service_heartbeat")[0][0]  # from where the history ends
        start = max(end, last.replace(microsecond=0) - timedelta(seconds=last.second % 30) + timedelta(seconds=30))
        span = int((now - timedelta(hours=3) - start).total_seconds()) // 30  # up to the hours below
        if span > 0:
            pg.sql(SPAN_SEED.format(table="service_heartbeat"), {"hosts": hosts, "start": start,
                                                                  "k0": (start.hour * 3600 + start.minute * 60
                                                                         + start.second) // 30,
                                                                  "cycles": span})
        t0 = time.perf_counter()
        first = rollup.Rollup(ledger).run(gap, 5, 30, 6 * 3600)
        assert first is not None
        took = time.perf_counter() - t0
        size = pg.sql("SELECT count(*), pg_size_pretty(pg_total_relation_size('service_heartbeat_hourly')) "
                      "FROM service_heartbeat_hourly")[0]
        print(f"first pass (every hour of the table):  {took:8.1f} s  ({first.hours:,} hours, {size[0]:,} rollup rows, "
              f"{size[1]})", flush=True)
        pg.sql("ANALYZE service_heartbeat_hourly")
    hours = [now - timedelta(hours=n) for n in (3, 2, 1)]
    pg.sql("DELETE FROM service_heartbeat WHERE report_time >= %s", (hours[0],))  # an earlier measuring run's
    passes = []
    for hour in hours:  # an hour of today at 30 s, written now, then a pass
        pg.sql(HOUR_SEED, {"hosts": hosts, "start": hour})
        t0 = time.perf_counter()
        after = rollup.Rollup(ledger).run(gap, 5, 30, 600)
        passes.append(time.perf_counter() - t0)
        assert after is not None
    print(f"pass after a normal hour ({hosts * 360:,} rows): "
          f"{' / '.join(f'{p * 1000:.0f}' for p in passes)} ms, median {statistics.median(passes) * 1000:.0f} ms "
          "(target <= 1000 ms)", flush=True)
    _rollup_reports(ledger, hosts, 365, gap)  # report --since 1y
    now_aware = datetime.now(timezone.utc)
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        found, source = rollup.RollupReport(ledger).run(now_aware - timedelta(days=1), now_aware, gap, now_aware,
                                                        seconds=600)
        samples.append(time.perf_counter() - t0)
    print(f"report --since 24h, everything: {' / '.join(f'{p * 1000:.0f}' for p in samples)} ms, median "
          f"{statistics.median(samples) * 1000:.0f} ms ({len(found)} pairs)\n  {source}", flush=True)
    _page(ledger, now_aware.replace(tzinfo=None), gap, "after the first pass")
    conn.close()
    oldest = pg.sql("SELECT min(report_time) FROM service_heartbeat")[0][0]  # an earlier run pruned some
    _prune_days(pg, oldest.replace(hour=0, minute=0, second=0, microsecond=0), min(days, 3))


def rollups(hosts: int, days: int, cadence: int, with_page: bool = False) -> None:
    """The rollup benchmark (see the module's docstring)."""
    from heartbeatd import rollup, schema
    from heartbeatd.ledger import Ledger
    from heartbeatd.schema import CREATE_TABLE, PAIR_INDEX, index_name
    pg = PgServer()
    pg.extra_opts = "-c shared_buffers=1GB -c maintenance_work_mem=1GB -c work_mem=64MB -c max_wal_size=8GB"
    pg.start()
    try:
        pg.sql(CREATE_TABLE.format(table="service_heartbeat", index=index_name(("service_heartbeat",))))
        now = datetime.now(timezone.utc).replace(tzinfo=None, minute=0, second=0, microsecond=0)
        per_day = 86400 // cadence
        start = now - timedelta(days=days) - timedelta(hours=1)  # the last hour comes at 30 s, below
        t0 = time.perf_counter()
        if with_page:  # the page shows latency p50/p95: keep latency_ms, as the 30-s history does
            pg.sql("ALTER TABLE service_heartbeat ADD COLUMN latency_ms real")
        seed = ROLLUP_SEED.format(ms_column=", latency_ms" if with_page else "",
                                  ms_value=", 0.2 + ((h * 7 + c.k * 13) %% 100) / 20.0" if with_page else "")
        pg.sql(seed, {"hosts": hosts, "cycles": days * per_day, "start": start,  # type: ignore[arg-type]
                             "cadence": timedelta(seconds=cadence), "per_day": per_day})
        pg.sql(PAIR_INDEX.format(concurrently="", index="service_heartbeat_service_ip_time_idx", table="service_heartbeat"))
        conn = pg.connect()
        conn.autocommit = True
        schema.init_db(conn, ("service_heartbeat",), 600)  # the created_at index a pass reads by
        rollup.init_db(conn, ("service_heartbeat",), 600)
        pg.sql("VACUUM ANALYZE service_heartbeat")
        rows = pg.sql("SELECT count(*) FROM service_heartbeat")[0][0]
        print(f"history: {hosts} hosts x {days} days at {cadence} s = {rows:,} rows, generated in "
              f"{time.perf_counter() - t0:.0f} s; {os.cpu_count()} cores")
        gap = 2 * cadence + 5
        ledger = Ledger(conn, ("service_heartbeat",), 600, helper=pg.connect)
        raw_page = _page(ledger, now, gap, "raw rows, before the first pass") if with_page else None
        t0 = time.perf_counter()
        first = rollup.Rollup(ledger).run(gap, 5, cadence, 3600)
        assert first is not None
        took = time.perf_counter() - t0
        size = pg.sql("SELECT count(*), pg_size_pretty(pg_total_relation_size('service_heartbeat_hourly')) "
                      "FROM service_heartbeat_hourly")[0]
        print(f"first pass (every hour of the table):  {took:8.1f} s  ({first.hours:,} hours, {size[0]:,} rollup rows, {size[1]})")
        if raw_page is not None:  # the same rows as the raw page read: the same page
            pg.sql("ANALYZE")
            print(f"  the same page: {_page(ledger, now, gap, 'rollups') == raw_page}")
        pg.sql(HOUR_SEED, {"hosts": hosts, "start": now - timedelta(hours=1)})  # type: ignore[arg-type]
        t0 = time.perf_counter()
        after = rollup.Rollup(ledger).run(gap, 5, cadence, 600)
        took = time.perf_counter() - t0
        assert after is not None
        print(f"pass after a normal hour ({hosts * 360:,} rows): {took * 1000:8.1f} ms  ({after.hours} hours; target <= 1000 ms)")
        _rollup_reports(ledger, hosts, days, gap)
        conn.close()
    finally:
        pg.destroy()


def _page(ledger: Any, naive_until: datetime, gap: float, label: str) -> str:
    """Time the 90-day page as `report --format html` makes it (median of 3); its text, its note cut out."""
    import re

    from heartbeatd import page
    now = naive_until.replace(tzinfo=timezone.utc)  # the page up to the generated history's end
    took = timed(lambda: page.html(page.gather(ledger, now, gap, now, seconds=600)))
    shown = page.gather(ledger, now, gap, now, seconds=600)
    text = page.html(shown)
    print(f"report --format html (90 days), {label}: {took * 1000:8.1f} ms  (target <= 1000 ms; "
          f"{len(shown.pairs)} pairs, {len(text):,} chars)\n  {shown.source}")
    return re.sub(r'<p class="source">.*?</p>', "", text)


def _rollup_reports(ledger: Any, hosts: int, days: int, gap: float) -> None:
    """report --since {days}d from rollups, the fleet and one host; and once from raw rows, the same."""
    from heartbeatd.rollup import RollupReport
    now = datetime.now(timezone.utc)
    since = now - timedelta(days=days)
    host = "10.60.0.1"
    fleet = timed(lambda: RollupReport(ledger).run(since, now, gap, now, seconds=600))
    one = timed(lambda: RollupReport(ledger).run(since, now, gap, now, ip=host, seconds=600))
    found, source = RollupReport(ledger).run(since, now, gap, now, seconds=600)
    print(f"report --since {days}d, fleet, rollups:     {fleet * 1000:8.1f} ms  (target <= 1000 ms; {len(found)} pairs, "
          f"{sum(len(p.outages) for p in found):,} outages)\n  {source}")
    print(f"report --since {days}d, one host, rollups:  {one * 1000:8.1f} ms  (target <= 100 ms)")
    # Compared from the first whole hour of raw rows still kept (an earlier measuring run prunes days the
    # rollup keeps).
    with ledger.conn.cursor() as cur:
        cur.execute("SELECT min(report_time) FROM service_heartbeat")
        oldest = cur.fetchone()[0].replace(tzinfo=timezone.utc)
    ledger.conn.rollback()
    kept = max(since, oldest.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1))
    for label, ip in (("fleet", None), ("one host", host)):
        t0 = time.perf_counter()
        raw = ledger.report(kept, now, gap, now, ip=ip, seconds=3600)
        took = time.perf_counter() - t0
        same = raw == RollupReport(ledger).run(kept, now, gap, now, ip=ip, seconds=600)[0]
        print(f"report from {kept:%Y-%m-%d %H:%M}, {label}, raw rows: {took * 1000:8.1f} ms  "
              f"(the same figures as from rollups: {same})")


if __name__ == "__main__":
    try:
        main()
    finally:
        remove_template()  # the run's initdb template: a benchmark leaves nothing in the temp dir either
