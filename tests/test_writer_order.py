"""The writer's locks and keys under pressure: the last try keeps the lock order, a replay batch too big for the
lock table is halved, and rows a `timestamp(0)` column makes one are one row in a replay too."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg2
import pytest

from heartbeatd.heartbeat import Row
from heartbeatd.writer import Writer, WriteError, lock_keys, write_split
from servers import PgServer

T_ROW = datetime(2026, 12, 6, 20, 0, 0, 900, tzinfo=timezone.utc)      # stripe 900
T_WITNESS = datetime(2026, 12, 6, 20, 0, 0, 5, tzinfo=timezone.utc)    # stripe 5


def _connect(pg: PgServer) -> Any:
    conn = psycopg2.connect(host=str(pg.root), port=pg.port, user="postgres", dbname=pg.dbname)
    conn.autocommit = True
    return conn


def test_the_last_try_takes_the_witness_stripe_with_the_rows_and_cannot_deadlock(pg: PgServer) -> None:
    assert lock_keys([T_WITNESS]) < lock_keys([T_ROW])
    pg.sql("CREATE TABLE hb (service_name varchar(50) NOT NULL CHECK (service_name <> 'bad'), "
           "ip_address varchar(64) NOT NULL, report_time timestamptz NOT NULL, created_at timestamptz NOT NULL)",
           db=pg.dbname)
    calls = {"n": 0}
    other_error: list[BaseException] = []
    conn_b, conn_a = _connect(pg), _connect(pg)

    def other_host() -> None:  # another writer's replay batch: stripes 5 then 900, ascending as it should
        try:
            Writer(("hb",), timeout=10.0).write(conn_a, [Row("redis", "10.0.0.9", T_WITNESS),
                                                         Row("redis", "10.0.0.9", T_ROW)], dedupe=True)
        except BaseException as exc:  # noqa: BLE001
            other_error.append(exc)

    thread = threading.Thread(target=other_host)

    judge = Writer(("hb",), timeout=10.0, clock=lambda: T_WITNESS)  # the witness's copy: stripe 5
    refused = judge._refused

    def row_refused(cur: Any, query: str, params: Any) -> Any:
        # Inside the last try's transaction, the row refused (its stripe 900 held, and 5): the
        # witness's INSERT comes next. The other writer takes 5 and waits for 900 meanwhile.
        why = refused(cur, query, params)
        if not calls["n"]:
            calls["n"] = 1
            thread.start()
            time.sleep(1.0)
        return why

    judge._refused = row_refused  # type: ignore[method-assign]
    judge.write(conn_b, [Row("ok", "10.0.0.1", T_WITNESS - timedelta(hours=1))])  # a row taken: the witness
    judge_error = None
    try:
        judge.judge(conn_b, Row("bad", "10.0.0.1", T_ROW))
    except WriteError as exc:
        judge_error = exc
    thread.join(30)
    assert calls["n"] == 1, "the other writer never ran inside the last try"
    deadlocks = [e for e in [judge_error, *other_error] if e is not None and getattr(e, "sqlstate", "") == "40P01"]
    assert not deadlocks, [str(e) for e in deadlocks]


def test_a_replay_batch_too_big_for_the_lock_table_is_halved_until_it_fits() -> None:
    # Rows of 500 cycles whose report_times differ in the microseconds (real cycles do): 500 advisory
    # locks in one transaction. On a server with a small lock table the batch fails with 53200 (not a
    # data error: write_split does not halve it), every cycle, and the backlog never drains.
    server = PgServer()
    server.extra_opts = ("-c max_locks_per_transaction=10 -c max_connections=5 -c max_worker_processes=0 "
                         "-c autovacuum_max_workers=1 -c max_wal_senders=0 -c wal_level=minimal")
    server.start()
    try:
        server.sql("CREATE TABLE hb (service_name text NOT NULL, ip_address text NOT NULL, "
                   "report_time timestamptz NOT NULL, created_at timestamptz NOT NULL)")
        conn = psycopg2.connect(host=str(server.root), port=server.port, user="postgres", dbname="postgres")
        conn.autocommit = True
        start = datetime(2026, 12, 6, 20, 0, 0, tzinfo=timezone.utc)
        batch = [Row("redis", "10.0.0.1", start + timedelta(seconds=30 * i, microseconds=7 * i)) for i in range(500)]
        assert len(lock_keys(r.report_time for r in batch)) > 400
        writer = Writer(("hb",), timeout=10.0)
        writer.write(conn, batch[:50], dedupe=True)  # a small batch goes through
        with pytest.raises(WriteError) as refused:  # REPLAY_BATCH rows at once do not fit
            writer.write(conn, batch, dedupe=True)
        assert refused.value.sqlstate == "53200"
        written, refused_rows = write_split(writer, conn, list(enumerate(batch)), dedupe=True)
        assert len(written) == 500 and not refused_rows  # halved until each half fits, as for a refused batch
        assert server.sql("SELECT count(*) FROM hb")[0][0] == 500
        conn.close()
    finally:
        server.destroy()


def test_two_cycles_that_round_to_one_key_are_one_row_live_and_in_a_replay(pg: PgServer) -> None:
    # HEARTBEAT_INTERVAL=0.5 (allowed: 0.01 s up) on report_time timestamp(0): cycles at .7 and 1.2 s are
    # both stored as :01. Written live, one row (the second finds the first); replayed from the spool in
    # one batch, two: the NOT EXISTS does not see the batch's own rows.
    for name in ("live", "replay"):
        pg.sql(f"CREATE TABLE {name} (service_name text NOT NULL, ip_address text NOT NULL, "
               "report_time timestamp(0) NOT NULL, created_at timestamp(0) NOT NULL)", db=pg.dbname)
    start = datetime(2026, 12, 6, 20, 0, 0, tzinfo=timezone.utc)
    batch = [Row("redis", "10.0.0.1", start + timedelta(milliseconds=700)),
             Row("redis", "10.0.0.1", start + timedelta(milliseconds=1200))]
    conn = _connect(pg)
    live = Writer(("live",), timeout=10.0)
    for row in batch:
        live.write(conn, [row])
    Writer(("replay",), timeout=10.0).write(conn, batch, dedupe=True)
    conn.close()
    counts = [pg.sql(f"SELECT count(*) FROM {name}", db=pg.dbname)[0][0] for name in ("live", "replay")]
    assert counts == [1, 1], counts
