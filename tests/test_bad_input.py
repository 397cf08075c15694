"""Bad input from every source: one line, exit 78, never a traceback, never a password."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable

import pytest

from conftest import DaemonProcess, clean_env, cli, daemon_on_env_file, db_url, init_table
from heartbeatd.config import load, mask_url
from servers import PgServer, RedisServer

PW = "Zq9pw"  # a password fragment that must never appear in any output

# (variable, value, a fragment the one line must hold). Every value here is wrong in a way the
# drivers or our bounds catch; 1.0 answered many of them with exit 70 or a traceback.
BAD = [
    ("DATABASE_URL", "postgresql://127.0.0.1/x?foo=bar", 'invalid URI query parameter: "foo"'),
    ("DATABASE_URL", f"postgresql://u:{PW}%zz@127.0.0.1/x", "percent-encoded"),
    ("DATABASE_URL", f"postgresql://u:{PW}@x@127.0.0.1/x", "raw '@'"),
    ("DATABASE_URL", f"postgresql://u:{PW}/x@127.0.0.1/x", "raw '/'"),
    ("DATABASE_URL", "postgresql://127.0.0.1:²/x", "bad port '²'"),
    ("DATABASE_URL", "postgresql://127.0.0.1:0/x", "bad port '0'"),
    ("DATABASE_URL", "postgresql://127.0.0.1:65536/x", "bad port '65536'"),
    ("DATABASE_URL", "postgresql://db:abc/x", "bad port 'abc'"),
    ("DATABASE_URL", "postgresql://[::1/x", 'matching "]"'),
    ("DATABASE_URL", "postgresql://a:1,b:2,c/x?port=1,2", "port"),
    ("DATABASE_URL", f"mysql://u:{PW}@db/x", "scheme must be"),
    ("DATABASE_URL", f"postgresql+psycopg2://u:{PW}@db/x?foo=1", 'invalid URI query parameter: "foo"'),
    ("REDIS_URL", "redis://127.0.0.1:6379/0?foo=bar", "unknown option 'foo'"),
    ("REDIS_URL", f"redis://:{PW}@127.0.0.1:6379/0?socket_timeout=soon", "socket_timeout"),
    ("REDIS_URL", f"redis://:{PW}#@127.0.0.1:6379/0", "raw '#'"),
    ("REDIS_URL", f"redis://u:{PW}?x@127.0.0.1:6379/0", "raw '?'"),
    ("REDIS_URL", f"redis://:{PW}/x@127.0.0.1:6379/0", "raw '/'"),
    ("REDIS_URL", "redis://127.0.0.1:²/0", "bad port '²'"),
    ("REDIS_URL", "redis://127.0.0.1:6379/²", "database must be a number"),
    ("REDIS_URL", "redis://127.0.0.1:6379/99999999999", "database must be a number"),
    ("REDIS_URL", "unix://", "needs a socket path"),
    ("REDIS_URL", f"http://:{PW}@cache", "scheme must be"),
    ("HEARTBEAT_INTERVAL", "1e10", "between 0.01 and 86400"),
    ("HEARTBEAT_INTERVAL", "0.0001", "between 0.01 and 86400"),
    ("HEARTBEAT_INTERVAL", "inf", "> 0"),
    ("HEARTBEAT_INTERVAL", "-inf", "> 0"),
    ("HEARTBEAT_INTERVAL", "²", "not a number"),
    ("HEARTBEAT_INTERVAL", "1_0", "not a number"),
    ("HEARTBEAT_INTERVAL", "0x10", "not a number"),
    ("HEARTBEAT_TIMEOUT", "1e10", "between 0.01 and 600"),
    ("HEARTBEAT_TIMEOUT", "nan", "> 0"),
    ("HEARTBEAT_TIMEOUT", "٣", "not a number"),
    ("HEARTBEAT_SPOOL_MAX_ROWS", "²", "whole number"),
    ("HEARTBEAT_SPOOL_MAX_ROWS", "1e3", "whole number"),
    ("HEARTBEAT_SPOOL_MAX_ROWS", "99999999999999999999", "whole number"),
    ("HEARTBEAT_SPOOL_MAX_ROWS", "0", "whole number"),
    ("HEARTBEAT_BACKEND_IP", "::ffff:zz", "not an IP address"),
    ("HEARTBEAT_TABLE", "", None),  # empty means the default: not an error
    ("HEARTBEAT_TABLE", 'a"b', "must be table or schema.table"),
    ("HEARTBEAT_TABLE", "ops.a%b", "no quotes or %"),
    ("HEARTBEAT_LOG_LEVEL", "verbose", "must be one of"),
]


def _assert_one_clean_line(result: object, name: str, fragment: str) -> None:
    stderr, stdout, code = result.stderr, result.stdout, result.returncode  # type: ignore[attr-defined]
    assert code == 78, (code, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"heartbeatd: {name}"), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in stderr and PW not in stderr + stdout


@pytest.mark.parametrize("name, value, fragment", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_bad_value_is_one_line_and_78(tmp_path: Path, name: str, value: str, fragment: str) -> None:
    result = cli(["check-config"], clean_env(**{name: value}), cwd=tmp_path)
    if fragment is None:
        assert result.returncode == 0, result.stderr
        return
    _assert_one_clean_line(result, name, fragment)


@pytest.mark.parametrize("command", ["run", "once", "init-db", "rejected"])
def test_driver_refusals_are_78_for_every_command(tmp_path: Path, command: str) -> None:
    env = clean_env(DATABASE_URL=f"postgresql://u:{PW}@127.0.0.1:1/x?foo=bar", HEARTBEAT_SPOOL_PATH=str(tmp_path / "s.db"))
    _assert_one_clean_line(cli([command], env, cwd=tmp_path), "DATABASE_URL", 'invalid URI query parameter: "foo"')
    env = clean_env(REDIS_URL="redis://127.0.0.1:1/0?foo=bar", HEARTBEAT_SPOOL_PATH=str(tmp_path / "s.db"))
    if command in ("run", "once"):
        _assert_one_clean_line(cli([command], env, cwd=tmp_path), "REDIS_URL", "unknown option 'foo'")


def test_values_from_files_name_the_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("HEARTBEAT_INTERVAL=soon\n")
    result = cli(["check-config"], clean_env(), cwd=tmp_path)
    _assert_one_clean_line(result, f"HEARTBEAT_INTERVAL (from {tmp_path / '.env'})", "not a number")
    explicit = tmp_path / "hb.env"
    explicit.write_text("DATABASE_URL=postgresql://127.0.0.1/x?foo=bar\n")
    result = cli(["check-config", "--env-file", str(explicit)], clean_env(), cwd=tmp_path)
    _assert_one_clean_line(result, f"DATABASE_URL (from {explicit})", "invalid URI query parameter")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "redis_url").write_text(f"redis://:{PW}@127.0.0.1:6379/0?foo=1\n")
    result = cli(["check-config"], clean_env(CREDENTIALS_DIRECTORY=str(creds)), cwd=tmp_path / "creds")
    _assert_one_clean_line(result, f"REDIS_URL (from credential {creds / 'redis_url'})", "unknown option 'foo'")


def test_files_that_are_not_utf8_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.env"
    bad.write_bytes(f"DATABASE_URL=postgresql://u:{PW}\xe9@db/x\n".encode("latin-1"))
    result = cli(["check-config", "--env-file", str(bad)], clean_env(), cwd=tmp_path)
    _assert_one_clean_line(result, f"--env-file {bad}: not UTF-8", "byte 0xe9")
    (tmp_path / ".env").write_bytes(b"HEARTBEAT_INTERVAL=\xff\n")
    _assert_one_clean_line(cli(["check-config"], clean_env(), cwd=tmp_path), "env file", "not UTF-8")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "database_url").write_bytes(f"postgresql://u:{PW}\xe9@db/x".encode("latin-1"))
    result = cli(["check-config"], clean_env(CREDENTIALS_DIRECTORY=str(creds)), cwd=creds)
    _assert_one_clean_line(result, f"credential {creds / 'database_url'}: not UTF-8", "byte 0xe9")


@pytest.mark.parametrize("url, masked", [
    (f"postgresql://app:{PW}#x@db/app", "postgresql://app:***@db/app"),
    (f"postgresql://app:{PW}@x@127.0.0.1/app", "postgresql://app:***@127.0.0.1/app"),
    (f"redis://:{PW}/x@cache:6379/0", "redis://:***@cache:6379/0"),
])
def test_malformed_urls_are_masked_from_user_to_last_at(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_sqlalchemy_urls_drop_the_driver(tmp_path: Path) -> None:
    for driver in ("asyncpg", "psycopg2", "psycopg"):
        config = load({"DATABASE_URL": f"postgresql+{driver}://app:pw@db:5432/app"}, cwd=tmp_path)
        assert config.database_url == "postgresql://app:pw@db:5432/app"


def test_sqlalchemy_url_works_end_to_end(pg: PgServer, redis_server: RedisServer, tmp_path: Path) -> None:
    init_table(pg)
    url = db_url(pg).replace("postgresql://", "postgresql+asyncpg://")
    result = cli(["once"], clean_env(DATABASE_URL=url, REDIS_URL=redis_server.url()), cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_reload_with_a_value_only_a_driver_refuses_keeps_the_daemon(
        pg: PgServer, redis_server: RedisServer, tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg)
    proc, env_file, good = daemon_on_env_file(daemon, pg, redis_server, tmp_path, 0.3)
    for bad, line in [
        (good.replace(db_url(pg), db_url(pg) + "?foo=bar"), 'DATABASE_URL (from '),
        (good.replace(redis_server.url(), redis_server.url() + "?foo=bar"), "REDIS_URL (from "),
        (good.replace("HEARTBEAT_INTERVAL=0.3", "HEARTBEAT_INTERVAL=1e10"), "HEARTBEAT_INTERVAL (from "),
    ]:
        env_file.write_text(bad)
        proc.signal(signal.SIGHUP)
        proc.wait_log(f"重新加载配置失败 - keeping the old configuration: {line}")
    env_file.write_bytes(good.encode() + b"HEARTBEAT_LOG_LEVEL=\xff\n")
    proc.signal(signal.SIGHUP)
    proc.wait_log("not UTF-8")
    recorded = proc.log().count("记录心跳成功 - 服务: postgres")
    proc.wait_log("记录心跳成功 - 服务: postgres", recorded + 2)  # still running, old configuration
    assert proc.proc.poll() is None
    assert "internal error" not in proc.log() and "Traceback" not in proc.log()
    assert proc.stop() == 0


def test_every_check_refusing_its_value_is_named_at_once(tmp_path: Path) -> None:
    env = clean_env(REDIS_URL="redis://127.0.0.1/0?bogus_opt=1", HEARTBEAT_BACKEND_CHECK="ftp://x")
    result = cli(["check-config"], env, cwd=tmp_path)
    assert result.returncode == 78
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and "REDIS_URL: unknown option" in lines[0] and "HEARTBEAT_BACKEND_CHECK:" in lines[1], lines
