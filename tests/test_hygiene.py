"""The suite itself: it leaves nothing behind, and the README's commands are the ones CI runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import clean_env, db_url
from servers import PgServer, RedisServer

TOP = Path(__file__).resolve().parent.parent


def test_a_test_session_leaves_nothing_in_the_temp_dir() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="hb-hygiene-"))
    tmp.chmod(0o755)  # initdb runs as postgres
    try:
        _session_leaves_nothing(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _session_leaves_nothing(tmp: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp))
    # A database test (initdb template, private servers) and a real-daemon test (notify socket, spool).
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/test_ledger.py::test_each_time_column_gets_utc_of_its_kind",
                             "tests/test_daemon.py::test_ready_comes_before_dependencies_answer"],
                            cwd=TOP, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    left = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*"))
    assert left in ([], ["pytest-of-root"]), left  # pytest's own (empty) base directory may stay


def test_ci_runs_the_readme_test_command_which_installs_what_it_needs() -> None:
    readme = (TOP / "README.md").read_text()
    assert readme_command("test-command").startswith("bash tests/install-deps && ")
    assert "<!-- test-command -->" in (TOP / ".ci" / "run").read_text()
    assert "](../" not in readme and "apt-get" not in (TOP / ".ci" / "run").read_text()  # no link out of the repo


def readme_command(marker: str) -> str:
    block = (TOP / "README.md").read_text().split(f"<!-- {marker} -->")[1].split(f"<!-- /{marker} -->")[0]
    lines = [line for line in block.splitlines() if line and not line.startswith("```")]
    assert len(lines) == 1, lines
    return lines[0]


def test_readme_main_command_works_in_a_fresh_copy_and_venv(pg: PgServer, redis_server: RedisServer,
                                                           tmp_path: Path) -> None:
    copy = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(TOP), str(copy)], check=True, timeout=120)
    # The working tree as it is now (the clone has only what is committed).
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=TOP, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (TOP / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(TOP / name, copy / name)
    # The machine's own servers are not ours to use: the variables point the same command at private ones.
    env = clean_env(DATABASE_URL=db_url(pg), REDIS_URL=redis_server.url())
    result = subprocess.run(["bash", "-c", readme_command("run-command")], cwd=copy, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split("\t")[::4] for line in result.stdout.splitlines()[4:]] == [
        ["后端", "recorded"], ["redis", "recorded"], ["postgres", "recorded"]], result.stdout
    assert result.stdout.startswith("created index service_heartbeat_service_ip_time_idx\n"
                                    "created index service_heartbeat_created_at_brin\n"
                                    "created rollup table service_heartbeat_hourly\n"
                                    "table service_heartbeat and its indexes are ready")
