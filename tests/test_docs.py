"""The documentation says what the code does: log lines, options, --help, packages, man page warnings.

Each failure names what is missing and where to add it, so documentation can be fixed when code
from several hands meets.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import docs
from heartbeatd import cli

ROOT = docs.ROOT


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser, by name, as `heartbeatd --help` knows them."""
    actions = [a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return dict(actions[0].choices)


def options(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """A command's own options (`--window`), each with its choices if it has any; not --help nor --env-file."""
    return {action.option_strings[-1]: [str(c) for c in action.choices or ()]
            for action in parser._actions
            if action.option_strings and action.option_strings[-1] not in ("--help", "--env-file")}


def unroff(text: str) -> str:
    """Roff source as the words it shows: font changes, break points and escapes gone."""
    text = re.sub(r"\\f[BIRP]|\\[&%:]|\\s[-+]?\d", "", text)
    return text.replace("\\-", "-").replace("\\e", "\\")


def man_section(name: str) -> str:
    page = docs.MAN_PAGE.read_text(encoding="utf-8")
    match = re.search(rf"^\.SH {name}\n(.*?)(?=^\.SH |\Z)", page, re.M | re.S)
    assert match, f"packaging/heartbeatd.8 has no .SH {name}"
    return match.group(1)


def mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


# --- Log lines -----------------------------------------------------------------------------------

def test_the_code_can_log_only_formats_it_writes_down() -> None:
    """Every logger call's format can be read from the code (no f-string, no computed message)."""
    found, problems = docs.log_formats()
    assert not problems, "\n".join(problems)
    assert len({f.text for f in found}) >= 30  # the finder sees the package's calls


def test_every_log_line_is_in_the_readme_table_with_its_level() -> None:
    found, _ = docs.log_formats()
    table = {(row.line, row.level) for row in docs.readme_log_lines()}
    missing = sorted({(f.level, f.text, f.where) for f in found if (f.text, f.level) not in table})
    assert not missing, (
        'README.md\'s "Log lines" table lacks these lines the code can write (add a row '
        "| `format` | LEVEL | meaning | what to do |, then run .venv/bin/python tests/docs.py --write):\n"
        + "\n".join(f"  {level} {text!r} ({where})" for level, text, where in missing))


def test_every_row_of_the_log_table_is_a_line_the_code_writes_and_says_what_to_do() -> None:
    found, _ = docs.log_formats()
    code = {(f.text, f.level) for f in found}
    rows = docs.readme_log_lines()
    stale = [f"{row.level} {row.line!r}" for row in rows if (row.line, row.level) not in code]
    assert not stale, ('README.md\'s "Log lines" table has rows no logger call in heartbeatd/ writes (the format '
                       "or level changed? remove or correct them):\n  " + "\n  ".join(stale))
    empty = [row.line for row in rows if not row.meaning.strip() or not row.action.strip()]
    assert not empty, f"rows without a meaning or a what-to-do: {empty}"
    twice = sorted({row.line for row in rows if sum(r.line == row.line for r in rows) > 1})
    assert not twice, f"rows given twice: {twice}"


def test_the_man_page_log_lines_are_made_from_the_readme_table() -> None:
    page = docs.MAN_PAGE.read_text(encoding="utf-8")
    assert docs.MAN_BEGIN in page, "packaging/heartbeatd.8 has no LOG LINES section: run tests/docs.py --write"
    expected = docs.man_with_log_lines(page, docs.man_log_lines(docs.readme_log_lines()))
    assert page == expected, ("packaging/heartbeatd.8's LOG LINES section is not the README table's: run "
                              ".venv/bin/python tests/docs.py --write")


def test_the_finder_sees_lines_through_relays_and_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    """A format handed to repeats.failed or built from a mapping is found; an f-string is refused by name."""
    package = tmp_path / "heartbeatd"
    package.mkdir()
    (package / "probe.py").write_text(
        'import logging\nlog = logging.getLogger("heartbeatd.daemon")\nLINES = {"a": "甲: %s"}\n'
        'def f(repeats, x):\n    line = LINES.get(x, "乙: %s")\n'
        '    repeats.failed("k", logging.ERROR, line, x)\n    log.info(f"丙 {x}")\n'
        '    parser.error(f"not a log line {x}")\n    hb.warning("丁 " + ("%s" if x else "%d"))\n'
        'hb = logging.getLogger("heartbeatd.cli")\n', encoding="utf-8")
    found, problems = docs.log_formats(package)
    assert {(f.text, f.level, f.where) for f in found} == {
        ("甲: %s", "ERROR", "heartbeatd/probe.py:6"), ("乙: %s", "ERROR", "heartbeatd/probe.py:6"),
        ("丁 %s", "WARNING", "heartbeatd/probe.py:9"), ("丁 %d", "WARNING", "heartbeatd/probe.py:9")}
    assert [p.split(" (")[0] for p in problems] == ["heartbeatd/probe.py:7: cannot read the format of this log call"]
    assert "f-string" in problems[0]


# --- Options, --help -----------------------------------------------------------------------------

def test_every_option_of_every_command_is_in_the_man_page_synopsis() -> None:
    blocks = [unroff(block) for block in man_section("SYNOPSIS").split(".br\n")]
    assert mentions(blocks[0], "--env-file"), "the man page's first SYNOPSIS line must show [--env-file PATH]"
    missing = []
    for name, parser in commands().items():
        mine = [block for block in blocks if mentions(block, name)]
        if not mine:
            missing.append(f"the command {name}")
            continue
        for option, choices in options(parser).items():
            if not any(mentions(block, option) for block in mine):
                missing.append(f"{name} {option}")
            missing += [f"{name} {option} {choice}" for choice in choices
                        if not any(mentions(block, choice) for block in mine)]
    assert not missing, ("packaging/heartbeatd.8's SYNOPSIS lacks (add them to the line of that command):\n  "
                         + "\n  ".join(missing))


def test_every_option_of_every_command_is_in_the_readme_commands_table() -> None:
    rows = [line for line in docs.section(docs.README.read_text(encoding="utf-8"), "Commands and exit statuses")
            .splitlines() if line.startswith("| `heartbeatd")]
    missing = []
    for name, parser in commands().items():
        mine = [row.split(" | ")[0] for row in rows if mentions(row.split(" | ")[0], name)]
        if not mine:
            missing.append(f"the command {name}")
            continue
        for option, choices in options(parser).items():
            if not any(mentions(cell, option) for cell in mine):
                missing.append(f"{name} {option}")
            missing += [f"{name} {option} {choice}" for choice in choices
                        if not any(mentions(cell, choice) for cell in mine)]
    assert not missing, ('README.md\'s "Commands and exit statuses" table lacks (add them to the command\'s first '
                         "cell):\n  " + "\n  ".join(missing))


def test_every_command_help_mentions_env_file() -> None:
    """Through the real command: `heartbeatd COMMAND --help` says --env-file works there too."""
    quiet = {k: v for k, v in os.environ.items() if not k.startswith("HEARTBEAT_")}
    without = []
    for name in commands():
        result = subprocess.run([sys.executable, "-m", "heartbeatd", name, "--help"], capture_output=True,
                                text=True, env=quiet, timeout=60)
        assert result.returncode == 0, result.stderr
        if "--env-file PATH" not in result.stdout:
            without.append(name)
    assert not without, f"`heartbeatd COMMAND --help` does not mention --env-file PATH for: {without}"


def test_heartbeatd_help_names_every_option_of_every_command() -> None:
    """`heartbeatd --help` is the operator's first look: its command list shows each command's options."""
    text = cli._parser().format_help()
    listed = text.split("\ncommands:\n", 1)[1].split("\n\n", 1)[0]
    missing = []
    for name, parser in commands().items():
        entry = re.search(rf"^  {re.escape(name)} .*?(?=^  \S|\Z)", listed, re.M | re.S)
        if entry is None:
            missing.append(f"the command {name}")
            continue
        missing += [f"{name} {option}" for option in options(parser) if not mentions(entry.group(0), option)]
    assert not missing, ("`heartbeatd --help` (HELP_EPILOG and LEDGER_HELP in heartbeatd/cli.py) does not list:\n  "
                         + "\n  ".join(missing))


# --- README's package list, man's warnings --------------------------------------------------------

def install_deps_packages() -> set[str]:
    """Every Debian package tests/install-deps may install."""
    script = (ROOT / "tests" / "install-deps").read_text(encoding="utf-8")
    found: set[str] = set()
    for loop in re.findall(r"^for (?:pair|pkg) in (.*?); do$", script, re.M | re.S):
        found.update(word.rsplit(":", 1)[-1] for word in loop.replace("\\\n", " ").split())
    # A name built from a variable (postgresql-${major}-partman) is named with it as <major>.
    found.update(re.sub(r"\$\{(\w+)\}", r"<\1>", name)
                 for name in re.findall(r'missing\+=\("?([a-z0-9][a-z0-9.+${}-]+)"?\)', script))
    return found


def test_every_package_install_deps_installs_is_in_the_readme() -> None:
    packages = install_deps_packages()
    assert {"redis-server", "postgresql", "prometheus-node-exporter", "postgresql-<major>-partman"} <= packages, packages
    readme = docs.README.read_text(encoding="utf-8")
    paragraphs = [p for p in readme.split("\n\n") if "`tests/install-deps`" in p]
    assert paragraphs, "README.md names `tests/install-deps` nowhere: say what it installs"
    missing = sorted(p for p in packages if not any(f"`{p}`" in text for text in paragraphs))
    assert not missing, ("README.md's paragraph on `tests/install-deps` does not name these packages it "
                         f"installs: {missing}")


def test_the_man_page_has_no_warnings_at_80_columns() -> None:
    man = shutil.which("man", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if man is None:
        pytest.fail("man is missing: tests/install-deps installs it (Debian package man-db)")
    result = subprocess.run([man, "--warnings", "-l", str(docs.MAN_PAGE)], capture_output=True, text=True,
                            env=dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8"), timeout=60)  # 后端 needs UTF-8
    assert result.returncode == 0 and result.stderr == "", f"man --warnings: {result.stderr}"
    shown = re.sub(".\b", "", result.stdout)  # overstrikes (bold, underline) out
    assert "LOG LINES" in shown and "heartbeatd status" in shown
