"""Fixtures: private servers, a clean environment, and a real daemon process with a notify socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from servers import PgServer, RedisServer, remove_template  # noqa: E402

# Variables of the machine or of a surrounding systemd that must not leak into a test daemon.
_SCRUB = ("DATABASE_URL", "REDIS_URL", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM",
          "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY", "INVOCATION_ID")


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without heartbeatd's and systemd's variables, plus `extra`."""
    # PG*: libpq applies them as defaults of DATABASE_URL; a test sets the ones it means.
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB and not k.startswith(("HEARTBEAT_", "PG"))}
    # Not this machine's /etc/heartbeatd/heartbeatd.env, should it have one: every command would read it.
    env["HEARTBEAT_ENV_FILE"] = "/nonexistent/heartbeatd.env"
    env.update(extra)
    return env


@pytest.fixture(scope="session", autouse=True)
def _leave_nothing_behind() -> Iterator[None]:
    """The initdb template lives for the session and goes with it."""
    yield
    remove_template()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One private PostgreSQL for the session, in a non-UTC time zone on purpose."""
    server = PgServer(timezone="Asia/Shanghai").start()
    yield server
    server.destroy()


@pytest.fixture
def pg(pg_server: PgServer) -> Iterator[PgServer]:
    """The session server with a fresh database for this test (its name in `.dbname`)."""
    name = "t_" + uuid.uuid4().hex[:12]
    pg_server.sql(f"CREATE DATABASE {name}")
    pg_server.dbname = name  # type: ignore[attr-defined]
    yield pg_server
    pg_server.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def pg_own() -> Iterator[PgServer]:
    """A private PostgreSQL this test may stop, kill or freeze."""
    server = PgServer(timezone="Asia/Shanghai").start()
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private Redis for the session."""
    server = RedisServer().start()
    yield server
    server.destroy()


@pytest.fixture
def redis_own() -> Iterator[RedisServer]:
    """A private Redis this test may stop or freeze."""
    server = RedisServer().start()
    yield server
    server.destroy()


def db_url(server: PgServer, **kw: Any) -> str:
    """URL of the test's database on `server`."""
    return server.url(db=getattr(server, "dbname", "postgres"), **kw)


def init_table(server: PgServer, db: Optional[str] = None) -> None:
    """Create the table the way `heartbeatd init-db` does."""
    from heartbeatd.schema import CREATE_TABLE, PAIR_INDEX
    server.sql(CREATE_TABLE.format(table="service_heartbeat", index="service_heartbeat_service_name_report_time_idx"),
               db=db or getattr(server, "dbname", "postgres"))
    server.sql(PAIR_INDEX.format(concurrently="", index="service_heartbeat_service_ip_time_idx",
                                 table="service_heartbeat"), db=db or getattr(server, "dbname", "postgres"))


def rows(server: PgServer, table: str = "service_heartbeat", db: Optional[str] = None) -> list[tuple[Any, ...]]:
    """(service_name, ip_address, report_time, created_at) ordered by report_time."""
    return server.sql(f"SELECT service_name, ip_address, report_time, created_at FROM {table} "
                      "ORDER BY report_time, service_name", db=db or getattr(server, "dbname", "postgres"))


def cli(args: list[str], env: dict[str, str], cwd: Optional[Path] = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `python -m heartbeatd ARGS` and capture its output."""
    return subprocess.run([sys.executable, "-m", "heartbeatd", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


class DaemonProcess:
    """`heartbeatd run` as a real process, with a real AF_UNIX datagram NOTIFY_SOCKET."""

    def __init__(self, tmp: Path, env: dict[str, str], args: Optional[list[str]] = None,
                 watchdog_usec: Optional[int] = None, prefix: Optional[list[str]] = None) -> None:
        self.sock_path = tmp / f"notify-{uuid.uuid4().hex[:8]}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.messages: list[tuple[float, bytes]] = []
        self.lines: list[tuple[float, str]] = []
        env = dict(env, NOTIFY_SOCKET=str(self.sock_path), PYTHONUNBUFFERED="1")
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.proc = subprocess.Popen([*(prefix or []), sys.executable, "-m", "heartbeatd", "run", *(args or [])],
                                     env=env, cwd=tmp,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._threads = [threading.Thread(target=self._read_socket, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _read_socket(self) -> None:
        self.sock.settimeout(0.2)
        while self.proc.poll() is None or self.sock:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                if self.proc.poll() is not None:
                    return
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data))

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def notices(self, prefix: str) -> list[tuple[float, str]]:
        """Every notify field starting with `prefix`, decoded as UTF-8 (raises if it is not)."""
        found = []
        for at, data in list(self.messages):
            for field in data.decode("utf-8").split("\n"):
                if field.startswith(prefix):
                    found.append((at, field))
        return found

    def log(self) -> str:
        """All stderr so far."""
        return "\n".join(line for _, line in list(self.lines))

    def wait_for(self, check: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
        """Poll `check` until it returns something truthy."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            if self.proc.poll() is not None:
                time.sleep(0.3)
                value = check()
                if value:
                    return value
                raise AssertionError(f"daemon exited {self.proc.returncode} waiting for {what}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log()}")

    def wait_log(self, text: str, count: int = 1, timeout: float = 30) -> None:
        """Wait until `text` appeared in `count` stderr lines."""
        self.wait_for(lambda: sum(text in line for _, line in list(self.lines)) >= count, timeout, repr(text))

    def signal(self, signum: int) -> None:
        """Send a real signal."""
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM and wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            for thread in self._threads:
                thread.join(2)

    def kill(self) -> None:
        """Clean-up: SIGKILL whatever is left."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for thread in self._threads:
            thread.join(2)
        self.sock.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Factory for real daemon processes; all are killed at the end of the test."""
    started: list[DaemonProcess] = []

    def start(env: dict[str, str], args: Optional[list[str]] = None, watchdog_usec: Optional[int] = None,
              prefix: Optional[list[str]] = None) -> DaemonProcess:
        proc = DaemonProcess(tmp_path, env, args, watchdog_usec, prefix)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def daemon_on_env_file(start: Callable[..., DaemonProcess], pg: PgServer, redis: RedisServer, tmp: Path,
                       interval: float) -> tuple[DaemonProcess, Path, str]:
    """A real daemon reading an --env-file (so SIGHUP has something to re-read), once it wrote a row."""
    env_file = tmp / "hb.env"
    good = (f"DATABASE_URL={db_url(pg)}\nREDIS_URL={redis.url()}\nHEARTBEAT_INTERVAL={interval:g}\n"
            f"HEARTBEAT_SPOOL_PATH={tmp / 'spool.db'}\n")
    env_file.write_text(good)
    proc = start(clean_env(), ["--env-file", str(env_file)])
    proc.wait_log("记录心跳成功 - 服务: postgres")
    return proc, env_file, good


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs of this test's own, to fill up."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Write zeros until the file system is full."""
    filler = directory / "filler"
    try:
        with open(filler, "wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    except OSError:  # full (if it was full already, not even the file could be made)
        pass
    return filler
