"""What a gap in the heartbeats means: outage or no data. Plain code on times, no database.

A `后端` gap is that host's outage. A server's gap (redis, postgres: every host writes them) is an
outage only while some daemon was alive to see it, that is while some host's `后端` rows kept
coming; where none did, it is "no data".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple, Optional, Sequence


@dataclass(frozen=True)
class Span:
    """A stretch of time: an outage, or a stretch with no data."""

    start: datetime
    end: datetime
    ongoing: bool = False  # an outage still going on at the end of the window

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()


class Latency(NamedTuple):
    """The check's latency in milliseconds over an evenly spread sample of one pair's heartbeats."""

    p50: float
    p95: float
    max: float
    sampled: int  # heartbeats with a latency in the sample


@dataclass
class PairReport:
    """`report`: one (service, ip) over the window."""

    service: str
    ip: str
    observed_from: datetime
    observed_to: datetime
    outages: list[Span] = field(default_factory=list)
    no_data: list[Span] = field(default_factory=list)
    reporters: Optional[int] = None  # hosts whose daemons wrote a server's rows (last hour); None for 后端
    latency: Optional[Latency] = None  # None: the table has no latency_ms column, or no row in it had one

    @property
    def downtime(self) -> float:
        return sum(s.seconds for s in self.outages)

    @property
    def longest(self) -> float:
        return max((s.seconds for s in self.outages), default=0.0)

    @property
    def no_data_seconds(self) -> float:
        return sum(s.seconds for s in self.no_data)

    @property
    def uptime(self) -> Optional[float]:
        """Percent of the observed time (window less no-data stretches) without an outage."""
        observed = (self.observed_to - self.observed_from).total_seconds() - self.no_data_seconds
        return None if observed <= 0 else max(0.0, 100.0 * (observed - self.downtime) / observed)


def empty_runs(slots: Sequence[datetime], half: timedelta) -> list[tuple[datetime, datetime]]:
    """Consecutive empty slots of length `half` (their start times, in order) joined into runs."""
    runs: list[list[datetime]] = []
    for slot in slots:
        if runs and slot - runs[-1][1] <= timedelta(0):
            runs[-1][1] = slot + half
        else:
            runs.append([slot, slot + half])
    return [(start, end) for start, end in runs]


def edge_gaps(first: datetime, last: datetime, before: Optional[datetime], end: datetime,
              gap: float) -> list[tuple[datetime, datetime, bool]]:
    """The gaps at a pair's edges: from its heartbeat before the window to its first, and from its
    last to the window's end (then still going on): (start, stop, ongoing)."""
    found = []
    if before is not None and (first - before).total_seconds() > gap:
        found.append((before, first, False))  # began before the window: clipped by the caller
    if (end - last).total_seconds() > gap:
        found.append((last, end, True))
    return found


def classify(start: datetime, stop: datetime, ongoing: bool, alive: Sequence[datetime],
             gap: float) -> tuple[list[Span], list[Span]]:
    """A server's gap split into (outages, no-data stretches) by the moments some daemon was alive.

    `alive` are the report_times of 后端 rows inside the gap, in order: where they come no more
    than `gap` apart (and that close to the gap's edges), a daemon was watching and the server
    was down; elsewhere nobody was watching.
    """
    runs: list[list[datetime]] = []
    for moment in alive:
        if runs and (moment - runs[-1][-1]).total_seconds() <= gap:
            runs[-1].append(moment)
        else:
            runs.append([moment])
    outages: list[Span] = []
    no_data: list[Span] = []
    cursor = start
    for run in runs:
        run_start = start if (run[0] - start).total_seconds() <= gap else run[0]
        run_end = stop if (stop - run[-1]).total_seconds() <= gap else run[-1]
        if run_start > cursor:
            no_data.append(Span(cursor, run_start))
        outages.append(Span(run_start, run_end, ongoing and run_end == stop))
        cursor = run_end
    if cursor < stop:
        no_data.append(Span(cursor, stop))
    return outages, no_data


def clip(pair: PairReport, start: datetime, end: datetime) -> PairReport:
    """The same pair's report cut to [start, end): its spans clipped, observed time bounded by it.

    Figures for a day or a week come from the window's one classification; a stretch that went on
    past `end` is no longer ongoing inside it.
    """
    def cut(spans: Sequence[Span]) -> list[Span]:
        return [Span(max(s.start, start), min(s.end, end), s.ongoing and s.end <= end)
                for s in spans if s.start < end and s.end > start]

    observed_from = min(max(pair.observed_from, start), end)
    return PairReport(pair.service, pair.ip, observed_from, max(min(pair.observed_to, end), observed_from),
                      cut(pair.outages), cut(pair.no_data), pair.reporters, pair.latency)
