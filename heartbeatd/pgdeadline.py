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
from psycopg2.extensions import POLL_OK, POLL_READ, POLL_WRITE

_deadline: Optional[float] = None
_timeout: float = 0.0


class DeadlineExceeded(psycopg2.OperationalError):
    """A libpq wait ran past the step's deadline; the connection must be discarded."""


def _wait(conn: Any) -> None:
    # Called for every libpq wait of every connection: kept lean, it runs several times a cycle.
    while True:
        state = conn.poll()
        if state == POLL_OK:
            return
        fd = conn.fileno()
        remaining = None if _deadline is None else _deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded(f"timed out after {round(_timeout, 2):g}s")
        if state == POLL_READ:
            ready = select.select((fd,), (), (), remaining)[0]
        elif state == POLL_WRITE:
            ready = select.select((), (fd,), (), remaining)[1]
        else:  # pragma: no cover - psycopg2 documents only the three states
            raise psycopg2.OperationalError(f"bad poll state {state!r}")
        if not ready:
            raise DeadlineExceeded(f"timed out after {round(_timeout, 2):g}s")


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
