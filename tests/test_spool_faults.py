"""Nothing lost, round two: a full disk, stray paths, a second daemon, rows the table refuses, a deleted spool."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable


from conftest import DaemonProcess, clean_env, cli, daemon_on_env_file, db_url, fill, init_table, rows
from heartbeatd.heartbeat import Row
from heartbeatd.spool import Spool
from servers import PgServer, RedisServer
from test_faults import INTERVAL, assert_backfilled_whole, assert_no_gap_no_duplicate, env_for, spooled_rows, statuses


def test_full_disk_keeps_the_spool_and_every_row_arrives_once(
        pg_own: PgServer, redis_server: RedisServer, tmp_path: Path, small_fs: Path,
        daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg_own)
    pg_own.stop()
    proc = daemon(env_for(pg_own, redis_server, tmp_path, HEARTBEAT_SPOOL_PATH=str(small_fs / "spool.db")))
    proc.wait_for(lambda: statuses(proc, "postgres down") >= 3, what="rows spooled on disk")
    on_disk = len(spooled_rows(small_fs / "spool.db"))
    assert on_disk >= 6
    filler = fill(small_fs)
    proc.wait_log("ERROR:heartbeatd.daemon:心跳缓存不可写 - ")
    proc.wait_for(lambda: statuses(proc, "in memory only (spool file not writable)") >= 5, what="cycles in memory")
    # One throttled line, naming the cause and how many rows are only in memory.
    lines = [line for _, line in proc.lines if "心跳缓存不可写" in line]
    assert len(lines) == 1 and "database or disk is full" in lines[0] and "held in memory only" in lines[0], lines
    assert not list(small_fs.glob("spool.db.corrupt-*")), "a full disk is not corruption"
    assert "Traceback" not in proc.log() and "closed database" not in proc.log()
    filler.unlink()
    proc.wait_log("心跳缓存恢复")
    pg_own.start()
    assert_backfilled_whole(proc, pg_own, 2)
    assert spooled_rows(small_fs / "spool.db") == []


def test_spool_path_that_is_a_directory_is_78_and_not_renamed(tmp_path: Path) -> None:
    operator_dir = tmp_path / "operator-data"
    operator_dir.mkdir()
    (operator_dir / "precious").write_text("keep me")
    env = clean_env(HEARTBEAT_SPOOL_PATH=str(operator_dir), DATABASE_URL="postgresql://127.0.0.1:1/x",
                    REDIS_URL="redis://127.0.0.1:1/0")
    result = cli(["run"], env, cwd=tmp_path)
    assert result.returncode == 78
    assert result.stderr.strip() == f"heartbeatd: HEARTBEAT_SPOOL_PATH: {operator_dir} is a directory, not a spool file"
    assert (operator_dir / "precious").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["operator-data"]


def test_spool_the_user_cannot_read_is_78_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path, 1000)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    spool.append([Row("后端", "10.0.0.1", t0 + timedelta(seconds=i)) for i in range(100)])
    spool.close()
    path.chmod(0)
    env = clean_env(HEARTBEAT_SPOOL_PATH=str(path), DATABASE_URL="postgresql://127.0.0.1:1/x",
                    REDIS_URL="redis://127.0.0.1:1/0")
    # Root without CAP_DAC_OVERRIDE: file permissions apply, as to the unit's dynamic user.
    result = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-m", "heartbeatd",
                             "run"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 78, result.stderr
    assert result.stderr.strip() == f"heartbeatd: HEARTBEAT_SPOOL_PATH: {path} cannot be read and written by this user"
    path.chmod(0o600)
    assert len(spooled_rows(path)) == 100
    assert not list(tmp_path.glob("spool.db.corrupt-*"))


def test_reload_to_a_directory_keeps_the_old_configuration(
        pg: PgServer, redis_server: RedisServer, tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg)
    proc, env_file, good = daemon_on_env_file(daemon, pg, redis_server, tmp_path, INTERVAL)
    (tmp_path / "somedir").mkdir()
    env_file.write_text(good.replace(str(tmp_path / "spool.db"), str(tmp_path / "somedir")))
    proc.signal(signal.SIGHUP)
    proc.wait_log(f"重新加载配置失败 - keeping the old configuration: {tmp_path / 'somedir'} is a directory")
    assert (tmp_path / "somedir").is_dir() and not list(tmp_path.glob("somedir.corrupt-*"))
    # The same path again on reload reuses the open, locked spool (no "in use" against ourselves).
    env_file.write_text(good.replace(f"HEARTBEAT_INTERVAL={INTERVAL}", "HEARTBEAT_INTERVAL=0.2"))
    proc.signal(signal.SIGHUP)
    proc.wait_log("配置已重新加载 - interval 0.2s")
    assert proc.stop() == 0


def test_a_second_daemon_on_the_same_spool_is_refused(
        pg: PgServer, redis_server: RedisServer, tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg)
    env = env_for(pg, redis_server, tmp_path)
    first = daemon(env)
    first.wait_log("记录心跳成功 - 服务: postgres")
    second = cli(["run"], env, cwd=tmp_path, timeout=30)
    assert second.returncode == 78
    assert second.stderr.strip() == (f"heartbeatd: HEARTBEAT_SPOOL_PATH: {tmp_path / 'spool.db'} is in use by another "
                                     f"heartbeatd (PID {first.proc.pid})")
    assert first.stop() == 0
    # Released with the first daemon: a new one starts.
    third = daemon(env)
    third.wait_log("记录心跳成功 - 服务: postgres")
    assert third.stop() == 0


REPLAYER = """
import os, sys
from datetime import datetime, timedelta, timezone
import psycopg2
from heartbeatd.heartbeat import Row
from heartbeatd.writer import Writer
t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
rows = [Row(s, "10.7.7.7", t0 + timedelta(seconds=30 * i)) for i in range(3000) for s in ("后端", "redis")]
conn = psycopg2.connect(os.environ["DATABASE_URL"]); conn.autocommit = True
writer = Writer(("service_heartbeat",), 10)
sys.stdin.readline()  # both start together
for n in range(0, len(rows), 250):
    writer.write(conn, rows[n:n + 250], dedupe=True)
"""


def test_two_writers_replaying_the_same_rows_write_each_once(pg: PgServer, tmp_path: Path) -> None:
    init_table(pg)
    env = clean_env(DATABASE_URL=db_url(pg))
    for _ in range(3):
        procs = [subprocess.Popen([sys.executable, "-c", REPLAYER], env=env, stdin=subprocess.PIPE, text=True)
                 for _ in range(2)]
        time.sleep(1.0)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        assert [proc.wait(120) for proc in procs] == [0, 0]
        found = pg.sql("SELECT count(*), count(DISTINCT (service_name, ip_address, report_time)) FROM service_heartbeat",
                       db=pg.dbname)
        assert found == [(6000, 6000)]
        pg.sql("TRUNCATE service_heartbeat", db=pg.dbname)


def seed(path: Path, rows_: list[Row]) -> None:
    spool = Spool(path, 100000)
    spool.append(rows_)
    spool.close()


def test_rows_the_table_refuses_are_set_aside_and_never_block_the_rest(
        pg: PgServer, redis_server: RedisServer, tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg)
    pg.sql("ALTER TABLE service_heartbeat ADD CONSTRAINT no_poison CHECK (ip_address <> '10.66.66.66')", db=pg.dbname)
    t0 = datetime.now(timezone.utc) - timedelta(hours=1)
    backlog = [Row("后端", "10.9.9.9", t0 + timedelta(seconds=30 * i)) for i in range(40)]
    poison = Row("后端", "10.66.66.66", t0 + timedelta(seconds=15))
    seed(tmp_path / "spool.db", backlog[:20] + [poison] + backlog[20:])
    env = env_for(pg, redis_server, tmp_path)
    proc = daemon(env)
    proc.wait_log("心跳被拒绝 - 服务: 后端, IP: 10.66.66.66")
    proc.wait_for(lambda: statuses(proc, "1 rejected") >= 3, what="STATUS counting the rejected row")
    line = next(line for _, line in proc.lines if "心跳被拒绝" in line)
    assert line.startswith("ERROR:heartbeatd.daemon:") and 'violates check constraint "no_poison"' in line
    found = rows(pg)
    assert {r[2] for r in found if r[1] == "10.9.9.9"} == {r.report_time.replace(tzinfo=None) for r in backlog}
    assert not [r for r in found if r[1] == "10.66.66.66"]
    assert len([r for r in found if r[0] == "postgres"]) >= 3  # live rows every cycle

    # The operator lists it while the daemon runs, fixes the table, writes it again.
    listed = cli(["rejected"], env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("后端\t10.66.66.66\t") and "no_poison" in listed.stdout
    assert len(listed.stdout.splitlines()) == 1
    retry = cli(["rejected", "--retry"], env, cwd=tmp_path)
    assert retry.returncode == 1 and "0 row(s) written, 1 still rejected" in retry.stdout
    pg.sql("ALTER TABLE service_heartbeat DROP CONSTRAINT no_poison", db=pg.dbname)
    retry = cli(["rejected", "--retry"], env, cwd=tmp_path)
    assert retry.returncode == 0 and "1 row(s) written, 0 still rejected" in retry.stdout, retry.stdout + retry.stderr
    assert pg.sql("SELECT count(*) FROM service_heartbeat WHERE ip_address = '10.66.66.66'", db=pg.dbname) == [(1,)]
    last = len(proc.notices("STATUS="))
    proc.wait_for(lambda: len(proc.notices("STATUS=")) >= last + 2, what="two more cycles")
    assert "rejected" not in proc.notices("STATUS=")[-1][1]

    # A live row refused every cycle: the others are still written, one ERROR line a minute.
    pg.sql("ALTER TABLE service_heartbeat ADD CONSTRAINT no_redis CHECK (service_name <> 'redis') NOT VALID", db=pg.dbname)
    before = statuses(proc, "next in")
    proc.wait_for(lambda: statuses(proc, "next in") >= before + 8, what="eight cycles refusing redis rows")
    assert proc.log().count("心跳被拒绝 - 服务: redis") == 1
    assert proc.stop() == 0
    assert len(cli(["rejected"], env, cwd=tmp_path).stdout.splitlines()) >= 8
    postgres_rows = [r for r in rows(pg) if r[0] == "postgres"]
    assert len(postgres_rows) == statuses(proc, "next in")


def test_a_deleted_spool_is_noticed_and_its_rows_carried_over(
        pg_own: PgServer, redis_server: RedisServer, tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg_own)
    pg_own.stop()
    env = env_for(pg_own, redis_server, tmp_path)
    first = daemon(env)
    first.wait_for(lambda: statuses(first, "postgres down") >= 3, what="spooled cycles")
    for name in ("spool.db", "spool.db-wal", "spool.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    first.wait_log("ERROR:heartbeatd.spool:心跳缓存文件丢失 - ")
    seen = statuses(first, "postgres down")
    first.wait_for(lambda: statuses(first, "postgres down") >= seen + 3, what="cycles after the deletion")
    first.signal(signal.SIGKILL)
    first.proc.wait()
    cycles = statuses(first, "postgres down")
    assert len(spooled_rows(tmp_path / "spool.db")) == 2 * cycles
    pg_own.start()
    second = daemon(env)
    second.wait_log("补写心跳 - ")
    second.wait_log("记录心跳成功 - 服务: postgres", 2)
    assert second.stop() == 0
    found = rows(pg_own, db="postgres")
    assert len([r for r in found if r[0] == "后端"]) == cycles + statuses(second, "next in")
    assert_no_gap_no_duplicate(found, "后端", INTERVAL * 3, 1)


def test_the_bound_drops_the_rows_written_longest_ago_even_after_a_clock_step(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 5)
    t0 = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
    first = [Row("后端", "10.0.0.1", t0 + timedelta(seconds=i)) for i in range(5)]
    stepped_back = [Row("后端", "10.0.0.1", t0 - timedelta(hours=1, seconds=-i)) for i in range(3)]
    spool.append(first)
    assert spool.append(stepped_back) == 3
    kept = [row for _, row in spool.oldest(10)]
    assert kept == first[3:] + stepped_back  # the newest written stay, whatever their report_time
    spool.close()


def test_overruns_are_throttled(pg: PgServer, redis_server: RedisServer, tmp_path: Path,
                                daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg)
    # A "Redis" that accepts and never answers: every cycle takes the 0.05 s timeout, 5 intervals.
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(64)
        env = env_for(pg, redis_server, tmp_path, HEARTBEAT_INTERVAL="0.01", HEARTBEAT_TIMEOUT="0.05",
                      REDIS_URL=f"redis://127.0.0.1:{mute.getsockname()[1]}/0")
        proc = daemon(env)
        proc.wait_for(lambda: statuses(proc, "next in") >= 30, what="30 overrunning cycles")
        assert proc.stop() == 0
    assert proc.log().count("心跳周期超时") == 1


def test_reload_to_a_new_spool_path_carries_the_backlog_over(
        pg_own: PgServer, redis_server: RedisServer, tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg_own)
    proc, env_file, good = daemon_on_env_file(daemon, pg_own, redis_server, tmp_path, INTERVAL)
    pg_own.stop()
    proc.wait_for(lambda: statuses(proc, "postgres down") >= 3, what="rows spooled in the first spool")
    env_file.write_text(good.replace(str(tmp_path / "spool.db"), str(tmp_path / "moved" / "spool.db")))
    proc.signal(signal.SIGHUP)
    proc.wait_log("心跳缓存已迁移 - ")
    assert spooled_rows(tmp_path / "spool.db") == []
    assert len(spooled_rows(tmp_path / "moved" / "spool.db")) >= 6
    pg_own.start()
    assert_backfilled_whole(proc, pg_own, 2)
    assert spooled_rows(tmp_path / "moved" / "spool.db") == []
