"""A real systemd citizen: the unit's hardening, the Debian package, and end to end under systemd.

The end-to-end test boots Debian bookworm and Debian trixie, each with systemd as PID 1 in
systemd-nspawn, installs the built .deb and drives it as an operator would, with the same checks on
both. It fails (never skips) when it cannot run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

import nspawn
from heartbeatd.probes.backend_host import default_route_address
from servers import PgServer, RedisServer, free_port

TOP = Path(__file__).resolve().parent.parent
DEB_PATH = re.compile(r"heartbeatd_[0-9.]+_all\.deb$")
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t, path=SYSTEM_PATH) is None]
    if missing:
        pytest.fail(f"missing tools {missing}: .ci/run installs them (apt-get install systemd-container debootstrap "
                    "debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools lintian)")


@pytest.fixture(scope="module")
def deb() -> Path:
    """The .deb built by the one documented command."""
    need("dpkg-buildpackage", "dh")
    result = subprocess.run([str(TOP / "packaging" / "build-deb")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    path = Path(result.stdout.strip().splitlines()[-1])
    assert DEB_PATH.search(path.name), path
    return path


@pytest.mark.parametrize("unit", ["heartbeatd.service", "packaging/heartbeatd-prune.service",
                                  "packaging/heartbeatd-status.service", "packaging/heartbeatd-rollup.service"])
def test_unit_exposure_is_at_most_1_5(unit: str) -> None:
    need("systemd-analyze")
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(TOP / unit)],
                            capture_output=True, text=True, env=dict(os.environ, SYSTEMD_COLORS="0"))
    found = re.search(rf"Overall exposure level for {Path(unit).name}: ([0-9.]+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= 1.5, result.stdout


def test_unit_declares_what_operators_rely_on() -> None:
    unit = (TOP / "heartbeatd.service").read_text()
    for line in ("Type=notify", "ExecStart=/usr/bin/heartbeatd run --env-file /etc/heartbeatd/heartbeatd.env",
                 "ExecReload=/bin/kill -HUP $MAINPID", "WatchdogSec=30s", "Restart=on-failure",
                 "RestartPreventExitStatus=78", "User=heartbeatd", "StateDirectory=heartbeatd",
                 "After=network-online.target postgresql.service redis-server.service"):
        assert f"\n{line}\n" in unit, line
    assert "Requires=" not in unit  # ordered after the local servers, never requiring them


def test_package_contents_and_lintian(deb: Path) -> None:
    need("lintian")
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    for entry in ("./usr/bin/heartbeatd", "./lib/systemd/system/heartbeatd.service", "./usr/share/heartbeatd/schema.sql",
                  "./lib/systemd/system/heartbeatd-prune.service", "./lib/systemd/system/heartbeatd-prune.timer",
                  "./lib/systemd/system/heartbeatd-status.service", "./lib/systemd/system/heartbeatd-status.timer",
                  "./lib/systemd/system/heartbeatd-rollup.service", "./lib/systemd/system/heartbeatd-rollup.timer",
                  "./usr/share/doc/heartbeatd/examples/heartbeatd.rules.yml"):
        assert entry in listing, entry
    assert re.search(r"-rw-r----- root/root .* \./etc/heartbeatd/heartbeatd.env", listing)
    fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True, check=True).stdout
    for dep in ("python3-psycopg2", "python3-redis", "python3-dotenv", "python3-sdnotify"):
        assert dep in fields
    assert "psycopg2-binary" not in fields
    conffiles = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True, text=True).stdout
    assert "/etc/heartbeatd/heartbeatd.env" in conffiles
    lint = subprocess.run(["lintian", "--pedantic", str(deb)], capture_output=True, text=True,
                          env=dict(os.environ, PATH=SYSTEM_PATH))
    tags = [line for line in lint.stdout.splitlines() if re.match(r"^[EWIP]: ", line)]
    assert tags == [], lint.stdout


@pytest.fixture(params=nspawn.RELEASES)
def container(request: pytest.FixtureRequest) -> Iterator[nspawn.Container]:
    """A booted container of each release in turn."""
    if os.geteuid() != 0:
        pytest.fail("the systemd end-to-end test needs root (CI runs as root)")
    need("systemd-nspawn", "debootstrap", "nsenter")
    box = nspawn.Container(request.param)
    try:
        state = box.wait_booted()
        assert state in ("running", "degraded"), f"container did not boot: {state}"
        yield box
    finally:
        box.poweroff()


def wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_end_to_end_under_systemd(deb: Path, container: nspawn.Container) -> None:
    box = container
    pg = PgServer(timezone="Asia/Shanghai").start()
    redis = RedisServer().start()
    try:
        _operate(box, deb, pg, redis)
    except BaseException:
        print(box.run("systemctl status heartbeatd --no-pager; journalctl -u heartbeatd --no-pager -n 100; "
                      "journalctl -u heartbeatd-prune --no-pager -n 30", check=False).stdout)
        raise
    finally:
        redis.destroy()
        pg.destroy()


def _backend_check(box: nspawn.Container, journal: Callable[..., str], show: Callable[[str], str],
                   rows_of: Callable[[float], set[str]]) -> None:
    """Stop the stand-in backend: 后端 rows stop; start it: they resume; for systemd: and http: forms."""
    port = free_port()
    box.run("printf '[Service]\\nExecStart=/usr/bin/python3 -m http.server %d --bind 127.0.0.1\\n' "
            "> /etc/systemd/system/hb-backend.service && systemctl daemon-reload && systemctl start hb-backend" % port)
    env_file = "/etc/heartbeatd/heartbeatd.env"
    for check in ("systemd:hb-backend.service", f"http://127.0.0.1:{port}/"):
        wait(lambda: box.run(f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 1)\"",
                             check=False).returncode == 0, 20, "the stand-in backend listening")
        box.run(f"sed -i '/^HEARTBEAT_BACKEND_CHECK=/d' {env_file} && echo 'HEARTBEAT_BACKEND_CHECK={check}' >> {env_file}"
                " && systemctl reload heartbeatd")
        wait(lambda: show("StatusText").startswith("后端 up"), 20, f"后端 up with {check}")
        failures = journal().count("后端检查失败")
        box.run("systemctl stop hb-backend")
        wait(lambda: journal().count("后端检查失败") > failures, 20, f"the failed check in the journal ({check})")
        wait(lambda: show("StatusText").startswith("后端 down, redis up, postgres up"), 20, "STATUS 后端 down")
        stopped = time.time()
        time.sleep(3 * 2)  # three cycles
        assert "后端" not in rows_of(stopped), f"后端 rows while the backend was stopped ({check})"
        assert {"redis", "postgres"} <= rows_of(stopped)
        box.run("systemctl start hb-backend")
        wait(lambda: "后端" in rows_of(time.time() - 2), 20, f"后端 rows again ({check})")
        assert "服务恢复 - 服务: 后端" in journal()
    box.run(f"sed -i '/^HEARTBEAT_BACKEND_CHECK=/d' {env_file} && systemctl reload heartbeatd")


def _textfile(box: nspawn.Container, journal: Callable[..., str], env_file: str) -> None:
    """HEARTBEAT_TEXTFILE under the unit's hardening: Debian's root-owned directory refuses, README's step lets it in."""
    directory = "/var/lib/prometheus/node-exporter"
    prom = f"{directory}/heartbeatd.prom"
    box.run(f"install -d -o root -g root -m 0755 {directory}")  # as prometheus-node-exporter ships it
    box.run(f"echo 'HEARTBEAT_TEXTFILE={prom}' >> {env_file} && systemctl restart heartbeatd", timeout=60)
    wait(lambda: "指标文件写入失败" in journal(), 20, "the textfile's failure line")
    assert f"指标文件写入失败 - cannot write HEARTBEAT_TEXTFILE {prom}: Permission denied" in journal()
    box.run(f"chgrp heartbeatd {directory} && chmod g+w {directory}")  # README's step
    wait(lambda: "指标文件写入恢复" in journal(), 20, "the textfile written")
    assert box.run(f"stat -c %U:%a {prom}").stdout.strip() == "heartbeatd:644"
    text = box.run(f"cat {prom}").stdout
    assert re.search(r'^heartbeatd_up\{service="redis",ip="127\.0\.0\.1"\} 1$', text, re.M), text
    assert re.search(r'^heartbeatd_rows_written_total [1-9][0-9]*$', text, re.M), text
    # Nowhere else: a directory heartbeatd owns, but outside ReadWritePaths=, is read-only to the daemon.
    box.run("install -d -o heartbeatd -g heartbeatd -m 0755 /srv/hb-metrics")
    box.run(f"sed -i 's|^HEARTBEAT_TEXTFILE=.*|HEARTBEAT_TEXTFILE=/srv/hb-metrics/heartbeatd.prom|' {env_file} "
            "&& systemctl reload heartbeatd")
    wait(lambda: "HEARTBEAT_TEXTFILE /srv/hb-metrics/heartbeatd.prom: Read-only file system" in journal(), 20,
         "/srv/hb-metrics refused by ProtectSystem=strict")
    box.run(f"sed -i '/^HEARTBEAT_TEXTFILE=/d' {env_file} && systemctl reload heartbeatd")


def _operate(box: nspawn.Container, deb: Path, pg: PgServer, redis: RedisServer) -> None:
    def show(prop: str) -> str:
        return box.run(f"systemctl show -p {prop} --value heartbeatd").stdout.strip()

    def journal(args: str = "") -> str:
        return box.run(f"journalctl -u heartbeatd -o cat --no-pager {args}").stdout

    def rows_since(epoch: float) -> set[str]:
        found = pg.sql("SELECT DISTINCT service_name FROM service_heartbeat WHERE created_at > "
                       "to_timestamp(%s) AT TIME ZONE 'utc'", (epoch,))
        return {r[0] for r in found}

    box.copy_in(deb, "/tmp/heartbeatd.deb")
    # The root file system lacks the daemon's dependencies: apt must find every one from Depends:.
    assert box.run("dpkg -s python3-sdnotify", check=False).returncode != 0
    # man-db too, as on any ordinary Debian host: `systemd-analyze verify` runs man for Documentation=.
    installed = box.apt_install("/tmp/heartbeatd.deb man-db")
    for dep in ("python3-psycopg2", "python3-redis", "python3-dotenv", "python3-sdnotify"):
        assert box.run(f"dpkg -s {dep}", check=False).returncode == 0, installed
    # Documentation= names only what the package ships.
    for doc in show("Documentation").replace('"', "").split():
        if doc.startswith("man:"):
            name, section = doc[4:].rstrip(")").split("(")
            box.run(f"test -f /usr/share/man/man{section}/{name}.{section}.gz && man -w {section} {name}")
        else:
            assert doc.startswith("file://"), doc
            box.run(f"test -f {doc[7:]}")
    assert box.run("systemctl is-enabled heartbeatd", check=False).stdout.strip() == "disabled"
    assert box.run("systemctl is-active heartbeatd", check=False).stdout.strip() == "inactive"
    verify = box.run("systemd-analyze verify /lib/systemd/system/heartbeatd.service "
                     "/lib/systemd/system/heartbeatd-prune.service /lib/systemd/system/heartbeatd-prune.timer", check=False)
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stdout + verify.stderr
    assert box.run("systemctl is-enabled heartbeatd-prune.timer", check=False).stdout.strip() == "disabled"

    # The operator edits the env file, creates the table, starts the service.
    env_file = "/etc/heartbeatd/heartbeatd.env"
    box.run(f"sed -i 's|^DATABASE_URL=.*|DATABASE_URL={pg.url()}|; s|^REDIS_URL=.*|REDIS_URL={redis.url()}|; "
            f"s|^HEARTBEAT_INTERVAL=.*|HEARTBEAT_INTERVAL=2|; s|^HEARTBEAT_TIMEOUT=.*|HEARTBEAT_TIMEOUT=1|' {env_file}")
    # A shorter watchdog keeps the test short: 3 x HEARTBEAT_TIMEOUT (1 s) <= 6 s / 2.
    box.run("mkdir -p /etc/systemd/system/heartbeatd.service.d && printf '[Service]\\nWatchdogSec=6s\\n' "
            "> /etc/systemd/system/heartbeatd.service.d/test.conf && systemctl daemon-reload")
    box.run(f"heartbeatd init-db --env-file {env_file}")
    started = time.time()
    box.run("systemctl start heartbeatd", timeout=60)  # returns once READY=1 arrived
    assert box.run("systemctl is-active heartbeatd").stdout.strip() == "active"
    wait(lambda: "postgres up" in show("StatusText"), 20, "STATUS from the daemon")
    assert re.fullmatch(r"后端 up, redis up, postgres up; next in [0-9.]+s", show("StatusText")), show("StatusText")
    wait(lambda: all(f"记录心跳成功 - 服务: {s}" in journal() for s in ("后端", "redis", "postgres")), 20,
         "记录心跳成功 for all three services in the journal")
    assert rows_since(started - 1) == {"后端", "redis", "postgres"}
    # PostgreSQL is on loopback, so 后端 is the default-route interface's address: found under
    # ProcSubset=pid and the address-family and system-call filters (the container shares our network).
    backend_ips = {r[0] for r in pg.sql("SELECT DISTINCT ip_address FROM service_heartbeat WHERE service_name = '后端'")}
    assert backend_ips == {default_route_address() or "127.0.0.1"}
    assert show("User") == "heartbeatd" and show("SupplementaryGroups") == "heartbeatd-conf"
    assert box.run("stat -c %U:%G:%a /etc/heartbeatd/heartbeatd.env").stdout.strip() == "root:heartbeatd-conf:640"

    # Warnings and errors carry their priority: -p warning shows them and no info lines.
    redis.stop()
    wait(lambda: "Redis连接测试失败" in journal(), 20, "the Redis failure in the journal")
    redis.start()
    wait(lambda: "服务恢复 - 服务: redis" in journal(), 20, "Redis recovery")
    warnings = journal("-p warning").splitlines()
    assert any(line.startswith("WARNING:heartbeatd.daemon:服务不可用 - 服务: redis") for line in warnings), warnings
    assert any(line.startswith("ERROR:heartbeatd.daemon:Redis连接测试失败: Connection refused") for line in warnings)
    assert not any(line.startswith("INFO:") for line in warnings), warnings
    everything = journal().splitlines()
    assert not any(line.startswith("<") for line in everything), "priority prefix left in the message"
    assert not any(re.match(r"\d{4}-\d\d-\d\d|[A-Z][a-z]{2} \d\d \d\d:", line) for line in everything)
    assert sum("Redis连接测试失败" in line for line in everything) == 1  # not doubled

    # Reload after editing the env file applies the new interval.
    box.run(f"sed -i 's|^HEARTBEAT_INTERVAL=.*|HEARTBEAT_INTERVAL=1|' {env_file}")
    box.run("systemctl reload heartbeatd")
    wait(lambda: "配置已重新加载 - interval 1s" in journal(), 15, "the reload")
    assert box.run("systemctl is-active heartbeatd").stdout.strip() == "active"

    _textfile(box, journal, env_file)

    # 后端 means the backend application answers: a stand-in backend unit, checked as a unit and over HTTP.
    _backend_check(box, journal, show, rows_since)

    # A frozen daemon is killed by systemd's watchdog and restarted; heartbeats resume.
    main_pid = show("MainPID")
    box.run(f"kill -STOP {main_pid}")
    wait(lambda: "Watchdog timeout" in box.run("journalctl -u heartbeatd --no-pager").stdout, 30, "Watchdog timeout")
    wait(lambda: show("NRestarts") == "1" and show("ActiveState") == "active", 40, "the restart")
    assert show("MainPID") != main_pid
    resumed = time.time()
    wait(lambda: rows_since(resumed) == {"后端", "redis", "postgres"}, 20, "heartbeats after the restart")

    # A bad config: the unit fails once with status 78 and is not restarted.
    box.run(f"sed -i 's|^HEARTBEAT_INTERVAL=.*|HEARTBEAT_INTERVAL=soon|' {env_file}")
    assert box.run("systemctl restart heartbeatd", check=False).returncode != 0
    wait(lambda: show("ActiveState") == "failed", 15, "the failed state")
    assert show("ExecMainStatus") == "78"
    restarts = show("NRestarts")
    time.sleep(7)  # longer than RestartSec=5s
    assert show("ActiveState") == "failed" and show("NRestarts") == restarts
    assert f"HEARTBEAT_INTERVAL (from {env_file}): not a number: 'soon'" in journal()

    # Fixed again. Retention: the shipped prune service removes rows older than HEARTBEAT_RETENTION, only those.
    box.run(f"sed -i 's|^HEARTBEAT_INTERVAL=.*|HEARTBEAT_INTERVAL=2|' {env_file}")
    pg.sql("INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at) SELECT '后端', "
           "'10.9.9.9', now() AT TIME ZONE 'utc' - interval '40 days' + i * interval '1 s', now() "
           "FROM generate_series(1, 1234) i")
    recent = pg.sql("SELECT count(*) FROM service_heartbeat WHERE ip_address <> '10.9.9.9'")[0][0]
    box.run(f"echo 'HEARTBEAT_RETENTION=30d' >> {env_file}")
    box.run("systemctl start heartbeatd-prune.service", timeout=120)
    assert pg.sql("SELECT count(*) FROM service_heartbeat WHERE ip_address = '10.9.9.9'") == [(0,)]
    assert pg.sql("SELECT count(*) FROM service_heartbeat WHERE ip_address <> '10.9.9.9'")[0][0] >= recent
    pruned = box.run("journalctl -u heartbeatd-prune -o cat --no-pager").stdout
    assert "removed 1234 row(s) older than" in pruned, pruned
    box.run("systemctl enable --now heartbeatd-prune.timer")
    assert box.run("systemctl is-active heartbeatd-prune.timer").stdout.strip() == "active"

    # `systemctl stop` is a clean exit.
    box.run("systemctl reset-failed heartbeatd && systemctl start heartbeatd", timeout=60)
    box.run("systemctl stop heartbeatd", timeout=30)
    assert show("ActiveState") == "inactive"
    assert show("Result") == "success" and show("ExecMainStatus") == "0"
    assert "停止服务心跳检查定时任务 (SIGTERM)" in journal()
