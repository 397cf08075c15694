"""A Debian container (bookworm or trixie) with systemd as PID 1, booted with systemd-nspawn, for end-to-end tests.

Each release's root file system is built once with debootstrap and cached outside the clone; the container
runs it with --volatile=overlay so the cache is never written. It shares the host's network, so
the daemon inside reaches the test's private servers on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

CACHE = Path("/var/cache/heartbeatd-e2e")
# The Debian releases the end-to-end test runs on: today's stable and the one before it.
RELEASES = ("bookworm", "trixie")
# systemd as PID 1 and python3 for the stand-in backend - but none of the .deb's dependencies:
# `apt-get install ./heartbeatd_*.deb` must find them through its Depends: line, or the test fails.
INCLUDE = ["systemd", "systemd-sysv", "dbus", "python3"]
# Trixie's own servers, which its end-to-end test runs inside the container (see private_network):
# installed once into the cached root file system by trixie's apt and dpkg, not at every run.
SERVERS = {"trixie": ["postgresql-17", "valkey-server", "valkey-sentinel"]}
CGROUP_TREES = ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified")
# On a host with hybrid cgroups, nspawn gives the container the legacy (v1) hierarchy. Trixie's systemd 257
# still boots on it but deprecated and tainted ("cgroupsv1"), which no trixie host runs: give it the unified
# (v2) hierarchy, as trixie boots by default, so the unit's hardening is applied as it is there.
NSPAWN_ENV = {"trixie": {"SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}}
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def apt_binds(release: str) -> dict[Path, str]:
    """apt's downloads and package lists, kept between runs and apart per release (the root file system itself
    is never written)."""
    return {CACHE / f"apt-archives-{release}": "/var/cache/apt/archives",
            CACHE / f"apt-lists-{release}": "/var/lib/apt/lists"}


def apt_mirror() -> str:
    """The Debian mirror this machine's apt already uses."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    for line in Path("/etc/apt/sources.list").read_text().splitlines():
        if line.startswith("deb ") and "security" not in line:
            return line.split()[1]
    raise RuntimeError("no Debian mirror found in apt's sources")


def rootfs(release: str = "bookworm") -> Path:
    """The cached root file system of `release`, built on first use (a minute or three, 300-400 MB)."""
    include = INCLUDE + SERVERS.get(release, [])
    key = hashlib.sha256(",".join(include).encode()).hexdigest()[:12]
    path = CACHE / f"{release}-{key}"
    if (path / ".complete").exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = CACHE / f"partial-{uuid.uuid4().hex[:8]}"
    try:
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(include)}", release, str(partial),
                        apt_mirror()], check=True, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PATH=PATH))
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise RuntimeError(f"debootstrap failed:\n{exc.stdout[-3000:]}\n{exc.stderr[-3000:]}") from exc
    # pg_createcluster chose its port in the host's network, where 5432 may be taken: the container's is free.
    for conf in partial.glob("etc/postgresql/*/main/postgresql.conf"):
        conf.write_text(re.sub(r"^port = [0-9]+", "port = 5432", conf.read_text(), flags=re.M))
    (partial / ".complete").write_text("debootstrap finished\n")
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)
    return path


class Container:
    """One booted container; `run` executes a command inside it with nsenter."""

    def __init__(self, release: str = "bookworm", private_network: bool = False) -> None:
        self.release = release
        self.private_network = private_network
        root = rootfs(release)
        self.name = f"hb-e2e-{uuid.uuid4().hex[:8]}"
        # nspawn --keep-unit would otherwise leave its payload at the top of the host's cgroup
        # trees: give it cgroups of its own, removed afterwards.
        self.cgroups = [Path(tree) / self.name for tree in CGROUP_TREES if Path(tree).is_dir()]
        for cgroup in self.cgroups:
            cgroup.mkdir()
        self.log = tempfile.NamedTemporaryFile("w", prefix=f"{self.name}-console-", suffix=".log", delete=False)
        procs = [str(c / "cgroup.procs") for c in self.cgroups]

        def enter_cgroups() -> None:
            for path in procs:
                with open(path, "w") as f:
                    f.write(str(os.getpid()))

        binds = []
        for host, inside in apt_binds(release).items():
            (host / "partial").mkdir(parents=True, exist_ok=True)
            binds.append(f"--bind={host}:{inside}")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-D", str(root), "-M", self.name, "--register=no", "--keep-unit",
             "--volatile=overlay", "--console=read-only", *binds,
             *(["--private-network"] if private_network else []), "-b"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=enter_cgroups,
            env=dict(os.environ, PATH=PATH, **NSPAWN_ENV.get(release, {})))
        self.pid = self._find_init()

    def _find_init(self, timeout: float = 60) -> int:
        """The container's PID 1 as the host sees it: a descendant of nspawn whose NSpid ends in 1."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self.proc.returncode}: "
                                   f"{Path(self.log.name).read_text()[-3000:]}")
            for cgroup in self.cgroups[:1]:
                for pid in _cgroup_pids(cgroup):
                    try:
                        status = Path(f"/proc/{pid}/status").read_text()
                    except OSError:
                        continue
                    nspid = [line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")]
                    # Until it has exec'd systemd, PID 1 is still nspawn's inner child setting up.
                    if nspid and len(nspid[0]) > 1 and nspid[0][-1] == "1" and status.startswith("Name:\tsystemd\n"):
                        return pid
            time.sleep(0.1)
        raise RuntimeError("the container's init did not appear")

    def run(self, command: str, check: bool = True, input: Optional[str] = None,
            timeout: float = 120, host_network: bool = False) -> subprocess.CompletedProcess[str]:
        """Run a shell command inside the container, as root, with a clean environment (and, with host_network,
        in the host's network namespace rather than the container's)."""
        spaces = ["-m", "-u", "-i", "-p", "-C"] if host_network else ["-a"]
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid), *spaces, "env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", "SYSTEMD_PAGER=",
             "sh", "-c", command],
            input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"`{command}` exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def apt_install(self, what: str) -> str:
        """`apt-get install -y WHAT` inside, fetching lists at most once a day (cached across runs)."""
        lists = CACHE / f"apt-lists-{self.release}"
        fresh = [p for p in lists.glob("*Packages*") if time.time() - p.stat().st_mtime < 86400]
        opts = "-o Acquire::Check-Valid-Until=false -o APT::Sandbox::User=root"
        if not fresh:
            self.run(f"apt-get {opts} update -qq", timeout=600, host_network=True)
        install = f"DEBIAN_FRONTEND=noninteractive apt-get {opts} install -y --no-install-recommends {what}"
        if self.private_network:
            # Downloads through the host's network; the maintainer scripts run in the container's own
            # (pg_createcluster picks the first port free *there*: 5432, not the host's next one).
            self.run(f"{install} --download-only", timeout=900, host_network=True)
            install += " --no-download"
        return self.run(install, timeout=900).stdout

    def copy_in(self, source: Path, dest: str) -> None:
        """Copy a host file into the container."""
        subprocess.run(["nsenter", "-t", str(self.pid), "-a", "sh", "-c", f"cat > {dest}"],
                       stdin=open(source, "rb"), check=True, timeout=60)

    def wait_booted(self, timeout: float = 120) -> str:
        """Wait for `systemctl is-system-running --wait`; return its state."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.run("systemctl is-system-running --wait", check=False, timeout=timeout)
            state = result.stdout.strip()
            # Before the container's manager is listening, systemctl answers nothing, or "offline"
            # (it could not reach PID 1 yet): ask again.
            if (state and state != "offline") or time.monotonic() > deadline:
                return state or f"no answer: {result.stderr.strip()}"
            time.sleep(0.2)

    def poweroff(self) -> None:
        """Shut the container down (SIGRTMIN+4 to its systemd), then make sure nothing is left."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGRTMIN + 4)
                self.proc.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(30)
        for cgroup in self.cgroups:
            for pid in _cgroup_pids(cgroup):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for cgroup in self.cgroups:
            _remove_cgroup(cgroup)
        self.log.close()
        os.unlink(self.log.name)


def _cgroup_pids(cgroup: Path) -> list[int]:
    pids: list[int] = []
    for procs in cgroup.rglob("cgroup.procs"):
        try:
            pids += [int(p) for p in procs.read_text().split()]
        except OSError:
            pass
    return pids


def _remove_cgroup(cgroup: Path) -> None:
    """rmdir the tree bottom-up once its processes are gone."""
    deadline = time.monotonic() + 10
    while cgroup.exists() and time.monotonic() < deadline:
        for sub in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            try:
                sub.rmdir()
            except OSError:
                pass
        try:
            cgroup.rmdir()
        except OSError:
            time.sleep(0.2)
