"""Getting a cycle's rows into the table: live rows first, then the spooled backlog; what cannot go is kept.

The guarantees of the write side live here, once: a row is set aside as rejected only when the
table took other rows in the same attempt (a table that refuses every row is the table's fault,
and its rows stay spooled), and only once the table has refused it again while taking a row like
those it took, in one transaction that holds the table still (Writer.judge); rows that did not
reach the table go to the spool; and the watchdog is pinged between statements.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Protocol, Sequence

from heartbeatd.config import Config
from heartbeatd.heartbeat import Row, naive_utc
from heartbeatd.repeats import Repeats, log
from heartbeatd.spool import SpoolWriteFailed
from heartbeatd.writer import Batch, Refused, Refusal, WriteError, write_split

REPLAY_BATCH = 500  # rows per backfill statement: one short transaction, well within the timeout
Written = list[tuple[int, Row]]


class Loop(Protocol):
    """What a cycle asks of the loop around it (the daemon; nothing for `once`)."""

    def alive(self) -> None:
        """The loop is alive: WATCHDOG=1."""

    def stop_pending(self) -> bool:
        """SIGTERM/SIGINT arrived: finish quickly, leave the rest spooled."""

    def replay_until(self) -> float:
        """Monotonic time by which backfill should stop so the next cycle starts on time."""


class RowWriter(Protocol):
    inserted: int  # rows inserted so far (a deduplicated replay of rows already there inserts none)

    def write(self, conn: Any, rows: Sequence[Row], dedupe: bool = False) -> None: ...
    def judge(self, conn: Any, row: Row) -> Optional[Refusal]: ...


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


class Delivery:
    """Writes one cycle's rows on the cycle's connection, sets aside, spools; logs what happened."""

    def __init__(self, config: Config, writer: RowWriter, spool: Optional[RowSpool], loop: Loop,
                 repeats: Repeats, clock: Any) -> None:
        self.config, self.writer, self.spool, self.loop = config, writer, spool, loop
        self._repeats, self._clock = repeats, clock
        self.table = ".".join(config.table)
        self.spool_failed_now = False
        self.backfill = Backfill(self)

    def write(self, conn: Any, batch: Batch, dedupe: bool, until: float, split: bool = True) -> tuple[Written, list[Refused]]:
        """write_split, its splitting going on until `until`, but for at least one timeout.

        So a batch always makes progress, and a slow server cannot stretch a split over many cycles.
        """
        until = max(until, self._clock() + self.config.timeout)
        return write_split(self.writer, conn, batch, dedupe, between=self.loop.alive, split=split,
                           until=until, clock=self._clock)

    def write_cycle(self, conn: Any, rows: list[Row], recorded: list[Row], rejected: list[tuple[Row, str]]) -> None:
        """The live rows, then the backlog; the live rows written go to `recorded`, those set aside to `rejected` (with why).

        They are added as soon as they are known, so a backlog that then fails (WriteError) does not
        make rows already committed look unwritten. Rows are set aside only if the table took others
        meanwhile. A table that refuses every row (a NOT NULL column added without a default) is the
        table's fault, not the rows': they stay spooled, and WriteError says so once a minute.
        """
        until = self.loop.replay_until()
        # Live rows first: a backlog the table refuses must never hold today's heartbeats back.
        written, refused = self.write(conn, [(0, r) for r in rows], dedupe=False, until=until)
        recorded += [row for _, row in written]
        self.loop.alive()
        replayed, replay_refused = self.backfill.replay(conn, until, first_unsplit=not written)
        taken = bool(written) or replayed
        if not refused:
            if taken and not replay_refused:
                self._repeats.end("rejected", None)  # a cycle that set nothing aside ends the episode
            return
        if not taken:
            raise self.refuses_every_row(refused[0][2])
        late, refused, table_refuses = self.confirm(conn, refused, until=until)
        recorded += [row for _, row in late]
        rejected += self.set_aside(refused) or []
        if table_refuses is not None:
            raise self.refuses_every_row(table_refuses)

    def refuses_every_row(self, why: str) -> WriteError:
        """The table, not the rows, is at fault: they stay where they are, and this is said once a minute."""
        why = why.split(" DETAIL: ")[0]
        kept = "; the rows stay in the local spool and are tried again every cycle" if self.spool else ""
        return WriteError(f"table {self.table} refuses every row: {why}{kept}", kind=f"refuses every row: {why}")

    def confirm(self, conn: Any, refused: Sequence[Refused], until: float) -> tuple[Written, list[Refused], Optional[str]]:
        """Each refused row tried once more alone, with the table held still (Writer.judge), before it is set aside.

        The table may change between two statements of an attempt (a NOT NULL column added after
        the neighbours were taken, or dropped after this row was refused): a row is set aside only
        when the table refuses it while taking a row like those it took, in one transaction.
        Returns the rows written now, those at fault, and the reason if the table refuses every row
        (the rest are then left where they were, as are those not tried before `until`).
        """
        written: Written = []
        at_fault: list[Refused] = []
        until = max(until, self._clock() + self.config.timeout)
        for i, row, _ in refused:
            if self._clock() >= until:
                break  # the rest stay where they were (a live row is spooled), tried again next cycle
            refusal = self.writer.judge(conn, row)
            self.loop.alive()
            if refusal is None:
                written.append((i, row))
            elif refusal.row_at_fault:
                at_fault.append((i, row, refusal.why))
            else:
                return written, at_fault, refusal.why
        return written, at_fault, None

    def set_aside(self, refused: Sequence[Refused]) -> Optional[list[tuple[Row, str]]]:
        """Rows the table refused while it took others: kept aside in the spool, logged with the reason.

        Returns the rows of this cycle (id 0) now set aside, with the reason, or None if the spool
        could not record them: they stay where they were (a live one is spooled as usual) and are
        tried again. Without a spool (`once`) they are only logged: nothing is kept.
        """
        for _, row, why in refused:
            # Once per row, and a flood of rows refused for the same reason is one line a minute.
            kind = why.split(" DETAIL: ")[0]
            if self.spool is None:
                self._repeats.failed(
                    "rejected", logging.ERROR, "心跳被拒绝 - 服务: %s, IP: %s, report_time %s: table %s refused the "
                    "row: %s; not recorded", row.service, row.ip, naive_utc(row.report_time), self.table, why,
                    kind=kind)
                continue
            self._repeats.failed(
                "rejected", logging.ERROR,
                "心跳被拒绝 - 服务: %s, IP: %s, report_time %s: table %s refused the row: %s; kept aside in the "
                "spool (`heartbeatd rejected` lists them, `heartbeatd rejected --retry` writes them again)",
                row.service, row.ip, naive_utc(row.report_time), self.table, why, kind=kind,
            )
        if self.spool is not None:
            try:
                self.spool.reject(refused)
            except SpoolWriteFailed as exc:
                self.spool_failed("心跳缓存不可写 - %s", exc)
                return None
        return [(row, why) for i, row, why in refused if i == 0]

    def spool_failed(self, msg: str, *args: Any) -> None:
        """The spool file could not be changed: one line a minute; the episode ends with a cycle without."""
        self.spool_failed_now = True
        self._repeats.failed("spool-write", logging.ERROR, msg, *args, kind="file")

    def keep(self, rows: list[Row], write_error: Optional[str]) -> list[Row]:
        """Rows that did not reach the table go to the spool (when there is one); returns those spooled."""
        spool = self.spool
        if not rows or spool is None:  # `once`: nothing is spooled, its output says "not recorded"
            return []
        dropped = spool.append(rows)
        if dropped:
            log.warning("心跳缓存已满 - dropped the %d oldest row(s) (HEARTBEAT_SPOOL_MAX_ROWS=%d)", dropped,
                        spool.max_rows)
        if spool.write_error:
            self.spool_failed("心跳缓存不可写 - %s cannot be written (%s); %d row(s) held in memory only, retried "
                              "every cycle", getattr(spool, "path", "spool"), spool.write_error, spool.in_memory)
        elif self._repeats.end("spool-write", None):
            log.warning("心跳缓存恢复 - the spool file takes rows again; nothing is held in memory only")
        self._repeats.failed("spool", logging.WARNING, "心跳已缓存 - rows kept in the local spool until PostgreSQL "
                             "accepts them (%s)", write_error or "PostgreSQL unavailable", kind="spooled")
        return rows

    def finish(self, kept: list[Row], recorded: list[Row]) -> None:
        """The end of a cycle's writes: an episode of spooling or of an unwritable file may be over."""
        failing = self._repeats.failing
        if not failing:
            self.spool_failed_now = False
            return  # the usual cycle: no episode going on
        if not kept and recorded:
            self._repeats.end("spool", None)  # the episode is over: the next one starts its own lines
        failed_now, self.spool_failed_now = self.spool_failed_now, False
        spool = self.spool
        if spool is not None and not failed_now and "spool-write" in failing and not spool.in_memory \
                and spool.write_error is None:
            self._repeats.end("spool-write", None)
            log.warning("心跳缓存恢复 - the spool file takes rows again; nothing is held in memory only")

    def status(self) -> str:
        """What STATUS says of the spool: `; 12 spooled; 6 in memory only; 1 rejected`."""
        spool = self.spool
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


class Backfill:
    """The spooled backlog, oldest first, in batches, within a bounded share of the cycle."""

    def __init__(self, delivery: Delivery) -> None:
        self.d = delivery

    def replay(self, conn: Any, until: float, first_unsplit: bool) -> tuple[bool, bool]:
        """Write the backlog; returns whether the table took any row, and whether it refused any.

        With `first_unsplit` (the table took none of this cycle's rows) batches are tried whole until
        the table takes a row: one refused whole means it refuses everything, and the backlog stays
        as it is.
        """
        d, spool = self.d, self.d.spool
        if spool is None:
            return False, False
        spool.refresh()
        if spool.count == 0:
            return False, False
        # A bounded share of the cycle, ending early enough that a last batch (at most one timeout)
        # does not push back the next start; but always one batch, so a backlog always drains.
        config = d.config
        budget_end = min(d._clock() + max(config.timeout, config.interval / 2), until)
        first, taken, refused_any = True, False, False
        # Whether the table took rows is judged by rows inserted, not statements that succeeded:
        # rows already in the table (a delete from the spool that failed) go through a table that
        # refuses every new row.
        inserted_before = d.writer.inserted
        while spool.count and (first or d._clock() < budget_end) and not d.loop.stop_pending():
            batch = spool.oldest(REPLAY_BATCH)
            if not batch:
                break
            whole = first_unsplit and not taken  # until the table has taken a row in this attempt
            first = False
            go_on, refused = self._batch(conn, spool, batch, whole, budget_end)
            refused_any = refused_any or refused
            taken = taken or d.writer.inserted > inserted_before
            if not go_on:
                break
            d.loop.alive()
        return taken, refused_any

    def _batch(self, conn: Any, spool: RowSpool, batch: Batch, whole: bool, budget_end: float) -> tuple[bool, bool]:
        """One batch of the backlog; returns whether to go on, and whether rows were set aside."""
        d = self.d
        written, refused = d.write(conn, batch, dedupe=True, until=budget_end, split=not whole)
        if whole and refused:
            return False, False  # the table refuses this cycle's rows and the backlog's: nothing is set aside
        recorded, table_refuses = True, None
        if refused:
            late, refused, table_refuses = d.confirm(conn, refused, until=budget_end)
            written += late
            recorded = not refused or d.set_aside(refused) is not None
        deleted = True
        try:
            spool.delete([i for i, _ in written])
        except SpoolWriteFailed as exc:  # the rows are in the table; a later replay skips them
            d.spool_failed("心跳缓存不可写 - %s", exc)
            deleted = False
        if written and deleted:
            rows = [row for _, row in written]
            log.info("补写心跳 - %d row(s) from the spool, report_time %s .. %s, %d left",
                     len(rows), naive_utc(rows[0].report_time), naive_utc(rows[-1].report_time), spool.count)
        if table_refuses is not None:  # the rest of the backlog stays as it is
            raise d.refuses_every_row(table_refuses)
        if not deleted:
            return False, bool(refused)
        if not written and not refused:
            return False, False  # out of time before the table said anything about this batch
        # When the spool cannot set them aside now, the same rows would come back at once: stop.
        return recorded, bool(refused)


def retry_rejected(spool: Any, writer: RowWriter, conn: Any, refused: Sequence[Refused]) -> tuple[Written, list[Refused]]:
    """`heartbeatd rejected --retry`: the rows set aside, written again (deduplicated) where the table takes them.

    Those written leave the spool; those refused again stay aside with the new reason.
    WriteError if the table could not be asked at all.
    """
    written, still = write_split(writer, conn, [(i, row) for i, row, _ in refused], dedupe=True)
    spool.delete([i for i, _ in written])
    spool.reject(still)
    return written, still
