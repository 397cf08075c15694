"""One check per service; each returns a ProbeResult and never raises."""

from __future__ import annotations

import socket
from datetime import datetime, timezone
from typing import NamedTuple, Optional

BACKEND = "后端"
REDIS = "redis"
POSTGRES = "postgres"
LOOPBACK = "127.0.0.1"


class ProbeResult(NamedTuple):  # NamedTuple, not a frozen dataclass: several are made every cycle
    """What one check found: the service, its address, whether it is up, how long it took."""

    service: str
    ip: str
    ok: bool
    latency: float
    error: Optional[str] = None


def normalize_ip(address: str) -> str:
    """An address as the kernel reports it, IPv4-mapped IPv6 (`::ffff:10.0.0.5`) shown as IPv4."""
    address = address.split("%")[0]
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    return address


def peer_ip(fd: int) -> Optional[str]:
    """The remote IP of a connected socket, LOOPBACK for a Unix socket, None if unknown."""
    try:
        sock = socket.socket(fileno=socket.dup(fd))
    except OSError:
        return None
    with sock:
        if sock.family == socket.AF_UNIX:
            return LOOPBACK
        try:
            return normalize_ip(sock.getpeername()[0])
        except OSError:
            return None


class Row(NamedTuple):
    """One heartbeat for the table: a healthy service, its address, when the check ran (UTC)."""

    service: str
    ip: str
    report_time: datetime  # timezone-aware, UTC


def utcnow() -> datetime:
    """Aware UTC now: the wall clock is only ever used for report_time and created_at."""
    return datetime.now(timezone.utc)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NAIVE_EPOCH = datetime(1970, 1, 1)


def to_naive_utc(value: datetime) -> datetime:
    """The same instant as naive UTC wall time, what a `timestamp` column holds (naive: as it is).

    Arithmetic rather than `astimezone(utc).replace(tzinfo=None)`: those parse keyword arguments,
    and did so for every value written, the largest single cost of a cycle (callgrind).
    """
    return value if value.tzinfo is None else _NAIVE_EPOCH + (value - _EPOCH)


def naive_utc(value: datetime) -> str:
    """`2026-11-27 19:10:32`: how the table shows a report_time (naive UTC)."""
    return to_naive_utc(value).isoformat(sep=" ", timespec="seconds")
