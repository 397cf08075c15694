"""Redis behind Sentinel: the sentinels name the master, the master confirms it is one and PINGs.

REDIS_URL=redis+sentinel://[user:password@]host[:port][,host2[:port2],…]/service_name[/db][?options]

Every cycle asks the sentinels, in order, for the master of `service_name` (after a failover the
old master may still call itself master for a while: only the sentinels' word counts), then
connects to that master, asks ROLE and sends PING. The whole check fits in one
HEARTBEAT_TIMEOUT: each sentinel in turn gets an equal share of what is left, with one share
kept for the master, so a frozen first sentinel does not starve the others. Connections to the
sentinels and to the master are kept across cycles, through redis_ping's deadline-bound socket.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Optional

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from heartbeatd.config import SENTINEL_SCHEME, Config, ConfigError, parse_sentinel_url
from heartbeatd.heartbeat import REDIS, ProbeResult, normalize_ip
from heartbeatd.names import Resolver, is_address
from heartbeatd.probes import peer_ip, register
from heartbeatd.probes.redis_ping import TCPConnection, fast, reason


class Down(Exception):
    """The check's answer is `down`, for the reason given (a sentence for the operator)."""


class _Node:
    """One server (a sentinel or the master) and the connection kept to it."""

    def __init__(self, host: str, port: int, timeout: float, username: Optional[str], password: Optional[str],
                 db: int = 0) -> None:
        self.host, self.port = host, port
        self.name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.conn: Any = TCPConnection(host=host, port=port, username=username, password=password, db=db,
                              socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
                              health_check_interval=0)  # type: ignore[no-untyped-call]

    def connected(self) -> bool:
        sock = self.conn.hb_sock
        return sock is not None and not sock.closed

    def ask(self, resolver: Resolver, until: float, *command: Any) -> Any:
        """One command by `until`: connecting first if needed, once more on a fresh connection if a
        kept one turns out dead (a restarted server)."""
        conn = self.conn
        conn.hb_deadline = until
        kept = self.connected()
        try:
            return self._ask(resolver, command)
        except redis.ConnectionError:
            conn.disconnect()
            if not kept:
                raise
            return self._ask(resolver, command)

    def _ask(self, resolver: Resolver, command: tuple[Any, ...]) -> Any:
        conn = self.conn
        if not self.connected():
            conn.hb_address = resolver.lookup(self.host, conn.hb_deadline)[0]
        conn.connect()  # a no-op while connected
        conn.send_command(*command)
        return conn.read_response()

    def close(self) -> None:
        self.conn.disconnect()


class SentinelProbe:
    """The `redis` check of a redis+sentinel:// URL; the row's address is the master's."""

    service = REDIS

    def __init__(self, url: str, timeout: float, resolver: Optional[Resolver] = None) -> None:
        self.spec = parse_sentinel_url(url)
        self.timeout = timeout
        self._resolver = resolver or Resolver()
        spec = self.spec
        self._sentinels = [_Node(host, port, timeout, spec.sentinel_username, spec.sentinel_password)
                           for host, port in spec.sentinels]
        self._master: Optional[_Node] = None
        self.last_ip: Optional[str] = None  # the master's address, as last confirmed

    def _discover(self, until: float) -> tuple[str, int]:
        """The master's (host, port) as the first sentinel that knows it says; Down if none does."""
        said: list[str] = []
        for i, sentinel in enumerate(self._sentinels):
            left = until - time.monotonic()
            share = left / (len(self._sentinels) - i + 1)  # one share kept for the master
            try:
                reply = sentinel.ask(self._resolver, time.monotonic() + share,
                                     "SENTINEL", "get-master-addr-by-name", self.spec.service_name)
            except Exception as exc:  # noqa: BLE001 - the next sentinel may answer
                sentinel.close()
                said.append(f"{sentinel.name}: {reason(exc, share, bool(self.spec.sentinel_password))}")
                continue
            if reply:
                host, port = (part.decode() if isinstance(part, bytes) else str(part) for part in reply[:2])
                return host, int(port)
            said.append(f"{sentinel.name}: no master named {self.spec.service_name!r}")
        if all(": no master named" not in line for line in said):
            raise Down(f"no sentinel answered ({'; '.join(said)})")
        raise Down(f"no sentinel knows a master named {self.spec.service_name!r} ({'; '.join(said)})")

    def _confirm(self, host: str, port: int, until: float) -> str:
        """ROLE and PING on the master the sentinels named; its address."""
        master = self._master
        if master is None or (master.host, master.port) != (host, port):
            if master is not None:
                master.close()
            spec = self.spec
            master = self._master = _Node(host, port, self.timeout, spec.username, spec.password, spec.db)
        try:
            role = master.ask(self._resolver, until, "ROLE")
            kind = role[0].decode() if isinstance(role[0], bytes) else str(role[0])
            if kind != "master":
                raise Down(f"{master.name}, the master the sentinels name, answers ROLE as a {kind}")
            reply = master.ask(self._resolver, until, "PING")
            if reply not in (b"PONG", "PONG", True):
                raise redis.ResponseError(f"unexpected reply to PING: {reply!r}")
        except Exception:
            master.close()
            raise
        sock = master.conn.hb_sock
        return (peer_ip(sock.fileno()) if sock is not None else None) or normalize_ip(master.conn.hb_address)

    def _down_ip(self, host: Optional[str]) -> str:
        """A down result's address: the master named this cycle, else the last one confirmed, else
        the first sentinel's host as written."""
        if host is not None and is_address(host):
            return normalize_ip(host)
        return self.last_ip or self._sentinels[0].host

    def check(self, found: Mapping[str, ProbeResult] = {}, until: Optional[float] = None) -> ProbeResult:  # noqa: B006
        """The sentinels, then the master, all by `until` (default: the timeout from now)."""
        start = time.monotonic()
        until = until if until is not None else start + self.timeout
        host: Optional[str] = None
        try:
            host, port = self._discover(until)
            ip = self._confirm(host, port, until)
        except Down as exc:
            return ProbeResult(REDIS, self._down_ip(host), False, time.monotonic() - start, str(exc))
        except Exception as exc:  # noqa: BLE001 - every failure is a down result, never a crash
            where = f"master {host}: " if host is not None else ""
            error = where + reason(exc, self.timeout, bool(self.spec.password))
            return ProbeResult(REDIS, self._down_ip(host), False, time.monotonic() - start, error, fast(exc))
        self.last_ip = ip
        return ProbeResult(REDIS, ip, True, time.monotonic() - start)

    def close(self) -> None:
        """Drop the kept connections."""
        for node in self._sentinels + ([self._master] if self._master else []):
            node.close()


@register
def from_config(config: Config, resolver: Resolver) -> Optional[SentinelProbe]:
    """The Redis check of a redis+sentinel:// REDIS_URL; None for any other URL."""
    if not config.redis_url.startswith(SENTINEL_SCHEME + "://"):
        return None
    try:
        return SentinelProbe(config.redis_url, config.timeout, resolver)
    except ValueError as exc:  # config.load checks the URL first: this is a second line of defence
        raise ConfigError([f"REDIS_URL: {exc}"]) from None
