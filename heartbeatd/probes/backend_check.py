"""后端 with HEARTBEAT_BACKEND_CHECK: the backend application itself answers, not just the host.

Three forms, each bounded by HEARTBEAT_TIMEOUT (name lookup included), standard library only:
`systemd:NAME.service` (ActiveState is `active`), `tcp://HOST:PORT` (a TCP connect succeeds),
`http[s]://HOST:PORT/PATH` (GET answered 2xx or 3xx; TLS verified). Nothing is served: the
check only reads an endpoint that already exists.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from typing import Callable, Optional
from urllib.parse import quote, urlsplit

from heartbeatd.config import ConfigError, mask, mask_url, url_secrets
from heartbeatd.names import LookupFailed, Resolver

# What may stand unencoded in a request target (RFC 3986 pchar, `/`, `?`, and `%` of an existing escape).
_TARGET_SAFE = "/?:@!$&'()*+,;=-._~%"
UNIT = re.compile(r"^[A-Za-z0-9:_.\\@-]+\.(service|socket|target|mount|timer|path|scope|slice)$")
SYSTEMCTL = ("/usr/bin/systemctl", "/bin/systemctl")


def validate(spec: str) -> Optional[str]:
    """What is wrong with a HEARTBEAT_BACKEND_CHECK value, or None (the value shown with any password masked)."""
    if not spec:
        return None
    if spec.startswith("systemd:"):
        return None if UNIT.match(spec[8:]) else f"systemd: needs a unit name such as app.service, got {spec[8:]!r}"
    shown = mask(mask_url(spec), url_secrets(spec))  # as written, and as urlsplit reads it: never the password
    try:
        parts = urlsplit(spec)
        port = parts.port
    except ValueError as exc:
        return f"bad URL {shown!r}: {mask(str(exc), url_secrets(spec))}"
    if parts.scheme not in ("tcp", "http", "https"):
        return f"must be systemd:NAME.service, tcp://HOST:PORT, http://… or https://…, got {shown!r}"
    if not parts.hostname:
        return f"no host in {shown!r}"
    if parts.scheme == "tcp" and not port:
        return f"tcp:// needs a port, got {shown!r}"
    if parts.username or parts.password:
        return "no user or password in the URL: the check only reads an open endpoint"
    try:
        parts.hostname.encode("idna")
    except UnicodeError:
        return f"host {parts.hostname!r} is not a valid host name"
    return None


def request_target(path: str, query: str) -> str:
    """The path and query as sent: anything outside ASCII's URL characters percent-encoded (UTF-8)."""
    target = (path or "/") + (f"?{query}" if query else "")
    target = re.sub(r"%(?![0-9A-Fa-f]{2})", "%25", target)  # a `%` that starts no escape is a literal one
    return quote(target, safe=_TARGET_SAFE)


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


class BackendCheck:
    """One configured check; `run(deadline)` returns None when healthy, else the reason."""

    def __init__(self, spec: str, timeout: float, resolver: Optional[Resolver] = None) -> None:
        problem = validate(spec)
        if problem:
            raise ConfigError([f"HEARTBEAT_BACKEND_CHECK: {problem}"])
        self.spec = spec
        self.timeout = timeout
        self._resolver = resolver or Resolver()
        self._run: Callable[[float], Optional[str]]
        if spec.startswith("systemd:"):
            self._unit = spec[8:]
            self._systemctl = next((p for p in SYSTEMCTL if shutil.which(p)), "systemctl")
            self._run = self._systemd
        else:
            parts = urlsplit(spec)
            self._scheme = parts.scheme
            self._host = parts.hostname or ""
            self._port = parts.port or (443 if parts.scheme == "https" else 80)
            self._path = request_target(parts.path, parts.query)
            self._run = self._tcp if parts.scheme == "tcp" else self._http

    def run(self, until: Optional[float] = None) -> Optional[str]:
        """None when the backend is healthy, else one line saying why not (by `until`, else the timeout)."""
        try:
            return self._run(until if until is not None else time.monotonic() + self.timeout)
        except (TimeoutError, socket.timeout, subprocess.TimeoutExpired):
            return f"{self._label()}: timed out after {self.timeout:g}s"
        except LookupFailed as exc:
            return f"{self._label()}: {exc}"
        except ssl.SSLError as exc:
            return f"{self._label()}: TLS: {exc.reason or exc}"
        except OSError as exc:
            return f"{self._label()}: {exc.strerror or exc}"

    def _label(self) -> str:
        return self.spec if self.spec.startswith("systemd:") else f"{self._host}:{self._port}"

    def _systemd(self, deadline: float) -> Optional[str]:
        # Not our notify socket or watchdog: systemctl is not the service's main process.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_", "LISTEN_"))}
        result = subprocess.run([self._systemctl, "show", "--property=ActiveState", "--value", self._unit],
                                capture_output=True, text=True, timeout=_left(deadline), env=env,
                                stdin=subprocess.DEVNULL)
        state = result.stdout.strip()
        if result.returncode != 0 or not state:
            return f"{self.spec}: systemctl failed: {' '.join(result.stderr.split()) or f'exit {result.returncode}'}"
        return None if state == "active" else f"{self.spec}: ActiveState is {state}"

    def _connect(self, deadline: float) -> socket.socket:
        address = self._resolver.lookup(self._host, deadline)[0]
        return socket.create_connection((address, self._port), timeout=_left(deadline))

    def _tcp(self, deadline: float) -> Optional[str]:
        self._connect(deadline).close()
        return None

    def _http(self, deadline: float) -> Optional[str]:
        sock = self._connect(deadline)
        try:
            if self._scheme == "https":
                # Verified against the name in the URL, not the address we connected to.
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self._host)
            host = self._host.encode("idna").decode("ascii") if ":" not in self._host else f"[{self._host}]"
            request = (f"GET {self._path} HTTP/1.1\r\nHost: {host}:{self._port}\r\nUser-Agent: heartbeatd\r\n"
                       "Accept: */*\r\nConnection: close\r\n\r\n")
            sock.settimeout(_left(deadline))
            sock.sendall(request.encode("ascii", "strict"))
            head = b""
            while b"\r\n" not in head and len(head) < 4096:
                sock.settimeout(_left(deadline))  # a server that dribbles gets only what is left
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
        finally:
            sock.close()
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        found = re.match(r"HTTP/\d(?:\.\d)? (\d{3})", status)
        if not found:
            return f"{self._label()}: not an HTTP answer: {status[:80]!r}"
        code = int(found.group(1))
        return None if 200 <= code < 400 else f"{self._label()}: HTTP {status.split(' ', 1)[1][:80]}"
