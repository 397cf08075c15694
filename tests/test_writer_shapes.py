"""The write side on the tables operators really have, and beside the rest of a fleet (issue 24: 2, 4, 5, 6).

Each test fails on heartbeatd 1.5.1 (the line above it says how), against a real PostgreSQL.
"""

from __future__ import annotations

import re
import threading
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import psycopg2
import psycopg2.extensions
import pytest

from conftest import DaemonProcess, cli, clean_env, db_url, init_table, rows
from heartbeatd.heartbeat import Row
from heartbeatd import writer as writer_module
from heartbeatd.writer import INTO, READ, RETURNS, Writer, WriteError, write_split
from servers import PgServer, RedisServer

# A report_time with every digit of fraction set, half of them above the rounding point.
WHEN = datetime(2026, 12, 6, 20, 0, 0, 654_321, tzinfo=timezone.utc)


def _connect(pg: PgServer, autocommit: bool = True) -> Any:
    conn = psycopg2.connect(host=str(pg.root), port=pg.port, user="postgres", dbname=pg.dbname)
    conn.autocommit = autocommit
    return conn


def _table(pg: PgServer, name: str, time_type: str) -> None:
    pg.sql(f"CREATE TABLE {name} (service_name varchar(50) NOT NULL, ip_address varchar(64) NOT NULL, "
           f"report_time {time_type} NOT NULL, created_at {time_type} NOT NULL)", db=pg.dbname)


# 1.5.1: with report_time timestamp(p), p < 6, or timestamptz(p), the replay compares the stored,
# rounded value with the unrounded one and inserts every row again (two rows each).
@pytest.mark.parametrize("base", ["timestamp", "timestamptz"])
def test_a_replay_writes_each_row_once_at_every_precision(pg: PgServer, base: str) -> None:
    conn = _connect(pg)
    try:
        for precision in range(7):
            name = f"hb_{base}_{precision}"
            _table(pg, name, f"{base}({precision})")
            writer = Writer((name,), timeout=5.0)
            batch = [Row(s, "10.0.0.1", WHEN + timedelta(seconds=30 * i)) for i in range(3)
                     for s in ("后端", "redis")]
            writer.write(conn, batch)
            assert writer.inserted == 6 and writer.witness == batch[-1], (name, writer.inserted)
            writer.write(conn, batch, dedupe=True)  # the replay, as from the spool
            Writer((name,), timeout=5.0).write(conn, batch[2:4], dedupe=True)  # another process's replay
            assert writer.inserted == 6, (name, writer.inserted)
            found = pg.sql(f"SELECT service_name, report_time FROM {name} ORDER BY 2, 1", db=pg.dbname)
            assert len(found) == 6, (name, found)
    finally:
        conn.close()


# 1.6.0: a column of a domain was taken for a type of its own: over timestamp(0) nothing was rounded
# (a replay wrote every row again), and over timestamptz the time went as naive UTC, which a session
# whose TimeZone is not UTC stores hours off.
@pytest.mark.parametrize("base", ["timestamp(0)", "timestamptz(0)", "timestamptz"])
def test_a_domain_over_a_time_type_is_written_as_its_base_type(pg: PgServer, base: str) -> None:
    name = "hb_domain_" + base.replace("(", "_").replace(")", "")
    pg.sql(f"CREATE DOMAIN {name}_t AS {base} CHECK (VALUE > '2000-01-01'); "
           f"CREATE DOMAIN {name}_t2 AS {name}_t", db=pg.dbname)  # a domain over a domain, too
    _table(pg, name, f"{name}_t2")
    conn = psycopg2.connect(host=str(pg.root), port=pg.port, user="postgres", dbname=pg.dbname,
                            options="-c TimeZone=Asia/Kolkata")  # +05:30: an hour's stripe and the wall time differ
    conn.autocommit = True
    try:
        writer = Writer((name,), timeout=5.0)
        batch = [Row(s, "10.0.0.1", WHEN + timedelta(seconds=30 * i)) for i in range(3) for s in ("后端", "redis")]
        writer.write(conn, batch)
        writer.write(conn, batch, dedupe=True)  # the replay
        assert writer.inserted == 6, writer.inserted
    finally:
        conn.close()
    utc = "report_time AT TIME ZONE 'UTC'" if "tz" in base else "report_time"
    found = pg.sql(f"SELECT DISTINCT {utc} FROM {name} ORDER BY 1", db=pg.dbname)
    digits = 0 if "(0)" in base else 6
    expected = [(WHEN + timedelta(seconds=30 * i)).replace(tzinfo=None) for i in range(3)]
    if digits == 0:
        expected = [t.replace(microsecond=0) + timedelta(seconds=1) for t in expected]  # .654321 rounds up
    assert found == [(t,) for t in expected]


# 1.6.0: the INSERT's NOT EXISTS read the parent with no bound the planner could prune by, so every
# write planned and locked every partition and its indexes: on a year of daily partitions 30 ms of the
# server's CPU a write (0.3 ms plain), and a write waited for any partition another session held (a
# prune's DROP of last month's, a long ALTER). Now it reads the partition its rows fall in.
@pytest.mark.parametrize("kind", ["timestamptz", "timestamp(0)"])
def test_a_write_touches_only_its_own_partition(pg: PgServer, kind: str) -> None:
    pg.sql(f"CREATE TABLE service_heartbeat (service_name varchar(50) NOT NULL, ip_address varchar(64) NOT NULL, "
           f"report_time {kind} NOT NULL, created_at {kind} NOT NULL) PARTITION BY RANGE (report_time); "
           "CREATE INDEX ON service_heartbeat (service_name, ip_address, report_time)", db=pg.dbname)
    zone = "+00" if kind == "timestamptz" else ""
    for n in range(-60, 2):
        start = (WHEN + timedelta(days=n)).date()
        pg.sql(f"CREATE TABLE service_heartbeat_{n + 60} PARTITION OF service_heartbeat "
               f"FOR VALUES FROM ('{start} 00:00{zone}') TO ('{start + timedelta(days=1)} 00:00{zone}')", db=pg.dbname)
    holder = _connect(pg, autocommit=False)  # last month's partition held, as a DROP or an ALTER holds it
    conn = _connect(pg)
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE service_heartbeat_30 IN ACCESS EXCLUSIVE MODE")
        writer = Writer(("service_heartbeat",), timeout=3.0)
        batch = [Row(s, "10.0.0.1", WHEN) for s in ("后端", "redis", "postgres")]
        writer.write(conn, batch)
        writer.write(conn, batch, dedupe=True)  # the replay: still recognised
        assert writer.inserted == 3
        with conn.cursor() as cur:  # what the planner reads for a write: one partition
            cur.execute("EXPLAIN " + writer._query(cur, writer._shape, 3).filled(
                writer._shape.filling(writer._shape.values(batch, WHEN))).split(";\n")[-1],  # type: ignore[union-attr]
                writer._shape.values(batch, WHEN).params)  # type: ignore[union-attr]
            plan = "\n".join(r[0] for r in cur.fetchall())
        assert set(re.findall(r"service_heartbeat_(\d+)", plan)) == {"60"}, plan
    finally:
        holder.close()
        conn.close()


# 1.6.2 read the partitioned table itself in every write's NOT EXISTS: PostgreSQL opened it and pruned
# its partitions at each statement (a pooled fleet's server: 23 % more a cycle than on a plain table).
# A write now reads the partition its rows fall in, where one known holds them all; the table where
# none does (a batch across two, a partition partitioned again, one this role may not read or with row
# security of its own, the DEFAULT one; and, found in review, one in a schema the role may not use, one
# with a % in its name, one with a bound a Python datetime cannot hold, each of which stopped every
# write of its range or of all). Whatever it reads, a replay of a batch inserts nothing.
@pytest.mark.parametrize("kind", ["timestamp", "timestamptz", "timestamp(0)"])
def test_a_write_reads_the_partition_its_rows_fall_in(pg: PgServer, kind: str) -> None:
    day = WHEN.date()
    zone = "+00" if kind == "timestamptz" else ""

    def at(days: int) -> str:
        return f"'{day + timedelta(days=days)} 00:00{zone}'"
    role = "writer_" + pg.dbname
    parts = {"old": f"FROM (MINVALUE) TO ({at(-2)})", "prev": f"FROM ({at(-1)}) TO ({at(0)})",
             "today": f"FROM ({at(0)}) TO ({at(1)})", "hidden": f"FROM ({at(2)}) TO ({at(3)})",
             "secured": f"FROM ({at(3)}) TO ({at(4)})", '"100%"': f"FROM ({at(4)}) TO ({at(5)})",
             "future": f"FROM ({at(6)}) TO ('9000-01-01{zone}')", "far": f"FROM ('9000-01-01{zone}') TO ('10000-01-01{zone}')",
             "last": f"FROM ('10000-01-01{zone}') TO (MAXVALUE)"}
    pg.sql(f"CREATE TABLE service_heartbeat (service_name varchar(50) NOT NULL, ip_address varchar(64) NOT NULL, "
           f"report_time {kind} NOT NULL, created_at {kind} NOT NULL) PARTITION BY RANGE (report_time); "
           "CREATE INDEX ON service_heartbeat (service_name, ip_address, report_time); "
           + "".join(f"CREATE TABLE service_heartbeat_{name} PARTITION OF service_heartbeat FOR VALUES {bound}; "
                     for name, bound in parts.items()).replace('service_heartbeat_"100%"', '"service_heartbeat_100%%"')  # %%: pg.sql formats
           + f"CREATE TABLE service_heartbeat_sub PARTITION OF service_heartbeat FOR VALUES FROM ({at(1)}) TO ({at(2)}) "
           "PARTITION BY RANGE (report_time); CREATE TABLE service_heartbeat_sub_1 PARTITION OF service_heartbeat_sub "
           f"FOR VALUES FROM ({at(1)}) TO ({at(2)}); "
           "CREATE TABLE service_heartbeat_default PARTITION OF service_heartbeat DEFAULT; "
           "ALTER TABLE service_heartbeat_secured ENABLE ROW LEVEL SECURITY; "  # no policy: its own reads see nothing
           f"CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA public TO {role}; "
           f"GRANT SELECT, INSERT ON service_heartbeat TO {role}; "
           + "".join(f"GRANT SELECT ON service_heartbeat_{name} TO {role}; "
                     for name in (*parts, "sub", "sub_1", "default") if name not in ("hidden", '"100%"'))
           + f'GRANT SELECT ON "service_heartbeat_100%%" TO {role}; '
           + f"CREATE SCHEMA parts; CREATE TABLE parts.elsewhere PARTITION OF service_heartbeat FOR VALUES FROM "
           f"({at(5)}) TO ({at(6)}); GRANT SELECT ON parts.elsewhere TO {role}", db=pg.dbname)  # no USAGE on parts
    conn = psycopg2.connect(host=str(pg.root), port=pg.port, user=role, dbname=pg.dbname,
                            options="-c TimeZone=America/St_Johns")  # bounds printed at -03:30 read back right
    conn.autocommit = True
    writer = Writer(("service_heartbeat",), timeout=5.0)
    noon = datetime.combine(day, datetime.min.time(), timezone.utc) + timedelta(hours=12)
    batches = {"today": [noon], "prev": [noon - timedelta(days=1)], "old": [noon - timedelta(days=400)],
               "future": [noon + timedelta(days=400)], "across": [noon - timedelta(days=1), noon],
               "sub": [noon + timedelta(days=1)], "hidden": [noon + timedelta(days=2)],
               "secured": [noon + timedelta(days=3)], "default": [noon - timedelta(days=2)],
               "edge": [noon - timedelta(hours=12), noon + timedelta(hours=12) - timedelta(seconds=1)],
               "bound": [noon - timedelta(hours=12, seconds=1), noon - timedelta(hours=12)],
               "percent": [noon + timedelta(days=4)], "elsewhere": [noon + timedelta(days=5)],
               "far": [datetime(9500, 1, 1, tzinfo=timezone.utc)]}
    direct = {"today": "today", "prev": "prev", "old": "old", "future": "future", "edge": "today"}
    try:
        written = 0
        for n, (name, times) in enumerate(batches.items()):
            batch = [Row(s, f"10.0.{n}.1", t) for t in times for s in ("后端", "redis")]
            writer.write(conn, batch)
            written += len(batch)
            read = writer._shape.filling(writer._shape.values(batch, WHEN))[READ]  # type: ignore[union-attr]
            assert read == (f"public.service_heartbeat_{direct[name]}" if name in direct
                            else '"service_heartbeat"'), (name, read)
            writer.write(conn, batch, dedupe=True)  # the replay, as from the spool
            Writer(("service_heartbeat",), timeout=5.0).write(conn, batch, dedupe=True)  # another process's
            assert writer.inserted == written, (name, writer.inserted)
        found = pg.sql("SELECT count(*), count(DISTINCT (service_name, ip_address, report_time)) FROM service_heartbeat",
                       db=pg.dbname)
        assert found == [(written, written)]
    finally:
        conn.close()


def _id_partitioned(pg: PgServer, kind: str) -> date:
    """service_heartbeat with a bigserial id, partitioned by report_time (of type `kind`): WHEN's day as
    service_heartbeat_a, a DEFAULT one (service_heartbeat_d); the day."""
    day = WHEN.date()
    zone = "+00" if kind.startswith("timestamptz") else ""
    pg.sql(f"CREATE TABLE service_heartbeat (id bigserial, service_name varchar(50) NOT NULL, "
           f"ip_address varchar(64) NOT NULL, report_time {kind} NOT NULL, created_at {kind} NOT NULL, "
           "PRIMARY KEY (id, report_time)) PARTITION BY RANGE (report_time); "
           f"CREATE TABLE service_heartbeat_a PARTITION OF service_heartbeat FOR VALUES FROM ('{day}{zone}') "
           f"TO ('{day + timedelta(days=1)}{zone}'); "
           "CREATE TABLE service_heartbeat_d PARTITION OF service_heartbeat DEFAULT", db=pg.dbname)
    return day


def _written_once(conn: Any, batch: list[Row]) -> tuple[Writer, tuple[str, ...]]:
    """A new writer that has written `batch` and its replay, each row once; and what it filled in for it."""
    writer = Writer(("service_heartbeat",), timeout=5.0)
    writer.write(conn, batch)
    writer.write(conn, batch, dedupe=True)
    assert writer.inserted == len(batch)
    assert writer._shape is not None
    return writer, writer._shape.filling(writer._shape.values(batch, WHEN))


def _writer_role(pg: PgServer) -> tuple[str, Any]:
    """A role that may use, read and insert into every table and sequence of the test's database as it is
    now, and an autocommit connection as it."""
    role = "writer_" + pg.dbname
    pg.sql(f"CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA public TO {role}; "
           f"GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public TO {role}; "
           f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}", db=pg.dbname)
    conn = psycopg2.connect(host=str(pg.root), port=pg.port, user=role, dbname=pg.dbname)
    conn.autocommit = True
    return role, conn


def _day_partitioned(pg: PgServer) -> date:
    """service_heartbeat partitioned by report_time: WHEN's day as service_heartbeat_a, a DEFAULT one
    (service_heartbeat_d); the day."""
    day = WHEN.date()
    pg.sql("CREATE TABLE service_heartbeat (service_name varchar(50) NOT NULL, ip_address varchar(64) NOT NULL, "
           "report_time timestamp NOT NULL, created_at timestamp NOT NULL) PARTITION BY RANGE (report_time); "
           f"CREATE TABLE service_heartbeat_a PARTITION OF service_heartbeat FOR VALUES FROM ('{day}') TO "
           f"('{day + timedelta(days=1)}'); CREATE TABLE service_heartbeat_d PARTITION OF service_heartbeat DEFAULT",
           db=pg.dbname)
    return day


# A partition made after the writer looked them up (prune or pg_partman making the next ones) is read
# once they are looked up again, within the hour (the hour passed here by the writer's own deadline).
def test_a_partition_made_later_is_read_after_the_next_lookup(pg: PgServer) -> None:
    day = _day_partitioned(pg)
    conn = _connect(pg)
    writer = Writer(("service_heartbeat",), timeout=5.0)
    today, tomorrow = [Row("redis", "10.0.0.1", WHEN)], [Row("redis", "10.0.0.1", WHEN + timedelta(days=1))]

    def read(batch: list[Row]) -> str:
        return writer._shape.filling(writer._shape.values(batch, WHEN))[READ]  # type: ignore[union-attr]
    try:
        writer.write(conn, today)
        pg.sql(f"CREATE TABLE service_heartbeat_b PARTITION OF service_heartbeat FOR VALUES FROM "
               f"('{day + timedelta(days=1)}') TO ('{day + timedelta(days=2)}')", db=pg.dbname)
        assert (read(today), read(tomorrow)) == ("public.service_heartbeat_a", '"service_heartbeat"')
        writer._shape.until = time.monotonic() - 1  # type: ignore[union-attr]  # an hour on
        writer.write(conn, [Row("postgres", "10.0.0.1", WHEN)])
        writer.write(conn, tomorrow)
        assert read(tomorrow) == "public.service_heartbeat_b"
        writer.write(conn, tomorrow, dedupe=True)
        assert writer.inserted == 3
        assert pg.sql("SELECT tableoid::regclass::text, count(*) FROM service_heartbeat GROUP BY 1 ORDER BY 1",
                      db=pg.dbname) == [("service_heartbeat_a", 2), ("service_heartbeat_b", 1)]
    finally:
        conn.close()


# A write that reads a partition returns where its rows went (RETURNING tableoid), which some tables
# cannot do (found in review: every write failed, or a written row was called refused): a conditional
# DO INSTEAD rule on the table refuses RETURNING; a role with SELECT on some of its columns only may
# not return tableoid; a BEFORE INSERT trigger on it (the counted statement) returns rows of its own.
# Those tables are read through, as in 1.6.2, and written once each row.
@pytest.mark.parametrize("shape", [
    "CREATE TABLE hb_archive (LIKE service_heartbeat); CREATE RULE old_rows AS ON INSERT TO service_heartbeat "
    "WHERE NEW.report_time < '2000-01-01' DO INSTEAD INSERT INTO hb_archive VALUES (NEW.*)",
    "REVOKE SELECT ON service_heartbeat FROM {role}; GRANT SELECT (service_name, ip_address, report_time) "
    "ON service_heartbeat TO {role}",
    "CREATE FUNCTION hb_keep() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$; "
    "CREATE TRIGGER keep BEFORE INSERT ON service_heartbeat FOR EACH ROW EXECUTE FUNCTION hb_keep()"])
def test_a_table_that_cannot_say_where_rows_went_is_read_through(pg: PgServer, shape: str) -> None:
    _day_partitioned(pg)
    role = "writer_" + pg.dbname
    pg.sql(f"CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA public TO {role}; "
           f"GRANT SELECT, INSERT ON service_heartbeat, service_heartbeat_a, service_heartbeat_d TO {role}; "
           + shape.format(role=role), db=pg.dbname)
    conn = psycopg2.connect(host=str(pg.root), port=pg.port, user=role, dbname=pg.dbname)
    conn.autocommit = True
    writer = Writer(("service_heartbeat",), timeout=5.0)
    batch = [Row(s, "10.0.0.1", WHEN) for s in ("后端", "redis", "postgres")]
    try:
        for _ in range(3):
            writer.write(conn, batch, dedupe=True)
        assert writer.inserted == 3 and writer.witness == batch[-1]
        assert writer._shape is not None and writer._shape.filling(writer._shape.values(batch, WHEN))[READ] == \
            '"service_heartbeat"'
        assert pg.sql("SELECT tableoid::regclass::text, count(*) FROM service_heartbeat GROUP BY 1",
                      db=pg.dbname) == [("service_heartbeat_a", 3)]
    finally:
        conn.close()


# The partition a daemon writes into may go while it runs (a DBA's DROP or DETACH of the day's partition;
# the rows then go to the DEFAULT one): it costs one cycle its write, with a line that says so (not
# "table does not exist: run init-db"), and that cycle's rows come from the spool; none goes into the
# detached table. Every cycle's rows are in the table once.
@pytest.mark.parametrize("how", ["DROP TABLE {part}", "ALTER TABLE service_heartbeat DETACH PARTITION {part}"])
def test_the_partition_read_goes_while_the_daemon_writes(pg: PgServer, redis_server: RedisServer, tmp_path: Path,
                                                         daemon: Callable[..., DaemonProcess], how: str) -> None:
    env = clean_env(DATABASE_URL=db_url(pg), REDIS_URL=redis_server.url(), HEARTBEAT_INTERVAL="0.5",
                    HEARTBEAT_TIMEOUT="2", HEARTBEAT_SPOOL_PATH=str(tmp_path / "spool.db"))
    made = cli(["init-db", "--partitioned=day"], env)
    assert made.returncode == 0, made.stderr
    proc = daemon(env)
    proc.wait_log("记录心跳成功 - 服务: postgres", 3)
    part = pg.sql("SELECT tableoid::regclass::text FROM service_heartbeat ORDER BY report_time DESC LIMIT 1",
                  db=pg.dbname)[0][0]
    pg.sql(how.format(part=part), db=pg.dbname)
    gone_at = datetime.now(timezone.utc).replace(tzinfo=None)
    written = proc.log().count("记录心跳成功 - 服务: postgres")
    proc.wait_log("补写心跳")
    proc.wait_log("记录心跳成功 - 服务: postgres", written + 4)
    assert proc.stop() == 0
    assert "run `heartbeatd init-db`" not in proc.log()
    said = [line for line in proc.log().splitlines() if "while written: its partitions" in line]
    why = (f"partition public.{part} of table service_heartbeat was dropped or detached, or the table changed, "
           "while written: its partitions are looked up again")
    assert said == [f"ERROR:heartbeatd.daemon:记录心跳失败 - {why}",
                    f"WARNING:heartbeatd.daemon:心跳已缓存 - rows kept in the local spool until PostgreSQL accepts them ({why})"], said
    if how.startswith("ALTER"):  # the detached table got nothing after it went
        assert pg.sql(f"SELECT count(*) FROM {part} WHERE report_time > %s", (gone_at,), db=pg.dbname) == [(0,)]
    after = pg.sql("SELECT report_time, count(*), min(tableoid::regclass::text) FROM service_heartbeat "
                   "WHERE service_name = '后端' AND report_time > %s GROUP BY 1 ORDER BY 1", (gone_at,), db=pg.dbname)
    assert len(after) >= 4 and all(copies == 1 for _, copies, _ in after), after
    assert all(where == "service_heartbeat_default" for _, _, where in after), after
    gaps = [(b[0] - a[0]).total_seconds() for a, b in zip(after, after[1:])]
    assert max(gaps) < 0.9, gaps  # no cycle missing (one would leave 1 s between two)


# A writer's list of partitions can be stale: the partition its rows fall in detached (its range now
# going to the DEFAULT partition), or dropped and made again under its name for other days. Reading the
# old one would find none of the rows and insert each replay again for up to an hour (found in review),
# and writing into it would take the rows out of the ledger: the first write into it fails, nothing
# written (GUARD), and has the partitions looked up again; its replay goes where the table puts it.
@pytest.mark.parametrize("change", [
    "ALTER TABLE service_heartbeat DETACH PARTITION service_heartbeat_a",
    "DROP TABLE service_heartbeat_a; CREATE TABLE service_heartbeat_a PARTITION OF service_heartbeat "
    "FOR VALUES FROM ('{later}') TO ('{last}')"])
def test_a_stale_partition_list_never_doubles_a_row(pg: PgServer, change: str) -> None:
    day = _day_partitioned(pg)
    conn = _connect(pg)
    writer = Writer(("service_heartbeat",), timeout=5.0)
    try:
        writer.write(conn, [Row("redis", "10.0.0.1", WHEN)])
        pg.sql(change.format(later=day + timedelta(days=2), last=day + timedelta(days=3)), db=pg.dbname)
        batch = [Row("redis", "10.0.0.2", WHEN)]
        with pytest.raises(WriteError, match="service_heartbeat_a of table service_heartbeat was dropped or detached, "
                                             "or the table changed, while written: its partitions are looked up again"):
            writer.write(conn, batch)
        for _ in range(3):  # its replays
            writer.write(conn, batch, dedupe=True)
        assert writer.inserted == 2
        assert pg.sql("SELECT tableoid::regclass::text, count(*) FROM service_heartbeat WHERE ip_address = '10.0.0.2' "
                      "GROUP BY 1", db=pg.dbname) == [("service_heartbeat_d", 1)]
    finally:
        conn.close()


# 1.6.3 wrote every row through the partitioned table: on a new connection (the daemon's, every cycle)
# PostgreSQL first builds the table's partition descriptor, which costs the server more with every
# partition it keeps (a year of daily ones: a cycle 2.5 to 2.6 times a plain table's). Rows now go into the
# partition they fall in, with the sequence's ids, once each, while a long reader holds the table.
@pytest.mark.parametrize("kind", ["timestamptz", "timestamp(0)"])
def test_rows_go_into_their_partition_itself(pg: PgServer, kind: str) -> None:
    _id_partitioned(pg, kind)
    conn = _connect(pg)
    reader = _connect(pg, autocommit=False)  # a long reader holding the table and its partitions meanwhile
    batch = [Row(s, "10.0.0.1", WHEN) for s in ("后端", "redis", "postgres")]
    try:
        with reader.cursor() as cur:
            cur.execute("SELECT count(*) FROM service_heartbeat")
        writer, filling = _written_once(conn, batch)
        reader.rollback()
        shape = writer._shape
        assert shape is not None
        assert (filling[READ], filling[INTO]) == ("public.service_heartbeat_a", "public.service_heartbeat_a")
        with conn.cursor() as cur:  # the statement the write sent, its INSERT explained
            cur.execute("BEGIN; EXPLAIN " + writer._query(cur, shape, 3).filled(filling).split(";\n")[-1],
                        shape.values(batch, WHEN).params)
            plan = [r[0] for r in cur.fetchall()]
            cur.execute("ROLLBACK")
        assert plan[0].startswith("Insert on service_heartbeat_a"), plan
        assert pg.sql("SELECT tableoid::regclass::text, count(*), count(DISTINCT id), min(id) FROM service_heartbeat "
                      "GROUP BY 1", db=pg.dbname) == [("service_heartbeat_a", 3, 3, 1)]
    finally:
        reader.close()
        conn.close()


# A write into a partition takes the table's lock first, as DROP TABLE of the partition and DETACH take
# theirs (found in review: written into first, the partition was held while the table was waited for,
# and a DBA's or prune's DROP or DETACH then deadlocked with it). Here a session holding the table takes
# the partition while a write waits: it gets it at once, and the write goes on once the table is free.
def test_a_write_into_a_partition_takes_the_table_first(pg: PgServer) -> None:
    _day_partitioned(pg)
    conn = _connect(pg)
    ddl = _connect(pg, autocommit=False)
    writer = Writer(("service_heartbeat",), timeout=10.0)
    try:
        writer.write(conn, [Row("redis", "10.0.0.1", WHEN)])  # the lookup
        with ddl.cursor() as cur:
            cur.execute("LOCK TABLE ONLY service_heartbeat IN ACCESS EXCLUSIVE MODE")
        failed: list[BaseException] = []

        def write() -> None:  # on a new connection, as the daemon's every cycle
            fresh = _connect(pg)
            try:
                writer.write(fresh, [Row("redis", "10.0.0.2", WHEN)])
            except BaseException as exc:  # noqa: BLE001 - reported below
                failed.append(exc)
            finally:
                fresh.close()
        thread = threading.Thread(target=write)
        thread.start()
        for _ in range(100):  # the write waits for the table
            if pg.sql("SELECT count(*) FROM pg_locks WHERE NOT granted", db=pg.dbname) != [(0,)]:
                break
            time.sleep(0.05)
        # ... holding no advisory lock meanwhile (1.6.5: the table's lock is taken before them), so a
        # writer of the same rows (a replay, `rejected --retry`) is not held up behind a waiting one.
        assert pg.sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'", db=pg.dbname) == [(0,)]
        with ddl.cursor() as cur:
            cur.execute("SET LOCAL lock_timeout = '3s'; LOCK TABLE service_heartbeat_a IN ACCESS EXCLUSIVE MODE")
        ddl.rollback()
        thread.join(15)
        assert not thread.is_alive() and failed == [], failed
        assert pg.sql("SELECT tableoid::regclass::text, count(*) FROM service_heartbeat GROUP BY 1",
                      db=pg.dbname) == [("service_heartbeat_a", 2)]
    finally:
        ddl.close()
        conn.close()


# Where going into the partition would not do what the table does for the rows, they go through the table
# (each shape fails if written into the partition: the id not given, a trigger not fired or one fired
# that the table would not, 42501, the partition not the table's root's, a rule run that would not be).
@pytest.mark.parametrize("shape, effect", [
    ("ALTER TABLE service_heartbeat DETACH PARTITION service_heartbeat_a; "
     "ALTER TABLE service_heartbeat_a ALTER COLUMN id DROP DEFAULT; "
     "ALTER TABLE service_heartbeat ATTACH PARTITION service_heartbeat_a FOR VALUES FROM ('{day}') TO ('{next}')",
     "SELECT count(*) FROM service_heartbeat WHERE id IS NOT NULL"),
    ("CREATE FUNCTION hb_count() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO hb_seen VALUES (1); "
     "RETURN NULL; END $$; CREATE TRIGGER counted AFTER INSERT ON service_heartbeat FOR EACH STATEMENT "
     "EXECUTE FUNCTION hb_count()", "SELECT count(*) + 1 FROM hb_seen"),  # a statement each write
    ("CREATE FUNCTION hb_count() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO hb_seen VALUES (1); "
     "RETURN NULL; END $$; CREATE TRIGGER counted AFTER INSERT ON service_heartbeat_a FOR EACH STATEMENT "
     "EXECUTE FUNCTION hb_count()", "SELECT 3 - count(*) FROM hb_seen"),
    ("CREATE RULE seen AS ON INSERT TO service_heartbeat_a DO ALSO INSERT INTO hb_seen VALUES (1)",
     "SELECT 3 - count(*) FROM hb_seen"),
    ("REVOKE INSERT ON service_heartbeat_a FROM {role}", "SELECT count(*) FROM service_heartbeat"),
    ("ALTER TABLE service_heartbeat RENAME TO service_heartbeat_2026; CREATE TABLE service_heartbeat "
     "(LIKE service_heartbeat_2026) PARTITION BY RANGE (report_time); ALTER TABLE service_heartbeat "
     "ATTACH PARTITION service_heartbeat_2026 FOR VALUES FROM ('2026-01-01') TO ('2027-01-01'); "
     "ALTER TABLE service_heartbeat RENAME TO service_heartbeat_all; "
     "ALTER TABLE service_heartbeat_2026 RENAME TO service_heartbeat",
     "SELECT count(*) FROM service_heartbeat_all"),
], ids=["attached-defaults", "table-statement-trigger", "partition-trigger", "partition-rule", "no-insert",
        "a-partition-itself"])
def test_rows_go_through_the_table_where_their_partition_would_differ(pg: PgServer, shape: str, effect: str) -> None:
    day = _id_partitioned(pg, "timestamp")
    pg.sql("CREATE TABLE hb_seen (n int)", db=pg.dbname)
    role, conn = _writer_role(pg)
    pg.sql(shape.format(day=day, next=day + timedelta(days=1), role=role), db=pg.dbname)
    try:
        _, filling = _written_once(conn, [Row(s, "10.0.0.1", WHEN) for s in ("后端", "redis", "postgres")])
        assert filling[INTO] == '"service_heartbeat"', filling
        assert pg.sql(effect, db=pg.dbname) == [(3,)]
    finally:
        conn.close()


# A DETACH ... CONCURRENTLY of the partition rows go into (possible where the table has no DEFAULT
# partition) leaves it attached but being detached, for as long as any older transaction holds the
# table: written into then, the rows would leave the ledger with it. The write fails, nothing written,
# and says so; the partitions looked up again leave it out.
def test_no_row_goes_into_a_partition_being_detached(pg: PgServer) -> None:
    day = WHEN.date()
    pg.sql("CREATE TABLE service_heartbeat (service_name varchar(50) NOT NULL, ip_address varchar(64) NOT NULL, "
           "report_time timestamp NOT NULL, created_at timestamp NOT NULL) PARTITION BY RANGE (report_time); "
           f"CREATE TABLE service_heartbeat_a PARTITION OF service_heartbeat FOR VALUES FROM ('{day}') TO "
           f"('{day + timedelta(days=1)}')", db=pg.dbname)
    conn = _connect(pg)
    reader = _connect(pg, autocommit=False)
    detacher = _connect(pg)
    writer = Writer(("service_heartbeat",), timeout=5.0)
    try:
        writer.write(conn, [Row("redis", "10.0.0.1", WHEN)])
        with reader.cursor() as cur:  # a long reader of the table: the detach waits for it
            cur.execute("SELECT count(*) FROM service_heartbeat")
        detach = threading.Thread(target=lambda: detacher.cursor().execute(
            "ALTER TABLE service_heartbeat DETACH PARTITION service_heartbeat_a CONCURRENTLY"))
        detach.start()
        for _ in range(100):
            if pg.sql("SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = 'service_heartbeat_a'::regclass",
                      db=pg.dbname) == [(True,)]:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the DETACH never became pending")
        with pytest.raises(WriteError, match="partition public.service_heartbeat_a of table service_heartbeat "
                                             "was dropped or detached, or the table changed, while written"):
            writer.write(conn, [Row("redis", "10.0.0.2", WHEN)])
        assert writer._shape is None  # looked up again next: without it
        reader.rollback()
        detach.join(10)
        assert not detach.is_alive()
        assert pg.sql("SELECT ip_address FROM service_heartbeat_a", db=pg.dbname) == [("10.0.0.1",)]
    finally:
        reader.close()
        detacher.close()
        conn.close()


# A partition detached and attached again for other times, while a writer's list still has its old
# bounds, refuses rows outside its new ones (23514, no constraint named): they go through the table at
# once, into the DEFAULT partition here, not refused nor held for the next cycle.
def test_a_partition_attached_again_for_other_times_costs_no_row(pg: PgServer) -> None:
    day = _day_partitioned(pg)
    conn = _connect(pg)
    held = _connect(pg, autocommit=False)  # a caller's own transaction (found in review: 25P02 on the retry)
    writer, other = Writer(("service_heartbeat",), timeout=5.0), Writer(("service_heartbeat",), timeout=5.0)
    try:
        writer.write(conn, [Row("redis", "10.0.0.1", WHEN - timedelta(hours=1))])
        other.write(held, [Row("redis", "10.0.0.1", WHEN - timedelta(hours=1))])
        held.commit()
        pg.sql("ALTER TABLE service_heartbeat DETACH PARTITION service_heartbeat_a; ALTER TABLE service_heartbeat "
               f"ATTACH PARTITION service_heartbeat_a FOR VALUES FROM ('{day}') TO ('{WHEN.replace(tzinfo=None)}')",
               db=pg.dbname)
        batch = [Row("redis", "10.0.0.2", WHEN)]
        Writer(("service_heartbeat",), timeout=5.0).write(conn, batch)  # another writer's, where the table puts it
        writer.write(conn, batch, dedupe=True)  # a replay: looked for where the table puts it (found in review)
        assert writer._shape is None  # looked up again next
        writer.write(conn, batch, dedupe=True)
        writer.write(conn, [Row("postgres", "10.0.0.2", WHEN)])
        assert writer.inserted == 2
        assert pg.sql("SELECT tableoid::regclass::text, ip_address FROM service_heartbeat ORDER BY 2",
                      db=pg.dbname) == [("service_heartbeat_a", "10.0.0.1"), ("service_heartbeat_d", "10.0.0.2"),
                                        ("service_heartbeat_d", "10.0.0.2")]
        with pytest.raises(WriteError) as refused:  # in a transaction: refused, for judge() to try through the table
            other.write(held, [Row("redis", "10.0.0.3", WHEN)])
        assert refused.value.sqlstate == "23514" and refused.value.data_error, refused.value
        held.rollback()
        assert other.judge(held, Row("redis", "10.0.0.3", WHEN)) is None
    finally:
        held.close()
        conn.close()


# Whether rows may go into a partition is asked of the newest partitions only (writer.NEWEST, by upper
# bound: asked of each, it doubled the hourly lookup on a year of daily partitions). Rows of an older one
# go through the table, which routes them: once, into their partition, and their replay adds none.
def test_rows_older_than_the_newest_partitions_go_through_the_table(pg: PgServer,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_module, "NEWEST", 2)
    day = _id_partitioned(pg, "timestamp")  # service_heartbeat_a: WHEN's day
    for name, start in (("older", day - timedelta(days=2)), ("old", day - timedelta(days=1)),
                        ("next", day + timedelta(days=1))):
        pg.sql(f"CREATE TABLE service_heartbeat_{name} PARTITION OF service_heartbeat "
               f"FOR VALUES FROM ('{start}') TO ('{start + timedelta(days=1)}')", db=pg.dbname)
    conn = _connect(pg)
    try:
        with conn.cursor() as cur:
            found = {p.name: p.direct for p in writer_module._partitions(cur, "service_heartbeat", "timestamp", True)}
        assert found == {"public.service_heartbeat_older": False, "public.service_heartbeat_old": False,
                         "public.service_heartbeat_a": True, "public.service_heartbeat_next": True}
        yesterday = [Row(s, "10.0.0.1", WHEN - timedelta(days=1)) for s in ("后端", "redis", "postgres")]
        _, filling = _written_once(conn, yesterday)
        assert (filling[READ], filling[RETURNS], filling[INTO]) == \
            ("public.service_heartbeat_old", " RETURNING tableoid", '"service_heartbeat"')
        today = [Row(s, "10.0.0.1", WHEN) for s in ("后端", "redis", "postgres")]
        _, filling = _written_once(conn, today)
        assert (filling[READ], filling[RETURNS], filling[INTO]) == \
            ("public.service_heartbeat_a", "", "public.service_heartbeat_a")
        assert pg.sql("SELECT tableoid::regclass::text, count(*), count(DISTINCT id) FROM service_heartbeat "
                      "GROUP BY 1 ORDER BY 1", db=pg.dbname) == [("service_heartbeat_a", 3, 3),
                                                                 ("service_heartbeat_old", 3, 3)]
    finally:
        conn.close()


# Found by a tester. INSERT taken back from the table alone, from a role that may still DELETE from it
# (README's roles recipe grants DELETE for prune): the LOCK lets it through and the partition keeps its
# copy of the grant, so writes go on until the partitions are looked up again (README says within the
# hour, or at a reload); then they go through the table, which refuses them.
def test_insert_revoked_on_the_table_stops_the_writes_at_the_next_lookup(pg: PgServer) -> None:
    _day_partitioned(pg)
    role, conn = _writer_role(pg)
    pg.sql(f"GRANT DELETE ON service_heartbeat TO {role}", db=pg.dbname)
    writer = Writer(("service_heartbeat",), timeout=5.0)
    try:
        writer.write(conn, [Row("redis", "10.0.0.1", WHEN)])
        pg.sql(f"REVOKE INSERT ON service_heartbeat FROM {role}", db=pg.dbname)
        writer.write(conn, [Row("redis", "10.0.0.2", WHEN)])  # into the partition, as the lookup found
        writer._shape.until = time.monotonic() - 1  # type: ignore[union-attr]  # an hour on
        writer.write(conn, [Row("redis", "10.0.0.3", WHEN)])  # the last one before the lookup
        with pytest.raises(WriteError, match="permission denied for table service_heartbeat$"):
            writer.write(conn, [Row("redis", "10.0.0.4", WHEN)])
        assert pg.sql("SELECT ip_address FROM service_heartbeat ORDER BY 1", db=pg.dbname) == \
            [("10.0.0.1",), ("10.0.0.2",), ("10.0.0.3",)]
    finally:
        conn.close()


# Found in review. A table attached as a partition with an identity of its own gave the rows written
# into it ids of its own sequence: a partition with an identity column is written through the table.
def test_an_attached_partition_with_its_own_identity_is_written_through_the_table(pg: PgServer) -> None:
    day = WHEN.date()
    columns = ("service_name varchar(50) NOT NULL, ip_address varchar(64) NOT NULL, report_time timestamp NOT NULL, "
               "created_at timestamp NOT NULL")
    pg.sql(f"CREATE TABLE service_heartbeat (id bigint GENERATED BY DEFAULT AS IDENTITY, {columns}) "
           "PARTITION BY RANGE (report_time); CREATE TABLE service_heartbeat_d PARTITION OF service_heartbeat DEFAULT; "
           f"CREATE TABLE hb_old (id bigint GENERATED BY DEFAULT AS IDENTITY (START 900000), {columns}); "
           f"ALTER TABLE service_heartbeat ATTACH PARTITION hb_old FOR VALUES FROM ('{day}') TO "
           f"('{day + timedelta(days=1)}')", db=pg.dbname)
    conn = _connect(pg)
    writer = Writer(("service_heartbeat",), timeout=5.0)
    try:
        writer.write(conn, [Row("redis", "10.0.0.1", WHEN)])
        writer.write(conn, [Row("postgres", "10.0.0.1", WHEN)])
        assert pg.sql("SELECT tableoid::regclass::text, max(id) FROM service_heartbeat GROUP BY 1",
                      db=pg.dbname) == [("hb_old", 2)]
    finally:
        conn.close()


# Found in review: a change to the table after the writer looked its partitions up was passed by for up
# to an hour by writes into the partition. With INSERT on every partition (as init-db and prune give
# it), a role whose INSERT on the table was taken back went on writing: the table's grant is checked
# at the lookup and, by its lock, at every write. Row security given to the table: the guard sees it,
# the write fails with nothing written, and the next goes through the table, whose policy refuses it.
@pytest.mark.parametrize("change, errors", [
    ("REVOKE INSERT ON service_heartbeat FROM {role}", ["permission denied for table service_heartbeat"] * 2),
    ("ALTER TABLE service_heartbeat ENABLE ROW LEVEL SECURITY; CREATE POLICY no_redis ON service_heartbeat "
     "TO {role} USING (true) WITH CHECK (service_name <> 'redis')",
     ["or the table changed, while written", "row-level security"]),
], ids=["insert-taken-back", "row-security"])
def test_a_change_to_the_table_reaches_the_next_write(pg: PgServer, change: str, errors: list[str]) -> None:
    _day_partitioned(pg)
    role, conn = _writer_role(pg)
    writer = Writer(("service_heartbeat",), timeout=5.0)
    try:
        writer.write(conn, [Row("redis", "10.0.0.1", WHEN)])  # looked up before the change
        pg.sql(change.format(role=role), db=pg.dbname)
        for error in errors:  # the looked-up list, then a new lookup
            with pytest.raises(WriteError, match=error):
                writer.write(conn, [Row("redis", "10.0.0.2", WHEN)])
        assert pg.sql("SELECT ip_address FROM service_heartbeat", db=pg.dbname) == [("10.0.0.1",)]
    finally:
        conn.close()

# Found in review: the guard knew the relations by the oids looked up, the statement by their names. A
# partition renamed with a table of its own made under its name, or the table moved aside (README's
# migration) with a new one made under its name, took the rows into the wrong table for up to an hour.
# The names are checked too: the write fails, nothing written, and the next goes where the table puts it.
@pytest.mark.parametrize("change, where", [
    ("ALTER TABLE service_heartbeat_a RENAME TO service_heartbeat_a_kept; "
     "CREATE TABLE service_heartbeat_a (LIKE service_heartbeat INCLUDING DEFAULTS)", "service_heartbeat_a_kept"),
    ("ALTER TABLE service_heartbeat RENAME TO service_heartbeat_old; CREATE TABLE service_heartbeat "
     "(LIKE service_heartbeat_old INCLUDING DEFAULTS) PARTITION BY RANGE (report_time); CREATE TABLE "
     "service_heartbeat_p1 PARTITION OF service_heartbeat FOR VALUES FROM ('{day}') TO ('{next}')",
     "service_heartbeat_p1"),
], ids=["partition-renamed", "table-moved-aside"])
def test_no_row_goes_into_a_table_that_took_a_name(pg: PgServer, change: str, where: str) -> None:
    day = _day_partitioned(pg)
    conn = _connect(pg)
    writer = Writer(("service_heartbeat",), timeout=5.0)
    try:
        writer.write(conn, [Row("redis", "10.0.0.1", WHEN)])
        pg.sql(change.format(day=day, next=day + timedelta(days=1)), db=pg.dbname)
        batch = [Row("redis", "10.0.0.2", WHEN)]
        with pytest.raises(WriteError, match="or the table changed, while written"):
            writer.write(conn, batch)
        writer.write(conn, batch, dedupe=True)  # from the spool
        writer.write(conn, batch, dedupe=True)
        assert pg.sql("SELECT tableoid::regclass::text, count(*) FROM service_heartbeat WHERE ip_address = '10.0.0.2' "
                      "GROUP BY 1", db=pg.dbname) == [(where, 1)]
        assert pg.sql("SELECT count(*) FROM service_heartbeat_a WHERE ip_address = '10.0.0.2'", db=pg.dbname) == [(0,)]
    finally:
        conn.close()


def _inheritance_partitioned(pg: PgServer) -> None:
    """service_heartbeat partitioned the old way: children by inheritance, a trigger routing rows to them."""
    init_table(pg)
    pg.sql("""
        CREATE TABLE service_heartbeat_old (CHECK (report_time < '2026-01-01')) INHERITS (service_heartbeat);
        CREATE TABLE service_heartbeat_new (CHECK (report_time >= '2026-01-01'),
                                            CHECK (service_name <> 'ghost')) INHERITS (service_heartbeat);
        CREATE FUNCTION heartbeat_route() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.report_time < '2026-01-01' THEN INSERT INTO service_heartbeat_old VALUES (NEW.*);
            ELSE INSERT INTO service_heartbeat_new VALUES (NEW.*);
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER route BEFORE INSERT ON service_heartbeat FOR EACH ROW EXECUTE FUNCTION heartbeat_route();
    """, db=pg.dbname)


# 1.5.1: every INSERT reports 0 rows, so the writer never counts a row written nor keeps a witness:
# a row the child refuses makes "the table refuses every row" (forever, the rows kept spooled), and
# a backlog replayed on such a table is never seen as taken.
def test_an_inheritance_partitioned_table_takes_rows_once_and_says_so(pg: PgServer, tmp_path: Path) -> None:
    from heartbeatd.spool import Spool, rejected_rows
    from test_round_three import _AlterOnce, _delivery
    _inheritance_partitioned(pg)
    now = datetime.now(timezone.utc)
    backlog = [Row("后端", "10.0.0.1", datetime(2025, 6, 1, tzinfo=timezone.utc) + timedelta(seconds=30 * i))
               for i in range(3)]
    spool = Spool(tmp_path / "spool.db", 1000)
    spool.append(backlog)
    conn = _connect(pg)
    try:
        delivery = _delivery(pg, spool, _AlterOnce(lambda: None))
        live = [Row("后端", "10.0.0.1", now), Row("ghost", "10.0.0.2", now), Row("redis", "10.0.0.3", now)]
        recorded: list[Row] = []
        rejected: list[tuple[Row, str]] = []
        delivery.write_cycle(conn, live, recorded, rejected)  # no WriteError "refuses every row"
        assert recorded == [live[0], live[2]]
        assert [(row, "violates check constraint" in why) for row, why in rejected] == [(live[1], True)]
        assert spool.count == 0 and [row for _, row, _ in rejected_rows(spool)] == [live[1]]
        assert delivery.writer.inserted == 5  # 2 live, 3 from the spool: each counted as written
        # The same rows again (a live INSERT that reached the server late, a replay): none twice.
        writer = Writer(("service_heartbeat",), 5.0)
        written, refused = write_split(writer, conn, [(0, r) for r in backlog + [live[0], live[2]]], dedupe=True)
        assert len(written) == 5 and refused == [] and writer.inserted == 0
        assert pg.sql("SELECT count(*) FROM ONLY service_heartbeat", db=pg.dbname) == [(0,)]
        assert pg.sql("SELECT count(*) FROM service_heartbeat_old", db=pg.dbname) == [(3,)]
        assert len(rows(pg)) == 5
    finally:
        conn.close()
        spool.close()


# 1.5.1: `redis up ... not recorded: PostgreSQL unavailable`, and an ERROR line sending the user
# to `heartbeatd rejected`, though `once` keeps no spool.
def test_once_says_the_table_refused_a_row_and_why(pg: PgServer, redis_server: RedisServer, tmp_path: Path) -> None:
    init_table(pg)
    pg.sql("ALTER TABLE service_heartbeat ADD CONSTRAINT no_redis CHECK (service_name <> 'redis')", db=pg.dbname)
    env = clean_env(DATABASE_URL=db_url(pg), REDIS_URL=redis_server.url(), HEARTBEAT_TIMEOUT="5")
    result = cli(["once"], env, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = {line.split("\t")[0]: line.split("\t") for line in result.stdout.splitlines()}
    assert lines["后端"][4] == "recorded" and lines["postgres"][4] == "recorded"
    assert lines["redis"][1] == "up"
    assert lines["redis"][4] == ('not recorded: refused by table service_heartbeat: new row for relation '
                                 '"service_heartbeat" violates check constraint "no_redis"'), lines["redis"]
    assert "PostgreSQL unavailable" not in result.stdout + result.stderr
    assert "heartbeatd rejected" not in result.stderr and "spool" not in result.stderr, result.stderr
    assert "心跳被拒绝 - 服务: redis" in result.stderr and "not recorded" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(r[0] for r in rows(pg)) == ["postgres", "后端"]


def _host(n: int, when: datetime) -> list[Row]:
    """One host's cycle: its own address, and the Redis and PostgreSQL every host of the fleet checks."""
    return [Row("后端", f"10.50.0.{n}", when), Row("redis", "10.1.11.128", when), Row("postgres", "10.1.11.5", when)]


def _held_open(pg: PgServer, batch: list[Row]) -> Any:
    """A writer's transaction that wrote `batch` and is left open (not committed): its locks are held."""
    conn = _connect(pg, autocommit=False)
    Writer(("service_heartbeat",), 5.0).write(conn, batch)
    assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
    return conn


# 1.5.1: every write takes the table's one advisory lock, so the second host's write waits for the
# first host's transaction and gives up after its timeout (WriteError, the rows spooled).
def test_one_hosts_open_write_does_not_delay_another_hosts(pg: PgServer) -> None:
    init_table(pg)
    now = datetime.now(timezone.utc)
    held = _held_open(pg, _host(1, now))
    conn = _connect(pg)
    try:
        writer = Writer(("service_heartbeat",), timeout=2.0)
        started = time.monotonic()
        writer.write(conn, _host(2, now + timedelta(microseconds=1)))
        assert time.monotonic() - started < 1.0
        assert writer.inserted == 3
    finally:
        held.rollback()
        held.close()
        conn.close()


# The last try (Writer.judge) and `rejected --retry` take the rows' locks, not the table's: a host's
# write left open does not delay them either (1.5.1: they wait for it and time out).
def test_a_last_try_is_not_delayed_by_another_hosts_open_write(pg: PgServer) -> None:
    init_table(pg)
    pg.sql("ALTER TABLE service_heartbeat ADD CONSTRAINT no_ghost CHECK (service_name <> 'ghost')", db=pg.dbname)
    now = datetime.now(timezone.utc)
    conn = _connect(pg)
    writer = Writer(("service_heartbeat",), timeout=2.0)
    writer.write(conn, [Row("后端", "10.50.0.2", now - timedelta(seconds=30))])  # a witness
    held = _held_open(pg, _host(1, now))
    later = now + timedelta(milliseconds=1)  # another host's cycle: another time
    try:
        started = time.monotonic()
        refusal = writer.judge(conn, Row("ghost", "10.50.0.2", later))
        assert refusal is not None and refusal.row_at_fault
        assert writer.judge(conn, Row("后端", "10.50.0.2", later)) is None  # taken
        assert time.monotonic() - started < 1.0
    finally:
        held.rollback()
        held.close()
        conn.close()
    assert sorted(r[0] for r in rows(pg)) == ["后端", "后端"]


# The same rows from two writers at once (a live INSERT frozen in its commit and the replay): the
# second waits for the first and inserts nothing, whatever order the rows come in.
def test_two_writers_of_the_same_rows_never_double_one(pg: PgServer) -> None:
    init_table(pg)
    now = datetime.now(timezone.utc)
    batch = _host(1, now) + _host(2, now + timedelta(microseconds=1))
    held = _held_open(pg, batch)
    outcome: dict[str, Any] = {}

    def replay() -> None:
        conn = _connect(pg)
        writer = Writer(("service_heartbeat",), timeout=10.0)
        try:
            writer.write(conn, list(reversed(batch))[:4], dedupe=True)
            outcome["inserted"] = writer.inserted
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc
        finally:
            conn.close()

    thread = threading.Thread(target=replay)
    thread.start()
    try:
        waiting: Optional[list[Any]] = None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not waiting:
            waiting = pg.sql("SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted", db=pg.dbname)
            time.sleep(0.05)
        assert waiting, "the second writer did not wait for the first"
        held.commit()
    finally:
        held.close()
        thread.join(15)
    assert outcome == {"inserted": 0}, outcome
    found = rows(pg)
    assert len(found) == 6 and len({(r[0], r[1], r[2]) for r in found}) == 6


# Partitioning by rules (older still): PostgreSQL refuses an INSERT in WITH on such a table, so the
# INSERT stands alone there; the rows still go in once, replays included (as in 1.5.1).
def test_a_rule_partitioned_table_takes_rows_once(pg: PgServer) -> None:
    init_table(pg)
    pg.sql("CREATE TABLE service_heartbeat_new (CHECK (report_time >= '2026-01-01')) INHERITS (service_heartbeat);"
           "CREATE RULE route AS ON INSERT TO service_heartbeat WHERE (report_time >= '2026-01-01') "
           "DO INSTEAD INSERT INTO service_heartbeat_new VALUES (NEW.*)", db=pg.dbname)
    conn = _connect(pg)
    try:
        batch = _host(1, datetime.now(timezone.utc))
        Writer(("service_heartbeat",), 5.0).write(conn, batch)
        Writer(("service_heartbeat",), 5.0).write(conn, batch, dedupe=True)
    finally:
        conn.close()
    assert pg.sql("SELECT count(*) FROM service_heartbeat_new", db=pg.dbname) == [(3,)]
    assert len(rows(pg)) == 3


# Two writers cannot deadlock: each takes its stripes in one order, ascending, whatever the order of
# its rows; and two copies of a row take the same stripe at any precision, rounded as stored.
def test_lock_keys_are_ascending_and_the_same_for_the_same_rows() -> None:
    from heartbeatd.schema import ColumnType
    from heartbeatd.writer import _Shape, lock_keys
    times = [WHEN + timedelta(seconds=30 * i, microseconds=7 * i) for i in range(50)]
    assert lock_keys(times) == sorted(set(lock_keys(times))) == lock_keys(list(reversed(times)))
    types = {"service_name": ColumnType("varchar", "character varying(50)", 54),
             "ip_address": ColumnType("varchar", "character varying(64)", 68),
             "report_time": ColumnType("timestamp", "timestamp(0) without time zone", 0),
             "created_at": ColumnType("timestamp", "timestamp(0) without time zone", 0)}
    shape = _Shape(types)
    early, late = WHEN.replace(microsecond=500_001), WHEN.replace(microsecond=999_999)  # both round to :01
    first = shape.values([Row("redis", "10.0.0.1", early)], WHEN)
    second = shape.values([Row("redis", "10.0.0.1", late)], WHEN)
    assert shape.stripes(first) == shape.stripes(second) == lock_keys([datetime(2026, 12, 6, 20, 0, 1)])
    assert first.times == second.times == [datetime(2026, 12, 6, 20, 0, 1)]  # as stored: naive UTC, rounded
    assert first.params[2] == "2026-12-06 20:00:01"  # sent as that text
    # ... so two rows of a batch that are one as stored are sent once, and a cycle's one stripe is one call.
    both = shape.values([Row("redis", "10.0.0.1", early), Row("redis", "10.0.0.1", late),
                         Row("redis", "10.0.0.2", late)], WHEN)
    assert both.params == first.params + second.params[:1] + ["10.0.0.2"] + second.params[2:]
    assert both.times == first.times * 2
    assert shape.lock([7]) == "SELECT pg_advisory_xact_lock(0, 7)"
    assert shape.lock([7, 900]) == "SELECT pg_advisory_xact_lock(0, s) FROM unnest(ARRAY[7,900]::int4[]) AS s"
