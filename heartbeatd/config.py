"""Configuration: one frozen object built from the environment, dotenv files and credentials."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from dotenv import dotenv_values

DEFAULTS: dict[str, str] = {
    "DATABASE_URL": "postgresql://localhost:5432/postgres",
    "REDIS_URL": "redis://localhost:6379/0",
    "HEARTBEAT_INTERVAL": "30",
    "HEARTBEAT_TIMEOUT": "5",
    "HEARTBEAT_BACKEND_IP": "",
    "HEARTBEAT_TABLE": "service_heartbeat",
    "HEARTBEAT_SPOOL_PATH": "",
    "HEARTBEAT_SPOOL_MAX_ROWS": "100000",
    "HEARTBEAT_LOG_LEVEL": "INFO",
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Files in $CREDENTIALS_DIRECTORY (systemd LoadCredential=) that replace a variable.
CREDENTIALS = {"database_url": "DATABASE_URL", "redis_url": "REDIS_URL"}
_IDENT = re.compile(r"^[^\x00\"]{1,63}$")


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
    table: tuple[str, ...]
    spool_path: Path
    spool_max_rows: int
    log_level: str
    env_file: Optional[Path]

    @property
    def secrets(self) -> tuple[str, ...]:
        """Passwords that must never appear in any output."""
        found = [url_password(self.database_url), url_password(self.redis_url)]
        return tuple({form for s in found if s for form in (s, unquote(s))})

    def describe(self) -> list[str]:
        """The effective configuration as `NAME=value` lines, passwords masked."""
        return [
            f"DATABASE_URL={mask_url(self.database_url)}",
            f"REDIS_URL={mask_url(self.redis_url)}",
            f"HEARTBEAT_INTERVAL={self.interval:g}",
            f"HEARTBEAT_TIMEOUT={self.timeout:g}",
            f"HEARTBEAT_BACKEND_IP={self.backend_ip or '(detected)'}",
            f"HEARTBEAT_TABLE={'.'.join(self.table)}",
            f"HEARTBEAT_SPOOL_PATH={self.spool_path}",
            f"HEARTBEAT_SPOOL_MAX_ROWS={self.spool_max_rows}",
            f"HEARTBEAT_LOG_LEVEL={self.log_level}",
            f"env file={self.env_file or '(none)'}",
        ]


def url_password(url: str) -> Optional[str]:
    """The password in a URL's userinfo or `password=` query option, if any."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    userinfo = parts.netloc.rpartition("@")[0]
    if ":" in userinfo:
        return userinfo.split(":", 1)[1] or None
    for key, value in parse_qsl(parts.query):
        if key == "password" and value:
            return value
    return None


def mask_url(url: str) -> str:
    """The URL with any password replaced by `***`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    netloc = f"{userinfo}{at}{hosts}"
    query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
    return parts._replace(netloc=netloc, query=query).geturl()


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
            if port and not (port.isdigit() and 0 < int(port) < 65536):
                problems.append(f"{name}: bad port {port!r} (must be 1-65535)")
    return parts


def _check_database_url(value: str, problems: list[str]) -> None:
    _check_url("DATABASE_URL", value, ("postgresql", "postgres"), problems)


def _check_redis_url(value: str, problems: list[str]) -> None:
    name = "REDIS_URL"
    parts = _check_url(name, value, ("redis", "rediss", "unix"), problems)
    if parts is None:
        return
    if parts.scheme == "unix":
        if not parts.path:
            problems.append(f"{name}: unix:// URL needs a socket path")
    elif parts.path.strip("/") and not parts.path.strip("/").isdigit():
        problems.append(f"{name}: database must be a number, got {parts.path.strip('/')!r}")


def _positive_number(name: str, value: str, problems: list[str]) -> float:
    try:
        number = float(value)
    except ValueError:
        problems.append(f"{name}: not a number: {value!r}")
        return 1.0
    if not math.isfinite(number) or number <= 0:
        problems.append(f"{name}: must be a number of seconds > 0, got {value!r}")
        return 1.0
    return number


def _table(value: str, problems: list[str]) -> tuple[str, ...]:
    parts = tuple(value.split("."))
    if len(parts) > 2 or not all(_IDENT.match(p) for p in parts):
        problems.append(f"HEARTBEAT_TABLE: must be table or schema.table (1-63 characters each, no quotes), got {value!r}")
        return ("service_heartbeat",)
    return parts


def _spool_path(value: str, environ: Mapping[str, str]) -> Path:
    if value:
        return Path(value)
    state = environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(state) / "spool.db" if state else Path("heartbeatd-spool.db")


def merged_environment(
    environ: Mapping[str, str], env_file: Optional[Path], cwd: Optional[Path] = None
) -> dict[str, str]:
    """Environment with dotenv values and credentials applied in SPEC's order of precedence."""
    def read(path: Path) -> dict[str, str]:
        # interpolate=False: a `$` in a password must stay a `$`, as in systemd's EnvironmentFile=.
        values = dotenv_values(path, interpolate=False)
        return {k: v for k, v in values.items() if v is not None}

    if env_file is not None:
        if not env_file.is_file() or not os.access(env_file, os.R_OK):
            raise ConfigError([f"--env-file: cannot read {env_file}"])
        merged = {**environ, **read(env_file)}
    else:
        default = (cwd or Path.cwd()) / ".env"
        merged = {**(read(default) if default.is_file() else {}), **environ}
    cred_dir = environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        for filename, variable in CREDENTIALS.items():
            path = Path(cred_dir) / filename
            if path.is_file():
                merged[variable] = path.read_text(encoding="utf-8").strip()
    return merged


def load(environ: Mapping[str, str], env_file: Optional[Path] = None, cwd: Optional[Path] = None) -> Config:
    """Build and validate the configuration; raise ConfigError listing every problem."""
    merged = merged_environment(environ, env_file, cwd)

    def get(name: str) -> str:
        value = merged.get(name, "").strip()
        return value if value else DEFAULTS[name]

    problems: list[str] = []
    database_url, redis_url = get("DATABASE_URL"), get("REDIS_URL")
    _check_database_url(database_url, problems)
    _check_redis_url(redis_url, problems)
    interval = _positive_number("HEARTBEAT_INTERVAL", get("HEARTBEAT_INTERVAL"), problems)
    timeout = _positive_number("HEARTBEAT_TIMEOUT", get("HEARTBEAT_TIMEOUT"), problems)
    backend_ip = get("HEARTBEAT_BACKEND_IP") or None
    if backend_ip:
        try:
            backend_ip = str(ipaddress.ip_address(backend_ip))
        except ValueError:
            problems.append(f"HEARTBEAT_BACKEND_IP: not an IP address: {backend_ip!r}")
    table = _table(get("HEARTBEAT_TABLE"), problems)
    max_rows_text = get("HEARTBEAT_SPOOL_MAX_ROWS")
    max_rows = int(max_rows_text) if max_rows_text.isdigit() else 0
    if max_rows <= 0:
        problems.append(f"HEARTBEAT_SPOOL_MAX_ROWS: must be a whole number > 0, got {max_rows_text!r}")
    log_level = get("HEARTBEAT_LOG_LEVEL").upper()
    if log_level not in LOG_LEVELS:
        problems.append(f"HEARTBEAT_LOG_LEVEL: must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    if problems:
        raise ConfigError(problems)
    return Config(
        database_url=database_url,
        redis_url=redis_url,
        interval=interval,
        timeout=timeout,
        backend_ip=backend_ip,
        table=table,
        spool_path=_spool_path(merged.get("HEARTBEAT_SPOOL_PATH", "").strip(), merged),
        spool_max_rows=max_rows,
        log_level=log_level,
        env_file=env_file,
    )
