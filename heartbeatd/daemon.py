"""The loop: signals, a fixed-rate monotonic schedule, one cycle of checks and writes, watchdog."""

from __future__ import annotations

import logging
import math
import queue
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Optional, Protocol, Sequence

from heartbeatd.config import Config, ConfigError
from heartbeatd.notify import Notifier
from heartbeatd.probes import POSTGRES, REDIS, ProbeResult, Row, utcnow
from heartbeatd.spool import SpoolUnavailable
from heartbeatd.writer import WriteError

log = logging.getLogger(__name__)

REPLAY_BATCH = 500  # rows per backfill statement: one short transaction, well within the timeout
REPEAT_EVERY = 60.0  # seconds between repeats of the same failure in the log
FAILURE_LINES = {REDIS: "Redis连接测试失败: %s", POSTGRES: "数据库连接测试失败: %s"}


class RedisCheck(Protocol):
    def check(self) -> ProbeResult: ...
    def close(self) -> None: ...


class PostgresCheck(Protocol):
    def check(self) -> tuple[ProbeResult, Optional[Any]]: ...


class RowWriter(Protocol):
    def write(self, conn: Any, rows: Sequence[Row], dedupe: bool = False) -> None: ...


class RowSpool(Protocol):
    count: int
    max_rows: int
    def append(self, rows: Sequence[Row]) -> int: ...
    def oldest(self, limit: int) -> list[tuple[int, Row]]: ...
    def delete(self, ids: Sequence[int]) -> None: ...
    def close(self) -> None: ...


@dataclass
class Services:
    """What a cycle talks to, built from one Config (and rebuilt on reload)."""

    redis: RedisCheck
    postgres: PostgresCheck
    backend: Callable[[Optional[str]], ProbeResult]
    writer: RowWriter
    spool: Optional[RowSpool]

    def close(self) -> None:
        """Drop kept connections and files."""
        self.redis.close()
        if self.spool is not None:
            self.spool.close()


@dataclass
class CycleOutcome:
    """What one cycle found and did."""

    results: list[ProbeResult]
    recorded: list[Row] = field(default_factory=list)
    spooled: list[Row] = field(default_factory=list)
    write_error: Optional[str] = None

    @property
    def all_up(self) -> bool:
        """Every service answered."""
        return all(r.ok for r in self.results)

    def summary(self) -> str:
        """`后端 up, redis up, postgres down`."""
        return ", ".join(f"{r.service} {'up' if r.ok else 'down'}" for r in self.results)


@dataclass
class _Failure:
    text: str  # the message as last logged
    logged_at: float  # monotonic time it was last logged
    unlogged: int = 0  # repeats since then
    total: int = 1  # times in a row, across changes of message


class Repeats:
    """Logs a failure when it starts or changes, then at most once a minute with a count."""

    def __init__(self, clock: Callable[[], float], every: float = REPEAT_EVERY) -> None:
        self._clock = clock
        self._every = every
        self._state: dict[str, _Failure] = {}

    def failed(self, key: str, level: int, msg: str, *args: Any, traceback: bool = False) -> None:
        """Log this failure unless the same one was logged less than a minute ago."""
        now, text = self._clock(), msg % args
        state = self._state.get(key)
        if state is None or state.text != text:
            # A traceback only when the failure starts: never the same one every 30 s.
            log.log(level, msg, *args, exc_info=traceback)
            self._state[key] = _Failure(text, now, total=state.total + 1 if state else 1)
            return
        state.unlogged += 1
        state.total += 1
        if now - state.logged_at >= self._every:
            log.log(level, msg + " (repeated %d times in the last %.0fs)", *args, state.unlogged, now - state.logged_at)
            state.logged_at, state.unlogged = now, 0

    def cleared(self, key: str) -> int:
        """Forget a failure; return how many times in a row it had happened (0 if it had not)."""
        state = self._state.pop(key, None)
        return state.total if state else 0


class Daemon:
    """A single-process daemon with a blocking, signal-aware nap between fixed-rate cycles."""

    def __init__(
        self,
        config: Config,
        build: Callable[[Config], Services],
        notifier: Notifier,
        reload_config: Optional[Callable[[], Config]] = None,
        on_config: Callable[[Config], None] = lambda c: None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = utcnow,
    ) -> None:
        self.config = config
        self._build = build
        self.services = build(config)
        self.notifier = notifier
        self._reload_config = reload_config
        self._on_config = on_config
        self._clock = clock
        self._wall = wall
        self._events: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._repeats = Repeats(clock)
        self._next = clock()  # monotonic time of the next cycle start

    # -- one cycle -----------------------------------------------------------------------

    def _alive(self) -> None:
        self.notifier.watchdog()

    def run_cycle(self) -> CycleOutcome:
        """Check the three services, write the healthy ones' rows (or spool them), log."""
        report_time = self._wall()
        services = self.services
        redis_result = services.redis.check()
        self._alive()
        pg_result, conn = services.postgres.check()
        self._alive()
        outcome = CycleOutcome([services.backend(pg_result.ip), redis_result, pg_result])
        self._log_probes(outcome.results)
        rows = [Row(r.service, r.ip, report_time) for r in outcome.results if r.ok]
        try:
            if conn is not None:
                self._replay(conn)
                services.writer.write(conn, rows)
                outcome.recorded = rows
        except WriteError as exc:
            outcome.write_error = str(exc)
        finally:
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - closing a broken connection must not end the cycle
                    pass
        self._alive()
        for row in outcome.recorded:
            log.info("记录心跳成功 - 服务: %s, IP: %s", row.service, row.ip)
        if not outcome.recorded:
            self._keep(outcome, rows)
        else:
            self._repeats.cleared("spool")
            if self._repeats.cleared("write"):
                log.warning("心跳写入恢复 - table %s accepts rows again", ".".join(self.config.table))
        return outcome

    def _log_probes(self, results: Sequence[ProbeResult]) -> None:
        for result in results:
            key = f"down:{result.service}"
            if result.ok:
                times = self._repeats.cleared(key)
                self._repeats.cleared(f"error:{result.service}")
                if times:
                    log.warning("服务恢复 - 服务: %s, IP: %s (down for %d check(s))", result.service, result.ip, times)
                continue
            self._repeats.failed(key, logging.WARNING, "服务不可用 - 服务: %s, IP: %s", result.service, result.ip)
            line = FAILURE_LINES.get(result.service)
            if line:
                self._repeats.failed(f"error:{result.service}", logging.ERROR, line, result.error)

    def _replay(self, conn: Any) -> None:
        """Write the spooled backlog, oldest first, in batches, within a bounded share of the cycle."""
        spool = self.services.spool
        if spool is None or spool.count == 0:
            return
        budget_end = self._clock() + max(self.config.timeout, self.config.interval / 2)
        while spool.count and self._clock() < budget_end:
            try:
                batch = spool.oldest(REPLAY_BATCH)
            except SpoolUnavailable as exc:  # set aside and started anew: nothing left to replay
                log.error("心跳缓存错误 - %s", exc)
                return
            if not batch:
                break
            rows = [row for _, row in batch]
            self.services.writer.write(conn, rows, dedupe=True)
            try:
                spool.delete([i for i, _ in batch])
            except SpoolUnavailable as exc:  # the rows are in the table; a later replay skips them
                log.error("心跳缓存错误 - %s", exc)
            log.info(
                "补写心跳 - %d row(s) from the spool, report_time %s .. %s, %d left",
                len(rows), _naive(rows[0].report_time), _naive(rows[-1].report_time), spool.count,
            )
            self._alive()

    def _keep(self, outcome: CycleOutcome, rows: list[Row]) -> None:
        """Rows that did not reach the table go to the spool (when there is one)."""
        why = outcome.write_error or "PostgreSQL unavailable"
        spool = self.services.spool
        if outcome.write_error:
            self._repeats.failed("write", logging.ERROR, "记录心跳失败 - %s", outcome.write_error)
        if not rows:
            return
        if spool is None:  # `once`: nothing is spooled, its output says "not recorded"
            return
        try:
            dropped = spool.append(rows)
        except SpoolUnavailable as exc:
            log.error("心跳缓存错误 - %d row(s) lost: %s", len(rows), exc)
            return
        outcome.spooled = rows
        if dropped:
            log.warning(
                "心跳缓存已满 - dropped the %d oldest row(s) (HEARTBEAT_SPOOL_MAX_ROWS=%d)", dropped, spool.max_rows
            )
        self._repeats.failed(
            "spool", logging.WARNING, "心跳已缓存 - rows kept in the local spool until PostgreSQL accepts them (%s)", why
        )

    def safe_cycle(self) -> Optional[CycleOutcome]:
        """run_cycle, but a bug in it is logged and the loop goes on."""
        try:
            outcome = self.run_cycle()
        except Exception as exc:  # noqa: BLE001 - the daemon must survive its own bugs
            self._repeats.failed("bug", logging.ERROR, "心跳周期异常 - unexpected error in a cycle: %s", exc,
                                 traceback=True)
            return None
        self._repeats.cleared("bug")
        return outcome

    # -- the loop --------------------------------------------------------------------------

    def _nap(self) -> bool:
        """Sleep until the next start, pinging the watchdog and handling signals; False means stop."""
        while True:
            remaining = self._next - self._clock()
            if remaining <= 0:
                return True
            due = self.notifier.watchdog_due_in()
            wait = remaining if due is None else min(remaining, due)
            try:
                signum = self._events.get(timeout=wait)
            except queue.Empty:
                if due is not None and due <= remaining:
                    self._alive()
                continue
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.notifier.stopping()
                log.info("停止服务心跳检查定时任务 (%s)", signal.Signals(signum).name)
                return False
            if signum == signal.SIGHUP:
                self.reload()

    def reload(self) -> None:
        """Re-read the configuration; a bad one is logged and the old one kept."""
        self.notifier.reloading()
        try:
            if self._reload_config is None:
                raise ConfigError(["nothing to reload from"])
            new = self._reload_config()
            services = self._build(new)
        except (ConfigError, SpoolUnavailable) as exc:
            log.error("重新加载配置失败 - keeping the old configuration: %s", exc)
        else:
            self.services.close()
            self.services, self.config = services, new
            self._on_config(new)
            # A shorter new interval takes effect now, not after the old one has run out.
            self._next = min(self._next, self._clock() + new.interval)
            log.info("配置已重新加载 - interval %gs, timeout %gs", new.interval, new.timeout)
        self.notifier.ready()

    def request(self, signum: int) -> None:
        """Signal handler: only enqueue (no lock, no logging in a handler)."""
        self._events.put_nowait(signum)

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit status."""
        # Kept until the process exits: a second SIGTERM during shutdown must not kill it mid-close.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda n, _f: self.request(n))
        log.info("启动服务心跳检查定时任务...")
        self.notifier.ready(status="started; first check now")
        self._next = self._clock()
        try:
            while self._nap():
                started = self._clock()
                outcome = self.safe_cycle()
                self._next = self._next_start(self._next, started)
                left = max(0.0, self._next - self._clock())
                summary = outcome.summary() if outcome else "cycle failed"
                backlog = self.services.spool.count if self.services.spool else 0
                self.notifier.status(
                    f"{summary}; next in {left:.3g}s" + (f"; {backlog} spooled" if backlog else "")
                )
        finally:
            self.services.close()
        return 0

    def _next_start(self, scheduled: float, started: float) -> float:
        """Fixed rate from the schedule, not from when the cycle ended; skip missed starts."""
        interval = self.config.interval
        following = scheduled + interval
        now = self._clock()
        if now > following:
            missed = math.floor((now - following) / interval) + 1
            log.warning(
                "心跳周期超时 - a cycle took %.2fs, longer than HEARTBEAT_INTERVAL=%gs; skipping %d start(s)",
                now - started, interval, missed,
            )
            following += missed * interval
        return following


def _naive(value: datetime) -> str:
    return value.astimezone(timezone.utc).replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")
