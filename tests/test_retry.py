"""A fast failure is tried again before it counts (HEARTBEAT_RETRIES), within the same HEARTBEAT_TIMEOUT.

Refused or reset connections, Redis `-LOADING`/`-BUSY`, PostgreSQL `too many clients` or
`starting up`: a moment may cure them, so one refused connection during a restart is not a
missing row for a service that was up. A timeout is never tried again.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import pytest

from conftest import clean_env, cli, init_table, rows
from heartbeatd.heartbeat import REDIS, ProbeResult
from heartbeatd.pg import deadline
from heartbeatd.probes import Checks
from heartbeatd.probes.postgres_connect import PostgresProbe
from heartbeatd.probes.redis_ping import RedisProbe
from proxy import DelayProxy
from servers import PgServer, RedisServer

TIMEOUT = 2.0


@pytest.mark.parametrize("retries", ["1", "0"])
def test_a_reset_first_connection_is_tried_again_and_recorded_up(pg: PgServer, redis_server: RedisServer,
                                                                 retries: str) -> None:
    init_table(pg)
    redis_proxy = DelayProxy("127.0.0.1", redis_server.port, 0.0)
    pg_proxy = DelayProxy("127.0.0.1", pg.port, 0.0)
    redis_proxy.reset = pg_proxy.reset = 1
    try:
        env = clean_env(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{pg_proxy.port}/{pg.dbname}",  # type: ignore[attr-defined]
                        REDIS_URL=f"redis://127.0.0.1:{redis_proxy.port}/0", HEARTBEAT_TIMEOUT=str(TIMEOUT),
                        HEARTBEAT_RETRIES=retries)
        result = cli(["once"], env)
    finally:
        redis_proxy.close()
        pg_proxy.close()
    written = {r[0] for r in rows(pg)}
    if retries == "1":
        assert result.returncode == 0, result.stdout + result.stderr
        assert written == {"后端", "redis", "postgres"}
        assert "服务重试成功 - 服务: redis, IP: 127.0.0.1 (the first attempt failed: " in result.stderr
        assert "服务重试成功 - 服务: postgres, IP: 127.0.0.1 (the first attempt failed: " in result.stderr
        assert redis_proxy.accepted == 2 and pg_proxy.accepted == 2
    else:
        # HEARTBEAT_RETRIES=0: the reset counts. PostgreSQL down means no rows at all (spool off in once).
        assert result.returncode != 0
        assert written == set()
        assert "Redis连接测试失败: " in result.stderr and "数据库连接测试失败: " in result.stderr
        assert "服务重试成功" not in result.stderr
        assert redis_proxy.accepted == 1 and pg_proxy.accepted == 1


def test_a_redis_restarted_between_attempts_is_up(redis_own: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    redis_own.stop()
    probe = RedisProbe(redis_own.url(), TIMEOUT)
    checks = Checks(TIMEOUT, 1, sleep=lambda _s: redis_own.start())  # the pause: Redis comes back
    try:
        with caplog.at_level(logging.INFO, logger="heartbeatd"):
            result = checks.run(probe, {}, {})
    finally:
        probe.close()
    assert result.ok and result.ip == "127.0.0.1", result
    assert checks.retried == {REDIS: 1}
    lines = [r.getMessage() for r in caplog.records if "服务重试成功" in r.getMessage()]
    assert lines == ["服务重试成功 - 服务: redis, IP: 127.0.0.1 (the first attempt failed: Connection refused)"]


def test_redis_still_refusing_after_the_retries_is_down_with_the_reason(redis_own: RedisServer) -> None:
    redis_own.stop()
    probe = RedisProbe(redis_own.url(), TIMEOUT)
    pauses: list[float] = []
    checks = Checks(TIMEOUT, 3, sleep=pauses.append)
    result = checks.run(probe, {}, {})
    probe.close()
    assert not result.ok and result.error == "Connection refused" and result.retry
    assert pauses == [checks.pause] * 3 and checks.retried == {REDIS: 3}


def let_one_go(held: list[Any]) -> None:
    """The pause: a client goes away, as a pool's idle connection does. Its server process frees its slot
    as it exits, after the client has closed: wait until it is gone or a zombie, or the retry may come
    first and meet "too many clients" again (it did, once, in CI)."""
    conn = held.pop()
    pid = conn.get_backend_pid()
    conn.close()
    stat = Path(f"/proc/{pid}/stat")
    give_up = time.monotonic() + TIMEOUT
    while time.monotonic() < give_up:
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.005)
    raise AssertionError(f"the server process {pid} did not exit after its client closed")


def test_too_many_clients_is_tried_again(tmp_path: Path) -> None:
    server = PgServer()
    server.extra_opts = " -c max_connections=2 -c superuser_reserved_connections=0"
    server.start()
    held = [server.connect(), server.connect()]
    try:
        probe = PostgresProbe(server.url(), TIMEOUT)
        first = probe.check()
        assert not first.ok and "too many clients" in (first.error or "") and first.retry, first
        checks = Checks(TIMEOUT, 1, sleep=lambda _s: let_one_go(held))
        with deadline(TIMEOUT + 1):
            result = checks.run(probe, {}, {})
        assert result.ok, result
        probe.close()
    finally:
        for conn in held:
            conn.close()
        server.destroy()


def test_a_timeout_is_never_tried_again(redis_own: RedisServer) -> None:
    redis_own.freeze()
    try:
        probe = RedisProbe(redis_own.url(), 0.5)
        checks = Checks(0.5, 3, sleep=lambda _s: pytest.fail("a timeout was retried"))
        started = time.monotonic()
        result = checks.run(probe, {}, {})
        took = time.monotonic() - started
        probe.close()
    finally:
        redis_own.thaw()
    assert not result.ok and result.error == "timed out after 0.5s" and not result.retry
    assert checks.retried == {} and took < 0.5 + 0.5


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class AlwaysRefused:
    """Fails fast every time, costing `cost` seconds of the fake clock; records the deadlines it was given."""

    service = REDIS

    def __init__(self, clock: Clock, cost: float, ok_after: Optional[int] = None) -> None:
        self.clock, self.cost, self.ok_after = clock, cost, ok_after
        self.untils: list[float] = []

    def check(self, found: Any, until: float) -> ProbeResult:
        self.untils.append(until)
        self.clock.now += self.cost
        ok = self.ok_after is not None and len(self.untils) > self.ok_after
        return ProbeResult(REDIS, "10.0.0.2", ok, self.cost, None if ok else "Connection refused", retry=not ok)

    def close(self) -> None:
        pass


def test_retries_share_one_deadline_and_stop_when_the_pause_no_longer_fits() -> None:
    clock = Clock()

    def sleep(seconds: float) -> None:
        clock.now += seconds

    probe = AlwaysRefused(clock, cost=0.3)
    checks = Checks(1.0, 5, clock=clock, sleep=sleep)  # pause 0.1 s
    result = checks.run(probe, {}, {})
    # 0.3, +0.1+0.3 = 0.7, +0.1+0.3 = 1.1 > 1.0 would not fit: the third attempt starts at 0.8 < 0.9.
    assert probe.untils == [1001.0] * 3
    assert not result.ok and checks.retried == {REDIS: 2}
    assert clock.now - 1000.0 <= 1.0 + probe.cost  # no attempt starts after the deadline less the pause


def test_a_success_on_retry_is_told_once_a_minute_at_most(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    checks = Checks(5.0, 1, clock=clock, sleep=lambda _s: None)
    with caplog.at_level(logging.INFO, logger="heartbeatd"):
        for _ in range(3):
            assert checks.run(AlwaysRefused(clock, 0.0, ok_after=1), {}, {}).ok
            clock.now += 10
        clock.now += 40
        assert checks.run(AlwaysRefused(clock, 0.0, ok_after=1), {}, {}).ok
    lines = [r.getMessage() for r in caplog.records if "服务重试成功" in r.getMessage()]
    assert len(lines) == 2 and lines[1].endswith("; 2 more success(es) on retry since the last line)"), lines
    assert checks.retried == {REDIS: 4}


def test_heartbeat_retries_is_checked(tmp_path: Path) -> None:
    for bad in ("6", "-1", "one", "1.5"):
        result = cli(["check-config"], clean_env(HEARTBEAT_RETRIES=bad))
        assert result.returncode == 78
        assert result.stderr.strip().endswith(f"HEARTBEAT_RETRIES: must be a whole number from 0 to 5, got {bad!r}")
        assert "Traceback" not in result.stderr
    result = cli(["check-config"], clean_env(HEARTBEAT_RETRIES="0"))
    assert "HEARTBEAT_RETRIES=0" in result.stdout, result.stdout + result.stderr



def test_a_retry_that_ends_otherwise_keeps_the_first_failure_in_its_line() -> None:
    """Refused, then out of time on the retry: the line says both, the refusal first."""
    clock = Clock()

    class RefusedThenTimedOut(AlwaysRefused):
        def check(self, found: Any, until: float) -> ProbeResult:
            if not self.untils:
                return super().check(found, until)
            self.untils.append(until)
            clock.now = until
            return ProbeResult(REDIS, "10.0.0.2", False, 0.5, "timed out after 1s")

    probe = RefusedThenTimedOut(clock, cost=0.1)
    result = Checks(1.0, 1, clock=clock, sleep=lambda s: None).run(probe, {}, {})
    assert not result.ok and result.error == "Connection refused (tried again: timed out after 1s)"
