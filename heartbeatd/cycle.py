"""One cycle: probe the three services, write the healthy ones' rows, spool what cannot be written."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Optional, Protocol, Sequence, TypeVar

from heartbeatd.config import Config
from heartbeatd.probes import BACKEND, LOOPBACK, POSTGRES, REDIS, ProbeResult, Row, naive_utc
from heartbeatd.spool import SpoolWriteFailed
from heartbeatd.writer import Batch, Refused, WriteError, write_split

# Operators grep for `heartbeatd.daemon:` in these lines (the README's failure table): the name stays.
log = logging.getLogger("heartbeatd.daemon")

REPLAY_BATCH = 500  # rows per backfill statement: one short transaction, well within the timeout
REPEAT_EVERY = 60.0  # seconds between repeats of the same failure in the log
FAILURE_LINES = {BACKEND: "后端检查失败: %s", REDIS: "Redis连接测试失败: %s", POSTGRES: "数据库连接测试失败: %s"}

T = TypeVar("T")


class RedisCheck(Protocol):
    def check(self) -> ProbeResult: ...
    def close(self) -> None: ...


class PostgresCheck(Protocol):
    def check(self) -> tuple[ProbeResult, Optional[Any]]: ...


class RowWriter(Protocol):
    inserted: int  # rows inserted so far (a deduplicated replay of rows already there inserts none)
    def write(self, conn: Any, rows: Sequence[Row], dedupe: bool = False) -> None: ...


class RowSpool(Protocol):
    rejected: int
    max_rows: int
    write_error: Optional[str]
    @property
    def count(self) -> int: ...
    @property
    def in_memory(self) -> int: ...
    def append(self, rows: Sequence[Row]) -> int: ...
    def oldest(self, limit: int) -> list[tuple[int, Row]]: ...
    def delete(self, ids: Sequence[int]) -> None: ...
    def reject(self, rejected: Sequence[tuple[int, Row, str]]) -> None: ...
    def refresh(self) -> None: ...
    def close(self) -> None: ...


@dataclass
class Services:
    """What a cycle talks to, built from one Config (and rebuilt on reload)."""

    redis: RedisCheck
    postgres: PostgresCheck
    backend: Callable[[Optional[str]], ProbeResult]
    writer: RowWriter
    spool: Optional[RowSpool]

    def close(self, keep_spool: bool = False) -> None:
        """Drop kept connections and files (the spool stays open when the next Services reuse it)."""
        self.redis.close()
        if self.spool is not None and not keep_spool:
            self.spool.close()


@dataclass
class CycleOutcome:
    """What one cycle found and did."""

    results: list[ProbeResult]
    recorded: list[Row] = field(default_factory=list)
    spooled: list[Row] = field(default_factory=list)
    rejected: list[Row] = field(default_factory=list)
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
    kind: str  # what "the same failure" means: the text, or a stable kind such as an SQLSTATE
    logged_at: float  # monotonic time it was last logged
    unlogged: int = 0  # repeats since then
    total: int = 1  # times in a row, across changes of kind


class Repeats:
    """Logs a failure when it starts or changes kind, then at most once a minute with a count."""

    def __init__(self, clock: Callable[[], float], every: float = REPEAT_EVERY) -> None:
        self._clock = clock
        self._every = every
        self._state: dict[str, _Failure] = {}

    def failed(self, key: str, level: int, msg: str, *args: Any, kind: Optional[str] = None,
               traceback: bool = False) -> None:
        """Log this failure unless one of the same kind was logged less than a minute ago."""
        now = self._clock()
        kind = kind if kind is not None else msg % args
        state = self._state.get(key)
        if state is None or state.kind != kind:
            # A traceback only when the failure starts: never the same one every 30 s.
            log.log(level, msg, *args, exc_info=traceback)
            self._state[key] = _Failure(kind, now, total=state.total + 1 if state else 1)
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


class CycleRunner:
    """The body of the loop; the Daemon supplies configuration, services, clocks and the watchdog."""

    config: Config
    services: Services
    _repeats: Repeats
    _spool_failed_now = False
    _last_ip: dict[str, str]  # each service's address in its last result: a failed check's row of the log
    _clock: Callable[[], float]
    _wall: Callable[[], datetime]

    def _alive(self) -> None:
        """Tell systemd the loop is alive (the Daemon sends WATCHDOG=1)."""

    def _stop_pending(self) -> bool:
        """True once SIGTERM/SIGINT arrived: finish quickly, leave the rest spooled."""
        return False

    def _replay_until(self) -> float:
        """Monotonic time by which backfill should stop so the next cycle starts on time."""
        return float("inf")

    def _spool_failed(self, msg: str, *args: Any, kind: str) -> None:
        """The spool file could not be changed: one line a minute; the episode ends with a cycle without."""
        self._spool_failed_now = True
        self._repeats.failed("spool-write", logging.ERROR, msg, *args, kind=kind)

    def _checked(self, service: str, check: Callable[[], T], failed: Callable[[ProbeResult], T]) -> T:
        """The one boundary of a check: whatever it raises becomes that service's failed result."""
        start = self._clock()
        try:
            return check()
        except Exception as exc:  # noqa: BLE001 - one check's bug must not cost the other services' rows
            log.debug("the %s check raised", service, exc_info=True)
            error = f"internal error in the check: {type(exc).__name__}: {' '.join(str(exc).split())}"
            return failed(ProbeResult(service, self._last_ip.get(service, LOOPBACK), False,
                                      self._clock() - start, error))

    def _probe_all(self) -> tuple[list[ProbeResult], Optional[Any]]:
        """Redis, then PostgreSQL (its connection kept for the writes), then 后端; stops early on SIGTERM."""
        services = self.services
        results = [self._checked(REDIS, services.redis.check, lambda failed: failed)]
        self._alive()
        conn = None
        if not self._stop_pending():
            pg_result, conn = self._checked(POSTGRES, services.postgres.check, lambda failed: (failed, None))
            results.append(pg_result)
            self._alive()
            if not self._stop_pending():
                results.insert(0, self._checked(BACKEND, lambda: services.backend(pg_result.ip), lambda failed: failed))
                self._alive()
        for result in results:
            self._last_ip[result.service] = result.ip
        if conn is not None and self._stop_pending():
            self._close(conn)
            conn = None
        return results, conn

    @staticmethod
    def _close(conn: Any) -> None:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - closing a broken connection must not end the cycle
            pass

    def run_cycle(self) -> CycleOutcome:
        """Check the three services, write the healthy ones' rows (or spool them), log.

        A pending SIGTERM is seen between steps: the remaining ones are skipped (a service not
        asked gets no row) and what was found is spooled, so shutdown waits for one step at most.
        """
        self._alive()  # the nap may have ended just before a ping was due
        report_time = self._wall()
        results, conn = self._probe_all()
        outcome = CycleOutcome(results)
        self._log_probes(outcome.results)
        rows = [Row(r.service, r.ip, report_time) for r in outcome.results if r.ok]
        try:
            if conn is not None:
                self._write_cycle(conn, rows, outcome)
        except WriteError as exc:
            outcome.write_error = str(exc)
            self._repeats.failed("write", logging.ERROR, "记录心跳失败 - %s", exc, kind=exc.kind)
        finally:
            if conn is not None:
                self._close(conn)
        self._alive()
        for row in outcome.recorded:
            log.info("记录心跳成功 - 服务: %s, IP: %s", row.service, row.ip)
        if outcome.recorded and not outcome.write_error and self._repeats.cleared("write"):
            log.warning("心跳写入恢复 - table %s accepts rows again", ".".join(self.config.table))
        done = {id(r) for r in outcome.recorded} | {id(r) for r in outcome.rejected}
        kept = [r for r in rows if id(r) not in done]
        self._keep(outcome, kept)
        if not kept and outcome.recorded:
            self._repeats.cleared("spool")  # the episode is over: the next one starts its own lines
        spool = self.services.spool
        failed_now, self._spool_failed_now = self._spool_failed_now, False
        if spool is not None and not failed_now and not spool.in_memory and spool.write_error is None \
                and self._repeats.cleared("spool-write"):
            log.warning("心跳缓存恢复 - the spool file takes rows again; nothing is held in memory only")
        return outcome

    def _write_cycle(self, conn: Any, rows: list[Row], outcome: CycleOutcome) -> None:
        """The live rows, then the backlog; rows are set aside only if the table took others meanwhile.

        A table that refuses every row (a NOT NULL column added without a default) is the table's
        fault, not the rows': they stay spooled, and WriteError says so once a minute.
        """
        until = self._replay_until()
        # Live rows first: a backlog the table refuses must never hold today's heartbeats back.
        written, refused = self._write(conn, [(0, r) for r in rows], dedupe=False, until=until)
        outcome.recorded = [row for _, row in written]
        self._alive()
        replayed, replay_refused = self._replay(conn, until, first_unsplit=not written)
        taken = bool(written) or replayed
        if not refused:
            if taken and not replay_refused:
                self._repeats.cleared("rejected")  # a cycle that set nothing aside ends the episode
            return
        if not taken:
            why = refused[0][2].split(" DETAIL: ")[0]
            kept = "; the rows stay in the local spool and are tried again every cycle" if self.services.spool else ""
            raise WriteError(f"table {'.'.join(self.config.table)} refuses every row: {why}{kept}",
                             kind=f"refuses every row: {why}")
        late, refused = self._confirm(conn, refused, dedupe=False, until=until)
        outcome.recorded += [row for _, row in late]
        outcome.rejected = self._set_aside(refused) or []

    def _confirm(self, conn: Any, refused: Sequence[Refused], dedupe: bool, until: float
                 ) -> tuple[list[tuple[int, Row]], list[Refused]]:
        """Each refused row tried once more, alone, before it is set aside.

        The table may have been fixed between two statements of the attempt (the column dropped
        after this row was refused and before its neighbour was taken): then the row gets in.
        """
        written: list[tuple[int, Row]] = []
        still: list[Refused] = []
        until = max(until, self._clock() + self.config.timeout)
        for i, row, _ in refused:
            if self._clock() >= until:
                break  # the rest stay where they were (a live row is spooled), tried again next cycle
            ok, bad = self._write(conn, [(i, row)], dedupe=dedupe, until=until)
            written += ok
            still += bad
            self._alive()
        return written, still

    def _log_probes(self, results: Sequence[ProbeResult]) -> None:
        for result in results:
            key, error_key = f"down:{result.service}", f"error:{result.service}"
            if result.ok:
                times = self._repeats.cleared(key)
                self._repeats.cleared(error_key)
                if times:
                    log.warning("服务恢复 - 服务: %s, IP: %s (down for %d check(s))", result.service, result.ip, times)
                continue
            self._repeats.failed(key, logging.WARNING, "服务不可用 - 服务: %s, IP: %s", result.service, result.ip)
            line = FAILURE_LINES.get(result.service, "检查失败: %s")
            # The same failure, whatever the figures in it (a time-out's share, a row count).
            kind = re.sub(r"[0-9.]+", "#", result.error or "")
            self._repeats.failed(error_key, logging.ERROR, line, result.error, kind=kind)

    def _write(self, conn: Any, batch: Batch, dedupe: bool, until: float, split: bool = True
               ) -> tuple[list[tuple[int, Row]], list[Refused]]:
        # Splitting a refused batch goes on until `until`, but for at least one timeout: a batch
        # always makes progress, and a slow server cannot stretch a split over many cycles.
        until = max(until, self._clock() + self.config.timeout)
        return write_split(self.services.writer, conn, batch, dedupe, between=self._alive, split=split,
                           until=until, clock=self._clock)

    def _set_aside(self, refused: Sequence[Refused]) -> Optional[list[Row]]:
        """Rows the table refused while it took others: kept aside in the spool, logged with the reason.

        Returns the rows of this cycle (id 0) now set aside, or None if the spool could not record
        them: they stay where they were (a live one is spooled as usual) and are tried again.
        """
        table = ".".join(self.config.table)
        for _, row, why in refused:
            # Once per row, and a flood of rows refused for the same reason is one line a minute.
            self._repeats.failed(
                "rejected", logging.ERROR,
                "心跳被拒绝 - 服务: %s, IP: %s, report_time %s: table %s refused the row: %s; kept aside in the "
                "spool (`heartbeatd rejected` lists them, `heartbeatd rejected --retry` writes them again)",
                row.service, row.ip, naive_utc(row.report_time), table, why, kind=why.split(" DETAIL: ")[0],
            )
        spool = self.services.spool
        if spool is None:  # `once`: nothing is spooled, its output says "rejected"
            return [row for i, row, _ in refused if i == 0]
        try:
            spool.reject(refused)
        except SpoolWriteFailed as exc:
            self._spool_failed("心跳缓存不可写 - %s", exc, kind="file")
            return None
        return [row for i, row, _ in refused if i == 0]

    def _replay(self, conn: Any, until: float, first_unsplit: bool) -> tuple[bool, bool]:
        """Write the spooled backlog, oldest first, in batches, within a bounded share of the cycle.

        With `first_unsplit` (the table took none of this cycle's rows) batches are tried whole until
        the table takes a row: one refused whole means it refuses everything, and the backlog stays
        as it is. Returns
        whether the table took any row, and whether it refused any.
        """
        spool = self.services.spool
        if spool is None:
            return False, False
        spool.refresh()
        if spool.count == 0:
            return False, False
        # A bounded share of the cycle, ending early enough that a last batch (at most one timeout)
        # does not push back the next start; but always one batch, so a backlog always drains.
        budget_end = min(self._clock() + max(self.config.timeout, self.config.interval / 2), until)
        first, taken, refused_any = True, False, False
        # Whether the table took rows is judged by rows inserted, not statements that succeeded:
        # rows already in the table (a delete from the spool that failed) go through a table that
        # refuses every new row.
        inserted_before = self.services.writer.inserted
        while spool.count and (first or self._clock() < budget_end) and not self._stop_pending():
            batch = spool.oldest(REPLAY_BATCH)
            if not batch:
                break
            whole = first_unsplit and not taken  # until the table has taken a row in this attempt
            first = False
            written, refused = self._write(conn, batch, dedupe=True, until=budget_end, split=not whole)
            if whole and refused:
                break  # the table refuses this cycle's rows and the backlog's: nothing is set aside
            recorded = True
            if refused:
                late, refused = self._confirm(conn, refused, dedupe=True, until=budget_end)
                written += late
                refused_any = refused_any or bool(refused)
                recorded = not refused or self._set_aside(refused) is not None
            taken = taken or self.services.writer.inserted > inserted_before
            try:
                spool.delete([i for i, _ in written])
            except SpoolWriteFailed as exc:  # the rows are in the table; a later replay skips them
                self._spool_failed("心跳缓存不可写 - %s", exc, kind="file")
                break
            if written:
                rows = [row for _, row in written]
                log.info(
                    "补写心跳 - %d row(s) from the spool, report_time %s .. %s, %d left",
                    len(rows), naive_utc(rows[0].report_time), naive_utc(rows[-1].report_time), spool.count,
                )
            elif not refused:
                break  # out of time before the table said anything about this batch
            if not recorded:
                break  # the spool cannot set them aside now: the same rows would come back at once
            self._alive()
        return taken, refused_any

    def _keep(self, outcome: CycleOutcome, rows: list[Row]) -> None:
        """Rows that did not reach the table go to the spool (when there is one)."""
        spool = self.services.spool
        if not rows or spool is None:  # `once`: nothing is spooled, its output says "not recorded"
            return
        dropped = spool.append(rows)
        outcome.spooled = rows
        if dropped:
            log.warning(
                "心跳缓存已满 - dropped the %d oldest row(s) (HEARTBEAT_SPOOL_MAX_ROWS=%d)", dropped, spool.max_rows
            )
        if spool.write_error:
            self._spool_failed(
                "心跳缓存不可写 - %s cannot be written (%s); %d row(s) held in memory only, retried every cycle",
                getattr(spool, "path", "spool"), spool.write_error, spool.in_memory, kind="file",
            )
        elif self._repeats.cleared("spool-write"):
            log.warning("心跳缓存恢复 - the spool file takes rows again; nothing is held in memory only")
        why = outcome.write_error or "PostgreSQL unavailable"
        self._repeats.failed(
            "spool", logging.WARNING, "心跳已缓存 - rows kept in the local spool until PostgreSQL accepts them (%s)", why,
            kind="spooled",
        )

    def spool_status(self) -> str:
        """What STATUS says of the spool: `; 12 spooled; 6 in memory only; 1 rejected`."""
        spool = self.services.spool
        if spool is None:
            return ""
        parts = []
        if spool.count:
            parts.append(f"{spool.count} spooled")
        if spool.in_memory:
            parts.append(f"{spool.in_memory} in memory only (spool file not writable)")
        if spool.rejected:
            parts.append(f"{spool.rejected} rejected")
        return "".join(f"; {p}" for p in parts)

