"""The env file: a line it cannot read is a bad configuration, and every command reads the daemon's file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import pytest

from conftest import DaemonProcess, clean_env, cli, db_url, init_table, rows
from heartbeatd.config import load
from servers import PgServer, RedisServer

PW = "Zq9pw"  # never in any output
# Where a command must not go when it ignores the file it should read: nobody listens there.
NOWHERE = {"DATABASE_URL": "postgresql://127.0.0.1:1/nowhere", "REDIS_URL": "redis://127.0.0.1:1/0"}

# (file text, line number named, fragment of the one line). 1.5.1 skipped each of these lines
# (python-dotenv warns and drops it) and went on with the default of what it meant to set.
BAD_LINES = [
    (f'HEARTBEAT_INTERVAL=3\n\n\nDATABASE_URL="postgresql://u:{PW}@db/app\nREDIS_URL=redis://cache/0\n', 4,
     'DATABASE_URL="…: the " quote is not closed'),
    (f"DATABASE_URL='postgresql://u:{PW}@db/app\n", 1, "DATABASE_URL='…: the ' quote is not closed"),
    (f'DATABASE_URL="postgresql://u:{PW}@db/app" trailing\n', 1, 'DATABASE_URL="…'),
    (f"# comment\nDATABASE URL=postgresql://u:{PW}@db/app\n", 2, "not NAME=value"),
    (f"DATABASE_URL:postgresql://u:{PW}@db/app\n", 1, "not NAME=value"),
    # An unclosed quote that a later quote closes: the value swallows the next line.
    (f'DATABASE_URL="postgresql://u:{PW}@db/app\nHEARTBEAT_TABLE=beats"\n', 1, "runs over several lines"),
]


@pytest.mark.parametrize("text, line, fragment", BAD_LINES, ids=[str(i) for i in range(len(BAD_LINES))])
def test_a_line_the_parser_cannot_read_is_78_naming_file_and_line(tmp_path: Path, text: str, line: int,
                                                                   fragment: str) -> None:
    env_file = tmp_path / "hb.env"
    env_file.write_text(text)
    result = cli(["check-config", "--env-file", str(env_file)], clean_env(), cwd=tmp_path)
    assert result.returncode == 78, result.stdout + result.stderr
    assert result.stderr.splitlines() == [f"heartbeatd: --env-file {env_file}, line {line}: "
                                          + result.stderr.split(f", line {line}: ", 1)[1].rstrip("\n")]
    assert fragment in result.stderr
    assert PW not in result.stdout + result.stderr and "Traceback" not in result.stderr


def test_bad_line_in_the_daemons_file_and_in_dot_env_too(tmp_path: Path) -> None:
    text = f'DATABASE_URL="postgresql://u:{PW}@db/app\n'
    daemons = tmp_path / "etc.env"
    daemons.write_text(text)
    result = cli(["check-config"], clean_env(HEARTBEAT_ENV_FILE=str(daemons)), cwd=tmp_path)
    assert result.returncode == 78
    assert result.stderr.startswith(f"heartbeatd: env file {daemons}, line 1: DATABASE_URL=")
    (tmp_path / ".env").write_text("HEARTBEAT_INTERVAL=2\n" + text)
    result = cli(["check-config"], clean_env(), cwd=tmp_path)
    assert result.returncode == 78
    assert result.stderr.strip().startswith(f"heartbeatd: env file {tmp_path / '.env'}, line 2: DATABASE_URL=")
    assert PW not in result.stderr


def test_a_bom_and_blank_lines_and_comments_are_fine(tmp_path: Path) -> None:
    env_file = tmp_path / "hb.env"
    env_file.write_bytes(b"\xef\xbb\xbfHEARTBEAT_INTERVAL=4\n\n# a comment\nexport HEARTBEAT_TIMEOUT=2 # why\n"
                         b"APP_KEY=\"multi\nline\"\nBARE\n")
    config = load({}, env_file=env_file)
    assert (config.interval, config.timeout) == (4.0, 2.0)


def test_reload_onto_a_bad_line_keeps_the_old_database(
        pg: PgServer, redis_server: RedisServer, tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg)
    env_file = tmp_path / "hb.env"
    good = (f"DATABASE_URL={db_url(pg)}\nREDIS_URL={redis_server.url()}\nHEARTBEAT_INTERVAL=0.3\n"
            f"HEARTBEAT_SPOOL_PATH={tmp_path / 'spool.db'}\n")
    env_file.write_text(good)
    # NOWHERE in the environment: what a daemon that dropped the line would fall back to (never localhost:5432).
    proc = daemon(clean_env(**NOWHERE), ["--env-file", str(env_file)])
    proc.wait_log("记录心跳成功 - 服务: postgres")
    # The quote left open on the DATABASE_URL line: 1.5.1 reloaded onto localhost:5432/postgres.
    env_file.write_text(good.replace(f"DATABASE_URL={db_url(pg)}", f'DATABASE_URL="{db_url(pg)}'))
    proc.signal(signal.SIGHUP)
    proc.wait_log(f"重新加载配置失败 - keeping the old configuration: --env-file {env_file}, line 1: DATABASE_URL=")
    before = len(rows(pg))
    recorded = proc.log().count("记录心跳成功 - 服务: postgres")
    proc.wait_log("记录心跳成功 - 服务: postgres", recorded + 2)
    assert len(rows(pg)) > before  # still writing into the same table
    assert "配置已重新加载" not in proc.log() and proc.proc.poll() is None
    assert sum("重新加载配置失败" in line for _, line in proc.lines) == 1


def test_commands_read_the_daemons_env_file_and_say_so(tmp_path: Path) -> None:
    daemons = tmp_path / "heartbeatd.env"
    daemons.write_text(f"DATABASE_URL=postgresql://hb:{PW}@db.internal/app\nHEARTBEAT_INTERVAL=7\n")
    (tmp_path / ".env").write_text("HEARTBEAT_TABLE=from_dot_env\n")
    # The caller's shell says otherwise: the daemon's file wins, as it does for the daemon (--env-file).
    env = clean_env(HEARTBEAT_ENV_FILE=str(daemons), HEARTBEAT_INTERVAL="0.5", **NOWHERE)
    result = cli(["check-config"], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "DATABASE_URL=postgresql://hb:***@db.internal/app" in result.stdout
    assert "HEARTBEAT_INTERVAL=7" in result.stdout
    assert "HEARTBEAT_TABLE=service_heartbeat" in result.stdout  # ./.env is not read beside the daemon's file
    assert f"env file={daemons} (the daemon's env file: its values win over the environment)" in result.stdout
    assert PW not in result.stdout + result.stderr
    # Without it (missing is no error), ./.env is read, and check-config names it.
    result = cli(["check-config"], clean_env(HEARTBEAT_ENV_FILE=str(tmp_path / "missing.env")), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "HEARTBEAT_TABLE=from_dot_env" in result.stdout
    assert f"env file={tmp_path / '.env'} (./.env in the working directory" in result.stdout
    # An explicit --env-file wins over both.
    other = tmp_path / "other.env"
    other.write_text("HEARTBEAT_INTERVAL=9\n")
    result = cli(["check-config", "--env-file", str(other)], env, cwd=tmp_path)
    assert "HEARTBEAT_INTERVAL=9" in result.stdout and f"env file={other} (--env-file" in result.stdout


def _as_root_without_dac(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Root without CAP_DAC_OVERRIDE: file permissions apply, as to an operator without sudo."""
    return subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-m", "heartbeatd",
                           *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_a_daemons_file_that_cannot_be_read_says_why(tmp_path: Path) -> None:
    daemons = tmp_path / "etc" / "heartbeatd.env"
    daemons.parent.mkdir()
    daemons.write_text(f"DATABASE_URL=postgresql://hb:{PW}@db.internal/app\n")
    daemons.chmod(0)
    env = clean_env(HEARTBEAT_ENV_FILE=str(daemons), **NOWHERE)
    result = _as_root_without_dac(["status"], env, tmp_path)
    assert result.returncode == 78, result.stderr
    assert result.stderr.startswith(f"heartbeatd: env file {daemons}: cannot read it: permission denied")
    assert len(result.stderr.splitlines()) == 1
    # A directory that may not be searched hides the file: that is "permission denied", not "missing".
    daemons.chmod(0o644)
    daemons.parent.chmod(0)
    try:
        result = _as_root_without_dac(["check-config"], env, tmp_path)
    finally:
        daemons.parent.chmod(0o755)
    assert result.returncode == 78, result.stdout + result.stderr
    assert "permission denied" in result.stderr and "DATABASE_URL=" not in result.stdout
    # An --env-file that is not there: "no such file", not the same words as "permission denied".
    result = cli(["check-config", "--env-file", str(tmp_path / "nope.env")], env, cwd=tmp_path)
    assert result.returncode == 78 and result.stderr.strip().endswith("cannot read it: no such file")


def test_status_and_report_thresholds_follow_the_daemons_interval(pg: PgServer, tmp_path: Path) -> None:
    init_table(pg)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    # Heartbeats every 20 s for 10 minutes, the newest 20 s old: fresh for a 30 s daemon.
    pg.sql("INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at) "
           "SELECT '后端', '10.0.0.1', %s - i * interval '20 s', %s FROM generate_series(1, 30) i",
           (now, now), db=pg.dbname)
    daemons = tmp_path / "heartbeatd.env"
    daemons.write_text(f"DATABASE_URL={db_url(pg)}\nHEARTBEAT_INTERVAL=30\nHEARTBEAT_TIMEOUT=5\n")
    # The operator's shell has HEARTBEAT_INTERVAL=1 (stale after 7 s, every 20 s step an outage).
    env = clean_env(HEARTBEAT_ENV_FILE=str(daemons), HEARTBEAT_INTERVAL="1", **NOWHERE)
    status = cli(["status"], env, cwd=tmp_path)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "fresh" in status.stdout
    report = cli(["report", "--since", "9m", "--format", "json"], env, cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    found = json.loads(report.stdout)
    assert found["gap_seconds"] == 65  # 2 x 30 + 5, the daemon's
    assert [(p["service"], p["outages"]) for p in found["pairs"]] == [("后端", 0)]


def test_spool_path_dot_is_named_absolutely(tmp_path: Path) -> None:
    env = clean_env(HEARTBEAT_SPOOL_PATH=".", **NOWHERE)
    result = cli(["run"], env, cwd=tmp_path)
    assert result.returncode == 78
    assert result.stderr.strip() == f"heartbeatd: HEARTBEAT_SPOOL_PATH: {tmp_path} is a directory, not a spool file"
    result = cli(["check-config"], env, cwd=tmp_path)
    assert f"HEARTBEAT_SPOOL_PATH={tmp_path}\n" in result.stdout


def test_default_spool_path_is_absolute_in_check_config(tmp_path: Path) -> None:
    result = cli(["check-config"], clean_env(**NOWHERE), cwd=tmp_path)
    assert f"HEARTBEAT_SPOOL_PATH={tmp_path / 'heartbeatd-spool.db'}\n" in result.stdout
