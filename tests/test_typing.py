"""The package type-checks under `mypy --strict` (configured in pyproject.toml), and compiles without a
warning (an invalid escape in a SQL string is a DeprecationWarning in 3.11, a SyntaxWarning from 3.12)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent


def test_mypy_strict_is_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=TOP, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_module_compiles_without_a_warning() -> None:
    sources = sorted((TOP / "heartbeatd").rglob("*.py"))
    assert len(sources) > 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for source in sources:
            compile(source.read_text(), str(source), "exec")
