"""Name lookups with a deadline.

getaddrinfo cannot be interrupted: a resolver that never answers would hold the loop for as long
as glibc retries (timeout x attempts x servers in resolv.conf). The lookup runs in a helper
thread and the loop waits only until its deadline. A lookup that outlives its deadline is left to
finish and is shared by later callers for the same name, so a dead resolver costs one thread,
not one per cycle. The drivers are then handed the address, never the name.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import threading
import time
from typing import Optional

from heartbeatd.heartbeat import normalize_ip


class LookupFailed(Exception):
    """The name could not be resolved (in time)."""


@functools.lru_cache(maxsize=64)
def is_address(host: str) -> bool:
    """True for an IPv4 or IPv6 literal (nothing to look up)."""
    try:
        ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    return True


class _Lookup(threading.Thread):
    def __init__(self, host: str) -> None:
        super().__init__(name=f"lookup {host}", daemon=True)
        self.host = host
        self.done = threading.Event()
        self.addresses: list[str] = []
        self.error: Optional[str] = None
        self.start()

    def run(self) -> None:
        try:
            infos = socket.getaddrinfo(self.host, None, type=socket.SOCK_STREAM)
            # IPv4 first, as the drivers would try getaddrinfo's order anyway; no duplicates.
            found = dict.fromkeys(normalize_ip(str(i[4][0])) for i in infos)
            self.addresses = sorted(found, key=lambda a: ":" in a)
            if not self.addresses:
                self.error = "no address"
        except (OSError, UnicodeError) as exc:
            self.error = getattr(exc, "strerror", None) or str(exc)
        finally:
            self.done.set()


class Resolver:
    """getaddrinfo bounded by a deadline; IP literals never leave the calling thread."""

    def __init__(self) -> None:
        self._pending: dict[str, _Lookup] = {}

    def lookup(self, host: str, deadline: float) -> list[str]:
        """The addresses of `host` (IPv4 first), or LookupFailed once `deadline` (monotonic) has passed."""
        if is_address(host):
            return [normalize_ip(host)]
        lookup = self._pending.get(host)
        if lookup is None:
            lookup = self._pending[host] = _Lookup(host)
        if not lookup.done.wait(max(0.0, deadline - time.monotonic())):
            raise LookupFailed(f"name lookup of {host} gave no answer in time")
        del self._pending[host]
        if lookup.error:
            raise LookupFailed(f"name lookup of {host} failed: {lookup.error}")
        return lookup.addresses
