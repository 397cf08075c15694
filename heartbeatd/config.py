"""Configuration: one frozen object built from the environment, dotenv files and credentials."""

from __future__ import annotations

import io
import ipaddress
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional
from urllib.parse import SplitResult, unquote, unquote_plus, urlsplit

from dotenv.parser import parse_stream

from heartbeatd import conninfo

DEFAULTS: dict[str, str] = {
    "DATABASE_URL": "postgresql://localhost:5432/postgres",
    "REDIS_URL": "redis://localhost:6379/0",
    "HEARTBEAT_INTERVAL": "30",
    "HEARTBEAT_TIMEOUT": "5",
    "HEARTBEAT_BACKEND_IP": "",
    "HEARTBEAT_BACKEND_CHECK": "",
    "HEARTBEAT_TABLE": "service_heartbeat",
    "HEARTBEAT_SPOOL_PATH": "",
    "HEARTBEAT_SPOOL_MAX_ROWS": "100000",
    "HEARTBEAT_LOG_LEVEL": "INFO",
    "HEARTBEAT_RETENTION": "",
    "HEARTBEAT_RETRIES": "1",
    "HEARTBEAT_TEXTFILE": "",
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Bounds that keep every value usable: sub-second intervals stay (tests and benchmarks use 0.05 s).
INTERVAL_RANGE = (0.01, 86400.0)
TIMEOUT_RANGE = (0.01, 600.0)
SPOOL_MAX_ROWS_LIMIT = 10_000_000
RETRIES_LIMIT = 5
# Steps of one cycle that may each block up to HEARTBEAT_TIMEOUT: Redis PING, PostgreSQL
# connect, the INSERT. The watchdog is pinged between them.
BLOCKING_STEPS = 3
# The daemon's env file (the unit's --env-file): every command reads it when no --env-file is given.
DEFAULT_ENV_FILE = Path("/etc/heartbeatd/heartbeatd.env")
ENV_FILE_VARIABLE = "HEARTBEAT_ENV_FILE"  # another path for it (a test's, a second instance's)
# How the env file was chosen, as its messages name it: the option, the daemon's, the working directory's.
FROM_OPTION, FROM_DAEMON, FROM_CWD = "--env-file", "env file", "./.env"
# Files in $CREDENTIALS_DIRECTORY (systemd LoadCredential=) that replace a variable.
CREDENTIALS = {"database_url": "DATABASE_URL", "redis_url": "REDIS_URL"}
# No `%`: psycopg2 reads every `%` of a statement sent with parameters as its own, and the
# table's name is in each (a quoted identifier keeps it as it is): `a%b` failed every write.
_IDENT = re.compile(r"^[^\x00\"%]{1,63}$")


class ConfigError(Exception):
    """Every problem found in the configuration, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Config:
    """The effective configuration of one daemon generation."""

    database_url: str
    redis_url: str
    interval: float
    timeout: float
    backend_ip: Optional[str]
    backend_check: str  # empty: 后端 means the host is up; else systemd:UNIT, tcp://, http(s):// (probes check it)
    table: tuple[str, ...]
    spool_path: Path
    spool_max_rows: int
    log_level: str
    env_file: Optional[Path]  # the env file read: --env-file, the daemon's (/etc/heartbeatd/heartbeatd.env), ./.env
    retention: Optional[float] = None  # seconds of history `heartbeatd prune` keeps; None: keep everything
    retries: int = 1  # quick retries of a check that failed fast, within its timeout
    textfile: Optional[Path] = None  # node_exporter textfile the daemon rewrites after every cycle; None: off
    env_file_how: str = ""  # how env_file was chosen: FROM_OPTION, FROM_DAEMON or FROM_CWD
    database_url_unset: bool = False  # DATABASE_URL unset or empty: the default's parts libpq has none of its own for
    sources: tuple[tuple[str, str], ...] = ()  # (variable, file it came from) for values not from the environment

    @property
    def secrets(self) -> tuple[str, ...]:
        """Passwords that must never appear in any output."""
        return secret_forms(config_secrets(self.database_url, self.redis_url, self.backend_check))

    def describe(self) -> list[str]:
        """The effective configuration as `NAME=value` lines, passwords masked."""
        return [
            f"DATABASE_URL={mask_url(self.database_url)}"
            + (f" (unset: the default {DEFAULTS['DATABASE_URL']}, less what libpq's PG* variables or service file give)"
               if self.database_url_unset else ""),
            f"REDIS_URL={mask_url(self.redis_url)}",
            f"HEARTBEAT_INTERVAL={self.interval:g}",
            f"HEARTBEAT_TIMEOUT={self.timeout:g}",
            f"HEARTBEAT_BACKEND_IP={self.backend_ip or '(detected)'}",
            f"HEARTBEAT_BACKEND_CHECK={mask_url(self.backend_check) or '(none: the host is up)'}",
            f"HEARTBEAT_TABLE={'.'.join(self.table)}",
            f"HEARTBEAT_SPOOL_PATH={self.spool_path}",
            f"HEARTBEAT_SPOOL_MAX_ROWS={self.spool_max_rows}",
            f"HEARTBEAT_LOG_LEVEL={self.log_level}",
            f"HEARTBEAT_RETENTION={format_duration(self.retention) if self.retention else '(keep everything)'}",
            f"HEARTBEAT_RETRIES={self.retries}",
            f"HEARTBEAT_TEXTFILE={self.textfile or '(off)'}",
            f"env file={self.env_file or '(none)'}{_HOW.get(self.env_file_how, '') if self.env_file else ''}",
        ]


# The options that hold a secret, in a URL's query, whichever driver reads them: libpq's own
# secret options (those it marks secret: password, sslpassword; tests check the two agree),
# redis-py's password and ssl_password (its key file's), the sentinels' sentinel_password.
SECRET_OPTIONS = ("password", "sslpassword", "ssl_password", "sentinel_password")
PG_SCHEMES = ("postgresql", "postgres")
SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_SCHEMES = (SENTINEL_SCHEME, "rediss+sentinel")
REDIS_SCHEMES = ("redis", "rediss", "unix")
# Schemes whose URLs are read by urlsplit (redis-py's reader; HEARTBEAT_BACKEND_CHECK's).
_SPLIT_SCHEMES = REDIS_SCHEMES + SENTINEL_SCHEMES + ("http", "https", "tcp")
# What an operator means: `scheme://user:` then everything up to the last `@` - a password with a
# raw `@`, `/`, `?` or `#`. Used only where the driver's own reading leaves an `@` behind (below).
_AS_WRITTEN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^:@/?#]*:(?P<password>.*)@[^@]*$", re.S)
_LIBPQ_USERINFO_STOP = re.compile(r"[@/]")
_SPLIT_NETLOC_STOP = re.compile(r"[/?#]")


def _scheme(url: str) -> str:
    return url.partition("://")[0].lower() if "://" in url else ""


def _userinfo_end(url: str) -> int:
    """Where the driver's reading of the userinfo ends (the index of its `@`), or -1: none.

    libpq reads up to the first `@` met before any `/`; urlsplit (redis-py) reads the last `@`
    before the first `/`, `?` or `#`.
    """
    start = url.find("://") + 3
    if _scheme(url) in PG_SCHEMES:
        found = _LIBPQ_USERINFO_STOP.search(url, start)
        return found.start() if found and found.group() == "@" else -1
    stop = _SPLIT_NETLOC_STOP.search(url, start)
    return url.rfind("@", start, stop.start() if stop else len(url))


def _password_span(url: str) -> Optional[tuple[int, int]]:
    """Where the password the driver reads stands in the URL (raw, percent-encoded), if any."""
    if _scheme(url) not in PG_SCHEMES + _SPLIT_SCHEMES:
        found = _AS_WRITTEN.match(url)  # a scheme we refuse: hide whatever may be a password
        return found.span("password") if found and found.group("password") else None
    end = _userinfo_end(url)
    colon = url.find(":", url.find("://") + 3, end) if end >= 0 else -1
    return (colon + 1, end) if colon >= 0 and end > colon + 1 else None


def misread_password(url: str) -> Optional[str]:
    """The password as written, when the URL's driver would cut it short (a raw `@`, `/`, `?`, `#`).

    That is when an `@` is left, after the userinfo the driver reads, before the query: `p@ss@db`,
    `pa/ss@db`; an `@` inside the query (`?application_name=ops@host1`) is the query's own.
    """
    found = _AS_WRITTEN.match(url)
    if not found or not found.group("password"):
        return None
    end = _userinfo_end(url)
    rest = url[end + 1 if end >= 0 else url.find("://") + 3:]
    if "@" in rest.partition("?")[0] or (_scheme(url) in _SPLIT_SCHEMES and _split_cut(url)):
        return found.group("password")
    return None


def _split_cut(url: str) -> bool:
    """Whether urlsplit cut a userinfo at a raw `?` or `#`: no host before it, or an `@` in a query
    item that is no `name=value` (`redis://:12?34@cache/0` would otherwise go to localhost:12)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    if "@" in parts.netloc:
        return False
    return (not _hosts_ports(parts.netloc)[0][0] and parts.scheme != "unix") or "@" in parts.fragment or any(
        "@" in item and "=" not in item for item in parts.query.split("&"))


def password_hint(name: str, url: str) -> Optional[str]:
    """The one line for a password the driver would misread, naming the raw characters; else None."""
    written = misread_password(url)
    if written is None:
        return None
    meaningful = "@/" if _scheme(url) in PG_SCHEMES else "@/?#"
    raw = sorted({c for c in meaningful if c in written}) or sorted({c for c in "@/?#" if c in written})
    return (f"{name}: the password holds a raw {' '.join(repr(c) for c in raw)}: "
            "percent-encode it (@ is %40, # is %23, / is %2F, ? is %3F)")


# What check-config says of the env file read, by how it was chosen.
_HOW = {FROM_OPTION: " (--env-file: its values win over the environment)",
        FROM_DAEMON: " (the daemon's env file: its values win over the environment)",
        FROM_CWD: " (./.env in the working directory: the environment wins over it)"}


def _secret_values(url: str, after: int = 0) -> list[tuple[int, int]]:
    """Where the values of the secret options stand in the URL's query (which begins after `after`, the
    password's end). Their names count as the drivers read them, percent-decoded and in any case: libpq
    takes `?%70assword=` for `password=`."""
    start = url.find("?", after)
    spans: list[tuple[int, int]] = []
    if start < 0:
        return spans
    at = start + 1
    for item in url[start + 1:].split("&"):
        key, equals, _ = item.partition("=")
        if equals and unquote(key).strip().lower() in SECRET_OPTIONS:
            spans.append((at + len(key) + 1, at + len(item)))
        at += len(item) + 1
    return spans


def _secret_spans(url: str) -> list[tuple[int, int]]:
    """Every secret's place in the URL: the password (all of what was meant as one, when the driver
    would cut it short), then the secret options' values."""
    span = _password_span(url)
    if misread_password(url) is not None:  # refused anyway; hide all of what was meant as the password
        found = _AS_WRITTEN.match(url)
        assert found is not None
        span = found.span("password")
    return ([span] if span else []) + _secret_values(url, span[1] if span else 0)


def url_secrets(url: str) -> list[str]:
    """Every secret in a URL, as written: its password and the secret options' values."""
    return [url[a:b] for a, b in _secret_spans(url) if b > a]


def mask_url(url: str) -> str:
    """The URL with every secret shown as `***`: its password, and the values of the secret options."""
    shown, end = [], len(url)
    for a, b in sorted(_secret_spans(url), reverse=True):
        if b <= end:  # (a password holding `?…=` may overlap an option's value: masked once)
            shown.append(url[b:end])
            shown.append("***")
            end = a
    shown.append(url[:end])
    return "".join(reversed(shown))


def config_secrets(*urls: str) -> list[str]:
    """The secrets of every URL of a configuration (DATABASE_URL, REDIS_URL, HEARTBEAT_BACKEND_CHECK)."""
    return [secret for url in urls for secret in url_secrets(url)]


def secret_forms(secrets: Iterable[str]) -> tuple[str, ...]:
    """Each secret as written and percent-decoded (`+` as a space too, as redis-py reads a query)."""
    forms = {form for s in secrets if s for form in (s, unquote(s), unquote_plus(s)) if form}
    return tuple(sorted(forms, key=len, reverse=True))


def mask(text: str, secrets: Iterable[str]) -> str:
    """`text` with every form of every secret replaced by `***`."""
    for secret in secret_forms(secrets):
        text = text.replace(secret, "***")
    return text


def _hosts_ports(netloc: str) -> list[tuple[str, str]]:
    """Split a (possibly multi-host) netloc into (host, port) pairs."""
    hosts = netloc.rpartition("@")[2]
    pairs = []
    for item in hosts.split(","):
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port = item.partition(":")
        pairs.append((host, port))
    return pairs


def _check_scheme(name: str, value: str, schemes: tuple[str, ...], problems: list[str]) -> bool:
    """Whether the URL has one of `schemes` (else a problem noted, the URL masked)."""
    scheme = _scheme(value)
    if scheme in schemes:
        return True
    wanted = ", ".join(f"{s}://" for s in schemes[:-1]) + f" or {schemes[-1]}://"
    if not scheme:  # not a URL at all (a libpq key=value string?): nothing of it is shown, it may hold a password
        problems.append(f"{name}: scheme must be {wanted}, got no scheme (not a URL; a key=value string is not taken)")
        return False
    problems.append(f"{name}: scheme must be {wanted}, got {scheme}:// in {mask_url(value)!r}")
    return False


def _check_url(name: str, value: str, schemes: tuple[str, ...], problems: list[str]) -> Optional[SplitResult]:
    """urlsplit's reading of a URL (redis-py's), its scheme and ports checked; None if unusable."""
    if not _check_scheme(name, value, schemes, problems):
        return None
    hint = password_hint(name, value)
    if hint:
        problems.append(hint)
        return None
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        problems.append(f"{name}: unparseable URL {mask_url(value)!r}: {exc}")
        return None
    if parts.scheme != "unix":
        for _host, port in _hosts_ports(parts.netloc):
            if port and not (re.fullmatch(r"[0-9]{1,5}", port) and 0 < int(port) < 65536):
                problems.append(f"{name}: bad port {port!r} (must be 1-65535)")
    return parts


def _check_database_url(value: str, problems: list[str]) -> None:
    """The scheme, and a password libpq would misread; libpq itself judges the rest (heartbeatd.pg)."""
    if _check_scheme("DATABASE_URL", value, PG_SCHEMES, problems):
        hint = password_hint("DATABASE_URL", value)
        if hint:
            problems.append(hint)


SENTINEL_PORT = 26379
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")


@dataclass(frozen=True)
class SentinelURL:
    """`redis+sentinel://[user:password@]host[:port][,host2[:port2],…]/service_name[/db][?options]`.

    The userinfo is the master's (as in a redis:// URL); `sentinel_username` and
    `sentinel_password` are the sentinels' own. Sentinels default to port 26379.
    """

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int
    username: Optional[str]
    password: Optional[str]
    sentinel_username: Optional[str]
    sentinel_password: Optional[str]


def parse_sentinel_url(url: str) -> SentinelURL:
    """The parts of a redis+sentinel:// URL; ValueError naming what is wrong (never a password)."""
    parts = urlsplit(url)  # as redis-py reads its own URLs (a password the split would cut is refused before)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    sentinels = []
    for host, port in _hosts_ports(parts.netloc):
        if not host:
            raise ValueError("a sentinel with no host (redis+sentinel://host[:port][,host2[:port2]]/service_name)")
        sentinels.append((host, int(port) if port else SENTINEL_PORT))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError("the path must be /service_name or /service_name/db (the master's name in the sentinels)")
    if len(path) == 2 and not re.fullmatch(r"[0-9]{1,9}", path[1]):
        raise ValueError(f"database must be a number, got {path[1]!r}")
    options: dict[str, str] = {}
    for item in filter(None, parts.query.split("&")):
        key, _, value = item.partition("=")
        if key not in _SENTINEL_OPTIONS:
            raise ValueError(f"unknown option {key!r} (redis+sentinel:// takes {', '.join(_SENTINEL_OPTIONS)})")
        options[key] = unquote(value)
    return SentinelURL(tuple(sentinels), unquote(path[0]), int(path[1]) if len(path) == 2 else 0, username,
                       password, options.get("sentinel_username") or None, options.get("sentinel_password") or None)


def _check_redis_url(value: str, problems: list[str]) -> None:
    name = "REDIS_URL"
    if value.startswith("rediss+sentinel://"):
        problems.append(f"{name}: rediss+sentinel:// (TLS to the sentinels) is not supported; use redis+sentinel://")
        return
    parts = _check_url(name, value, ("redis", "rediss", SENTINEL_SCHEME, "unix"), problems)
    if parts is None:
        return
    if parts.scheme == SENTINEL_SCHEME:
        try:
            parse_sentinel_url(value)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
        return
    if parts.scheme == "unix":
        if not parts.path:
            problems.append(f"{name}: unix:// URL needs a socket path")
    elif parts.path.strip("/") and not re.fullmatch(r"[0-9]{1,9}", parts.path.strip("/")):
        problems.append(f"{name}: database must be a number, got {parts.path.strip('/')!r}")


def _seconds(name: str, value: str, low: float, high: float, problems: list[str]) -> float:
    if not re.fullmatch(r"\s*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?\s*|\s*[-+]?(nan|inf|infinity)\s*",
                        value, re.I):
        problems.append(f"{name}: not a number: {value!r}")
        return 1.0
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        problems.append(f"{name}: must be a number of seconds > 0, got {value!r}")
        return 1.0
    if not low <= number <= high:
        problems.append(f"{name}: must be between {low:g} and {high:g} seconds, got {value!r}")
        return 1.0
    return number


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}  # a year: 365 days
# The longest duration any option or variable takes: 100 years back from now is still a date
# (9999999w was an OverflowError, exit 70).
MAX_DURATION = 36500 * 86400


def parse_duration(text: str) -> Optional[float]:
    """`90s`, `30m`, `24h`, `7d`, `2w`, `1y` in seconds; None if it is not such a duration."""
    found = re.fullmatch(r"\s*([0-9]{1,7}(?:\.[0-9]+)?)\s*([smhdwy])\s*", text)
    return float(found.group(1)) * _UNITS[found.group(2)] if found else None


def format_duration(seconds: float) -> str:
    """The largest whole unit: 2592000 -> `30d`."""
    for unit in ("w", "d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{seconds / _UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


def _table(value: str, problems: list[str]) -> tuple[str, ...]:
    parts = tuple(value.split("."))
    if len(parts) > 2 or not all(_IDENT.match(p) for p in parts):
        problems.append(f"HEARTBEAT_TABLE: must be table or schema.table (1-63 characters each, no quotes or %), got {value!r}")
        return ("service_heartbeat",)
    return parts


def _spool_path(value: str, environ: Mapping[str, str], cwd: Optional[Path]) -> Path:
    """Absolute, so that every message names the real place (`.` named no directory an operator could find)."""
    state = environ.get("STATE_DIRECTORY", "").split(":")[0]
    path = Path(value) if value else Path(state) / "spool.db" if state else Path("heartbeatd-spool.db")
    return (cwd or Path.cwd()) / path


def _read_text(path: Path, what: str) -> str:
    """An env or credential file's text; ConfigError if it is not UTF-8 or holds a NUL byte (the line
    named, nothing of it shown: libpq and the C library read a value only up to a NUL, so what follows
    would be misread, and what precedes could be shown as a host or a port)."""
    try:
        text = path.read_text(encoding="utf-8")
        if "\x00" in text:
            line = text.count("\n", 0, text.index("\x00")) + 1
            raise ConfigError([f"{what} {path}, line {line}: holds a NUL byte"])
        return text
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{what} {path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"]) \
            from None
    except OSError as exc:
        raise ConfigError([f"{what} {path}: cannot read it: {_why_unreadable(exc)}"]) from None


def _why_unreadable(exc: OSError) -> str:
    """`permission denied (…)` and `no such file` must not read alike: the fixes differ."""
    if isinstance(exc, PermissionError):
        return "permission denied (the packaged env file is root:heartbeatd-conf 0640: run as root or a member of " \
               "heartbeatd-conf)"
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "it is a directory"
    return str(exc.strerror or exc)


# A name as a shell would take it, optionally after `export`, then `=`: what a bad line meant to set.
_ASSIGNMENT = re.compile(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.?)")
_NEWLINES = re.compile(r"\r\n|\n|\r")


def _bad_line(original: str) -> str:
    """Why python-dotenv could not read a line, in words that never quote its value (it may hold a password)."""
    found = _ASSIGNMENT.match(original.strip())
    if not found:
        return "not NAME=value"
    name, first = found.groups()
    if first and first in "\"'":
        return f"{name}={first}…: the {first} quote is not closed (or text follows the closing quote)"
    return f"{name}=…: cannot be read as NAME=value"


def _read_dotenv(path: Path, what: str) -> dict[str, str]:
    """The file's NAME=value lines; ConfigError naming the file and line of any line python-dotenv cannot read.

    python-dotenv itself only warns and drops such a line (0.21 and 1.x alike), and a daemon would then
    run on the default of what the line meant to set: a bad line is a bad configuration here.
    """
    # Decoded here first, so a file that is not UTF-8 is one clear line, not a traceback. A BOM is
    # dropped (python-dotenv 0.21 would make it part of the first name, and that value unused).
    text = _read_text(path, what).removeprefix("\ufeff")
    values: dict[str, str] = {}
    problems: list[str] = []
    # parse_stream, not dotenv_values: its bindings say which lines failed (`error`) and where, where
    # dotenv_values only logs a warning. Values are taken as written: `$` is not interpolated, as in
    # systemd's EnvironmentFile=.
    for binding in parse_stream(io.StringIO(text)):
        original = binding.original.string
        leading = original[:len(original) - len(original.lstrip())]
        where = f"{what} {path}, line {binding.original.line + len(_NEWLINES.findall(leading))}"
        if binding.error:
            problems.append(f"{where}: {_bad_line(original)}")
        elif binding.key is not None and binding.value is not None:
            if binding.key in DEFAULTS and _NEWLINES.search(binding.value):
                # A quoted value may span lines in dotenv; none of ours may: a quote was left open.
                problems.append(f"{where}: {binding.key}'s quoted value runs over several lines (a quote not closed?)")
            values[binding.key] = binding.value
        elif binding.key is not None and not _ASSIGNMENT.match(binding.key + "="):
            problems.append(f"{where}: not NAME=value")
    if problems:
        raise ConfigError(problems)
    return values


def default_env_file(environ: Mapping[str, str]) -> Path:
    """The daemon's env file: `$HEARTBEAT_ENV_FILE`, else /etc/heartbeatd/heartbeatd.env."""
    return Path(environ.get(ENV_FILE_VARIABLE) or DEFAULT_ENV_FILE)


def _exists(path: Path) -> bool:
    """True when there is something at `path`; False only when nothing is (a denied lookup is not "missing")."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise ConfigError([f"{FROM_DAEMON} {path}: cannot read it: {_why_unreadable(exc)}"]) from None
    return True


def env_file_in_use(environ: Mapping[str, str], env_file: Optional[Path], cwd: Optional[Path] = None
                    ) -> tuple[Optional[Path], str]:
    """(the env file to read, how it was chosen): `--env-file`, else the daemon's, else ./.env, else none.

    The daemon's file is read as an --env-file is (its values win over the environment), so that an
    operator's command sees what the daemon sees; ./.env only where there is no daemon's file.
    """
    if env_file is not None:
        return env_file, FROM_OPTION
    daemons = default_env_file(environ)
    if _exists(daemons):
        return daemons, FROM_DAEMON
    dotenv = (cwd or Path.cwd()) / ".env"
    return (dotenv, FROM_CWD) if dotenv.is_file() else (None, "")


def merged_environment(
    environ: Mapping[str, str], env_file: Optional[Path], how: str = FROM_OPTION,
    sources: Optional[dict[str, str]] = None,
) -> dict[str, str]:
    """Environment with the env file env_file_in_use() chose (`how`) and credentials applied, in order of precedence.

    `sources`, if given, is filled with the file each variable came from (absent: the environment).
    """
    found = sources if sources is not None else {}
    merged = dict(environ)
    if env_file is not None:
        # ./.env's messages say "env file" too: the path shows which.
        from_file = _read_dotenv(env_file, FROM_OPTION if how == FROM_OPTION else FROM_DAEMON)
        if how == FROM_CWD:  # a working directory's file: the environment wins over it
            found.update({k: str(env_file) for k in from_file if k not in environ})
            merged = {**from_file, **environ}
        else:  # the operator's or the daemon's file: it wins over the environment
            found.update(dict.fromkeys(from_file, str(env_file)))
            merged = {**environ, **from_file}
    cred_dir = environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        for filename, variable in CREDENTIALS.items():
            path = Path(cred_dir) / filename
            if path.is_file():
                merged[variable] = _read_text(path, "credential").strip()
                found[variable] = f"credential {path}"
    return merged


def sqlalchemy_to_libpq(url: str) -> str:
    """`postgresql+asyncpg://…` (an SQLAlchemy URL, as in the application's .env) as a libpq URL."""
    found = re.match(r"^(postgres(?:ql)?)\+[A-Za-z0-9_]+://", url)
    return found.group(1) + url[found.end() - 3:] if found else url


def default_database_url() -> str:
    """DATABASE_URL when it is unset or empty: the default's host, port and database, each only where
    libpq has none of its own (PGHOST or PGHOSTADDR, PGPORT, PGDATABASE, the service file PGSERVICE
    names). Those are left out of the URL, so libpq applies its own as for any URL that leaves them out:
    the default spelt out in full would override them all."""
    own = conninfo.own_defaults()
    default = urlsplit(DEFAULTS["DATABASE_URL"])
    host = "" if own.get("host") or own.get("hostaddr") else default.hostname or ""
    port = "" if own.get("port") else f":{default.port}"
    dbname = "" if own.get("dbname") else default.path
    return f"{default.scheme}://{host}{port}{dbname}"


def _max_rows(text: str, problems: list[str]) -> int:
    max_rows = int(text) if re.fullmatch(r"[0-9]{1,9}", text) else 0
    if not 0 < max_rows <= SPOOL_MAX_ROWS_LIMIT:
        problems.append(f"HEARTBEAT_SPOOL_MAX_ROWS: must be a whole number from 1 to {SPOOL_MAX_ROWS_LIMIT}, "
                        f"got {text!r}")
    return max_rows


def _retries(text: str, problems: list[str]) -> int:
    if re.fullmatch(r"[0-9]", text) and int(text) <= RETRIES_LIMIT:
        return int(text)
    problems.append(f"HEARTBEAT_RETRIES: must be a whole number from 0 to {RETRIES_LIMIT}, got {text!r}")
    return 0


def _textfile(text: str, problems: list[str]) -> Optional[Path]:
    """node_exporter's textfile collector reads only `*.prom` files, by absolute path."""
    if not text:
        return None
    path = Path(text)
    if not path.is_absolute() or path.suffix != ".prom" or "\x00" in text or path.name.startswith("."):
        problems.append(f"HEARTBEAT_TEXTFILE: must be an absolute path of a file ending in .prom, got {text!r}")
        return None
    return path


def _retention(text: str, problems: list[str]) -> Optional[float]:
    retention = parse_duration(text) if text else None
    if text and (retention is None or not 3600 <= retention <= MAX_DURATION):
        problems.append(f"HEARTBEAT_RETENTION: must be a duration from 1h to {format_duration(MAX_DURATION)} such as "
                        f"30d or 12w, got {text!r}")
    return retention


def _backend_ip(text: str, problems: list[str]) -> Optional[str]:
    """HEARTBEAT_BACKEND_IP in its canonical form; empty: detect it."""
    if not text:
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        problems.append(f"HEARTBEAT_BACKEND_IP: not an IP address: {text!r}")
        return text


def _log_level(text: str, problems: list[str]) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        problems.append(f"HEARTBEAT_LOG_LEVEL: must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return level


def load(environ: Mapping[str, str], env_file: Optional[Path] = None, cwd: Optional[Path] = None) -> Config:
    """Build and validate the configuration; raise ConfigError listing every problem."""
    sources: dict[str, str] = {}
    env_file, how = env_file_in_use(environ, env_file, cwd)
    merged = merged_environment(environ, env_file, how, sources)

    def get(name: str) -> str:
        value = merged.get(name, "").strip()
        return value if value else DEFAULTS[name]

    problems: list[str] = []
    database_url_unset = not merged.get("DATABASE_URL", "").strip()
    database_url = default_database_url() if database_url_unset else sqlalchemy_to_libpq(get("DATABASE_URL"))
    redis_url = get("REDIS_URL")
    _check_database_url(database_url, problems)
    _check_redis_url(redis_url, problems)
    interval = _seconds("HEARTBEAT_INTERVAL", get("HEARTBEAT_INTERVAL"), INTERVAL_RANGE[0], INTERVAL_RANGE[1], problems)
    before = len(problems)
    timeout = _seconds("HEARTBEAT_TIMEOUT", get("HEARTBEAT_TIMEOUT"), TIMEOUT_RANGE[0], TIMEOUT_RANGE[1], problems)
    timeout_ok = len(problems) == before
    backend_ip = _backend_ip(get("HEARTBEAT_BACKEND_IP"), problems)
    table = _table(get("HEARTBEAT_TABLE"), problems)
    max_rows = _max_rows(get("HEARTBEAT_SPOOL_MAX_ROWS"), problems)
    retention = _retention(merged.get("HEARTBEAT_RETENTION", "").strip(), problems)
    retries = _retries(get("HEARTBEAT_RETRIES"), problems)
    textfile = _textfile(merged.get("HEARTBEAT_TEXTFILE", "").strip(), problems)
    log_level = _log_level(get("HEARTBEAT_LOG_LEVEL"), problems)
    # Checked here, so at start and on every reload alike: a reload must not get the daemon killed.
    watchdog = _watchdog_problem(timeout, environ) if timeout_ok else None
    if watchdog:
        problems.append(watchdog)
    if problems:
        secrets = config_secrets(database_url, redis_url, get("HEARTBEAT_BACKEND_CHECK"))
        raise ConfigError([mask(_name_source(p, sources), secrets) for p in problems])
    return Config(
        database_url=database_url,
        redis_url=redis_url,
        interval=interval,
        timeout=timeout,
        backend_ip=backend_ip,
        backend_check=get("HEARTBEAT_BACKEND_CHECK"),
        table=table,
        spool_path=_spool_path(merged.get("HEARTBEAT_SPOOL_PATH", "").strip(), merged, cwd),
        spool_max_rows=max_rows,
        log_level=log_level,
        env_file=env_file,
        env_file_how=how,
        database_url_unset=database_url_unset,
        retention=retention,
        retries=retries,
        textfile=textfile,
        sources=tuple(sorted(sources.items())),
    )


def watchdog_period(environ: Mapping[str, str], pid: Optional[int] = None) -> Optional[float]:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None if not ours to ping."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid if pid is not None else os.getpid()):
        return None
    return int(usec) / 2e6


def _watchdog_problem(timeout: float, environ: Mapping[str, str]) -> Optional[str]:
    """The rule between HEARTBEAT_TIMEOUT and systemd's watchdog: one cycle must fit in half of it."""
    period = watchdog_period(environ)
    if period is None or BLOCKING_STEPS * timeout <= period:
        return None
    return (f"HEARTBEAT_TIMEOUT={timeout:g} lets one cycle block up to {BLOCKING_STEPS * timeout:g}s, more than "
            f"half of WATCHDOG_USEC={environ['WATCHDOG_USEC']} ({period:g}s): raise WatchdogSec= or lower "
            "HEARTBEAT_TIMEOUT")


def _name_source(problem: str, sources: Mapping[str, str]) -> str:
    """`NAME: …` as `NAME (from FILE): …` when the value came from a file."""
    name, colon, rest = problem.partition(": ")
    return f"{name} (from {sources[name]}): {rest}" if colon and name in sources else problem


def with_sources(config: Config, error: ConfigError) -> ConfigError:
    """Problems found later (by a driver's parser), naming the file each value came from, secrets masked."""
    return ConfigError([mask(_name_source(p, dict(config.sources)), config.secrets) for p in error.problems])
