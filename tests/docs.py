"""What the documentation is checked against, and the man page's generated part.

Not a test: `tests/test_docs.py` uses it, and after a change to README.md's "Log lines" table

    .venv/bin/python tests/docs.py --write

rewrites the man page's LOG LINES section from it (the test says when that is due).

- `log_formats()` finds every format string a logger call in heartbeatd/ can write, by AST, with
  its level: `log.info("…")`, `repeats.failed(key, logging.ERROR, "…")`, and the formats handed to
  a relay (a function that passes its `msg` parameter on to a logger, listed in RELAYS).
- `readme_log_lines()` reads the table; `man_log_lines()` renders it as roff.
"""

from __future__ import annotations

import ast
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAN_PAGE = ROOT / "packaging" / "heartbeatd.8"

LEVELS = {"debug": "DEBUG", "info": "INFO", "warning": "WARNING", "warn": "WARNING", "error": "ERROR",
          "critical": "CRITICAL", "exception": "ERROR"}
LOGGER_ATTRIBUTES = ("log", "logger", "_log", "_logger")  # self.log.info(...)
# Functions that hand a format on to a logger: name -> (the level: an argument's index or a fixed name,
# the format's index). Their own logger call passes a parameter and is not a line of its own.
RELAYS: dict[str, tuple[Union[int, str], int]] = {
    "log": (0, 1),  # logging.Logger.log(level, msg, ...)
    "failed": (1, 2),  # repeats.Repeats.failed(key, level, msg, ...): a failure, then once a minute
    "spool_failed": ("ERROR", 0),  # delivery.Delivery.spool_failed(msg, ...)
}
ANY_LEVEL = "(as the line)"  # a suffix a relay adds to whatever line it repeats

MAN_BEGIN = '.\\" BEGIN LOG LINES: generated from README.md by tests/docs.py --write; do not edit here'
MAN_END = '.\\" END LOG LINES'


@dataclass(frozen=True)
class LogFormat:
    """One line a logger call can write: its format, level and where the call is."""

    text: str
    level: str
    where: str


class Unreadable(Exception):
    """A logger call whose format cannot be read from the code (an f-string, a computed value)."""


class _Finder(ast.NodeVisitor):
    """Walks one module, keeping the enclosing functions (for parameters and local assignments)."""

    def __init__(self, path: Path, tree: ast.Module, shown: str) -> None:
        self.path, self.tree, self.shown = path, tree, shown
        self.loggers = _loggers(tree)
        self.functions: list[Union[ast.FunctionDef, ast.AsyncFunctionDef]] = []
        self.found: list[LogFormat] = []
        self.problems: list[str] = []

    def visit_FunctionDef(self, node: Union[ast.FunctionDef, ast.AsyncFunctionDef]) -> None:
        self.functions.append(node)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        if not isinstance(node.func, ast.Attribute):
            return
        name, where = node.func.attr, f"{self.shown}:{node.lineno}"
        if name in LEVELS and node.args and self._is_logger(node.func.value):
            level, fmt = LEVELS[name], node.args[0]
        elif name in RELAYS:
            level_at, at = RELAYS[name]
            if len(node.args) <= at or (isinstance(level_at, int) and not _is_level(node.args[level_at])):
                return  # another method of the same name (spoolfile's failed(exc, what))
            level = level_at if isinstance(level_at, str) else _level(node.args[level_at])
            fmt = node.args[at]
        else:
            return
        try:
            texts, relayed = self._strings(fmt)
        except Unreadable as exc:
            self.problems.append(f"{where}: cannot read the format of this log call ({exc}): give it a "
                                 "string constant with %-style arguments, or add its relay to RELAYS in tests/docs.py")
            return
        if relayed:  # a relay's own call: its callers' formats are the lines; a suffix it adds is one too
            level = ANY_LEVEL
        self.found.extend(LogFormat(text.strip(), level, where) for text in texts)

    def _is_logger(self, node: ast.expr) -> bool:
        """`log`, `logging`, a name bound to logging.getLogger(...), or `self.log`: not `parser.error`."""
        if isinstance(node, ast.Name):
            return node.id in self.loggers
        return isinstance(node, ast.Attribute) and node.attr in LOGGER_ATTRIBUTES

    def _strings(self, node: ast.expr) -> tuple[list[str], bool]:
        """The string constants `node` can be, and whether it passes on a relay's parameter."""
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value], False
        if isinstance(node, ast.JoinedStr):
            raise Unreadable("an f-string")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            (left, left_relayed), (right, right_relayed) = self._strings(node.left), self._strings(node.right)
            if left and right:
                return [a + b for a in left for b in right], left_relayed or right_relayed
            return left + right, left_relayed or right_relayed  # a relay's text and what it adds
        if isinstance(node, ast.IfExp):
            (body, body_relayed), (orelse, else_relayed) = self._strings(node.body), self._strings(node.orelse)
            return body + orelse, body_relayed or else_relayed
        if isinstance(node, ast.Dict):
            return [s for value in node.values for s in self._strings(value)[0]], False
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            # NAMES.get(key, "default"): every value of the mapping, and the default
            found = self._strings(node.func.value)[0]
            return found + [s for arg in node.args[1:] for s in self._strings(arg)[0]], False
        if isinstance(node, ast.Name):
            return self._name(node.id)
        raise Unreadable(ast.dump(node)[:60])

    def _name(self, name: str) -> tuple[list[str], bool]:
        function = self.functions[-1] if self.functions else None
        if function is not None:
            params = [a.arg for a in (*function.args.posonlyargs, *function.args.args, *function.args.kwonlyargs)]
            if name in params:
                if function.name not in RELAYS:
                    raise Unreadable(f"the parameter {name!r} of {function.name}(), not a relay")
                return [], True
        for scope in ([function] if function is not None else []) + [self.tree]:
            for node in ast.walk(scope):
                if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name
                                                        for t in node.targets):
                    return self._strings(node.value)
        raise Unreadable(f"the name {name!r}")


def _loggers(tree: ast.Module) -> set[str]:
    """Names a module's loggers go by: `logging`, `log`/`logger`, and any name bound to logging.getLogger()."""
    names = {"logging", "log", "logger"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
                and isinstance(node.value.func, ast.Attribute) and node.value.func.attr == "getLogger":
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _is_level(node: ast.expr) -> bool:
    return (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "logging"
            and node.attr in LEVELS.values()) or isinstance(node, ast.Name)


def _level(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else ANY_LEVEL


def log_formats(package: Path = ROOT / "heartbeatd") -> tuple[list[LogFormat], list[str]]:
    """Every format a logger call in the package can write, and the calls whose format cannot be read."""
    found, problems = [], []
    for path in sorted(package.rglob("*.py")):
        finder = _Finder(path, ast.parse(path.read_text(encoding="utf-8"), str(path)),
                         str(path.relative_to(package.parent)))
        finder.visit(finder.tree)
        found += finder.found
        problems += finder.problems
    return found, problems


@dataclass(frozen=True)
class TableRow:
    """A row of README.md's "Log lines" table."""

    line: str
    level: str
    meaning: str
    action: str


def section(text: str, title: str) -> str:
    """The body of the README section `## title`, up to the next `## `."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if match is None:
        raise LookupError(f'README.md has no section "## {title}"')
    return match.group(1)


def _cells(row: str) -> list[str]:
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def _code(cell: str) -> str:
    """A cell's one code span (`x` or `` x ``), as the text it shows."""
    match = re.fullmatch(r"(`+)\s?(.*?)\s?\1", cell)
    if match is None:
        raise ValueError(f"not a code span: {cell!r}")
    return match.group(2)


def readme_log_lines(text: Optional[str] = None) -> list[TableRow]:
    """The rows of README.md's "Log lines" table: line (a code span), level, meaning, what to do."""
    body = section(README.read_text(encoding="utf-8") if text is None else text, "Log lines")
    rows = [line for line in body.splitlines() if line.startswith("|")]
    if len(rows) < 3 or [c.lower() for c in _cells(rows[0])] != ["line", "level", "meaning", "what to do"]:
        raise LookupError('README.md\'s "Log lines" section has no table | line | level | meaning | what to do |')
    return [TableRow(_code(line), level, meaning, action)
            for line, level, meaning, action in (_cells(row) for row in rows[2:])]


def _roff(text: str, code: bool = False) -> str:
    """Markdown cell text as roff: backslashes and hyphens escaped; code (spans) bold and never hyphenated."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    if code:
        return _roff_code(text)
    text = re.sub(r"(`+)\s?(.*?)\s?\1", lambda m: _roff_code(m.group(2)), text)
    return "\\&" + text if text.startswith((".", "'")) else text  # not a request


def _roff_code(escaped: str) -> str:
    return "\\fB" + " ".join("\\%" + word for word in escaped.split(" ")) + "\\fR"


def man_log_lines(rows: list[TableRow]) -> str:
    """The man page's LOG LINES section, from the README table's rows."""
    out = [MAN_BEGIN, ".SH LOG LINES",
           "One line per event on stderr (the journal under systemd), as",
           "\\%\\fILEVEL\\fB:\\fILOGGER\\fB:\\fIMESSAGE\\fR; the logger is \\fBheartbeatd.daemon\\fR, except",
           "\\fBheartbeatd.spool\\fR for the spool's file and \\fBheartbeatd.cli\\fR for \\fB心跳缓存已迁移\\fR and",
           "\\fBinternal error\\fR. The messages stay as the application's operators grep them. Every line",
           "heartbeatd can write, with %s, %d and the like where a value goes, its level, its meaning and",
           "what to do (DEBUG lines only with HEARTBEAT_LOG_LEVEL=DEBUG):"]
    for row in rows:
        out += [".TP", f"{row.level} {_roff(row.line, code=True)}", _roff(row.meaning), ".br",
                f"\\fIWhat to do:\\fR {_roff(row.action)}"]
    out.append(MAN_END)
    return "\n".join(out) + "\n"


def man_with_log_lines(man: str, generated: str) -> str:
    """The man page with its generated part replaced (or put before EXIT STATUS the first time)."""
    if MAN_BEGIN in man:
        before, rest = man.split(MAN_BEGIN, 1)
        return before + generated + rest.split(MAN_END + "\n", 1)[1]
    before, after = man.split(".SH EXIT STATUS\n", 1)
    return before + generated + ".SH EXIT STATUS\n" + after


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: tests/docs.py --write   (rewrites packaging/heartbeatd.8's LOG LINES from README.md)")
    page = MAN_PAGE.read_text(encoding="utf-8")
    MAN_PAGE.write_text(man_with_log_lines(page, man_log_lines(readme_log_lines())), encoding="utf-8")
    print(f"{MAN_PAGE.relative_to(ROOT)}: LOG LINES written from README.md")
