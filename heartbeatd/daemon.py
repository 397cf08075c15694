"""The loop: signals, a fixed-rate monotonic schedule, reload, watchdog, STATUS; it holds a `Cycle`."""

from __future__ import annotations

import logging
import math
import queue
import signal
import time
from datetime import datetime
from typing import Callable, Optional

from heartbeatd.config import Config, ConfigError
from heartbeatd.cycle import Cycle, CycleOutcome, Services
from heartbeatd.heartbeat import utcnow
from heartbeatd.metrics import Textfile
from heartbeatd.notify import Notifier
from heartbeatd.repeats import Repeats
from heartbeatd.spool import SpoolUnavailable

log = logging.getLogger(__name__)


class Signals:
    """The signals received, in order: a handler only enqueues; the loop takes them one by one."""

    def __init__(self) -> None:
        self._events: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._deferred: list[int] = []  # signals seen by stop_pending mid-cycle, handled by the nap

    def put(self, signum: int) -> None:
        """From the signal handler: nothing but a put_nowait (no lock, no logging)."""
        self._events.put_nowait(signum)

    def stop_pending(self) -> bool:
        """Look at the queue without waiting; keep what was there for the nap."""
        if not self._deferred and self._events.empty():  # the usual answer, asked several times a cycle
            return False
        while not self._events.empty():
            try:
                self._deferred.append(self._events.get_nowait())
            except queue.Empty:
                break
        return bool(self._deferred) and any(s in (signal.SIGTERM, signal.SIGINT) for s in self._deferred)

    def next(self, wait: float) -> Optional[int]:
        """The next signal, waiting up to `wait` seconds; None if none came."""
        try:
            return self._deferred.pop(0) if self._deferred else self._events.get(timeout=wait)
        except queue.Empty:
            return None


class Daemon:
    """A single-process daemon with a blocking, signal-aware nap between fixed-rate cycles."""

    def __init__(
        self,
        config: Config,
        build: Callable[[Config, Optional[Services]], Services],
        notifier: Notifier,
        reload_config: Optional[Callable[[], Config]] = None,
        on_config: Callable[[Config], None] = lambda c: None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = utcnow,
    ) -> None:
        self._build = build
        self.notifier = notifier
        self._reload_config = reload_config
        self._on_config = on_config
        self._clock = clock
        self._wall = wall
        self.signals = Signals()
        # What a cycle asks of the loop, bound once (each is asked several times a cycle): the loop
        # is alive (WATCHDOG=1), and whether SIGTERM or SIGINT arrived.
        self.alive: Callable[[], None] = notifier.watchdog
        self.stop_pending: Callable[[], bool] = self.signals.stop_pending
        self._repeats = Repeats(clock)
        self._next = clock()  # monotonic time of the next cycle start
        self.textfile = Textfile(None, self._repeats)  # HEARTBEAT_TEXTFILE's writer, idle while it is empty
        self.cycle = self._cycle(config, build(config, None))

    def _cycle(self, config: Config, services: Services) -> Cycle:
        """A cycle of these services, keeping the log's story (repeats, last addresses) across reloads."""
        old = getattr(self, "cycle", None)
        cycle = Cycle(config, services, loop=self, repeats=self._repeats, clock=self._clock, wall=self._wall,
                      last_ip=old.last_ip if old is not None else None)
        if old is not None:  # counters, and the once-a-minute line's story, go on across reloads
            cycle.checks.retried, cycle.checks.told = old.checks.retried, old.checks.told
        return cycle

    @property
    def config(self) -> Config:
        """The configuration in effect."""
        return self.cycle.config

    @property
    def services(self) -> Services:
        """What the cycle talks to."""
        return self.cycle.services

    # -- what a cycle asks of the loop ------------------------------------------------------

    def replay_until(self) -> float:
        """The next start less one timeout: a last statement then ends before the next cycle is due."""
        # While a cycle runs, self._next is its own scheduled start.
        config = self.cycle.config
        return self._next + config.interval - config.timeout

    def run_cycle(self) -> CycleOutcome:
        """One cycle of the services in effect."""
        return self.cycle.run()

    def safe_cycle(self) -> Optional[CycleOutcome]:
        """run_cycle, but a bug in it is logged and the loop goes on."""
        try:
            outcome = self.cycle.run()
        except Exception as exc:  # noqa: BLE001 - the daemon must survive its own bugs
            self._repeats.failed("bug", logging.ERROR, "心跳周期异常 - unexpected error in a cycle: %s", exc,
                                 traceback=True)
            return None
        self._repeats.end("bug", None)
        return outcome

    # -- the loop --------------------------------------------------------------------------

    def _nap(self) -> bool:
        """Sleep until the next start, pinging the watchdog and handling signals; False means stop."""
        while True:
            remaining = self._next - self._clock()
            if remaining <= 0 and not self.stop_pending():
                return True
            due = self.notifier.watchdog_due_in()
            wait = remaining if due is None else min(remaining, due)
            signum = self.signals.next(wait)
            if signum is None:
                if due is not None and due <= remaining:
                    self.alive()
                continue
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.notifier.stopping()
                log.info("停止服务心跳检查定时任务 (%s)", signal.Signals(signum).name)
                return False
            if signum == signal.SIGHUP:
                self.reload()

    def reload(self) -> None:
        """Re-read the configuration; a bad one is logged and the old one kept."""
        self.notifier.reloading()
        try:
            if self._reload_config is None:
                raise ConfigError(["nothing to reload from"])
            new = self._reload_config()
            self.alive()  # building may read a large spool (a new path takes the old one's rows)
            services = self._build(new, self.services)
        except (ConfigError, SpoolUnavailable) as exc:
            log.error("重新加载配置失败 - keeping the old configuration: %s", exc)
        except Exception as exc:  # noqa: BLE001 - a reload never ends the daemon
            log.debug("the reload raised", exc_info=True)
            log.error("重新加载配置失败 - keeping the old configuration: %s: %s", type(exc).__name__, exc)
        else:
            self.services.close(keep_spool=services.spool is self.services.spool)
            self.cycle = self._cycle(new, services)
            self.textfile.retarget(new.textfile)
            self._on_config(new)
            # A shorter new interval takes effect now, not after the old one has run out.
            self._next = min(self._next, self._clock() + new.interval)
            log.info("配置已重新加载 - interval %gs, timeout %gs", new.interval, new.timeout)
        self.alive()
        self.notifier.ready()

    def request(self, signum: int) -> None:
        """Signal handler: only enqueue (no lock, no logging in a handler)."""
        self.signals.put(signum)

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit status."""
        # Kept until the process exits: a second SIGTERM during shutdown must not kill it mid-close.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda n, _f: self.request(n))
        log.info("启动服务心跳检查定时任务...")
        self.notifier.ready(status="started; first check now")
        self._next = self._clock()
        try:
            while self._nap():
                started = self._clock()
                outcome = self.safe_cycle()
                self._next = self._next_start(self._next, started)
                left = max(0.0, self._next - self._clock())
                summary = outcome.summary() if outcome else "cycle failed"
                self.notifier.status(f"{summary}; next in {left:.3g}s{self.cycle.delivery.status()}")
                if outcome is not None and self.cycle.config.textfile is not None:
                    self.textfile.after(self.cycle, outcome)
        finally:
            self.services.close()
        return 0

    def _next_start(self, scheduled: float, started: float) -> float:
        """Fixed rate from the schedule, not from when the cycle ended; skip missed starts."""
        interval = self.config.interval
        following, missed = next_start(scheduled, self._clock(), interval)
        if missed:
            self._repeats.failed(
                "overrun", logging.WARNING,
                "心跳周期超时 - a cycle took %.2fs, longer than HEARTBEAT_INTERVAL=%gs; skipping %d start(s)",
                self._clock() - started, interval, missed, kind="overrun",
            )
        else:
            self._repeats.end("overrun", None)
        return following


def next_start(scheduled: float, now: float, interval: float) -> tuple[float, int]:
    """The start after `scheduled` at a fixed rate, past `now`, and how many starts that skips."""
    following = scheduled + interval
    if now <= following:
        return following, 0
    missed = math.floor((now - following) / interval) + 1
    return following + missed * interval, missed
