"""Log a failure when it starts or changes kind, then at most once a minute with a count."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

# Operators grep for `heartbeatd.daemon:` in these lines (the README's failure table): the name stays.
log = logging.getLogger("heartbeatd.daemon")

REPEAT_EVERY = 60.0  # seconds between repeats of the same failure in the log


@dataclass
class _Failure:
    kind: str  # what "the same failure" means: the text, or a stable kind such as an SQLSTATE
    logged_at: float  # monotonic time it was last logged
    unlogged: int = 0  # repeats since then
    total: int = 1  # times in a row, across changes of kind


class Repeats:
    """Logs a failure when it starts or changes kind, then at most once a minute with a count."""

    def __init__(self, clock: Callable[[], float], every: float = REPEAT_EVERY) -> None:
        self._clock = clock
        self._every = every
        self._state: dict[str, _Failure] = {}
        self.failing: Mapping[str, object] = self._state  # the failures going on, by key (read only)
        # `end(key, None)`: forget a failure, returning it (None if there was none). The dict's own
        # pop: asked about a dozen times a cycle, mostly of failures that are not there.
        self.end: Callable[[str, None], Optional[_Failure]] = self._state.pop

    def failed(self, key: str, level: int, msg: str, *args: Any, kind: Optional[str] = None,
               traceback: bool = False) -> None:
        """Log this failure unless one of the same kind was logged less than a minute ago."""
        now = self._clock()
        kind = kind if kind is not None else msg % args
        state = self._state.get(key)
        if state is None or state.kind != kind:
            # A traceback only when the failure starts: never the same one every 30 s.
            log.log(level, msg, *args, exc_info=traceback)
            self._state[key] = _Failure(kind, now, total=state.total + 1 if state else 1)
            return
        state.unlogged += 1
        state.total += 1
        if now - state.logged_at >= self._every:
            log.log(level, msg + " (repeated %d times in the last %.0fs)", *args, state.unlogged, now - state.logged_at)
            state.logged_at, state.unlogged = now, 0

    def cleared(self, key: str) -> int:
        """Forget a failure; return how many times in a row it had happened (0 if it had not)."""
        state = self._state.pop(key, None)
        return state.total if state else 0
