"""The one door to libpq: a deadline on every wait, connect with per-host shares, error sentences.

libpq's own `connect_timeout` has a 2 s floor, applies per host, and does nothing once a
connection is established: a server that accepts TCP and then stalls (SIGSTOP'd postmaster,
a backend frozen mid-INSERT) would block a plain psycopg2 call forever. With a wait callback
installed psycopg2 drives libpq in non-blocking mode and asks us to wait for the socket, so
every wait is bounded by the deadline of the step in progress. The deadline belongs to the
thread that set it: a helper thread sets its own, and never runs under another's.

libpq is handed one host at a time, by address (`hostaddr=`, the name kept in `host=` for TLS
verification), each with its own share of the deadline: a frozen first host of several costs its
share, not the whole timeout, and the next one is still tried. The name lookups are ours and
bounded too; `target_session_attrs` is checked by libpq on each host as usual. The hosts and ports
are libpq's own complete reading (`heartbeatd.conninfo`): what the URL leaves out comes from the
PG* variables and the service file, as for psql; the rest (user, database, .pgpass, sslmode) libpq
applies itself on each attempt.
"""

from __future__ import annotations

import os
import re
import select
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import psycopg2
import psycopg2.extensions as ext
from psycopg2.extensions import POLL_OK, POLL_READ, POLL_WRITE

from heartbeatd import conninfo
from heartbeatd.config import SECRET_OPTIONS, ConfigError, mask, password_hint, url_secrets
from heartbeatd.heartbeat import normalize_ip
from heartbeatd.names import LookupFailed, Resolver, is_address

T = TypeVar("T")
# libpq: `connection to server at "10.0.0.5", port 5432 failed: ` - we name host:port ourselves.
_LIBPQ_PREFIX = re.compile(r'^connection to server (?:at "[^"]*"(?: \([^)]*\))?, port \d+|on socket "[^"]*") failed: ')


class DeadlineExceeded(psycopg2.OperationalError):
    """A libpq wait ran past the step's deadline; the connection must be discarded."""


# Each thread's (end, seconds) of the step in progress: `end` is the monotonic time the step must
# end by (None: no deadline), `seconds` its length, for the message. One attribute of a plain
# thread-local, read once per wait: the wait callback runs about ten times a cycle.
_state = threading.local()
_NONE: tuple[Optional[float], float] = (None, 0.0)
_state.d = _NONE


def _wait(conn: Any, _ok: int = POLL_OK, _read: int = POLL_READ, _write: int = POLL_WRITE,
          _select: Callable[..., Any] = select.select, _now: Callable[[], float] = time.monotonic,
          _state: Any = _state) -> None:
    # Called for every libpq wait of every connection: kept lean (the defaults bind what it
    # calls; the per-cycle instruction count in the README is its measure).
    state = conn.poll()
    if state == _ok:
        return
    try:
        end, seconds = _state.d
    except AttributeError:  # a thread that never set a deadline
        end, seconds = _NONE
    while state != _ok:
        remaining = None if end is None else end - _now()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded(f"timed out after {round(seconds, 2):g}s")
        # fileno() each time: while connecting, libpq moves on to the next address on a new socket.
        if state == _read:
            ready = _select((conn.fileno(),), (), (), remaining)[0]
        elif state == _write:
            ready = _select((), (conn.fileno(),), (), remaining)[1]
        else:  # pragma: no cover - psycopg2 documents only the three states
            raise psycopg2.OperationalError(f"bad poll state {state!r}")
        if not ready:
            raise DeadlineExceeded(f"timed out after {round(seconds, 2):g}s")
        state = conn.poll()


def install() -> None:
    """Route every libpq wait of this process through the deadline-aware callback."""
    global _installed
    ext.set_wait_callback(_wait)
    _installed = True


_installed = False


class deadline:  # noqa: N801 - used as `with deadline(seconds):`, like a function
    """Bound every libpq wait of this thread inside the block to `seconds` from now, in total (blocks nest)."""

    __slots__ = ("_seconds", "_saved")
    _saved: tuple[Optional[float], float]  # the enclosing block's deadline, set by __enter__

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def __enter__(self) -> None:
        if not _installed:
            install()
        try:
            self._saved = _state.d
        except AttributeError:  # this thread's first deadline
            self._saved = _NONE
        _state.d = (time.monotonic() + self._seconds, self._seconds)

    def __exit__(self, *exc: object) -> None:
        _state.d = self._saved


def reason(exc: BaseException) -> str:
    """One line from a driver error: libpq's lines joined as sentences, its own host prefixes dropped.

    With sslmode=prefer (the default) libpq tries twice and reports both attempts, each with its
    prefix: the same sentence is said once.
    """
    lines: list[str] = []
    for raw in str(exc).splitlines():
        line = _LIBPQ_PREFIX.sub("", " ".join(raw.split()))
        if line and line not in lines:
            lines.append(line)
    if not lines:
        return type(exc).__name__
    text = lines[0]
    for line in lines[1:]:
        # libpq wraps within a sentence ("... abnormally" / "before or while ...") and starts a new
        # one with a capital ("Connection refused" / "Is the server running ...").
        if line[:1].isupper() and text[-1:] not in ".?!:":
            text += "."
        text += " " + line
    return text


@dataclass(frozen=True)
class Kind:
    """A class of connection failure: how it reads in libpq's or the server's words, and what to change."""

    summary: str  # the CLI's first words when the failures are of this kind alone
    pattern: "re.Pattern[str]"
    fix: str


# psycopg2 gives no SQLSTATE for a failed connection (libpq has no result then): the server's
# FATAL text and libpq's own are what there is. They are English unless the server's lc_messages
# says otherwise; a failure no pattern knows keeps libpq's words alone.
KINDS = (
    Kind("cannot log in to PostgreSQL (authentication failed)",
         re.compile(r"password authentication failed|no password supplied|authentication failed for user|"
                    r"no pg_hba\.conf entry|pg_hba\.conf rejects|is not permitted to log in|role \"[^\"]*\" does not exist"),
         "check the user and password in DATABASE_URL, that the role exists and may log in, and the line "
         "of pg_hba.conf for this host"),
    Kind("database does not exist",
         re.compile(r'database "[^"]*" does not exist'),
         "create it (sudo -u postgres createdb -O USER NAME) or correct its name in DATABASE_URL, then run "
         "heartbeatd init-db"),
    Kind("database unreachable",
         re.compile(r"Connection refused|No such file or directory\. Is the server running locally"),
         "start PostgreSQL, or correct the host and port in DATABASE_URL to the server's listen_addresses and port"),
    Kind("database unreachable",
         re.compile(r"timed out after|timeout expired|gave no answer in time"),
         "nothing answered in HEARTBEAT_TIMEOUT: check the address, a firewall dropping packets, or a server "
         "too busy to answer"),
    Kind("database unreachable",
         re.compile(r"name lookup of .* failed|could not translate host name"),
         "correct the host name in DATABASE_URL, or this host's name service: /etc/hosts, /etc/resolv.conf"),
)


def explain(failures: str) -> tuple[str, str]:
    """(what happened in a few words, the failures followed by what to change) for a failed connection.

    `failures` is DatabaseUnreachable's or the probe's text (one `host:port: reason` per host, `; `
    between them); each kind found adds its fix once.
    """
    found = [kind for kind in KINDS if kind.pattern.search(failures)]
    summary = found[0].summary if len(found) == 1 else "database unreachable"
    fixes = "; ".join(kind.fix for kind in found)
    if not fixes:
        return summary, failures
    return summary, f"{failures}{'' if failures[-1:] in '.?!' else '.'} Fix: {fixes}."


# libpq's words for a failure that a moment may cure, and that came at once (a timeout never is one).
_FAST = ("Connection refused", "Connection reset by peer", "server closed the connection unexpectedly",
         "the database system is starting up", "too many clients", "the database system is not yet accepting")


def fast(exc: BaseException, text: str) -> bool:
    """A connect failure worth one more try within the timeout: refused, reset, starting up, too many clients."""
    return not isinstance(exc, DeadlineExceeded) and any(words in text for words in _FAST)


def close_quietly(conn: Any) -> None:
    """Close a connection that may be broken; never raises."""
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - closing a broken connection must not end anything
        pass


@dataclass(frozen=True)
class Host:
    """One host of DATABASE_URL."""

    host: str  # as configured: a name, an address, or a Unix socket directory
    port: str
    hostaddr: str  # given in the URL (then no lookup), else ""

    @property
    def is_socket(self) -> bool:
        return not self.hostaddr and (self.host == "" or self.host.startswith("/") or self.host.startswith("@"))


def _split(value: Optional[str]) -> list[str]:
    return value.split(",") if value else []


def _refused(text: str, secrets: list[str], source: str = "DATABASE_URL") -> ConfigError:
    return ConfigError([f"{source}: {mask(' '.join(text.split()), secrets)}"])


def _source(about: Optional[tuple[str, str]], given: dict[str, str]) -> str:
    """Where libpq took an option's (keyword, value) from, for the line that refuses it: DATABASE_URL;
    else the variable libpq reads it from (PGPORT…), when that holds the value; else the service file."""
    if about is None or about[0] in given:
        return "DATABASE_URL"
    variable = conninfo.envvar(about[0])
    if variable and os.environ.get(variable) == about[1]:
        return variable
    # libpq keeps no service name on the connection: the URL's, else PGSERVICE.
    service = given.get("service") or os.environ.get(conninfo.envvar("service"), "")
    return f"service {service!r} (its service file)" if service else "DATABASE_URL"


def parse(dsn: str) -> tuple[dict[str, str], list[Host]]:
    """libpq's own reading of the URL, and its hosts as libpq completes them (PG* variables, the
    service file); ConfigError (passwords masked) if libpq refuses it."""
    hint = password_hint("DATABASE_URL", dsn)
    if hint:  # libpq would cut the password short: say so, and show none of it
        raise ConfigError([hint])
    secrets = url_secrets(dsn)
    try:
        options = ext.parse_dsn(dsn)
        secrets += [value for key, value in options.items() if key in SECRET_OPTIONS]
        found = conninfo.effective(dsn)
    except (psycopg2.Error, ValueError) as exc:
        raise _refused(str(exc), secrets) from None
    if found.problem:
        raise _refused(found.problem, secrets, _source(found.about, options))
    given = dict(options)  # what the URL itself says, for naming where a value came from
    for key in ("host", "port", "hostaddr"):  # each attempt names its own (below)
        options.pop(key, None)
    hosts = _split(found.options.get("host")) or [""]
    ports = _split(found.options.get("port")) or [""]
    addrs = _split(found.options.get("hostaddr"))
    if len(ports) == 1:
        ports *= len(hosts)
    if len(ports) != len(hosts) or (addrs and len(addrs) != len(hosts)):
        raise ConfigError([f"DATABASE_URL: {len(hosts)} host(s) but {len(ports)} port(s)"
                           + (f" and {len(addrs)} hostaddr(s)" if addrs else "")])
    # libpq's rule: an empty entry of a port list is its compiled-in port (not PGPORT).
    ports = [port or conninfo.compiled_default("port") for port in ports]
    for port in ports:
        if not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
            raise _refused(f"bad port {port!r} (must be 1-65535)", secrets,
                           _source(("port", found.options["port"]), given))
    return options, [Host(h, p, addrs[i] if addrs else "") for i, (h, p) in enumerate(zip(hosts, ports))]


SERVER_ADDRESS = "SELECT host(inet_server_addr())"


def server_address(conn: Any) -> Optional[str]:
    """One round trip to PostgreSQL itself: a pooler or proxy that accepted the login is not proof.

    Returns the address the server itself answers on (None over a Unix socket).
    """
    with conn.cursor() as cur:
        cur.execute(SERVER_ADDRESS)
        row = cur.fetchone()
    return normalize_ip(row[0]) if row and row[0] else None


class Connector:
    """Connections to DATABASE_URL's hosts in order, each host within its share of the timeout."""

    def __init__(self, dsn: str, timeout: float, resolver: Optional[Resolver] = None) -> None:
        self.timeout = timeout
        options, self.hosts = parse(dsn)
        options.setdefault("application_name", "heartbeatd")
        self._options = options
        self._resolver = resolver or Resolver()
        self.failed_fast = False  # the last connect() failed fast on every host
        self.resolved: dict[str, list[str]] = {}  # what each name last resolved to (for a down row's IP)
        self._dsns: dict[tuple[str, str, str], str] = {}  # (host, address, port) -> libpq DSN, built once
        self._fixed: dict[Host, list[tuple[str, str]]] = {}
        for host in self.hosts:
            if host.is_socket or host.hostaddr or is_address(host.host):
                self._fixed[host] = self._candidates(host, float("inf"))

    def _candidates(self, host: Host, until: float) -> list[tuple[str, str]]:
        """(label, dsn) for each address of one configured host."""
        known = self._fixed.get(host)
        if known is not None:  # an address or a socket: nothing to look up, nothing to rebuild
            return known
        label = f"{host.host or host.hostaddr or 'local socket'}:{host.port}"
        if host.is_socket:
            return [(label, self._dsn(host, ""))]
        addresses = [host.hostaddr] if host.hostaddr else self._resolver.lookup(host.host, until)
        self.resolved[host.host] = addresses
        return [(label if address == host.host else f"{label} ({address})", self._dsn(host, address))
                for address in addresses]

    def _dsn(self, host: Host, address: str) -> str:
        # make_dsn parses and escapes with libpq and regexes: once per address, not once per cycle.
        key = (host.host, address, host.port)
        dsn = self._dsns.get(key)
        if dsn is None:
            if len(self._dsns) > 64:  # a name whose addresses keep changing must not grow this forever
                self._dsns.clear()
            where = {"host": host.host} if host.host else {}
            if address:
                where["hostaddr"] = address
            dsn = self._dsns[key] = ext.make_dsn(**self._options, **where, port=host.port)
        return dsn

    def connect(self, first: Callable[[Any], T], until: Optional[float] = None
                ) -> tuple[Optional[Any], Optional[T], list[str]]:
        """(connection, what `first` found on it, failures): the first host that connects and answers.

        `first` runs on the new connection within the same host's share (the probe's proof that
        PostgreSQL itself answers); a host where it fails is closed and the next one tried. All of
        it ends by `until` (monotonic; default: the timeout from now). `failed_fast` then says
        whether every host failed fast, in a way a moment may cure (see `fast`).
        """
        end = until if until is not None else time.monotonic() + self.timeout
        failures: list[str] = []
        self.failed_fast = True
        for index, host in enumerate(self.hosts):
            # Each host gets an equal share of what is left, so a frozen one cannot starve the next.
            share_end = time.monotonic() + (end - time.monotonic()) / (len(self.hosts) - index)
            try:
                candidates = self._candidates(host, share_end)
            except LookupFailed as exc:
                failures.append(f"{host.host}:{host.port}: {exc}")
                self.failed_fast = False
                continue
            for number, (label, dsn) in enumerate(candidates):
                slot = (share_end - time.monotonic()) / (len(candidates) - number)
                conn = None
                try:
                    with deadline(max(slot, 0.001)):
                        # What psycopg2.connect() does, less its make_dsn(): that parses the DSN
                        # again every cycle, and ours was built by make_dsn once.
                        conn = ext.connection(dsn)
                        conn.autocommit = True
                        found = first(conn)
                except Exception as exc:  # noqa: BLE001 - every failure is this host's, never a crash
                    text = reason(exc)
                    failures.append(f"{label}: {text}")
                    self.failed_fast = self.failed_fast and fast(exc, text)
                    if conn is not None:
                        close_quietly(conn)
                    continue
                return conn, found, failures
        if not failures:
            self.failed_fast = False
        return None, None, failures or ["no host to connect to"]

    def open(self) -> Any:
        """A connection for the commands that read or set up the table; DatabaseUnreachable says why not.

        As for the probe, PostgreSQL itself must answer on it: a pooler whose server is down is the
        next host's turn.
        """
        conn, _, failures = self.connect(server_address)
        if conn is None:
            raise DatabaseUnreachable("; ".join(failures))
        return conn


class DatabaseUnreachable(Exception):
    """No host of DATABASE_URL gave a connection in time (the reasons, one per host, in the text)."""
