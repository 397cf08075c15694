"""Streaming-replica failover behind a multi-host DATABASE_URL: nothing lost, nothing twice."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from conftest import DaemonProcess, clean_env, init_table, rows
from servers import PgServer, RedisServer
from test_faults import assert_no_gap_no_duplicate, statuses

INTERVAL, TIMEOUT = 1.0, 0.3


def test_primary_stopped_standby_promoted(redis_server: RedisServer, tmp_path: Path,
                                          daemon: Callable[..., DaemonProcess]) -> None:
    primary = PgServer(timezone="Asia/Shanghai").start()
    standby = PgServer(host="127.0.0.2", timezone="Asia/Shanghai")
    try:
        init_table(primary, db="postgres")
        standby.make_standby_of(primary).start()
        url = (f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.2:{standby.port}/postgres"
               "?target_session_attrs=read-write&sslmode=disable")
        hosts = ["10.20.0.1", "10.20.0.2", "10.20.0.3"]
        procs = [daemon(clean_env(DATABASE_URL=url, REDIS_URL=redis_server.url(), HEARTBEAT_INTERVAL=str(INTERVAL),
                                  HEARTBEAT_TIMEOUT=str(TIMEOUT), HEARTBEAT_BACKEND_IP=ip,
                                  HEARTBEAT_SPOOL_PATH=str(tmp_path / f"spool-{ip}.db")))
                 for ip in hosts]
        for proc in procs:
            proc.wait_log("记录心跳成功 - 服务: postgres", 2)
        primary.stop()
        for proc in procs:
            proc.wait_for(lambda: statuses(proc, "postgres down") >= 2, what="cycles without a primary")  # noqa: B023
        standby.promote()
        promoted = datetime.now(timezone.utc).replace(tzinfo=None)
        for proc in procs:
            proc.wait_log("补写心跳 - ", timeout=20)
        time.sleep(2 * INTERVAL)
        for proc in procs:
            assert proc.stop() == 0
        found = rows(standby, db="postgres")
        for ip, proc in zip(hosts, procs):
            mine = [r for r in found if r[1] == ip]
            cycles = statuses(proc, "next in")
            assert len(assert_no_gap_no_duplicate(mine, "后端", INTERVAL, cycles)) == cycles, ip
            redis_rows = [r for r in found if r[0] == "redis" and r[2] in {m[2] for m in mine}]
            assert len(redis_rows) == cycles and len({r[2] for r in redis_rows}) == cycles, ip
            # Rows land again within one cycle of the promotion.
            after = sorted(r[3] for r in found if r[0] == "postgres" and r[3] >= promoted and r[2] in {m[2] for m in mine})
            assert after and (after[0] - promoted).total_seconds() <= INTERVAL + TIMEOUT * 3 + 0.5, (ip, after[:1])
            # The failure line names each host tried and why it refused.
            line = next(line for _, line in proc.lines if "数据库连接测试失败" in line)
            assert f"127.0.0.1:{primary.port}: Connection refused." in line, line
            assert f"127.0.0.2:{standby.port}: " in line and ("read-only" in line or "standby" in line), line
        assert {r[1] for r in found if r[0] == "postgres"} >= {"127.0.0.1", "127.0.0.2"}
    finally:
        standby.destroy()
        primary.destroy()
