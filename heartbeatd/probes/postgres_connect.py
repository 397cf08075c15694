"""PostgreSQL: a fresh connection on which the server itself answers, within the timeout, is the proof of life.

The connection is made through the one door to libpq (`heartbeatd.pg`: each host of a
multi-host DATABASE_URL within its own share of the timeout). It is kept for the cycle's
writes: the cycle takes it with `take_connection()` and closes it.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Optional

from heartbeatd.config import Config
from heartbeatd.heartbeat import LOOPBACK, POSTGRES, ProbeResult
from heartbeatd.names import Resolver
from heartbeatd.pg import Connector, close_quietly, explain, server_address
from heartbeatd.probes import peer_ip, register

class PostgresProbe:
    """Opens the cycle's connection; the cycle hands it to the writer, then closes it."""

    service = POSTGRES

    def __init__(self, dsn: str, timeout: float, resolver: Optional[Resolver] = None) -> None:
        self.connector = Connector(dsn, timeout, resolver)
        self._conn: Optional[Any] = None

    def _down_ip(self) -> str:
        """SPEC: when down, the first configured host resolved (as far as it was), else as written."""
        first = self.connector.hosts[0]
        if first.is_socket:
            return LOOPBACK
        return (self.connector.resolved.get(first.host) or [first.hostaddr or first.host])[0]

    def check(self, found: Mapping[str, ProbeResult] = {}, until: Optional[float] = None) -> ProbeResult:  # noqa: B006
        """Connect by `until` (default: the timeout from now); the open connection waits in `take_connection()`."""
        if self._conn is not None:  # one not taken by the last cycle (it stopped early)
            self.close()
        started = time.monotonic()
        conn, server_ip, failures = self.connector.connect(server_address, until)
        if conn is None:
            # The daemon's 数据库连接测试失败 line and `once` say what to change, not only what libpq said.
            return ProbeResult(POSTGRES, self._down_ip(), False, time.monotonic() - started,
                               explain("; ".join(failures))[1],
                               retry=self.connector.failed_fast)
        self._conn = conn
        ip = server_ip or peer_ip(conn.fileno()) or self._down_ip()
        return ProbeResult(POSTGRES, ip, True, time.monotonic() - started)

    def take_connection(self) -> Optional[Any]:
        """The connection the last check opened (once), or None if it failed."""
        conn, self._conn = self._conn, None
        return conn

    def close(self) -> None:
        """Close a connection nobody took."""
        conn = self.take_connection()
        if conn is not None:
            close_quietly(conn)


@register
def from_config(config: Config, resolver: Resolver) -> PostgresProbe:
    """The PostgreSQL check of DATABASE_URL."""
    return PostgresProbe(config.database_url, config.timeout, resolver)
