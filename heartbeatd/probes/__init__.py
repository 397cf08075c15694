"""The checks: one Probe per service, each in its own module, registered in one place.

A probe checks its service within its own deadline (HEARTBEAT_TIMEOUT) and says what it found;
`checked` is the one boundary around every check: it times it and turns whatever the check
raises into that service's failed result, so one check's bug costs only its own row. A cycle
runs the probes in MODULES order: a later one may use what the earlier ones found (后端's
address comes from PostgreSQL's). Adding a check is a module with a `@register`ed factory and
its name in MODULES.
"""

from __future__ import annotations

import importlib
import logging
import socket
import time
from typing import Callable, Mapping, Optional, Protocol

from heartbeatd.config import Config, ConfigError, with_sources
from heartbeatd.heartbeat import LOOPBACK, ProbeResult, normalize_ip
from heartbeatd.names import Resolver

# The line a check that raised leaves at DEBUG is the cycle's, as the other lines of a cycle are.
log = logging.getLogger("heartbeatd.daemon")

MODULES = ("redis_ping", "postgres_connect", "backend_host")  # the order the checks run in


class Probe(Protocol):
    """One service's check."""

    service: str  # the service_name its rows carry

    def check(self, found: Mapping[str, ProbeResult]) -> ProbeResult:
        """Check the service within the timeout; `found` holds what the earlier checks found."""

    def close(self) -> None:
        """Drop whatever the probe keeps open."""


Factory = Callable[[Config, Resolver], Optional[Probe]]  # None: not configured
_FACTORIES: dict[str, Factory] = {}


def register(factory: Factory) -> Factory:
    """Make a check known (used as a decorator on the module's factory)."""
    _FACTORIES[factory.__module__] = factory
    return factory


def build(config: Config) -> list[Probe]:
    """The configured probes, in MODULES order; one ConfigError with every probe's problems, each
    naming the file its value came from."""
    resolver = Resolver()  # one per generation: a lookup that hangs is shared, not repeated
    probes: list[Probe] = []
    problems: list[str] = []
    for module in MODULES:
        name = f"{__name__}.{module}"
        importlib.import_module(name)
        try:
            probe = _FACTORIES[name](config, resolver)
        except ConfigError as exc:
            problems += exc.problems
            continue
        if probe is not None:
            probes.append(probe)
    if problems:
        close_all(probes)
        raise with_sources(config, ConfigError(problems))
    return probes


def close_all(probes: list[Probe]) -> None:
    """Close every probe; one that fails to close does not keep the others open."""
    for probe in probes:
        try:
            probe.close()
        except Exception:  # noqa: BLE001 - closing must never end the daemon
            log.debug("closing the %s probe raised", probe.service, exc_info=True)


def checked(probe: Probe, found: Mapping[str, ProbeResult], last_ip: Mapping[str, str],
            clock: Callable[[], float] = time.monotonic) -> ProbeResult:
    """The one boundary of a check: whatever it raises becomes that service's failed result.

    A failed result carries the service's address in its last result (`last_ip`), else loopback.
    """
    start = clock()
    try:
        return probe.check(found)
    except Exception as exc:  # noqa: BLE001 - one check's bug must not cost the other services' rows
        log.debug("the %s check raised", probe.service, exc_info=True)
        error = f"internal error in the check: {type(exc).__name__}: {' '.join(str(exc).split())}"
        return ProbeResult(probe.service, last_ip.get(probe.service, LOOPBACK), False, clock() - start, error)


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

