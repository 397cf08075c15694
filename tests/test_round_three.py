"""Nothing lost, round three: the faults a compound-fault soak found, each forced on a real daemon.

Each test fails on heartbeatd 1.1.1 (the line above it says how) and checks what the operator
sees: the log line, STATUS, the exit status, the rows in the table and in the spool.
"""

from __future__ import annotations

import http.server
import signal
import sqlite3
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import DaemonProcess, clean_env, cli, db_url, fill, init_table, rows
from heartbeatd.heartbeat import Row
from heartbeatd.spool import Spool
from servers import PgServer, RedisServer
from test_faults import INTERVAL, assert_no_gap_no_duplicate, env_for, spooled_rows, statuses


def rejected_in(path: Path) -> list[tuple[str, str, str]]:
    return spooled_rows(path, "WHERE rejected IS NOT NULL")


def status_without(proc: DaemonProcess, *words: str) -> bool:
    """The last STATUS is a cycle's and says none of `words`."""
    last = proc.notices("STATUS=")
    return bool(last) and "next in" in last[-1][1] and not any(word in last[-1][1] for word in words)


def drained(proc: DaemonProcess) -> bool:
    """The last STATUS says nothing is spooled, held in memory or set aside."""
    return status_without(proc, "spooled", "in memory", "rejected", "cycle failed")


# 1.1.1: every row of those cycles set aside (STATUS `N rejected`), none written after the fix.
def test_a_table_that_refuses_every_row_keeps_them_spooled_and_writes_them_once_fixed(
        pg: PgServer, redis_server: RedisServer, tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg)
    proc = daemon(env_for(pg, redis_server, tmp_path))
    proc.wait_log("记录心跳成功 - 服务: postgres", 2)
    pg.sql("ALTER TABLE service_heartbeat ADD COLUMN host text NOT NULL DEFAULT 'x'", db=pg.dbname)
    pg.sql("ALTER TABLE service_heartbeat ALTER COLUMN host DROP DEFAULT", db=pg.dbname)
    proc.wait_log("refuses every row")
    before = statuses(proc, "spooled")
    proc.wait_for(lambda: statuses(proc, "spooled") >= before + 6, what="six cycles refused whole")
    pg.sql("ALTER TABLE service_heartbeat DROP COLUMN host", db=pg.dbname)
    proc.wait_log("心跳写入恢复 - table service_heartbeat accepts rows again")
    proc.wait_for(lambda: drained(proc), what="the backlog written")
    assert proc.stop() == 0
    lines = [line for _, line in proc.lines if "记录心跳失败" in line]
    assert len(lines) == 1, lines  # one line a minute, not one a cycle
    assert lines[0].startswith("ERROR:heartbeatd.daemon:记录心跳失败 - table service_heartbeat refuses every row: "
                               'null value in column "host"'), lines[0]
    assert "心跳被拒绝" not in proc.log()
    assert not any("rejected" in s for _, s in proc.notices("STATUS="))
    cycles = statuses(proc, "next in")
    found = rows(pg)
    assert len(assert_no_gap_no_duplicate(found, "后端", INTERVAL, cycles)) == cycles
    assert_no_gap_no_duplicate(found, "redis", INTERVAL, cycles)
    assert spooled_rows(tmp_path / "spool.db") == []


# 1.1.1: `AssertionError` from Spool._recount every cycle (`心跳周期异常`), the backlog never replayed,
# the rows held in memory lost at SIGTERM.
def test_full_disk_set_aside_rows_and_outages_together_never_fail_a_cycle(
        pg_own: PgServer, redis_server: RedisServer, tmp_path: Path, small_fs: Path,
        daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg_own)
    pg_own.sql("ALTER TABLE service_heartbeat ADD CONSTRAINT no_redis CHECK (service_name <> 'redis')")
    spool = small_fs / "spool.db"
    env = env_for(pg_own, redis_server, tmp_path, HEARTBEAT_SPOOL_PATH=str(spool))
    proc = daemon(env)
    proc.wait_for(lambda: statuses(proc, "rejected") >= 2, what="redis rows set aside")
    filler = fill(small_fs)
    proc.wait_for(lambda: statuses(proc, "in memory only") >= 3, what="rows held in memory")
    pg_own.stop()
    proc.wait_for(lambda: statuses(proc, "postgres down") >= 3, what="cycles with PostgreSQL down")
    pg_own.start()
    pg_own.sql("ALTER TABLE service_heartbeat DROP CONSTRAINT no_redis")
    filler.unlink()
    proc.wait_for(lambda: status_without(proc, "spooled", "in memory"), what="the backlog written")
    assert "心跳周期异常" not in proc.log() and "Traceback" not in proc.log()
    assert not any("cycle failed" in s for _, s in proc.notices("STATUS="))
    assert proc.stop() == 0
    cycles = statuses(proc, "next in")
    found = rows(pg_own, db="postgres")
    assert len(assert_no_gap_no_duplicate(found, "后端", INTERVAL, cycles)) == cycles
    # Every redis heartbeat is in the table or set aside in the spool: none lost, none twice.
    written = {r[2] for r in found if r[0] == "redis"}
    aside = {datetime.fromisoformat(t).replace(tzinfo=None) for s, _, t in rejected_in(spool) if s == "redis"}
    assert not written & aside and len(written) + len(aside) == cycles, (len(written), len(aside), cycles)
    retry = cli(["rejected", "--retry"], env, cwd=tmp_path)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert len([r for r in rows(pg_own, db="postgres") if r[0] == "redis"]) == cycles


# 1.1.1: while the file cannot be written, memory rows are removed by count from the front: a
# refused row is dropped without being set aside and a written one stays (and live refused rows
# the file cannot take are dropped outright).
def test_rows_held_in_memory_are_removed_by_identity(
        pg_own: PgServer, redis_server: RedisServer, tmp_path: Path, small_fs: Path,
        daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg_own)
    spool = small_fs / "spool.db"
    env = env_for(pg_own, redis_server, tmp_path, HEARTBEAT_SPOOL_PATH=str(spool))
    proc = daemon(env)
    proc.wait_log("记录心跳成功 - 服务: postgres", 2)
    filler = fill(small_fs)
    pg_own.sql("ALTER TABLE service_heartbeat ADD CONSTRAINT no_redis CHECK (service_name <> 'redis') NOT VALID")
    proc.wait_for(lambda: statuses(proc, "in memory only") >= 2, what="refused redis rows held in memory")
    pg_own.stop()
    proc.wait_for(lambda: statuses(proc, "postgres down") >= 3, what="cycles with PostgreSQL down")
    pg_own.start()
    proc.wait_log("补写心跳 - ")
    proc.wait_for(lambda: statuses(proc, "postgres up") >= 3, what="cycles after PostgreSQL returned")
    filler.unlink()
    proc.wait_for(lambda: status_without(proc, "in memory"), what="the memory rows in the file")
    pg_own.sql("ALTER TABLE service_heartbeat DROP CONSTRAINT no_redis")
    proc.wait_for(lambda: status_without(proc, "spooled", "in memory"), what="the backlog written")
    assert proc.stop() == 0
    assert "心跳周期异常" not in proc.log()
    retry = cli(["rejected", "--retry"], env, cwd=tmp_path)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    cycles = statuses(proc, "next in")
    found = rows(pg_own, db="postgres")
    assert len(assert_no_gap_no_duplicate(found, "后端", INTERVAL, cycles)) == cycles
    assert len(assert_no_gap_no_duplicate(found, "redis", INTERVAL, cycles)) == cycles
    assert spooled_rows(spool) == []


class _Health(http.server.BaseHTTPRequestHandler):
    paths: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        _Health.paths.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    _Health.paths = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


# 1.1.1: `once` exits 70 (internal error: UnicodeEncodeError); under `run` no redis or postgres row
# is written or spooled and a PostgreSQL connection is left open.
def test_a_non_ascii_backend_check_path_is_sent_percent_encoded(
        pg: PgServer, redis_server: RedisServer, tmp_path: Path, health: int) -> None:
    init_table(pg)
    env = env_for(pg, redis_server, tmp_path, HEARTBEAT_BACKEND_CHECK=f"http://127.0.0.1:{health}/健康?q=状态 ok")
    assert cli(["check-config"], env, cwd=tmp_path).returncode == 0
    once = cli(["once"], env, cwd=tmp_path)
    assert once.returncode == 0, once.stdout + once.stderr
    assert [line.split("\t")[-1] for line in once.stdout.splitlines()] == ["recorded"] * 3
    assert _Health.paths == ["/%E5%81%A5%E5%BA%B7?q=%E7%8A%B6%E6%80%81%20ok"]


BROKEN_CHECK = """
import sys
from heartbeatd.probes import backend_check
def broken(self, deadline):
    raise KeyError("a bug in the check")
backend_check.BackendCheck._http = broken
from heartbeatd.cli import main
argv = sys.argv[1:]
raise SystemExit(main(argv[argv.index("heartbeatd") + 1:]))  # after the fixture's `python -m heartbeatd`
"""


# 1.1.1: the exception leaves the cycle: no redis or postgres row, the connection left open.
def test_a_check_that_raises_costs_only_its_own_row(
        pg: PgServer, redis_server: RedisServer, tmp_path: Path, health: int,
        daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg)
    env = env_for(pg, redis_server, tmp_path, HEARTBEAT_BACKEND_CHECK=f"http://127.0.0.1:{health}/")
    proc = daemon(env, prefix=[sys.executable, "-c", BROKEN_CHECK, "--"])
    proc.wait_for(lambda: statuses(proc, "后端 down, redis up, postgres up") >= 5, what="five cycles")
    assert proc.stop() == 0
    found = rows(pg)
    assert not [r for r in found if r[0] == "后端"]
    assert len([r for r in found if r[0] == "redis"]) >= 5 and len([r for r in found if r[0] == "postgres"]) >= 5
    lines = [line for _, line in proc.lines if "后端检查失败" in line]
    assert lines == ["ERROR:heartbeatd.daemon:后端检查失败: internal error in the check: KeyError: 'a bug in the check'"]
    assert "心跳周期异常" not in proc.log()


# 1.1.1: a spool row whose report_time cannot be read back fails every cycle (ValueError), and the
# rows behind it are never replayed.
def test_a_spool_row_that_cannot_be_read_back_is_set_aside(
        pg: PgServer, redis_server: RedisServer, tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg)
    t0 = datetime.now(timezone.utc) - timedelta(hours=1)
    spool = Spool(tmp_path / "spool.db", 1000)
    spool.append([Row("后端", "10.9.9.9", t0 + timedelta(seconds=30 * i)) for i in range(3)]
                 + [Row("mystery", "10.9.9.9", t0)])
    spool.close()
    db = sqlite3.connect(str(tmp_path / "spool.db"))
    db.execute("INSERT INTO spool (service_name, ip_address, report_time) VALUES ('后端', '10.9.9.9', 'yesterday')")
    db.commit()
    db.close()
    env = env_for(pg, redis_server, tmp_path)
    proc = daemon(env)
    proc.wait_log("补写心跳 - ")
    proc.wait_for(lambda: statuses(proc, "1 rejected") >= 3, what="the unreadable row set aside")
    assert proc.stop() == 0
    assert "心跳周期异常" not in proc.log()
    assert "cannot be read back (unreadable in the spool: Invalid isoformat string: 'yesterday')" in proc.log()
    found = rows(pg)
    assert len([r for r in found if r[1] == "10.9.9.9"]) == 4  # the three 后端 rows and the mystery one
    listed = cli(["rejected"], env, cwd=tmp_path)
    assert listed.returncode == 0 and "unreadable in the spool" in listed.stdout, listed.stdout + listed.stderr


# 1.1.1: `take_over` raises out of the reload (exit 70) or deletes the old file's rows when the new
# spool could only hold them in memory; a reload may set a timeout the watchdog kills the daemon for.
def test_a_reload_never_ends_the_daemon_and_rows_leave_a_file_only_once_durable(
        pg_own: PgServer, redis_server: RedisServer, tmp_path: Path, small_fs: Path,
        daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg_own)
    env_file = tmp_path / "hb.env"
    good = (f"DATABASE_URL={db_url(pg_own)}\nREDIS_URL={redis_server.url()}\nHEARTBEAT_INTERVAL=0.6\n"
            f"HEARTBEAT_TIMEOUT=0.3\nHEARTBEAT_SPOOL_PATH={tmp_path / 'spool.db'}\n")
    env_file.write_text(good)
    proc = daemon(clean_env(), ["--env-file", str(env_file)], watchdog_usec=2_000_000)
    proc.wait_log("记录心跳成功 - 服务: postgres")
    pg_own.stop()
    proc.wait_for(lambda: statuses(proc, "postgres down") >= 3, what="a backlog in the first spool")
    fill(small_fs)
    env_file.write_text(good.replace(str(tmp_path / "spool.db"), str(small_fs / "spool.db")))
    proc.signal(signal.SIGHUP)
    proc.wait_log(f"重新加载配置失败 - keeping the old configuration: {small_fs / 'spool.db'} cannot take the ")
    held = len(spooled_rows(tmp_path / "spool.db"))
    assert held >= 6
    # The watchdog rule of the start, on reload: 3 x 0.5 s > 2 s / 2.
    env_file.write_text(good.replace("HEARTBEAT_TIMEOUT=0.3", "HEARTBEAT_TIMEOUT=0.5"))
    proc.signal(signal.SIGHUP)
    proc.wait_log("重新加载配置失败 - keeping the old configuration: HEARTBEAT_TIMEOUT=0.5 lets one cycle block up "
                  "to 1.5s, more than half of WATCHDOG_USEC=2000000 (1s)")
    seen = statuses(proc, "postgres down")
    proc.wait_for(lambda: statuses(proc, "postgres down") >= seen + 2, what="cycles after the refused reloads")
    assert len(spooled_rows(tmp_path / "spool.db")) > held  # the old spool is still the one in use
    pg_own.start()
    proc.wait_for(lambda: drained(proc), what="the backlog written")
    assert proc.proc.poll() is None and proc.stop() == 0
    cycles = statuses(proc, "next in")
    found = rows(pg_own, db="postgres")
    assert len(assert_no_gap_no_duplicate(found, "后端", 0.6, cycles)) == cycles
    assert "配置已重新加载" not in proc.log()


# 1.1.1: the throttling keys of the spool and of set-aside rows are never cleared, so a later
# episode's first line is `(repeated 1 times in the last …s)`, or, within a minute, no line at all.
def test_each_episode_starts_its_own_log_story(
        pg_own: PgServer, redis_server: RedisServer, tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg_own)
    proc = daemon(env_for(pg_own, redis_server, tmp_path))
    proc.wait_log("记录心跳成功 - 服务: postgres")
    for episode in (1, 2):
        pg_own.stop()
        proc.wait_log("心跳已缓存 - ", episode)
        pg_own.start()
        proc.wait_for(lambda: status_without(proc, "spooled"), what=f"the end of spool episode {episode}")
        pg_own.sql("ALTER TABLE service_heartbeat ADD CONSTRAINT no_redis CHECK (service_name <> 'redis') NOT VALID")
        proc.wait_log("心跳被拒绝 - 服务: redis", episode)
        pg_own.sql("ALTER TABLE service_heartbeat DROP CONSTRAINT no_redis")
        before = statuses(proc, "next in")
        proc.wait_for(lambda: statuses(proc, "next in") >= before + 3, what="cycles without a refusal")
    assert proc.stop() == 0
    for text in ("心跳已缓存 - ", "心跳被拒绝 - 服务: redis"):
        lines = [line for _, line in proc.lines if text in line]
        assert len(lines) == 2 and not any("(repeated" in line for line in lines), lines


LEDGER_BUG = """
import sys
from heartbeatd import ledger
def broken(self, *args, **kwargs):
    return {}["a bug in the ledger"]
ledger.Ledger.latest = broken
from heartbeatd.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


# 1.1.1: the KeyError is caught with the database errors: `status failed: …`, exit 1.
def test_a_bug_in_a_read_command_is_an_internal_error(pg: PgServer, tmp_path: Path) -> None:
    init_table(pg)
    for level in ("INFO", "DEBUG"):
        env = clean_env(DATABASE_URL=db_url(pg), HEARTBEAT_LOG_LEVEL=level)
        result = subprocess.run([sys.executable, "-c", LEDGER_BUG, "status"], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 70, result.stderr
        lines = result.stderr.splitlines()
        assert "ERROR:heartbeatd.cli:internal error: KeyError: 'a bug in the ledger'" in lines, lines
        assert ("Traceback" in result.stderr) == (level == "DEBUG")
        assert len(lines) == (2 if level == "DEBUG" else 1), lines
    # The expected failures keep their one line and status.
    missing = cli(["status"], clean_env(DATABASE_URL=db_url(pg).replace(pg.dbname, "postgres"),
                                        HEARTBEAT_TABLE="no_such_table"), cwd=tmp_path)
    assert missing.returncode == 1 and missing.stderr.startswith("heartbeatd: status failed: table no_such_table")
    down = cli(["status"], clean_env(DATABASE_URL="postgresql://127.0.0.1:1/x"), cwd=tmp_path)
    assert down.returncode == 69


def test_a_value_the_driver_cannot_send_is_that_rows_refusal(pg: PgServer) -> None:
    """A NUL byte (a row another program put in the spool) is refused like a data exception, not a failed write."""
    from heartbeatd.writer import Writer, WriteError, write_split
    init_table(pg)
    conn = pg.connect(pg.dbname)
    try:
        now = datetime.now(timezone.utc)
        batch = [(1, Row("后端", "10.0.0.1", now)), (2, Row("后端", "10.0.\x000.2", now)), (3, Row("redis", "10.0.0.3", now))]
        written, refused = write_split(Writer(("service_heartbeat",), 5), conn, batch, dedupe=True)
        assert [i for i, _ in written] == [1, 3] and [i for i, _, _ in refused] == [2]
        with pytest.raises(WriteError) as caught:
            Writer(("service_heartbeat",), 5).write(conn, [batch[1][1]])
        assert caught.value.data_error
    finally:
        conn.close()


def test_a_stray_percent_in_a_backend_check_url_is_sent_as_a_literal() -> None:
    from heartbeatd.probes.backend_check import request_target
    assert request_target("/健康", "q=100%") == "/%E5%81%A5%E5%BA%B7?q=100%25"
    assert request_target("/a%20b", "") == "/a%20b"  # an existing escape stays as it is


# 1.2.0 before this test (the 60-minute soak, seed 7): a backlog row already in the table (its delete
# from the spool had failed on a full disk) went through a table refusing every new row, inserting
# nothing, and counted as "the table takes rows": the cycle's live rows were set aside.
def test_rows_already_in_the_table_are_no_sign_that_it_takes_rows(
        pg: PgServer, redis_server: RedisServer, tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg)
    t0 = datetime.now(timezone.utc) - timedelta(hours=6)
    # A whole replay batch (500) already in the table, then rows that are not: the first batch
    # inserts nothing, the next one would insert (and is refused whole, not split and set aside).
    there = [Row("后端", "10.9.9.9", t0 + timedelta(seconds=30 * i)) for i in range(500)]
    missing = [Row("后端", "10.9.9.9", t0 + timedelta(seconds=30 * i)) for i in range(500, 503)]
    pg.sql("INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at) "
           "SELECT '后端', '10.9.9.9', t, now() FROM unnest(%s::timestamp[]) t",
           ([r.report_time.replace(tzinfo=None) for r in there],), db=pg.dbname)
    spool = Spool(tmp_path / "spool.db", 1000)
    spool.append(there + missing)
    spool.close()
    pg.sql("ALTER TABLE service_heartbeat ADD COLUMN host text NOT NULL DEFAULT 'x'", db=pg.dbname)
    pg.sql("ALTER TABLE service_heartbeat ALTER COLUMN host DROP DEFAULT", db=pg.dbname)
    proc = daemon(env_for(pg, redis_server, tmp_path))
    proc.wait_log("refuses every row")
    proc.wait_for(lambda: statuses(proc, "spooled") >= 4, what="cycles refused whole")
    assert not any("rejected" in s for _, s in proc.notices("STATUS=")) and "心跳被拒绝" not in proc.log()
    pg.sql("ALTER TABLE service_heartbeat DROP COLUMN host", db=pg.dbname)
    proc.wait_for(lambda: drained(proc), what="the backlog written")
    assert proc.stop() == 0
    found = rows(pg)
    assert sorted(r[2] for r in found if r[1] == "10.9.9.9") == [r.report_time.replace(tzinfo=None)
                                                                 for r in there + missing]
    cycles = statuses(proc, "next in")
    own = [r for r in found if r[1] != "10.9.9.9"]
    assert len(assert_no_gap_no_duplicate(own, "后端", INTERVAL, cycles)) == cycles
    assert spooled_rows(tmp_path / "spool.db") == []


class _AlterOnce:
    """The loop around a cycle whose first watchdog ping (just after the live INSERT) lets an ALTER TABLE land."""

    def __init__(self, alter: Callable[[], Any]) -> None:
        self.alter: Callable[[], Any] | None = alter

    def alive(self) -> None:
        alter, self.alter = self.alter, None
        if alter is not None:
            alter()

    def stop_pending(self) -> bool:
        return False

    def replay_until(self) -> float:
        return float("inf")


def _delivery(pg: PgServer, spool: Spool, loop: Any, timeout: float = 5.0) -> Any:
    import time

    from heartbeatd.config import load
    from heartbeatd.delivery import Delivery
    from heartbeatd.repeats import Repeats
    from heartbeatd.writer import Writer
    config = load({"DATABASE_URL": db_url(pg), "HEARTBEAT_SPOOL_PATH": str(spool.path),
                   "HEARTBEAT_TIMEOUT": f"{timeout:g}"})
    return Delivery(config, Writer(("service_heartbeat",), timeout), spool, loop, Repeats(time.monotonic),
                    time.monotonic)


# 1.5.0 (the 50-minute soak, seed 7): the table took the cycle's live rows, then a NOT NULL column
# was added before the backlog's statement; the backlog, refused again row by row, was set aside as
# the rows' fault, and stayed a gap in the table once the column was dropped. Forced here without a
# race: the ALTER TABLE lands at the watchdog ping between the live INSERT and the replay.
def test_a_table_changed_between_two_statements_of_an_attempt_sets_nothing_aside(pg: PgServer, tmp_path: Path) -> None:
    from heartbeatd.spool import rejected_rows
    from heartbeatd.writer import WriteError
    init_table(pg)
    now = datetime.now(timezone.utc)
    backlog = [Row("后端", "10.9.9.9", now - timedelta(hours=1, seconds=-30 * i)) for i in range(4)]
    too_long = Row("x" * 60, "10.9.9.9", now - timedelta(hours=1))  # refused for itself too (varchar(50))
    spool = Spool(tmp_path / "spool.db", 1000)
    spool.append([too_long] + backlog)  # judged first
    conn = pg.connect(pg.dbname)
    try:
        def add_column() -> None:
            pg.sql("ALTER TABLE service_heartbeat ADD COLUMN host text NOT NULL DEFAULT 'x'", db=pg.dbname)
            pg.sql("ALTER TABLE service_heartbeat ALTER COLUMN host DROP DEFAULT", db=pg.dbname)
        delivery = _delivery(pg, spool, _AlterOnce(add_column))
        live = [Row("后端", "10.0.0.1", now), Row("redis", "10.0.0.2", now)]
        recorded: list[Row] = []
        rejected: list[Row] = []
        # The table's reason, not that of the row it was judging (too long, refused first).
        with pytest.raises(WriteError, match='refuses every row: null value in column "host"'):
            delivery.write_cycle(conn, live, recorded, rejected)
        assert recorded == live and rejected == []
        assert spool.rejected == 0 and spool.count == 5, "the backlog stays spooled, nothing set aside"
        pg.sql("ALTER TABLE service_heartbeat DROP COLUMN host", db=pg.dbname)
        later = [Row("后端", "10.0.0.1", now + timedelta(seconds=30))]
        delivery.write_cycle(conn, later, recorded, rejected)  # the same connection: no transaction left open
        assert recorded == live + later and rejected == [] and spool.count == 0
        assert [(row, "value too long" in why) for _, row, why in rejected_rows(spool)] == [(too_long, True)]
        assert sorted(r[2] for r in rows(pg) if r[0] == "后端") == sorted(
            r.report_time.replace(tzinfo=None) for r in backlog + live[:1] + later)
    finally:
        conn.close()
        spool.close()


# The other side of the same rule: a row refused while a row like those the table took gets in (a
# CHECK on report_time) is set aside, beside a unique index, and the witness never stays in the table.
def test_a_row_refused_beside_a_taken_one_is_set_aside_and_the_witness_never_stays(pg: PgServer, tmp_path: Path) -> None:
    from heartbeatd.spool import rejected_rows
    init_table(pg)
    pg.sql("CREATE UNIQUE INDEX ON service_heartbeat (service_name, ip_address, report_time)", db=pg.dbname)
    pg.sql("ALTER TABLE service_heartbeat ADD CONSTRAINT recent "
           "CHECK (report_time > now() AT TIME ZONE 'utc' - interval '1 day')", db=pg.dbname)
    now = datetime.now(timezone.utc)
    old = [Row("后端", "10.9.9.9", now - timedelta(days=2, seconds=30 * i)) for i in range(2)]
    recent = Row("后端", "10.9.9.9", now - timedelta(hours=1))
    spool = Spool(tmp_path / "spool.db", 1000)
    spool.append([old[0], recent, old[1]])
    conn = pg.connect(pg.dbname)
    try:
        delivery = _delivery(pg, spool, _AlterOnce(lambda: None))
        live = [Row("后端", "10.0.0.1", now), Row("redis", "10.0.0.2", now)]
        recorded: list[Row] = []
        rejected: list[Row] = []
        delivery.write_cycle(conn, live, recorded, rejected)
        assert recorded == live and rejected == []  # `rejected` lists this cycle's own rows set aside
        assert [(row, 'new row for relation "service_heartbeat" violates check constraint "recent"' in why)
                for _, row, why in rejected_rows(spool)] == [(r, True) for r in old]
        assert spool.count == 0 and spool.rejected == 2
        found = rows(pg)
        assert sorted((r[0], r[1], r[2]) for r in found) == sorted(
            (r.service, r.ip, r.report_time.replace(tzinfo=None)) for r in live + [recent])
        assert delivery.writer.inserted == 3
    finally:
        conn.close()
        spool.close()


# On a slow link a refused row's last try must still fit in the timeout, or the batch it is in comes
# back first every cycle and nothing behind it is ever replayed: two round trips, not one per
# statement (a review found six: 1.5.0's try alone drained this in one cycle).
def test_a_last_try_over_a_slow_link_fits_in_the_timeout_and_the_backlog_drains(pg: PgServer, tmp_path: Path) -> None:
    import psycopg2

    from heartbeatd.spool import rejected_rows
    from proxy import DelayProxy
    init_table(pg)
    pg.sql("ALTER TABLE service_heartbeat ADD CONSTRAINT no_ghost CHECK (service_name <> 'ghost')", db=pg.dbname)
    now = datetime.now(timezone.utc)
    good = [Row("后端", "10.9.9.9", now - timedelta(minutes=5, seconds=30 * i)) for i in range(2)]
    ghost = Row("ghost", "10.9.9.9", now - timedelta(minutes=5))
    spool = Spool(tmp_path / "spool.db", 1000)
    spool.append([good[0], ghost, good[1]])
    proxy = DelayProxy(pg.host, pg.port, 0.0)
    conn = psycopg2.connect(host="127.0.0.1", port=proxy.port, user="postgres", dbname=pg.dbname)
    conn.autocommit = True
    try:
        proxy.delay = 0.2  # each reply 0.2 s late (an error's two parts 0.4 s): at most 5 round trips a second
        delivery = _delivery(pg, spool, _AlterOnce(lambda: None), timeout=1.0)
        live = [Row("后端", "10.0.0.1", now)]
        delivery.write_cycle(conn, live, [], [])
        assert spool.count == 0 and [row for _, row, _ in rejected_rows(spool)] == [ghost]
        assert len(rows(pg)) == 3
    finally:
        conn.close()
        proxy.close()
        spool.close()


# A deferred constraint refuses at COMMIT: the last try alone must hear it as the row's refusal
# (a plain write does, at its implicit commit), or the row would neither be set aside nor leave the
# spool, and the batches behind it would never drain.
def test_a_row_a_deferred_constraint_refuses_is_set_aside_and_the_backlog_drains(pg: PgServer, tmp_path: Path) -> None:
    from heartbeatd.spool import rejected_rows
    init_table(pg)
    pg.sql("CREATE TABLE services (name varchar(50) PRIMARY KEY); "
           "INSERT INTO services VALUES ('后端'), ('redis'), ('postgres'); "
           "ALTER TABLE service_heartbeat ADD CONSTRAINT known FOREIGN KEY (service_name) REFERENCES services "
           "DEFERRABLE INITIALLY DEFERRED", db=pg.dbname)
    now = datetime.now(timezone.utc)
    good = [Row("后端", "10.9.9.9", now - timedelta(minutes=10, seconds=30 * i)) for i in range(3)]
    ghost = Row("ghost", "10.9.9.9", now - timedelta(minutes=5))
    spool = Spool(tmp_path / "spool.db", 1000)
    spool.append([good[0], ghost] + good[1:])
    conn = pg.connect(pg.dbname)
    try:
        delivery = _delivery(pg, spool, _AlterOnce(lambda: None))
        live = [Row("后端", "10.0.0.1", now)]
        recorded: list[Row] = []
        delivery.write_cycle(conn, live, recorded, [])
        assert recorded == live
        assert [(row, "violates foreign key constraint" in why) for _, row, why in rejected_rows(spool)] == [(ghost, True)]
        assert spool.count == 0 and len(rows(pg)) == 4
    finally:
        conn.close()
        spool.close()


# The last try takes several round trips in one transaction that holds the advisory lock every
# writer takes: a client stalled between two of them (frozen, its network gone) must not hold it
# past the timeout, or every other writer of the table (a second daemon, `rejected --retry`) and
# any ALTER TABLE would wait on an idle transaction until TCP gave up.
def test_a_last_try_stalled_between_its_statements_holds_no_lock_past_the_timeout(pg: PgServer) -> None:
    import time

    import psycopg2
    import psycopg2.extensions

    from heartbeatd.writer import WriteError, Writer
    init_table(pg)
    pg.sql("ALTER TABLE service_heartbeat ADD CONSTRAINT no_ghost CHECK (service_name <> 'ghost')", db=pg.dbname)
    held: list[int] = []

    class Stalling(psycopg2.extensions.cursor):
        def execute(self, query: Any, vars: Any = None) -> Any:
            if query.startswith("ROLLBACK TO SAVEPOINT heartbeatd_row"):  # the row refused, the witness next
                time.sleep(2.5)  # the client stalls with the transaction open, well past the 1 s timeout
                # Asked from another thread: this one's libpq waits are under the judge's deadline.
                look = threading.Thread(target=lambda: held.append(pg.sql(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'", db=pg.dbname)[0][0]))
                look.start()
                look.join(10)
            return super().execute(query, vars)

    conn = psycopg2.connect(host=str(pg.root), port=pg.port, user="postgres", dbname=pg.dbname,
                            cursor_factory=Stalling)
    conn.autocommit = True
    try:
        writer = Writer(("service_heartbeat",), timeout=1.0)
        now = datetime.now(timezone.utc)
        writer.write(conn, [Row("后端", "10.0.0.1", now)])
        with pytest.raises(WriteError):
            writer.judge(conn, Row("ghost", "10.0.0.1", now))
        assert held == [0], "the stalled transaction still held the advisory lock"
    finally:
        conn.close()


# 1.2.0 before this test (the 15-minute soak, seed 7): a live INSERT whose client had given up, its
# backend frozen before it finished committing, committed after the replay of the same rows had
# checked the table and written them again. Forced here without a race: a synchronous standby that
# never comes holds the live INSERT's transaction committed-but-invisible (as PostgreSQL does until
# the standby confirms; statement_timeout does not end that wait), and SIGSTOP freezes it there
# while the replay runs.
def test_a_live_insert_frozen_in_its_commit_is_not_written_twice_by_the_replay(pg_own: PgServer) -> None:
    import os
    import time

    import psycopg2

    from heartbeatd.writer import WriteError, Writer
    init_table(pg_own)
    pg_own.sql("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
    pg_own.sql("SELECT pg_reload_conf()")
    row = Row("后端", "10.8.8.8", datetime.now(timezone.utc).replace(microsecond=0))
    live = psycopg2.connect(pg_own.url())
    live.autocommit = True  # as the daemon's connections are: the INSERT's round trip is its commit
    # The replays commit without waiting for a standby: only the live INSERT is held.
    replay_url = pg_own.url() + "?options=-c%20synchronous_commit%3Dlocal"
    failed: list[BaseException] = []

    def write_live() -> None:
        try:
            Writer(("service_heartbeat",), timeout=3.0).write(live, [row])
        except WriteError as exc:
            failed.append(exc)

    thread = threading.Thread(target=write_live)
    thread.start()
    pid = live.get_backend_pid()
    deadline = time.monotonic() + 2.0
    while not pg_own.sql("SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event = 'SyncRep'", (pid,)):
        assert time.monotonic() < deadline, "the live INSERT never reached its commit wait"
        time.sleep(0.01)
    os.kill(pid, signal.SIGSTOP)  # frozen mid-commit
    try:
        thread.join(10)
        assert failed, "the live write should have timed out on its frozen backend"
        # The replay of the same rows while the live transaction is still open: it must wait for
        # that transaction (and time out, writing nothing) rather than see no row and insert one.
        conn = psycopg2.connect(replay_url)
        conn.autocommit = True
        with pytest.raises(WriteError):
            Writer(("service_heartbeat",), timeout=1.0).write(conn, [row], dedupe=True)
        conn.close()
    finally:
        os.kill(pid, signal.SIGCONT)
    live.close()
    # Thawed and no longer waiting for a standby, the live INSERT's commit completes; the next
    # replay sees its row and inserts none.
    pg_own.sql("ALTER SYSTEM RESET synchronous_standby_names")
    pg_own.sql("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 10
    while pg_own.sql("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)):
        assert time.monotonic() < deadline, "the thawed backend never ended"
        time.sleep(0.05)
    conn = psycopg2.connect(replay_url)
    conn.autocommit = True
    Writer(("service_heartbeat",), timeout=3.0).write(conn, [row], dedupe=True)
    conn.close()
    assert [(r[0], r[1], r[2]) for r in rows(pg_own, db="postgres")] == [("后端", "10.8.8.8",
                                                                          row.report_time.replace(tzinfo=None))]


# The reshape's first form (a review found it): when the backlog's replay failed after the live
# INSERT had committed, the cycle's rows were reported unwritten and spooled again every cycle.
def test_a_backlog_that_fails_after_the_live_rows_committed_leaves_them_recorded(
        pg: PgServer, redis_server: RedisServer, tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg)
    # A trigger that refuses rows older than ten minutes with 42501, as a revoked privilege would
    # (no data error: the batch is not split or set aside): the live INSERT gets in, the backlog's
    # replay is refused.
    pg.sql("CREATE FUNCTION no_old_rows() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
           "IF NEW.report_time < now() AT TIME ZONE 'utc' - interval '10 minutes' THEN "
           "RAISE EXCEPTION 'permission denied for old rows' USING ERRCODE = '42501'; END IF; RETURN NEW; END $$",
           db=pg.dbname)
    pg.sql("CREATE TRIGGER no_old_rows BEFORE INSERT ON service_heartbeat FOR EACH ROW EXECUTE FUNCTION no_old_rows()",
           db=pg.dbname)
    spool = Spool(tmp_path / "spool.db", 1000)
    spool.append([Row("后端", "10.9.9.8", datetime.now(timezone.utc) - timedelta(hours=1))])
    spool.close()
    proc = daemon(env_for(pg, redis_server, tmp_path))
    proc.wait_for(lambda: statuses(proc, "next in") >= 4, what="four cycles")
    assert proc.stop() == 0
    cycles = statuses(proc, "next in")
    log = proc.log()
    assert log.count("记录心跳成功 - 服务: 后端") == cycles, log
    assert "心跳已缓存" not in log and "permission denied" in log
    assert all(s.endswith("; 1 spooled") for _, s in proc.notices("STATUS=") if "next in" in s)  # the backlog only
    assert len(assert_no_gap_no_duplicate(rows(pg), "后端", INTERVAL, cycles)) == cycles
    assert spooled_rows(tmp_path / "spool.db") == [("后端", "10.9.9.8", spooled_rows(tmp_path / "spool.db")[0][2])]


# The reshape's first INSERT through a VALUES subquery (a review found it): an existing table whose
# ip_address is `inet` refused every live row (42804, text into inet), and the replay's comparison
# `inet = text` had failed since 1.1.1, so its spool never drained.
def test_a_table_with_an_inet_address_column_takes_live_and_replayed_rows(pg: PgServer) -> None:
    import psycopg2

    from heartbeatd.writer import WriteError, Writer
    pg.sql("CREATE TABLE service_heartbeat (id bigserial PRIMARY KEY, service_name varchar(50) NOT NULL, "
           "ip_address inet NOT NULL, report_time timestamptz NOT NULL, created_at timestamptz NOT NULL)", db=pg.dbname)
    when = datetime(2026, 12, 3, 8, 0, tzinfo=timezone(timedelta(hours=8)))
    conn = psycopg2.connect(db_url(pg))
    conn.autocommit = True
    try:
        writer = Writer(("service_heartbeat",), 5)
        writer.write(conn, [Row("redis", "10.1.2.3", when)])
        writer.write(conn, [Row("redis", "10.1.2.3", when), Row("后端", "10.1.2.4", when)], dedupe=True)
        assert pg.sql("SELECT service_name, host(ip_address), report_time FROM service_heartbeat ORDER BY id",
                      db=pg.dbname) == [("redis", "10.1.2.3", when), ("后端", "10.1.2.4", when)]
        for bad, state in ((Row("redis", "nonsense", when), "22P02"), (Row("x" * 60, "10.1.2.5", when), "22001")):
            with pytest.raises(WriteError) as info:
                writer.write(conn, [bad])
            assert info.value.sqlstate == state and info.value.data_error, info.value  # that row's refusal
    finally:
        conn.close()


def test_a_live_insert_that_reaches_the_server_after_its_replay_inserts_nothing(pg: PgServer) -> None:
    """A live INSERT whose client gave up can still reach the server later (a frozen path that then
    delivers what it held, a daemon killed after sending), after the next daemon replayed the same
    rows from the spool: the soak's 60-minute run, seed 7, wrote such a postgres row twice."""
    import psycopg2
    from heartbeatd.writer import Writer
    init_table(pg)
    row = Row("postgres", "10.8.8.9", datetime(2026, 12, 3, 14, 24, 16, 818584, tzinfo=timezone.utc))
    conn = psycopg2.connect(db_url(pg))
    conn.autocommit = True
    Writer(("service_heartbeat",), timeout=3.0).write(conn, [row], dedupe=True)  # the replay, first
    writer = Writer(("service_heartbeat",), timeout=3.0)
    writer.write(conn, [row])  # the late live INSERT, as the cycle sends it
    conn.close()
    assert [(r[0], r[1]) for r in rows(pg)] == [("postgres", "10.8.8.9")] and writer.inserted == 0
