"""PostgreSQL's answer classified, with what to change: on a private server that asks for passwords."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import DaemonProcess, clean_env, cli
from servers import PgServer, free_port

PW = "Zq9pw-right"
WRONG = "Zq9pw-wrong"
REDIS_NOWHERE = "redis://127.0.0.1:1/0"
COMMANDS = [["init-db"], ["status"], ["report"], ["prune", "--older-than", "30d"]]
AUTH_FIX = "Fix: check the user and password in DATABASE_URL, that the role exists and may log in"


@pytest.fixture(scope="module")
def scram() -> Iterator[PgServer]:
    """A private server where role hb logs in with a password (scram-sha-256), with and without TLS."""
    server = PgServer()
    server.enable_tls_and_scram("hb", "scram-sha-256", "scram-sha-256")
    server.start()
    server.sql(f"CREATE ROLE hb LOGIN PASSWORD '{PW}'")
    yield server
    server.destroy()


def _env(url: str, **extra: str) -> dict[str, str]:
    return clean_env(**{"DATABASE_URL": url, "REDIS_URL": REDIS_NOWHERE, "HEARTBEAT_TIMEOUT": "2", **extra})


def _one_line(result: object) -> str:
    stderr = result.stderr  # type: ignore[attr-defined]
    assert len(stderr.splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert PW not in stderr and WRONG not in stderr
    return str(stderr.strip())


@pytest.mark.parametrize("args", COMMANDS, ids=[a[0] for a in COMMANDS])
def test_authentication_failure_is_named_with_its_fix(scram: PgServer, tmp_path: Path, args: list[str]) -> None:
    result = cli(args, _env(scram.url("hb", WRONG)), cwd=tmp_path)
    assert result.returncode == 69, result.stderr
    line = _one_line(result)
    assert line.startswith("heartbeatd: cannot log in to PostgreSQL (authentication failed): "), line
    assert 'password authentication failed for user "hb"' in line and AUTH_FIX in line
    assert "connection to server at" not in line  # libpq's second attempt (sslmode=prefer) is not said twice
    assert line.count("password authentication failed") == 1


def test_no_password_and_no_role_are_authentication_failures(scram: PgServer, tmp_path: Path) -> None:
    for url in (scram.url("hb"), scram.url("nobody", "x")):
        line = _one_line(cli(["status"], _env(url), cwd=tmp_path))
        assert line.startswith("heartbeatd: cannot log in to PostgreSQL (authentication failed): ") and AUTH_FIX in line


@pytest.mark.parametrize("args", COMMANDS, ids=[a[0] for a in COMMANDS])
def test_missing_database_says_createdb_and_init_db(scram: PgServer, tmp_path: Path, args: list[str]) -> None:
    result = cli(args, _env(scram.url("hb", PW, db="heartbeats")), cwd=tmp_path)
    assert result.returncode == 69
    line = _one_line(result)
    assert line.startswith("heartbeatd: database does not exist: "), line
    assert 'database "heartbeats" does not exist. Fix: create it (sudo -u postgres createdb -O USER NAME)' in line
    assert "heartbeatd init-db" in line


def test_refused_timed_out_and_name_lookup_each_say_what_to_change(tmp_path: Path) -> None:
    refused = _one_line(cli(["status"], _env(f"postgresql://127.0.0.1:{free_port()}/x"), cwd=tmp_path))
    assert refused.startswith("heartbeatd: database unreachable: ") and "Connection refused" in refused
    assert "Fix: start PostgreSQL, or correct the host and port in DATABASE_URL" in refused
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts TCP (the kernel does) and never answers
    try:
        url = f"postgresql://127.0.0.1:{silent.getsockname()[1]}/x"
        timed_out = _one_line(cli(["status"], _env(url, HEARTBEAT_TIMEOUT="0.5"), cwd=tmp_path))
    finally:
        silent.close()
    assert "timed out after 0.5s" in timed_out and "Fix: nothing answered in HEARTBEAT_TIMEOUT" in timed_out
    lookup = _one_line(cli(["status"], _env("postgresql://no-such-host.invalid/x"), cwd=tmp_path))
    assert lookup.startswith("heartbeatd: database unreachable: no-such-host.invalid:5432: name lookup of")
    assert "Fix: correct the host name in DATABASE_URL" in lookup


def test_once_and_the_daemons_line_say_the_fix(scram: PgServer, tmp_path: Path,
                                              daemon: Callable[..., DaemonProcess]) -> None:
    result = cli(["once"], _env(scram.url("hb", WRONG)), cwd=tmp_path)
    assert result.returncode == 1
    postgres = [line for line in result.stdout.splitlines() if line.startswith("postgres\t")][0]
    assert 'password authentication failed for user "hb"' in postgres and AUTH_FIX in postgres
    assert WRONG not in result.stdout + result.stderr
    proc = daemon(_env(scram.url("hb", WRONG), HEARTBEAT_INTERVAL="0.5",
                       HEARTBEAT_SPOOL_PATH=str(tmp_path / "spool.db")))
    proc.wait_log(f'数据库连接测试失败: 127.0.0.1:{scram.port}: FATAL: password authentication failed for user "hb". '
                  f"{AUTH_FIX}")
    proc.stop()
    assert WRONG not in proc.log()
