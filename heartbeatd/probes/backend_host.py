"""后端: this host is up and running heartbeatd (and, if configured, its backend answers).

Its address is found without sending a packet.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
import time
from pathlib import Path
from typing import Mapping, Optional

from heartbeatd.config import Config
from heartbeatd.heartbeat import BACKEND, LOOPBACK, POSTGRES, ProbeResult, normalize_ip
from heartbeatd.names import Resolver
from heartbeatd.probes import register
from heartbeatd.probes.backend_check import BackendCheck

_SIOCGIFADDR = 0x8915


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return True


def source_address_toward(peer: str) -> Optional[str]:
    """The source address the kernel picks toward `peer`; a UDP connect() sends nothing."""
    try:
        family = socket.AF_INET6 if ":" in peer else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((peer, 9))
            address = normalize_ip(sock.getsockname()[0])
    except (OSError, ValueError):
        return None
    return None if _is_loopback(address) else address


def default_route_address(route_table: Path = Path("/proc/self/net/route")) -> Optional[str]:
    """The IPv4 address of the interface that holds the default route, read from the kernel.

    /proc/self/net, not /proc/net: the unit's ProcSubset=pid hides the latter.
    """
    try:
        lines = route_table.read_text().splitlines()[1:]
    except OSError:
        return None
    defaults = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 8 and fields[1] == "00000000" and fields[7] == "00000000":
            defaults.append((int(fields[6]), fields[0]))
    for _metric, iface in sorted(defaults):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", iface.encode()[:15]))
            return socket.inet_ntoa(packed[20:24])
        except OSError:
            continue
    return None


def host_address(override: Optional[str], postgres_ip: Optional[str]) -> str:
    """SPEC's order: override, source toward PostgreSQL if not loopback, default route, loopback."""
    if override:
        return override
    if postgres_ip and not _is_loopback(postgres_ip):
        found = source_address_toward(postgres_ip)
        if found:
            return found
    return default_route_address() or LOOPBACK


class BackendProbe:
    """Up when the daemon runs and, with HEARTBEAT_BACKEND_CHECK, the backend application answers."""

    service = BACKEND

    def __init__(self, override: Optional[str], app: Optional[BackendCheck]) -> None:
        self.override = override
        self.app = app

    def check(self, found: Mapping[str, ProbeResult] = {}, until: Optional[float] = None) -> ProbeResult:  # noqa: B006
        """The host's address (found after PostgreSQL's: it may be the source address toward it)."""
        start = time.monotonic()
        error = self.app.run(until) if self.app is not None else None
        postgres = found.get(POSTGRES)
        address = host_address(self.override, postgres.ip if postgres is not None else None)
        return ProbeResult(BACKEND, address, error is None, time.monotonic() - start, error)

    def close(self) -> None:
        """Nothing is kept open."""


@register
def from_config(config: Config, resolver: Resolver) -> BackendProbe:
    """后端, with the backend application's check if HEARTBEAT_BACKEND_CHECK is set."""
    app = BackendCheck(config.backend_check, config.timeout, resolver) if config.backend_check else None
    return BackendProbe(config.backend_ip, app)
