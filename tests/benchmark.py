"""Benchmark (a script, not a test): CPU per cycle and RSS of the daemon next to a minimal loop.

    python tests/benchmark.py [--cycles 3000] [--interval 0.05]

Starts private PostgreSQL and Redis, runs `heartbeatd run` at a short interval, and in the same
run a minimal loop doing the same work (fresh PostgreSQL connect, one 3-row INSERT on it, close;
Redis PING on a kept client). Prints CPU ms per cycle for both, and the daemon's RSS at start and
after the cycles. Targets: daemon CPU per cycle <= 1.1x the minimal loop, RSS <= 40 MB and flat.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from servers import PgServer, RedisServer  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")

MINIMAL = r"""
import resource, sys, time, datetime
import psycopg2, redis
dsn, url, cycles, interval = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
r = redis.Redis.from_url(url)
def cycle():
    r.ping()
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    now = datetime.datetime.utcnow()
    with conn.cursor() as cur:
        cur.execute("INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at) "
                    "VALUES (%s,%s,%s,%s),(%s,%s,%s,%s),(%s,%s,%s,%s)",
                    ["后端", "10.0.0.1", now, now, "redis", "127.0.0.1", now, now, "postgres", "127.0.0.1", now, now])
    conn.close()
for _ in range(100):
    cycle()
start = resource.getrusage(resource.RUSAGE_SELF)
next_start = time.monotonic()
for _ in range(cycles):
    cycle()
    next_start += interval
    time.sleep(max(0.0, next_start - time.monotonic()))
end = resource.getrusage(resource.RUSAGE_SELF)
print((end.ru_utime + end.ru_stime - start.ru_utime - start.ru_stime) / cycles * 1000)
"""


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=3000)
    parser.add_argument("--interval", type=float, default=0.05)
    args = parser.parse_args()

    pg, redis = PgServer().start(), RedisServer().start()
    tmp = Path(tempfile.mkdtemp(prefix="hb-bench-"))
    try:
        from heartbeatd.writer import CREATE_TABLE, index_name
        pg.sql(CREATE_TABLE.format(table="service_heartbeat", index=index_name(("service_heartbeat",))))
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(tmp / "notify.sock"))
        notify.settimeout(30)
        env = dict(os.environ, DATABASE_URL=pg.url(), REDIS_URL=redis.url(), HEARTBEAT_INTERVAL=str(args.interval),
                   HEARTBEAT_TIMEOUT="5", HEARTBEAT_SPOOL_PATH=str(tmp / "spool.db"), HEARTBEAT_BACKEND_IP="10.0.0.1",
                   NOTIFY_SOCKET=str(tmp / "notify.sock"))
        daemon = subprocess.Popen([sys.executable, "-m", "heartbeatd", "run"], env=env, cwd=tmp,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def wait_cycles(n: int) -> None:
            seen = 0
            while seen < n:
                if b"next in" in notify.recv(4096):
                    seen += 1

        wait_cycles(100)  # warm up: imports, first connections, column-type lookup
        # The minimal loop runs at the same time, so both see the same machine (caches, clock
        # speed, the servers' load): measured one after the other, the ratio drifts by +-0.15.
        minimal = subprocess.Popen([sys.executable, "-c", MINIMAL, pg.url(), redis.url(), str(args.cycles),
                                    str(args.interval)], stdout=subprocess.PIPE, text=True)
        cpu0, rss0 = proc_cpu_seconds(daemon.pid), proc_rss_mb(daemon.pid)
        wait_cycles(args.cycles)
        cpu1, rss1 = proc_cpu_seconds(daemon.pid), proc_rss_mb(daemon.pid)
        daemon.terminate()
        daemon.wait(10)
        minimal_out, _ = minimal.communicate(timeout=args.cycles * args.interval * 4 + 60)
        daemon_ms = (cpu1 - cpu0) / args.cycles * 1000
        minimal_ms = float(minimal_out.strip())
        print(f"cycles measured:          {args.cycles} at {args.interval:g} s")
        print(f"daemon CPU per cycle:     {daemon_ms:.3f} ms")
        print(f"minimal loop CPU/cycle:   {minimal_ms:.3f} ms")
        print(f"ratio:                    {daemon_ms / minimal_ms:.2f}x (target <= 1.1x)")
        print(f"daemon RSS:               {rss0:.1f} MB after warm-up, {rss1:.1f} MB after {args.cycles} cycles "
              f"(target <= 40 MB and flat)")
    finally:
        pg.destroy()
        redis.destroy()


if __name__ == "__main__":
    main()
