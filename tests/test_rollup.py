"""Hourly rollups: a report from rollups and raw edges finds what a raw-row report finds, on real PostgreSQL."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

import pytest

from conftest import clean_env, cli, db_url, init_table
from servers import PgServer

from heartbeatd.ledger import Ledger
from heartbeatd.outage import PairReport
from heartbeatd.rollup import Rollup, RollupReport, watched
from heartbeatd.outage import classify

UTC = timezone.utc
H, M, S = timedelta(hours=1), timedelta(minutes=1), timedelta(seconds=1)
NOW = datetime.now(UTC).replace(microsecond=0)
T0 = (NOW - 30 * H).replace(minute=0, second=0)
HOSTS = ("10.0.0.1", "10.0.0.2", "10.0.0.3")
REDIS, PG = "10.1.0.1", "10.2.0.1"


def spans(rng: random.Random, count: int, longest: float) -> list[tuple[timedelta, timedelta]]:
    """`count` random down stretches in the 30 hours, up to `longest` minutes each (many cross an hour)."""
    found = []
    for _ in range(count):
        start = timedelta(minutes=rng.uniform(0, 29.5 * 60))
        found.append((start, start + timedelta(minutes=rng.uniform(0.5, longest))))
    return found


def history(seed: int) -> list[tuple[str, str, datetime, datetime, float]]:
    """30 hours of three hosts at 30 s (offsets 0/10/20 s, jittered), with random outages of each host,
    of all hosts at once (no data), of Redis and of PostgreSQL; every row written 0.1 s after its check."""
    rng = random.Random(seed)
    everyone = spans(rng, 3, 50)
    down = {h: spans(rng, 6, 40) + everyone for h in HOSTS}
    redis_down, pg_down = spans(rng, 6, 30), spans(rng, 6, 30)
    rows = []
    for i, host in enumerate(HOSTS):
        for n in range(30 * 120):
            at = timedelta(seconds=30 * n + 10 * i + rng.uniform(0, 0.5))
            if any(a <= at < b for a, b in down[host]):
                continue
            when = (T0 + at).replace(tzinfo=None)
            late = when + timedelta(seconds=0.1)
            latency = round(rng.uniform(0.1, 9.0), 3)
            rows.append(("后端", host, when, late, latency))
            if not any(a <= at < b for a, b in redis_down):
                rows.append(("redis", REDIS, when, late, latency))
            if not any(a <= at < b for a, b in pg_down):
                rows.append(("postgres", PG, when, late, latency))
    return rows


def insert(pg: PgServer, rows: list[tuple[str, str, datetime, datetime, float]]) -> None:
    conn = pg.connect(pg.dbname)
    with conn.cursor() as cur:
        cur.execute("SET TimeZone = 'UTC'")
        cur.executemany("INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at, latency_ms) "
                        "VALUES (%s, %s, %s, %s, %s)", rows)
    conn.close()


@pytest.fixture
def table(pg: PgServer) -> PgServer:
    """The table with latency_ms, and the rollup tables, as init-db makes them."""
    init_table(pg)
    pg.sql("ALTER TABLE service_heartbeat ADD COLUMN latency_ms double precision", db=pg.dbname)
    result = cli(["init-db"], env_for(pg))
    assert result.returncode == 0, result.stderr
    assert "created rollup table service_heartbeat_hourly" in result.stdout
    return pg


def env_for(pg: PgServer) -> dict[str, str]:
    return clean_env(DATABASE_URL=db_url(pg), HEARTBEAT_INTERVAL="30", HEARTBEAT_TIMEOUT="5")


def ledger(pg: PgServer) -> Ledger:
    return Ledger(pg.connect(pg.dbname), ("service_heartbeat",), 60, helper=lambda: pg.connect(pg.dbname))


def roll(pg: PgServer) -> Any:
    led = ledger(pg)
    try:
        return Rollup(led).run(65, 5, 30, 120)
    finally:
        led.conn.close()


def both(pg: PgServer, since: datetime, until: datetime, gap: float = 65, service: Optional[str] = None,
         ip: Optional[str] = None) -> tuple[list[PairReport], list[PairReport], str]:
    """(raw-row report, rollup report, what the rollup report says it read)."""
    led = ledger(pg)
    try:
        raw = led.report(since, until, gap, NOW, service, ip, 60)
        rolled, source = RollupReport(led).run(since, until, gap, NOW, service, ip, 60)
    finally:
        led.conn.close()
    return raw, rolled, source


def late_backend_rows(conn: Any, behind: str) -> None:
    """Two hours of one host's 后端 rows in a hole of its history, their created_at `behind` the server's clock."""
    hole = T0 + 10 * H + 7 * M
    with conn.cursor() as cur:
        cur.execute("SET TimeZone = 'UTC'")
        cur.execute("INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at) "
                    "SELECT '后端', %s, t, now() AT TIME ZONE 'UTC' - %s::interval "
                    "FROM generate_series(%s::timestamp, %s::timestamp, interval '30 s') t",
                    (HOSTS[0], behind, hole.replace(tzinfo=None), (hole + 2 * H).replace(tzinfo=None)))


def assert_rollups_agree(pg: PgServer) -> None:
    """A report from rollups finds what one from raw rows finds, in every window."""
    for since, until in WINDOWS:
        raw, rolled, _ = both(pg, since, until)
        assert rolled == raw, (since, until)


WINDOWS = [(T0 - 2 * H, NOW), (T0 + 17 * M + 3 * S, NOW), (T0 + 3 * H, T0 + 20 * H),
           (T0 + 2 * H + 41 * M + 7 * S, T0 + 22 * H + 5 * M + 13 * S), (T0 + 5 * H + 59 * M, T0 + 9 * H + 1 * M)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rollup_report_agrees_with_raw_rows_under_late_rows(table: PgServer, seed: int) -> None:
    rows = history(seed)
    rng = random.Random(seed)
    late = set(rng.sample(range(len(rows)), len(rows) // 20))  # 5 % spooled: written after the first pass
    insert(table, [r for i, r in enumerate(rows) if i not in late])
    first = roll(table)
    assert first.first and first.hours >= 30
    for since, until in WINDOWS:
        raw, rolled, source = both(table, since, until)
        assert "read hourly rollups" in source
        assert rolled == raw, (since, until)
    # The late rows, written now with their original report_time, hours back: the next pass finds
    # them by created_at and recomputes their hours.
    now = datetime.now(UTC).replace(tzinfo=None)
    insert(table, [(s, ip, t, now, ms) for i, (s, ip, t, _, ms) in enumerate(rows) if i in late])
    again = roll(table)
    assert not again.first and again.hours >= 25
    for since, until in WINDOWS:
        for gap in (65.0, 200.0):
            raw, rolled, source = both(table, since, until, gap)
            assert rolled == raw, (since, until, gap)
    raw, rolled, _ = both(table, T0 + 17 * M, NOW, ip=HOSTS[1])
    assert rolled == raw and len(raw) == 1
    raw, rolled, _ = both(table, T0 + 17 * M, NOW, service="redis")
    assert rolled == raw and len(raw) == 1 and raw[0].outages


def test_a_transaction_committed_after_the_pass_is_still_rolled_up(table: PgServer) -> None:
    insert(table, history(4))
    roll(table)
    # A daemon's write in flight while the pass looked: created_at stamped before the pass's clock,
    # committed after it. It fills an hour-old gap of host 1's, so the report changes.
    writer = table.connect(table.dbname)
    writer.autocommit = False
    late_backend_rows(writer, "3 s")
    roll(table)  # does not see it yet
    writer.commit()
    writer.close()
    roll(table)
    assert_rollups_agree(table)


def test_rollups_outlive_pruned_raw_rows(table: PgServer) -> None:
    insert(table, history(5))
    cut = T0 + 12 * H
    before, _, _ = both(table, T0, NOW - 3 * H)
    rounded, _, _ = both(table, T0 + 6 * H, NOW - 3 * H)
    assert roll(table).first
    # What prune does, for any of its methods: the raw rows before the cut are gone; the rollup stays.
    table.sql("DELETE FROM service_heartbeat WHERE report_time < %s", (cut.replace(tzinfo=None),), db=table.dbname)
    roll(table)
    assert table.sql("SELECT count(*) FROM service_heartbeat_hourly WHERE hour < %s",
                     (cut.replace(tzinfo=None),), db=table.dbname)[0][0] >= 12 * 6
    _, after, source = both(table, T0, NOW - 3 * H)
    assert "read hourly rollups for " + T0.replace(tzinfo=None).isoformat() in source

    def facts(found: list[PairReport]) -> list[Any]:  # latency is sampled from the raw rows still kept
        return [(p.service, p.ip, p.observed_from, p.outages, p.no_data, p.uptime) for p in found]
    assert facts(after) == facts(before)
    # A window starting inside a pruned hour starts at its next whole hour, and says so.
    _, after, source = both(table, T0 + 5 * H + 20 * M, NOW - 3 * H)
    assert source.endswith(f"; --since rounded up to {(T0 + 6 * H).replace(tzinfo=None).isoformat()}Z: "
                           "the raw rows before it are pruned")
    assert facts(after) == facts(rounded)


def test_a_rounded_up_since_is_the_window_the_report_shows(table: PgServer) -> None:
    """`report --since` inside a pruned hour starts at its next whole hour and says so on stderr: its header and
    JSON `since` give that start too, the window the figures are of (1.6.6 gave the --since asked for)."""
    insert(table, history(5))
    assert roll(table).first
    table.sql("DELETE FROM service_heartbeat WHERE report_time < %s", ((T0 + 12 * H).replace(tzinfo=None),),
              db=table.dbname)
    asked, until = (T0 + 5 * H + 20 * M).replace(tzinfo=None), (NOW - 3 * H).replace(tzinfo=None)
    start = (T0 + 6 * H).replace(tzinfo=None).isoformat() + "Z"
    args = ["report", "--since", asked.isoformat(), "--until", until.isoformat()]
    data = cli(args + ["--format", "json"], env_for(table))
    assert data.returncode == 0 and f"--since rounded up to {start}: " in data.stderr, data.stderr
    assert json.loads(data.stdout)["since"] == start, data.stdout[:200]
    text = cli(args, env_for(table))
    assert text.returncode == 0 and text.stdout.startswith(f"{start} .. {until.isoformat()}Z "), text.stdout[:200]


def test_a_report_with_a_gap_below_the_rollups_reads_raw_rows_and_says_so(table: PgServer) -> None:
    insert(table, history(6))
    roll(table)
    raw, rolled, source = both(table, T0, NOW, gap=40)
    assert rolled == raw and "raw rows only (--gap 40 is below the rollup's 65 s)" in source


def test_watched_splits_a_gap_as_classify_does() -> None:
    """The watcher's gaps give the same outages and no-data stretches as the 后端 moments themselves."""
    rng = random.Random(7)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for _ in range(2000):
        moments = sorted({base + timedelta(seconds=rng.choice([30 * rng.randrange(200), rng.uniform(0, 6000)]))
                          for _ in range(rng.randrange(0, 40))})
        gaps = [(a, b) for a, b in zip(moments, moments[1:]) if (b - a).total_seconds() > 65]
        watcher = ([(datetime.min.replace(tzinfo=UTC), moments[0])] + gaps + [(moments[-1], datetime.max.replace(tzinfo=UTC))]
                   if moments else [(datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC))])
        start = base + timedelta(seconds=rng.choice([30 * rng.randrange(200), rng.uniform(0, 6000)]))
        stop = start + timedelta(seconds=rng.uniform(66, 3000))
        ongoing = rng.random() < 0.5
        inside = [m for m in moments if start < m < stop]
        assert watched(start, stop, ongoing, watcher, 65) == classify(start, stop, ongoing, inside, 65)


def test_rollup_command_init_db_and_the_report_line(table: PgServer) -> None:
    insert(table, history(8))
    env = env_for(table)
    result = cli(["rollup"], env)
    assert result.returncode == 0, result.stderr
    assert "(first pass: the whole table) into service_heartbeat_hourly; every hour before" in result.stdout
    assert cli(["init-db"], env).stdout.count("created") == 0  # idempotent
    result = cli(["report", "--since", "1y", "--format", "json"], env)
    assert result.returncode == 0 and "report: read hourly rollups for " in result.stderr
    # One pass at a time: a second, while one holds the lock, says so and does nothing.
    holder = table.connect(table.dbname)
    holder.autocommit = False
    with holder.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('heartbeatd-rollup:service_heartbeat'))")
        result = cli(["rollup"], env)
    holder.rollback()
    holder.close()
    assert result.returncode == 0 and "another heartbeatd rollup is running" in result.stdout


def test_rollup_without_init_db_is_one_line(pg: PgServer) -> None:
    init_table(pg)
    result = cli(["rollup"], env_for(pg))
    assert result.returncode == 1
    assert result.stderr.strip() == ("heartbeatd: rollup failed: rollup table service_heartbeat_hourly does not "
                                     "exist: run `heartbeatd init-db`")


def day_partitions(pg: PgServer) -> datetime:
    """The table partitioned by day, an operator's way: p0, p1, p2 of 24 hours each, a DEFAULT one, the
    pair index only; history(9) in it. The start of p1 (aware UTC), 6 hours into the history: not at a
    midnight, so that windows a fixed time back from now, and from p1's start, are in p1 and p2 and hold
    whole rolled-up hours at any time of day (at 06:00-06:59 UTC both tests that hold p0 failed)."""
    day = (T0 - 18 * H).replace(tzinfo=None)
    pg.sql("CREATE TABLE service_heartbeat (service_name varchar(50) NOT NULL, ip_address varchar(64) NOT NULL, "
           "report_time timestamp NOT NULL, created_at timestamp NOT NULL, latency_ms real) "
           "PARTITION BY RANGE (report_time)", db=pg.dbname)
    for n in range(3):
        lo, hi = day + n * 24 * H, day + (n + 1) * 24 * H
        pg.sql(f"CREATE TABLE service_heartbeat_p{n} PARTITION OF service_heartbeat FOR VALUES FROM ('{lo}') TO ('{hi}')",
               db=pg.dbname)
    pg.sql("CREATE TABLE service_heartbeat_default PARTITION OF service_heartbeat DEFAULT", db=pg.dbname)
    pg.sql("CREATE INDEX ON service_heartbeat (service_name, ip_address, report_time)", db=pg.dbname)
    insert(pg, history(9))
    return (day + 24 * H).replace(tzinfo=UTC)


def test_a_partitioned_table_gets_its_index_and_rollups(pg: PgServer) -> None:
    """CREATE INDEX CONCURRENTLY is refused on a partitioned table: ON ONLY, then each partition's, attached."""
    from heartbeatd import rollup, schema
    day_partitions(pg)
    conn = pg.connect(pg.dbname)
    conn.autocommit = True
    try:
        done = schema.init_db(conn, ("service_heartbeat",), 5) + rollup.init_db(conn, ("service_heartbeat",), 5)
        assert "created index service_heartbeat_created_at_brin on partitioned table service_heartbeat: ON ONLY the " \
               "table, then on 4 partition(s) (CONCURRENTLY where they held rows), each attached" in done, done
        assert done[-1] == "created rollup table service_heartbeat_hourly"
    finally:
        conn.close()
    assert pg.sql("SELECT bool_and(indisvalid), count(*) FROM pg_index WHERE indexrelid::regclass::text LIKE %s",
                  ("service_heartbeat%created_at_brin",), db=pg.dbname) == [(True, 5)]
    roll(pg)
    for since, until in WINDOWS[:3]:
        raw, rolled, source = both(pg, since, until)
        assert rolled == raw and "read hourly rollups" in source


def test_a_report_reads_only_its_windows_partitions(pg: PgServer) -> None:
    """A report from rollups finds its pairs in the rollup and bounds every raw read by the window's times,
    so the planner keeps only the partitions of those times: an older partition held by another session
    (prune's DROP waiting, a long ALTER) holds no report up, nor is planned (on a year of day partitions,
    planning every one took 40-70 ms a statement, a Merge Append over them 3 ms a pair)."""
    from heartbeatd import rollup, schema
    p1 = day_partitions(pg)
    conn = pg.connect(pg.dbname)
    conn.autocommit = True
    schema.init_db(conn, ("service_heartbeat",), 5)
    rollup.init_db(conn, ("service_heartbeat",), 5)
    conn.close()
    roll(pg)
    windows = [(p1 + 17 * M + 3 * S, NOW, None), (p1 + 2 * H, NOW - 2 * H, HOSTS[1]), (p1 + 5 * H + 59 * M, NOW, None)]
    holder = pg.connect(pg.dbname)
    holder.autocommit = False
    with holder.cursor() as cur:  # ACCESS EXCLUSIVE: a reader that so much as plans p0 waits for it
        cur.execute("LOCK TABLE service_heartbeat_p0 IN ACCESS EXCLUSIVE MODE")
    try:
        rolled = []
        for since, until, ip in windows:
            led = Ledger(pg.connect(pg.dbname), ("service_heartbeat",), 3, helper=lambda: pg.connect(pg.dbname))
            try:
                found, source = RollupReport(led).run(since, until, 65, NOW, ip=ip, seconds=3)
            finally:
                led.conn.close()
            assert "read hourly rollups" in source and "raw rows for" in source, source
            assert found and all(p.latency is not None for p in found), found
            rolled.append(found)
    finally:
        holder.rollback()
        holder.close()
    for (since, until, ip), found in zip(windows, rolled):
        raw, _, _ = both(pg, since, until, ip=ip)
        assert found == raw, (since, until, ip)


def test_status_takes_its_pairs_from_the_rollup_and_reads_only_the_windows_partitions(pg: PgServer) -> None:
    """`status` (the status timer, every minute) looks for pairs as report does: where a pass has run and
    the role may read the rollup, from it and the raw rows after it, each pair's newest heartbeat read
    within the window only. A held older partition holds it up no more; a role without SELECT on the
    rollup is answered as before, from the raw table."""
    from heartbeatd import rollup, schema
    day_partitions(pg)
    conn = pg.connect(pg.dbname)
    conn.autocommit = True
    schema.init_db(conn, ("service_heartbeat",), 5)
    rollup.init_db(conn, ("service_heartbeat",), 5)
    conn.close()
    covered = roll(pg).covered_until
    now = covered + 20 * M
    insert(pg, [("后端", "10.0.0.9", (covered + n * 30 * S).replace(tzinfo=None),
                 (covered + n * 30 * S).replace(tzinfo=None), 1.0) for n in range(40)])  # a host new since the pass
    pg.sql("CREATE ROLE plain_reader LOGIN; GRANT SELECT ON service_heartbeat TO plain_reader", db=pg.dbname)

    def status(user: str = "postgres") -> list[Any]:
        led = Ledger(pg.connect(pg.dbname, user=user), ("service_heartbeat",), 3)
        try:
            return led.latest(timedelta(hours=6), 65, now, pairs=Rollup(led).readable_pairs)
        finally:
            led.conn.close()

    holder = pg.connect(pg.dbname)
    holder.autocommit = False
    with holder.cursor() as cur:
        cur.execute("LOCK TABLE service_heartbeat_p0 IN ACCESS EXCLUSIVE MODE")
    try:
        found = status()
    finally:
        holder.rollback()
        holder.close()
    led = ledger(pg)
    try:
        assert found == led.latest(timedelta(hours=6), 65, now)  # as the raw table's scan finds them
    finally:
        led.conn.close()
    assert {(f.service, f.ip) for f in found} >= {("后端", "10.0.0.9"), ("后端", HOSTS[0]), ("redis", REDIS)}
    assert status("plain_reader") == found
    led = ledger(pg)
    try:  # passes stopped for hours: the raw rows since would be many, so the table is scanned for pairs
        with led.conn.cursor() as cur:
            assert Rollup(led).readable_pairs(cur, now - 6 * H, now) is not None
            passed = Rollup(led).read_state(cur).passed_at  # type: ignore[union-attr]
            assert Rollup(led).readable_pairs(cur, now - 6 * H, passed + 3 * H - S) is not None
            assert Rollup(led).readable_pairs(cur, now - 6 * H, passed + 3 * H + S) is None
    finally:
        led.conn.close()


def test_a_host_added_after_the_last_pass_is_in_the_report(table: PgServer) -> None:
    """The pairs come from the rollup, and from the raw rows after the hours it covers: a host (and a
    Redis) whose first heartbeats came after the last pass are in the report, as in the raw rows'."""
    insert(table, history(6))
    covered = roll(table).covered_until
    now = covered + 20 * M  # 40 heartbeats after the pass's hours, whatever minute the test runs in
    rows = []
    for n in range(40):
        when = (covered + n * 30 * S).replace(tzinfo=None)
        rows += [("后端", "10.0.0.9", when, when, 2.0), ("redis", "10.1.0.9", when, when, 3.0)]
    insert(table, rows)
    led = ledger(table)
    try:
        for since, ip in ((T0 + 17 * M, None), (T0 + 2 * H, "10.0.0.9"), (covered - 2 * H - 13 * M, None)):
            raw = led.report(since, now, 65, now, ip=ip, seconds=60)
            rolled, source = RollupReport(led).run(since, now, 65, now, ip=ip, seconds=60)
            assert "read hourly rollups" in source, source
            assert rolled == raw, (since, ip)
            assert ("后端", "10.0.0.9") in [(p.service, p.ip) for p in rolled]
            assert ip is not None or ("redis", "10.1.0.9") in [(p.service, p.ip) for p in rolled]
    finally:
        led.conn.close()


def test_ctrl_c_cancels_the_pass_on_the_server(table: PgServer) -> None:
    """A pass interrupted while it waits is cancelled on the server, not left holding its lock."""
    insert(table, history(10)[:3000])
    holder = table.connect(table.dbname)
    holder.autocommit = False
    with holder.cursor() as cur:  # the rollup held still: the pass's INSERT waits for it
        cur.execute("LOCK TABLE service_heartbeat_hourly IN EXCLUSIVE MODE")
    proc = subprocess.Popen([sys.executable, "-m", "heartbeatd", "rollup"], env=env_for(table),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'heartbeatd' AND wait_event_type = 'Lock'"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not table.sql(waiting)[0][0]:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    deadline = time.monotonic() + 10
    while table.sql(waiting)[0][0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert table.sql(waiting) == [(0,)]
    holder.rollback()
    holder.close()
    assert proc.returncode == 130 and "Traceback" not in err, out + err
    result = cli(["rollup"], env_for(table))  # nothing of it stayed: the next pass is the first
    assert result.returncode == 0 and "(first pass: the whole table)" in result.stdout, result.stdout + result.stderr


def test_a_row_from_a_host_whose_clock_lags_ten_minutes_is_rolled_up(table: PgServer) -> None:
    insert(table, history(4))
    roll(table)
    # A daemon on a host whose clock is 10 minutes behind (its NTP broken; README allows up to 15) replays its spool: created_at is
    # its own clock (writer.py: the `stamp` column from Writer._clock), 10 min before the pass's watermark.
    conn = table.connect(table.dbname)
    late_backend_rows(conn, "10 min")
    conn.commit()
    conn.close()
    roll(table)
    assert_rollups_agree(table)


# 1.6.0: the prune unit's rollup (ExecStartPre=-) could fail, and prune still deleted rows the rollups
# had never read: those hours were lost for the years the rollups are kept.
def test_prune_keeps_the_rows_the_rollups_do_not_cover_yet(table: PgServer) -> None:
    insert(table, history(9))
    env = env_for(table)
    assert cli(["rollup"], env).returncode == 0
    # The rollup stopped 20 hours ago (its pass failing every time since): its state says so.
    stalled = (NOW - 20 * H).replace(minute=0, second=0, tzinfo=None)
    table.sql("UPDATE service_heartbeat_hourly_state SET covered_until = %s", (stalled,), db=table.dbname)
    for dry_run in (["--dry-run"], []):
        result = cli(["prune", "--older-than", "2h", *dry_run], env)
        assert result.returncode == 1, result.stderr
        assert f" row(s) older than {stalled.isoformat(sep=' ')} UTC from service_heartbeat" in result.stdout
        assert (f"heartbeatd: prune: kept the rows from {stalled.isoformat(sep=' ')} UTC on: the hourly rollups cover "
                "only the hours before it (last pass ") in result.stderr
    assert table.sql("SELECT count(*) FROM service_heartbeat WHERE report_time < %s", (stalled,),
                     db=table.dbname)[0][0] == 0
    assert table.sql("SELECT min(report_time) FROM service_heartbeat", db=table.dbname)[0][0] >= stalled
    # A pass that runs again covers the hours: prune goes to its cut.
    assert cli(["rollup"], env).returncode == 0
    result = cli(["prune", "--older-than", "2h"], env)
    assert result.returncode == 0 and "kept the rows" not in result.stderr, result.stderr
    cut = (NOW - 2 * H - 5 * M).replace(tzinfo=None)
    assert table.sql("SELECT count(*) FROM service_heartbeat WHERE report_time < %s", (cut,), db=table.dbname)[0][0] == 0


def test_prune_without_a_rollup_pass_prunes_as_before(table: PgServer) -> None:
    insert(table, history(10))
    result = cli(["prune", "--older-than", "2h"], env_for(table))  # rollup tables made, never a pass: not in use
    assert result.returncode == 0 and "kept the rows" not in result.stderr, result.stderr
    assert table.sql("SELECT count(*) FROM service_heartbeat WHERE report_time < %s",
                     ((NOW - 2 * H - 5 * M).replace(tzinfo=None),), db=table.dbname)[0][0] == 0


def operator_table(pg: PgServer, ip_type: str, time_type: str, seed: int) -> None:
    """An operator's own table (this address and time type, latency kept), init-db's rollup on it,
    history(seed) in it, rolled up."""
    pg.sql("CREATE TABLE service_heartbeat (id bigserial PRIMARY KEY, service_name varchar(50) NOT NULL, "
           f"ip_address {ip_type} NOT NULL, report_time {time_type} NOT NULL, created_at {time_type} NOT NULL, "
           "latency_ms double precision)", db=pg.dbname)
    assert cli(["init-db"], env_for(pg)).returncode == 0
    insert(pg, history(seed))
    roll(pg)


def test_an_inet_address_column_reports_the_same_from_rollups(pg: PgServer) -> None:
    """An operator's table whose ip_address is `inet`: the rollup keeps the address as the raw rows show it
    (inet's text cast would add `/32`), and the pairs handed back compare as inet."""
    operator_table(pg, "inet", "timestamp", 7)
    assert pg.sql("SELECT DISTINCT ip_address FROM service_heartbeat_hourly WHERE service_name = 'redis'",
                  db=pg.dbname) == [(REDIS,)]
    for since, until in WINDOWS[:3]:
        raw, rolled, source = both(pg, since, until)
        assert "read hourly rollups" in source and rolled == raw, (since, until)
    raw, rolled, _ = both(pg, T0 + 2 * H, NOW, ip=HOSTS[2])
    assert rolled == raw and [p.ip for p in raw] == [HOSTS[2]]


def test_a_rollup_kept_by_an_earlier_version_is_brought_up_to_date(pg: PgServer) -> None:
    """1.6.0 and 1.6.1 kept an inet column's address with its mask (10.1.0.1/32) and made no index of a host's
    gap hours: the next pass rewrites the addresses (status and report then list each pair once), init-db
    adds the index."""
    operator_table(pg, "inet", "timestamp", 8)
    pg.sql("DROP INDEX service_heartbeat_hourly_ip_gap_idx; UPDATE service_heartbeat_hourly SET ip_address = "
           "ip_address || CASE WHEN ip_address LIKE '%%:%%' THEN '/128' ELSE '/32' END WHERE ip_address <> '*'",
           db=pg.dbname)  # as 1.6.1 left it
    result = cli(["init-db"], env_for(pg))
    assert result.returncode == 0 and \
        "created index service_heartbeat_hourly_ip_gap_idx on rollup table service_heartbeat_hourly" in result.stdout
    roll(pg)
    assert pg.sql("SELECT count(*) FROM service_heartbeat_hourly WHERE ip_address LIKE '%%/%%'", db=pg.dbname) == [(0,)]
    for since, until in WINDOWS[:3]:
        raw, rolled, source = both(pg, since, until)
        assert "read hourly rollups" in source and rolled == raw, (since, until)
    led = ledger(pg)
    try:
        found = led.latest(timedelta(days=2), 65, NOW, pairs=Rollup(led).readable_pairs)
    finally:
        led.conn.close()
    assert sorted((f.service, f.ip) for f in found) == sorted(
        [("后端", h) for h in HOSTS] + [("redis", REDIS), ("postgres", PG)])


def test_a_pairs_latency_sample_is_its_own_whatever_the_other_pairs(table: PgServer) -> None:
    """Each pair's 250 slots are over its own span in the window: a host seen for the last hour only has
    as many samples, and the same figures, in the fleet's report as in its own (--ip)."""
    insert(table, history(3))
    rows = [("后端", "10.0.0.8", (NOW - H + n * 30 * S).replace(tzinfo=None), (NOW - H + n * 30 * S).replace(tzinfo=None),
             float(n % 97)) for n in range(120)]
    insert(table, rows)
    led = ledger(table)
    try:
        fleet = {(p.service, p.ip): p.latency for p in led.report(T0, NOW, 65, NOW, seconds=60)}
        alone = led.report(T0, NOW, 65, NOW, ip="10.0.0.8", seconds=60)
    finally:
        led.conn.close()
    assert alone[0].latency is not None and alone[0].latency.sampled == 120  # every heartbeat: 250 slots over an hour
    assert fleet[("后端", "10.0.0.8")] == alone[0].latency


def test_a_timestamp0_table_reports_the_same_from_rollups_and_status_finds_its_pairs(pg: PgServer) -> None:
    """An operator's table with `timestamp(0)` times (rounded to the second as stored): the rollup report
    (pairs handed in, constant bounds, latency slots) gives the raw rows' figures, status its pairs."""
    operator_table(pg, "varchar(64)", "timestamp(0)", 11)
    for since, until in WINDOWS[:4]:
        raw, rolled, source = both(pg, since, until)
        assert "read hourly rollups" in source and rolled == raw, (since, until)
        assert all(p.latency is not None for p in rolled)
    led = ledger(pg)
    try:
        found = led.latest(timedelta(days=2), 65, NOW, pairs=Rollup(led).readable_pairs)
        assert found == led.latest(timedelta(days=2), 65, NOW)
    finally:
        led.conn.close()
    assert len(found) == 5
