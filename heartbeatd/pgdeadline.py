"""A deadline on every libpq wait, through psycopg2's wait callback.

libpq's own `connect_timeout` has a 2 s floor, applies per host, and does nothing once a
connection is established: a server that accepts TCP and then stalls (SIGSTOP'd postmaster,
a backend frozen mid-INSERT) would block a plain psycopg2 call forever. With a wait callback
installed psycopg2 drives libpq in non-blocking mode and asks us to wait for the socket, so
every wait can be bounded by the deadline of the step in progress.
"""

from __future__ import annotations

import select
import time
from typing import Any, Callable, Optional

import psycopg2
import psycopg2.extensions as ext
from psycopg2.extensions import POLL_OK, POLL_READ, POLL_WRITE

_deadline: Optional[float] = None
_timeout: float = 0.0


class DeadlineExceeded(psycopg2.OperationalError):
    """A libpq wait ran past the step's deadline; the connection must be discarded."""


def _wait(conn: Any, _ok: int = POLL_OK, _read: int = POLL_READ, _write: int = POLL_WRITE,
          _select: Callable[..., Any] = select.select, _now: Callable[[], float] = time.monotonic) -> None:
    # Called for every libpq wait of every connection, about ten polls a cycle: kept lean (the
    # defaults bind what it calls; the per-cycle instruction count in the README is its measure).
    state = conn.poll()
    while state != _ok:
        end = _deadline
        remaining = None if end is None else end - _now()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded(f"timed out after {round(_timeout, 2):g}s")
        # fileno() each time: while connecting, libpq moves on to the next address on a new socket.
        if state == _read:
            ready = _select((conn.fileno(),), (), (), remaining)[0]
        elif state == _write:
            ready = _select((), (conn.fileno(),), (), remaining)[1]
        else:  # pragma: no cover - psycopg2 documents only the three states
            raise psycopg2.OperationalError(f"bad poll state {state!r}")
        if not ready:
            raise DeadlineExceeded(f"timed out after {round(_timeout, 2):g}s")
        state = conn.poll()


def install() -> None:
    """Route every libpq wait of this process through the deadline-aware callback."""
    ext.set_wait_callback(_wait)


class deadline:  # noqa: N801 - used as `with deadline(seconds):`, like a function
    """Bound every libpq wait inside the block to `seconds` from now, in total (blocks nest)."""

    __slots__ = ("_seconds", "_saved")
    _saved: tuple[Optional[float], float]  # the enclosing block's deadline, set by __enter__

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def __enter__(self) -> None:
        global _deadline, _timeout
        install()
        self._saved = (_deadline, _timeout)
        _deadline, _timeout = time.monotonic() + self._seconds, self._seconds

    def __exit__(self, *exc: object) -> None:
        global _deadline, _timeout
        _deadline, _timeout = self._saved
