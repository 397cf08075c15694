"""PostgreSQL: a fresh connection accepted within the timeout is the proof of life."""

from __future__ import annotations

import time
from typing import Any, Optional
from urllib.parse import urlsplit

import psycopg2
import psycopg2.extensions

from heartbeatd.pgdeadline import deadline
from heartbeatd.probes import LOOPBACK, POSTGRES, ProbeResult, peer_ip, resolve


def configured_host(dsn: str) -> str:
    """The first host of a libpq URL (a Unix socket directory counts as loopback)."""
    parts = urlsplit(dsn)
    netloc = parts.netloc.rpartition("@")[2].split(",")[0]
    host = netloc[1:].partition("]")[0] if netloc.startswith("[") else netloc.partition(":")[0]
    if not host:
        for item in parts.query.split("&"):
            key, _, value = item.partition("=")
            if key == "host" and value:
                host = value.split(",")[0]
                break
    return host or LOOPBACK


def reason(exc: BaseException) -> str:
    """One line from a driver error, without libpq's multi-line layout."""
    return " ".join(str(exc).split()) or type(exc).__name__


class PostgresProbe:
    """Opens the cycle's connection; the writer writes on it, the daemon closes it."""

    def __init__(self, dsn: str, timeout: float) -> None:
        self.dsn = dsn
        # Parsed and extended once, not on every cycle's connect.
        self._connect_dsn = psycopg2.extensions.make_dsn(dsn, application_name="heartbeatd")
        self.timeout = timeout

    def check(self) -> tuple[ProbeResult, Optional[Any]]:
        """Connect within the timeout; return the result and the open connection (or None)."""
        start = time.monotonic()
        try:
            with deadline(self.timeout):
                conn = psycopg2.connect(self._connect_dsn)
        except Exception as exc:  # noqa: BLE001 - every failure is a down result, never a crash
            ip = resolve(configured_host(self.dsn))  # SPEC: when down, the configured host resolved
            return ProbeResult(POSTGRES, ip, False, time.monotonic() - start, reason(exc)), None
        conn.autocommit = True
        ip = peer_ip(conn.fileno()) or resolve(configured_host(self.dsn))
        return ProbeResult(POSTGRES, ip, True, time.monotonic() - start), conn
