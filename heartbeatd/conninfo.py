"""libpq's own reading of a connection string, with every default it applies, asked of libpq itself.

psycopg2 exposes libpq's parser (`parse_dsn`, PQconninfoParse) but not the defaults libpq fills in
when it connects: the `PG*` variables, the service file (`service=` or PGSERVICE, PGSERVICEFILE),
its compiled-in port. Those come only from a PGconn, so we ask the libpq psycopg2 itself loaded
for one with PQconnectStart and read it back with PQconninfo. So that no connection and no name
lookup is started, the string carries a `target_session_attrs` libpq refuses: libpq checks it
after it has applied every default and split the host list, and before it touches the network.

That stop hides what libpq checks from there on (the operator's own `target_session_attrs`, and
`load_balance_hosts` in libpq 16+), which libpq would otherwise refuse only when connecting. So a
second probe keeps the operator's options and stops at the port instead: libpq reads the port as
a number only when it starts the connection, after every option is checked, and before any name
lookup or socket (the host is a Unix socket directory that does not exist, should that ever change).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
from dataclasses import dataclass
from typing import Any, Optional

import psycopg2
import psycopg2.extensions as ext

# libpq refuses these values (its own errors name them), and so starts nothing.
_STOP = "heartbeatd-reads-only"  # as target_session_attrs: libpq's last check of the options
_PORT_STOP = "heartbeatd-checks-only"  # as the port: read when the connection starts, after every check
_NO_SOCKET = "/nonexistent/heartbeatd"


class _Option(ctypes.Structure):
    """libpq's PQconninfoOption."""

    _fields_ = [("keyword", ctypes.c_char_p), ("envvar", ctypes.c_char_p), ("compiled", ctypes.c_char_p),
                ("val", ctypes.c_char_p), ("label", ctypes.c_char_p), ("dispchar", ctypes.c_char_p),
                ("dispsize", ctypes.c_int)]


def _loaded_libpq() -> str:
    """The path of the libpq psycopg2 is linked to (the wheel bundles its own), else the system's."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.split()[-1] if line.strip() else ""
                if path.rpartition("/")[2].startswith("libpq"):
                    return path
    except OSError:
        pass
    found = ctypes.util.find_library("pq")
    if not found:
        raise RuntimeError("libpq not found (psycopg2's own, nor the system's)")
    return found


_lib: Optional[Any] = None


def _libpq() -> Any:
    global _lib
    if _lib is None:
        ext.libpq_version()  # psycopg2 imported first, so that its libpq is the one mapped
        lib = ctypes.CDLL(_loaded_libpq())
        lib.PQconnectStart.restype, lib.PQconnectStart.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
        lib.PQconninfo.restype, lib.PQconninfo.argtypes = ctypes.POINTER(_Option), [ctypes.c_void_p]
        lib.PQconndefaults.restype, lib.PQconndefaults.argtypes = ctypes.POINTER(_Option), []
        lib.PQerrorMessage.restype, lib.PQerrorMessage.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        lib.PQconninfoFree.restype, lib.PQconninfoFree.argtypes = None, [ctypes.POINTER(_Option)]
        lib.PQfinish.restype, lib.PQfinish.argtypes = None, [ctypes.c_void_p]
        _lib = lib
    return _lib


def _text(value: Optional[bytes]) -> str:
    return value.decode("utf-8", "replace") if value is not None else ""


def _read(options: Any) -> list[_Option]:
    found = []
    index = 0
    while options[index].keyword is not None:
        found.append(options[index])
        index += 1
    return found


@dataclass(frozen=True)
class Effective:
    """What libpq will connect with: every option after the URL, the service file and PG* variables."""

    options: dict[str, str]  # keyword -> value (set ones only)
    problem: Optional[str]  # libpq's own complaint about the options (a bad sslmode, an unknown service, …)
    about: Optional[tuple[str, str]] = None  # (keyword, value) the complaint is about, when libpq's words name one


def _start(dsn: str) -> tuple[str, dict[str, str]]:
    """(libpq's error, its options) for a connection string libpq is sure to refuse before the network."""
    lib = _libpq()
    conn = lib.PQconnectStart(dsn.encode("utf-8"))
    if not conn:
        raise MemoryError("libpq could not allocate a connection")
    try:
        error = " ".join(_text(lib.PQerrorMessage(conn)).split())
        raw = lib.PQconninfo(conn)
        try:
            options = {_text(o.keyword): _text(o.val) for o in _read(raw) if o.val is not None} if raw else {}
        finally:
            if raw:
                lib.PQconninfoFree(raw)
    finally:
        lib.PQfinish(conn)
    return error, options


def _about(error: str, options: dict[str, str]) -> Optional[tuple[str, str]]:
    """The option libpq's complaint names with its value (`invalid sslmode value: "x"`): libpq's
    messages are translated, but the keyword and the value in them are not."""
    named = [(key, value) for key, value in options.items()
             if value and re.search(rf"\b{re.escape(key)}\b", error) and f'"{value}"' in error]
    return named[0] if len(named) == 1 else None


def effective(dsn: str) -> Effective:
    """libpq's reading of `dsn` with its defaults applied; nothing is connected and nothing looked up.

    ValueError (libpq's words) if libpq cannot even parse it.
    """
    try:
        probe = ext.make_dsn(dsn, target_session_attrs=_STOP)
        late = ext.make_dsn(dsn, host=_NO_SOCKET, hostaddr="", port=_PORT_STOP)
    except psycopg2.Error as exc:
        raise ValueError(" ".join(str(exc).split())) from None
    error, options = _start(probe)
    if not options:  # refused while reading the options: the service file, a bad option
        return Effective({}, error or "libpq refused the connection string")
    if _STOP not in error:
        return Effective(options, error or None, _about(error, options))
    error, found = _start(late)
    if _PORT_STOP in error:  # every option passed: libpq went on to the port
        return Effective(options, None)
    return Effective(options, error or "libpq refused the connection string", _about(error, found))


@dataclass(frozen=True)
class _Default:
    """One of libpq's options as PQconndefaults gives it (None: not set)."""

    keyword: str
    envvar: str  # the variable libpq reads it from, or ""
    compiled: Optional[str]  # its compiled-in default
    val: Optional[str]  # its default now: the PG* variables and the service file PGSERVICE names applied
    dispchar: str  # "*": a secret


def _conndefaults() -> list[_Default]:
    """libpq's options with their defaults as libpq has them now."""
    lib = _libpq()
    raw = lib.PQconndefaults()
    if not raw:
        raise MemoryError("libpq could not allocate its defaults")
    try:
        return [_Default(_text(o.keyword), _text(o.envvar), None if o.compiled is None else _text(o.compiled),
                         None if o.val is None else _text(o.val), _text(o.dispchar)) for o in _read(raw)]
    finally:
        lib.PQconninfoFree(raw)


def own_defaults() -> dict[str, str]:
    """The options libpq takes from its environment for what a connection string leaves out: its PG*
    variables and the service file PGSERVICE names (PQconndefaults, less its compiled-in values; `user`
    is always there: libpq's default is the login name)."""
    return {d.keyword: d.val for d in _conndefaults() if d.val is not None and d.val != d.compiled}


@functools.lru_cache(maxsize=None)
def envvar(keyword: str) -> str:
    """The variable libpq reads an option's default from (`port`: PGPORT), or ""."""
    return next((d.envvar for d in _conndefaults() if d.keyword == keyword), "")


def secret_keywords() -> frozenset[str]:
    """The options libpq itself marks as secret (dispchar `*`: password, sslpassword, …)."""
    return frozenset(d.keyword for d in _conndefaults() if d.dispchar == "*")


@functools.lru_cache(maxsize=None)
def compiled_default(keyword: str) -> str:
    """libpq's compiled-in default of an option (`port`: 5432 unless built otherwise)."""
    return next((d.compiled or "" for d in _conndefaults() if d.keyword == keyword), "")
