"""A compound-fault soak: several nemeses at once against a real daemon on private servers, then a checker.

    python tests/soak.py --seconds 600 --seed 7 [--keep DIR] [--partitioned]

Needs root (a tmpfs for the spool, `runuser postgres` for initdb). The daemon runs as a real process
reading an env file, with a real notify socket and WATCHDOG_USEC; PostgreSQL is reached through two
hosts in DATABASE_URL, each a proxy that a nemesis can slow down or freeze, and Redis through a
third. Faults, chosen by the seed, overlap: PostgreSQL stopped, frozen, slow, its first listed host
frozen, its table refusing every row, its database read-only; Redis stopped, frozen, slow; the
daemon SIGKILLed and restarted; SIGHUP storms; bad reloads; the spool's file system full; a second
instance on the same spool. Every fault's window is recorded. Then everything is healed, the
backlog given time to drain, the daemon stopped with SIGTERM, and the checker reads the table, the
spool, the notify socket and the exit statuses. It prints the fault table and one line per check,
and exits 1 if any check failed (with the offending rows or gaps; --keep DIR keeps the logs).
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).parent))
from conftest import DaemonProcess, clean_env, cli, fill, init_table  # noqa: E402
from proxy import DelayProxy  # noqa: E402
from servers import PgServer, RedisServer, remove_template  # noqa: E402

INTERVAL, TIMEOUT = 1.5, 0.2  # 3 steps x 0.2 s plus a replay batch fit in the interval: no start is skipped
WATCHDOG_USEC = 3_000_000  # pings due every 1.5 s
BACKEND_IP = "10.77.0.1"
SLACK = 0.15  # seconds of scheduling noise allowed on this 2-core VM
KINDS = ("pg-stop", "pg-freeze", "pg-slow", "pg-first-frozen", "table-refuses", "db-read-only", "redis-stop",
         "redis-freeze", "redis-slow", "daemon-kill", "sighup-storm", "bad-reload", "spool-full", "second-instance")
# Faults that cannot hold at the same time as another of their group (a stopped server is not frozen).
GROUPS = {"pg-stop": "pg", "pg-freeze": "pg", "redis-stop": "redis", "redis-freeze": "redis"}
NEEDS_PG = ("table-refuses", "db-read-only")  # made and undone by SQL: only while PostgreSQL answers
NEEDS_DAEMON = ("sighup-storm", "bad-reload", "second-instance", "daemon-kill")
BAD_VALUES = ("HEARTBEAT_INTERVAL=soon", "HEARTBEAT_TIMEOUT=0.6", "REDIS_URL=redis://127.0.0.1:1/0?foo=bar",
              "HEARTBEAT_LOG_LEVEL=LOUD", "HEARTBEAT_SPOOL_PATH={dir}")


def now() -> float:
    return time.time()


def naive(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, timezone.utc).replace(tzinfo=None)


@dataclass
class Fault:
    kind: str
    start: float  # wall clock, when the fault took hold
    end: Optional[float] = None  # when it was undone
    detail: str = ""


@dataclass
class Life:
    """One daemon process."""

    proc: DaemonProcess
    started: float
    ended: Optional[float] = None
    killed: bool = False  # by the soak, on purpose
    lossy: bool = False  # killed while rows were held in memory only (the spool file full)
    refused: bool = False  # started while the env file was bad, and so exited (must be 78)
    status: Optional[int] = None


@dataclass(order=True)
class Event:
    at: float
    seq: int
    action: Callable[[], None] = field(compare=False)


# service_heartbeat partitioned by day, as pg_partman makes it: the primary key holds the partition key.
PARTITIONED = """CREATE TABLE service_heartbeat (
    id bigserial, service_name varchar(50) NOT NULL, ip_address varchar(64) NOT NULL,
    report_time timestamp NOT NULL, created_at timestamp NOT NULL DEFAULT (now() AT TIME ZONE 'utc'),
    PRIMARY KEY (id, report_time)) PARTITION BY RANGE (report_time)"""


class Soak:
    def __init__(self, seconds: float, seed: int, root: Path, partitioned: bool = False) -> None:
        self.seconds, self.seed, self.root = seconds, seed, root
        self.partitioned = partitioned
        self.rng = random.Random(seed)
        self.faults: list[Fault] = []
        self.lives: list[Life] = []
        self.active: dict[str, Fault] = {}
        self.t0 = self.healed = 0.0
        self.drained = False
        self.active_detail = ""
        self.second_instances: list[tuple[int, float, bool]] = []
        self.events: list[Event] = []
        self._seq = 0

    # -- set-up -------------------------------------------------------------------------------

    def start(self) -> None:
        self.pg = PgServer(timezone="Asia/Shanghai").start()
        self.pg.sql("CREATE DATABASE soak")
        if self.partitioned:
            self.make_partitioned()
        else:
            init_table(self.pg, db="soak")
        self.redis = RedisServer().start()
        self.pg_first = DelayProxy(self.pg.host, self.pg.port, 0.0)
        self.pg_second = DelayProxy(self.pg.host, self.pg.port, 0.0)
        self.redis_proxy = DelayProxy(self.redis.host, self.redis.port, 0.0)
        self.small = self.root / "small"
        self.small.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(self.small)], check=True)
        self.spool = self.small / "spool.db"
        self.env_file = self.root / "hb.env"
        self.good_env = (
            f"DATABASE_URL=postgresql://postgres@127.0.0.1:{self.pg_first.port},127.0.0.1:{self.pg_second.port}/soak\n"
            f"REDIS_URL=redis://127.0.0.1:{self.redis_proxy.port}/0\nHEARTBEAT_INTERVAL={INTERVAL}\n"
            f"HEARTBEAT_TIMEOUT={TIMEOUT}\nHEARTBEAT_BACKEND_IP={BACKEND_IP}\nHEARTBEAT_SPOOL_PATH={self.spool}\n"
            f"HEARTBEAT_TEXTFILE={self.small / 'heartbeatd.prom'}\n")  # on the tmpfs that spool-full fills
        self.env_file.write_text(self.good_env)
        self.env = clean_env(PYTHONHASHSEED=str(self.seed))
        self.spawn()

    def make_partitioned(self) -> None:
        """A partition per UTC day from yesterday to a day past the run, and a DEFAULT; indexes by init-db."""
        self.pg.sql(PARTITIONED, db="soak")
        first = naive(now()).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
        for n in range(int(self.seconds // 86400) + 3):
            start = first + timedelta(days=n)
            self.pg.sql(f"CREATE TABLE service_heartbeat_p{start:%Y%m%d} PARTITION OF service_heartbeat "
                        f"FOR VALUES FROM ('{start:%Y-%m-%d}') TO ('{start + timedelta(days=1):%Y-%m-%d}')", db="soak")
        self.pg.sql("CREATE TABLE service_heartbeat_default PARTITION OF service_heartbeat DEFAULT", db="soak")
        done = cli(["init-db"], clean_env(DATABASE_URL=self.pg.url(db="soak")))
        if done.returncode != 0:
            raise RuntimeError(f"init-db on the partitioned table failed: {done.stderr}")

    def spawn(self) -> None:
        if self.lives and self.daemon.proc.proc.poll() is None:
            return  # one daemon at a time: a second one is its own nemesis
        proc = DaemonProcess(self.root, self.env, ["--env-file", str(self.env_file)], watchdog_usec=WATCHDOG_USEC)
        self.lives.append(Life(proc, now()))

    @property
    def daemon(self) -> Life:
        return self.lives[-1]

    def daemon_ready(self) -> bool:
        """Running and past READY=1: as under systemd, which sends no reload to a unit still starting."""
        return self.daemon.proc.proc.poll() is None and bool(self.daemon.proc.notices("READY=1"))

    def stop(self) -> None:
        for proxy in (self.pg_first, self.pg_second, self.redis_proxy):
            proxy.close()
        for life in self.lives:
            life.proc.kill()
        self.redis.destroy()
        self.pg.destroy()
        subprocess.run(["umount", "-l", str(self.small)], check=False)

    # -- PostgreSQL administration (the soak's own connection, never through the proxies) -----

    def admin(self, query: str, db: str = "soak") -> None:
        conn = self.pg.connect(db)
        try:
            with conn.cursor() as cur:
                cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE")
                cur.execute(query)
        finally:
            conn.close()

    def pg_answers(self) -> bool:
        return not ({"pg-stop", "pg-freeze"} & set(self.active))

    # -- the nemeses ----------------------------------------------------------------------------

    def begin(self, kind: str) -> Optional[Callable[[], None]]:
        """Make the fault happen; return what undoes it (None for an instant fault)."""
        if kind == "pg-stop":
            self.pg.stop()
            return self.pg.start
        if kind == "pg-freeze":
            self.pg.freeze()
            return self.pg.thaw
        if kind in ("pg-slow", "redis-slow"):
            proxy = self.pg_second if kind == "pg-slow" else self.redis_proxy
            proxy.delay = self.rng.choice((0.05, 0.1, 0.3))
            self.active_detail = f"{proxy.delay:g}s per reply"
            return lambda: setattr(proxy, "delay", 0.0)
        if kind == "pg-first-frozen":
            self.pg_first.frozen = True
            return lambda: setattr(self.pg_first, "frozen", False)
        if kind == "table-refuses":
            self.admin("ALTER TABLE service_heartbeat ADD COLUMN host text NOT NULL DEFAULT 'x'")
            self.admin("ALTER TABLE service_heartbeat ALTER COLUMN host DROP DEFAULT")
            return lambda: self.admin("ALTER TABLE service_heartbeat DROP COLUMN host")
        if kind == "db-read-only":
            self.admin("ALTER DATABASE soak SET default_transaction_read_only = on", db="postgres")
            return lambda: self.admin("ALTER DATABASE soak RESET default_transaction_read_only", db="postgres")
        if kind == "redis-stop":
            self.redis.stop()
            return self.redis.start
        if kind == "redis-freeze":
            self.redis.freeze()
            return self.redis.thaw
        if kind == "spool-full":
            filler = fill(self.small)
            return lambda: filler.unlink(missing_ok=True)
        if kind == "bad-reload":
            bad = self.rng.choice(BAD_VALUES).format(dir=self.root)
            self.active_detail = bad
            self.env_file.write_text(self.good_env + bad + "\n")
            self.daemon.proc.signal(signal.SIGHUP)

            def restore() -> None:
                self.env_file.write_text(self.good_env)
                life = self.daemon
                while life.proc.proc.poll() is None and not self.daemon_ready():
                    time.sleep(0.05)
                if life.proc.proc.poll() is None:
                    life.proc.signal(signal.SIGHUP)
                    return
                if life.killed:
                    return  # the kill's own restart follows, and reads the good file
                # Restarted (after a SIGKILL) while the file was bad: it refused to start, as it must
                # (78); the operator fixes the file and starts it again.
                life.status, life.ended, life.refused = life.proc.proc.returncode, now(), True
                self.spawn()
            return restore
        if kind == "sighup-storm":
            count = self.rng.randint(5, 30)
            self.active_detail = f"{count} SIGHUPs"
            for _ in range(count):
                self.daemon.proc.signal(signal.SIGHUP)
                time.sleep(0.01)
            return None
        if kind == "daemon-kill":
            life = self.daemon
            status = [s for _, s in life.proc.notices("STATUS=")]
            life.lossy = bool(status) and "in memory only" in status[-1]
            life.proc.proc.kill()
            life.status = life.proc.proc.wait()
            life.ended, life.killed = now(), True
            self.active_detail = "rows in memory only" if life.lossy else ""
            return self.spawn
        if kind == "second-instance":
            started = time.monotonic()
            result = subprocess.run([sys.executable, "-m", "heartbeatd", "run", "--env-file", str(self.env_file)],
                                    env=self.env, cwd=self.root, capture_output=True, text=True, timeout=30)
            # Refused by the lock, unless the env file is bad right now (then by the file first).
            by_lock = "is in use by another heartbeatd" in result.stderr
            self.second_instances.append((result.returncode, time.monotonic() - started,
                                          by_lock or "bad-reload" in self.active))
            self.active_detail = f"exit {result.returncode} in {time.monotonic() - started:.2f}s"
            return None
        raise ValueError(kind)

    def schedule(self, at: float, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self.events, Event(at, self._seq, action))

    def plan(self, t0: float, until: float) -> None:
        """Fault starts by the seed: about one every two seconds, each lasting 1-6 s, overlapping."""
        at = t0 + 3.0
        while at < until:
            kind = self.rng.choice(KINDS)
            hold = self.rng.uniform(1.0, 6.0)
            if kind == "daemon-kill":
                hold = self.rng.uniform(0.0, 2.0)
            self.schedule(at, lambda kind=kind, hold=hold: self.try_begin(kind, hold))
            at += self.rng.expovariate(1 / 2.0)

    def try_begin(self, kind: str, hold: float) -> None:
        if now() > self.t0 + self.seconds:
            return  # no new fault once the time is up
        group = GROUPS.get(kind)
        busy = kind in self.active or (group and any(GROUPS.get(k) == group for k in self.active))
        if busy or (kind in NEEDS_PG and not self.pg_answers()) or (kind in NEEDS_DAEMON and not self.daemon_ready()):
            self.schedule(now() + 1.0, lambda: self.try_begin(kind, hold))  # later, when it can hold
            return
        self.active_detail = ""
        undo = self.begin(kind)
        fault = Fault(kind, now(), detail=self.active_detail)
        self.faults.append(fault)
        if undo is None:
            fault.end = fault.start
            return
        self.active[kind] = fault
        self.schedule(now() + hold, lambda: self.try_end(kind, undo))

    def try_end(self, kind: str, undo: Callable[[], None]) -> None:
        if kind in NEEDS_PG and not self.pg_answers():
            self.schedule(now() + 0.5, lambda: self.try_end(kind, undo))
            return
        self.active[kind].end = now()
        undo()
        del self.active[kind]

    def run(self) -> None:
        """Make faults for `seconds`, then heal: every fault still holding is undone at its time."""
        self.t0 = now()
        self.plan(self.t0, self.t0 + self.seconds)
        while self.events:
            event = heapq.heappop(self.events)
            delay = event.at - now()
            if delay > 0:
                time.sleep(delay)
            event.action()
        self.healed = now()

    def drain(self, limit: float) -> bool:
        """Wait until STATUS says nothing is spooled, held in memory or set aside."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            status = [s for _, s in self.daemon.proc.notices("STATUS=")]
            if status and now() - self.healed > 2 * INTERVAL and not any(
                    w in status[-1] for w in ("spooled", "in memory", "rejected", "cycle failed", "down")):
                return True
            time.sleep(0.2)
        return False

    def finish(self) -> None:
        life = self.daemon
        self.drained = self.drain(120.0)
        # Right after a cycle, in the nap: a SIGTERM during the checks would rightly leave what they
        # found in the spool, which the last check would then count against the daemon.
        seen = len(life.proc.notices("STATUS="))
        deadline = time.monotonic() + 3 * INTERVAL
        while len(life.proc.notices("STATUS=")) == seen and time.monotonic() < deadline:
            time.sleep(0.005)
        life.status = life.proc.stop(15)  # one SIGTERM, as systemd sends: a second one could land in
        # the interpreter's own shutdown, after the daemon's work is done, where Python has put the
        # default action back, and the exit would read -15
        life.ended = now()


# -- the checker ---------------------------------------------------------------------------------

def check(soak: Soak) -> list[tuple[bool, str]]:
    results: list[tuple[bool, str]] = []
    table = soak.pg.sql("SELECT service_name, ip_address, report_time FROM service_heartbeat ORDER BY report_time",
                        db="soak")

    dups = soak.pg.sql("SELECT service_name, ip_address, report_time, count(*) FROM service_heartbeat "
                       "GROUP BY 1, 2, 3 HAVING count(*) > 1", db="soak")
    results.append((not dups, f"no duplicate (service, ip, report_time): {len(dups)} duplicated among {len(table)} "
                               f"rows{'; e.g. ' + repr(dups[:3]) if dups else ''}"))

    # 后端: a row every interval while a daemon ran, except across a daemon's death (and, if it died
    # with rows held in memory only because the spool's disk was full, since that disk filled).
    # From one running daemon's death to the next one's first cycle (a restart refused for a bad env
    # file in between ran no cycle); from the disk filling up if it died with rows in memory only.
    down: list[tuple[float, float]] = []
    ran = [life for life in soak.lives if life.proc.notices("READY=1")]
    for before, after in zip(ran, ran[1:]):
        lost_from = before.ended or after.started
        if before.lossy:
            full = [f.start for f in soak.faults if f.kind == "spool-full" and f.start <= lost_from]
            lost_from = max(full) if full else before.started
        down.append((lost_from, after.started + INTERVAL + 2.0))  # its first cycle comes once it has started
    backend = [r[2] for r in table if r[0] == "后端" and r[1] == BACKEND_IP]
    gaps = []
    for a, b in zip(backend, backend[1:]):
        if (b - a).total_seconds() > 1.5 * INTERVAL + SLACK:
            # Excused only when the window holds the gap: its last row before, its first row after.
            if not any(naive(lo - 1.5 * INTERVAL - SLACK) <= a and b <= naive(hi) for lo, hi in down):
                gaps.append((a, b))
    first, last = soak.lives[0].started, soak.lives[-1].ended or now()
    edge = []
    if not backend or (backend[0] - naive(first)).total_seconds() > INTERVAL + 3.0:
        edge.append("the first 后端 row came late")
    if not backend or (naive(last) - backend[-1]).total_seconds() > 1.5 * INTERVAL + SLACK:
        edge.append("the last 后端 row is missing")
    results.append((not gaps and not edge, f"后端 complete except across daemon-down windows: {len(backend)} rows, "
                                           f"{len(gaps)} gap(s) {[(str(a), str(b)) for a, b in gaps[:5]]} {edge}"))

    # No heartbeat of a server inside its own stopped or frozen window.
    margins = {"redis": TIMEOUT + SLACK, "postgres": 2 * TIMEOUT + SLACK}
    kinds = {"redis": ("redis-stop", "redis-freeze"), "postgres": ("pg-stop", "pg-freeze")}
    for service, margin in margins.items():
        windows = [(naive(f.start), naive((f.end or now()) - margin)) for f in soak.faults if f.kind in kinds[service]]
        inside = [(r[2], lo) for r in table if r[0] == service for lo, hi in windows if lo <= r[2] <= hi]
        results.append((not inside, f"no {service} row inside its server's stopped or frozen windows "
                                    f"({len(windows)}): {len(inside)} found {[str(i[0]) for i in inside[:5]]}"))

    # Exits: only the ones the soak caused; second instances refused with 78.
    unexpected = [(i, life.status) for i, life in enumerate(soak.lives) if life is not soak.lives[-1]
                  and not life.killed and not (life.refused and life.status == 78)]
    final = soak.lives[-1].status
    seconds = [s for s, _, _ in soak.second_instances]
    unlocked = [s for s, _, locked in soak.second_instances if not locked]
    results.append((not unexpected and final == 0 and all(s == 78 for s in seconds) and not unlocked,
                    f"no exit but those asked for: {sum(l.killed for l in soak.lives)} SIGKILLed, "
                    f"{sum(l.refused for l in soak.lives)} restart(s) into a bad env file refused with 78, final SIGTERM exit "
                    f"{final}, {len(seconds)} second instance(s) exited {sorted(set(seconds))} (max "
                    f"{max((t for _, t, _ in soak.second_instances), default=0):.2f}s, {len(unlocked)} not by the spool's lock), "
                    f"unexpected {unexpected}"))

    # The watchdog: never later than half of it, in any one daemon's life.
    worst = 0.0
    for life in soak.lives:
        pings = [at for at, _ in life.proc.notices("WATCHDOG=1")] + [at for at, _ in life.proc.notices("READY=1")[:1]]
        pings.sort()
        worst = max([worst] + [b - a for a, b in zip(pings, pings[1:])])
    results.append((worst <= WATCHDOG_USEC / 2e6, f"WATCHDOG=1 never later than half the watchdog "
                                                  f"({WATCHDOG_USEC / 2e6:g}s): max gap {worst:.2f}s"))

    # A cycle's bug, a check's (its failed result), a reload's, or any traceback.
    bug = re.compile(r"心跳周期异常|internal error|Traceback|(重新加载配置失败|指标文件写入失败) - .*\b[A-Z]\w*(Error|Exception): ")
    bugs = [line for life in soak.lives for _, line in life.proc.lines if bug.search(line)]
    results.append((not bugs, f"no internal error in the log: {len(bugs)} {bugs[:2]}"))

    # The textfile, written through full disks and restarts: whole at the end, every service up, no
    # temporary file left behind.
    prom = soak.small / "heartbeatd.prom"
    text = prom.read_text() if prom.exists() else ""
    ups = dict(re.findall(r'^heartbeatd_up\{service="([^"]+)",ip="[^"]*"\} ([01])$', text, re.M))
    whole = bool(text) and all(re.fullmatch(r'# (HELP|TYPE) .*|[a-z_]+(\{[^}]*\})? -?[0-9.]+', line)
                               for line in text.splitlines())
    strays = [p.name for p in soak.small.iterdir() if p.name.endswith(".tmp")]
    results.append((whole and ups == {"后端": "1", "redis": "1", "postgres": "1"} and not strays,
                    f"the textfile whole at the end, every service up: up {ups}, well-formed {whole}, "
                    f"temporary files left {strays}"))

    held = sqlite3.connect(str(soak.spool)).execute(
        "SELECT count(*) - count(rejected), count(rejected) FROM spool").fetchone()
    results.append((soak.drained and held == (0, 0), f"the spool empty and nothing set aside at the end: "
                                                      f"{held[0]} waiting, {held[1]} set aside (drained: {soak.drained})"))
    return results


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long faults are made (default 60)")
    parser.add_argument("--seed", type=int, default=1, help="what chooses the faults (default 1)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the daemons' logs in this directory")
    parser.add_argument("--partitioned", action="store_true",
                        help="service_heartbeat partitioned by day (partitions covering the run, and a DEFAULT)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: needs root (a tmpfs for the spool, initdb as postgres)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="hb-soak-"))
    soak = Soak(args.seconds, args.seed, root, args.partitioned)
    try:
        soak.start()
        soak.run()
        soak.finish()
        results = check(soak)
        print(f"soak: seed {args.seed}, {args.seconds:g}s of faults, {len(soak.faults)} faults, "
              f"{len(soak.lives)} daemon process(es)" + (", partitioned table" if args.partitioned else ""))
        print(f"{'fault':<16} {'start':>8} {'end':>8}  detail")
        for fault in soak.faults:
            end = f"{(fault.end or now()) - soak.t0:8.2f}" if fault.end != fault.start else "       -"
            print(f"{fault.kind:<16} {fault.start - soak.t0:8.2f} {end}  {fault.detail}")
        for ok, line in results:
            print(f"{'PASS' if ok else 'FAIL'}  {line}")
        failed = not all(ok for ok, _ in results)
        if args.keep is not None or failed:
            keep = args.keep or Path(tempfile.mkdtemp(prefix=f"hb-soak-failed-{args.seed}-"))
            keep.mkdir(parents=True, exist_ok=True)
            for n, life in enumerate(soak.lives):
                (keep / f"daemon-{n}.log").write_text(life.proc.log() + "\n")
                (keep / f"daemon-{n}.notify").write_text(
                    "\n".join(f"{at:.3f} {data!r}" for at, data in life.proc.messages) + "\n")
            print(f"logs kept in {keep}")
        return 1 if failed else 0
    finally:
        soak.stop()
        remove_template()
        subprocess.run(["rm", "-rf", str(root)], check=False)


if __name__ == "__main__":
    sys.exit(main())
