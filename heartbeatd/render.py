"""How `heartbeatd status` and `report` show what the ledger found: text (with a timeline), json, csv."""

from __future__ import annotations

import csv
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

from heartbeatd.heartbeat import Row, naive_utc
from heartbeatd.ledger import DefaultRows, Latest
from heartbeatd.outage import PairReport, Span

UP, DOWN, NO_DATA = "=", "X", "."


def iso(value: datetime) -> str:
    """`2026-11-27T19:10:32Z`."""
    return value.astimezone(timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def human(seconds: float) -> str:
    """`45s`, `12m30s`, `3h05m`, `2d04h`."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _span(span: Span) -> dict[str, Any]:
    return {"start": iso(span.start), "end": iso(span.end), "duration_seconds": round(span.seconds, 1),
            "ongoing": span.ongoing}


def _summary(pair: PairReport) -> dict[str, Any]:
    return {"service": pair.service, "ip": pair.ip,
            "uptime_percent": None if pair.uptime is None else round(pair.uptime, 3),
            "outages": len(pair.outages), "downtime_seconds": round(pair.downtime, 1),
            "longest_seconds": round(pair.longest, 1), "no_data_seconds": round(pair.no_data_seconds, 1),
            "observed_from": iso(pair.observed_from), "reporters_last_hour": pair.reporters,
            "latency_ms": None if pair.latency is None else {
                "p50": round(pair.latency.p50, 3), "p95": round(pair.latency.p95, 3), "max": round(pair.latency.max, 3),
                "sampled": pair.latency.sampled}}


def timeline(pair: PairReport, since: datetime, until: datetime, width: int) -> str:
    """One cell per slot: `=` up, `X` down (any outage in the slot), `.` no data."""
    slot = (until - since) / width
    cells = []
    for n in range(width):
        start, end = since + slot * n, since + slot * (n + 1)

        def touches(spans: Sequence[Span]) -> bool:
            return any(s.start < end and s.end > start for s in spans)

        if touches(pair.outages):
            cells.append(DOWN)
        elif end <= pair.observed_from or touches(pair.no_data):
            cells.append(NO_DATA)
        else:
            cells.append(UP)
    return "".join(cells)


def rejected(refused: Sequence[tuple[int, Row, str]], raw: Sequence[Sequence[Any]], path: Path, out: TextIO,
             err: TextIO) -> None:
    """Print `rejected`: the rows set aside, with the reason; those that cannot be read back as stored."""
    readable = {i for i, _, _ in refused}
    for _, row, why in refused:
        out.write(f"{row.service}\t{row.ip}\t{naive_utc(row.report_time)}\t{why}\n")
    unreadable = [r for r in raw if r[0] not in readable]
    for stored in unreadable:  # as stored (id, service, ip, report_time, ..., reason)
        out.write(f"{stored[1]}\t{stored[2]}\t{stored[3]}\t{stored[-1]}\n")
    err.write(f"{len(refused) + len(unreadable)} rejected row(s) in {path}\n")


def retried(written: Sequence[Any], still: Sequence[tuple[int, Row, str]], out: TextIO) -> None:
    """Print `rejected --retry`: what is still refused, and the counts."""
    for _, row, why in still:
        out.write(f"{row.service}\t{row.ip}\t{naive_utc(row.report_time)}\tstill rejected: {why}\n")
    out.write(f"{len(written)} row(s) written, {len(still)} still rejected\n")


def default_line(default: DefaultRows) -> str:
    """status's line about rows in the DEFAULT partition: some partition is missing, or they were backfilled
    (older than the first partition and than a day: ledger.RECENT); or this role may not read it."""
    if default.rows is None:
        return (f"the DEFAULT partition {default.name}: rows not known, this role may not read it "
                f"(GRANT SELECT ON {default.name} to it, as README's role recipe does)")
    span = f"report_time {naive_utc(default.first)} .. {naive_utc(default.last)}" \
        if default.first is not None and default.last is not None else "report_time unknown"
    if default.rows == default.older:
        return (f"{default.rows} row(s) in the DEFAULT partition {default.name} ({span}): older than the table's "
                "first partition and than a day (backfilled), no partition is missing; prune removes them past "
                "the retention")
    if default.older:
        span += f"; {default.older} of them older than the first partition and than a day (backfilled)"
    if default.maker == "heartbeatd":
        hint = "heartbeatd prune (or init-db --partitioned) makes them ahead"
    elif default.maker == "pg_partman":
        hint = (f"pg_partman manages the table: {default.partman_schema}.run_maintenance() makes them ahead, "
                f"and CALL {default.partman_schema}.partition_data_proc('{default.table}') moves these rows into theirs")
    elif default.maker == "pg_partman?":
        hint = (f"pg_partman is installed but this role may not read {default.partman_schema}.part_config: if it "
                f"manages the table, {default.partman_schema}.run_maintenance() makes them ahead and CALL "
                f"{default.partman_schema}.partition_data_proc('{default.table}') moves these rows into theirs; "
                "if not, create it")
    else:
        hint = "heartbeatd makes none for this table (not one init-db --partitioned made): create it"
    return f"{default.rows} row(s) in the DEFAULT partition {default.name} ({span}): a partition is missing; {hint}"


def state(found: Latest) -> str:
    """`fresh`, `stale`, or `ahead` (of the clock, by more than the staleness limit: not fresh either)."""
    return "ahead" if found.ahead else "fresh" if found.fresh else "stale"


def status(found: Sequence[Latest], now: datetime, stale_after: float, window: str, form: str, out: TextIO,
           err: TextIO, default: Optional[DefaultRows] = None) -> None:
    """Print `status`: one line (or JSON object) per (service, ip), its newest heartbeat, fresh or stale; and
    the rows in the DEFAULT partition, where there are any (JSON: always, where the table has one)."""
    if form == "json":
        json.dump({"now": iso(now), "stale_after_seconds": stale_after, "services": [
            {"service": f.service, "ip": f.ip, "last_report_time": iso(f.last), "age_seconds": round(f.age, 1),
             "state": state(f)} for f in found],
            "default_partition": None if default is None else {
                "name": default.name, "rows": default.rows, "older_than_first_partition": default.older,
                "first_report_time": iso(default.first) if default.first is not None else None,
                "last_report_time": iso(default.last) if default.last is not None else None}},
            out, ensure_ascii=False)
        out.write("\n")
        return
    for f in found:
        age = f"{human(f.age)} ago" if f.age >= 0 else f"{human(-f.age)} ahead of the clock"
        out.write(f"{f.service}\t{f.ip}\t{naive_utc(f.last)}\t{age}\t{state(f)}\n")
    if not found:
        err.write(f"no heartbeats in the last {window}\n")
    if default is not None and default.rows != 0:
        out.flush()
        err.write(default_line(default) + "\n")


def write(pairs: Sequence[PairReport], since: datetime, until: datetime, gap: float, form: str, out: TextIO) -> None:
    """Print the report in one of the three forms."""
    if form == "json":
        json.dump({"since": iso(since), "until": iso(until), "gap_seconds": gap, "pairs": [
            {**_summary(p), "outage_list": [_span(s) for s in p.outages], "no_data_list": [_span(s) for s in p.no_data]}
            for p in pairs]}, out, ensure_ascii=False)
        out.write("\n")
        return
    if form == "csv":
        writer = csv.writer(out)
        writer.writerow(["kind", "service", "ip", "start", "end", "duration_seconds", "ongoing", "uptime_percent",
                         "outages", "downtime_seconds", "longest_seconds", "no_data_seconds", "reporters_last_hour",
                         "latency_p50_ms", "latency_p95_ms", "latency_max_ms", "latency_sampled"])
        for p in pairs:
            s = _summary(p)
            lat = s["latency_ms"]
            writer.writerow(["summary", p.service, p.ip, iso(p.observed_from), iso(until), "", "",
                             s["uptime_percent"], s["outages"], s["downtime_seconds"], s["longest_seconds"],
                             s["no_data_seconds"], "" if p.reporters is None else p.reporters]
                            + ([lat["p50"], lat["p95"], lat["max"], lat["sampled"]] if lat else [""] * 4))
            for kind, spans in (("outage", p.outages), ("no_data", p.no_data)):
                for span in spans:
                    d = _span(span)
                    writer.writerow([kind, p.service, p.ip, d["start"], d["end"], d["duration_seconds"],
                                     str(span.ongoing).lower()] + [""] * 10)
        return
    width = max(20, shutil.get_terminal_size((100, 24)).columns - 4)
    out.write(f"{iso(since)} .. {iso(until)}   gap > {gap:g}s is an outage   "
              f"timeline: {UP} up  {DOWN} down  {NO_DATA} no data (no daemon was reporting)\n")
    if not pairs:
        out.write("no heartbeats in this window\n")
    for p in pairs:
        uptime = "n/a" if p.uptime is None else f"{p.uptime:.3f}%"
        who = "" if p.reporters is None else f"  reported by {p.reporters} host(s) in the last hour"
        out.write(f"\n{p.service} {p.ip}  uptime {uptime}  outages {len(p.outages)}  down {human(p.downtime)}"
                  f"  longest {human(p.longest)}  no data {human(p.no_data_seconds)}{who}\n")
        out.write(f"  {timeline(p, since, until, width)}\n")
        if p.latency is not None:
            lat = p.latency
            out.write(f"  latency  p50 {lat.p50:.1f}ms  p95 {lat.p95:.1f}ms  max {lat.max:.1f}ms"
                      f"  ({lat.sampled} heartbeat(s) sampled)\n")
        for span in p.outages:
            end = "ongoing" if span.ongoing else iso(span.end)
            out.write(f"  down     {iso(span.start)} .. {end}  {human(span.seconds)}\n")
        for span in p.no_data:
            out.write(f"  no data  {iso(span.start)} .. {iso(span.end)}  {human(span.seconds)}\n")


