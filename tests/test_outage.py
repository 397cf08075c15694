"""The outage/no-data classification as plain code: times in, spans out (the ledger runs it on real rows)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from heartbeatd.outage import PairReport, Span, classify, edge_gaps, empty_runs

T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_a_gap_watched_throughout_is_one_outage() -> None:
    alive = [at(s) for s in range(30, 300, 30)]  # some host's 后端 every 30 s inside the gap
    outages, no_data = classify(at(0), at(300), False, alive, gap=65)
    assert outages == [Span(at(0), at(300))] and no_data == []


def test_a_gap_nobody_watched_is_no_data() -> None:
    outages, no_data = classify(at(0), at(600), False, [], gap=65)
    assert outages == [] and no_data == [Span(at(0), at(600))]


def test_a_gap_watched_in_its_middle_only_splits_into_no_data_outage_no_data() -> None:
    alive = [at(s) for s in (200, 230, 260)]
    outages, no_data = classify(at(0), at(600), True, alive, gap=65)
    assert outages == [Span(at(200), at(260))]  # not ongoing: the watch ended before the window did
    assert no_data == [Span(at(0), at(200)), Span(at(260), at(600))]


def test_an_outage_watched_to_the_end_of_the_window_is_ongoing() -> None:
    alive = [at(s) for s in range(300, 600, 30)]
    outages, no_data = classify(at(0), at(600), True, alive, gap=65)
    assert outages == [Span(at(300), at(600), ongoing=True)] and no_data == [Span(at(0), at(300))]


def test_empty_slots_join_into_runs() -> None:
    half = timedelta(seconds=30)
    slots = [at(0), at(30), at(60), at(300), at(330)]
    assert empty_runs(slots, half) == [(at(0), at(90)), (at(300), at(360))]
    assert empty_runs([], half) == []


def test_edge_gaps_before_the_window_and_at_its_end() -> None:
    assert edge_gaps(at(100), at(500), at(0), at(600), gap=65) == [(at(0), at(100), False), (at(500), at(600), True)]
    assert edge_gaps(at(10), at(590), at(0), at(600), gap=65) == []
    assert edge_gaps(at(10), at(590), None, at(600), gap=65) == []


def test_uptime_leaves_no_data_out_of_the_observed_time() -> None:
    pair = PairReport("redis", "10.0.0.2", at(0), at(1000), outages=[Span(at(100), at(200))],
                      no_data=[Span(at(500), at(1000))])
    assert pair.downtime == 100 and pair.no_data_seconds == 500 and pair.uptime == 80.0
    assert PairReport("redis", "10.0.0.2", at(0), at(100), no_data=[Span(at(0), at(100))]).uptime is None
