"""`report --format html`: the status page, rendered by a real browser (Debian's chromium, headless).

A private PostgreSQL holds three weeks of a generated ledger: two hosts (one new ten days ago), a
host's outage, six hours when both daemons were down (no data for the servers), a Redis outage,
PostgreSQL down until the end, and an address that is markup. The page's DOM must agree with the
ledger's layout and with `report --format json` over the same windows; the page must not overflow
at 390 px or 1280 px, and one screenshot per run is kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import struct
import subprocess
import zlib
from collections import Counter
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Optional

import pytest

from conftest import clean_env, cli, db_url, init_table
from servers import PgServer

from heartbeatd.outage import Latency, PairReport, Span, clip
from heartbeatd.page import Page, grade, html

A, B = "10.0.0.1", "10.0.0.2"
REDIS, PG = "10.1.0.1", "10.2.0.1"
# An ip_address is data: it must stay text; and 64 characters without a space must not widen the page.
MARKUP = '<script>alert("x")</script>&amp;' + "0123456789abcdef" * 2
GAP = 150  # rows every 60 s: a gap over 150 s is an outage
DAY, H, M = timedelta(days=1), timedelta(hours=1), timedelta(minutes=1)
# The window's end: noon of yesterday (UTC), so every planted event is in the past.
D0 = datetime.now(timezone.utc).replace(tzinfo=None, hour=0, minute=0, second=0, microsecond=0) - DAY
UNTIL = D0 + 12 * H
ARTIFACTS = Path("/tmp/heartbeatd-artifacts")
COLOURS = {"ok": "2da44e", "minor": "d4a72c", "major": "e16f24", "down": "cf222e", "nodata": "d0d7de"}  # the page's CSS
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (tests/install-deps)")

# Every 60 s from D0-20d to UNTIL, A on the minute, B at +20 s; B only from D0-10d. Both daemons
# down D0-7d 08:00-14:00; A alone down D0-5d 10:00-12:00; Redis down D0-3d 20:00-20:30;
# PostgreSQL down from UNTIL-1h on; the markup address written by A on D0-2d only.
SEED = """
INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at, latency_ms)
SELECT s.name, s.ip, t, t, 1 + k %% 10
  FROM (VALUES ('10.0.0.1', 0), ('10.0.0.2', 20)) h(ip, off),
       LATERAL (SELECT %(start)s::timestamp + k * interval '60 s' + h.off * interval '1 s' AS t, k
                  FROM generate_series(0, %(cycles)s - 1) k) c,
       LATERAL (VALUES ('后端', h.ip), ('redis', '10.1.0.1'), ('postgres', '10.2.0.1'), ('redis', %(markup)s)) s(name, ip)
 WHERE t < %(until)s
   AND NOT (h.ip = '10.0.0.2' AND t < %(d0)s - interval '10 days')
   AND NOT (t >= %(d0)s - interval '7 days' + interval '8 hours' AND t < %(d0)s - interval '7 days' + interval '14 hours')
   AND NOT (h.ip = '10.0.0.1' AND t >= %(d0)s - interval '5 days' + interval '10 hours'
            AND t < %(d0)s - interval '5 days' + interval '12 hours')
   AND NOT (s.name = 'redis' AND s.ip = '10.1.0.1' AND t >= %(d0)s - interval '3 days' + interval '20 hours'
            AND t < %(d0)s - interval '3 days' + interval '20 hours 30 minutes')
   AND NOT (s.name = 'postgres' AND t >= %(until)s - interval '1 hour')
   AND NOT (s.ip = %(markup)s AND NOT (h.ip = '10.0.0.1' AND t >= %(d0)s - interval '2 days' AND t < %(d0)s - interval '1 day'))
 ORDER BY t
"""


# -- the pure part: one report clipped to days and windows ------------------------------------------

def test_clip_cuts_spans_and_observed_time_to_the_window() -> None:
    t0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
    pair = PairReport("redis", REDIS, t0 + 6 * H, t0 + 3 * DAY,
                      outages=[Span(t0 + 23 * H, t0 + DAY + H), Span(t0 + 2 * DAY + 23 * H, t0 + 3 * DAY, True)],
                      no_data=[Span(t0 + DAY + 12 * H, t0 + DAY + 18 * H)], reporters=2,
                      latency=Latency(1.0, 2.0, 3.0, 10))
    first = clip(pair, t0, t0 + DAY)  # observed from 06:00, down 23:00-24:00
    assert (first.observed_from, first.observed_to) == (t0 + 6 * H, t0 + DAY)
    assert first.outages == [Span(t0 + 23 * H, t0 + DAY)] and first.uptime == pytest.approx(100 * 17 / 18)
    second = clip(pair, t0 + DAY, t0 + 2 * DAY)  # down 00:00-01:00, no data 12:00-18:00
    assert second.outages == [Span(t0 + DAY, t0 + DAY + H)] and second.no_data_seconds == 6 * 3600
    assert second.uptime == pytest.approx(100 * 17 / 18)
    last = clip(pair, t0 + 2 * DAY, t0 + 3 * DAY)
    assert last.outages == [Span(t0 + 2 * DAY + 23 * H, t0 + 3 * DAY, True)]  # still going on at the end
    assert clip(pair, t0 + DAY - H, t0 + DAY + H).outages[0].ongoing is False
    before = clip(pair, t0 - DAY, t0)  # before the pair was observed: nothing, so no uptime (grey)
    assert before.uptime is None and grade(before.uptime) == "nodata"
    assert clip(pair, t0 - DAY, t0 + 4 * DAY).uptime == pair.uptime  # the whole window: the report itself
    assert (second.reporters, second.latency) == (2, pair.latency)


def test_a_page_without_heartbeats_says_so() -> None:
    until = datetime(2026, 11, 30, 12, tzinfo=timezone.utc)
    midnight = until.replace(hour=0)
    text = html(Page(until - 90 * DAY, until, 65, "service_heartbeat", [midnight - n * DAY for n in range(89, -1, -1)], []))
    assert "No heartbeats in these 90 days at" in text and 'class="pair"' not in text and "<script" not in text


def test_grades() -> None:
    assert [grade(u) for u in (100.0, 99.999, 99.0, 98.9, 90.0, 89.9, 0.0, None)] == [
        "ok", "minor", "minor", "major", "major", "down", "down", "nodata"]


# -- the page from the command line, in a browser ---------------------------------------------------

@pytest.fixture
def ledger(pg: PgServer) -> PgServer:
    init_table(pg)
    pg.sql("ALTER TABLE service_heartbeat ADD COLUMN latency_ms real", db=pg.dbname)  # type: ignore[attr-defined]
    start = D0 - 20 * DAY
    pg.sql(SEED, {"start": start, "cycles": int((UNTIL - start) / M), "until": UNTIL, "d0": D0,  # type: ignore[arg-type]
                  "markup": MARKUP}, db=pg.dbname)  # type: ignore[attr-defined]
    pg.sql("ANALYZE service_heartbeat", db=pg.dbname)  # type: ignore[attr-defined]
    return pg


def env_for(pg: PgServer) -> dict[str, str]:
    return clean_env(DATABASE_URL=db_url(pg), HEARTBEAT_INTERVAL="60", HEARTBEAT_TIMEOUT="5")


def run(pg: PgServer, *args: str) -> Any:
    result = cli(["report", "--until", UNTIL.isoformat(), "--gap", str(GAP), *args], env_for(pg))
    assert result.returncode == 0, result.stderr
    return result


class Node:
    """An element of the DOM chromium dumped."""

    def __init__(self, tag: str, attrs: dict[str, str], parent: Optional["Node"]) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node] = []
        self.parts: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def classes(self) -> list[str]:
        return self.attrs.get("class", "").split()

    def all(self, tag: str = "", cls: str = "") -> list["Node"]:
        found = []
        for child in self.children:
            if (not tag or child.tag == tag) and (not cls or cls in child.classes):
                found.append(child)
            found += child.all(tag, cls)
        return found

    def one(self, tag: str = "", cls: str = "") -> "Node":
        found = self.all(tag, cls)
        assert len(found) == 1, (tag, cls, len(found))
        return found[0]


class Tree(HTMLParser):
    """The dumped DOM as Nodes; text is kept on every enclosing element."""

    VOID = {"meta", "link", "br", "img", "input", "hr"}

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {}, None)
        self.at = self.root
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs}, self.at)
        self.at.children.append(node)
        if tag not in self.VOID:
            self.at = node

    def handle_endtag(self, tag: str) -> None:
        node: Optional[Node] = self.at
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.at = node.parent

    def handle_data(self, data: str) -> None:
        node: Optional[Node] = self.at
        while node is not None:
            node.parts.append(data)
            node = node.parent


def chromium(tmp: Path, *args: str, timeout: float = 60) -> str:
    """Run headless chromium with its own profile; its stdout."""
    assert CHROMIUM is not None
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--hide-scrollbars", f"--user-data-dir={tmp / 'chromium-profile'}", *args],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit, non-interlaced PNG such as chromium writes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + size]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + size
    raw, stride, rows, prev = zlib.decompress(idat), width * channels, [], bytes(width * channels)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = prev[i], prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        rows.append(bytes(line))
        prev = bytes(line)
    return width, height, [bytes(r[i] for i in range(len(r)) if (i % channels) < 3) for r in rows]


def painted_at_right_edge(path: Path, margin: int = 3) -> list[int]:
    """The rows whose last `margin` pixels are not all the page's white: content cut at the edge."""
    width, _, rows = png_pixels(path)
    return [y for y, row in enumerate(rows) if row[3 * (width - margin):] != b"\xff" * 3 * margin]


def scroll_width(tmp: Path, page: Path, width: int) -> tuple[int, int]:
    """(scrollWidth, clientWidth) of the page in a `width`-px frame: measured by a harness page, not by the page."""
    harness = tmp / f"measure-{width}.html"
    harness.write_text(
        f'<!DOCTYPE html><html><body style="margin:0"><iframe id="f" src="{page.name}" width="{width}" height="900" '
        'style="border:0"></iframe><pre id="out">pending</pre><script>'
        "document.getElementById('f').addEventListener('load', function () {"
        " var d = this.contentDocument.documentElement;"
        " document.getElementById('out').textContent = d.scrollWidth + ' ' + d.clientWidth; });"
        "</script></body></html>")
    dom = Tree(chromium(tmp, "--allow-file-access-from-files", "--virtual-time-budget=5000", "--dump-dom",
                        harness.as_uri()))
    found = dom.root.one("pre").text.split()
    assert len(found) == 2, f"the harness could not measure the frame: {found}"
    return int(found[0]), int(found[1])


def uptime_text(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}%"


def figures_agree(ledger: PgServer, doc: Node) -> dict[tuple[str, str], Node]:
    """The page's pairs and figures are `report --format json`'s over the same windows; its sections by pair."""
    windows = {label: json.loads(run(ledger, "--since", (UNTIL - span).isoformat(), "--format", "json").stdout)
               for label, span in (("24 h", DAY), ("7 d", 7 * DAY), ("30 d", 30 * DAY), ("90 d", 90 * DAY))}
    pairs = {(p["service"], p["ip"]): p for p in windows["90 d"]["pairs"]}
    assert set(pairs) == {("后端", A), ("后端", B), ("redis", REDIS), ("redis", MARKUP), ("postgres", PG)}
    sections = doc.all("section", "pair")
    shown = {(s.one(cls="service").text, s.one(cls="ip").text): s for s in sections}
    assert list(shown) == list(pairs)  # in the report's order; the markup address is text
    days = [(D0 - (89 - n) * DAY).strftime("%Y-%m-%d") for n in range(90)]
    for key, section in shown.items():
        bars = section.all("span", "bar")
        assert [b.attrs["data-day"] for b in bars] == days
        for bar in bars:
            value = bar.attrs["data-uptime"]
            assert grade(float(value) if value else None) in bar.classes
        figures = {dt.text: dd.text for dt, dd in zip(section.all("dt"), section.all("dd"))}
        for label, data in windows.items():
            found = {(p["service"], p["ip"]): p for p in data["pairs"]}
            if key in found:
                assert figures[label] == uptime_text(found[key]["uptime_percent"]), (key, label)
            else:  # silent all through the window (the markup address, dead since D0-1d): down all the time
                assert figures[label] == "0.000%", (key, label)
        latency = pairs[key]["latency_ms"]
        assert figures["latency p50 / p95"] == f"{latency['p50']:.1f} / {latency['p95']:.1f} ms"
        rows = [[td.text for td in tr.all("td")] for tr in section.all("tbody")[0].all("tr")] if section.all("tbody") else []
        expected = [[o["start"][:-1].replace("T", " "), "ongoing" if o["ongoing"] else o["end"][:-1].replace("T", " ")]
                    for o in reversed(pairs[key]["outage_list"])]
        assert [r[:2] for r in rows] == expected, key
    return shown


def planted_layout(shown: dict[tuple[str, str], Node]) -> None:
    """The planted layout, day by day (index 89 is D0, the window's last day, until noon)."""
    def classes(key: tuple[str, str]) -> list[str]:
        return [next(c for c in b.classes if c != "bar") for b in shown[key].all("span", "bar")]

    grey = ["nodata"] * 69  # before D0-20d nothing was written
    assert classes(("后端", A)) == grey + ["ok"] * 13 + ["down", "ok", "major"] + ["ok"] * 5
    assert classes(("后端", B)) == grey + ["nodata"] * 10 + ["ok"] * 3 + ["down"] + ["ok"] * 7
    assert classes(("redis", REDIS)) == grey + ["ok"] * 17 + ["major"] + ["ok"] * 3  # no data 6 h: still 100 %
    assert classes(("postgres", PG)) == grey + ["ok"] * 20 + ["major"]  # down its last hour
    # Its outage began at its last heartbeat, 23:59 on its only day: that day has 60 s of it.
    assert classes(("redis", MARKUP)) == ["nodata"] * 87 + ["minor", "down", "down"]
    states = {key: next(c for c in s.one(cls="state").classes if c != "state") for key, s in shown.items()}
    assert states == {("后端", A): "up", ("后端", B): "up", ("redis", REDIS): "up", ("redis", MARKUP): "down",
                      ("postgres", PG): "down"}
    assert shown[("postgres", PG)].one(cls="state").text.startswith(
        f"down since {(UNTIL - H - 40 * timedelta(seconds=1)).strftime('%Y-%m-%d %H:%M:%S')}")


def days_agree(ledger: PgServer, shown: dict[tuple[str, str], Node]) -> None:
    """Each day's figure is `report`'s over that day, where the pair reported in it; but for an outage
    that crosses midnight, which the page counts from its start on both days where a report of the
    day alone cannot see its first `--gap` seconds before its end: at most 2 x gap apart."""
    for key, section in shown.items():
        for bar in section.all("span", "bar"):
            start = datetime.fromisoformat(bar.attrs["data-day"])
            end = min(start + DAY, UNTIL)
            data = json.loads(run(ledger, "--since", start.isoformat(), "--until", end.isoformat(),
                                  "--format", "json").stdout) if bar.attrs["data-uptime"] not in ("", "100.000") else None
            if data is None:
                continue
            found = {(p["service"], p["ip"]): p for p in data["pairs"]}
            want = found[key]["uptime_percent"] if key in found else 0.0
            edges = 100 * 2 * GAP / (end - start).total_seconds()
            assert abs(float(bar.attrs["data-uptime"]) - want) <= edges + 0.0005, (key, bar.attrs["data-day"])


@needs_chromium
def test_status_page_in_a_browser(ledger: PgServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "status.html"
    old = os.umask(0o077)  # as under the status unit's UMask=0077: the web server must still read it
    try:
        result = run(ledger, "--format", "html", "--output", str(page))
    finally:
        os.umask(old)
    assert result.stdout == "" and stat.S_IMODE(page.stat().st_mode) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    source = page.read_text()
    assert "<script" not in source.lower().replace("&lt;script", "")  # no script of its own; the address escaped
    assert "http://" not in source and "https://" not in source and "src=" not in source

    dom = Tree(chromium(tmp_path, "--dump-dom", page.as_uri()))
    doc = dom.root
    assert not doc.all("script") and not doc.all("link") and not doc.all("img") and not doc.all("iframe")
    policy = [m for m in doc.all("meta") if m.attrs.get("http-equiv") == "Content-Security-Policy"]
    assert policy and policy[0].attrs["content"].startswith("default-src 'none'")
    assert "All times are UTC" in doc.one("header").text

    shown = figures_agree(ledger, doc)

    planted_layout(shown)
    days_agree(ledger, shown)

    # Readable on a phone and on a desktop: nothing wider than the window, nothing cut at its edge.
    # First the measures on a page that does overflow, so that a measure that sees nothing fails.
    wide = tmp_path / "wide.html"
    wide.write_text('<!DOCTYPE html><body style="margin:8px"><p style="width:600px">' + "wide text " * 30 + "</p>")
    assert scroll_width(tmp_path, wide, 390)[0] > 390
    shot = tmp_path / "wide.png"
    chromium(tmp_path, "--run-all-compositor-stages-before-draw", f"--screenshot={shot}", "--window-size=390,300",
             wide.as_uri())
    assert painted_at_right_edge(shot)
    ARTIFACTS.mkdir(exist_ok=True)
    for width in (390, 1280):
        assert scroll_width(tmp_path, page, width)[0] <= width
        shot = tmp_path / f"status-{width}.png"
        # (JavaScript off is the page's own policy: no script in it, and its CSP allows none.)
        chromium(tmp_path, "--run-all-compositor-stages-before-draw",
                 f"--screenshot={shot}", f"--window-size={width},2400", page.as_uri())
        shot_width, _, pixels = png_pixels(shot)
        assert shot_width == width
        assert painted_at_right_edge(shot) == [], f"content reaches the right edge at {width} px: {shot}"
        # The style was applied (its CSP hash matches): every grade's colour is painted, the bars' in blocks.
        painted = Counter(row[i:i + 3] for row in pixels for i in range(0, len(row), 3))
        for name, colour in COLOURS.items():
            assert painted[bytes.fromhex(colour)] > 150, (name, width)  # more than the legend's key alone
        shutil.copy(shot, ARTIFACTS / shot.name)
        with capsys.disabled():  # shown in every run, not only with -s
            print(f"\nscreenshot: {shot} (copy: {ARTIFACTS / shot.name})")
    shutil.copy(page, ARTIFACTS / page.name)
    pdf = tmp_path / "status.pdf"  # printable: chromium prints it, the colours kept (print-color-adjust)
    chromium(tmp_path, "--no-pdf-header-footer", f"--print-to-pdf={pdf}", page.as_uri())
    printed = pdf.read_bytes()
    assert printed.startswith(b"%PDF") and 1 <= len(re.findall(rb"/Type\s*/Page(?!s)", printed)) <= 5
    shutil.copy(pdf, ARTIFACTS / pdf.name)


def facts(doc: Node) -> list[Any]:
    """Per pair: its bars (day, class, uptime), state, notes, window figures and outages; not latency,
    which is sampled from the raw rows still kept."""
    return [([(b.attrs["data-day"], b.attrs["class"], b.attrs["data-uptime"]) for b in s.all("span", "bar")],
             s.one("h2").text, [n.text for n in s.all("p")],
             [(dt.text, dd.text) for dt, dd in zip(s.all("dt"), s.all("dd")) if not dt.text.startswith("latency")],
             [[td.text for td in tr.all("td")] for tr in s.all("tr")]) for s in doc.all("section", "pair")]


def test_status_page_from_rollups(ledger: PgServer, tmp_path: Path) -> None:
    """After a rollup pass the page reads the rollups, as `report` does, and says so; with the raw rows
    of its first 10 days pruned, its bars, figures and outages are still the raw-row page's, and
    still `report --format json`'s over the same windows (which reads the rollups too)."""
    raw = Tree(run(ledger, "--format", "html").stdout).root
    assert raw.one("p", "source").text == "Read raw rows only (no rollup yet: `heartbeatd rollup` makes it)."
    for command in ("init-db", "rollup"):
        result = cli([command], env_for(ledger))
        assert result.returncode == 0, result.stderr
    assert "(first pass: the whole table)" in result.stdout
    # What prune does: the raw rows before the cut are gone; only the rollup still knows those days.
    cut = D0 - 10 * DAY
    db = ledger.dbname  # type: ignore[attr-defined]
    ledger.sql("DELETE FROM service_heartbeat WHERE report_time < %s", (cut,), db=db)
    assert ledger.sql("SELECT min(report_time) FROM service_heartbeat", db=db)[0][0] >= cut

    page = tmp_path / "status.html"
    run(ledger, "--format", "html", "--output", str(page))
    doc = Tree(page.read_text()).root  # the markup chromium renders in the test above: here its source suffices
    note = doc.one("p", "source").text
    assert note.startswith(f"Read hourly rollups for {(UNTIL - 90 * DAY).isoformat()}Z .. {UNTIL.isoformat()}Z "
                           "(pass of "), note
    json_line = run(ledger, "--since", (UNTIL - 90 * DAY).isoformat(), "--format", "json").stderr
    assert json_line.startswith("report: read hourly rollups for"), json_line
    shown = figures_agree(ledger, doc)
    planted_layout(shown)
    days_agree(ledger, shown)
    assert facts(doc) == facts(raw)


def test_report_output_and_bad_arguments(ledger: PgServer, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    run(ledger, "--since", (UNTIL - DAY).isoformat(), "--format", "json", "--output", str(out))
    assert json.loads(out.read_text())["pairs"] and stat.S_IMODE(out.stat().st_mode) == 0o644
    result = cli(["report", "--format", "html", "--since", "7d"], env_for(ledger))
    assert result.returncode == 64 and result.stderr.count("\n") == 1 and "--since" in result.stderr
    result = cli(["report", "--format", "html", "--output", str(tmp_path / "missing" / "page.html")], env_for(ledger))
    assert result.returncode == 1 and result.stderr.startswith("heartbeatd: report: cannot write")
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
