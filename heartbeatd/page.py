"""`report --format html`: a status page in one self-contained file: no script, nothing fetched.

Its figures are `report`'s: one 90-day report whose outages and no-data stretches are clipped to
each UTC day and to the last 24 h, 7 d and 30 d. `gather` reads it as `report` does, from the hourly
rollups where they cover and raw rows at the edges (RollupReport), and the page says which.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from html import escape
from typing import Optional, Sequence

from heartbeatd import __version__
from heartbeatd.ledger import Ledger
from heartbeatd.outage import PairReport, clip
from heartbeatd.render import human
from heartbeatd.rollup import RollupReport

DAYS = 90
WINDOWS = (("24 h", timedelta(hours=24)), ("7 d", timedelta(days=7)), ("30 d", timedelta(days=30)),
           ("90 d", timedelta(days=DAYS)))
# A day's colour by its uptime over the time observed: 100 %, at least 99 %, at least 90 %, less.
GRADES = ((100.0, "ok"), (99.0, "minor"), (90.0, "major"), (0.0, "down"))
OPEN_OUTAGES = 10  # longer lists start folded (a <details> opens without script)


@dataclass(frozen=True)
class PairPage:
    """One (service, ip): its 90-day report, one clipped report per UTC day, and the headline windows."""

    report: PairReport
    days: list[PairReport]  # oldest first; the last is today so far
    windows: list[tuple[str, PairReport]]


@dataclass(frozen=True)
class Page:
    """Everything the page shows."""

    since: datetime
    until: datetime
    gap: float
    table: str
    days: list[datetime]  # the bars' UTC midnights, oldest first
    pairs: list[PairPage]
    source: str = ""  # which rows the report read, as `report` says on stderr


def gather(ledger: Ledger, until: datetime, gap: float, now: datetime, service: Optional[str] = None,
           ip: Optional[str] = None, seconds: Optional[float] = None) -> Page:
    """The page's figures: one 90-day `report` up to `until`, its spans clipped to days and windows.

    Read as `report` reads it (rollups for whole covered hours, raw rows for the rest), so a day's
    bar and the windows come from the same classification as the 90 days'."""
    since = until - timedelta(days=DAYS)
    found, source = RollupReport(ledger).run(since, until, gap, now, service, ip, seconds)
    midnight = until.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    starts = [midnight - timedelta(days=DAYS - 1 - n) for n in range(DAYS)]
    return Page(since, until, gap, ledger.name, starts, [
        PairPage(p, [clip(p, day, day + timedelta(days=1)) for day in starts],
                 [(label, clip(p, until - span, until)) for label, span in WINDOWS]) for p in found], source)


def grade(uptime: Optional[float]) -> str:
    """The CSS class of a day: `nodata` when nothing was observed, else by its uptime."""
    if uptime is None:
        return "nodata"
    return next(name for floor, name in GRADES if uptime >= floor)


def state(pair: PairReport) -> tuple[str, str]:
    """(class, words) at the window's end: down since, no data since (no daemon reporting), or up."""
    going = [s for s in pair.outages if s.ongoing]
    if going:
        return "down", f"down since {stamp(going[-1].start)} UTC"
    silent = [s for s in pair.no_data if s.end >= pair.observed_to]
    if silent:
        return "nodata", f"no data since {stamp(silent[-1].start)} UTC"
    return "up", "up"


def stamp(value: datetime) -> str:
    """`2026-11-27 19:10:32` (UTC)."""
    return value.astimezone(timezone.utc).replace(tzinfo=None).isoformat(" ", "seconds")


def percent(uptime: Optional[float]) -> str:
    """`99.653%`, or `n/a` when nothing was observed."""
    return "n/a" if uptime is None else f"{uptime:.3f}%"


def _time(value: datetime) -> str:
    text = stamp(value)
    return f'<time datetime="{text.replace(" ", "T")}Z">{text}</time>'


def _bar(day: PairReport, date: str) -> str:
    uptime = day.uptime
    words = [date, "no data" if uptime is None else f"{percent(uptime)} up"]
    if day.downtime:
        words.append(f"down {human(day.downtime)}")
    if day.no_data_seconds and uptime is not None:
        words.append(f"no data {human(day.no_data_seconds)}")
    value = "" if uptime is None else f"{uptime:.3f}"
    return (f'<span class="bar {grade(uptime)}" data-day="{date}" data-uptime="{value}" '
            f'title="{escape(", ".join(words))}"></span>')


def _figures(pair: PairPage) -> str:
    cells = [f"<div><dt>{label}</dt><dd>{percent(clipped.uptime)}</dd></div>" for label, clipped in pair.windows]
    lat = pair.report.latency
    if lat is not None:
        cells.append(f'<div class="latency"><dt>latency p50 / p95</dt><dd>{lat.p50:.1f} / {lat.p95:.1f} ms</dd></div>')
    return f'<dl class="figures">{"".join(cells)}</dl>'


def _outages(report: PairReport) -> str:
    if not report.outages:
        return f'<p class="none">No outage in these {DAYS} days.</p>'
    rows = "".join(
        f"<tr><td>{_time(s.start)}</td><td>{'ongoing' if s.ongoing else _time(s.end)}</td>"
        f"<td>{human(s.seconds)}</td></tr>" for s in reversed(report.outages))
    count = len(report.outages)
    summary = (f"{count} outage{'s' if count > 1 else ''} in {DAYS} days, down {human(report.downtime)} "
               f"in all, longest {human(report.longest)}")
    return (f"<details{' open' if count <= OPEN_OUTAGES else ''}><summary>{summary}</summary>"
            '<table class="outages"><thead><tr><th>start (UTC)</th><th>end (UTC)</th><th>length</th></tr></thead>'
            f"<tbody>{rows}</tbody></table></details>")


def _pair(pair: PairPage, n: int, dates: Sequence[str]) -> str:
    report = pair.report
    kind, words = state(report)
    notes = []
    if report.reporters is not None:
        notes.append(f"reported by {report.reporters} host(s) in the last hour")
    if report.no_data_seconds:
        notes.append(f"no data {human(report.no_data_seconds)} in {DAYS} days")
    bars = "".join(_bar(day, date) for day, date in zip(pair.days, dates))
    return (f'<section class="pair" id="p{n}"><h2><span class="service">{escape(report.service)}</span> '
            f'<span class="ip">{escape(report.ip)}</span> <span class="state {kind}">{escape(words)}</span></h2>'
            + (f'<p class="note">{escape("; ".join(notes))}</p>' if notes else "")
            + f'<div class="bars" role="img" aria-label="uptime of the last {DAYS} days, oldest first">{bars}</div>'
            f'<div class="axis"><span>{dates[0]}</span><span>{dates[-1]}</span></div>'
            + _figures(pair) + _outages(report) + "</section>")


STYLE = """
:root{--ok:#2da44e;--minor:#d4a72c;--major:#e16f24;--down:#cf222e;--nodata:#d0d7de;--fg:#1f2328;--muted:#59636e;--line:#d1d9e0}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%;text-size-adjust:100%}
body{margin:0 auto;max-width:62rem;padding:1rem;color:var(--fg);background:#fff;overflow-wrap:break-word;
 font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","Noto Sans CJK SC","Microsoft YaHei",sans-serif}
h1{font-size:1.4rem;margin:0 0 .25rem}
header p{color:var(--muted);font-size:.85rem;margin:.2rem 0}
.overall a{color:inherit}
.legend .item{white-space:nowrap;margin-right:.6rem}
.key{display:inline-block;width:.7rem;height:.7rem;border-radius:2px;vertical-align:-.05rem;margin-right:.25rem}
.pair{border:1px solid var(--line);border-radius:6px;padding:.75rem;margin:1rem 0;break-inside:avoid}
h2{font-size:1.05rem;margin:0 0 .4rem;display:flex;flex-wrap:wrap;gap:.2rem .6rem;align-items:center;overflow-wrap:anywhere}
h2 .ip{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-weight:400;min-width:0}
.state{font-size:.78rem;padding:.05rem .5rem;border-radius:1rem;color:#fff;font-weight:600}
.state.up{background:var(--ok)}.state.down{background:var(--down)}.state.nodata{background:#6e7781}
.note{color:var(--muted);font-size:.8rem;margin:0 0 .4rem}
.bars{display:grid;grid-template-columns:repeat(90,minmax(0,1fr));gap:1px;height:2.2rem}
.bar,.key{background:var(--nodata)}
.bar{border-radius:1px;min-width:0}
.ok{background:var(--ok)}.minor{background:var(--minor)}.major{background:var(--major)}.down{background:var(--down)}
.axis{display:flex;justify-content:space-between;font-size:.75rem;color:var(--muted);margin-top:.15rem}
.figures{display:flex;flex-wrap:wrap;gap:.4rem 1.4rem;margin:.6rem 0 .3rem}
dt{font-size:.75rem;color:var(--muted)}
dd{margin:0;font-weight:600;font-variant-numeric:tabular-nums}
details{margin-top:.3rem;font-size:.85rem}
summary{cursor:pointer;color:var(--muted)}
.none{margin:.3rem 0 0;font-size:.85rem;color:var(--muted)}
table{border-collapse:collapse;width:100%;margin-top:.3rem;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:.15rem .6rem .15rem 0;border-bottom:1px solid var(--line);vertical-align:top}
th{font-weight:600;color:var(--muted);font-size:.75rem}
footer{color:var(--muted);font-size:.75rem;margin-top:1.5rem}
header p.source{font-size:.75rem}
@media (max-width:480px){body{padding:.6rem;font-size:14px}.pair{padding:.6rem}.bars{height:1.8rem}.figures{gap:.3rem 1rem}}
@media print{body{max-width:none;padding:0;font-size:10pt}.pair{border-color:#999}
 *{-webkit-print-color-adjust:exact;print-color-adjust:exact}summary{cursor:auto}}
"""
# The page runs no script and loads nothing: the policy says so to the browser as well, so a
# value that escaping missed could still not run. The style is allowed by its hash.
POLICY = ("default-src 'none'; style-src 'sha256-"
          + base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode() + "'")


def html(page: Page) -> str:
    """The page, one self-contained HTML document."""
    dates = [day.date().isoformat() for day in page.days]
    kinds = [state(p.report)[0] for p in page.pairs]
    down = kinds.count("down")
    overall = (f"{len(kinds)} service address{'es' if len(kinds) > 1 else ''}: {kinds.count('up')} up, {down} down"
               + (f", {kinds.count('nodata')} without data" if "nodata" in kinds else "")
               if kinds else f"No heartbeats in these {DAYS} days")
    links = ", ".join(f'<a href="#p{n}">{escape(p.report.service)} {escape(p.report.ip)}</a>'
                      for n, (p, kind) in enumerate(zip(page.pairs, kinds)) if kind != "up")
    legend = " ".join(f'<span class="item"><span class="key {name}"></span>{text}</span>' for name, text in (
        ("ok", "100%"), ("minor", "&ge; 99%"), ("major", "&ge; 90%"), ("down", "&lt; 90%"),
        ("nodata", "no data (no daemon was reporting)")))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">'
        f"<title>{'all up' if not down else f'{down} down'} - heartbeatd status</title><style>{STYLE}</style></head>\n"
        f"<body><header><h1>Service status</h1>"
        f'<p class="overall">{escape(overall)} at {_time(page.until)} UTC{": " + links if links else ""}.</p>'
        f"<p>All times are UTC. Each bar is one UTC day of the last {DAYS}, coloured by uptime over the time "
        f"observed; a gap of more than {page.gap:g} s between heartbeats is an outage. "
        f"Table {escape(page.table)}.</p><p class=\"legend\">{legend}</p>"
        + (f'<p class="source">{escape(page.source[:1].upper() + page.source[1:])}.</p>' if page.source else "")
        + "</header>\n<main>"
        + "\n".join(_pair(p, n, dates) for n, p in enumerate(page.pairs))
        + f"</main>\n<footer>Written by heartbeatd {escape(__version__)} (<code>heartbeatd report --format html"
        "</code>) from its ledger; it opens no port: any web server may serve this file.</footer></body></html>\n")
