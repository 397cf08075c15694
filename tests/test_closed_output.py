"""Output into a pipe whose reader went away (`heartbeatd status | head -1`, `| true`): no message, exit 141.

Each command runs with its stdout on a real pipe whose read end is already closed, so that its
first write fails as it does once `head` has its line: before, that was an internal error (70).
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import clean_env, db_url, init_table
from servers import PgServer

EX_PIPE = 141


def closed_pipe(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `python -m heartbeatd ARGS` with stdout on a pipe nobody reads any more."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "heartbeatd", *args], stdout=write, stderr=subprocess.PIPE,
                              env=env, cwd=cwd, text=True, timeout=60)
    finally:
        os.close(write)


def test_check_config_into_a_closed_pipe_is_quiet_and_141(tmp_path: Path) -> None:
    # Nothing connects: check-config does not, and the URL's port is closed.
    result = closed_pipe(["check-config"], clean_env(DATABASE_URL="postgresql://hb:Pw-s3cret@127.0.0.1:1/x"), tmp_path)
    assert (result.returncode, result.stderr) == (EX_PIPE, "")


@pytest.mark.parametrize("args", [["status"], ["status", "--format", "json"], ["report", "--since", "1d"],
                                  ["report", "--format", "csv"]])
def test_a_closed_pipe_after_reading_the_ledger_is_quiet_and_141(pg: PgServer, tmp_path: Path,
                                                                 args: list[str]) -> None:
    init_table(pg)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    pg.sql("INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at) VALUES "
           "('redis', '10.0.0.1', %s, %s)", (now, now), db=pg.dbname)
    result = closed_pipe(args, clean_env(DATABASE_URL=db_url(pg)), tmp_path)
    assert result.returncode == EX_PIPE and "BrokenPipe" not in result.stderr and "Error" not in result.stderr, \
        result.stderr
    # The commands still say what they say on stderr (report: where its figures came from), nothing else.
    assert all(line.startswith("report: ") for line in result.stderr.splitlines()), result.stderr


# Found in review: argparse drops a failed write of --help or --version, so unbuffered (PYTHONUNBUFFERED=1,
# as some units set) they exited 0 into a closed pipe, buffered 141.
@pytest.mark.parametrize("unbuffered", ["", "1"])
@pytest.mark.parametrize("args", [["--help"], ["--version"], ["prune", "--help"]])
def test_help_and_version_into_a_closed_pipe_are_141(tmp_path: Path, args: list[str], unbuffered: str) -> None:
    env = clean_env(DATABASE_URL="postgresql://127.0.0.1:1/x")
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    result = closed_pipe(args, env, tmp_path)
    assert (result.returncode, result.stderr) == (EX_PIPE, "")
