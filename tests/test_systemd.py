"""A real systemd citizen: the unit's hardening, the Debian package, and end to end under systemd.

The end-to-end test boots Debian bookworm and Debian trixie, each with systemd as PID 1 in
systemd-nspawn, and installs and starts the built .deb with README's quick start, command by command,
as an operator with sudo would; then drives it with the same checks on both. Bookworm's daemon uses
private servers of the host; trixie's, in a network of its own, uses trixie's own postgresql-17 and
valkey-server installed in the container, and valkey-sentinel for one failover and the status timer.
A second bookworm container upgrades the previous release's .deb to this one with rows spooled,
and purges it with rows unsent. Everything fails (never skips) when it cannot run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Protocol

import pytest

import nspawn
from heartbeatd.probes.backend_host import default_route_address
from servers import PgServer, RedisServer, free_port

pytestmark = pytest.mark.systemd

TOP = Path(__file__).resolve().parent.parent
DEB_PATH = re.compile(r"heartbeatd_[0-9.]+_all\.deb$")
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
ENV_FILE = "/etc/heartbeatd/heartbeatd.env"


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


def readme_block(marker: str) -> list[str]:
    """The command lines of README.md between <!-- marker --> and <!-- /marker -->."""
    block = (TOP / "README.md").read_text().split(f"<!-- {marker} -->\n")[1].split(f"<!-- /{marker} -->")[0]
    return [line for line in block.splitlines() if line and not line.startswith("```")]


def test_quick_start_builds_the_package_as_the_test_does() -> None:
    build = readme_block("quick-start-build")
    assert [line.split("#")[0].strip() for line in build][-1] == "packaging/build-deb", build  # the `deb` fixture's
    # README's build tools are the ones need() names and .ci/run installs.
    assert build[0].split() == ["sudo", "apt-get", "install", "debhelper", "dh-python", "pybuild-plugin-pyproject",
                                "python3-all", "python3-setuptools"], build


@contextlib.contextmanager
def booted(release: str, private_network: bool = False) -> Iterator[nspawn.Container]:
    """A booted container of `release`, powered off afterwards."""
    if os.geteuid() != 0:
        pytest.fail("the systemd end-to-end test needs root (CI runs as root)")
    need("systemd-nspawn", "debootstrap", "nsenter")
    box = nspawn.Container(release, private_network=private_network)
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


class Backends(Protocol):
    """The PostgreSQL and Redis a container's daemon uses: their URLs, a query, Redis stopped and started."""
    database_url: str
    redis_url: str

    def sql(self, query: str) -> list[tuple[str, ...]]: ...
    def stop_redis(self) -> None: ...
    def start_redis(self) -> None: ...


class HostBackends:
    """Private servers of the host, which a container sharing the host's network reaches on 127.0.0.1."""

    def __init__(self, pg: PgServer, redis: RedisServer) -> None:
        self.pg, self.redis = pg, redis
        self.database_url, self.redis_url = pg.url(), redis.url()

    def sql(self, query: str) -> list[tuple[str, ...]]:
        return [tuple(str(v) for v in row) for row in self.pg.sql(query)]

    def stop_redis(self) -> None:
        self.redis.stop()

    def start_redis(self) -> None:
        self.redis.start()


class ContainerBackends:
    """Trixie's own postgresql-17 and valkey-server (and valkey-sentinel) inside the container, on Debian's ports."""

    def __init__(self, box: nspawn.Container) -> None:
        self.box = box
        box.run(f"dpkg -s {' '.join(nspawn.SERVERS[box.release])} >/dev/null")  # in the root file system
        box.run("systemctl is-active postgresql@17-main valkey-server valkey-sentinel")
        # What an operator does once: a login role and a database it owns (init-db creates the table there).
        self.psql("CREATE ROLE heartbeat LOGIN PASSWORD 'hb-secret'; CREATE DATABASE app OWNER heartbeat;", "postgres")
        self.database_url = "postgresql://heartbeat:hb-secret@127.0.0.1:5432/app"
        self.redis_url = "redis://127.0.0.1:6379/0"

    def psql(self, query: str, db: str = "app") -> list[tuple[str, ...]]:
        out = self.box.run(f"runuser -u postgres -- psql -AtqX -v ON_ERROR_STOP=1 -d {db}", input=query).stdout
        return [tuple(line.split("|")) for line in out.splitlines()]

    def sql(self, query: str) -> list[tuple[str, ...]]:
        return self.psql(query)

    def stop_redis(self) -> None:
        self.box.run("systemctl stop valkey-server")

    def start_redis(self) -> None:
        self.box.run("systemctl start valkey-server")  # Type=notify: returns once it accepts connections


def test_end_to_end_on_bookworm_with_the_hosts_servers(deb: Path) -> None:
    pg = PgServer(timezone="Asia/Shanghai").start()
    redis = RedisServer().start()
    try:
        with booted("bookworm") as box, _diagnostics(box):
            servers = HostBackends(pg, redis)
            _quick_start(box, deb, servers)
            _operate(box, servers, default_route_address() or "127.0.0.1")
            _prune_and_stop(box, servers)
    finally:
        redis.destroy()
        pg.destroy()


def test_end_to_end_on_trixie_with_postgresql_17_and_valkey(deb: Path) -> None:
    with booted("trixie", private_network=True) as box, _diagnostics(box):
        servers = ContainerBackends(box)
        assert servers.psql("SHOW server_version_num")[0][0].startswith("17")
        assert "valkey" in box.run("valkey-cli -p 6379 INFO server").stdout
        _quick_start(box, deb, servers)
        _operate(box, servers, "127.0.0.1")  # a network of its own: loopback only
        _sentinel_failover(box, servers)
        _status_timer(box)
        _prune_and_stop(box, servers)


@contextlib.contextmanager
def _diagnostics(box: nspawn.Container) -> Iterator[None]:
    """On failure, print what systemd and the journal say about the units."""
    try:
        yield
    except BaseException:
        print(box.run("systemctl status 'heartbeatd*' --no-pager; journalctl -u heartbeatd --no-pager -n 100; "
                      "journalctl -u 'heartbeatd-*' --no-pager -n 30", check=False).stdout)
        raise


EDITOR = "/usr/local/bin/hb-test-editor"


def _quick_start(box: nspawn.Container, deb: Path, servers: Backends) -> None:
    """README's quick start, each command as written, run by a user with sudo in the directory holding dist/.

    The one substitution, here and visible: the editor sudoedit opens sets DATABASE_URL and REDIS_URL to
    this container's servers, as the operator types them. apt's "Do you want to continue?" is answered Y.
    """
    # The root file system lacks the daemon's dependencies: apt must find every one from Depends:.
    assert box.run("dpkg -s python3-sdnotify", check=False).returncode != 0
    # sudo, and man-db as on any ordinary Debian host (`systemd-analyze verify` runs man for Documentation=).
    box.apt_install("sudo man-db")
    # As Debian's installer writes it (sudo looks the host name up).
    box.run('grep -qw "$(hostname)" /etc/hosts || echo "127.0.1.1 $(hostname)" >> /etc/hosts')
    box.run("useradd -m -s /bin/sh admin && echo 'admin ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/admin"
            " && install -d -o admin /home/admin/dist")
    box.copy_in(deb, f"/home/admin/dist/{deb.name}")
    if box.private_network:  # apt's cache filled through the host's network: the container's own has no route
        box.run(f"apt-get -o APT::Sandbox::User=root install -y --download-only /home/admin/dist/{deb.name}",
                timeout=600, host_network=True)
    box.run(f"cat > {EDITOR} && chmod 755 {EDITOR}", input=(
        "#!/bin/sh\n"
        f"sed -i 's|^DATABASE_URL=.*|DATABASE_URL={servers.database_url}|; "
        f"s|^REDIS_URL=.*|REDIS_URL={servers.redis_url}|' \"$1\"\n"))
    started = time.time()
    for line in readme_block("quick-start"):
        command = (f"runuser -u admin -- env HOME=/home/admin SUDO_EDITOR={EDITOR} "
                   f"sh -c {shlex.quote('cd && ' + line)}")
        if "journalctl" in line or "heartbeatd status" in line:
            # The operator looks again a moment later if the first cycle has not written yet.
            wait(lambda: _shows_three_services(box, command), 20, f"README's `{line}` to show the three services")
        else:
            box.run(command, input="y\n", timeout=600)
        if line.startswith("sudo apt install"):
            _installed_but_not_started(box)
    status = box.run(f"heartbeatd status --env-file {ENV_FILE}").stdout
    assert {line.split("\t")[0] for line in status.splitlines()} == {"后端", "redis", "postgres"}, status
    assert all(line.endswith("\tfresh") for line in status.splitlines()), status
    assert box.run("systemctl is-enabled heartbeatd").stdout.strip() == "enabled"
    assert _rows_since(servers, started - 1) == {"后端", "redis", "postgres"}
    # sudoedit wrote the file back in place: still the passwords' owner and mode.
    assert box.run(f"stat -c %U:%G:%a {ENV_FILE}").stdout.strip() == "root:heartbeatd-conf:640"


def _shows_three_services(box: nspawn.Container, command: str) -> bool:
    """The command succeeds and, if it reads the journal, shows a heartbeat recorded for each service."""
    result = box.run(command, check=False)
    return result.returncode == 0 and (
        "journalctl" not in command or all(f"记录心跳成功 - 服务: {s}" in result.stdout for s in ("后端", "redis", "postgres")))


def _installed_but_not_started(box: nspawn.Container) -> None:
    """Right after `apt install`: every dependency from Depends:, documentation shipped, nothing started."""
    for dep in ("python3-psycopg2", "python3-redis", "python3-dotenv", "python3-sdnotify"):
        assert box.run(f"dpkg -s {dep}", check=False).returncode == 0, dep
    for doc in _show(box, "Documentation").replace('"', "").split():
        if doc.startswith("man:"):
            name, section = doc[4:].rstrip(")").split("(")
            box.run(f"test -f /usr/share/man/man{section}/{name}.{section}.gz && man -w {section} {name}")
        else:
            assert doc.startswith("file://"), doc
            box.run(f"test -f {doc[7:]}")
    assert box.run("systemctl is-enabled heartbeatd", check=False).stdout.strip() == "disabled"
    assert box.run("systemctl is-active heartbeatd", check=False).stdout.strip() == "inactive"
    verify = box.run("systemd-analyze verify /lib/systemd/system/heartbeatd.service "
                     "/lib/systemd/system/heartbeatd-prune.service /lib/systemd/system/heartbeatd-prune.timer "
                     "/lib/systemd/system/heartbeatd-status.service /lib/systemd/system/heartbeatd-status.timer",
                     check=False)
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stdout + verify.stderr
    for timer in ("heartbeatd-prune.timer", "heartbeatd-status.timer"):
        assert box.run(f"systemctl is-enabled {timer}", check=False).stdout.strip() == "disabled"
    assert box.run("stat -c %U:%G:%a /etc/heartbeatd/heartbeatd.env").stdout.strip() == "root:heartbeatd-conf:640"


def _show(box: nspawn.Container, prop: str, unit: str = "heartbeatd") -> str:
    return box.run(f"systemctl show -p {prop} --value {unit}").stdout.strip()


def _journal(box: nspawn.Container, args: str = "") -> str:
    return box.run(f"journalctl -u heartbeatd -o cat --no-pager {args}").stdout


def _rows_since(servers: Backends, epoch: float) -> set[str]:
    found = servers.sql("SELECT DISTINCT service_name FROM service_heartbeat WHERE created_at > "
                        f"to_timestamp({epoch:.6f}) AT TIME ZONE 'utc'")
    return {r[0] for r in found}


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


def _operate(box: nspawn.Container, servers: Backends, backend_ip: str) -> None:
    """After the quick start: a short interval, the journal's priorities, reload, the textfile, the backend
    check, the watchdog, a bad configuration."""
    def show(prop: str) -> str:
        return _show(box, prop)

    def journal(args: str = "") -> str:
        return _journal(box, args)

    def rows_since(epoch: float) -> set[str]:
        return _rows_since(servers, epoch)

    env_file = ENV_FILE
    box.run(f"sed -i 's|^HEARTBEAT_INTERVAL=.*|HEARTBEAT_INTERVAL=2|; s|^HEARTBEAT_TIMEOUT=.*|HEARTBEAT_TIMEOUT=1|' "
            f"{env_file}")
    # A shorter watchdog keeps the test short: 3 x HEARTBEAT_TIMEOUT (1 s) <= 6 s / 2.
    box.run("mkdir -p /etc/systemd/system/heartbeatd.service.d && printf '[Service]\\nWatchdogSec=6s\\n' "
            "> /etc/systemd/system/heartbeatd.service.d/test.conf && systemctl daemon-reload")
    box.run("systemctl restart heartbeatd", timeout=60)  # returns once READY=1 arrived
    wait(lambda: "next in 2" in show("StatusText") or "next in 1" in show("StatusText"), 20, "the 2 s interval")
    assert re.fullmatch(r"后端 up, redis up, postgres up; next in [0-9.]+s", show("StatusText")), show("StatusText")
    # PostgreSQL is on loopback, so 后端 is the default-route interface's address: found under
    # ProcSubset=pid and the address-family and system-call filters (the container shares our network,
    # or has only a loopback of its own).
    backend_ips = {r[0] for r in servers.sql("SELECT DISTINCT ip_address FROM service_heartbeat WHERE service_name = '后端'")}
    assert backend_ips == {backend_ip}
    assert show("User") == "heartbeatd" and show("SupplementaryGroups") == "heartbeatd-conf"

    # Warnings and errors carry their priority: -p warning shows them and no info lines.
    servers.stop_redis()
    wait(lambda: "Redis连接测试失败" in journal(), 20, "the Redis failure in the journal")
    servers.start_redis()
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
    restarts = int(show("NRestarts"))
    box.run(f"kill -STOP {main_pid}")
    wait(lambda: "Watchdog timeout" in box.run("journalctl -u heartbeatd --no-pager").stdout, 30, "Watchdog timeout")
    wait(lambda: show("NRestarts") == str(restarts + 1) and show("ActiveState") == "active", 40, "the restart")
    assert show("MainPID") != main_pid
    resumed = time.time()
    wait(lambda: rows_since(resumed) == {"后端", "redis", "postgres"}, 20, "heartbeats after the restart")

    # A bad config: the unit fails once with status 78 and is not restarted.
    box.run(f"sed -i 's|^HEARTBEAT_INTERVAL=.*|HEARTBEAT_INTERVAL=soon|' {env_file}")
    assert box.run("systemctl restart heartbeatd", check=False).returncode != 0
    wait(lambda: show("ActiveState") == "failed", 15, "the failed state")
    assert show("ExecMainStatus") == "78"
    restarts = int(show("NRestarts"))
    time.sleep(7)  # longer than RestartSec=5s
    assert show("ActiveState") == "failed" and show("NRestarts") == str(restarts)
    assert f"HEARTBEAT_INTERVAL (from {env_file}): not a number: 'soon'" in journal()
    box.run(f"sed -i 's|^HEARTBEAT_INTERVAL=.*|HEARTBEAT_INTERVAL=1|' {env_file}")
    box.run("systemctl reset-failed heartbeatd && systemctl start heartbeatd", timeout=60)


def _prune_and_stop(box: nspawn.Container, servers: Backends) -> None:
    """Retention by the shipped prune service, its timer enabled; then `systemctl stop` is a clean exit."""
    servers.sql("INSERT INTO service_heartbeat (service_name, ip_address, report_time, created_at) SELECT '后端', "
                "'10.9.9.9', now() AT TIME ZONE 'utc' - interval '40 days' + i * interval '1 s', now() "
                "FROM generate_series(1, 1234) i")
    recent = int(servers.sql("SELECT count(*) FROM service_heartbeat WHERE ip_address <> '10.9.9.9'")[0][0])
    box.run(f"echo 'HEARTBEAT_RETENTION=30d' >> {ENV_FILE}")
    box.run("systemctl start heartbeatd-prune.service", timeout=120)
    assert servers.sql("SELECT count(*) FROM service_heartbeat WHERE ip_address = '10.9.9.9'") == [("0",)]
    assert int(servers.sql("SELECT count(*) FROM service_heartbeat WHERE ip_address <> '10.9.9.9'")[0][0]) >= recent
    pruned = box.run("journalctl -u heartbeatd-prune -o cat --no-pager").stdout
    assert "removed 1234 row(s) older than" in pruned, pruned
    box.run("systemctl enable --now heartbeatd-prune.timer")
    assert box.run("systemctl is-active heartbeatd-prune.timer").stdout.strip() == "active"

    box.run("systemctl stop heartbeatd", timeout=30)
    assert _show(box, "ActiveState") == "inactive"
    assert _show(box, "Result") == "success" and _show(box, "ExecMainStatus") == "0"
    assert "停止服务心跳检查定时任务 (SIGTERM)" in _journal(box)


REPLICA_CONF = """include /etc/valkey/valkey.conf
bind 127.0.0.2
replicaof 127.0.0.1 6379
replica-announce-ip 127.0.0.2
pidfile /run/valkey-replica/valkey-server.pid
logfile /var/log/valkey/valkey-server-replica.log
dbfilename dump-replica.rdb
"""


def _sentinel_failover(box: nspawn.Container, servers: Backends) -> None:
    """REDIS_URL=redis+sentinel:// on valkey-sentinel: the redis rows follow one failover to the new master."""
    # A replica on 127.0.0.2 (the same port, another address), then the packaged sentinel, which
    # monitors mymaster at 127.0.0.1:6379 and finds the replica through it.
    box.run("cat > /etc/valkey/valkey-replica.conf && chown valkey:valkey /etc/valkey/valkey-replica.conf"
            " && systemctl start valkey-server@replica", input=REPLICA_CONF)
    wait(lambda: "master_link_status:up" in box.run("valkey-cli -h 127.0.0.2 INFO replication").stdout, 30,
         "the replica in sync")
    box.run("systemctl restart valkey-sentinel")  # asks the master for its replicas at once
    wait(lambda: "127.0.0.2" in box.run("valkey-cli -p 26379 SENTINEL replicas mymaster").stdout, 30,
         "the sentinel knowing the replica")

    def redis_ips_since(epoch: float) -> set[str]:
        return {r[0] for r in servers.sql("SELECT DISTINCT ip_address FROM service_heartbeat WHERE service_name = "
                                          f"'redis' AND created_at > to_timestamp({epoch:.6f}) AT TIME ZONE 'utc'")}

    box.run(f"sed -i 's|^REDIS_URL=.*|REDIS_URL=redis+sentinel://127.0.0.1:26379/mymaster/0|' {ENV_FILE}"
            " && systemctl reload heartbeatd")
    reloaded = time.time()
    wait(lambda: redis_ips_since(reloaded) == {"127.0.0.1"}, 20, "redis rows of the master through the sentinel")
    box.run("valkey-cli -p 26379 SENTINEL FAILOVER mymaster")
    wait(lambda: box.run("valkey-cli -p 26379 SENTINEL get-master-addr-by-name mymaster").stdout.split()[:1]
         == ["127.0.0.2"], 30, "the failover")
    failed_over = time.time()
    wait(lambda: redis_ips_since(failed_over + 1) == {"127.0.0.2"}, 20, "redis rows of the new master")
    assert _show(box, "ActiveState") == "active"
    assert re.fullmatch(r"后端 up, redis up, postgres up; next in [0-9.]+s", _show(box, "StatusText"))
    # Back to the plain URL of the old master (now a replica, but it answers PING) for what follows.
    box.run(f"sed -i 's|^REDIS_URL=.*|REDIS_URL={servers.redis_url}|' {ENV_FILE} && systemctl reload heartbeatd")


def _status_timer(box: nspawn.Container) -> None:
    """heartbeatd-status.timer under systemd: enabled, it fires and writes its file; a failure shows in
    `systemctl status heartbeatd-status.service`."""
    prom = "/var/lib/prometheus/node-exporter/heartbeatd-ledger.prom"  # the directory _textfile made writable
    box.run("systemctl enable --now heartbeatd-status.timer")
    assert box.run("systemctl is-enabled heartbeatd-status.timer").stdout.strip() == "enabled"
    # As shipped: OnBootSec=30s (long past or soon), then every 30 s.
    wait(lambda: box.run(f"test -s {prom}", check=False).returncode == 0, 40, "the status timer's first file")
    text = box.run(f"cat {prom}").stdout
    assert re.search(r'^heartbeatd_ledger_stale\{service="postgres",ip="127\.0\.0\.1"\} [01]$', text, re.M), text
    assert _show(box, "Result", "heartbeatd-status.service") == "success"
    assert _show(box, "LastTriggerUSec", "heartbeatd-status.timer") not in ("", "n/a")
    # Only to keep the test short: the next run 2 s after the last instead of 30 s.
    box.run("mkdir -p /etc/systemd/system/heartbeatd-status.timer.d && printf '[Timer]\\nOnUnitActiveSec=\\n"
            "OnUnitActiveSec=2s\\n' > /etc/systemd/system/heartbeatd-status.timer.d/test.conf"
            " && systemctl daemon-reload && systemctl restart heartbeatd-status.timer")
    box.run("systemctl stop postgresql@17-main")
    wait(lambda: _show(box, "Result", "heartbeatd-status.service") == "exit-code", 30, "the timer's failed run")
    status = box.run("systemctl status heartbeatd-status.service --no-pager", check=False).stdout
    assert "failed (Result: exit-code)" in status, status
    assert "status=69" in status, status  # EX_UNAVAILABLE: the database did not answer
    # The command's own line, naming where it failed to connect.
    assert re.search(r"heartbeatd\[[0-9]+\]: heartbeatd: .*127\.0\.0\.1:5432", status), status
    box.run("systemctl start postgresql@17-main")
    wait(lambda: _show(box, "Result", "heartbeatd-status.service") == "success", 30, "the timer's run succeeding again")
    assert box.run("systemctl is-active heartbeatd-status.timer").stdout.strip() == "active"


@pytest.fixture(scope="module")
def previous_deb() -> Path:
    """The .deb of the release before this one, built from the commit just before the changelog first named
    this release (HEAD while that entry is not committed): a release's series starts with its entry. Cached."""
    changelog = "packaging/debian/changelog"

    def version(ref: str) -> str:
        text = subprocess.run(["git", "show", f"{ref}:{changelog}"], cwd=TOP, capture_output=True, text=True,
                              check=True).stdout
        return text.split("(", 1)[1].split(")", 1)[0]

    current = subprocess.run(["dpkg-parsechangelog", "-l", str(TOP / changelog), "-S", "Version"],
                             capture_output=True, text=True, check=True).stdout.strip()
    commit = "HEAD"
    for c in subprocess.run(["git", "log", "--format=%H", "--", changelog], cwd=TOP, capture_output=True, text=True,
                            check=True).stdout.split():
        if version(c) != current:
            break
        commit = f"{c}^"
    commit = subprocess.run(["git", "rev-parse", commit], cwd=TOP, capture_output=True, text=True,
                            check=True).stdout.strip()
    previous = version(commit)
    assert previous != current, f"no release before {current} in the history"
    cached = nspawn.CACHE / "debs" / f"heartbeatd_{previous}_{commit[:12]}_all.deb"
    if cached.exists():
        return cached
    with tempfile.TemporaryDirectory(prefix="hb-previous-") as tmp:
        subprocess.run(["git", "clone", "-q", "--no-checkout", str(TOP), tmp], check=True, timeout=120)
        subprocess.run(["git", "checkout", "-q", commit], cwd=tmp, check=True)
        result = subprocess.run([f"{tmp}/packaging/build-deb"], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(result.stdout.split()[-1], cached)
    return cached


SPOOLED_KEYS = ("import sqlite3; db = sqlite3.connect('/var/lib/heartbeatd/spool.db'); "
                "[print(*r, sep='|') for r in db.execute('SELECT service_name, ip_address, report_time FROM spool')]")


def _spooled(box: nspawn.Container) -> list[tuple[str, ...]]:
    """The rows in the daemon's spool, as the service user reads them (service, ip, report_time)."""
    out = box.run(f"runuser -u heartbeatd -- python3 -c {shlex.quote(SPOOLED_KEYS)}").stdout
    return [tuple(line.split("|")) for line in out.splitlines()]


def test_upgrade_from_the_previous_release_with_rows_spooled_then_purge(deb: Path, previous_deb: Path) -> None:
    pg = PgServer().start()
    redis = RedisServer().start()
    try:
        with booted("bookworm") as box, _diagnostics(box):
            _upgrade_and_purge(box, deb, previous_deb, pg, redis)
    finally:
        redis.destroy()
        pg.destroy()


def _upgrade_and_purge(box: nspawn.Container, deb: Path, previous_deb: Path, pg: PgServer, redis: RedisServer) -> None:
    def spooled_status() -> bool:
        return re.search(r"; [1-9][0-9]* spooled", _show(box, "StatusText")) is not None

    box.copy_in(previous_deb, "/tmp/previous.deb")
    box.apt_install("/tmp/previous.deb")
    box.run(f"sed -i 's|^DATABASE_URL=.*|DATABASE_URL={pg.url()}|; s|^REDIS_URL=.*|REDIS_URL={redis.url()}|; "
            f"s|^HEARTBEAT_INTERVAL=.*|HEARTBEAT_INTERVAL=1|; s|^HEARTBEAT_TIMEOUT=.*|HEARTBEAT_TIMEOUT=1|' {ENV_FILE}")
    box.run(f"heartbeatd init-db --env-file {ENV_FILE} && systemctl enable --now heartbeatd", timeout=60)
    wait(lambda: "postgres up" in _show(box, "StatusText"), 20, "the previous release's daemon writing")

    # PostgreSQL goes away while the daemon runs: rows are spooled; then the upgrade.
    pg.stop()
    wait(lambda: len(_spooled(box)) >= 6, 20, "rows spooled")
    old_pid = _show(box, "MainPID")
    box.copy_in(deb, "/tmp/new.deb")
    # The env file is edited: dpkg would ask whether to replace it if the new package's differs; keep it.
    box.apt_install("-o Dpkg::Options::=--force-confold /tmp/new.deb")
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    assert box.run("dpkg-query -W -f '${Version}' heartbeatd").stdout == version
    # The daemon came back, the new one, on the same spool.
    wait(lambda: _show(box, "ActiveState") == "active", 30, "the daemon after the upgrade")
    assert _show(box, "MainPID") not in (old_pid, "0")
    assert f"heartbeatd {version}" == box.run("heartbeatd --version").stdout.strip()
    held = _spooled(box)
    assert len(held) >= 6
    pg.start()
    wait(lambda: not spooled_status() and "postgres up" in _show(box, "StatusText"), 30, "the spool written")
    missing = [key for key in held if pg.sql(
        "SELECT count(*) FROM service_heartbeat WHERE service_name = %s AND ip_address = %s "
        "AND report_time = (%s::timestamptz AT TIME ZONE 'utc')", key) != [(1,)]]
    assert missing == [], f"{len(missing)} of {len(held)} spooled rows not in the table once: {missing[:5]}"
    assert _spooled(box) == []

    _purge(box, pg)


def _purge(box: nspawn.Container, pg: PgServer) -> None:
    """Purge with rows unsent keeps the spool and says so; written, then purged, nothing is left."""
    pg.stop()
    wait(lambda: len(_spooled(box)) >= 3, 20, "rows spooled again")
    purge = box.run("DEBIAN_FRONTEND=noninteractive apt-get purge -y heartbeatd 2>&1", timeout=300).stdout
    assert box.run("dpkg-query -W -f '${db:Status-Status}' heartbeatd", check=False).stdout in ("", "not-installed")
    assert re.search(r"heartbeatd: WARNING: /var/lib/heartbeatd/spool.db holds [0-9]+ heartbeat row\(s\) not yet "
                     r"written to PostgreSQL and 0 set aside: /var/lib/heartbeatd is NOT deleted\.", purge), purge
    assert "rm -r /var/lib/heartbeatd" in purge
    kept = _spooled(box)
    assert len(kept) >= 3
    assert box.run("test -e /etc/heartbeatd/heartbeatd.env", check=False).returncode != 0  # the rest is purged

    # README's way to write them: install again, start, wait until nothing is spooled; then purge.
    box.apt_install("/tmp/new.deb")
    box.run(f"sed -i 's|^DATABASE_URL=.*|DATABASE_URL={pg.url()}|' {ENV_FILE}")
    pg.start()
    box.run("systemctl start heartbeatd", timeout=60)
    wait(lambda: _spooled(box) == [], 30, "the kept spool written")
    assert all(pg.sql("SELECT count(*) FROM service_heartbeat WHERE service_name = %s AND ip_address = %s "
                      "AND report_time = (%s::timestamptz AT TIME ZONE 'utc')", key) == [(1,)] for key in kept)
    purge = box.run("DEBIAN_FRONTEND=noninteractive apt-get purge -y heartbeatd 2>&1", timeout=300).stdout
    assert "WARNING" not in purge, purge
    assert box.run("test -e /var/lib/heartbeatd", check=False).returncode != 0, "purge left /var/lib/heartbeatd"
