"""Nothing hangs, round two: slow servers, a frozen first host, a resolver that never answers, shutdown mid-backfill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import pytest

from conftest import DaemonProcess, clean_env, cli, init_table, rows
from heartbeatd.pg import deadline
from heartbeatd.heartbeat import Row
from heartbeatd.probes.postgres_connect import PostgresProbe
from heartbeatd.probes.redis_ping import RedisProbe
from heartbeatd.spool import Spool
from heartbeatd.writer import Writer
from proxy import DelayProxy
from servers import PgServer, RedisServer, free_port
from test_faults import spooled_rows, statuses

TIMEOUT = 1.0
SLACK = 0.25  # scheduling noise on a busy 2-core VM; far below one more round trip


@pytest.fixture
def slow_redis(redis_own: RedisServer) -> Iterator[DelayProxy]:
    proxy = DelayProxy("127.0.0.1", redis_own.port, 0.0)
    yield proxy
    proxy.close()


@pytest.fixture
def slow_pg(pg: PgServer) -> Iterator[DelayProxy]:
    proxy = DelayProxy("127.0.0.1", pg.port, 0.0)
    yield proxy
    proxy.close()


T = TypeVar("T")


def timed(check: Callable[[], T]) -> tuple[T, float]:
    start = time.monotonic()
    result = check()
    return result, time.monotonic() - start


@pytest.mark.parametrize("url_extra", ["", "?client_name=heartbeat-probe"])
def test_slow_redis_handshake_and_ping_fit_in_one_timeout(slow_redis: DelayProxy, url_extra: str) -> None:
    probe = RedisProbe(f"redis://127.0.0.1:{slow_redis.port}/3{url_extra}", TIMEOUT)
    slow_redis.delay = 0.02
    result, took = timed(probe.check)
    assert result.ok, result  # type: ignore[attr-defined]
    probe.close()
    # Each round trip 0.45 s: the handshake (CLIENT SETINFO x2, SELECT, [SETNAME]) and PING take
    # 4-5 of them. redis-py alone gives each a fresh timeout; the whole check must fit in one.
    slow_redis.delay = 0.45
    result, took = timed(probe.check)
    assert not result.ok and result.error == "timed out after 1s", result  # type: ignore[attr-defined]
    assert TIMEOUT - 0.05 <= took <= TIMEOUT + SLACK, took
    probe.close()


def test_slow_redis_with_password_is_bounded(tmp_path: Path) -> None:
    server = RedisServer(password="pw-slow").start()
    # 0.6 s a reply: redis-py may send the handshake's commands (AUTH, CLIENT SETINFO, SELECT,
    # SETNAME) together and read their replies in one chunk, so only two delays are sure (the
    # handshake's, then PING's): 1.2 s, over the 1 s timeout whatever the chunking. At 0.3 s the
    # check sometimes fitted in 0.9 s and the test failed.
    proxy = DelayProxy("127.0.0.1", server.port, 0.6)
    try:
        probe = RedisProbe(f"redis://:pw-slow@127.0.0.1:{proxy.port}/1?client_name=x", TIMEOUT)
        result, took = timed(probe.check)
        assert not result.ok and took <= TIMEOUT + SLACK, (result, took)
        proxy.delay = 0.01
        result, took = timed(probe.check)
        assert result.ok, result  # type: ignore[attr-defined]
        probe.close()
    finally:
        proxy.close()
        server.destroy()


def test_slow_postgres_connect_and_write_are_each_bounded(pg: PgServer, slow_pg: DelayProxy) -> None:
    init_table(pg)
    # sslmode=prefer: an SSLRequest round trip, then the startup one - each under the timeout.
    url = f"postgresql://postgres@127.0.0.1:{slow_pg.port}/{pg.dbname}?sslmode=prefer"
    probe = PostgresProbe(url, TIMEOUT)
    slow_pg.delay = 0.6
    result, took = timed(probe.check)
    conn = probe.take_connection()
    assert conn is None and "timed out after 1s" in (result.error or ""), result
    assert took <= TIMEOUT + SLACK, took
    slow_pg.delay = 0.05
    result, _ = timed(probe.check)
    conn = probe.take_connection()
    assert conn is not None, result
    slow_pg.delay = 0.6  # column lookup + INSERT: two round trips, more than the timeout
    writer = Writer(("service_heartbeat",), TIMEOUT)
    start = time.monotonic()
    with pytest.raises(Exception) as info:
        writer.write(conn, [Row("后端", "10.1.1.1", datetime.now(timezone.utc))])
    assert time.monotonic() - start <= TIMEOUT + SLACK
    assert "timed out after 1s" in str(info.value)
    conn.close()


def test_slow_servers_never_starve_the_watchdog(pg: PgServer, slow_pg: DelayProxy, slow_redis: DelayProxy,
                                                tmp_path: Path, daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg)
    env = clean_env(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{slow_pg.port}/{pg.dbname}?sslmode=prefer",
                    REDIS_URL=f"redis://127.0.0.1:{slow_redis.port}/0", HEARTBEAT_INTERVAL="3",
                    HEARTBEAT_TIMEOUT=str(TIMEOUT), HEARTBEAT_SPOOL_PATH=str(tmp_path / "spool.db"))
    # Slow, not dead: each round trip is under the timeout, the handshakes run past it.
    slow_redis.delay, slow_pg.delay = 0.45, 0.6
    # The smallest watchdog the daemon accepts for this timeout: 3 steps x 1 s = WATCHDOG_USEC / 2.
    proc = daemon(env, watchdog_usec=6_000_000)
    proc.wait_for(lambda: statuses(proc, "redis down, postgres down") >= 3, what="three cycles against slow servers",
                  timeout=40)
    slow_redis.delay = slow_pg.delay = 0.02  # slow but within the deadline
    proc.wait_log("补写心跳 - ", timeout=20)
    proc.wait_log("记录心跳成功 - 服务: redis", timeout=20)
    assert proc.stop() == 0
    pings = [at for at, _ in proc.notices("WATCHDOG=1")]
    assert max(b - a for a, b in zip(pings, pings[1:])) <= 3.0, "WATCHDOG=1 later than WATCHDOG_USEC/2"
    starts = [at for at, _ in proc.notices("STATUS=后端")]
    # An interval above the worst case (three steps of one timeout): every start on time, backfill included.
    assert max(b - a for a, b in zip(starts, starts[1:])) <= 3.0 + SLACK, "cycles must keep the 3 s pace"


def test_a_frozen_first_host_does_not_stop_failover(redis_server: RedisServer, tmp_path: Path,
                                                    daemon: Callable[..., DaemonProcess]) -> None:
    first = PgServer(timezone="Asia/Shanghai").start()
    second = PgServer(host="127.0.0.2", timezone="Asia/Shanghai").start()
    try:
        for server in (first, second):
            init_table(server, db="postgres")
        url = (f"postgresql://postgres@127.0.0.1:{first.port},127.0.0.2:{second.port}/postgres"
               "?target_session_attrs=read-write")
        env = clean_env(DATABASE_URL=url, REDIS_URL=redis_server.url(), HEARTBEAT_INTERVAL="1",
                        HEARTBEAT_TIMEOUT="0.6", HEARTBEAT_SPOOL_PATH=str(tmp_path / "spool.db"))
        first.freeze()
        proc = daemon(env, watchdog_usec=4_000_000)
        proc.wait_for(lambda: statuses(proc, "postgres up") >= 3, what="three cycles on the second host")
        assert proc.stop() == 0
        assert "postgres down" not in " ".join(s for _, s in proc.notices("STATUS="))
        found = rows(second, db="postgres")
        assert {r[1] for r in found if r[0] == "postgres"} == {"127.0.0.2"}  # the host actually used
        assert len([r for r in found if r[0] == "后端"]) == statuses(proc, "next in")
        pings = [at for at, _ in proc.notices("WATCHDOG=1")]
        assert max(b - a for a, b in zip(pings, pings[1:])) <= 2.0
        first.thaw()
        # A read-only first host is refused by target_session_attrs=read-write, as libpq would.
        first.sql("ALTER SYSTEM SET default_transaction_read_only = on")
        first.sql("SELECT pg_reload_conf()")
        result = cli(["once"], env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "postgres\tup\t127.0.0.2\t" in result.stdout
        # Both refusing: the line names each host and why.
        second.stop()
        result = cli(["once"], env, cwd=tmp_path)
        line = next(line for line in result.stderr.splitlines() if "数据库连接测试失败" in line)
        assert f"127.0.0.1:{first.port}: session is read-only" in line, line
        assert f"127.0.0.2:{second.port}: Connection refused." in line, line
    finally:
        first.destroy()
        second.destroy()


class MuteResolver:
    """A network namespace whose resolv.conf points at a UDP listener that never replies."""

    def __init__(self) -> None:
        self.ns = f"hb-dns-{uuid.uuid4().hex[:6]}"
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        subprocess.run(["ip", "-n", self.ns, "link", "set", "lo", "up"], check=True)
        self.etc = Path("/etc/netns") / self.ns
        self.etc.mkdir(parents=True)
        (self.etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:5 attempts:3\n")
        (self.etc / "hosts").write_text("127.0.0.1 localhost\n")
        self.listener = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-c",
             "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('127.0.0.1', 53))\n"
             "while True:\n    s.recv(512)\n"])
        time.sleep(0.3)

    def remove(self) -> None:
        self.listener.kill()
        self.listener.wait()
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        for path in self.etc.iterdir():
            path.unlink()
        self.etc.rmdir()


@pytest.fixture
def mute_dns() -> Iterator[MuteResolver]:
    if os.geteuid() != 0:
        pytest.fail("the resolver test needs root (CI runs as root)")
    made = MuteResolver()
    yield made
    made.remove()


def test_a_resolver_that_never_answers_costs_one_timeout(mute_dns: MuteResolver, tmp_path: Path,
                                                          daemon: Callable[..., DaemonProcess]) -> None:
    pg = PgServer(netns=mute_dns.ns).start()
    redis = RedisServer(netns=mute_dns.ns).start()
    try:
        init_table(pg, db="postgres")
        env = clean_env(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{pg.port}/postgres",
                        REDIS_URL=f"redis://cache.hb-test:{redis.port}/0", HEARTBEAT_INTERVAL="1",
                        HEARTBEAT_TIMEOUT="0.5", HEARTBEAT_SPOOL_PATH=str(tmp_path / "spool.db"))
        proc = daemon(env, watchdog_usec=3_000_000, prefix=["ip", "netns", "exec", mute_dns.ns])
        proc.wait_for(lambda: statuses(proc, "redis down, postgres up") >= 3, what="cycles while DNS hangs")
        proc.wait_log("Redis连接测试失败: name lookup of cache.hb-test gave no answer in time")
        assert proc.stop() == 0
        assert "服务不可用 - 服务: redis, IP: cache.hb-test" in proc.log()
        pings = [at for at, _ in proc.notices("WATCHDOG=1")]
        assert max(b - a for a, b in zip(pings, pings[1:])) <= 1.5
        starts = [at for at, _ in proc.notices("STATUS=后端")]
        assert max(b - a for a, b in zip(starts, starts[1:])) <= 1.0 + SLACK
        assert len([r for r in rows(pg, db="postgres") if r[0] == "postgres"]) == statuses(proc, "next in")
        # The same for PostgreSQL's host name: down within the timeout, rows spooled.
        env.update(DATABASE_URL=f"postgresql://postgres@db.hb-test:{pg.port}/postgres",
                   REDIS_URL=f"redis://127.0.0.1:{redis.port}/0")
        result = subprocess.run(["ip", "netns", "exec", mute_dns.ns, sys.executable, "-m", "heartbeatd", "once"],
                                env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert f"数据库连接测试失败: db.hb-test:{pg.port}: name lookup of db.hb-test gave no answer in time" \
            in result.stderr, result.stderr
        assert "redis\tup\t127.0.0.1" in result.stdout
    finally:
        redis.destroy()
        pg.destroy()


def test_sigterm_during_a_long_backfill_exits_promptly_and_keeps_the_rest(
        pg: PgServer, slow_pg: DelayProxy, redis_server: RedisServer, tmp_path: Path,
        daemon: Callable[..., DaemonProcess]) -> None:
    init_table(pg)
    t0 = datetime.now(timezone.utc) - timedelta(days=3)
    backlog = [Row(s, "10.8.8.8", t0 + timedelta(seconds=30 * i)) for i in range(5000) for s in ("后端", "redis")]
    spool = Spool(tmp_path / "spool.db", 100000)
    spool.append(backlog)
    spool.close()
    slow_pg.delay = 0.1  # every backfill batch takes a few round trips: the backlog needs many seconds
    env = clean_env(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{slow_pg.port}/{pg.dbname}?sslmode=disable",
                    REDIS_URL=redis_server.url(), HEARTBEAT_INTERVAL="30", HEARTBEAT_TIMEOUT=str(TIMEOUT),
                    HEARTBEAT_SPOOL_PATH=str(tmp_path / "spool.db"))
    proc = daemon(env)
    proc.wait_log("补写心跳 - ", 3)
    sent = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.stop(timeout=10) == 0
    assert time.monotonic() - sent <= 1.0 + TIMEOUT
    left = len(spooled_rows(tmp_path / "spool.db"))
    written = pg.sql("SELECT count(*) FROM service_heartbeat WHERE ip_address = '10.8.8.8'", db=pg.dbname)[0][0]
    assert left > 0 and written + left == len(backlog)


def test_unreachable_port_in_a_multi_host_url_is_reported_per_host(tmp_path: Path) -> None:
    a, b = free_port(), free_port()
    probe = PostgresProbe(f"postgresql://127.0.0.1:{a},127.0.0.1:{b}/x", TIMEOUT)
    with deadline(5):
        result = probe.check({}, time.monotonic() + TIMEOUT)
    assert probe.take_connection() is None
    assert result.error.count("Connection refused.") == 2 and f"127.0.0.1:{a}: " in result.error  # type: ignore[union-attr]


def test_rediss_verifies_the_name_while_connecting_to_the_address_we_resolved(tmp_path: Path) -> None:
    # A TLS Redis whose certificate names `localhost`: we resolve localhost ourselves, connect to
    # the address, and redis-py verifies the certificate against the name, within the deadline.
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem")], check=True, capture_output=True)
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                               "--tls-cert-file", str(tmp_path / "cert.pem"), "--tls-key-file", str(tmp_path / "key.pem"),
                               "--tls-ca-cert-file", str(tmp_path / "cert.pem"), "--tls-auth-clients", "no",
                               "--save", "", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        good = RedisProbe(f"rediss://localhost:{port}/0?ssl_ca_certs={tmp_path / 'cert.pem'}", TIMEOUT)
        result = good.check({}, time.monotonic() + TIMEOUT)
        assert result.ok and result.ip == "127.0.0.1", result
        good.close()
        # The same server under a name its certificate does not carry: refused, not trusted.
        wrong = RedisProbe(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tmp_path / 'cert.pem'}", TIMEOUT)
        result = wrong.check({}, time.monotonic() + TIMEOUT)
        assert not result.ok and "certificate" in (result.error or "").lower(), result
        wrong.close()
    finally:
        server.kill()
        server.wait()
