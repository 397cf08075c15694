"""Redis behind Sentinel: three real `redis-server --sentinel` processes, a master and a replica.

The master listens on 127.0.0.2 and the replica on 127.0.0.3, so a row's ip_address says which
one the check confirmed; the sentinels on 127.0.0.1.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import DaemonProcess, clean_env, cli, db_url, init_table, rows
from servers import PgServer, RedisServer, SentinelServer

MASTER, REPLICA = "127.0.0.2", "127.0.0.3"
SECRET = "s3nt-pw"


class Cluster:
    def __init__(self, sentinel_password: str | None = None) -> None:
        self.master = RedisServer(host=MASTER)
        self.master.start()
        self.replica = RedisServer(host=REPLICA, extra=["--replicaof", MASTER, str(self.master.port),
                                                         "--replica-announce-ip", REPLICA])
        self.replica.start()
        self.sentinels = [SentinelServer(self.master, password=sentinel_password).start() for _ in range(3)]
        # Until every sentinel knows the replica and the others, a failover cannot be asked for.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
                s.ask("SENTINEL", "replicas", "mymaster") and len(s.ask("SENTINEL", "sentinels", "mymaster")) == 2
                for s in self.sentinels):
            time.sleep(0.1)

    def url(self, options: str = "", service: str = "mymaster") -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{service}{options}"

    def where(self) -> str:
        addr = self.sentinels[0].master_addr()
        assert addr is not None
        return addr[0]

    def failover(self) -> str:
        """SENTINEL FAILOVER, then wait until every sentinel names the other server; its address."""
        before = self.where()
        deadline = time.monotonic() + 30
        while True:  # refused while the last failover settles ("INPROG", or no good replica yet)
            try:
                self.sentinels[0].ask("SENTINEL", "FAILOVER", "mymaster")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        while time.monotonic() < deadline:
            named = {s.master_addr()[0] for s in self.sentinels}  # type: ignore[index]
            if named == {({MASTER, REPLICA} - {before}).pop()}:
                return named.pop()
            time.sleep(0.1)
        raise AssertionError("the failover did not happen")

    def destroy(self) -> None:
        for server in self.sentinels + [self.replica, self.master]:
            server.destroy()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    yield c
    c.destroy()


def env(pg: PgServer, redis_url: str, **extra: str) -> dict[str, str]:
    return clean_env(DATABASE_URL=db_url(pg), REDIS_URL=redis_url, HEARTBEAT_TIMEOUT="1", **extra)


def redis_line(out: str) -> list[str]:
    return next(line for line in out.splitlines() if line.startswith("redis\t")).split("\t")


def test_the_master_the_sentinels_name_is_checked_and_recorded(pg: PgServer, cluster: Cluster) -> None:
    init_table(pg)
    result = cli(["once"], env(pg, cluster.url()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert redis_line(result.stdout)[:3] == ["redis", "up", MASTER]
    assert [r[1] for r in rows(pg) if r[0] == "redis"] == [MASTER]


def test_a_frozen_first_sentinel_does_not_starve_the_others(pg: PgServer, cluster: Cluster) -> None:
    init_table(pg)
    cluster.sentinels[0].freeze()
    try:
        result = cli(["once"], env(pg, cluster.url()))
    finally:
        cluster.sentinels[0].thaw()
    line = redis_line(result.stdout)
    assert line[:3] == ["redis", "up", MASTER], result.stdout
    assert float(line[3].rstrip("ms")) < 1000  # the first sentinel's share, then the second answered


def test_every_sentinel_down_no_master_known_and_a_master_that_is_a_replica(pg: PgServer, cluster: Cluster,
                                                                              tmp_path: Path) -> None:
    init_table(pg)
    unknown = cli(["once"], env(pg, cluster.url(service="nosuch")))
    assert unknown.returncode == 1  # once: a service down
    assert "no sentinel knows a master named 'nosuch'" in redis_line(unknown.stdout)[4]

    # A sentinel told the replica is the master (quorum 2 of 1: it never fails over by itself).
    wrong = SentinelServer(cluster.replica, quorum=2).start()
    try:
        result = cli(["once"], env(pg, f"redis+sentinel://127.0.0.1:{wrong.port}/mymaster"))
    finally:
        wrong.destroy()
    line = redis_line(result.stdout)
    assert line[1:3] == ["down", REPLICA]
    assert "the master the sentinels name, answers ROLE as a slave" in line[4]

    for sentinel in cluster.sentinels:
        sentinel.stop()
    down = cli(["once"], env(pg, cluster.url()))
    line = redis_line(down.stdout)
    assert line[1] == "down" and line[4].startswith("no sentinel answered (127.0.0.1:"), line
    assert line[4].count("Connection refused") == 3
    assert "postgres\tup" in down.stdout  # only the redis row is missing


def test_failover_both_ways_rows_follow_the_master_and_nothing_doubles(
        pg: PgServer, cluster: Cluster, daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    init_table(pg)
    proc = daemon(env(pg, cluster.url(), HEARTBEAT_INTERVAL="0.5", HEARTBEAT_SPOOL_PATH=str(tmp_path / "spool.db")))
    proc.wait_log("记录心跳成功 - 服务: redis")

    def redis_rows() -> list[tuple[str, object]]:
        return [(r[1], r[2]) for r in rows(pg) if r[0] == "redis"]

    def moved_to(address: str, after: int) -> bool:
        return any(ip == address for ip, _ in redis_rows()[after:])

    # 1. Asked for: SENTINEL FAILOVER.
    assert cluster.where() == MASTER
    mark = len(redis_rows())
    assert cluster.failover() == REPLICA
    switched = len(redis_rows())
    proc.wait_for(lambda: moved_to(REPLICA, switched), timeout=20, what="a redis row from the new master")
    # 2. Forced: the master (now the old replica) killed; the sentinels promote the other one.
    time.sleep(2)  # the old master has rejoined as a replica of the new one
    cluster.replica.stop()
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and cluster.where() != MASTER:
        time.sleep(0.2)
    assert cluster.where() == MASTER
    back = len(redis_rows())
    proc.wait_for(lambda: moved_to(MASTER, back), timeout=20, what="a redis row from the promoted master")
    time.sleep(1.5)
    assert proc.stop() == 0

    found = redis_rows()
    assert len({t for _, t in found}) == len(found)  # one redis row a cycle, never two
    # Once a row carries the new master, no later row carries the one it replaced.
    first_new = next(i for i, (ip, _) in enumerate(found) if i >= mark and ip == REPLICA)
    first_back = next(i for i, (ip, _) in enumerate(found) if i > first_new and ip == MASTER)
    assert all(ip == REPLICA for ip, _ in found[first_new:first_back])
    assert all(ip == MASTER for ip, _ in found[first_back:])
    assert "Traceback" not in proc.log()


def test_sentinel_password_and_the_urls_checked_and_masked(pg: PgServer, tmp_path: Path) -> None:
    init_table(pg)
    guarded = Cluster(sentinel_password=SECRET)
    try:
        ok = cli(["once"], env(pg, guarded.url(f"?sentinel_password={SECRET}")))
        assert redis_line(ok.stdout)[:3] == ["redis", "up", MASTER], ok.stdout + ok.stderr
        missing = cli(["once"], env(pg, guarded.url()))
        line = redis_line(missing.stdout)
        assert line[1] == "down" and "authentication" in line[4].lower(), line
        wrong = cli(["once"], env(pg, guarded.url("?sentinel_password=not-" + SECRET)))
        assert redis_line(wrong.stdout)[1] == "down"
        assert SECRET not in wrong.stdout + wrong.stderr
        shown = cli(["check-config"], env(pg, guarded.url(f"?sentinel_password={SECRET}").replace("//", f"//:{SECRET}@")))
        assert shown.returncode == 0 and SECRET not in shown.stdout
        assert "REDIS_URL=redis+sentinel://:***@127.0.0.1:" in shown.stdout and "sentinel_password=***" in shown.stdout
    finally:
        guarded.destroy()

    for bad, says in [("redis+sentinel://127.0.0.1:26379", "the path must be /service_name"),
                      ("redis+sentinel://127.0.0.1:99999/m", "bad port '99999'"),
                      ("redis+sentinel://127.0.0.1/m/x", "database must be a number"),
                      (f"redis+sentinel://127.0.0.1/m?sentinel_password={SECRET}&socket_timeout=1", "unknown option"),
                      ("rediss+sentinel://127.0.0.1/m", "rediss+sentinel:// (TLS to the sentinels) is not supported"),
                      (f"redis+sentinel://:{SECRET}@,127.0.0.1/m", "a sentinel with no host")]:
        for command in (["check-config"], ["run"]):
            result = cli(command, env(pg, bad), timeout=20)
            assert result.returncode == 78, (bad, result.stdout, result.stderr)
            assert len(result.stderr.splitlines()) == 1 and says in result.stderr, (bad, result.stderr)
            assert SECRET not in result.stderr + result.stdout and "Traceback" not in result.stderr
