"""Redis: PING answered within the timeout, on one connection kept across cycles.

The whole check — name lookup, TCP connect, TLS, the handshake redis-py sends on connect (AUTH
or HELLO, CLIENT SETINFO, SELECT, CLIENT SETNAME) and the PING — fits in one HEARTBEAT_TIMEOUT:
the socket handed to redis-py sets, before every read and write, only what is left of the
check's deadline (redis-py alone gives each step a fresh socket timeout).
"""

from __future__ import annotations

import errno
import socket
import time
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from heartbeatd.config import SENTINEL_SCHEME, Config, ConfigError, mask, url_secrets
from heartbeatd.heartbeat import LOOPBACK, REDIS, ProbeResult
from heartbeatd.names import LookupFailed, Resolver
from heartbeatd.probes import peer_ip, register

_AUTH_MARKERS = ("NOAUTH", "WRONGPASS", "invalid password", "invalid username-password", "AUTH")


def reason(exc: BaseException, timeout: float, has_password: bool = True) -> str:
    """A short, operator-facing reason: `Connection refused`, `timed out after 5s`, ..."""
    text = " ".join(str(exc).split())
    if isinstance(exc, LookupFailed):
        return text
    if isinstance(exc, redis.AuthenticationError) or (
        isinstance(exc, redis.ResponseError) and any(m in text for m in _AUTH_MARKERS)
    ):
        if not has_password:
            return f"authentication failed: the server wants a password and REDIS_URL has none ({text})"
        return f"authentication failed: {text}"
    if isinstance(exc, (redis.TimeoutError, socket.timeout)):
        return f"timed out after {timeout:g}s"
    cause: Optional[BaseException] = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return text or type(exc).__name__


_FAST_ERRNOS = (errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE)


def fast(exc: BaseException) -> bool:
    """A failure worth one more try within the timeout: refused or reset, `-LOADING`, `-BUSY`."""
    if isinstance(exc, (redis.TimeoutError, socket.timeout)):
        return False
    if isinstance(exc, redis.BusyLoadingError):
        return True
    if isinstance(exc, redis.ResponseError):
        return str(exc).startswith(("BUSY ", "LOADING "))
    if isinstance(exc, redis.ConnectionError) and "Connection closed by server" in str(exc):
        return True
    cause: Optional[BaseException] = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in _FAST_ERRNOS:
            return True
        cause = cause.__cause__ or cause.__context__
    return False


class _DeadlineSocket:
    """A socket that never waits past its connection's `hb_deadline` (monotonic).

    It also tells the probe whether the connection is open and what its peer is, without
    reading redis-py's private `_sock`: the connection sets `hb_sock` to it, and redis-py's
    disconnect() closes it.
    """

    def __init__(self, sock: socket.socket, owner: Any) -> None:
        self._sock = sock
        self._owner = owner
        self._requested: Optional[float] = sock.gettimeout()  # what redis-py last asked for
        self.closed = False
        owner.hb_sock = self

    def close(self) -> None:
        self.closed = True
        self._sock.close()

    def _bound(self) -> None:
        left = self._owner.hb_deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        wanted = self._requested
        self._sock.settimeout(left if wanted is None or wanted > left else wanted)

    def settimeout(self, value: Optional[float]) -> None:
        self._requested = value
        self._sock.settimeout(value)

    def recv(self, *args: Any) -> bytes:
        self._bound()
        return self._sock.recv(*args)

    def recv_into(self, *args: Any) -> int:
        self._bound()
        return self._sock.recv_into(*args)

    def send(self, *args: Any) -> int:
        self._bound()
        return self._sock.send(*args)

    def sendall(self, *args: Any) -> None:
        self._bound()
        self._sock.sendall(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


# The one private method of redis-py overridden here: it has no public hook for making the socket,
# and ours must connect to the address we resolved, within what is left of the check's deadline.
class _Plain(redis.Connection):
    """TCP to the address the probe resolved (no lookup in here), connected within the deadline."""

    hb_deadline = 0.0
    hb_address = ""
    hb_sock: Optional[_DeadlineSocket] = None

    def _connect(self) -> socket.socket:
        left = self.hb_deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        sock = socket.create_connection((self.hb_address, self.port), timeout=left)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.socket_keepalive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return sock


class TCPConnection(_Plain):
    """redis-py's Connection over TCP to `hb_address`, whose socket never waits past `hb_deadline`
    (also the sentinel check's, to each sentinel and to the master)."""

    def _connect(self) -> Any:
        return _DeadlineSocket(super()._connect(), self)


class _TLS(redis.SSLConnection, _Plain):
    # SSLConnection._connect wraps what super()._connect() returns, which here is _Plain's socket:
    # the name (self.host) stays for SNI and certificate verification.
    def _connect(self) -> Any:
        return _DeadlineSocket(super()._connect(), self)  # type: ignore[no-untyped-call]


class _Unix(redis.UnixDomainSocketConnection):
    hb_deadline = 0.0
    hb_sock: Optional[_DeadlineSocket] = None

    def _connect(self) -> Any:
        return _DeadlineSocket(super()._connect(), self)  # type: ignore[no-untyped-call]


CLASSES = {"redis": TCPConnection, "rediss": _TLS, "unix": _Unix}


def make_connection(url: str, timeout: float) -> Any:
    """A redis-py Connection for the URL, validated by redis-py's own parser; ConfigError if unusable."""
    scheme = urlsplit(url).scheme
    try:
        # No retries: the deadline is ours. (redis-py >= 6 retries 3 times with backoff by default.)
        pool = redis.ConnectionPool.from_url(
            url, connection_class=CLASSES[scheme], socket_connect_timeout=timeout, socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=0,
        )
        return pool.make_connection()
    except (ValueError, TypeError, KeyError, redis.RedisError) as exc:
        # No connection is made here: a RedisError too is the URL's (`?protocol=4`: a ConnectionError).
        text = str(exc)
        if "unexpected keyword argument" in text:
            text = "unknown option " + text.rpartition("argument")[2].strip()
        raise ConfigError([f"REDIS_URL: {mask(text, url_secrets(url))}"]) from None


class RedisProbe:
    """Owns one redis-py Connection; it reconnects by itself on the next cycle after an error."""

    service = REDIS

    def __init__(self, url: str, timeout: float, resolver: Optional[Resolver] = None) -> None:
        self.url = url
        self.timeout = timeout
        self._conn: Any = make_connection(url, timeout)  # first: it judges the URL
        read = redis.connection.parse_url(url)  # type: ignore[no-untyped-call] # redis-py's own reading
        self._host = "" if urlsplit(url).scheme == "unix" else (read.get("host") or "localhost")
        self._has_password = bool(read.get("password"))
        self._resolver = resolver or Resolver()
        self.last_ip: Optional[str] = None
        self._peer_of: Any = None  # the socket last_ip was read from
        self._addresses: list[str] = []  # what the host last resolved to

    def _connected(self) -> bool:
        sock = self._conn.hb_sock
        return sock is not None and not sock.closed

    def _ping(self) -> None:
        conn = self._conn
        if not self._connected() and self._host:
            self._addresses = self._resolver.lookup(self._host, conn.hb_deadline)
            conn.hb_address = self._addresses[0]
        conn.connect()  # a no-op while connected
        conn.send_command("PING")
        reply = conn.read_response()
        if reply not in (b"PONG", "PONG", True):
            raise redis.ResponseError(f"unexpected reply to PING: {reply!r}")

    def _configured_ip(self) -> str:
        """SPEC: when down, the configured host resolved (only as far as it already was), else as written."""
        if not self._host:
            return LOOPBACK
        return self._addresses[0] if self._addresses else self._host

    def check(self, found: Mapping[str, ProbeResult] = {}, until: Optional[float] = None) -> ProbeResult:  # noqa: B006
        """PING by `until` (default: the timeout from now); the result carries the live peer address."""
        start = time.monotonic()
        self._conn.hb_deadline = until if until is not None else start + self.timeout
        was_connected = self._connected()
        try:
            try:
                self._ping()
            except redis.ConnectionError:
                # A kept connection may have died with a restarted server: one fresh try, same deadline.
                self._conn.disconnect()
                if not was_connected:
                    raise
                self._ping()
        except Exception as exc:  # noqa: BLE001 - every failure is a down result, never a crash
            self._conn.disconnect()
            error = reason(exc, self.timeout, self._has_password)
            return ProbeResult(REDIS, self._configured_ip(), False, time.monotonic() - start, error, fast(exc))
        sock = self._conn.hb_sock
        if sock is not self._peer_of:  # a new connection: look its peer up once
            self._peer_of = sock
            self.last_ip = (peer_ip(sock.fileno()) if sock is not None else None) or self.last_ip or self._configured_ip()
        assert self.last_ip is not None
        return ProbeResult(REDIS, self.last_ip, True, time.monotonic() - start)

    def close(self) -> None:
        """Drop the kept connection."""
        self._conn.disconnect()


@register
def from_config(config: Config, resolver: Resolver) -> Optional[RedisProbe]:
    """The Redis check of REDIS_URL (a redis+sentinel:// URL is redis_sentinel's)."""
    if config.redis_url.startswith(SENTINEL_SCHEME + "://"):
        return None
    return RedisProbe(config.redis_url, config.timeout, resolver)
