"""heartbeatd beside pg_partman (Debian's postgresql-<major>-partman, 4.x), as operators run it: the table
partitioned by RANGE (report_time) and handed to partman.create_parent, then init-db, once, run (with an
outage and its replay), prune, partman.run_maintenance(), rollup and report, all as real commands."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import DaemonProcess, clean_env, cli, db_url
from heartbeatd.schema import INDEXES, PARTITIONED_DDL, object_name
from servers import PgServer, RedisServer, pg_bindir

UTC = timezone.utc
H, M = timedelta(hours=1), timedelta(minutes=1)

MAJOR = pg_bindir().parent.name
if not Path(f"/usr/share/postgresql/{MAJOR}/extension/pg_partman.control").exists():
    pytest.fail(f"pg_partman is missing: tests/install-deps installs it (Debian package postgresql-{MAJOR}-partman)",
                pytrace=False)


def env_for(server: PgServer, **extra: str) -> dict[str, str]:
    return clean_env(**{"DATABASE_URL": db_url(server), "HEARTBEAT_TIMEOUT": "5", **extra})


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def partman_table(server: PgServer) -> None:
    """service_heartbeat as README's partitioned table (init-db --partitioned's DDL), given to pg_partman."""
    db = getattr(server, "dbname", "postgres")
    server.sql("CREATE SCHEMA partman; CREATE EXTENSION pg_partman SCHEMA partman", db=db)
    server.sql(PARTITIONED_DDL.format(table="service_heartbeat"), db=db)
    server.sql("SELECT partman.create_parent(p_parent_table => 'public.service_heartbeat', p_control => 'report_time', "
               "p_type => 'native', p_interval => 'daily', p_premake => 3)", db=db)


def partitions(server: PgServer) -> dict[str, str]:
    """Every partition of the table: name -> its bound."""
    return dict(server.sql("SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_partition_tree("
                           "'service_heartbeat') t JOIN pg_class c ON c.oid = t.relid WHERE t.level > 0",
                           db=getattr(server, "dbname", "postgres")))


def partman_name(at: datetime) -> str:
    """The partition partman gives the (UTC, naive) day of `at`."""
    return f"service_heartbeat_p{at:%Y_%m_%d}"


def insert(server: PgServer, found: list[tuple[str, str, datetime]]) -> None:
    conn = server.connect(getattr(server, "dbname", "postgres"))
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at) "
                        "VALUES (%s, %s, %s, %s)", [(s, ip, at, at) for s, ip, at in found])
    conn.close()


def placed(server: PgServer) -> list[tuple[str, datetime, int]]:
    """(partition, report_time, copies) of every (service, ip, report_time) in the table."""
    return server.sql("SELECT tableoid::regclass::text, report_time, count(*) OVER (PARTITION BY service_name, "
                      "ip_address, report_time) FROM service_heartbeat ORDER BY report_time",
                      db=getattr(server, "dbname", "postgres"))


def maintenance(server: PgServer) -> list[str]:
    """partman.run_maintenance() for this table, then the partitions partman sees (it raises if it cannot)."""
    db = getattr(server, "dbname", "postgres")
    server.sql("SELECT partman.run_maintenance('public.service_heartbeat')", db=db)
    return [r[0] for r in server.sql("SELECT partition_tablename FROM partman.show_partitions("
                                     "'public.service_heartbeat')", db=db)]


def test_init_db_indexes_partmans_partitions_and_leaves_them_to_it(pg: PgServer) -> None:
    """init-db on a partman table that already holds rows: both indexes ON ONLY the parent, built on every
    partman partition (and its DEFAULT) and attached, valid; idempotent; --partitioned makes no partition of
    its own beside partman's (that broke partman.run_maintenance), and partman goes on making them."""
    partman_table(pg)
    made = partitions(pg)
    assert "service_heartbeat_default" in made and partman_name(utcnow()) in made, made
    insert(pg, [("redis", "10.0.0.1", utcnow() - k * M) for k in range(5)]
           + [("redis", "10.0.0.1", utcnow() - 40 * 24 * H)])  # one in the DEFAULT
    env = env_for(pg)
    result = cli(["init-db"], env)
    assert result.returncode == 0, result.stderr
    assert f"ON ONLY the table, then on {len(made)} partition(s) (CONCURRENTLY where they held rows), each attached" \
        in result.stdout, result.stdout
    for suffix, *_ in INDEXES:
        parent = object_name("service_heartbeat", suffix)
        assert pg.sql("SELECT indisvalid FROM pg_index WHERE indexrelid = %s::regclass", (parent,),
                      db=pg.dbname) == [(True,)]
        leaves = pg.sql("SELECT c.relname, x.indisvalid FROM pg_partition_tree(%s) t JOIN pg_index x ON "
                        "x.indexrelid = t.relid JOIN pg_class c ON c.oid = x.indrelid WHERE t.level = 1",
                        (parent,), db=pg.dbname)
        assert sorted(leaves) == sorted((name, True) for name in made), leaves
    for flags in ([], ["--partitioned"]):
        again = cli(["init-db", *flags], env)
        assert again.returncode == 0, again.stderr
        assert "created" not in again.stdout and again.stdout.splitlines()[-1].startswith(
            "table service_heartbeat and its indexes are ready"), again.stdout
    assert partitions(pg) == made, "init-db --partitioned made partitions beside partman's"
    pg.sql("UPDATE partman.part_config SET premake = 5", db=pg.dbname)
    seen = maintenance(pg)
    assert len(seen) > len(made) - 1 and set(made) - {"service_heartbeat_default"} <= set(seen), seen
    for suffix, *_ in INDEXES:  # partman's new partitions get the parent's indexes from PostgreSQL
        assert pg.sql("SELECT count(*) FROM pg_partition_tree(%s) WHERE level = 1", (object_name(
            "service_heartbeat", suffix),), db=pg.dbname) == [(len(seen) + 1,)]


def test_once_and_run_write_into_todays_partition(pg: PgServer, redis_server: RedisServer,
                                                  daemon: Callable[..., DaemonProcess]) -> None:
    partman_table(pg)
    env = env_for(pg, REDIS_URL=redis_server.url(), HEARTBEAT_INTERVAL="0.2")
    assert cli(["init-db"], env).returncode == 0
    result = cli(["once"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(placed(pg)) == 3
    proc = daemon(env)
    proc.wait_log("记录心跳成功 - 服务: postgres", count=4)
    assert proc.stop() == 0
    found = placed(pg)
    assert len(found) >= 3 + 3 * 4, found
    assert all(part == partman_name(at) for part, at, _ in found), found  # none in the DEFAULT
    assert all(copies == 1 for _, _, copies in found)
    assert all(abs(at - utcnow()) < 2 * M for _, at, _ in found)  # naive UTC, not the server's Shanghai time


def test_spooled_rows_are_replayed_into_partmans_partitions_once(pg_own: PgServer, redis_server: RedisServer,
                                                                 daemon: Callable[..., DaemonProcess],
                                                                 tmp_path: Any) -> None:
    partman_table(pg_own)
    env = env_for(pg_own, REDIS_URL=redis_server.url(), HEARTBEAT_INTERVAL="0.2", HEARTBEAT_TIMEOUT="1",
                  HEARTBEAT_SPOOL_PATH=str(tmp_path / "spool.db"))
    assert cli(["init-db"], env).returncode == 0
    proc = daemon(env)
    proc.wait_log("记录心跳成功 - 服务: postgres", count=2)
    pg_own.stop()
    down_at = utcnow()
    proc.wait_log("心跳已缓存")
    time.sleep(1.5)  # several cycles spooled
    pg_own.start()
    up_at = utcnow()
    proc.wait_log("补写心跳")
    proc.wait_log("记录心跳成功 - 服务: postgres", count=proc.log().count("记录心跳成功 - 服务: postgres") + 2)
    assert proc.stop() == 0
    found = placed(pg_own)
    spooled = [at for _, at, _ in found if down_at < at < up_at]
    assert len(spooled) >= 3 * 3, (down_at, up_at, found)  # the outage's rows, with their own report_time
    assert all(copies == 1 for _, _, copies in found), [f for f in found if f[2] > 1]
    assert all(part == partman_name(at) for part, at, _ in found), found


def test_status_hint_for_rows_in_partmans_default_names_partman(pg: PgServer) -> None:
    """Rows in the DEFAULT of a table pg_partman manages: status's hint is pg_partman's maintenance and its
    partition_data_proc (prune makes no partition there), and that call does move them out."""
    partman_table(pg)
    env = env_for(pg)
    assert cli(["init-db"], env).returncode == 0
    stray = utcnow().replace(microsecond=0) - 40 * 24 * H
    insert(pg, [("redis", "10.0.0.1", utcnow() - M), ("redis", "10.0.0.1", stray)])
    said = cli(["status"], env)
    assert said.returncode == 0, said.stderr
    assert said.stderr == (f"1 row(s) in the DEFAULT partition service_heartbeat_default (report_time {stray} .. "
                           f"{stray}): a partition is missing; pg_partman manages the table: partman.run_maintenance() "
                           "makes them ahead, and CALL partman.partition_data_proc('public.service_heartbeat') moves "
                           "these rows into theirs\n"), said.stderr
    pg.sql("CALL partman.partition_data_proc('public.service_heartbeat')", db=pg.dbname)
    assert [part for part, _, _ in placed(pg)] == [partman_name(stray), partman_name(utcnow())]
    quiet = cli(["status"], env)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_status_of_a_role_without_usage_on_partmans_schema_still_says_the_default_rows(pg: PgServer,
                                                                                     tmp_path: Path) -> None:
    """README's least-privilege reader has no USAGE on pg_partman's schema: the hint's look-up must not fail
    status (it did: `permission denied for schema partman`, exit 69, the textfile not written, so
    HeartbeatdDefaultPartitionRows could not fire exactly when rows are in the DEFAULT partition)."""
    partman_table(pg)
    assert cli(["init-db"], env_for(pg)).returncode == 0
    insert(pg, [("redis", "10.0.0.1", utcnow() - M), ("redis", "10.0.0.1", utcnow() - 40 * 24 * H)])
    role = "reader_" + pg.dbname
    pg.sql(f"CREATE ROLE {role} LOGIN; GRANT CONNECT ON DATABASE {pg.dbname} TO {role}; "
           f"GRANT USAGE ON SCHEMA public TO {role}; "
           f"GRANT SELECT ON service_heartbeat, service_heartbeat_hourly, service_heartbeat_hourly_state TO {role}; "
           # status counts the DEFAULT partition by its own name, which the grant on the parent does not cover
           f"GRANT SELECT ON service_heartbeat_default TO {role}", db=pg.dbname)
    try:
        out = tmp_path / "ledger.prom"
        said = cli(["status", "--format", "prometheus", "--output", str(out)],
                   env_for(pg, DATABASE_URL=db_url(pg, user=role)))
        assert said.returncode == 0, said.stderr
        assert "heartbeatd_ledger_default_partition_rows 1" in out.read_text(), out.read_text()
        text = cli(["status"], env_for(pg, DATABASE_URL=db_url(pg, user=role)))
        assert text.returncode == 0, text.stderr
        assert text.stderr.startswith("1 row(s) in the DEFAULT partition service_heartbeat_default"), text.stderr
        assert "pg_partman is installed but this role may not read partman.part_config: if it manages" in text.stderr
    finally:
        pg.sql(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}; REVOKE ALL ON SCHEMA public FROM {role}; "
               f"REVOKE ALL ON DATABASE {pg.dbname} FROM {role}", db=pg.dbname)
        pg.sql(f"DROP ROLE {role}")


def test_prune_drops_old_partitions_and_partman_maintenance_goes_on(pg: PgServer) -> None:
    """Rows 8-10 days old in partitions made by partman.create_partition_time, older ones in the DEFAULT,
    current ones in partman's: prune --older-than 7d (dry run and real, same lines and counts) drops the
    partitions wholly below the cut, deletes the DEFAULT's old rows, keeps every current one; then
    partman.run_maintenance() still works."""
    partman_table(pg)
    assert cli(["init-db"], env_for(pg)).returncode == 0
    now = utcnow()
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    old_days = [today - timedelta(days=n) for n in (10, 9, 8)]
    pg.sql("SET TimeZone = 'UTC'; SELECT partman.create_partition_time('public.service_heartbeat', %s::timestamptz[])",
           ([f"{d:%Y-%m-%d} 00:00+00" for d in old_days],), db=pg.dbname)
    before = partitions(pg)
    assert {partman_name(d) for d in old_days} <= set(before), before
    old = [("redis", "10.0.0.1", d + k * 2 * H) for d in old_days for k in range(12)] \
        + [("postgres", "10.0.0.2", now - timedelta(days=20, minutes=k)) for k in range(5)]  # the DEFAULT
    new = [("后端", "10.0.0.3", now - k * 10 * M) for k in range(30)]
    insert(pg, old + new)
    assert sum(part == "service_heartbeat_default" for part, _, _ in placed(pg)) == 5
    # With statistics (ANALYZE reads every row of a table this small: reltuples exact), a dropped partition's rows
    # are its estimate, said to be one; tests/test_table_shapes.py has the never-analyzed ones, counted.
    pg.sql("ANALYZE service_heartbeat", db=pg.dbname)
    env = env_for(pg)
    dry = cli(["prune", "--older-than", "7d", "--dry-run"], env)
    assert dry.returncode == 0, dry.stderr
    assert len(placed(pg)) == len(old) + len(new) and partitions(pg) == before
    real = cli(["prune", "--older-than", "7d"], env)
    assert real.returncode == 0, real.stderr

    def said(out: str) -> list[str]:
        return [re.sub(r" older than .*", "", line.replace("would drop", "dropped").replace("would remove", "removed"))
                for line in out.splitlines()]

    assert said(dry.stdout) == said(real.stdout), (dry.stdout, real.stdout)
    cut = now - timedelta(days=7)
    below = {name for name, bound in before.items()
             if (m := re.search(r"TO \('([^']+)'\)", bound)) and datetime.fromisoformat(m.group(1)) <= cut}
    assert {partman_name(d) for d in old_days} <= below
    counts = {name: sum(partman_name(at) == name for _, _, at in old) for name in below}
    assert said(real.stdout) == [f"dropped partition public.{name} "  # an empty one has no page: 0, exactly
                                 f"({f'about {counts[name]} rows' if counts[name] else '0 row(s)'})"
                                 for name in sorted(below)] + [f"removed about {len(old)} row(s)"], real.stdout
    assert real.stdout.endswith(" (dropped partitions' rows estimated from their statistics)\n"), real.stdout
    assert partitions(pg) == {k: v for k, v in before.items() if k not in below}
    assert sorted(at for _, at, _ in placed(pg)) == sorted(at for _, _, at in new)
    seen = maintenance(pg)  # partman does not miss the partitions prune dropped
    assert not below & set(seen) and partman_name(now) in seen
    pg.sql("SELECT partman.create_partition_time('public.service_heartbeat', ARRAY[%s::timestamptz])",
           (f"{today - timedelta(days=9):%Y-%m-%d} 00:00+00",), db=pg.dbname)  # a backfill's partition again
    assert partman_name(today - timedelta(days=9)) in maintenance(pg)


def test_partmans_own_retention_beside_prune(pg: PgServer) -> None:
    """The alternative: partman's retention drops the old partitions (retention_keep_table = false: else they
    are only detached, their rows kept as tables of their own); prune then only deletes what the DEFAULT holds."""
    partman_table(pg)
    assert cli(["init-db"], env_for(pg)).returncode == 0
    now = utcnow()
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    old_days = [today - timedelta(days=n) for n in (10, 9)]
    pg.sql("SET TimeZone = 'UTC'; SELECT partman.create_partition_time('public.service_heartbeat', %s::timestamptz[])",
           ([f"{d:%Y-%m-%d} 00:00+00" for d in old_days],), db=pg.dbname)
    insert(pg, [("redis", "10.0.0.1", d + k * H) for d in old_days for k in range(4)]
           + [("redis", "10.0.0.1", now - timedelta(days=20))] + [("redis", "10.0.0.1", now - M)])
    pg.sql("UPDATE partman.part_config SET retention = '7 days', retention_keep_table = false", db=pg.dbname)
    seen = maintenance(pg)
    assert not {partman_name(d) for d in old_days} & (set(seen) | set(partitions(pg))), seen
    result = cli(["prune", "--older-than", "7d"], env_for(pg))
    assert result.returncode == 0, result.stderr
    assert said_lines(result.stdout) == ["removed 1 row(s)"], result.stdout
    assert [at for _, at, _ in placed(pg)] == [now - M]


def said_lines(out: str) -> list[str]:
    return [re.sub(r" older than .*", "", line) for line in out.splitlines()]


def test_rollup_and_report_agree_with_the_rows(pg: PgServer) -> None:
    """40 hours of one host at 60 s across partman's daily partitions: Redis down 30 minutes, the whole host
    20 minutes; the rollup's hours hold every row of every pair (a pass on a partitioned table used to roll up
    only `*`), and report --since 2d, from the rollups, finds those outages and that no-data stretch."""
    partman_table(pg)
    env = env_for(pg, HEARTBEAT_INTERVAL="60")
    assert cli(["init-db"], env).returncode == 0
    now = utcnow().replace(second=0, microsecond=0)
    start = now - 40 * H
    redis_down = (now - 30 * H, now - 30 * H + 30 * M)
    host_down = (now - 10 * H, now - 10 * H + 20 * M)
    found = []
    for k in range(40 * 60):
        at = start + k * M
        if host_down[0] <= at < host_down[1]:
            continue
        found += [("后端", "10.0.0.1", at), ("postgres", "10.0.0.2", at)]
        if not redis_down[0] <= at < redis_down[1]:
            found.append(("redis", "10.0.0.3", at))
    insert(pg, found)
    assert len({part for part, _, _ in placed(pg)}) >= 2  # the history crosses partitions
    result = cli(["rollup"], env)
    assert result.returncode == 0, result.stderr
    hourly = pg.sql("SELECT service_name, ip_address, sum(heartbeats) FROM service_heartbeat_hourly "
                    "WHERE ip_address <> '*' GROUP BY 1, 2 ORDER BY 1, 2", db=pg.dbname)
    raw = pg.sql("SELECT service_name, ip_address, count(*) FROM service_heartbeat GROUP BY 1, 2 ORDER BY 1, 2",
                 db=pg.dbname)
    assert hourly == raw and len(raw) == 3, result.stdout
    report = cli(["report", "--since", "2d", "--format", "json"], env)
    assert report.returncode == 0, report.stderr
    assert "report: read hourly rollups for " in report.stderr, report.stderr
    pairs = {p["service"]: p for p in json.loads(report.stdout)["pairs"]}
    assert set(pairs) == {"后端", "postgres", "redis"}

    def near(text: str, at: datetime) -> bool:
        return abs(datetime.fromisoformat(text).replace(tzinfo=None) - at) <= M

    outages = pairs["redis"]["outage_list"]
    assert len(outages) == 1 and near(outages[0]["start"], redis_down[0]) and near(outages[0]["end"], redis_down[1]), \
        outages
    assert not pairs["postgres"]["outage_list"]
    backend = pairs["后端"]["outage_list"]  # the host's own heartbeats stopped: its 后端 was not seen up
    assert len(backend) == 1 and near(backend[0]["start"], host_down[0]) and near(backend[0]["end"], host_down[1]), \
        backend
    for pair in (pairs["redis"], pairs["postgres"]):  # no daemon watched the servers then: no data, not down
        spans = [s for s in pair["no_data_list"] if near(s["start"], host_down[0])]
        assert len(spans) == 1 and near(spans[0]["end"], host_down[1]), pair["no_data_list"]
