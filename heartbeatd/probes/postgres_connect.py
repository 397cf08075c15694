"""PostgreSQL: a fresh connection on which the server itself answers, within the timeout, is the proof of life.

libpq is handed one host at a time, by address (`hostaddr=`, the name kept in `host=` for TLS
verification), each with its own share of the deadline: a frozen first host of several costs its
share, not the whole timeout, and the next one is still tried in the same cycle. The name lookups
are ours and bounded too; `target_session_attrs` is checked by libpq on each host as usual.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Optional

import psycopg2
import psycopg2.extensions

from heartbeatd.config import ConfigError, mask, url_password
from heartbeatd.pgdeadline import deadline
from heartbeatd.probes import LOOPBACK, POSTGRES, ProbeResult, normalize_ip, peer_ip
from heartbeatd.probes.names import LookupFailed, Resolver, is_address

DEFAULT_PORT = "5432"
SERVER_ADDRESS = "SELECT host(inet_server_addr())"
# libpq: `connection to server at "10.0.0.5", port 5432 failed: ` - we name host:port ourselves.
_LIBPQ_PREFIX = re.compile(r'^connection to server (?:at "[^"]*"(?: \([^)]*\))?, port \d+|on socket "[^"]*") failed: ')


def reason(exc: BaseException) -> str:
    """One line from a driver error: libpq's lines joined as sentences, its own host prefix dropped."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    lines[0] = _LIBPQ_PREFIX.sub("", lines[0])
    text = lines[0]
    for line in lines[1:]:
        # libpq wraps within a sentence ("... abnormally" / "before or while ...") and starts a new
        # one with a capital ("Connection refused" / "Is the server running ...").
        if line[:1].isupper() and text[-1:] not in ".?!:":
            text += "."
        text += " " + line
    return text


@dataclass(frozen=True)
class _Host:
    host: str  # as configured: a name, an address, or a Unix socket directory
    port: str
    hostaddr: str  # given in the URL (then no lookup), else ""


def _split(value: Optional[str]) -> list[str]:
    return value.split(",") if value else []


def parse(dsn: str) -> tuple[dict[str, str], list[_Host]]:
    """libpq's own reading of the URL, and its hosts; ConfigError (password masked) if libpq refuses it."""
    try:
        options = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.Error as exc:
        password = url_password(dsn)
        text = " ".join(str(exc).split())
        raise ConfigError([f"DATABASE_URL: {mask(text, [password] if password else [])}"]) from None
    hosts = _split(options.pop("host", None)) or [""]
    ports = _split(options.pop("port", None)) or [DEFAULT_PORT]
    addrs = _split(options.pop("hostaddr", None))
    if len(ports) == 1:
        ports *= len(hosts)
    if len(ports) != len(hosts) or (addrs and len(addrs) != len(hosts)):
        raise ConfigError([f"DATABASE_URL: {len(hosts)} host(s) but {len(ports)} port(s)"
                           + (f" and {len(addrs)} hostaddr(s)" if addrs else "")])
    for port in ports:
        if not re.fullmatch(r"[0-9]{1,5}", port or DEFAULT_PORT) or not 0 < int(port or DEFAULT_PORT) < 65536:
            raise ConfigError([f"DATABASE_URL: bad port {port!r} (must be 1-65535)"])
    return options, [_Host(h, p or DEFAULT_PORT, addrs[i] if addrs else "") for i, (h, p) in enumerate(zip(hosts, ports))]


def _is_socket(host: str) -> bool:
    return host == "" or host.startswith("/") or host.startswith("@")


class PostgresProbe:
    """Opens the cycle's connection; the writer writes on it, the daemon closes it."""

    def __init__(self, dsn: str, timeout: float, resolver: Optional[Resolver] = None) -> None:
        self.dsn = dsn
        self.timeout = timeout
        options, self._hosts = parse(dsn)
        options.setdefault("application_name", "heartbeatd")
        self._options = options
        self._resolver = resolver or Resolver()
        self._resolved: dict[str, list[str]] = {}  # what each name last resolved to (for a down row's IP)
        self._dsns: dict[tuple[str, str, str], str] = {}  # (host, address, port) -> libpq DSN, built once
        self._fixed: dict[_Host, list[tuple[str, str]]] = {}
        for host in self._hosts:
            if _is_socket(host.host) or host.hostaddr or is_address(host.host):
                self._fixed[host] = self._candidates(host, float("inf"))

    def _candidates(self, host: _Host, until: float) -> list[tuple[str, str]]:
        """(label, dsn) for each address of one configured host."""
        known = self._fixed.get(host)
        if known is not None:  # an address or a socket: nothing to look up, nothing to rebuild
            return known
        label = f"{host.host or 'local socket'}:{host.port}"
        if _is_socket(host.host):
            key = (host.host, "", host.port)
            if key not in self._dsns:
                self._dsns[key] = psycopg2.extensions.make_dsn(**self._options, **({"host": host.host} if host.host
                                                                                  else {}), port=host.port)
            return [(label, self._dsns[key])]
        addresses = [host.hostaddr] if host.hostaddr else self._resolver.lookup(host.host, until)
        self._resolved[host.host] = addresses
        return [(label if address == host.host else f"{label} ({address})", self._dsn(host, address))
                for address in addresses]

    def _dsn(self, host: _Host, address: str) -> str:
        # make_dsn parses and escapes with libpq and regexes: once per address, not once per cycle.
        key = (host.host, address, host.port)
        dsn = self._dsns.get(key)
        if dsn is None:
            if len(self._dsns) > 64:  # a name whose addresses keep changing must not grow this forever
                self._dsns.clear()
            dsn = self._dsns[key] = psycopg2.extensions.make_dsn(**self._options, host=host.host, hostaddr=address,
                                                                  port=host.port)
        return dsn

    @staticmethod
    def _server_address(conn: Any) -> Optional[str]:
        """One round trip to PostgreSQL itself: a pooler or proxy that accepted the login is not proof.

        Returns the address the server itself answers on (None over a Unix socket).
        """
        with conn.cursor() as cur:
            cur.execute(SERVER_ADDRESS)
            row = cur.fetchone()
        return normalize_ip(row[0]) if row and row[0] else None

    def _down_ip(self) -> str:
        """SPEC: when down, the first configured host resolved (as far as it was), else as written."""
        first = self._hosts[0]
        if _is_socket(first.host):
            return LOOPBACK
        return (self._resolved.get(first.host) or [first.hostaddr or first.host])[0]

    def check(self) -> tuple[ProbeResult, Optional[Any]]:
        """Connect within the timeout; return the result and the open connection (or None)."""
        start = time.monotonic()
        end = start + self.timeout
        failures: list[str] = []
        for index, host in enumerate(self._hosts):
            # Each host gets an equal share of what is left, so a frozen one cannot starve the next.
            share_end = time.monotonic() + (end - time.monotonic()) / (len(self._hosts) - index)
            try:
                candidates = self._candidates(host, share_end)
            except LookupFailed as exc:
                failures.append(f"{host.host}:{host.port}: {exc}")
                continue
            for number, (label, dsn) in enumerate(candidates):
                left = share_end - time.monotonic()
                slot = left / (len(candidates) - number)
                conn = None
                try:
                    with deadline(max(slot, 0.001)):
                        # What psycopg2.connect() does, less its make_dsn(): that parses the DSN
                        # again every cycle, and ours was built by make_dsn once.
                        conn = psycopg2.extensions.connection(dsn)
                        conn.autocommit = True
                        server_ip = self._server_address(conn)
                except Exception as exc:  # noqa: BLE001 - every failure is a down result, never a crash
                    failures.append(f"{label}: {reason(exc)}")
                    if conn is not None:
                        conn.close()
                    continue
                ip = server_ip or peer_ip(conn.fileno()) or self._down_ip()
                return ProbeResult(POSTGRES, ip, True, time.monotonic() - start), conn
        error = "; ".join(failures) if failures else "no host to connect to"
        return ProbeResult(POSTGRES, self._down_ip(), False, time.monotonic() - start, error), None
