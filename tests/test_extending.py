"""The core's shape, proved on a copy of the package: a fourth check is one module plus one line, an
optional column is one entry in COLUMNS; both run for real against private servers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import clean_env, db_url, init_table
from servers import PgServer, RedisServer

PACKAGE = Path(__file__).resolve().parent.parent / "heartbeatd"

# The fourth check: a module that registers itself (its whole text, 28 lines) ...
FOURTH_CHECK = '''\
"""spool-disk: the directory of the spool can be written."""

import os
import time

from heartbeatd.config import Config
from heartbeatd.heartbeat import LOOPBACK, ProbeResult
from heartbeatd.probes import register


class SpoolDiskProbe:
    service = "spool-disk"

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def check(self, found: object, until: float) -> ProbeResult:
        start = time.monotonic()
        ok = os.access(self.directory, os.W_OK)
        return ProbeResult(self.service, LOOPBACK, ok, time.monotonic() - start, None if ok else "not writable")

    def close(self) -> None:
        pass


@register
def from_config(config: Config, resolver: object) -> SpoolDiskProbe:
    return SpoolDiskProbe(str(config.spool_path.parent))
'''
# ... and the one line that registers it.
MODULES_LINE = 'MODULES = ("redis_ping", "redis_sentinel", "postgres_connect", "backend_host")'
# The optional column: one entry in COLUMNS, with the function that takes its value from the result.
COLUMNS_END = '''    Column("latency_ms", "double precision", "extra", value=lambda result: round(result.latency * 1000, 3)),\n'''
IP_FAMILY = '''    Column("ip_family", "smallint", "extra", value=lambda result: 6 if ":" in result.ip else 4),\n'''


def copy_with(tmp: Path, path: str, old: str, new: str) -> Path:
    """A copy of the package with one edit (`old` must occur exactly once)."""
    top = tmp / "copy"
    if not top.exists():
        shutil.copytree(PACKAGE, top / "heartbeatd", ignore=shutil.ignore_patterns("__pycache__"))
    target = top / "heartbeatd" / path
    text = target.read_text()
    assert text.count(old) == 1, (path, old)
    target.write_text(text.replace(old, new))
    return top


def run(top: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "heartbeatd", *args], env=dict(env, PYTHONPATH=str(top)),
                          cwd=top, capture_output=True, text=True, timeout=60)


def test_a_fourth_check_is_one_module_and_one_line(pg: PgServer, redis_server: RedisServer, tmp_path: Path) -> None:
    init_table(pg)
    top = copy_with(tmp_path, "probes/__init__.py", MODULES_LINE,
                    MODULES_LINE.replace('"backend_host")', '"backend_host", "spool_disk")'))
    (top / "heartbeatd" / "probes" / "spool_disk.py").write_text(FOURTH_CHECK)
    env = clean_env(DATABASE_URL=db_url(pg), REDIS_URL=redis_server.url(), HEARTBEAT_BACKEND_IP="10.4.4.4",
                    HEARTBEAT_SPOOL_PATH=str(tmp_path / "spool" / "s.db"))
    (tmp_path / "spool").mkdir()
    result = run(top, ["once"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == ["后端", "redis", "postgres", "spool-disk"]
    services = pg.sql("SELECT service_name FROM service_heartbeat ORDER BY service_name", db=pg.dbname)
    assert sorted(s for (s,) in services) == sorted(["后端", "redis", "postgres", "spool-disk"])


def test_an_optional_column_is_one_entry_in_columns(pg: PgServer, redis_server: RedisServer, tmp_path: Path) -> None:
    init_table(pg)
    pg.sql("ALTER TABLE service_heartbeat ADD COLUMN ip_family smallint", db=pg.dbname)
    top = copy_with(tmp_path, "heartbeat.py", COLUMNS_END, COLUMNS_END + IP_FAMILY)
    env = clean_env(DATABASE_URL=db_url(pg), REDIS_URL=redis_server.url(), HEARTBEAT_BACKEND_IP="10.4.4.4",
                    HEARTBEAT_SPOOL_PATH=str(tmp_path / "s.db"))
    result = run(top, ["once"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    found = pg.sql("SELECT service_name, ip_family FROM service_heartbeat", db=pg.dbname)
    assert len(found) == 3 and all(family == 4 for _, family in found), found
    # Spooled rows keep it: a row through the spool's file and back into the table.
    script = (
        "from datetime import datetime, timezone\n"
        "import psycopg2\n"
        "from pathlib import Path\n"
        "from heartbeatd.heartbeat import Row\nfrom heartbeatd.spool import Spool\nfrom heartbeatd.writer import Writer\n"
        f"spool = Spool(Path({str(tmp_path / 's.db')!r}), 100)\n"
        "t = datetime(2026, 1, 1, tzinfo=timezone.utc)\n"
        "spool.append([Row('redis', '10.6.6.6', t, (None, 6)), Row('redis', '10.6.6.7', t)])  # spooled before\n"
        "spool.close()\nspool = Spool(spool.path, 100)\n"
        f"conn = psycopg2.connect({db_url(pg)!r}); conn.autocommit = True\n"
        "writer, held = Writer(('service_heartbeat',), 5), [row for _, row in spool.oldest(10)]\n"
        "writer.write(conn, held[:1], dedupe=True)\n"
        "writer.write(conn, held[1:], dedupe=True)  # a statement whose extra values are all NULL\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=dict(env, PYTHONPATH=str(top)), cwd=top, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert pg.sql("SELECT ip_address, ip_family FROM service_heartbeat WHERE ip_address LIKE '10.6.6.%%' "
                  "ORDER BY 1", db=pg.dbname) == [("10.6.6.6", 6), ("10.6.6.7", None)]
    # A table without the column is written as today.
    pg.sql("ALTER TABLE service_heartbeat DROP COLUMN ip_family", db=pg.dbname)
    result = run(top, ["once"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert pg.sql("SELECT count(*) FROM service_heartbeat", db=pg.dbname) == [(8,)]
