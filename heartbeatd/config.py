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
from urllib.parse import SplitResult, unquote, urlsplit

from dotenv import dotenv_values

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
    env_file: Optional[Path]
    retention: Optional[float] = None  # seconds of history `heartbeatd prune` keeps; None: keep everything
    retries: int = 1  # quick retries of a check that failed fast, within its timeout
    textfile: Optional[Path] = None  # node_exporter textfile the daemon rewrites after every cycle; None: off
    sources: tuple[tuple[str, str], ...] = ()  # (variable, file it came from) for values not from the environment

    @property
    def secrets(self) -> tuple[str, ...]:
        """Passwords that must never appear in any output."""
        return secret_forms(url_secrets(self.database_url) + url_secrets(self.redis_url))

    def describe(self) -> list[str]:
        """The effective configuration as `NAME=value` lines, passwords masked."""
        return [
            f"DATABASE_URL={mask_url(self.database_url)}",
            f"REDIS_URL={mask_url(self.redis_url)}",
            f"HEARTBEAT_INTERVAL={self.interval:g}",
            f"HEARTBEAT_TIMEOUT={self.timeout:g}",
            f"HEARTBEAT_BACKEND_IP={self.backend_ip or '(detected)'}",
            f"HEARTBEAT_BACKEND_CHECK={self.backend_check or '(none: the host is up)'}",
            f"HEARTBEAT_TABLE={'.'.join(self.table)}",
            f"HEARTBEAT_SPOOL_PATH={self.spool_path}",
            f"HEARTBEAT_SPOOL_MAX_ROWS={self.spool_max_rows}",
            f"HEARTBEAT_LOG_LEVEL={self.log_level}",
            f"HEARTBEAT_RETENTION={format_duration(self.retention) if self.retention else '(keep everything)'}",
            f"HEARTBEAT_RETRIES={self.retries}",
            f"HEARTBEAT_TEXTFILE={self.textfile or '(off)'}",
            f"env file={self.env_file or '(none)'}",
        ]


# `scheme://user:` then everything up to the last `@`: the password, however malformed (a raw `#`,
# `@` or `/` in it must not let any of it out through urlsplit's or a driver's reading of the URL).
_USERINFO = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:@/?#]*:)(?P<password>.*)@(?P<tail>[^@]*)$", re.S)
_QUERY_PASSWORD = re.compile(r"([?&](?:sentinel_)?password=)([^&#]*)")


def url_password(url: str) -> Optional[str]:
    """The password in a URL's userinfo or `password=` query option, if any (raw, as written)."""
    found = _USERINFO.match(url)
    if found and found.group("password"):
        return found.group("password")
    query = _QUERY_PASSWORD.search(url)
    return query.group(2) if query and query.group(2) else None


def url_secrets(url: str) -> list[str]:
    """Every password in a URL: its userinfo's, and `password=` or `sentinel_password=` options."""
    found = _USERINFO.match(url)
    secrets = [found.group("password")] if found and found.group("password") else []
    return secrets + [m.group(2) for m in _QUERY_PASSWORD.finditer(url) if m.group(2)]


def mask_url(url: str) -> str:
    """The URL with any password replaced by `***`: everything between `://user:` and the last `@`."""
    url = _USERINFO.sub(lambda m: f"{m.group('head')}***@{m.group('tail')}", url)
    return _QUERY_PASSWORD.sub(r"\1***", url)


def secret_forms(secrets: Iterable[str]) -> tuple[str, ...]:
    """Each secret as written and percent-decoded: either may appear in a message."""
    return tuple(sorted({form for s in secrets if s for form in (s, unquote(s)) if form}, key=len, reverse=True))


def mask(text: str, secrets: Iterable[str]) -> str:
    """`text` with every form of every secret replaced by `***`."""
    for secret in secret_forms(secrets):
        text = text.replace(secret, "***")
    return text


def _hosts_ports(netloc: str) -> list[tuple[str, str]]:
    """Split a (possibly multi-host) libpq netloc into (host, port) pairs."""
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


def _check_url(name: str, value: str, schemes: tuple[str, ...], problems: list[str]) -> Optional[SplitResult]:
    """Parse a URL and check its scheme and ports; None (with a problem noted) if unusable."""
    password = _USERINFO.match(value)
    if password:
        raw = sorted({c for c in "@#/?" if c in password.group("password")})
        if raw:
            problems.append(f"{name}: the password holds a raw {' '.join(repr(c) for c in raw)}: "
                            f"percent-encode it (@ is %40, # is %23, / is %2F, ? is %3F)")
            return None
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        problems.append(f"{name}: unparseable URL {mask_url(value)!r}: {exc}")
        return None
    if parts.scheme not in schemes:
        wanted = ", ".join(f"{s}://" for s in schemes[:-1]) + f" or {schemes[-1]}://"
        got = parts.scheme + "://" if parts.scheme else "none"
        problems.append(f"{name}: scheme must be {wanted}, got {got} in {mask_url(value)!r}")
        return None
    if parts.scheme != "unix":
        for _host, port in _hosts_ports(parts.netloc):
            if port and not (re.fullmatch(r"[0-9]{1,5}", port) and 0 < int(port) < 65536):
                problems.append(f"{name}: bad port {port!r} (must be 1-65535)")
    return parts


def _check_database_url(value: str, problems: list[str]) -> None:
    _check_url("DATABASE_URL", value, ("postgresql", "postgres"), problems)


SENTINEL_SCHEME = "redis+sentinel"
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
    found = _USERINFO.match(url)
    username = password = None
    if found:
        username = unquote(found.group("head").partition("://")[2][:-1]) or None
        password = unquote(found.group("password")) or None
        url = found.group("head").partition("://")[0] + "://" + found.group("tail")
    elif "@" in url.partition("://")[2].partition("/")[0]:
        username = unquote(url.partition("://")[2].partition("@")[0]) or None
        url = url.partition("://")[0] + "://" + url.partition("@")[2]
    parts = urlsplit(url)
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


def _spool_path(value: str, environ: Mapping[str, str]) -> Path:
    if value:
        return Path(value)
    state = environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(state) / "spool.db" if state else Path("heartbeatd-spool.db")


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{what} {path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"]) \
            from None
    except OSError as exc:
        raise ConfigError([f"{what} {path}: cannot read it: {exc.strerror or exc}"]) from None


def _read_dotenv(path: Path, what: str) -> dict[str, str]:
    # Decoded here first, so a file that is not UTF-8 is one clear line, not a traceback.
    text = _read_text(path, what)
    # interpolate=False: a `$` in a password must stay a `$`, as in systemd's EnvironmentFile=.
    values = dotenv_values(stream=io.StringIO(text), interpolate=False)
    return {k: v for k, v in values.items() if v is not None}


def merged_environment(
    environ: Mapping[str, str], env_file: Optional[Path], cwd: Optional[Path] = None,
    sources: Optional[dict[str, str]] = None,
) -> dict[str, str]:
    """Environment with dotenv values and credentials applied in the documented order of precedence.

    `sources`, if given, is filled with the file each variable came from (absent: the environment).
    """
    found = sources if sources is not None else {}
    if env_file is not None:
        if not env_file.is_file() or not os.access(env_file, os.R_OK):
            raise ConfigError([f"--env-file: cannot read {env_file}"])
        from_file = _read_dotenv(env_file, "--env-file")
        found.update(dict.fromkeys(from_file, str(env_file)))
        merged = {**environ, **from_file}
    else:
        default = (cwd or Path.cwd()) / ".env"
        from_file = _read_dotenv(default, "env file") if default.is_file() else {}
        found.update({k: str(default) for k in from_file if k not in environ})
        merged = {**from_file, **environ}
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
    if text and (retention is None or retention < 3600):
        problems.append(f"HEARTBEAT_RETENTION: must be a duration of at least 1h such as 30d or 12w, got {text!r}")
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
    merged = merged_environment(environ, env_file, cwd, sources)

    def get(name: str) -> str:
        value = merged.get(name, "").strip()
        return value if value else DEFAULTS[name]

    problems: list[str] = []
    database_url, redis_url = sqlalchemy_to_libpq(get("DATABASE_URL")), get("REDIS_URL")
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
        secrets = url_secrets(database_url) + url_secrets(redis_url)
        raise ConfigError([mask(_name_source(p, sources), secrets) for p in problems])
    return Config(
        database_url=database_url,
        redis_url=redis_url,
        interval=interval,
        timeout=timeout,
        backend_ip=backend_ip,
        backend_check=get("HEARTBEAT_BACKEND_CHECK"),
        table=table,
        spool_path=_spool_path(merged.get("HEARTBEAT_SPOOL_PATH", "").strip(), merged),
        spool_max_rows=max_rows,
        log_level=log_level,
        env_file=env_file,
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
    """Problems found later (by a driver's parser), naming the file each value came from."""
    return ConfigError([_name_source(p, dict(config.sources)) for p in error.problems])
