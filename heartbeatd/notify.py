"""sd_notify: the only place that talks to systemd. A silent no-op without $NOTIFY_SOCKET."""

from __future__ import annotations

import time
from typing import Callable, Mapping, Optional

import sdnotify

from heartbeatd.config import watchdog_period


WATCHDOG_AIM = 0.9  # of WATCHDOG_USEC/2: the idle loop's ping comes at 0.45 x WATCHDOG_USEC


class Notifier:
    """Sends READY/WATCHDOG/STATUS/STOPPING/RELOADING datagrams to systemd."""

    def __init__(self, environ: Mapping[str, str], clock: Callable[[], float] = time.monotonic) -> None:
        # sdnotify reads $NOTIFY_SOCKET itself and connects once; it never raises without debug.
        self._sd = sdnotify.SystemdNotifier() if environ.get("NOTIFY_SOCKET") else None
        self.watchdog_period = watchdog_period(environ)
        self._clock = clock
        self._last_ping = clock()

    def _send(self, message: str) -> None:
        if self._sd is not None:
            # sdnotify encodes as latin-1 and silently drops what fails to encode: hand it a
            # string whose latin-1 bytes are the UTF-8 bytes, so STATUS arrives as UTF-8.
            self._sd.notify(message.encode("utf-8").decode("latin-1"))

    def ready(self, status: Optional[str] = None) -> None:
        """READY=1 (with an optional STATUS)."""
        self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def reloading(self) -> None:
        """RELOADING=1, with the MONOTONIC_USEC newer systemd asks for."""
        self._send(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        """STOPPING=1."""
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        """STATUS=<one line>."""
        self._send("STATUS=" + text.replace("\n", " "))

    def watchdog(self) -> None:
        """WATCHDOG=1: the loop is alive."""
        if self.watchdog_period is not None:
            self._last_ping = self._clock()
            self._send("WATCHDOG=1")

    def watchdog_due_in(self) -> Optional[float]:
        """Seconds until the next WATCHDOG=1 is due, or None without a watchdog.

        Due a little before the period is up: aimed exactly at WATCHDOG_USEC/2, a ping would
        arrive a few milliseconds after it whenever the machine is busy.
        """
        if self.watchdog_period is None:
            return None
        return max(0.0, self._last_ping + WATCHDOG_AIM * self.watchdog_period - self._clock())
