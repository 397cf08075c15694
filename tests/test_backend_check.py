"""HEARTBEAT_BACKEND_CHECK against real local listeners: 后端 means the backend application answers."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import DaemonProcess, clean_env, cli, db_url, init_table, rows
from servers import PgServer, RedisServer
from test_faults import statuses


class App:
    """A stand-in backend: an HTTP server on loopback whose answer the test sets (200, 503, ...)."""

    def __init__(self) -> None:
        self.status = 200
        app = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                self.send_response(app.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def app() -> Iterator[App]:
    made = App()
    yield made
    made.stop()


def once(pg: PgServer, redis: RedisServer, tmp_path: Path, check: str) -> tuple[int, str, str]:
    env = clean_env(DATABASE_URL=db_url(pg), REDIS_URL=redis.url(), HEARTBEAT_BACKEND_CHECK=check,
                    HEARTBEAT_TIMEOUT="0.5")
    result = cli(["once"], env, cwd=tmp_path)
    return result.returncode, result.stdout, result.stderr


def test_tcp_check(pg: PgServer, redis_server: RedisServer, tmp_path: Path) -> None:
    init_table(pg)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        code, out, err = once(pg, redis_server, tmp_path, f"tcp://127.0.0.1:{port}")
        assert code == 0 and out.startswith("后端\tup\t"), out + err
    code, out, err = once(pg, redis_server, tmp_path, f"tcp://127.0.0.1:{port}")
    assert code == 1 and out.startswith("后端\tdown\t")
    assert f"ERROR:heartbeatd.daemon:后端检查失败: 127.0.0.1:{port}: Connection refused" in err
    assert "WARNING:heartbeatd.daemon:服务不可用 - 服务: 后端, IP: " in err
    assert [r[0] for r in rows(pg)].count("后端") == 1  # only the healthy run wrote a 后端 row


def test_http_check_200_then_503_then_stopped(pg: PgServer, redis_server: RedisServer, tmp_path: Path, app: App) -> None:
    init_table(pg)
    check = f"http://localhost:{app.port}/healthz?deep=1"
    code, out, _ = once(pg, redis_server, tmp_path, check)
    assert code == 0 and out.startswith("后端\tup\t")
    app.status = 302
    assert once(pg, redis_server, tmp_path, check)[0] == 0  # 3xx is an answer too
    app.status = 503
    code, out, err = once(pg, redis_server, tmp_path, check)
    assert code == 1 and f"后端检查失败: localhost:{app.port}: HTTP 503 Service Unavailable" in err, err
    app.stop()
    code, out, err = once(pg, redis_server, tmp_path, check)
    assert code == 1 and f"后端检查失败: localhost:{app.port}: Connection refused" in err, err
    found = [r for r in rows(pg) if r[0] == "后端"]
    assert len(found) == 2
    assert {r[0] for r in rows(pg)} == {"后端", "redis", "postgres"}


def test_http_check_that_never_answers_is_bounded(pg: PgServer, redis_server: RedisServer, tmp_path: Path) -> None:
    init_table(pg)
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        start = time.monotonic()
        code, out, err = once(pg, redis_server, tmp_path, f"http://127.0.0.1:{mute.getsockname()[1]}/")
        took = time.monotonic() - start
    assert code == 1 and "后端检查失败: " in err and "timed out after 0.5s" in err, err
    assert took < 0.5 + 3.0  # interpreter start-up plus one timeout, not a hang
    assert "redis\tup" in out and "postgres\tup" in out


@pytest.mark.parametrize("value, fragment", [
    ("systemd:", "needs a unit name"),
    ("systemd:app", "needs a unit name"),
    ("tcp://127.0.0.1", "needs a port"),
    ("ftp://host/", "must be systemd:NAME.service"),
    ("http://user:pw@host/", "no user or password"),
    ("http://host:99999/", "bad URL"),
])
def test_bad_check_is_78(tmp_path: Path, value: str, fragment: str) -> None:
    result = cli(["check-config"], clean_env(HEARTBEAT_BACKEND_CHECK=value), cwd=tmp_path)
    assert result.returncode == 78, result.stderr
    assert result.stderr.startswith("heartbeatd: HEARTBEAT_BACKEND_CHECK: ") and fragment in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "pw" not in result.stderr


def test_daemon_stops_and_resumes_backend_rows(pg: PgServer, redis_server: RedisServer, tmp_path: Path, app: App,
                                              daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg)
    env = clean_env(DATABASE_URL=db_url(pg), REDIS_URL=redis_server.url(), HEARTBEAT_INTERVAL="0.3",
                    HEARTBEAT_TIMEOUT="0.5", HEARTBEAT_SPOOL_PATH=str(tmp_path / "spool.db"),
                    HEARTBEAT_BACKEND_CHECK=f"http://127.0.0.1:{app.port}/")
    proc = daemon(env)
    proc.wait_log("记录心跳成功 - 服务: 后端", 2)
    app.status = 500
    proc.wait_for(lambda: statuses(proc, "后端 down, redis up, postgres up") >= 5, what="cycles with the backend down")
    app.status = 200
    proc.wait_log("服务恢复 - 服务: 后端")
    proc.wait_log("记录心跳成功 - 服务: 后端", proc.log().count("记录心跳成功 - 服务: 后端") + 1)
    assert proc.stop() == 0
    log = proc.log()
    assert log.count("后端检查失败: 127.0.0.1") == 1 and log.count("服务不可用 - 服务: 后端") == 1  # throttled
    found = rows(pg)
    cycles = statuses(proc, "next in")
    down = statuses(proc, "后端 down")
    assert len([r for r in found if r[0] == "后端"]) == cycles - down
    assert len([r for r in found if r[0] == "postgres"]) == cycles
    assert not (tmp_path / "spool.db").exists() or "spooled" not in proc.notices("STATUS=")[-1][1]

