"""Write benchmark (a script, not a test): the server's instructions for one write, by table and form.

    python tests/benchmark_write.py [--writes 200] [--connections 30] [--behind DAYS]
                                    [--history DAYS --hosts N] [--forms plain,partitioned,table,unguarded]

Where benchmark_fleet.py counts a fleet's whole cycle, this counts what one write of a cycle's three
rows costs PostgreSQL, run under callgrind: `pooled`, the mean over --writes writes on one backend
after 20 that fill its caches (as through PgBouncer), and `new backend`, the mean over
--connections connections of one cycle each (connect, the probe's `SELECT inet_server_addr()`, the
write, close; as a direct connection), each backend counted whole from its fork, its start included
(--dump-before=fork_process). The tables hold today's first five minutes of --hosts hosts' heartbeats
before the writes, analyzed (the write's NOT EXISTS planned on an index, as on a table in use).
Forms:

- plain: the table as `heartbeatd init-db` makes it;
- partitioned: as `init-db --partitioned=day` makes it, written as the writer writes it (into the
  partition the rows fall in, behind the table's lock and the guard: GUARD in heartbeatd/writer.py);
- table: the same table, the rows through the table itself (the writer's form where rows may not go
  into the partition; 1.6.3's for every write);
- unguarded: into the partition without the table's lock and the guard. Not a form the writer
  uses (it could write into a detached partition, past the table's row security, and deadlock
  with DROP): what a write into a partition costs PostgreSQL with no guarantee kept, the floor.

--behind DAYS gives the partitioned table that many day partitions before today's; --history DAYS
fills both tables with that many days of --hosts hosts' heartbeats at 30 s (and the partitioned
table with their partitions) before the count, loaded and analyzed with the server outside
valgrind: a plain table's indexes grow with its history while a day's partition does not. The
counts repeat from run to run within about 1 %; compare within a run.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from servers import PgServer, _chown_postgres, remove_template  # noqa: E402

from heartbeatd import writer  # noqa: E402
from heartbeatd.heartbeat import Row  # noqa: E402
from heartbeatd.schema import init_db  # noqa: E402

DAYS_BEHIND = """DO $$ DECLARE today date := (now() AT TIME ZONE 'utc')::date; BEGIN
FOR d IN 1..%s LOOP EXECUTE format('CREATE TABLE part_p%%s PARTITION OF part FOR VALUES FROM (%%L) TO (%%L)',
  to_char(today - d, 'YYYYMMDD'), today - d, today - d + 1); END LOOP; END $$"""
# `hosts` hosts' heartbeats at 30 s from `start` until `end`, each host's three rows a cycle.
HEARTBEATS = """INSERT INTO {table} (service_name, ip_address, report_time, created_at)
SELECT s, '10.8.' || (h / 250) || '.' || (h %% 250 + 1), t, t
  FROM generate_series(%(start)s::timestamp, %(end)s::timestamp - interval '1 us', interval '30 s') AS t,
       generate_series(0, %(hosts)s - 1) AS h, unnest(ARRAY['后端', 'redis', 'postgres']) AS s"""
TODAY = timedelta(minutes=5)  # of rows loaded before the writes, which follow them
FORMS = {"plain": "plain", "partitioned": "part", "table": "part", "unguarded": "part"}


def prepare(pg: PgServer, behind: int, history: int, hosts: int) -> None:
    """Both tables (and the history), made with the server outside valgrind."""
    pg.start()
    conn = pg.connect()
    init_db(conn, ("plain",), 60.0)
    init_db(conn, ("part",), 60.0, partitioned="day")
    if max(behind, history):
        pg.sql(DAYS_BEHIND, (max(behind, history),))
    today = datetime.now(timezone.utc).replace(tzinfo=None, hour=0, minute=0, second=0, microsecond=0)
    with conn.cursor() as cur:
        for table in ("plain", "part"):
            for day in range(history, 0, -1):
                start = today - timedelta(days=day)
                cur.execute(HEARTBEATS.format(table=table), {"start": start, "end": start + timedelta(days=1),
                                                             "hosts": hosts})
            # Today's first minutes too: the day's rows so far, where the writes go (analyzed, so that
            # the write's NOT EXISTS is planned on an index as on a table in use, not as a scan of an empty one).
            cur.execute(HEARTBEATS.format(table=table), {"start": today, "end": today + TODAY, "hosts": hosts})
            cur.execute(f"VACUUM ANALYZE {table}")
        cur.execute("CHECKPOINT")
    conn.close()
    pg.stop()


class Form:
    """The writer's templates as a form writes (restored on exit)."""

    def __init__(self, form: str) -> None:
        self.form = form
        self.saved = (writer.HOLD, writer.GUARD, writer.DIRECT)

    def __enter__(self) -> "Form":
        if self.form == "table":
            writer.DIRECT = "false"  # no partition may take the rows: through the table
        elif self.form == "unguarded":
            writer.HOLD, writer.GUARD = "", " WHERE true"  # into the partition (a guard there), nothing checked
        return self

    def __exit__(self, *exc: Any) -> None:
        writer.HOLD, writer.GUARD, writer.DIRECT = self.saved


def cycles() -> Iterator[list[Row]]:
    """A cycle's three rows after another's, in today's first hours (a partition init-db made)."""
    start = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0) + TODAY
    n = 0
    while True:
        n += 1
        when = start + timedelta(milliseconds=370 * n)
        yield [Row("后端", "10.9.0.1", when), Row("redis", "127.0.0.1", when), Row("postgres", "127.0.0.1", when)]


def measure(pg: PgServer, out: Path, form: str, writes: int, connections: int, rows: Iterator[list[Row]]
            ) -> tuple[float, float]:
    """Millions of the server's instructions a write: on one backend kept, and a new backend a write."""
    with Form(form):
        w = writer.Writer((FORMS[form],), 60.0)
        conn = pg.connect()
        pid = conn.info.backend_pid
        for _ in range(20):  # the lookup, and the backend's caches filled
            w.write(conn, next(rows))
        with conn.cursor() as cur:
            cur.execute("SELECT pg_sleep(0)")  # counted from here on (--zero-before=pg_sleep)
        before = w.inserted
        for _ in range(writes):
            w.write(conn, next(rows))
        assert w.inserted - before == 3 * writes, "every write inserts its rows"
        conn.close()
        pids = set()
        for _ in range(connections):
            conn = pg.connect()
            pids.add(conn.info.backend_pid)
            with conn.cursor() as cur:
                cur.execute("SELECT inet_server_addr()")
            w.write(conn, next(rows))
            conn.close()
    time.sleep(3)  # each backend writes its file as it exits
    return instructions(out, {pid}) / writes / 1e6, instructions(out, pids) / connections / 1e6


def instructions(out: Path, pids: set[int]) -> int:
    """The instructions of these backends, from their callgrind files (by pid: pids wrap around, so not a
    range as benchmark_fleet.py's fleet, whose backends it does not know)."""
    return sum(int(line.split()[1]) for pid in pids if (out / f"cg.{pid}").exists()
               for line in open(out / f"cg.{pid}") if line.startswith("totals:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--connections", type=int, default=30)
    parser.add_argument("--behind", type=int, default=0)
    parser.add_argument("--history", type=int, default=0)
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--forms", default="plain,partitioned,table,unguarded")
    args = parser.parse_args()
    forms = args.forms.split(",")
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        parser.error(f"unknown form(s): {', '.join(unknown)}")
    pg = PgServer()
    try:
        # No autovacuum (its work is not a write's); WAL segments not zeroed (a write that crosses into a new
        # one would otherwise count 16 MB of zeros).
        pg.extra_opts += " -c autovacuum=off -c wal_init_zero=off -c max_wal_size=4GB"
        prepare(pg, args.behind, args.history, args.hosts)
        out = pg.root / "callgrind"
        out.mkdir()
        _chown_postgres(out)
        pg.start_under(["valgrind", "--tool=callgrind", "--dump-instr=no", "--dump-before=fork_process",
                        "--zero-before=pg_sleep", f"--callgrind-out-file={out}/cg.%p"])
        partitions = pg.sql("SELECT count(*) FROM pg_inherits WHERE inhparent = 'part'::regclass")[0][0]
        plain_rows = pg.sql("SELECT count(*) FROM plain")[0][0]
        print(f"partitioned table: {partitions} partitions; {plain_rows:,} rows in each table")
        print(f"{'form':<12} {'pooled Minstr/write':>20} {'new backend Minstr/write':>25}")
        rows = cycles()
        base = None
        for form in forms:
            pooled, fresh = measure(pg, out, form, args.writes, args.connections, rows)
            if base is None:
                base = (pooled, fresh)
            print(f"{form:<12} {pooled:>12.3f} ({pooled / base[0] - 1:+6.1%}) {fresh:>16.3f} ({fresh / base[1] - 1:+6.1%})",
                  flush=True)
    finally:
        pg.destroy()
        remove_template()


if __name__ == "__main__":
    main()
