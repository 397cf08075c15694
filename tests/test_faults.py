"""Nothing lost, nothing hangs: real faults on private servers against the real daemon process."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable


from conftest import DaemonProcess, clean_env, db_url, init_table, rows
from heartbeatd.heartbeat import Row
from heartbeatd.spool import Spool
from servers import PgServer, RedisServer

INTERVAL = 0.3
# Against a frozen server a check blocks for the whole timeout: with the interval longer than
# that, no start is skipped and every cycle's heartbeat must be there.
FROZEN = dict(HEARTBEAT_INTERVAL="0.6", HEARTBEAT_TIMEOUT="0.3")


def env_for(pg: PgServer, redis: RedisServer, tmp: Path, **extra: str) -> dict[str, str]:
    settings = dict(DATABASE_URL=db_url(pg), REDIS_URL=redis.url(), HEARTBEAT_INTERVAL=str(INTERVAL),
                    HEARTBEAT_TIMEOUT="0.5", HEARTBEAT_SPOOL_PATH=str(tmp / "spool.db"))
    settings.update(extra)
    return clean_env(**settings)


def statuses(proc: DaemonProcess, text: str) -> int:
    return sum(text in s for _, s in proc.notices("STATUS="))


def assert_no_gap_no_duplicate(found: list[tuple[Any, ...]], service: str, interval: float, cycles: int) -> list[datetime]:
    """Every cycle's row of `service` is there once, at the cycle's pace."""
    times = [r[2] for r in found if r[0] == service]
    assert len(times) == len(set(times)), f"duplicate {service} rows"
    assert len(times) >= cycles, (times, cycles)
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
    assert max(gaps) < 2 * interval, f"gap in {service} heartbeats: {max(gaps):.2f}s"
    return times


def assert_backfilled_whole(proc: DaemonProcess, pg: PgServer, recorded: int) -> tuple[list[tuple[Any, ...]], int]:
    """After PostgreSQL returned: the backlog is written and every cycle's 后端 and redis row is there once."""
    proc.wait_log("补写心跳 - ")
    proc.wait_log("记录心跳成功 - 服务: postgres", recorded)
    assert proc.stop() == 0
    found = rows(pg, db="postgres")
    cycles = statuses(proc, "next in")
    assert len(assert_no_gap_no_duplicate(found, "后端", INTERVAL, cycles)) == cycles
    assert_no_gap_no_duplicate(found, "redis", INTERVAL, cycles)
    return found, cycles


def spooled_rows(path: Path, where: str = "") -> list[tuple[str, str, str]]:
    """(service_name, ip_address, report_time) of every row in the spool file (`where`: of some)."""
    db = sqlite3.connect(str(path))
    try:
        return db.execute(f"SELECT service_name, ip_address, report_time FROM spool {where}").fetchall()
    finally:
        db.close()


def test_postgres_stopped_then_restarted_loses_and_duplicates_nothing(
        pg_own: PgServer, redis_server: RedisServer, tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg_own)
    proc = daemon(env_for(pg_own, redis_server, tmp_path))
    proc.wait_log("记录心跳成功 - 服务: postgres", 2)
    pg_own.stop()
    proc.wait_for(lambda: statuses(proc, "postgres down") >= 5, what="five cycles with PostgreSQL down")
    assert "心跳已缓存" in proc.log()
    assert "记录心跳成功" not in proc.log().split("数据库连接测试失败")[-1]  # spooled rows are not "recorded"
    pg_own.start()
    found, cycles = assert_backfilled_whole(proc, pg_own, 4)
    late = [r for r in found if (r[3] - r[2]).total_seconds() > INTERVAL]
    assert len(late) >= 2 * 4, "backfilled rows must keep their report_time and show a later created_at"
    assert {r[0] for r in late} == {"后端", "redis"}
    assert all(r[3] > r[2] for r in late)
    assert spooled_rows(tmp_path / "spool.db") == []


def frozen_server_run(proc: DaemonProcess, server: PgServer | RedisServer, service: str, failure: str,
                      recovered: str) -> None:
    """Freeze `server` for several cycles; the watchdog and the pace must hold throughout."""
    proc.wait_log(f"记录心跳成功 - 服务: {service}", 2)
    server.freeze()
    frozen_at = time.monotonic()
    try:
        proc.wait_log(failure)
        proc.wait_for(lambda: statuses(proc, f"{service} down") >= 5, what=f"five cycles against a frozen {service}")
    finally:
        server.thaw()
    thawed_at = time.monotonic()
    recorded = f"记录心跳成功 - 服务: {service}"
    proc.wait_log(recorded, proc.log().count(recorded) + 1)  # heartbeats of the thawed service resume
    proc.wait_log(f"服务恢复 - 服务: {service}")
    proc.wait_log(recovered)
    assert proc.stop() == 0
    pings = [at for at, _ in proc.notices("WATCHDOG=1")]
    assert max(b - a for a, b in zip(pings, pings[1:])) <= 2.0, "WATCHDOG=1 must come within WATCHDOG_USEC/2"
    during = [at for at, _ in proc.notices("STATUS=") if frozen_at <= at <= thawed_at]
    assert max(b - a for a, b in zip(during, during[1:])) <= 0.6 + 0.3 + 0.2  # interval + timeout


def test_postgres_frozen_watchdog_and_pace_hold(
        pg_own: PgServer, redis_server: RedisServer, tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg_own)
    proc = daemon(env_for(pg_own, redis_server, tmp_path, **FROZEN), watchdog_usec=4_000_000)
    frozen_server_run(proc, pg_own, "postgres", f"数据库连接测试失败: 127.0.0.1:{pg_own.port}: timed out after 0.3s", "补写心跳 - ")
    found = rows(pg_own, db="postgres")
    for service in ("后端", "redis"):  # spooled while PostgreSQL was frozen, none lost
        assert_no_gap_no_duplicate(found, service, 0.6, statuses(proc, "next in"))


def test_insert_stalled_mid_statement_is_bounded_and_written_once(
        pg: PgServer, redis_server: RedisServer, tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg)
    proc = daemon(env_for(pg, redis_server, tmp_path, **FROZEN), watchdog_usec=4_000_000)
    proc.wait_log("记录心跳成功 - 服务: postgres", 1)
    locker = pg.connect(pg.dbname)
    locker.autocommit = False
    locker.cursor().execute("LOCK TABLE service_heartbeat IN ACCESS EXCLUSIVE MODE")  # every INSERT now stalls
    try:
        proc.wait_log("记录心跳失败 - ", 1)
        proc.wait_for(lambda: statuses(proc, "postgres up") >= 6, what="cycles during the stall")
    finally:
        locker.rollback()
        locker.close()
    proc.wait_log("补写心跳 - ")
    proc.wait_log("心跳写入恢复")
    assert proc.stop() == 0
    pings = [at for at, _ in proc.notices("WATCHDOG=1")]
    assert max(b - a for a, b in zip(pings, pings[1:])) <= 2.0
    found = rows(pg)
    cycles = statuses(proc, "next in")
    for service in ("后端", "redis", "postgres"):
        assert_no_gap_no_duplicate(found, service, 0.6, cycles)


def test_redis_frozen_watchdog_and_pace_hold(
        pg: PgServer, redis_own: RedisServer, tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg)
    proc = daemon(env_for(pg, redis_own, tmp_path, **FROZEN), watchdog_usec=4_000_000)
    frozen_server_run(proc, redis_own, "redis", "Redis连接测试失败: timed out after 0.3s", "服务恢复 - 服务: redis")
    found = rows(pg)
    for service in ("后端", "postgres"):
        assert_no_gap_no_duplicate(found, service, 0.6, statuses(proc, "next in"))


def test_sigkill_with_rows_in_the_spool_next_daemon_writes_them(
        pg_own: PgServer, redis_server: RedisServer, tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg_own)
    pg_own.stop()
    first = daemon(env_for(pg_own, redis_server, tmp_path))
    first.wait_for(lambda: statuses(first, "postgres down") >= 3, what="three spooled cycles")
    first.signal(signal.SIGKILL)
    first.proc.wait()
    kept = spooled_rows(tmp_path / "spool.db")
    assert len(kept) >= 6
    pg_own.start()
    second = daemon(env_for(pg_own, redis_server, tmp_path))
    second.wait_log("补写心跳 - ")
    assert second.stop() == 0
    found = rows(pg_own, db="postgres")
    written = {(r[0], r[1], r[2]) for r in found}
    for service, ip, report_time in kept:
        naive = datetime.fromisoformat(report_time).astimezone(timezone.utc).replace(tzinfo=None)
        assert (service, ip, naive) in written
    assert len(found) == len({(r[0], r[1], r[2]) for r in found})
    assert spooled_rows(tmp_path / "spool.db") == []


def test_death_between_commit_and_spool_delete_writes_nothing_twice(
        pg: PgServer, redis_server: RedisServer, tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg)
    spool_path = tmp_path / "spool.db"
    start = datetime.now(timezone.utc) - timedelta(minutes=10)
    seeded = [Row(s, "10.9.9.9", start + timedelta(seconds=30 * i)) for i in range(20) for s in ("后端", "redis")]
    spool = Spool(spool_path, 1000)
    spool.append(seeded)
    spool.close()
    env = env_for(pg, redis_server, tmp_path)
    # A daemon that dies right after PostgreSQL committed the backlog, before the spool forgot it.
    script = ("import os\nfrom heartbeatd import cli, config\nfrom heartbeatd.notify import Notifier\n"
              "cli.Spool.delete = lambda self, ids: os._exit(9)\n"
              "d = cli.Daemon(config.load(os.environ), cli.build_services, Notifier({}))\nd.run_cycle()\n")
    died = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert died.returncode == 9, died.stderr
    assert len(spooled_rows(spool_path)) == len(seeded)  # still spooled ...
    assert len([r for r in rows(pg) if r[1] == "10.9.9.9"]) == len(seeded)  # ... and already in the table
    proc = daemon(env)
    proc.wait_log("补写心跳 - 40 row(s)")
    proc.wait_log("记录心跳成功 - 服务: postgres", 2)
    assert proc.stop() == 0
    replayed = [r for r in rows(pg) if r[1] == "10.9.9.9"]
    assert len(replayed) == len(seeded)
    assert spooled_rows(spool_path) == []


def test_corrupt_spool_is_moved_aside_and_the_daemon_runs(
        pg: PgServer, redis_server: RedisServer, tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg)
    (tmp_path / "spool.db").write_bytes(b"this is not an sqlite database" * 100)
    proc = daemon(env_for(pg, redis_server, tmp_path))
    proc.wait_log("记录心跳成功 - 服务: postgres")
    assert "ERROR:heartbeatd.spool:心跳缓存文件损坏" in proc.log()
    assert proc.notices("READY=1")
    aside = list(tmp_path.glob("spool.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    assert proc.stop() == 0


def test_insert_privilege_revoked_then_granted(
        pg: PgServer, redis_server: RedisServer, tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg)
    pg.sql("DO $$ BEGIN CREATE ROLE hb_app LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    pg.sql("GRANT SELECT ON service_heartbeat TO hb_app", db=pg.dbname)
    env = env_for(pg, redis_server, tmp_path, DATABASE_URL=pg.url(user="hb_app", db=pg.dbname))
    proc = daemon(env)
    proc.wait_log("ERROR:heartbeatd.daemon:记录心跳失败 - permission denied for table service_heartbeat")
    proc.wait_for(lambda: statuses(proc, "spooled") >= 3, what="rows spooled while INSERT is denied")
    assert "记录心跳成功" not in proc.log()
    pg.sql("GRANT INSERT ON service_heartbeat TO hb_app; GRANT USAGE ON SEQUENCE service_heartbeat_id_seq TO hb_app",
           db=pg.dbname)
    proc.wait_log("补写心跳 - ")
    proc.wait_log("记录心跳成功 - 服务: postgres")
    assert proc.stop() == 0
    found = rows(pg)
    cycles = statuses(proc, "next in")
    for service in ("后端", "redis", "postgres"):
        assert_no_gap_no_duplicate(found, service, INTERVAL, cycles)


def test_spool_bound_drops_oldest_with_a_warning(
        pg_own: PgServer, redis_server: RedisServer, tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    pg_own.stop()
    proc = daemon(env_for(pg_own, redis_server, tmp_path, HEARTBEAT_SPOOL_MAX_ROWS="4"))
    proc.wait_log("WARNING:heartbeatd.daemon:心跳缓存已满 - dropped the 2 oldest row(s) (HEARTBEAT_SPOOL_MAX_ROWS=4)", 2)
    first = proc.signal(signal.SIGTERM)
    assert first is None and proc.stop() == 0
    kept = spooled_rows(tmp_path / "spool.db")
    assert len(kept) == 4
    # the newest two cycles survive
    assert sorted({r[2] for r in kept}) == sorted({r[2] for r in kept})[-2:]


def test_spool_unit_bound_and_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 5)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert spool.append([Row("后端", "10.0.0.1", t0 + timedelta(seconds=i)) for i in range(8)]) == 3
    assert spool.count == 5
    assert [r.report_time for _, r in spool.oldest(10)] == [t0 + timedelta(seconds=i) for i in range(3, 8)]
    assert spool.append([Row("后端", "10.0.0.1", t0 + timedelta(seconds=7))]) == 0  # already there: once
    spool.delete([i for i, _ in spool.oldest(2)])
    assert spool.count == 3
    spool.close()
    assert Spool(tmp_path / "s.db", 5).count == 3  # durable across reopen


def test_spool_corrupted_while_open_is_set_aside_and_replaced(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 100)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    spool.append([Row("后端", "10.0.0.1", t0 + timedelta(seconds=i)) for i in range(5)])
    spool.file.db.close()  # type: ignore[union-attr]  # as if another process scribbled over the file under us
    for name in ("s.db", "s.db-wal", "s.db-shm"):
        if (tmp_path / name).exists():
            (tmp_path / name).write_bytes(b"garbage" * 1000)
    spool.file.db = sqlite3.connect(str(tmp_path / "s.db"), isolation_level=None)
    assert spool.oldest(10) == []  # logged, set aside, started anew
    assert list(tmp_path.glob("s.db.corrupt-*"))
    assert spool.count == 0
    assert spool.append([Row("redis", "10.0.0.2", t0)]) == 0
    assert [r.service for _, r in spool.oldest(10)] == ["redis"]
