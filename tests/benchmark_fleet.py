"""Fleet benchmark (a script, not a test): N daemons as simulated hosts against one private PostgreSQL.

    python tests/benchmark_fleet.py [--hosts 30] [--interval 1] [--seconds 60] [--rounds 1]
                                    [--modes direct,pgbouncer,tls,scram,tls+scram] [--trees DIR,DIR]
                                    [--tables app,plain,partitioned] [--behind DAYS] [--server-callgrind]

Each daemon is a host of its own (distinct HEARTBEAT_BACKEND_IP, own spool). Per mode it prints
PostgreSQL, PgBouncer and daemon CPU per cycle (from /proc: the postmaster with its reaped
backends, PgBouncer, the daemons), the connection slots the daemons hold (sampled from
pg_stat_activity), and how many hosts one PostgreSQL core carries at the default 30 s interval.
Modes: direct; pgbouncer (transaction pooling in front); tls (sslmode=require, trust);
scram (SCRAM-SHA-256 without TLS); tls+scram (both, the usual managed-database setup).
--trees runs each mode once per source tree (the daemons import heartbeatd from it), one after
the other in the same run: two versions side by side. --tables likewise runs each on the tables named:
`app` (the default) is the application's `service_heartbeat` as packaging/schema.sql makes it (one
index besides the primary key), `plain` the table as `heartbeatd init-db` makes it (its three indexes),
`partitioned` as `heartbeatd init-db --partitioned=day` makes it (the same indexes; a partition a UTC
day, 7 ahead, a DEFAULT one): plain against partitioned compares like with like; --behind DAYS gives
the partitioned table that many (empty) day partitions before today's as well, the partitions a
retention of DAYS keeps. With --rounds N the runs alternate, round by round, so that drift of the
machine falls on every variant alike.

--server-callgrind runs PostgreSQL itself under valgrind's callgrind and prints the instructions its
processes executed per cycle (millions; the client backends' and auxiliary processes', autovacuum
off) instead of CPU time: a count that does not depend on the machine's noise, for comparing two
variants whose CPU times differ by less than their spread. Only backends forked after the daemons
start and before they stop count, each from its fork (--dump-before=fork_process); the one pooled
server connection from the moment the warm-up is over (a `SELECT pg_sleep(0)` through PgBouncer:
--zero-before=pg_sleep), so its first statements, which fill its caches, do not count. PostgreSQL
runs tens of times slower there: use few hosts (--hosts 3).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

import psycopg2

sys.path.insert(0, str(Path(__file__).parent))
from servers import PgBouncer, PgServer, RedisServer, _chown_postgres, remove_template  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
USER, PASSWORD = "hb_fleet", "fleet-pw-1"


def cpu(pid: int, children_of: bool = False) -> float:
    """Seconds of CPU of a process (with its reaped children's, and its live children's, if asked)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    total = int(fields[11]) + int(fields[12])
    if children_of:
        total += int(fields[13]) + int(fields[14])
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                kid = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(kid[1]) == pid:
                total += int(kid[11]) + int(kid[12])
    return total / TICK


def server_instructions(out: Path, first: int, last: int) -> float:
    """The instructions of the server's processes forked between the backends `first` and `last`, from their
    callgrind files (each written as its process exits). Pids wrap around (at 32,768 here): `last` may be
    the smaller."""
    total = 0
    for path in glob.glob(str(out / "cg.*")):
        parts = Path(path).name.split(".")
        if len(parts) != 2:
            continue
        pid = int(parts[1])
        if first < pid < last if first <= last else (pid > first or pid < last):
            total += sum(int(line.split()[1]) for line in open(path) if line.startswith("totals:"))
    return float(total)


def run_mode(mode: str, hosts: int, interval: float, seconds: float, tree: str = "",
             table: str = "app", callgrind: bool = False, behind: int = 0) -> dict[str, float]:
    pg = PgServer()
    if mode in ("tls", "scram", "tls+scram"):
        # tls: TLS, no password asked; scram: SCRAM-SHA-256 in the clear; tls+scram: both.
        pg.enable_tls_and_scram(USER, over_tls="trust" if mode == "tls" else "scram-sha-256",
                                without_tls="scram-sha-256")
    out = pg.root / "callgrind"
    if callgrind:
        out.mkdir()
        _chown_postgres(out)
        pg.extra_opts += " -c autovacuum=off"
        pg.start_under(["valgrind", "--tool=callgrind", "--dump-instr=no", "--dump-before=fork_process",
                        "--zero-before=pg_sleep", f"--callgrind-out-file={out}/cg.%p"])
    else:
        pg.start()
    redis = RedisServer().start()
    bouncer = None
    tmp = Path(tempfile.mkdtemp(prefix="hb-fleet-"))
    daemons: list[subprocess.Popen[bytes]] = []
    try:
        if table in ("plain", "partitioned"):
            made = ["--partitioned=day"] if table == "partitioned" else []
            subprocess.run([sys.executable, "-m", "heartbeatd", "init-db", *made], check=True,
                           stdout=subprocess.DEVNULL, cwd=tmp,
                           env=dict(os.environ, DATABASE_URL=pg.url(), HEARTBEAT_ENV_FILE="/nonexistent/heartbeatd.env",
                                    **({"PYTHONPATH": tree} if tree else {})))
            if table == "partitioned" and behind:  # days of history: partitions before today's
                pg.sql("DO $$ DECLARE today date := (now() AT TIME ZONE 'utc')::date; BEGIN "
                       "FOR d IN 1..%s LOOP EXECUTE format('CREATE TABLE service_heartbeat_p%%s PARTITION OF "
                       "service_heartbeat FOR VALUES FROM (%%L) TO (%%L)', to_char(today - d, 'YYYYMMDD'), "
                       "today - d, today - d + 1); END LOOP; END $$", (behind,))
        else:
            from heartbeatd.schema import CREATE_TABLE, index_name
            pg.sql(CREATE_TABLE.format(table="service_heartbeat", index=index_name(("service_heartbeat",))))
        if mode == "direct":
            url = pg.url() + "?sslmode=disable"
        elif mode == "pgbouncer":
            # Under callgrind one server connection: its first statements (caches filled) counted once a run.
            bouncer = PgBouncer(pg, host="127.0.0.1", pool_size=1 if callgrind else 20)
            bouncer.start()
            url = bouncer.url()
        else:
            pg.sql(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
            pg.sql(f"GRANT INSERT, SELECT ON service_heartbeat TO {USER}; "
                   f"GRANT USAGE ON SEQUENCE service_heartbeat_id_seq TO {USER}")
            password = f":{PASSWORD}" if "scram" in mode else ""
            sslmode = "require" if "tls" in mode else "disable"
            url = f"postgresql://{USER}{password}@127.0.0.1:{pg.port}/postgres?sslmode={sslmode}"
        first = pg.sql("SELECT pg_backend_pid()")[0][0] if callgrind else 0  # the fleet's backends come after
        for n in range(hosts):
            env = dict(os.environ, DATABASE_URL=url, REDIS_URL=redis.url(), HEARTBEAT_INTERVAL=str(interval),
                       HEARTBEAT_TIMEOUT="5", HEARTBEAT_BACKEND_IP=f"10.50.{n // 250}.{n % 250 + 1}",
                       HEARTBEAT_SPOOL_PATH=str(tmp / f"spool-{n}.db"), HEARTBEAT_LOG_LEVEL="WARNING")
            if tree:
                env["PYTHONPATH"] = tree
            daemons.append(subprocess.Popen([sys.executable, "-m", "heartbeatd", "run"], env=env, cwd=tmp,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(max(5.0, 3 * interval))  # imports, first connections
        if callgrind:  # counted from here on: not this run's setup, nor a backend's first statements
            since = time.time()
            if bouncer is not None:  # the one server connection, forked after `first`, counts from now on
                zero = psycopg2.connect(url)
                with zero.cursor() as cur:
                    cur.execute("SELECT pg_sleep(0)")
                zero.close()
            else:  # each cycle a backend of its own: those forked from now on
                first = pg.sql("SELECT pg_backend_pid()")[0][0]
            time.sleep(seconds)
            for d in daemons:
                d.terminate()
            for d in daemons:
                d.wait(30)
            end = time.time()
            last = pg.sql("SELECT pg_backend_pid()")[0][0]  # the backends forked since are not the fleet's
            cycles = pg.sql("SELECT count(*) FROM service_heartbeat WHERE service_name = '后端' AND created_at "
                            ">= to_timestamp(%s) AT TIME ZONE 'utc' AND created_at < to_timestamp(%s) AT TIME ZONE 'utc'",
                            (since, end))[0][0]
            if bouncer is not None:
                bouncer.destroy()
                bouncer = None
            pg.stop()  # every backend writes its file as it exits
            return {"pg_minstr": server_instructions(out, first, last) / max(cycles, 1) / 1e6,
                    "cycles": float(cycles)}
        master = int((pg.data / "postmaster.pid").read_text().split()[0])
        start = time.time()
        pg0, pool0 = cpu(master, children_of=True), cpu(bouncer.proc.pid) if bouncer and bouncer.proc else 0.0
        d0 = sum(cpu(d.pid) for d in daemons)
        slots = []
        watcher = pg.connect()  # one connection for the whole sampling: no fork per sample in the figures
        with watcher.cursor() as cur:
            while time.time() - start < seconds:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                            "AND pid <> pg_backend_pid()")
                slots.append(cur.fetchone()[0])
                time.sleep(0.25)
        watcher.close()
        pg1, pool1 = cpu(master, children_of=True), cpu(bouncer.proc.pid) if bouncer and bouncer.proc else 0.0
        d1 = sum(cpu(d.pid) for d in daemons)
        end = time.time()
        cycles = pg.sql("SELECT count(*) FROM service_heartbeat WHERE service_name = '后端' AND created_at "
                        ">= to_timestamp(%s) AT TIME ZONE 'utc' AND created_at < to_timestamp(%s) AT TIME ZONE 'utc'",
                        (start, end))[0][0]
        cycles = max(cycles, 1)
        # The sampling connection's backend is in the postmaster's figures too: one short query every
        # 0.25 s on one connection, small next to the fleet's, and the same in every mode.
        return {"pg_ms": (pg1 - pg0) / cycles * 1000, "pool_ms": (pool1 - pool0) / cycles * 1000,
                "daemon_ms": (d1 - d0) / cycles * 1000, "slots_mean": mean(slots), "slots_max": float(max(slots)),
                "cycles": float(cycles)}
    finally:
        for d in daemons:
            d.terminate()
        for d in daemons:
            try:
                d.wait(10)
            except subprocess.TimeoutExpired:
                d.kill()
        if bouncer is not None:
            bouncer.destroy()
        redis.destroy()
        pg.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=30)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--modes", default="direct,pgbouncer,tls,scram,tls+scram")
    parser.add_argument("--trees", default="", help="comma-separated source trees to compare (default: this one)")
    parser.add_argument("--tables", default="app", help="comma-separated: app, plain, partitioned (default app)")
    parser.add_argument("--behind", type=int, default=0,
                        help="the partitioned table also has this many day partitions before today's (empty)")
    parser.add_argument("--server-callgrind", action="store_true",
                        help="PostgreSQL under callgrind: its instructions per cycle instead of CPU time")
    args = parser.parse_args()
    print(f"{args.hosts} daemons at {args.interval:g} s for {args.seconds:g} s, {args.rounds} round(s); "
          f"{os.cpu_count()} cores")
    if args.server_callgrind:
        print(f"{'mode':<11} {'PostgreSQL Minstr/cycle':>24} {'cycles':>8}")
    else:
        print(f"{'mode':<11} {'PostgreSQL ms/cycle':>20} {'pooler ms/cycle':>16} {'daemon ms/cycle':>16} "
              f"{'slots mean/max':>15} {'hosts/PG core @30s':>19}")
    runs = [(mode, tree, table) for mode in args.modes.split(",") for tree in args.trees.split(",")
            for table in args.tables.split(",")]
    results: dict[tuple[str, str, str], list[dict[str, float]]] = {run: [] for run in runs}
    for _ in range(args.rounds):  # round by round: drift falls on every variant alike
        for run in runs:
            results[run].append(run_mode(run[0], args.hosts, args.interval, args.seconds, run[1], run[2],
                                         args.server_callgrind, args.behind))
    for (mode, tree, table), rounds in results.items():
        if tree or args.tables != "app":
            print(f"-- {tree or 'this tree'}, {table} table")
        r = {k: mean(x[k] for x in rounds) for k in rounds[0]}
        if args.server_callgrind:
            spread = f" ({min(x['pg_minstr'] for x in rounds):.2f}-{max(x['pg_minstr'] for x in rounds):.2f})"
            print(f"{mode:<11} {r['pg_minstr']:>12.2f}{spread:>12} {r['cycles']:>8.0f}")
            continue
        spread = f" ({min(x['pg_ms'] for x in rounds):.2f}-{max(x['pg_ms'] for x in rounds):.2f})" if args.rounds > 1 else ""
        capacity = 30 / (r["pg_ms"] / 1000) if r["pg_ms"] else float("inf")
        print(f"{mode:<11} {r['pg_ms']:>12.2f}{spread:>8} {r['pool_ms']:>16.2f} {r['daemon_ms']:>16.2f} "
              f"{r['slots_mean']:>9.1f}/{r['slots_max']:<5.0f} {capacity:>19,.0f}")


if __name__ == "__main__":
    try:
        main()
    finally:
        remove_template()  # the run's initdb template: a benchmark leaves nothing in the temp dir either
