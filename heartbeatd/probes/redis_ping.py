"""Redis: PING answered within the timeout, on one connection kept across cycles."""

from __future__ import annotations

import time
from typing import Any, Optional
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from heartbeatd.probes import LOOPBACK, REDIS, ProbeResult, peer_ip, resolve

_AUTH_MARKERS = ("NOAUTH", "WRONGPASS", "invalid password", "invalid username-password", "AUTH")


def reason(exc: BaseException, timeout: float, has_password: bool = True) -> str:
    """A short, operator-facing reason: `Connection refused`, `timed out after 5s`, ..."""
    text = " ".join(str(exc).split())
    if isinstance(exc, redis.AuthenticationError) or (
        isinstance(exc, redis.ResponseError) and any(m in text for m in _AUTH_MARKERS)
    ):
        if not has_password:
            return f"authentication failed: the server wants a password and REDIS_URL has none ({text})"
        return f"authentication failed: {text}"
    if isinstance(exc, redis.TimeoutError):
        return f"timed out after {timeout:g}s"
    cause: Optional[BaseException] = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return text or type(exc).__name__


class RedisProbe:
    """Owns one redis-py Connection; it reconnects by itself on the next cycle after an error."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        # No retries: the deadline is ours. (redis-py >= 6 retries 3 times with backoff by default.)
        pool = redis.ConnectionPool.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._conn: Any = pool.make_connection()
        self.last_ip: Optional[str] = None
        self._peer_of: Any = None  # the socket last_ip was read from

    def _configured_ip(self) -> str:
        parts = urlsplit(self.url)
        return LOOPBACK if parts.scheme == "unix" else resolve(parts.hostname or "localhost")

    def _ping(self, deadline: float) -> None:
        conn = self._conn
        conn.connect()  # a no-op while connected
        sock = getattr(conn, "_sock", None)
        if sock is not None:
            # The reply must come within what is left of this probe's timeout, not a fresh one.
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
        conn.send_command("PING")
        reply = conn.read_response()
        if reply not in (b"PONG", "PONG", True):
            raise redis.ResponseError(f"unexpected reply to PING: {reply!r}")

    def check(self) -> ProbeResult:
        """PING within the timeout; the result carries the live peer address."""
        start = time.monotonic()
        deadline = start + self.timeout
        was_connected = getattr(self._conn, "_sock", None) is not None
        try:
            try:
                self._ping(deadline)
            except redis.ConnectionError:
                # A kept connection may have died with a restarted server: one fresh try.
                self._conn.disconnect()
                if not was_connected:
                    raise
                self._ping(deadline)
        except Exception as exc:  # noqa: BLE001 - every failure is a down result, never a crash
            self._conn.disconnect()
            ip = self._configured_ip()  # SPEC: when down, the configured host resolved
            error = reason(exc, self.timeout, bool(urlsplit(self.url).password))
            return ProbeResult(REDIS, ip, False, time.monotonic() - start, error)
        sock = getattr(self._conn, "_sock", None)
        if sock is not self._peer_of:  # a new connection: look its peer up once
            self._peer_of = sock
            self.last_ip = (peer_ip(sock.fileno()) if sock is not None else None) or self.last_ip or self._configured_ip()
        assert self.last_ip is not None
        return ProbeResult(REDIS, self.last_ip, True, time.monotonic() - start)

    def close(self) -> None:
        """Drop the kept connection."""
        self._conn.disconnect()
