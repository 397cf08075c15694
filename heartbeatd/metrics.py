"""node_exporter's textfile collector: the daemon's view after every cycle, as a `.prom` file.

heartbeatd opens no port. With HEARTBEAT_TEXTFILE set, the daemon rewrites that file after every
cycle (a temporary file in the same directory, then rename: node_exporter never reads half of
one), in Prometheus' text exposition format. The format is written here by hand: a dozen lines
a cycle need no library (prometheus_client would add a dependency and its registry's cost to
every cycle). A file that cannot be written is one ERROR a minute and never touches the
heartbeats.
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

from heartbeatd import __version__
from heartbeatd.heartbeat import ProbeResult, utcnow
from heartbeatd.repeats import Repeats, log

if TYPE_CHECKING:
    from heartbeatd.cycle import Cycle, CycleOutcome

Sample = tuple[str, float]  # (labels as written inside the braces, or "", value)
Family = tuple[str, str, str, Sequence[Sample]]  # (name, type, help, samples)


def label(value: str) -> str:
    """A label value escaped as the exposition format wants: backslash, double quote, newline."""
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def labels(**pairs: str) -> str:
    """`service="redis",ip="10.0.0.5"`: what goes inside a sample's braces."""
    return ",".join(f'{name}="{label(value)}"' for name, value in pairs.items())


@functools.lru_cache(maxsize=256)
def _service_ip(service: str, ip: str) -> str:
    return labels(service=service, ip=ip)


@functools.lru_cache(maxsize=256)
def _service(service: str) -> str:
    return labels(service=service)


def number(value: float) -> str:
    """A sample value: integers without a fraction, others as Python's shortest repr."""
    if isinstance(value, _Marker):
        return "\x00r"
    if value != value:  # NaN
        return "NaN"
    return str(int(value)) if value == int(value) and abs(value) < 1e15 else repr(float(value))


def exposition(families: Iterable[Family]) -> str:
    """The text exposition format: `# HELP` and `# TYPE` once per family, then its samples, no timestamps."""
    out: list[str] = []
    for name, kind, text, samples in families:
        out.append(f"# HELP {name} {text.replace(chr(92), chr(92) * 2).replace(chr(10), chr(92) + 'n')}\n"
                   f"# TYPE {name} {kind}\n")
        out.extend(f"{name}{{{where}}} {number(value)}\n" if where else f"{name} {number(value)}\n"
                   for where, value in samples)
    return "".join(out)


def temporary_name(path: Path) -> str:
    """Where `write_atomically` writes first: the same directory, a name node_exporter does not read."""
    return str(path.with_name(f".{path.name}.{os.getpid()}.tmp"))


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_atomically(path: "str | bytes | os.PathLike[str]", text: "str | bytes", tmp: "str | bytes | None" = None,
                     chmod: bool = True) -> None:
    """Write `path` through a temporary file in the same directory and a rename; 0644 whatever the umask.

    node_exporter runs as another user and reads only `*.prom`: the temporary name does not end so.
    The temporary file is always a new one (O_EXCL, O_NOFOLLOW): whoever else may write that
    directory cannot plant a link there that we would write through. `chmod=False` when the caller
    knows the umask leaves a new file 0644.
    """
    tmp = tmp or temporary_name(Path(os.fsdecode(path)))
    try:
        fd = os.open(tmp, _CREATE, 0o644)
    except FileExistsError:  # left by a write that was killed, or planted: removed, never followed
        os.unlink(tmp)
        fd = os.open(tmp, _CREATE, 0o644)
    try:
        try:
            if chmod:
                os.fchmod(fd, 0o644)
            data = text.encode() if isinstance(text, str) else text
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files of writers of `path` that are gone (a daemon SIGKILLed mid-write)."""
    for found in path.parent.glob(f".{path.name}.*.tmp"):
        pid = found.name[len(path.name) + 2:-4]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            try:
                found.unlink()
            except OSError:
                pass
        except OSError:  # alive, another user's
            pass


def umask_keeps_0644() -> bool:
    """Whether files this process creates 0644 stay 0644 (no fchmod needed). Not thread-safe: a moment's umask(0)."""
    mask = os.umask(0)
    os.umask(mask)
    return not mask & 0o644


_DISK, _MEMORY, _VERSION = labels(where="disk"), labels(where="memory"), labels(version=__version__)
# How each family's numbers go into the template: durations with six decimals; times since the epoch
# as bytes made once a cycle (a float of sixteen digits through dtoa costs more than the rest of the
# file); everything else a whole number.
_FORMATS = {"heartbeatd_check_duration_seconds": b"%.6f", "heartbeatd_last_success_timestamp_seconds": b"%s",
            "heartbeatd_cycle_timestamp_seconds": b"%s"}


# A ProbeResult's fields by C getters, and zeros for dict.get's default: map() over them builds
# a cycle's numbers with no comprehension's frame.
_OK, _LATENCY = (operator.itemgetter(ProbeResult._fields.index(f)) for f in ("ok", "latency"))
_ZEROS = itertools.repeat(0)


class _Marker(float):
    """A sample value that `number` writes as a NUL: where a template's fixed parts are split."""


_FLOAT = _Marker()


class Textfile:
    """The daemon's figures since it started, written to HEARTBEAT_TEXTFILE after every cycle.

    Every cycle writes the same lines with new numbers: `families` is rendered once into a bytes
    template with a `%d` or `%.6f` where each number goes, again only when the services, their
    addresses or the path change, and each cycle formats one flat tuple of numbers into it (one C
    call: the per-cycle instruction count in the README is its measure).
    """

    def __init__(self, path: Optional[Path], repeats: Repeats) -> None:
        self.path = path
        self._repeats = repeats
        # (the file's bytes with a format per number, the path and the temporary file's as bytes, fchmod needed)
        self._template: tuple[bytes, bytes, bytes, bool] = (b"", b"", b"", True)
        self._stale = True  # the services, their addresses or the path changed: build the template again
        self.written = 0  # rows inserted into the table (live and from the spool)
        self.write_failures = 0  # cycles whose write to the table failed
        self._writer: Any = None  # the writer whose `inserted` was last read (a reload makes a new one)
        self._inserted = 0
        self.last_success: dict[str, float] = {}  # service -> unix time of its last up result
        self._stamps: dict[str, bytes] = {}  # the same times, as the file writes them
        self._stamp = b"0"  # the last cycle's time, as the file writes it
        self.results: dict[str, ProbeResult] = {}  # service -> its last result

    def after(self, cycle: "Cycle", outcome: "CycleOutcome") -> None:
        """Take a cycle's figures and rewrite HEARTBEAT_TEXTFILE (a reload may have moved it)."""
        path = cycle.config.textfile
        if path is not self.path:  # identity: Path.__eq__ is Python code; a reload makes a new one anyway
            self.retarget(path)
        services, when = cycle.services, (outcome.report_time or utcnow()).timestamp()
        self.observe(outcome.results, when, outcome.write_error, services.writer)
        self.write(when, services.spool, cycle.checks.retried)

    def retarget(self, path: Optional[Path]) -> None:
        """HEARTBEAT_TEXTFILE moved or emptied (a reload): the old file goes, or its last figures
        would stand forever (and a moved one would give node_exporter every series twice)."""
        old, self.path, self._stale = self.path, path, True
        if old is not None and old != path:
            try:
                os.unlink(old)
            except OSError:
                pass

    def observe(self, results: Sequence[ProbeResult], when: float, write_error: Optional[str], writer: Any) -> None:
        """Take one cycle's figures (`when`: its report_time, unix seconds)."""
        last, seen, stamps = self.last_success, self.results, self._stamps
        self._stamp = now = b"%d.%06d" % divmod(int(when * 1e6 + 0.5), 1000000)
        # Unpacked, not read by name: a NamedTuple's field by name is a descriptor call each time.
        for result in results:
            service, ip, ok, _latency, _error, _retry = result
            before = seen.get(service)
            if before is None or before[1] != ip:
                self._stale = True
            seen[service] = result
            if ok:
                if service not in stamps:
                    self._stale = True
                last[service] = when
                stamps[service] = now
        if writer is not self._writer:
            self._writer, self._inserted = writer, 0
        inserted = writer.inserted if writer is not None else 0
        self.written += inserted - self._inserted
        self._inserted = inserted
        if write_error:
            self.write_failures += 1

    def families(self, when: float, spool: Any, retried: dict[str, int]) -> list[Family]:
        """Every metric family of the file, in a fixed order (`numbers` gives the same samples' values, flat)."""
        results = self.results.values()
        on_disk = spool.count - spool.in_memory if spool is not None else 0
        return [
            ("heartbeatd_build_info", "gauge", "heartbeatd's version; always 1.", [(_VERSION, 1)]),
            ("heartbeatd_up", "gauge", "Whether the service answered this host's last check (1) or not (0).",
             [(_service_ip(r.service, r.ip), 1 if r.ok else 0) for r in results]),
            ("heartbeatd_check_duration_seconds", "gauge", "How long the service's last check took.",
             [(_service(r.service), round(r.latency, 6)) for r in results]),
            ("heartbeatd_last_success_timestamp_seconds", "gauge",
             "When the service last answered a check (its row's report_time), in seconds since the epoch.",
             [(_service(s), t) for s, t in self.last_success.items()]),
            ("heartbeatd_cycle_timestamp_seconds", "gauge",
             "When the last cycle ran (its report_time), in seconds since the epoch.", [("", when)]),
            ("heartbeatd_spool_rows", "gauge",
             "Rows waiting in the local spool for PostgreSQL: in the file, or in memory only (the file unwritable).",
             [(_DISK, on_disk), (_MEMORY, spool.in_memory if spool else 0)]),
            ("heartbeatd_rejected_rows", "gauge",
             "Rows the table refused, kept aside in the spool (`heartbeatd rejected` lists them).",
             [("", spool.rejected if spool is not None else 0)]),
            ("heartbeatd_rows_written_total", "counter", "Rows inserted into the table since the daemon started.",
             [("", self.written)]),
            ("heartbeatd_write_failures_total", "counter",
             "Cycles since the daemon started whose write to the table was tried and failed (their rows were spooled).",
             [("", self.write_failures)]),
            ("heartbeatd_check_retries_total", "counter",
             "Quick retries of a check that failed fast (HEARTBEAT_RETRIES) since the daemon started.",
             [(_service(s), retried.get(s, 0)) for s in self.results]),
        ]

    def numbers(self, when: float, spool: Any, retried: dict[str, int]) -> tuple[Any, ...]:
        """The samples of `families` in the same order, without building the families (build_info is fixed)."""
        results = self.results.values()
        if spool is None:
            in_memory = on_disk = rejected = 0
        else:
            in_memory, rejected = spool.in_memory, spool.rejected
            on_disk = spool.count - in_memory
        return (*map(_OK, results), *map(_LATENCY, results), *self._stamps.values(), self._stamp, on_disk,
                in_memory, rejected, self.written, self.write_failures, *map(retried.get, self.results, _ZEROS))

    def _build(self, when: float, spool: Any, retried: dict[str, int]) -> tuple[bytes, bytes, bytes, bool]:
        """The file as a bytes %-template: the families rendered with a `%d` or `%.6f` for each number."""
        marked = [(name, kind, text, [(where, value if name == "heartbeatd_build_info" else _FLOAT)
                                      for where, value in samples])
                  for name, kind, text, samples in self.families(when, spool, retried)]
        formats = [_FORMATS.get(name, b"%d")
                   for name, _, _, samples in marked if name != "heartbeatd_build_info" for _ in samples]
        parts = [p.encode().replace(b"%", b"%%") for p in exposition(marked).split("\x00r")]
        template = parts[0] + b"".join(f + p for f, p in zip(formats, parts[1:]))
        # Paths as bytes, made here: a Path's __fspath__ is Python code, run at every os call.
        path = self.path or Path("/nonexistent/HEARTBEAT_TEXTFILE-is-empty.prom")  # never written: `after` sets it
        remove_stale_temporaries(path)
        return template, os.fsencode(path), os.fsencode(temporary_name(path)), not umask_keeps_0644()

    def render(self, when: float, spool: Any, retried: dict[str, int]) -> bytes:
        """The file's bytes: this cycle's numbers in the template for this shape of figures.

        Bytes throughout: encoding the whole text each cycle (后端 makes it UCS-2) and printing floats
        with repr cost more than everything else a cycle writes (callgrind).
        """
        if self._stale:
            self._template, self._stale = self._build(when, spool, retried), False
        return self._template[0] % self.numbers(when, spool, retried)

    def write(self, when: float, spool: Any, retried: dict[str, int]) -> None:
        """Rewrite the file; a failure is one ERROR a minute, and the heartbeats go on regardless."""
        try:
            text = self.render(when, spool, retried)
            _, path, tmp, chmod = self._template
            write_atomically(path, text, tmp, chmod)
        except Exception as exc:  # noqa: BLE001 - metrics must never cost a heartbeat
            self._repeats.failed("textfile", logging.ERROR,
                                 "指标文件写入失败 - cannot write HEARTBEAT_TEXTFILE %s: %s; the heartbeats are "
                                 "not affected", self.path, _why(exc), kind=type(exc).__name__)
            return
        if self._repeats.end("textfile", None):
            log.warning("指标文件写入恢复 - %s is written again", self.path)


def ledger_families(found: Sequence[Any], now: Any, stale_after: float, default: Any = None) -> list[Family]:
    """`status --format prometheus`: the ledger's view of every (service, ip), for the host that died; and the
    rows in the DEFAULT partition of a table partitioned by RANGE (report_time), where it has one."""
    pairs = [(labels(service=f.service, ip=str(f.ip)), f) for f in found]
    strays: list[Family] = [] if default is None or default.rows is None else [
        ("heartbeatd_ledger_default_partition_rows", "gauge",
         "Rows in the table's DEFAULT partition that a partition should hold (above 0: a partition is missing; "
         "heartbeatd status says who makes them).",
         [("", default.rows - default.older)]),
        ("heartbeatd_ledger_default_partition_backfill_rows", "gauge",
         "Rows in the table's DEFAULT partition older than its first partition and than a day (backfilled; "
         "none is missing).",
         [("", default.older)])]
    return [
        ("heartbeatd_ledger_heartbeat_age_seconds", "gauge",
         "Age of the newest heartbeat of the service at this address in the table.",
         [(where, round(f.age, 3)) for where, f in pairs]),
        ("heartbeatd_ledger_last_heartbeat_timestamp_seconds", "gauge",
         "report_time of that newest heartbeat, in seconds since the epoch (it ages right in a file left unchanged).",
         [(where, f.last.timestamp()) for where, f in pairs]),
        ("heartbeatd_ledger_stale", "gauge", "1 if that newest heartbeat is older than the staleness limit, or "
         "further ahead of the clock than it (a clock running ahead: not fresh), else 0.",
         [(where, 0 if f.fresh else 1) for where, f in pairs]),
        ("heartbeatd_ledger_stale_after_seconds", "gauge",
         "The staleness limit: 2 x HEARTBEAT_INTERVAL + HEARTBEAT_TIMEOUT.", [("", stale_after)]),
        ("heartbeatd_ledger_query_timestamp_seconds", "gauge",
         "When the ledger was read, in seconds since the epoch.", [("", now.timestamp())]),
    ] + strays  # no heartbeatd_build_info: node_exporter refuses one series from two files (this host's daemon writes it)


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {os.fsdecode(exc.filename)}" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}"
