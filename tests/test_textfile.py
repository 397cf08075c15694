"""HEARTBEAT_TEXTFILE: node_exporter's textfile collector, with Debian's real promtool and node_exporter.

The daemon rewrites the file after every cycle (temporary file, rename); a file it cannot write
is one throttled ERROR and costs no heartbeat.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import DaemonProcess, clean_env, cli, db_url, fill, init_table, rows
from heartbeatd.heartbeat import ProbeResult
from heartbeatd.metrics import Textfile, exposition, label
from heartbeatd.repeats import Repeats
from servers import PgServer, RedisServer, free_port

SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def tool(name: str) -> str:
    found = shutil.which(name, path=SYSTEM_PATH)
    if found is None:
        pytest.fail(f"{name} is missing: tests/install-deps installs it (Debian packages prometheus, "
                    "prometheus-node-exporter)")
    return found


def env_for(pg: PgServer, redis: RedisServer, tmp: Path, textfile: Path, **more: str) -> dict[str, str]:
    return clean_env(DATABASE_URL=db_url(pg), REDIS_URL=redis.url(), HEARTBEAT_INTERVAL="0.3",
                     HEARTBEAT_TIMEOUT="1", HEARTBEAT_SPOOL_PATH=str(tmp / "spool.db"),
                     HEARTBEAT_TEXTFILE=str(textfile), **more)


def samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value, for every sample line."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            found[key] = float(value)
    return found


def promtool_check(text: str) -> None:
    result = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    # promtool exits non-zero on errors; lint warnings (also non-zero) would name the metric.
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_daemon_writes_a_file_promtool_accepts(daemon: Callable[..., DaemonProcess], pg: PgServer,
                                                   redis_own: RedisServer, tmp_path: Path) -> None:
    init_table(pg)
    out = tmp_path / "textfile"
    out.mkdir()
    path = out / "heartbeatd.prom"
    old = os.umask(0o077)  # the unit's UMask: node_exporter, another user, must still read the file
    try:
        proc = daemon(env_for(pg, redis_own, tmp_path, path))
    finally:
        os.umask(old)
    proc.wait_for(lambda: path.exists() and "heartbeatd_rows_written_total 0\n" not in path.read_text(),
                  what="the textfile with rows written")
    text = path.read_text()
    promtool_check(text)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    found = samples(text)
    for service in ("后端", "redis", "postgres"):
        assert any(k.startswith("heartbeatd_up{") and f'service="{service}"' in k and v == 1 for k, v in found.items())
        assert found[f'heartbeatd_check_retries_total{{service="{service}"}}'] == 0
        assert 0 < found[f'heartbeatd_check_duration_seconds{{service="{service}"}}'] < 1
        assert abs(found[f'heartbeatd_last_success_timestamp_seconds{{service="{service}"}}'] - time.time()) < 5
    assert found['heartbeatd_up{service="redis",ip="127.0.0.1"}'] == 1
    assert re.search(r'^heartbeatd_build_info\{version="[0-9.]+"\} 1$', text, re.M)
    assert abs(found["heartbeatd_cycle_timestamp_seconds"] - time.time()) < 5
    assert found['heartbeatd_spool_rows{where="disk"}'] == 0 and found["heartbeatd_rejected_rows"] == 0
    assert found["heartbeatd_write_failures_total"] == 0
    # The counter is the table's own count (nothing else writes this database).
    proc.stop()
    assert len(rows(pg)) - 3 <= samples(path.read_text())["heartbeatd_rows_written_total"] <= len(rows(pg))
    assert [p.name for p in out.iterdir()] == ["heartbeatd.prom"]  # no temporary file left behind

    # PostgreSQL's table gone: the write fails, rows are spooled, and the file says so.
    pg.sql("DROP TABLE service_heartbeat", db=pg.dbname)  # type: ignore[attr-defined]
    proc = daemon(env_for(pg, redis_own, tmp_path, path))
    proc.wait_for(lambda: samples(path.read_text()).get("heartbeatd_write_failures_total", 0) >= 2,
                  what="write failures counted")
    found = samples(path.read_text())
    assert found['heartbeatd_spool_rows{where="disk"}'] >= 3
    assert found['heartbeatd_up{service="postgres",ip="127.0.0.1"}'] == 1  # PostgreSQL answers; the table is the problem
    promtool_check(path.read_text())


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return samples(reply.read().decode())


@pytest.fixture
def node_exporter(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """Debian's prometheus-node-exporter on a free loopback port, reading only a textfile directory of ours.

    Its log (debug level: it names the file and the error behind a scrape error) is `node-exporter.log`.
    """
    directory = tmp_path / "node-exporter"
    directory.mkdir()
    port = free_port()
    with open(tmp_path / "node-exporter.log", "wb") as log:
        proc = subprocess.Popen([tool("prometheus-node-exporter"), f"--web.listen-address=127.0.0.1:{port}",
                                 "--collector.disable-defaults", "--collector.textfile",
                                 f"--collector.textfile.directory={directory}", "--log.level=debug"],
                                stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                scrape(port)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        yield port, directory
    finally:
        proc.terminate()
        proc.wait(10)


def test_node_exporter_serves_the_file_while_redis_goes_down_and_up(
        daemon: Callable[..., DaemonProcess], pg: PgServer, redis_own: RedisServer, tmp_path: Path,
        node_exporter: tuple[int, Path]) -> None:
    init_table(pg)
    port, directory = node_exporter
    up = 'heartbeatd_up{ip="127.0.0.1",service="redis"}'  # node_exporter sorts the labels

    def redis_up() -> float:
        return scrape(port).get(up, -1)

    proc = daemon(env_for(pg, redis_own, tmp_path, directory / "heartbeatd.prom"))
    proc.wait_for(lambda: redis_up() == 1, what="redis up in node_exporter's scrape")
    found = scrape(port)
    assert found['heartbeatd_up{ip="127.0.0.1",service="postgres"}'] == 1
    assert found.get('node_textfile_scrape_error', 0) == 0
    redis_own.stop()
    proc.wait_for(lambda: redis_up() == 0, what="redis down in node_exporter's scrape")
    redis_own.start()
    proc.wait_for(lambda: redis_up() == 1, what="redis up again in node_exporter's scrape")
    assert scrape(port)['heartbeatd_check_retries_total{service="redis"}'] >= 1  # a refused check was tried again


def node_exporter_errors(tmp_path: Path) -> list[str]:
    """What node_exporter logged at level error (the file and the reason behind a scrape error)."""
    return [line for line in (tmp_path / "node-exporter.log").read_text(errors="replace").splitlines()
            if "level=error" in line]


@pytest.mark.parametrize("interval", ["0.05", "0.5"])
def test_every_scrape_is_clean_while_the_daemon_rewrites_the_file(
        daemon: Callable[..., DaemonProcess], pg: PgServer, redis_server: RedisServer, tmp_path: Path,
        node_exporter: tuple[int, Path], interval: str) -> None:
    """Issue 25.7: node_textfile_scrape_error 1 at HEARTBEAT_INTERVAL=0.5. A scrape in the middle of any
    rewrite must read the whole file and nothing else: 0 and the heartbeatd_ samples, every time."""
    init_table(pg)
    port, directory = node_exporter
    path = directory / "heartbeatd.prom"
    old = os.umask(0o077)  # the unit's UMask
    try:
        proc = daemon(clean_env(DATABASE_URL=db_url(pg), REDIS_URL=redis_server.url(), HEARTBEAT_INTERVAL=interval,
                                HEARTBEAT_TIMEOUT="1", HEARTBEAT_SPOOL_PATH=str(tmp_path / "spool.db"),
                                HEARTBEAT_TEXTFILE=str(path)))
    finally:
        os.umask(old)
    proc.wait_for(path.exists, what="the textfile")
    first = path.stat().st_mtime_ns
    scrapes, bad, deadline = 0, [], time.monotonic() + 6

    def ledger_view() -> None:
        """The monitoring host's other file, rewritten beside it by heartbeatd-status.timer's command."""
        env = clean_env(DATABASE_URL=db_url(pg), HEARTBEAT_INTERVAL=interval, HEARTBEAT_TIMEOUT="1")
        while time.monotonic() < deadline:
            cli(["status", "--format", "prometheus", "--output", str(directory / "heartbeatd-ledger.prom")], env)

    ledger = threading.Thread(target=ledger_view)
    ledger.start()
    while time.monotonic() < deadline or scrapes < 250:
        found = scrape(port)
        scrapes += 1
        if found.get("node_textfile_scrape_error") != 0 or \
                found.get('heartbeatd_up{ip="127.0.0.1",service="postgres"}') != 1 or \
                "heartbeatd_cycle_timestamp_seconds" not in found:
            bad.append(f"scrape {scrapes}: scrape_error {found.get('node_textfile_scrape_error')}, "
                       f"{sorted(k for k in found if k.startswith('heartbeatd_'))[:3]}")
        time.sleep(0.01)
    ledger.join()
    assert "heartbeatd_ledger_stale_after_seconds" in scrape(port)  # both files served
    rewrites = path.stat().st_mtime_ns != first
    assert proc.stop() == 0
    assert not bad, (f"{len(bad)} of {scrapes} scrapes not clean: {bad[:5]}; node_exporter's log: "
                     f"{node_exporter_errors(tmp_path)[:5]}; directory: {sorted(p.name for p in directory.iterdir())}")
    assert rewrites and scrapes >= 250
    assert sorted(p.name for p in directory.iterdir()) == ["heartbeatd-ledger.prom", "heartbeatd.prom"]


def test_a_textfile_that_cannot_be_written_is_one_error_and_costs_no_heartbeat(
        daemon: Callable[..., DaemonProcess], pg: PgServer, redis_server: RedisServer, tmp_path: Path,
        small_fs: Path) -> None:
    init_table(pg)
    missing = tmp_path / "not-yet" / "heartbeatd.prom"
    proc = daemon(env_for(pg, redis_server, tmp_path, missing))
    proc.wait_log("记录心跳成功 - 服务: postgres", count=4)
    lines = [line for _, line in proc.lines if "指标文件写入失败" in line]
    assert lines == [f"ERROR:heartbeatd.daemon:指标文件写入失败 - cannot write HEARTBEAT_TEXTFILE {missing}: "
                     f"No such file or directory: {missing.parent}/.heartbeatd.prom.{proc.proc.pid}.tmp; "
                     "the heartbeats are not affected"]
    missing.parent.mkdir()
    proc.wait_log("指标文件写入恢复 - ")
    assert missing.exists()
    proc.stop()

    # A full disk: the same, and the file already there is left whole (the rename never happened).
    full = small_fs / "heartbeatd.prom"
    proc = daemon(env_for(pg, redis_server, tmp_path, full))
    proc.wait_for(lambda: full.exists(), what="the textfile on the small file system")
    before = len(rows(pg))
    filler = fill(small_fs)
    kept = full.read_text()
    proc.wait_log("指标文件写入失败 - ")
    written = sum("记录心跳成功 - 服务: postgres" in line for _, line in list(proc.lines))
    proc.wait_log("记录心跳成功 - 服务: postgres", count=written + 3)
    assert len(rows(pg)) >= before + 9  # three cycles of three rows while the file could not be written
    assert full.read_text() == kept and kept.endswith("\n")
    assert sum("指标文件写入失败" in line for _, line in proc.lines) == 1  # once a minute at most
    assert "No space left on device" in proc.log()
    assert not [p for p in small_fs.iterdir() if p.name.endswith(".tmp")]
    filler.unlink()
    proc.wait_log("指标文件写入恢复 - ")
    assert proc.stop() == 0


def test_label_values_are_escaped_and_every_family_has_help_and_type() -> None:
    assert label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    textfile = Textfile(Path("/nonexistent/x.prom"), Repeats(time.monotonic))
    textfile.observe([ProbeResult('odd"name\\x\ny', "10.0.0.1", False, 0.25, "down")], 1.0e9, "failed", None)
    text = exposition(textfile.families(1.0e9, None, {'odd"name\\x\ny': 2}))
    promtool_check(text)
    assert 'heartbeatd_up{service="odd\\"name\\\\x\\ny",ip="10.0.0.1"} 0\n' in text
    assert 'heartbeatd_check_retries_total{service="odd\\"name\\\\x\\ny"} 2\n' in text
    assert "heartbeatd_cycle_timestamp_seconds 1000000000\n" in text
    written = textfile.render(1.0e9, None, {'odd"name\\x\ny': 2}).decode()
    promtool_check(written)
    assert "heartbeatd_cycle_timestamp_seconds 1000000000.000000\n" in written
    assert 'heartbeatd_check_duration_seconds{service="odd\\"name\\\\x\\ny"} 0.250000\n' in written
    assert "heartbeatd_last_success_timestamp_seconds{" not in text  # never up: no sample, not a zero
    names = set(re.findall(r"^([a-z_]+)[{ ]", text, re.M))
    for name in names:
        assert f"# HELP {name} " in text and f"# TYPE {name} " in text


def test_the_cycle_template_writes_what_the_families_say() -> None:
    """render() formats a flat tuple into a template made once: it must say what families() says, sample by sample."""
    class Spool:
        count, in_memory, rejected = 7, 2, 3

    class Writer:
        inserted = 0

    textfile, writer = Textfile(Path("/nonexistent/x.prom"), Repeats(time.monotonic)), Writer()
    cycles = [
        [ProbeResult("后端", "10.0.0.1", True, 0.000123), ProbeResult("redis", "127.0.0.1", False, 0.2, "down"),
         ProbeResult("postgres", "127.0.0.1", True, 0.0045)],
        [ProbeResult("后端", "10.0.0.1", True, 0.0002), ProbeResult("redis", "127.0.0.1", True, 0.001),
         ProbeResult("postgres", "127.0.0.2", True, 1.5)],  # redis up for the first time, postgres moved
        [ProbeResult("后端", "10.0.0.1", True, 0.0002), ProbeResult("redis", "127.0.0.1", False, 0.2, "down"),
         ProbeResult("postgres", "127.0.0.2", False, 0.5, "down")],  # the same shape: the template is reused
    ]
    for n, results in enumerate(cycles):
        when = 1.7e9 + n * 30.25
        writer.inserted += 3
        textfile.observe(results, when, "failed" if n == 2 else None, writer)
        retried = {"redis": n}
        written = textfile.render(when, Spool(), retried).decode()
        expected = exposition(textfile.families(when, Spool(), retried))
        promtool_check(written)
        parse = lambda text: [(line.rsplit(" ", 1)[0], float(line.rsplit(" ", 1)[1]))  # noqa: E731
                              for line in text.splitlines() if not line.startswith("#")]
        got, want = parse(written), parse(expected)
        assert [name for name, _ in got] == [name for name, _ in want]
        for (name, a), (_, b) in zip(got, want):
            assert abs(a - b) < 1e-6, name
    assert 'heartbeatd_up{service="postgres",ip="127.0.0.2"} 0' in written
    assert "heartbeatd_write_failures_total 1" in written and "heartbeatd_rows_written_total 9" in written
    assert 'heartbeatd_spool_rows{where="disk"} 5' in written


def test_the_temporary_file_never_follows_a_planted_link_and_stale_ones_go(tmp_path: Path) -> None:
    """Anyone who may write the directory (group heartbeatd, per README) could plant `.NAME.PID.tmp`."""
    from heartbeatd.metrics import temporary_name, write_atomically
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o600)
    target = tmp_path / "ledger.prom"
    os.symlink(victim, temporary_name(target))
    write_atomically(target, "metric 1\n")
    assert victim.read_text() == "precious\n" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert target.read_text() == "metric 1\n" and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert not os.path.lexists(temporary_name(target))
    # A daemon SIGKILLed mid-write left its temporary file: the next writer's first template removes it.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".heartbeatd.prom.{dead.pid}.tmp"
    stale.write_text("half")
    alive = tmp_path / f".heartbeatd.prom.{os.getppid()}.tmp"  # a live process's: left alone
    alive.write_text("busy")
    textfile = Textfile(tmp_path / "heartbeatd.prom", Repeats(time.monotonic))
    textfile.observe([ProbeResult("redis", "10.0.0.5", True, 0.001)], 1.0e9, None, None)
    textfile.write(1.0e9, None, {})
    assert not stale.exists() and alive.exists() and (tmp_path / "heartbeatd.prom").exists()


def test_a_textfile_moved_or_emptied_on_reload_leaves_no_frozen_file(
        daemon: Callable[..., DaemonProcess], pg: PgServer, redis_own: RedisServer, tmp_path: Path) -> None:
    """A file left behind would say its last figures forever (and, moved, give node_exporter every series twice)."""
    init_table(pg)
    first, second = tmp_path / "heartbeatd.prom", tmp_path / "heartbeatd2.prom"
    env_file = tmp_path / "hb.env"
    base = (f"DATABASE_URL={db_url(pg)}\nREDIS_URL={redis_own.url()}\nHEARTBEAT_INTERVAL=0.3\n"
            f"HEARTBEAT_SPOOL_PATH={tmp_path / 'spool.db'}\n")
    env_file.write_text(base + f"HEARTBEAT_TEXTFILE={first}\n")
    proc = daemon(clean_env(), ["--env-file", str(env_file)])
    proc.wait_for(first.exists, what="the first textfile")
    env_file.write_text(base + f"HEARTBEAT_TEXTFILE={second}\n")
    proc.signal(signal.SIGHUP)
    proc.wait_for(lambda: second.exists() and not first.exists(), what="the textfile moved")
    env_file.write_text(base)
    proc.signal(signal.SIGHUP)
    proc.wait_for(lambda: not second.exists(), what="the textfile gone with HEARTBEAT_TEXTFILE emptied")
    proc.wait_log("配置已重新加载", count=2)
    assert proc.stop() == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith((".prom", ".tmp"))]
