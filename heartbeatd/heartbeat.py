"""The data model: a check's result, a heartbeat row, service names, UTC, and the table's columns.

COLUMNS is the one list of the table's columns: the writer's INSERTs, the spool's file and the
CREATE TABLE of `init-db` (and packaging/schema.sql) are all derived from it. A column that a
table may or may not have (kind "extra") is written where the table has it and carried by every
row, spooled ones too, in `Row.extra`; adding one is one entry here with the function that takes
its value from the check's result. An extra column must be nullable: a row spooled before the
column existed carries NULL for it.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime, timezone
from typing import Any, Callable, NamedTuple, Optional, Sequence

BACKEND = "后端"
REDIS = "redis"
POSTGRES = "postgres"
SERVICES = (BACKEND, REDIS, POSTGRES)  # the order in which a cycle's results are shown
LOOPBACK = "127.0.0.1"


class ProbeResult(NamedTuple):  # NamedTuple, not a frozen dataclass: several are made every cycle
    """What one check found: the service, its address, whether it is up, how long it took."""

    service: str
    ip: str
    ok: bool
    latency: float  # seconds
    error: Optional[str] = None
    retry: bool = False  # failed fast (refused, reset, still loading): worth one more try within the timeout


class Column(NamedTuple):
    """One column of the heartbeat table."""

    name: str
    ddl: str  # its type and constraints in CREATE TABLE
    kind: str  # "key": identifies a heartbeat; "stamp": set when written; "extra": optional, from the check
    value: Optional[Callable[[ProbeResult], Any]] = None  # an extra column's value, from the check's result
    time: bool = False  # a timestamp: naive UTC for `timestamp`, the aware instant for `timestamptz`


COLUMNS: tuple[Column, ...] = (
    Column("service_name", "varchar(50) NOT NULL", "key"),
    Column("ip_address", "varchar(64) NOT NULL", "key"),
    Column("report_time", "timestamp   NOT NULL", "key", time=True),
    Column("created_at", "timestamp   NOT NULL DEFAULT (now() AT TIME ZONE 'utc')", "stamp", time=True),
    # The check's latency, where the table has the column (any numeric type; `init-db --with-latency`).
    Column("latency_ms", "double precision", "extra", value=lambda result: round(result.latency * 1000, 3)),
)
LATENCY = "latency_ms"
KEY = tuple(c for c in COLUMNS if c.kind == "key")  # a Row's first fields, in this order
EXTRA = tuple(c for c in COLUMNS if c.kind == "extra")  # a Row's `extra`, in this order
REQUIRED = tuple(c.name for c in COLUMNS if c.kind != "extra")  # a table without one of these is refused


class Row(NamedTuple):
    """One heartbeat for the table: a healthy service, its address, when the check ran (UTC)."""

    service: str
    ip: str
    report_time: datetime  # timezone-aware, UTC
    extra: tuple[Any, ...] = ()  # the values of the EXTRA columns (none: the table's defaults)


_VALUES = tuple(c.value or (lambda result: None) for c in EXTRA)  # each extra column's value, in order


def rows_of(results: Sequence[ProbeResult], report_time: datetime) -> list[Row]:
    """The rows the healthy checks' results are recorded as (one call a cycle: it is on the hot path)."""
    if len(_VALUES) == 1:  # today's case, latency_ms: no generator per row
        value = _VALUES[0]
        return [Row(r.service, r.ip, report_time, (value(r),)) for r in results if r.ok]
    if not _VALUES:
        return [Row(r.service, r.ip, report_time) for r in results if r.ok]
    return [Row(r.service, r.ip, report_time, tuple([v(r) for v in _VALUES])) for r in results if r.ok]


def utcnow() -> datetime:
    """Aware UTC now: the wall clock is only ever used for report_time and created_at."""
    return datetime.now(timezone.utc)


EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
NAIVE_EPOCH = datetime(1970, 1, 1)


def to_naive_utc(value: datetime) -> datetime:
    """The same instant as naive UTC wall time, what a `timestamp` column holds (naive: as it is).

    Arithmetic rather than `astimezone(utc).replace(tzinfo=None)`: those parse keyword arguments,
    and did so for every value written, the largest single cost of a cycle (callgrind).
    """
    return value if value.tzinfo is None else NAIVE_EPOCH + (value - EPOCH)


def as_utc(value: datetime) -> datetime:
    """A time from either column type (naive UTC, or aware) as an aware UTC datetime."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def naive_utc(value: datetime) -> str:
    """`2026-11-27 19:10:32`: how the table shows a report_time (naive UTC)."""
    return to_naive_utc(value).isoformat(sep=" ", timespec="seconds")


def canonical_ip(text: str) -> str:
    """An address as an operator may type it (`2001:DB8:0::1`, `::ffff:10.0.0.5`) in the form heartbeatd
    stores (`2001:db8::1`, `10.0.0.5`: normalize_ip of the kernel's text); anything else as it is."""
    try:
        address = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return text
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped or address)


def normalize_ip(address: str) -> str:
    """An address as the kernel reports it, IPv4-mapped IPv6 (`::ffff:10.0.0.5`) shown as IPv4."""
    address = address.split("%")[0]
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    return address
