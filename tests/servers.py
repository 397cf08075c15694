"""Private PostgreSQL and Redis servers on free loopback ports, for tests and the benchmark.

Never the machine's shared servers: each server here lives in a temp dir, on its own port, and
may be stopped, killed, frozen (SIGSTOP) and restarted by the test that owns it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import psycopg2


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def pg_bindir() -> Path:
    """The newest installed PostgreSQL server binaries."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    return Path(found[-1]).parent


def _as_postgres(cmd: Sequence[str], netns: Optional[str] = None) -> list[str]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    if os.geteuid() == 0:
        return prefix + ["runuser", "-u", "postgres", "--"] + list(cmd)
    return prefix + list(cmd)


def _chown_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)


_TEMPLATE: Optional[Path] = None


def _template() -> Path:
    """One initdb per test session; every server starts from a copy of it."""
    global _TEMPLATE
    if _TEMPLATE is None:
        root = Path(tempfile.mkdtemp(prefix="hb-pgtemplate-"))
        _chown_postgres(root)
        data = root / "data"
        subprocess.run(
            _as_postgres([str(pg_bindir() / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                          "-E", "UTF8", "--locale=C", "--no-sync"]),
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        _TEMPLATE = data
    return _TEMPLATE


def remove_template() -> None:
    """Remove the session's initdb template (tests leave nothing behind in the temp dir)."""
    global _TEMPLATE
    if _TEMPLATE is not None:
        shutil.rmtree(_TEMPLATE.parent, ignore_errors=True)
        _TEMPLATE = None


class PgServer:
    """A private PostgreSQL cluster."""

    def __init__(self, host: str = "127.0.0.1", port: Optional[int] = None, timezone: str = "UTC",
                 netns: Optional[str] = None) -> None:
        self.host = host
        self.port = port or free_port()
        self.timezone = timezone
        self.netns = netns
        self.root = Path(tempfile.mkdtemp(prefix="hb-pg-"))
        _chown_postgres(self.root)
        self.data = self.root / "data"
        subprocess.run(["cp", "-a", str(_template()), str(self.data)], check=True)
        if netns:  # clients come from the other test namespace on the same veth subnet
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.write("host all all samenet trust\n")
        self.log = self.root / "server.log"
        self.extra_opts = ""  # more `-c name=value` server settings

    def enable_tls_and_scram(self, user: str, over_tls: str, without_tls: str) -> None:
        """A self-signed certificate, ssl=on, and how `user` logs in with and without TLS (trust, scram-sha-256)."""
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                        "-keyout", str(self.data / "server.key"), "-out", str(self.data / "server.crt")],
                       check=True, capture_output=True)
        for name in ("server.key", "server.crt"):
            _chown_postgres(self.data / name)
        (self.data / "server.key").chmod(0o600)
        self.extra_opts += " -c ssl=on -c password_encryption=scram-sha-256"
        with open(self.data / "pg_hba.conf", "w") as hba:
            hba.write("local all all trust\nhost all postgres 127.0.0.1/32 trust\n"
                      f"hostssl all {user} 127.0.0.1/32 {over_tls}\nhostnossl all {user} 127.0.0.1/32 {without_tls}\n")

    def make_standby_of(self, primary: "PgServer") -> "PgServer":
        """Replace this (not yet started) cluster with a streaming standby of `primary` (pg_basebackup -R)."""
        shutil.rmtree(self.data)
        subprocess.run(_as_postgres([str(pg_bindir() / "pg_basebackup"), "-D", str(self.data), "-R", "-X", "stream",
                                     "-h", primary.host, "-p", str(primary.port), "-U", "postgres", "--no-sync"]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def promote(self) -> None:
        """pg_ctl promote: the standby becomes a primary (waits until it accepts writes)."""
        subprocess.run(_as_postgres([str(pg_bindir() / "pg_ctl"), "-D", str(self.data), "-w", "promote"]),
                       check=True, stdout=subprocess.DEVNULL)

    def url(self, user: str = "postgres", password: Optional[str] = None, db: str = "postgres") -> str:
        """A libpq URL for this server."""
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@{self.host}:{self.port}/{db}"

    def _options(self) -> str:
        return (f"-p {self.port} -c listen_addresses={self.host} -k {self.root} -c fsync=off "
                f"-c timezone={self.timezone} -c log_timezone={self.timezone} {self.extra_opts}")

    def start(self) -> "PgServer":
        """Start (or restart) and wait until it accepts connections."""
        subprocess.run(
            _as_postgres([str(pg_bindir() / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                          "-o", self._options(), "-w", "-t", "60", "start"], self.netns),
            check=True, stdout=subprocess.DEVNULL,
        )
        return self

    def start_under(self, wrapper: Sequence[str], seconds: float = 120.0) -> "PgServer":
        """Start the postmaster itself under `wrapper` (valgrind, for a benchmark), not through pg_ctl; wait
        until it accepts connections. stop() and destroy() stop it as they stop any."""
        with open(self.log, "ab") as log:
            subprocess.Popen(_as_postgres([*wrapper, str(pg_bindir() / "postgres"), "-D", str(self.data),
                                           *self._options().split()], self.netns), stdout=log, stderr=log)
        until = time.monotonic() + seconds
        while True:
            try:
                self.connect().close()
                return self
            except psycopg2.OperationalError:
                if time.monotonic() > until:
                    raise
                time.sleep(0.5)

    def stop(self, mode: str = "fast") -> None:
        """Stop it (fast: disconnect clients; immediate: like a crash)."""
        self.thaw()
        subprocess.run(
            _as_postgres([str(pg_bindir() / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def pids(self) -> list[int]:
        """The postmaster and every backend and auxiliary process."""
        try:
            master = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        pids = [master]
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == master:
                pids.append(int(stat.split("/")[2]))
        return pids

    def freeze(self) -> None:
        """SIGSTOP the postmaster and all its children: TCP still accepted, nothing answers."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:  # a backend that ended since it was listed
                pass

    def thaw(self) -> None:
        """SIGCONT everything frozen."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def connect(self, db: str = "postgres", user: str = "postgres") -> Any:
        """An autocommit admin connection (for test setup and assertions)."""
        # Through the Unix socket in our own directory: works even when TCP listens in another netns.
        conn = psycopg2.connect(host=str(self.root), port=self.port, user=user, dbname=db, connect_timeout=10)
        conn.autocommit = True
        return conn

    def sql(self, query: str, params: Sequence[Any] = (), db: str = "postgres") -> list[tuple[Any, ...]]:
        """Run one statement as the superuser; return its rows (if any)."""
        conn = self.connect(db)
        try:
            with conn.cursor() as cur:
                cur.execute(query, params)
                return list(cur.fetchall()) if cur.description else []
        finally:
            conn.close()

    def destroy(self) -> None:
        """Stop and remove everything."""
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


class RedisServer:
    """A private redis-server, nothing saved to disk."""

    def __init__(self, host: str = "127.0.0.1", port: Optional[int] = None, password: Optional[str] = None,
                 netns: Optional[str] = None, extra: Sequence[str] = ()) -> None:
        self.host = host
        self.port = port or (free_port() if netns else free_port(host))  # a namespace address is not ours to bind
        self.password = password
        self.netns = netns
        self.extra = list(extra)  # more redis-server options (--replicaof ...)
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.dir = Path(tempfile.mkdtemp(prefix="hb-redis-"))

    def url(self, password: Optional[str] = None) -> str:
        """A redis:// URL for this server."""
        auth = f":{password}@" if password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self) -> "RedisServer":
        """Start (or restart) on the same port; wait until it answers."""
        cmd = ["redis-server", "--port", str(self.port), "--bind", self.host, "--save", "",
               "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no"]
        if self.password:
            cmd += ["--requirepass", self.password]
        cmd += self.extra
        if self.netns:
            cmd += ["--protected-mode", "no"]  # reachable from the other test namespace only
            cmd = ["ip", "netns", "exec", self.netns] + cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        ping = ["redis-cli", "-h", self.host, "-p", str(self.port), "ping"]
        while self.netns and time.monotonic() < deadline:
            probe = subprocess.run(["ip", "netns", "exec", self.netns] + ping, capture_output=True, text=True)
            if probe.stdout.strip() in ("PONG", "NOAUTH Authentication required."):
                return self
            time.sleep(0.05)
        if not self.netns and self._answers(deadline):
            return self
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def _answers(self, deadline: float) -> bool:
        """Whether the server on host:port answers a PING (any reply) before `deadline`."""
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64):
                        return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Stop it and wait for the port to close."""
        if self.proc is not None:
            self.thaw()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: connections accepted by the kernel, never answered."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def destroy(self) -> None:
        """Stop and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelServer(RedisServer):
    """A private `redis-server --sentinel` watching one master, on its own port, config in its directory."""

    def __init__(self, master: RedisServer, name: str = "mymaster", quorum: int = 2, password: Optional[str] = None,
                 host: str = "127.0.0.1") -> None:
        super().__init__(host=host)
        self.master, self.name, self.quorum, self.sentinel_password = master, name, quorum, password

    def start(self) -> "SentinelServer":
        """Start (a restart keeps what it learnt: the config file is its own)."""
        conf = self.dir / "sentinel.conf"
        if not conf.exists():
            auth = f"requirepass {self.sentinel_password}\nsentinel sentinel-pass {self.sentinel_password}\n" \
                if self.sentinel_password else ""
            master_auth = f"sentinel auth-pass {self.name} {self.master.password}\n" if self.master.password else ""
            conf.write_text(
                f"port {self.port}\nbind {self.host}\ndir {self.dir}\nprotected-mode no\n{auth}"
                f"sentinel monitor {self.name} {self.master.host} {self.master.port} {self.quorum}\n{master_auth}"
                f"sentinel down-after-milliseconds {self.name} 1000\nsentinel failover-timeout {self.name} 4000\n"
                f"sentinel parallel-syncs {self.name} 1\n")
        self.proc = subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        if self._answers(time.monotonic() + 20):
            return self
        raise RuntimeError(f"redis sentinel on port {self.port} did not start")

    def ask(self, *command: str) -> Any:
        """One command to this sentinel (redis-py, decoded replies)."""
        import redis
        client = redis.Redis(host=self.host, port=self.port, password=self.sentinel_password, decode_responses=True,
                             socket_timeout=5)
        try:
            return client.execute_command(*command)
        finally:
            client.close()

    def master_addr(self) -> Optional[tuple[str, int]]:
        reply = self.ask("SENTINEL", "get-master-addr-by-name", self.name)
        return (reply[0], int(reply[1])) if reply else None


class PgBouncer:
    """A private PgBouncer (transaction pooling) in front of a PgServer, on its own loopback address and port."""

    def __init__(self, upstream: PgServer, host: str = "127.0.0.3", pool_size: int = 20) -> None:
        self.upstream = upstream
        self.host = host
        self.port = free_port(host)
        self.root = Path(tempfile.mkdtemp(prefix="hb-pgbouncer-"))
        _chown_postgres(self.root)
        self.ini = self.root / "pgbouncer.ini"
        (self.root / "userlist.txt").write_text('"postgres" ""\n')
        self.ini.write_text(
            "[databases]\n"
            f"* = host={upstream.host} port={upstream.port}\n"
            "[pgbouncer]\n"
            f"listen_addr = {host}\nlisten_port = {self.port}\nunix_socket_dir = {self.root}\n"
            f"auth_type = trust\nauth_file = {self.root / 'userlist.txt'}\n"
            f"pool_mode = transaction\ndefault_pool_size = {pool_size}\nserver_login_retry = 1\nserver_connect_timeout = 2\n"
            f"logfile = {self.root / 'pgbouncer.log'}\npidfile = {self.root / 'pgbouncer.pid'}\n"
            "ignore_startup_parameters = extra_float_digits,application_name\n")
        for path in self.root.iterdir():
            _chown_postgres(path)
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{db}?sslmode=disable"

    def start(self) -> "PgBouncer":
        """Start and wait until it accepts TCP connections."""
        # As postgres (PgBouncer refuses root), and our own child, so that stop() kills PgBouncer itself.
        owner = {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}
        self.proc = subprocess.Popen(["pgbouncer", str(self.ini)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, **owner)  # type: ignore[call-overload]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"pgbouncer did not start: {(self.root / 'pgbouncer.log').read_text()[-2000:]}")

    def stop(self) -> None:
        """Kill it: every client and server connection ends at once."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
