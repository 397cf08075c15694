"""The real daemon process: sd_notify on a real socket, signals, reload, journal prefixes, Redis faults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from conftest import DaemonProcess, clean_env, cli, db_url, init_table, rows
from servers import PgServer, RedisServer


def base_env(pg: PgServer, redis: RedisServer, tmp: Path, **extra: str) -> dict[str, str]:
    return clean_env(DATABASE_URL=db_url(pg), REDIS_URL=redis.url(), HEARTBEAT_SPOOL_PATH=str(tmp / "spool.db"), **extra)


def test_notify_protocol_and_clean_stop(pg: PgServer, redis_server: RedisServer, tmp_path: Path,
                                        daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg)
    proc = daemon(base_env(pg, redis_server, tmp_path, HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TIMEOUT="0.3"),
                  watchdog_usec=2_000_000)
    proc.wait_for(lambda: len(proc.notices("STATUS=")) >= 4, what="four STATUS lines")
    ready = proc.notices("READY=1")
    assert ready, "READY=1 never arrived"
    first_status = proc.notices("STATUS=后端")[0][1]
    assert first_status == "STATUS=后端 up, redis up, postgres up; next in " + first_status.split("next in ")[1]
    assert ready[0][0] <= proc.notices("STATUS=后端")[0][0]
    # WATCHDOG_USEC=2s: a ping at least every second.
    pings = [at for at, _ in proc.notices("WATCHDOG=1")]
    assert len(pings) >= 2
    assert max(b - a for a, b in zip(pings, pings[1:])) <= 1.0 + 0.25
    time.sleep(0.25)  # idle between cycles
    sent = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.stop() == 0
    assert time.monotonic() - sent < 1.0 + 0.5
    assert proc.notices("STOPPING=1")
    assert "INFO:heartbeatd.daemon:启动服务心跳检查定时任务..." in proc.log().splitlines()
    services = {r[0] for r in rows(pg)}
    assert services == {"后端", "redis", "postgres"}


def test_ready_comes_before_dependencies_answer(tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    env = clean_env(DATABASE_URL="postgresql://127.0.0.1:1/x", REDIS_URL="redis://127.0.0.1:1/0",
                    HEARTBEAT_SPOOL_PATH=str(tmp_path / "s.db"), HEARTBEAT_INTERVAL="60")
    proc = daemon(env)
    proc.wait_for(lambda: proc.notices("READY=1"), what="READY=1")
    proc.wait_for(lambda: proc.notices("STATUS=后端"), what="STATUS")
    assert proc.notices("STATUS=后端 up, redis down, postgres down")
    proc.signal(signal.SIGINT)
    assert proc.stop() == 0


def test_watchdog_pid_of_another_process_means_no_pings(pg: PgServer, redis_server: RedisServer, tmp_path: Path,
                                                         daemon: Callable[..., DaemonProcess]) -> None:
    env = base_env(pg, redis_server, tmp_path, HEARTBEAT_INTERVAL="0.2", WATCHDOG_PID="1")
    proc = daemon(env, watchdog_usec=1_000_000)
    proc.wait_for(lambda: len(proc.notices("STATUS=")) >= 3, what="three cycles")
    assert proc.notices("WATCHDOG=1") == []


def test_sighup_reloads_env_file(pg: PgServer, redis_server: RedisServer, tmp_path: Path,
                                 daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg)
    env_file = tmp_path / "heartbeatd.env"
    env_file.write_text(f"DATABASE_URL={db_url(pg)}\nREDIS_URL={redis_server.url()}\nHEARTBEAT_INTERVAL=30\n"
                        f"HEARTBEAT_SPOOL_PATH={tmp_path / 'spool.db'}\n")
    proc = daemon(clean_env(), ["--env-file", str(env_file)])
    proc.wait_log("记录心跳成功 - 服务: postgres", 1)
    # A bad new config is logged and the old one kept.
    env_file.write_text(env_file.read_text().replace("HEARTBEAT_INTERVAL=30", "HEARTBEAT_INTERVAL=zero"))
    proc.signal(signal.SIGHUP)
    proc.wait_log(f"重新加载配置失败 - keeping the old configuration: HEARTBEAT_INTERVAL (from {env_file}): "
                  "not a number: 'zero'")
    assert len(proc.notices("READY=1")) == 2 and len(proc.notices("RELOADING=1")) == 1
    assert proc.proc.poll() is None
    # A good one applies: the 30 s interval becomes 0.2 s.
    env_file.write_text(env_file.read_text().replace("HEARTBEAT_INTERVAL=zero", "HEARTBEAT_INTERVAL=0.2"))
    proc.signal(signal.SIGHUP)
    proc.wait_log("配置已重新加载 - interval 0.2s")
    proc.wait_log("记录心跳成功 - 服务: postgres", 4, timeout=10)
    assert len(proc.notices("RELOADING=1")) == 2
    reload_at = proc.notices("RELOADING=1")[1][0]
    assert any(at > reload_at for at, _ in proc.notices("READY=1"))
    assert proc.stop() == 0


def test_journal_priority_prefix_only_when_stderr_is_the_journal(tmp_path: Path) -> None:
    log_file = tmp_path / "stderr.log"
    env = clean_env(DATABASE_URL="postgresql://127.0.0.1:1/x", REDIS_URL="redis://127.0.0.1:1/0")
    with open(log_file, "w") as stderr:
        st = os.fstat(stderr.fileno())
        journal = dict(env, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        subprocess.run([sys.executable, "-m", "heartbeatd", "once"], env=journal, stderr=stderr, cwd=tmp_path, timeout=30)
    lines = log_file.read_text().splitlines()
    assert "<4>WARNING:heartbeatd.daemon:服务不可用 - 服务: redis, IP: 127.0.0.1" in lines
    assert "<3>ERROR:heartbeatd.daemon:Redis连接测试失败: Connection refused" in lines
    with open(log_file, "w") as stderr:
        other = dict(env, JOURNAL_STREAM="1:1")
        subprocess.run([sys.executable, "-m", "heartbeatd", "once"], env=other, stderr=stderr, cwd=tmp_path, timeout=30)
    assert "WARNING:heartbeatd.daemon:服务不可用 - 服务: redis, IP: 127.0.0.1" in log_file.read_text().splitlines()


def test_redis_stopped_then_restarted(pg: PgServer, redis_own: RedisServer, tmp_path: Path,
                                      daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg)
    proc = daemon(base_env(pg, redis_own, tmp_path, HEARTBEAT_INTERVAL="0.3", HEARTBEAT_TIMEOUT="1"))
    proc.wait_log("记录心跳成功 - 服务: redis", 1)
    redis_own.stop()
    proc.wait_log("ERROR:heartbeatd.daemon:Redis连接测试失败: Connection refused")
    assert "WARNING:heartbeatd.daemon:服务不可用 - 服务: redis, IP: 127.0.0.1" in proc.log()
    down_since = proc.log().count("记录心跳成功 - 服务: postgres")
    proc.wait_log("记录心跳成功 - 服务: postgres", down_since + 3)  # other services unaffected
    redis_own.start()
    proc.wait_log("服务恢复 - 服务: redis, IP: 127.0.0.1")
    before = proc.log().count("记录心跳成功 - 服务: redis")
    proc.wait_log("记录心跳成功 - 服务: redis", before + 2)
    # the failure was logged once, not once per cycle (repeats are at most once a minute)
    assert proc.log().count("Redis连接测试失败") == 1
    assert proc.stop() == 0
    found = rows(pg)
    assert sum(r[0] == "postgres" for r in found) > sum(r[0] == "redis" for r in found)


def test_redis_password_missing_or_wrong(pg: PgServer, tmp_path: Path) -> None:
    server = RedisServer(password="correct-horse-42").start()
    try:
        init_table(pg)
        for url, why in ((server.url(), "the server wants a password and REDIS_URL has none"),
                         (server.url(password="wrong-battery-17"), "")):
            env = clean_env(DATABASE_URL=db_url(pg), REDIS_URL=url)
            result = cli(["once"], env, cwd=tmp_path)
            assert result.returncode == 1
            assert f"ERROR:heartbeatd.daemon:Redis连接测试失败: authentication failed: {why}" in result.stderr
            output = result.stdout + result.stderr
            assert "correct-horse-42" not in output and "wrong-battery-17" not in output
        ok = cli(["once"], clean_env(DATABASE_URL=db_url(pg), REDIS_URL=server.url(password="correct-horse-42")), cwd=tmp_path)
        assert ok.returncode == 0, ok.stderr
        assert "correct-horse-42" not in ok.stdout + ok.stderr
    finally:
        server.destroy()
