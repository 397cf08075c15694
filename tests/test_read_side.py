"""`heartbeatd status`, `report` and `prune` against a private PostgreSQL seeded with a known history."""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import psycopg2
import pytest

from conftest import clean_env, cli, db_url, init_table
from servers import PgServer, free_port

A, B = "10.0.0.1", "10.0.0.2"  # two backend hosts
REDIS, PG = "10.1.0.1", "10.2.0.1"  # the servers they both reach
T0 = (datetime.now(timezone.utc) - timedelta(hours=8)).replace(minute=0, second=0, microsecond=0, tzinfo=None)
H, M = timedelta(hours=1), timedelta(minutes=1)


def down(at: timedelta, spans: list[tuple[timedelta, timedelta]]) -> bool:
    return any(start <= at < end for start, end in spans)


def history() -> list[tuple[str, str, datetime, datetime]]:
    """Six hours, A every 30 s on the minute, B every 30 s at +10 s.

    A's daemon is down 1h-1h30; B's 2h-2h20; both 3h-3h20 and 5h15-5h30; Redis is down 4h-4h10;
    PostgreSQL 5h-5h30 (partly while no daemon ran). Every tenth row was written late (backfilled).
    """
    rows = []
    both = [(3 * H, 3 * H + 20 * M), (5 * H + 15 * M, 5 * H + 30 * M)]
    daemon_down = {A: [(1 * H, 1 * H + 30 * M)] + both, B: [(2 * H, 2 * H + 20 * M)] + both}
    redis_down, pg_down = [(4 * H, 4 * H + 10 * M)], [(5 * H, 5 * H + 30 * M)]
    for host, offset in ((A, 0), (B, 10)):
        for n in range(720):
            at = timedelta(seconds=30 * n + offset)
            if down(at, daemon_down[host]):
                continue
            when = T0 + at
            late = when + (10 * M if n % 10 == 0 else timedelta(seconds=0.1))
            rows.append(("后端", host, when, late))
            if not down(at, redis_down):
                rows.append(("redis", REDIS, when, late))
            if not down(at, pg_down):
                rows.append(("postgres", PG, when, late))
    return rows


@pytest.fixture(params=["timestamp", "timestamptz"])
def seeded(request: pytest.FixtureRequest, pg: PgServer) -> PgServer:
    kind = request.param
    init_table(pg)
    if kind == "timestamptz":
        pg.sql("ALTER TABLE service_heartbeat ALTER report_time TYPE timestamptz USING report_time AT TIME ZONE 'UTC', "
               "ALTER created_at TYPE timestamptz USING created_at AT TIME ZONE 'UTC'", db=pg.dbname)
    conn = pg.connect(pg.dbname)
    with conn.cursor() as cur:
        cur.execute("SET TimeZone = 'UTC'")
        cur.executemany("INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at) "
                        "VALUES (%s, %s, %s, %s)", history())
    conn.close()
    return pg


def env_for(pg: PgServer, **extra: str) -> dict[str, str]:
    return clean_env(**{"DATABASE_URL": db_url(pg), "HEARTBEAT_INTERVAL": "30", "HEARTBEAT_TIMEOUT": "5", **extra})


def iso(at: timedelta) -> str:
    return (T0 + at).isoformat(timespec="seconds") + "Z"


def report(pg: PgServer, *args: str) -> dict[str, dict[str, object]]:
    result = cli(["report", "--since", T0.isoformat(), "--until", (T0 + 6 * H).isoformat(), "--format", "json", *args],
                 env_for(pg))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["gap_seconds"] == 65.0  # 2 x interval + timeout
    return {f"{p['service']} {p['ip']}": p for p in data["pairs"]}


def spans(pair: dict[str, object], key: str) -> list[tuple[str, str]]:
    return [(s["start"], s["end"]) for s in pair[key]]  # type: ignore[index, attr-defined]


def test_report_finds_exactly_the_planted_outages_and_no_data(seeded: PgServer) -> None:
    found = report(seeded)
    assert set(found) == {f"后端 {A}", f"后端 {B}", f"redis {REDIS}", f"postgres {PG}"}
    sec = timedelta(seconds=1)
    # A host's own heartbeats missing: that host's outage, from its last heartbeat to its next one.
    assert spans(found[f"后端 {A}"], "outage_list") == [
        (iso(H - 30 * sec), iso(H + 30 * M)), (iso(3 * H - 30 * sec), iso(3 * H + 20 * M)),
        (iso(5 * H + 15 * M - 30 * sec), iso(5 * H + 30 * M))]
    assert spans(found[f"后端 {B}"], "outage_list") == [
        (iso(2 * H - 20 * sec), iso(2 * H + 20 * M + 10 * sec)), (iso(3 * H - 20 * sec), iso(3 * H + 20 * M + 10 * sec)),
        (iso(5 * H + 15 * M - 20 * sec), iso(5 * H + 30 * M + 10 * sec))]
    # Redis: one outage while daemons watched; the stretch when no daemon ran is no data.
    redis = found[f"redis {REDIS}"]
    assert spans(redis, "outage_list") == [(iso(4 * H - 20 * sec), iso(4 * H + 10 * M))]
    assert spans(redis, "no_data_list") == [(iso(3 * H - 20 * sec), iso(3 * H + 20 * M)),
                                            (iso(5 * H + 15 * M - 20 * sec), iso(5 * H + 30 * M))]
    # PostgreSQL down 5h-5h30, daemons gone 5h15-5h30: outage until the last 后端 seen, then no data.
    postgres = found[f"postgres {PG}"]
    assert spans(postgres, "outage_list") == [(iso(5 * H - 20 * sec), iso(5 * H + 15 * M - 20 * sec))]
    assert spans(postgres, "no_data_list") == [(iso(3 * H - 20 * sec), iso(3 * H + 20 * M)),
                                               (iso(5 * H + 15 * M - 20 * sec), iso(5 * H + 30 * M))]
    # Exact figures.
    window = 6 * 3600
    a_down = (30 * 60 + 30) + (20 * 60 + 30) + (15 * 60 + 30)
    assert found[f"后端 {A}"]["downtime_seconds"] == a_down
    assert found[f"后端 {A}"]["uptime_percent"] == round(100 * (window - a_down) / window, 3)
    assert found[f"后端 {A}"]["longest_seconds"] == 30 * 60 + 30 and found[f"后端 {A}"]["outages"] == 3
    no_data = (20 * 60 + 20) + (15 * 60 + 20)
    assert redis["no_data_seconds"] == no_data and redis["downtime_seconds"] == 10 * 60 + 20
    assert redis["uptime_percent"] == round(100 * (window - no_data - 620) / (window - no_data), 3)
    assert redis["reporters_last_hour"] == 2 and found[f"后端 {A}"]["reporters_last_hour"] is None
    assert postgres["outages"] == 1 and postgres["downtime_seconds"] == 15 * 60


def test_report_filters_and_csv_carry_the_same_facts(seeded: PgServer) -> None:
    only = report(seeded, "--service", "redis")
    assert list(only) == [f"redis {REDIS}"]
    assert list(report(seeded, "--ip", B)) == [f"后端 {B}"]
    result = cli(["report", "--since", T0.isoformat(), "--until", (T0 + 6 * H).isoformat(), "--format", "csv",
                  "--service", "redis"], env_for(seeded))
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["kind"] for r in rows] == ["summary", "outage", "no_data", "no_data"]
    assert rows[1]["start"] == iso(4 * H - timedelta(seconds=20)) and rows[1]["duration_seconds"] == "620.0"
    assert rows[0]["uptime_percent"] == str(only[f"redis {REDIS}"]["uptime_percent"])


def test_report_text_draws_a_timeline(seeded: PgServer) -> None:
    result = subprocess.run([sys.executable, "-m", "heartbeatd", "report", "--since", T0.isoformat(), "--until",
                             (T0 + 6 * H).isoformat(), "--service", "redis"], env=dict(env_for(seeded), COLUMNS="76"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    line = next(i for i, text in enumerate(lines) if text.startswith(f"redis {REDIS}  uptime "))
    cells = lines[line + 1].strip()
    assert len(cells) == 72  # as wide as the terminal
    # 6 h in 72 cells of 5 min: no data around 3h (cells 35-40), down at 4h (48-50), no data 5h15-5h30.
    assert cells[:35] == "=" * 35 and set(cells[36:40]) == {"."} and set(cells[48:50]) == {"X"}
    assert set(cells[63:66]) == {"."} and cells[-1] == "="
    assert "  down     " in result.stdout and "  no data  " in result.stdout


def test_a_gap_that_began_before_the_window_is_clipped_to_it(seeded: PgServer) -> None:
    result = cli(["report", "--since", (T0 + H + 10 * M).isoformat(), "--until", (T0 + 2 * H).isoformat(),
                  "--ip", A, "--format", "json"], env_for(seeded))
    pair = json.loads(result.stdout)["pairs"][0]
    assert [(s["start"], s["end"]) for s in pair["outage_list"]] == [(iso(H + 10 * M), iso(H + 30 * M))]


def test_status_exit_statuses_and_json(pg: PgServer) -> None:
    init_table(pg)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    pg.sql("INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at) VALUES "
           "('后端', %s, %s, %s), ('redis', %s, %s, %s), ('postgres', %s, %s, %s)",
           (A, now, now, REDIS, now, now, PG, now - 3 * M, now), db=pg.dbname)
    env = env_for(pg, HEARTBEAT_INTERVAL="60", HEARTBEAT_TIMEOUT="5")  # stale after 125 s
    result = cli(["status"], env)
    assert result.returncode == 1, result.stdout + result.stderr  # postgres last seen 3 min ago
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert [(l[0], l[1], l[4]) for l in lines] == [("postgres", PG, "stale"), ("redis", REDIS, "fresh"),
                                                    ("后端", A, "fresh")]
    data = json.loads(cli(["status", "--format", "json"], env).stdout)
    assert {s["service"]: s["state"] for s in data["services"]} == {"后端": "fresh", "redis": "fresh",
                                                                     "postgres": "stale"}
    assert 175 <= [s for s in data["services"] if s["service"] == "postgres"][0]["age_seconds"] <= 240
    assert cli(["status"], dict(env, HEARTBEAT_INTERVAL="120")).returncode == 0  # stale only after 245 s
    assert cli(["status", "--window", "1m"], env).returncode == 0  # postgres not seen in the last minute
    unreachable = cli(["status"], dict(env, DATABASE_URL=f"postgresql://127.0.0.1:{free_port()}/x"))
    assert unreachable.returncode == 69 and unreachable.stderr.startswith("heartbeatd: database unreachable: ")
    assert cli(["status", "--window", "soon"], env).returncode == 64


def test_status_a_heartbeat_ahead_of_the_clock_is_not_fresh(pg: PgServer) -> None:
    """A report_time two days ahead (a host whose clock runs ahead) would look fresh for two days after its
    host died (1.6.5: `-172800s ago fresh`): more than the staleness limit ahead it is `ahead`, not fresh, in
    the line, the exit status, JSON and the metrics; a few seconds ahead (clocks a little apart) is fresh."""
    init_table(pg)
    now = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)
    far = now + timedelta(days=2)
    pg.sql("INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at) VALUES "
           "('后端', %s, %s, %s), ('redis', %s, %s, %s)", (A, now + timedelta(seconds=10), now, REDIS, now, now),
           db=pg.dbname)
    env = env_for(pg)  # stale after 65 s
    fine = cli(["status"], env)
    assert fine.returncode == 0 and "\tfresh\n" in fine.stdout and " ahead of the clock\tfresh" in fine.stdout, fine
    pg.sql("INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at) VALUES "
           "('后端', '192.0.2.2', %s, %s)", (far, now), db=pg.dbname)
    said = cli(["status"], env)
    assert said.returncode == 1, said.stdout + said.stderr
    line = [l.split("\t") for l in said.stdout.splitlines() if "192.0.2.2" in l][0]
    assert line[2] == str(far) and line[4] == "ahead", line
    assert line[3] in ("2d00h ahead of the clock", "1d23h ahead of the clock"), line
    data = json.loads(cli(["status", "--format", "json"], env).stdout)
    found = {s["ip"]: s for s in data["services"]}
    assert found["192.0.2.2"]["state"] == "ahead" and found["192.0.2.2"]["age_seconds"] < -170000, found
    assert found[A]["state"] == "fresh" and found[REDIS]["state"] == "fresh", found
    prom = cli(["status", "--format", "prometheus"], env)
    assert prom.returncode == 0, prom.stderr
    assert 'heartbeatd_ledger_stale{service="后端",ip="192.0.2.2"} 1\n' in prom.stdout, prom.stdout
    assert f'heartbeatd_ledger_stale{{service="后端",ip="{A}"}} 0\n' in prom.stdout, prom.stdout
    # Found in review: one row stamped days ahead (a clock's bad step) hid the pair's live rows behind it, which
    # was `ahead` and stale until that time came. Its live rows count: fresh, shown by the newest of them.
    pg.sql("DELETE FROM service_heartbeat WHERE ip_address = '192.0.2.2'; INSERT INTO service_heartbeat (service_name, "
           "ip_address, report_time, created_at) VALUES ('redis', %s, %s, %s)", (REDIS, far, now), db=pg.dbname)
    live = cli(["status"], env)
    assert live.returncode == 0, live.stdout + live.stderr
    line = [l.split("\t") for l in live.stdout.splitlines() if REDIS in l][0]
    assert line[2] == str(now) and line[4] == "fresh", line
    prom = cli(["status", "--format", "prometheus"], env)
    assert f'heartbeatd_ledger_stale{{service="redis",ip="{REDIS}"}} 0\n' in prom.stdout, prom.stdout


def seed_old_and_new(pg: PgServer, old: int, new: int) -> None:
    pg.sql("INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at) "
           "SELECT CASE i %% 3 WHEN 0 THEN '后端' WHEN 1 THEN 'redis' ELSE 'postgres' END, '10.0.0.' || (i %% 50), "
           "now() AT TIME ZONE 'utc' - interval '40 days' + i * interval '1 ms', now() "
           "FROM generate_series(1, %s) i", (old,), db=pg.dbname)
    pg.sql("INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at) "
           "SELECT '后端', '10.0.0.1', now() AT TIME ZONE 'utc' - i * interval '1 s', now() "
           "FROM generate_series(1, %s) i", (new,), db=pg.dbname)


def count(pg: PgServer) -> tuple[int, int]:
    return pg.sql("SELECT count(*) FILTER (WHERE report_time < now() AT TIME ZONE 'utc' - interval '30 days'), "
                  "count(*) FILTER (WHERE report_time >= now() AT TIME ZONE 'utc' - interval '30 days') "
                  "FROM service_heartbeat", db=pg.dbname)[0]


def test_prune_removes_exactly_the_older_rows(pg: PgServer) -> None:
    init_table(pg)
    seed_old_and_new(pg, 25_000, 500)
    env = env_for(pg)
    kept = cli(["prune"], env)
    assert kept.returncode == 0 and "HEARTBEAT_RETENTION is empty: keeping everything" in kept.stdout
    dry = cli(["prune", "--older-than", "30d", "--dry-run"], env)
    assert dry.returncode == 0 and dry.stdout.startswith("would remove 25000 row(s) older than ")
    assert count(pg) == (25_000, 500)
    result = cli(["prune"], dict(env, HEARTBEAT_RETENTION="30d"))
    assert result.returncode == 0 and result.stdout.startswith("removed 25000 row(s) older than "), result.stdout
    assert count(pg) == (0, 500)


def test_a_second_prune_at_once_says_so_and_does_nothing(pg: PgServer) -> None:
    init_table(pg)
    seed_old_and_new(pg, 1000, 10)
    holder = pg.connect(pg.dbname)
    with holder.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(hashtext('heartbeatd-prune:service_heartbeat'))")
    try:
        result = cli(["prune", "--older-than", "30d"], env_for(pg))
        assert result.returncode == 0 and "another heartbeatd prune is running" in result.stdout
        assert count(pg) == (1000, 10)
    finally:
        holder.close()


def test_prune_interrupted_resumes(pg: PgServer) -> None:
    init_table(pg)
    seed_old_and_new(pg, 600_000, 100)
    # The oldest redis row locked: prune removes the postgres rows (the first service in its
    # order), then waits on that lock, where it is interrupted: no race against its speed.
    holder = pg.connect(pg.dbname)
    holder.autocommit = False
    with holder.cursor() as cur:
        cur.execute("SELECT 1 FROM service_heartbeat WHERE service_name = 'redis' ORDER BY report_time LIMIT 1 "
                    "FOR UPDATE")
    # SIGINT as a terminal sends it, whatever disposition this test process inherited.
    proc = subprocess.Popen([sys.executable, "-m", "heartbeatd", "prune", "--older-than", "30d"],
                            env=dict(env_for(pg), HEARTBEAT_TIMEOUT="120"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not pg.sql(
            "SELECT 1 FROM pg_stat_activity WHERE application_name = 'heartbeatd' AND wait_event_type = 'Lock'"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    # The DELETE it was waiting in is cancelled, not left to run once the lock goes.
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'heartbeatd' AND wait_event_type = 'Lock'"
    deadline = time.monotonic() + 10
    while pg.sql(waiting)[0][0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pg.sql(waiting) == [(0,)]
    holder.rollback()
    holder.close()
    assert proc.returncode == 130, out + err
    assert "prune interrupted" in err and "Traceback" not in err
    old, new = count(pg)
    assert 0 < old < 600_000 and new == 100
    result = cli(["prune", "--older-than", "30d"], env_for(pg))
    assert result.returncode == 0 and result.stdout.startswith(f"removed {old} row(s)"), result.stdout
    assert count(pg) == (0, 100)


@pytest.mark.parametrize("command", ["status", "prune"])
def test_ctrl_c_against_a_frozen_server_ends_by_the_timeout(pg_own: PgServer, command: str) -> None:
    """The reason an operator presses Ctrl-C: the server hangs. prune's cancel of its batch is
    bounded too (a frozen server answers no cancel request)."""
    pg_own.dbname = "postgres"  # type: ignore[attr-defined]
    init_table(pg_own)
    seed_old_and_new(pg_own, 30_000, 10)
    holder = pg_own.connect()
    holder.autocommit = False
    with holder.cursor() as cur:  # status waits on the table, prune on a row of its second service
        cur.execute("LOCK TABLE service_heartbeat IN ACCESS EXCLUSIVE MODE" if command == "status" else
                    "SELECT 1 FROM service_heartbeat WHERE service_name = 'redis' ORDER BY report_time LIMIT 1 "
                    "FOR UPDATE")
    args = [command] + (["--older-than", "30d"] if command == "prune" else [])
    proc = subprocess.Popen([sys.executable, "-m", "heartbeatd", *args], env=env_for(pg_own, HEARTBEAT_TIMEOUT="2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not pg_own.sql(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = 'heartbeatd' AND wait_event_type = 'Lock'"):
            time.sleep(0.05)
        pg_own.freeze()
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            err = "(still running)"
        took = time.monotonic() - started
    finally:
        pg_own.thaw()
        proc.kill()
        holder.rollback()
        holder.close()
    assert proc.returncode == 130 and took < 2 + 3, f"Ctrl-C ended after {took:.1f}s (HEARTBEAT_TIMEOUT=2): {err}"
    assert "Traceback" not in err


def test_table_missing_is_one_line(pg: PgServer) -> None:
    for command in (["status"], ["report"], ["prune", "--older-than", "30d"]):
        result = cli(command, env_for(pg))
        assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
        assert "does not exist" in result.stderr and "heartbeatd init-db" in result.stderr


def test_init_db_adds_the_read_index_concurrently_to_a_table_with_rows(pg: PgServer) -> None:
    from heartbeatd.schema import CREATE_TABLE
    pg.sql(CREATE_TABLE.format(table="service_heartbeat", index="service_heartbeat_service_name_report_time_idx"),
           db=pg.dbname)  # a 1.0 table: only the (service_name, report_time) index
    seed_old_and_new(pg, 1000, 10)
    first = cli(["init-db"], env_for(pg))
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[0] == "created index service_heartbeat_service_ip_time_idx concurrently"
    assert pg.sql("SELECT indisvalid FROM pg_index WHERE indexrelid = 'service_heartbeat_service_ip_time_idx'::regclass",
                  db=pg.dbname) == [(True,)]
    # An interrupted CONCURRENTLY build leaves an invalid index: init-db replaces it.
    pg.sql("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'service_heartbeat_service_ip_time_idx'::regclass",
           db=pg.dbname)
    again = cli(["init-db"], env_for(pg))
    assert again.stdout.splitlines()[0] == "created index service_heartbeat_service_ip_time_idx concurrently"
    third = cli(["init-db"], env_for(pg))
    assert third.stdout.startswith("table service_heartbeat and its indexes are ready")


def test_prune_and_report_work_on_a_bare_table_without_id(pg: PgServer) -> None:
    pg.sql("CREATE TABLE service_heartbeat (service_name varchar(50), ip_address varchar(64), report_time timestamp, "
           "created_at timestamp)", db=pg.dbname)
    seed_old_and_new(pg, 3000, 20)
    result = cli(["prune", "--older-than", "30d"], env_for(pg))
    assert result.returncode == 0 and result.stdout.startswith("removed 3000 row(s)"), result.stdout + result.stderr
    assert count(pg) == (0, 20)
    assert cli(["status"], env_for(pg)).returncode == 0


def test_a_fleet_report_read_on_two_connections_finds_the_same(pg: PgServer) -> None:
    from heartbeatd.ledger import Ledger
    init_table(pg)
    hosts = [f"10.0.1.{n}" for n in range(1, 11)]
    rows = []
    for n, host in enumerate(hosts):
        for k in range(240):  # two hours every 30 s; host n down for 3 minutes from (n + 1) x 10 minutes
            at = timedelta(seconds=30 * k + n)
            if not ((n + 1) * 10 * M <= at < (n + 1) * 10 * M + 3 * M):
                rows += [("后端", host, T0 + at), ("redis", REDIS, T0 + at)]
    conn = pg.connect(pg.dbname)
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at) "
                        "VALUES (%s, %s, %s, %s)", [(s, ip, t, t) for s, ip, t in rows])
    helpers: list[object] = []

    def helper() -> object:
        helpers.append(pg.connect(pg.dbname))
        return helpers[-1]

    since, until = (T0 - H).replace(tzinfo=timezone.utc), (T0 + 2 * H).replace(tzinfo=timezone.utc)
    alone = Ledger(conn, ("service_heartbeat",), 60).report(since, until, 65, until)
    paired = Ledger(conn, ("service_heartbeat",), 60, helper=helper).report(since, until, 65, until)
    assert len(helpers) == 1, "the second connection was used"
    def outages(found: list) -> dict:  # type: ignore[type-arg]
        return {(p.service, p.ip): [(s.start, s.end) for s in p.outages] for p in found}
    assert outages(paired) == outages(alone)

    def no_slot() -> object:
        raise psycopg2.OperationalError("FATAL: sorry, too many clients already")

    assert outages(Ledger(conn, ("service_heartbeat",), 60, helper=no_slot).report(since, until, 65, until)) == \
        outages(alone)  # no second connection to be had: it reads alone
    for n, host in enumerate(hosts):
        start = T0 + (n + 1) * 10 * M + timedelta(seconds=n) - timedelta(seconds=30)
        assert outages(paired)[("后端", host)] == [(start.replace(tzinfo=timezone.utc),
                                                   (start + 3 * M + timedelta(seconds=30)).replace(tzinfo=timezone.utc))]
    assert outages(paired)[("redis", REDIS)] == []  # always some host writing redis rows
    conn.close()


# `report --ip` compared the text as typed: an IPv6 address spelled otherwise than stored (the kernel's
# form, lowercase and compressed) or an IPv4 address written IPv4-mapped found nothing.
@pytest.mark.parametrize("typed, stored", [("2001:DB8:0:0::1", "2001:db8::1"), ("::ffff:10.0.0.5", "10.0.0.5"),
                                           ("fe80::1%eth0", "fe80::1")])
def test_report_ip_as_an_operator_types_it(pg: PgServer, typed: str, stored: str) -> None:
    init_table(pg)
    rows = [(service, ip, T0 + n * 30 * timedelta(seconds=1)) for n in range(20)
            for service, ip in (("后端", stored), ("redis", "10.9.9.9"))]
    conn = pg.connect(pg.dbname)  # type: ignore[attr-defined]
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at) "
                        "VALUES (%s, %s, %s, %s)", [(s, ip, at, at) for s, ip, at in rows])
    conn.close()
    assert list(report(pg, "--ip", typed)) == [f"后端 {stored}"]
