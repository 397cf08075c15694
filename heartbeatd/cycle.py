"""One cycle: run each probe, write the healthy ones' rows, spool what cannot be written."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Optional, Sequence

from heartbeatd.config import Config
from heartbeatd.delivery import Delivery, Loop, RowSpool, RowWriter
from heartbeatd.heartbeat import BACKEND, POSTGRES, REDIS, SERVICES, ProbeResult, Row, rows_of, utcnow
from heartbeatd.pg import close_quietly
from heartbeatd.probes import Checks, Probe, close_all
from heartbeatd.repeats import Repeats, log
from heartbeatd.writer import WriteError

FAILURE_LINES = {BACKEND: "后端检查失败: %s", REDIS: "Redis连接测试失败: %s", POSTGRES: "数据库连接测试失败: %s"}


@dataclass
class Services:
    """What a cycle talks to, built from one Config (and rebuilt on reload)."""

    probes: list[Probe]
    writer: RowWriter
    spool: Optional[RowSpool]

    def close(self, keep_spool: bool = False) -> None:
        """Drop kept connections and files (the spool stays open when the next Services reuse it)."""
        close_all(self.probes)
        if self.spool is not None and not keep_spool:
            self.spool.close()


class NoLoop:
    """A cycle run by itself (`heartbeatd once`): no watchdog, no signals, no schedule."""

    def alive(self) -> None:
        """Nothing to tell."""

    def stop_pending(self) -> bool:
        """Never asked to stop."""
        return False

    def replay_until(self) -> float:
        """No next cycle to leave room for."""
        return float("inf")


@dataclass
class CycleOutcome:
    """What one cycle found and did."""

    results: list[ProbeResult]
    recorded: list[Row] = field(default_factory=list)
    spooled: list[Row] = field(default_factory=list)
    rejected: list[tuple[Row, str]] = field(default_factory=list)  # refused by the table, with its reason
    write_error: Optional[str] = None
    report_time: Optional[datetime] = None  # the cycle's rows' report_time

    @property
    def all_up(self) -> bool:
        """Every service answered."""
        return all(r.ok for r in self.results)

    def summary(self) -> str:
        """`后端 up, redis up, postgres down`."""
        return ", ".join(f"{r.service} {'up' if r.ok else 'down'}" for r in self.results)


class Cycle:
    """Probes, a writer and a spool, composed: `run()` is one cycle."""

    def __init__(self, config: Config, services: Services, loop: Loop = NoLoop(), repeats: Optional[Repeats] = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], datetime] = utcnow,
                 last_ip: Optional[dict[str, str]] = None) -> None:
        self.config, self.services, self.loop = config, services, loop
        self.repeats = repeats or Repeats(clock)
        self._clock, self._wall = clock, wall
        # Each service's address in its last result: what a check that raised is shown with.
        self.last_ip = last_ip if last_ip is not None else {}
        self.delivery = Delivery(config, services.writer, services.spool, loop, self.repeats, clock)
        self.checks = Checks(config.timeout, config.retries, clock, interval=config.interval)
        # The probe whose connection the rows are written on (PostgreSQL's).
        self._source: Any = next((p for p in services.probes if hasattr(p, "take_connection")), None)
        # The order results are shown in: SERVICES' order, then any other check's in running order.
        names = [p.service for p in services.probes]
        self._shown = [s for s in SERVICES if s in names] + [s for s in names if s not in SERVICES]

    def _probe_all(self) -> list[ProbeResult]:
        """Each probe in turn (a later one may use an earlier one's result); stops early on SIGTERM."""
        found: dict[str, ProbeResult] = {}
        last_ip, alive, stop_pending, run = self.last_ip, self.loop.alive, self.loop.stop_pending, self.checks.run
        for probe in self.services.probes:
            if found and stop_pending():
                break
            result = run(probe, found, last_ip)
            found[result.service] = result
            alive()
        for result in found.values():
            last_ip[result.service] = result.ip
        if len(found) == len(self._shown):
            return [found[s] for s in self._shown]
        return [found[s] for s in self._shown if s in found]

    def run(self) -> CycleOutcome:
        """Check the services, write the healthy ones' rows (or spool them), log.

        A pending SIGTERM is seen between steps: the remaining ones are skipped (a service not
        asked gets no row) and what was found is spooled, so shutdown waits for one step at most.
        """
        self.loop.alive()  # the nap may have ended just before a ping was due
        report_time = self._wall()
        outcome = CycleOutcome(self._probe_all(), report_time=report_time)
        conn = self._source.take_connection() if self._source is not None else None
        if conn is not None and self.loop.stop_pending():
            close_quietly(conn)
            conn = None
        self._log_probes(outcome.results)
        rows = rows_of(outcome.results, report_time)
        delivery = self.delivery
        try:
            if conn is not None:
                delivery.write_cycle(conn, rows, outcome.recorded, outcome.rejected)
        except WriteError as exc:
            outcome.write_error = str(exc)
            self.repeats.failed("write", logging.ERROR, "记录心跳失败 - %s", exc, kind=exc.kind)
        finally:
            if conn is not None:
                close_quietly(conn)
        self.loop.alive()
        for row in outcome.recorded:
            log.info("记录心跳成功 - 服务: %s, IP: %s", row.service, row.ip)
        if outcome.recorded and not outcome.write_error and self.repeats.end("write", None):
            log.warning("心跳写入恢复 - table %s accepts rows again", delivery.table)
        if len(outcome.recorded) == len(rows):
            kept: list[Row] = []  # the usual cycle: every row written
        else:
            done = {id(r) for r in outcome.recorded} | {id(r) for r, _ in outcome.rejected}
            kept = [r for r in rows if id(r) not in done]
        if kept:
            outcome.spooled = delivery.keep(kept, outcome.write_error)
        delivery.finish(kept, outcome.recorded)
        return outcome

    def _log_probes(self, results: Sequence[ProbeResult]) -> None:
        repeats = self.repeats
        failing = repeats.failing
        for result in results:
            if result.ok and not failing:
                continue  # the usual cycle: nothing was failing, nothing to end
            key, error_key = f"down:{result.service}", f"error:{result.service}"
            if result.ok:
                failure = repeats.end(key, None)
                repeats.end(error_key, None)
                if failure:
                    log.warning("服务恢复 - 服务: %s, IP: %s (down for %d check(s))", result.service, result.ip,
                                failure.total)
                continue
            repeats.failed(key, logging.WARNING, "服务不可用 - 服务: %s, IP: %s", result.service, result.ip)
            line = FAILURE_LINES.get(result.service, "检查失败: %s")
            # The same failure, whatever the figures in it (a time-out's share, a row count).
            kind = re.sub(r"[0-9.]+", "#", result.error or "")
            repeats.failed(error_key, logging.ERROR, line, result.error, kind=kind)

    def close(self, keep_spool: bool = False) -> None:
        """Close what the cycle's services keep open."""
        self.services.close(keep_spool)
