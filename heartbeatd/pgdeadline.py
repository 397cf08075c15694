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
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import psycopg2
import psycopg2.extensions as ext

_deadline: Optional[float] = None
_timeout: float = 0.0


class DeadlineExceeded(psycopg2.OperationalError):
    """A libpq wait ran past the step's deadline; the connection must be discarded."""


def _wait(conn: Any) -> None:
    poller = select.poll()
    while True:
        state = conn.poll()
        if state == ext.POLL_OK:
            return
        if state == ext.POLL_READ:
            events = select.POLLIN
        elif state == ext.POLL_WRITE:
            events = select.POLLOUT
        else:  # pragma: no cover - psycopg2 documents only the three states
            raise psycopg2.OperationalError(f"bad poll state {state!r}")
        fd = conn.fileno()
        poller.register(fd, events)
        try:
            remaining = None if _deadline is None else _deadline - time.monotonic()
            if remaining is not None and (remaining <= 0 or not poller.poll(remaining * 1000)):
                raise DeadlineExceeded(f"timed out after {_timeout:g}s")
        finally:
            poller.unregister(fd)


def install() -> None:
    """Route every libpq wait of this process through the deadline-aware callback."""
    ext.set_wait_callback(_wait)


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Bound every libpq wait inside the block to `seconds` from now, in total."""
    global _deadline, _timeout
    install()
    saved = (_deadline, _timeout)
    _deadline, _timeout = time.monotonic() + seconds, seconds
    try:
        yield
    finally:
        _deadline, _timeout = saved
