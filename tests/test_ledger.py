"""`once` and `init-db` against real PostgreSQL and Redis: rows, IPs, UTC, table variants, exit statuses."""

from __future__ import annotations

import re

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import clean_env, cli, db_url, init_table, rows
from heartbeatd.heartbeat import to_naive_utc
from heartbeatd.schema import CREATE_TABLE, index_name
from servers import PgServer, RedisServer, free_port

SHANGHAI = "Asia/Shanghai"


def env_for(pg: PgServer, redis: RedisServer, **extra: str) -> dict[str, str]:
    return clean_env(DATABASE_URL=db_url(pg), REDIS_URL=redis.url(), **extra)


def test_init_db_creates_table_and_index_idempotently(pg: PgServer, redis_server: RedisServer, tmp_path: Path) -> None:
    for _ in range(2):
        result = cli(["init-db"], env_for(pg, redis_server), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    columns = pg.sql("SELECT column_name, data_type, is_nullable FROM information_schema.columns "
                     "WHERE table_name = 'service_heartbeat' ORDER BY ordinal_position", db=pg.dbname)
    assert columns == [
        ("id", "bigint", "NO"), ("service_name", "character varying", "NO"), ("ip_address", "character varying", "NO"),
        ("report_time", "timestamp without time zone", "NO"), ("created_at", "timestamp without time zone", "NO"),
    ]
    indexes = pg.sql("SELECT indexdef FROM pg_indexes WHERE tablename = 'service_heartbeat'", db=pg.dbname)
    assert any("(service_name, report_time)" in i[0] for i in indexes)


def test_packaged_schema_sql_is_what_init_db_runs() -> None:
    shipped = (Path(__file__).parent.parent / "packaging" / "schema.sql").read_text()
    rendered = CREATE_TABLE.format(table="service_heartbeat", index=index_name(("service_heartbeat",)))
    assert rendered in shipped


def test_once_records_three_services_in_utc(pg: PgServer, redis_server: RedisServer, tmp_path: Path) -> None:
    # Both the server's timezone and the daemon's TZ are far from UTC: the rows must still be UTC.
    assert pg.sql("SHOW timezone") == [(SHANGHAI,)]
    init_table(pg)
    before = datetime.now(timezone.utc).replace(tzinfo=None)
    result = cli(["once"], env_for(pg, redis_server, TZ=SHANGHAI, HEARTBEAT_BACKEND_IP="198.51.100.7"), cwd=tmp_path)
    after = datetime.now(timezone.utc).replace(tzinfo=None)
    assert result.returncode == 0, result.stderr
    found = rows(pg)
    assert [(r[0], r[1]) for r in found] == [("postgres", "127.0.0.1"), ("redis", "127.0.0.1"), ("后端", "198.51.100.7")]
    for _service, _ip, report_time, created_at in found:
        assert before <= report_time <= created_at <= after
    lines = result.stdout.splitlines()
    assert [line.split("\t")[:3] for line in lines] == [
        ["后端", "up", "198.51.100.7"], ["redis", "up", "127.0.0.1"], ["postgres", "up", "127.0.0.1"]]
    assert all(line.endswith("recorded") for line in lines)
    for service, ip in (("后端", "198.51.100.7"), ("redis", "127.0.0.1"), ("postgres", "127.0.0.1")):
        assert f"INFO:heartbeatd.daemon:记录心跳成功 - 服务: {service}, IP: {ip}" in result.stderr.splitlines()


def test_application_read_query_finds_the_rows(pg: PgServer, redis_server: RedisServer, tmp_path: Path) -> None:
    """The app's SQLAlchemy filter: report_time >= datetime.utcnow() - timedelta(minutes=5)."""
    init_table(pg)
    assert cli(["once"], env_for(pg, redis_server, TZ=SHANGHAI), cwd=tmp_path).returncode == 0
    since = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(minutes=5)
    found = pg.sql("SELECT DISTINCT service_name FROM service_heartbeat WHERE report_time >= %s", (since,), db=pg.dbname)
    assert sorted(r[0] for r in found) == ["postgres", "redis", "后端"]
    # and nothing is in the future by the server's UTC clock (the Shanghai offset would put it 8 h ahead)
    ahead = pg.sql("SELECT count(*) FROM service_heartbeat WHERE report_time > (now() AT TIME ZONE 'utc') + interval '1 minute'",
                   db=pg.dbname)
    assert ahead == [(0,)]


def test_bare_existing_table_without_id_or_defaults(pg: PgServer, redis_server: RedisServer, tmp_path: Path) -> None:
    pg.sql("CREATE TABLE service_heartbeat (service_name varchar(50) NOT NULL, ip_address varchar(64) NOT NULL, "
           "report_time timestamp NOT NULL, created_at timestamp NOT NULL, note text)", db=pg.dbname)
    before = datetime.now(timezone.utc).replace(tzinfo=None)
    result = cli(["once"], env_for(pg, redis_server, TZ=SHANGHAI), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    found = rows(pg)
    assert len(found) == 3
    assert all(before <= r[2] <= r[3] < before + timedelta(minutes=1) for r in found)


@pytest.mark.parametrize("report_type, created_type", [("timestamptz", "timestamptz"), ("timestamp", "timestamptz")])
def test_each_time_column_gets_utc_of_its_kind(pg: PgServer, redis_server: RedisServer, tmp_path: Path,
                                               report_type: str, created_type: str) -> None:
    # timestamptz gets the aware instant, timestamp naive UTC, column by column (the server is in Shanghai).
    pg.sql("CREATE TABLE service_heartbeat (service_name varchar(50) NOT NULL, ip_address varchar(64) NOT NULL, "
           f"report_time {report_type} NOT NULL, created_at {created_type} NOT NULL)", db=pg.dbname)
    before = datetime.now(timezone.utc)
    result = cli(["once"], env_for(pg, redis_server, TZ=SHANGHAI), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    found = rows(pg)
    assert len(found) == 3
    for _service, _ip, *times in found:
        instants = []
        for kind, value in zip((report_type, created_type), times):
            assert (value.utcoffset() is not None) == (kind == "timestamptz"), (kind, value)
            instants.append(value if value.tzinfo else value.replace(tzinfo=timezone.utc))
        assert before <= instants[0] <= instants[1] < before + timedelta(minutes=1)


def test_to_naive_utc_is_the_same_instant() -> None:
    shanghai = timezone(timedelta(hours=8))
    for value in (datetime(2026, 12, 1, 3, 4, 5, 678901, tzinfo=timezone.utc),
                  datetime(2026, 12, 1, 0, 30, tzinfo=shanghai),  # the day before in UTC
                  datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-5)))):
        assert to_naive_utc(value) == value.astimezone(timezone.utc).replace(tzinfo=None)
    assert to_naive_utc(datetime(2026, 12, 1, 0, 30, tzinfo=shanghai)) == datetime(2026, 11, 30, 16, 30)
    assert to_naive_utc(datetime(2026, 12, 1, 1, 2, 3)) == datetime(2026, 12, 1, 1, 2, 3)  # naive: taken as UTC


def test_schema_qualified_table(pg: PgServer, redis_server: RedisServer, tmp_path: Path) -> None:
    pg.sql("CREATE SCHEMA ops", db=pg.dbname)
    env = env_for(pg, redis_server, HEARTBEAT_TABLE="ops.beats")
    assert cli(["init-db"], env, cwd=tmp_path).returncode == 0
    assert cli(["once"], env, cwd=tmp_path).returncode == 0
    assert len(rows(pg, table="ops.beats")) == 3


def test_missing_table_tells_operator_to_run_init_db(pg: PgServer, redis_server: RedisServer, tmp_path: Path) -> None:
    result = cli(["once"], env_for(pg, redis_server), cwd=tmp_path)
    assert result.returncode == 1
    assert "ERROR:heartbeatd.daemon:记录心跳失败 - table service_heartbeat does not exist: run `heartbeatd init-db`" \
        in result.stderr.splitlines()
    assert "记录心跳成功" not in result.stderr
    assert "not recorded" in result.stdout


def test_once_with_redis_down_exits_1_and_records_the_others(pg: PgServer, tmp_path: Path) -> None:
    init_table(pg)
    port = free_port()
    env = clean_env(DATABASE_URL=db_url(pg), REDIS_URL=f"redis://127.0.0.1:{port}/0")
    result = cli(["once"], env, cwd=tmp_path)
    assert result.returncode == 1
    assert "WARNING:heartbeatd.daemon:服务不可用 - 服务: redis, IP: 127.0.0.1" in result.stderr
    assert "ERROR:heartbeatd.daemon:Redis连接测试失败: Connection refused" in result.stderr
    assert sorted(r[0] for r in rows(pg)) == ["postgres", "后端"]
    assert "redis\tdown\t127.0.0.1" in result.stdout


def test_database_unreachable(redis_server: RedisServer, tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(DATABASE_URL=f"postgresql://app:hunter22@127.0.0.1:{port}/x", REDIS_URL=redis_server.url())
    result = cli(["init-db"], env, cwd=tmp_path)
    assert result.returncode == 69
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("heartbeatd: database unreachable: ")
    once = cli(["once"], env, cwd=tmp_path)
    assert once.returncode == 1
    assert "WARNING:heartbeatd.daemon:服务不可用 - 服务: postgres, IP: 127.0.0.1" in once.stderr
    assert re.search(r"ERROR:heartbeatd.daemon:数据库连接测试失败: 127\.0\.0\.1:[0-9]+: Connection refused\. "
                     r"Is the server running on that host and accepting TCP/IP connections\? Fix: start PostgreSQL",
                     once.stderr), once.stderr
    assert "hunter22" not in result.stderr + once.stderr + once.stdout


def test_wrong_database_password_is_reported_without_the_password(pg_own: PgServer, redis_server: RedisServer,
                                                                   tmp_path: Path) -> None:
    pg_own.sql("CREATE ROLE app LOGIN PASSWORD 'right-pw'")
    hba = pg_own.data / "pg_hba.conf"
    hba.write_text("local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
    pg_own.sql("SELECT pg_reload_conf()")
    env = clean_env(DATABASE_URL=pg_own.url(user="app", password="wrong-pw-123"), REDIS_URL=redis_server.url())
    result = cli(["once"], env, cwd=tmp_path)
    assert result.returncode == 1
    assert "数据库连接测试失败: " in result.stderr and "password authentication failed" in result.stderr
    assert "wrong-pw-123" not in result.stderr + result.stdout


def test_down_services_are_reported_at_their_configured_host_resolved(tmp_path: Path) -> None:
    # `localhost` comes from /etc/hosts: no DNS packet leaves the machine.
    env = clean_env(DATABASE_URL=f"postgresql://localhost:{free_port()}/x", REDIS_URL=f"redis://localhost:{free_port()}/0")
    result = cli(["once"], env, cwd=tmp_path)
    assert result.returncode == 1
    assert "服务不可用 - 服务: redis, IP: 127.0.0.1" in result.stderr
    assert "服务不可用 - 服务: postgres, IP: 127.0.0.1" in result.stderr
    assert [line.split("\t")[:3] for line in result.stdout.splitlines()[1:]] == [
        ["redis", "down", "127.0.0.1"], ["postgres", "down", "127.0.0.1"]]
