"""The checks: one Probe per service, each in its own module, registered in one place.

A probe checks its service by the deadline it is given (HEARTBEAT_TIMEOUT from the check's
start) and says what it found; `Checks` is the one boundary around every check: it turns
whatever the check raises into that service's failed result, so one check's bug costs only its
own row, and tries a check that failed fast (its result says `retry`: refused, reset, a server
still loading) again after a short pause, by the same deadline: a retry never makes a check
longer than HEARTBEAT_TIMEOUT. A cycle runs the probes in MODULES order: a later one may use
what the earlier ones found (后端's address comes from PostgreSQL's). Adding a check is a module
with a `@register`ed factory and its name in MODULES.
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

MODULES = ("redis_ping", "redis_sentinel", "postgres_connect", "backend_host")  # the order the checks run in


class Probe(Protocol):
    """One service's check."""

    service: str  # the service_name its rows carry

    def check(self, found: Mapping[str, ProbeResult], until: float) -> ProbeResult:
        """Check the service by `until` (monotonic); `found` holds what the earlier checks found."""

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


def checked(probe: Probe, found: Mapping[str, ProbeResult], until: float, last_ip: Mapping[str, str],
            clock: Callable[[], float] = time.monotonic) -> ProbeResult:
    """One attempt: whatever the check raises becomes that service's failed result.

    A failed result carries the service's address in its last result (`last_ip`), else loopback.
    """
    start = clock()
    try:
        return probe.check(found, until)
    except Exception as exc:  # noqa: BLE001 - one check's bug must not cost the other services' rows
        log.debug("the %s check raised", probe.service, exc_info=True)
        error = f"internal error in the check: {type(exc).__name__}: {' '.join(str(exc).split())}"
        return ProbeResult(probe.service, last_ip.get(probe.service, LOOPBACK), False, clock() - start, error)


class Checks:
    """The boundary every check runs through: `checked`, and quick retries of a fast failure.

    A check whose result says `retry` is tried again after a pause (a tenth of the timeout, at most
    half a second and a twentieth of the interval, so retries never make a cycle overrun), up to
    `retries` times, while the pause still leaves time before the deadline.
    A success on retry is an up result (logged at INFO, once a minute at most per service).
    `retried` counts the retries per service (the textfile's heartbeatd_check_retries_total).
    """

    QUIET = 60.0  # seconds between two INFO lines about one service's retries

    def __init__(self, timeout: float, retries: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, interval: float = float("inf")) -> None:
        self.timeout, self.retries = timeout, retries
        self.pause = min(0.5, timeout / 10, interval / 20)
        self._clock, self._sleep = clock, sleep
        self.retried: dict[str, int] = {}
        self.told: dict[str, tuple[float, int]] = {}  # service -> (when the last INFO line went out, retries since)

    def run(self, probe: Probe, found: Mapping[str, ProbeResult], last_ip: Mapping[str, str]) -> ProbeResult:
        """The check's result, by HEARTBEAT_TIMEOUT from now, retries included."""
        clock = self._clock
        until = clock() + self.timeout
        result = checked(probe, found, until, last_ip, clock)
        if result.ok or not result.retry:
            return result  # the usual cycle
        first, left = result, self.retries
        while left and not result.ok and result.retry and clock() + self.pause < until:
            left -= 1
            self._sleep(self.pause)
            self.retried[probe.service] = self.retried.get(probe.service, 0) + 1
            result = checked(probe, found, until, last_ip, clock)
        if result.ok:
            self._tell(result, first)
        elif result.error != first.error:  # the first failure says what happened; the last one, how it ended
            result = result._replace(error=f"{first.error} (tried again: {result.error})")
        return result

    def _tell(self, result: ProbeResult, first: ProbeResult) -> None:
        now = self._clock()
        when, since = self.told.get(result.service, (None, 0))
        if when is not None and now - when < self.QUIET:
            self.told[result.service] = (when, since + 1)
            return
        more = f"; {since} more success(es) on retry since the last line" if since else ""
        log.info("服务重试成功 - 服务: %s, IP: %s (the first attempt failed: %s%s)", result.service, result.ip,
                 first.error, more)
        self.told[result.service] = (now, 0)


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

