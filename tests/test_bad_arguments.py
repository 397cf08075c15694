"""Bad command-line values: one line and exit 64, checked where argparse parses them, before any connection."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import clean_env, cli, db_url, init_table
from servers import PgServer

# Each of these ended in 70 (OverflowError, a directory as a file) or ran on with nan/inf in 1.5.1.
BAD = [
    (["status", "--window", "9999999w"], "argument --window"),
    (["status", "--window", "0s"], "argument --window"),
    (["prune", "--older-than", "9999999w"], "argument --older-than"),
    (["prune", "--older-than", "30m"], "argument --older-than"),
    (["report", "--since", "9999999w"], "argument --since"),
    (["report", "--since", "0001-01-01T00:00+05:00"], "argument --since"),
    (["report", "--until", "soon"], "argument --until"),
    (["report", "--gap", "nan"], "argument --gap"),
    (["report", "--gap", "inf"], "argument --gap"),
    (["report", "--gap", "1e-9"], "argument --gap"),
    (["report", "--gap", "-1"], "argument --gap"),
    (["report", "--timeout", "-5"], "argument --timeout"),
    (["report", "--timeout", "nan"], "argument --timeout"),
    (["prune", "--timeout", "0"], "argument --timeout"),
    (["init-db", "--timeout", "601"], "argument --timeout"),
    (["status", "--format", "prometheus", "--output", "/"], "argument --output"),
]


@pytest.mark.parametrize("args, fragment", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_argument_is_one_line_and_64(pg: PgServer, tmp_path: Path, args: list[str], fragment: str) -> None:
    init_table(pg)
    env = clean_env(DATABASE_URL=db_url(pg), REDIS_URL="redis://127.0.0.1:1/0")
    result = cli(args, env, cwd=tmp_path)
    assert result.returncode == 64, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"heartbeatd: {fragment}: "), result.stderr
    assert args[-1] in lines[0]  # the value, as given
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_an_output_directory_is_refused_and_a_good_output_written(pg: PgServer, tmp_path: Path) -> None:
    init_table(pg)
    env = clean_env(DATABASE_URL=db_url(pg), REDIS_URL="redis://127.0.0.1:1/0")
    result = cli(["status", "--format", "prometheus", "--output", str(tmp_path)], env, cwd=tmp_path)
    assert result.returncode == 64 and f"{str(tmp_path)!r} is a directory" in result.stderr
    out = tmp_path / "ledger.prom"
    assert cli(["status", "--format", "prometheus", "--output", str(out)], env, cwd=tmp_path).returncode == 0
    assert out.exists()


def test_good_values_at_the_bounds_still_run(pg: PgServer, tmp_path: Path) -> None:
    init_table(pg)
    env = clean_env(DATABASE_URL=db_url(pg), REDIS_URL="redis://127.0.0.1:1/0")
    for args in (["status", "--window", "36500d"], ["report", "--since", "36500d", "--gap", "0.01", "--timeout", "3600"],
                 ["prune", "--older-than", "1h", "--dry-run"], ["report", "--since", "2026-01-01"]):
        result = cli(args, env, cwd=tmp_path)
        assert result.returncode in (0, 1), (args, result.stderr)  # 1: nothing seen in the window
        assert "Traceback" not in result.stderr


def test_redis_protocol_4_is_a_bad_configuration(tmp_path: Path) -> None:
    result = cli(["check-config"], clean_env(REDIS_URL="redis://:Zq9pw@127.0.0.1:1/0?protocol=4",
                                             DATABASE_URL="postgresql://127.0.0.1:1/x"), cwd=tmp_path)
    assert result.returncode == 78, result.stderr
    assert result.stderr.strip() == "heartbeatd: REDIS_URL: protocol must be either 2 or 3"


def test_retention_beyond_the_bound_is_a_bad_configuration(tmp_path: Path) -> None:
    result = cli(["check-config"], clean_env(HEARTBEAT_RETENTION="9999999w"), cwd=tmp_path)
    assert result.returncode == 78
    assert result.stderr.strip() == ("heartbeatd: HEARTBEAT_RETENTION: must be a duration from 1h to 36500d such as "
                                     "30d or 12w, got '9999999w'")
