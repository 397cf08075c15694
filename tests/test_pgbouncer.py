"""Through a real PgBouncer (transaction pooling): a `postgres` row means PostgreSQL itself answered."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from conftest import DaemonProcess, clean_env, init_table, rows
from servers import PgBouncer, PgServer, RedisServer
from test_faults import assert_no_gap_no_duplicate, statuses

INTERVAL = 1.0  # above the worst cycle (one 0.5 s timeout while PgBouncer waits for a server)


def utc() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def test_pgbouncer_rows_carry_the_server_and_outages_behind_it_are_down(
        pg_own: PgServer, redis_server: RedisServer, tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg_own)
    bouncer = PgBouncer(pg_own, host="127.0.0.3")
    try:
        bouncer.start()  # inside the try: a PgBouncer that fails to start leaves no directory behind
        env = clean_env(DATABASE_URL=bouncer.url(), REDIS_URL=redis_server.url(), HEARTBEAT_INTERVAL=str(INTERVAL),
                        HEARTBEAT_TIMEOUT="0.5", HEARTBEAT_SPOOL_PATH=str(tmp_path / "spool.db"))
        proc = daemon(env)
        proc.wait_log("记录心跳成功 - 服务: postgres", 2)

        # PostgreSQL stopped behind a PgBouncer that still accepts logins.
        pg_own.stop()
        stopped = utc()
        proc.wait_log("WARNING:heartbeatd.daemon:服务不可用 - 服务: postgres")
        down = statuses(proc, "postgres down")
        proc.wait_for(lambda: statuses(proc, "postgres down") >= down + 4, what="cycles with PostgreSQL down")
        assert "spooled" in proc.notices("STATUS=")[-1][1]
        restarting = utc()
        pg_own.start()
        proc.wait_log("补写心跳 - ")
        recorded = proc.log().count("记录心跳成功 - 服务: postgres")
        proc.wait_log("记录心跳成功 - 服务: postgres", recorded + 1)

        # PgBouncer itself stopped, then back.
        bouncer.stop()
        down = statuses(proc, "postgres down")
        proc.wait_for(lambda: statuses(proc, "postgres down") >= down + 3, what="cycles with PgBouncer down")
        bouncer.start()
        backfills = proc.log().count("补写心跳 - ")
        proc.wait_log("补写心跳 - ", backfills + 1)
        assert proc.stop() == 0
    finally:
        bouncer.destroy()
    found = rows(pg_own, db="postgres")
    postgres = [r for r in found if r[0] == "postgres"]
    assert {r[1] for r in postgres} == {"127.0.0.1"}, "the server's address, not PgBouncer's 127.0.0.3"
    inside = [r for r in postgres if stopped <= r[2] <= restarting]
    assert inside == [], f"postgres rows inside the PostgreSQL outage: {inside}"
    cycles = statuses(proc, "next in")
    assert len(assert_no_gap_no_duplicate(found, "后端", INTERVAL, cycles)) == cycles
    assert_no_gap_no_duplicate(found, "redis", INTERVAL, cycles)


# The reshape's first form (a review found it): the commands connected through the one door
# without its proof, so `init-db` and `status` took a PgBouncer whose server is down for a database.
def test_commands_skip_a_pooler_whose_server_is_down_for_the_next_host(
        pg_own: PgServer, pg: PgServer, redis_server: RedisServer, tmp_path: Path) -> None:
    from conftest import cli, db_url
    init_table(pg_own)
    bouncer = PgBouncer(pg_own, host="127.0.0.3")
    try:
        bouncer.start()
        # Through it once: a warm pool, so PgBouncer answers logins on its own afterwards.
        assert cli(["status"], clean_env(DATABASE_URL=bouncer.url())).returncode == 1
        pg_own.stop()
        alone = clean_env(DATABASE_URL=bouncer.url(), HEARTBEAT_TIMEOUT="2")
        result = cli(["init-db"], alone)
        assert result.returncode == 69 and "database unreachable" in result.stderr, result.stderr
        # bouncer first, a healthy server second: the commands go on to the second.
        second = db_url(pg).split("@", 1)[1]
        both = clean_env(DATABASE_URL=bouncer.url(pg.dbname).replace(
            f"{bouncer.host}:{bouncer.port}/{pg.dbname}", f"{bouncer.host}:{bouncer.port},{second}"), HEARTBEAT_TIMEOUT="4")
        result = cli(["init-db"], both)
        assert result.returncode == 0 and "are ready" in result.stdout, result.stdout + result.stderr
        assert pg.sql("SELECT to_regclass('service_heartbeat') IS NOT NULL", db=pg.dbname) == [(True,)]
        result = cli(["status"], both)
        assert result.returncode == 1 and "no heartbeats in the last 1d" in result.stderr, result.stderr
    finally:
        bouncer.destroy()
