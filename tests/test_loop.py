"""The loop's logic with an injected clock and fake services (real servers are covered elsewhere)."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import pytest

from heartbeatd.config import load
from heartbeatd.cycle import Services
from heartbeatd.daemon import Daemon
from heartbeatd.notify import Notifier, watchdog_period
from heartbeatd.repeats import Repeats
from heartbeatd.heartbeat import BACKEND, POSTGRES, REDIS, ProbeResult, Row
from heartbeatd.spool import Spool
from heartbeatd.writer import Refusal, WriteError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeRedis:
    service = REDIS

    def __init__(self, clock: Clock, cost: float = 0.0) -> None:
        self.clock, self.cost, self.ok = clock, cost, True

    def check(self, found: Any = None, until: Any = None) -> ProbeResult:
        self.clock.now += self.cost
        return ProbeResult(REDIS, "10.0.0.2", self.ok, self.cost, None if self.ok else "Connection refused")

    def close(self) -> None:
        pass


class FakeConn:
    closed = False

    def close(self) -> None:
        self.closed = True


class FakePostgres:
    service = POSTGRES

    def __init__(self) -> None:
        self.ok = True
        self.conns: list[FakeConn] = []
        self._conn: Optional[FakeConn] = None

    def check(self, found: Any = None, until: Any = None) -> ProbeResult:
        if not self.ok:
            return ProbeResult(POSTGRES, "10.0.0.3", False, 0.0, "Connection refused")
        self._conn = FakeConn()
        self.conns.append(self._conn)
        return ProbeResult(POSTGRES, "10.0.0.3", True, 0.0)

    def take_connection(self) -> Optional[FakeConn]:
        conn, self._conn = self._conn, None
        return conn

    def close(self) -> None:
        pass


class FakeBackend:
    service = BACKEND

    def __init__(self) -> None:
        self.broken = False

    def check(self, found: Any = None, until: Any = None) -> ProbeResult:
        if self.broken:
            raise ZeroDivisionError("bug")
        return ProbeResult(BACKEND, "10.0.0.1", True, 0.0)

    def close(self) -> None:
        pass


class FakeWriter:
    def __init__(self) -> None:
        self.written: list[tuple[Row, bool]] = []
        self.error: Optional[str] = None
        self.inserted = 0

    def write(self, conn: Any, rows: Sequence[Row], dedupe: bool = False) -> None:
        if self.error:
            raise WriteError(self.error)
        self.written += [(r, dedupe) for r in rows]
        self.inserted += len(rows)

    def judge(self, conn: Any, row: Row) -> Optional[Refusal]:
        """As Writer.judge, for a table that takes any row but one it refuses (no witness to hold still)."""
        try:
            self.write(conn, [row], dedupe=True)
        except WriteError as exc:
            if not exc.data_error:
                raise
            return Refusal(str(exc), row_at_fault=True)
        return None


def make(tmp_path: Path, clock: Clock, interval: str = "30", cost: float = 0.0, spool: bool = True,
         writer: Optional[FakeWriter] = None) -> Daemon:
    config = load({"HEARTBEAT_INTERVAL": interval, "HEARTBEAT_SPOOL_PATH": str(tmp_path / "s.db")}, cwd=tmp_path)
    redis, pg, backend = FakeRedis(clock, cost), FakePostgres(), FakeBackend()
    the_writer = writer or FakeWriter()
    wall = [datetime(2026, 1, 1, tzinfo=timezone.utc)]

    def build(c: Any, previous: Optional[Services] = None) -> Services:
        return Services([redis, pg, backend], the_writer, Spool(c.spool_path, c.spool_max_rows) if spool else None)

    def tick() -> datetime:
        wall[0] = wall[0].replace(second=(wall[0].second + 1) % 60)
        return wall[0]

    return Daemon(config, build, Notifier({}), clock=clock, wall=tick)


def test_fixed_rate_schedule_does_not_drift(tmp_path: Path) -> None:
    clock = Clock()
    daemon = make(tmp_path, clock, interval="30", cost=4.0)
    starts = []
    following = clock.now
    for _ in range(5):
        clock.now = following
        starts.append(clock.now)
        daemon.run_cycle()  # takes 4 s of the clock
        following = daemon._next_start(following, starts[-1])
    assert [b - a for a, b in zip(starts, starts[1:])] == [30.0] * 4


def test_overrun_skips_missed_starts_instead_of_bursting(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    daemon = make(tmp_path, clock, interval="10", cost=25.0)
    scheduled = clock.now
    daemon.run_cycle()  # 25 s: the starts at +10 and +20 are missed
    with caplog.at_level(logging.WARNING):
        following = daemon._next_start(scheduled, scheduled)
    assert following == scheduled + 30
    assert "skipping 2 start(s)" in caplog.text


def test_rows_of_a_cycle_and_connection_closed(tmp_path: Path) -> None:
    clock = Clock()
    daemon = make(tmp_path, clock)
    outcome = daemon.run_cycle()
    writer = daemon.services.writer
    assert isinstance(writer, FakeWriter)
    assert [(r.service, r.ip, d) for r, d in writer.written] == [
        (BACKEND, "10.0.0.1", False), (REDIS, "10.0.0.2", False), (POSTGRES, "10.0.0.3", False)]
    assert len({r.report_time for r, _ in writer.written}) == 1
    assert outcome.recorded and not outcome.spooled
    pg = daemon.services.probes[1]
    assert isinstance(pg, FakePostgres) and all(c.closed for c in pg.conns)


def test_postgres_down_spools_then_backfills_oldest_first(tmp_path: Path) -> None:
    clock = Clock()
    daemon = make(tmp_path, clock)
    pg, writer = daemon.services.probes[1], daemon.services.writer
    assert isinstance(pg, FakePostgres) and isinstance(writer, FakeWriter)
    pg.ok = False
    first = daemon.run_cycle()
    second = daemon.run_cycle()
    assert [r.service for r in first.spooled + second.spooled] == [BACKEND, REDIS] * 2
    assert daemon.services.spool is not None and daemon.services.spool.count == 4
    pg.ok = True
    third = daemon.run_cycle()
    replayed = [(r, d) for r, d in writer.written if d]
    assert [r.report_time for r, _ in replayed] == sorted(r.report_time for r in first.spooled + second.spooled)
    assert [r for r, d in writer.written if not d] == third.recorded
    assert daemon.services.spool.count == 0


def test_a_check_that_raises_is_that_checks_failure_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    daemon = make(tmp_path, clock)

    backend = daemon.services.probes[2]
    assert isinstance(backend, FakeBackend)
    backend.broken = True
    with caplog.at_level(logging.ERROR):
        outcome = daemon.safe_cycle()
    assert outcome is not None and [(r.service, r.ok) for r in outcome.results] == [
        (BACKEND, False), (REDIS, True), (POSTGRES, True)]
    assert outcome.results[0].error == "internal error in the check: ZeroDivisionError: bug"
    assert [r.service for r in outcome.recorded] == [REDIS, POSTGRES]
    pg = daemon.services.probes[1]
    assert isinstance(pg, FakePostgres) and all(c.closed for c in pg.conns)
    assert "后端检查失败: internal error in the check: ZeroDivisionError: bug" in caplog.text


def test_unexpected_exception_in_a_cycle_is_logged_and_survived(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    daemon = make(tmp_path, clock)

    def broken(conn: Any, rows: Sequence[Row], dedupe: bool = False) -> None:
        raise ZeroDivisionError("bug")  # outside every check: the cycle itself fails, the loop goes on

    daemon.services.writer.write = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR):
        for _ in range(5):
            assert daemon.safe_cycle() is None
            clock.now += 1
    assert caplog.text.count("Traceback") == 1
    assert caplog.text.count("心跳周期异常") == 1  # repeats wait a minute
    clock.now += 61
    with caplog.at_level(logging.ERROR):
        daemon.safe_cycle()
    assert "repeated 5 times in the last" in caplog.text


def test_repeats_logs_change_of_state_then_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    repeats = Repeats(clock)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            repeats.failed("k", logging.WARNING, "服务不可用 - 服务: %s, IP: %s", "redis", "10.0.0.2")
            clock.now += 30
        repeats.failed("k", logging.WARNING, "服务不可用 - 服务: %s, IP: %s", "redis", "10.0.0.2")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["服务不可用 - 服务: redis, IP: 10.0.0.2",
                        "服务不可用 - 服务: redis, IP: 10.0.0.2 (repeated 2 times in the last 60s)"]
    assert repeats.cleared("k") == 4
    assert repeats.cleared("k") == 0


def test_watchdog_period_honours_pid() -> None:
    assert watchdog_period({"WATCHDOG_USEC": "30000000"}, pid=42) == 15.0
    assert watchdog_period({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, pid=42) == 15.0
    assert watchdog_period({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "41"}, pid=42) is None
    assert watchdog_period({}, pid=42) is None


class FixedMidAttempt(FakeWriter):
    """A table that refuses every row until its second statement: fixed while the cycle writes."""

    def __init__(self) -> None:
        super().__init__()
        self.statements = 0

    def write(self, conn: Any, rows: Sequence[Row], dedupe: bool = False) -> None:
        self.statements += 1
        if self.statements <= 2:
            raise WriteError('null value in column "host" violates not-null constraint', "23502")
        super().write(conn, rows, dedupe)


def test_a_row_refused_before_the_table_was_fixed_is_tried_again_not_set_aside(tmp_path: Path) -> None:
    clock = Clock()
    writer = FixedMidAttempt()
    daemon = make(tmp_path, clock, writer=writer)
    outcome = daemon.run_cycle()  # 3 rows refused, split: 后端 refused, then (fixed) redis + postgres taken
    assert [r.service for r in outcome.recorded] == [REDIS, POSTGRES, BACKEND]
    assert outcome.rejected == [] and daemon.services.spool is not None and daemon.services.spool.rejected == 0
