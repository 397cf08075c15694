"""The compound-fault soak, short and seeded: every nemesis kind but one, overlapping, and the checker.

A long one is a command (README, Development): `python tests/soak.py --seconds 3600 --seed N`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).parent / "soak.py"


def test_short_seeded_soak_passes_every_check() -> None:
    # Seed 10 makes 28 faults in 35 s: all the kinds but a slow PostgreSQL, several at once.
    result = subprocess.run([sys.executable, str(SOAK), "--seconds", "35", "--seed", "10"],
                            capture_output=True, text=True, timeout=240)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    checks = [line for line in result.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(checks) == 9 and all(line.startswith("PASS") for line in checks), report
    assert "daemon-kill" in result.stdout and "table-refuses" in result.stdout, report
