"""latency_ms: where the table has the column, every row carries its check's latency; report shows p50/p95/max."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import clean_env, cli, db_url, init_table
from servers import PgServer, RedisServer


@pytest.mark.parametrize("ddl", ["double precision", "real", "numeric(10,3)", "integer", "bigint"])
def test_rows_carry_the_latency_in_any_numeric_column(pg: PgServer, redis_server: RedisServer, ddl: str) -> None:
    init_table(pg)
    pg.sql(f"ALTER TABLE service_heartbeat ADD COLUMN latency_ms {ddl}", db=pg.dbname)  # type: ignore[attr-defined]
    env = clean_env(DATABASE_URL=db_url(pg), REDIS_URL=redis_server.url())
    result = cli(["once"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    found = dict(pg.sql("SELECT service_name, latency_ms FROM service_heartbeat", db=pg.dbname))  # type: ignore[attr-defined]
    assert set(found) == {"后端", "redis", "postgres"}
    shown = {line.split("\t")[0]: float(line.split("\t")[3][:-2]) for line in result.stdout.splitlines()}
    for service, latency in found.items():
        assert latency is not None and 0 <= float(latency) < 5000, (service, latency)
        assert abs(float(latency) - shown[service]) <= 1.0  # the same figure `once` prints, rounded to the column


def test_init_db_adds_the_column_on_request_and_spooled_rows_keep_it(
        pg: PgServer, redis_own: RedisServer, tmp_path: Path) -> None:
    env = clean_env(DATABASE_URL=db_url(pg), REDIS_URL=redis_own.url(), HEARTBEAT_SPOOL_PATH=str(tmp_path / "s.db"))
    assert cli(["init-db"], env).returncode == 0
    columns = {c for (c,) in pg.sql("SELECT column_name FROM information_schema.columns "
                                    "WHERE table_name = 'service_heartbeat'", db=pg.dbname)}  # type: ignore[attr-defined]
    assert "latency_ms" not in columns  # only on request
    result = cli(["init-db", "--with-latency"], env)
    assert result.returncode == 0 and "added column latency_ms double precision" in result.stdout, result.stdout
    again = cli(["init-db", "--with-latency"], env)
    assert again.returncode == 0 and "added column" not in again.stdout  # idempotent
    # Rows spooled while the table is gone come back with their latency.
    pg.sql("ALTER TABLE service_heartbeat RENAME TO away", db=pg.dbname)  # type: ignore[attr-defined]
    from conftest import DaemonProcess
    proc = DaemonProcess(tmp_path, dict(env, HEARTBEAT_INTERVAL="0.3"))
    try:
        proc.wait_log("心跳已缓存 - ")
        time.sleep(1)
        pg.sql("ALTER TABLE away RENAME TO service_heartbeat", db=pg.dbname)  # type: ignore[attr-defined]
        proc.wait_log("补写心跳 - ")
        assert proc.stop() == 0
    finally:
        proc.kill()
    found = pg.sql("SELECT count(*), count(latency_ms), max(created_at - report_time) FROM service_heartbeat",
                   db=pg.dbname)[0]  # type: ignore[attr-defined]
    assert found[0] >= 6 and found[1] == found[0], found  # every row, backfilled ones too, has its latency
    assert found[2] > timedelta(seconds=0.5)  # some were written late: from the spool


def test_report_shows_p50_p95_max_per_pair_in_every_format(pg: PgServer, redis_server: RedisServer) -> None:
    init_table(pg)
    db = pg.dbname  # type: ignore[attr-defined]
    pg.sql("ALTER TABLE service_heartbeat ADD COLUMN latency_ms real", db=db)
    now = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)
    # 100 heartbeats of one host, 30 s apart, latencies 1..100 ms; another pair without latencies.
    pg.sql("INSERT INTO service_heartbeat (service_name, ip_address, report_time, latency_ms) "
           "SELECT 'redis', '10.1.0.1', %s - make_interval(secs => 30 * g), 101 - g FROM generate_series(1, 100) g",
           (now,), db=db)
    pg.sql("INSERT INTO service_heartbeat (service_name, ip_address, report_time) "
           "SELECT '后端', '10.60.0.1', %s - make_interval(secs => 30 * g) FROM generate_series(1, 100) g", (now,), db=db)
    env = clean_env(DATABASE_URL=db_url(pg), REDIS_URL=redis_server.url())
    result = cli(["report", "--since", "1h", "--format", "json"], env)
    assert result.returncode == 0, result.stderr
    pairs = {(p["service"], p["ip"]): p for p in json.loads(result.stdout)["pairs"]}
    latency = pairs[("redis", "10.1.0.1")]["latency_ms"]
    assert latency == {"p50": 50.5, "p95": 95.05, "max": 100.0, "sampled": 100}, latency
    assert pairs[("后端", "10.60.0.1")]["latency_ms"] is None
    text = cli(["report", "--since", "1h"], env).stdout
    assert "  latency  p50 50.5ms  p95 95.0ms  max 100.0ms  (100 heartbeat(s) sampled)\n" in text
    csv_lines = cli(["report", "--since", "1h", "--format", "csv"], env).stdout.splitlines()
    assert csv_lines[0].endswith(",latency_p50_ms,latency_p95_ms,latency_max_ms,latency_sampled")
    assert any(line.startswith("summary,redis,10.1.0.1,") and line.endswith(",50.5,95.05,100.0,100") for line in csv_lines)
    assert any(line.startswith("summary,后端,10.60.0.1,") and line.endswith(",,,,") for line in csv_lines)
    # A table without the column: no latency anywhere, the report as before.
    pg.sql("ALTER TABLE service_heartbeat DROP COLUMN latency_ms", db=db)
    result = cli(["report", "--since", "1h", "--format", "json"], env)
    assert result.returncode == 0 and all(p["latency_ms"] is None for p in json.loads(result.stdout)["pairs"])
    assert "latency" not in cli(["report", "--since", "1h"], env).stdout
