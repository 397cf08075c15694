"""A delaying TCP proxy on loopback: a server that is slow rather than dead (this kernel has no netem)."""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from typing import Optional


class DelayProxy:
    """Forwards 127.0.0.1:port to an upstream; every reply chunk waits `delay` seconds first.

    Each round trip of a protocol therefore takes at least `delay`: a handshake of n round trips
    dribbles in over n x delay. `delay` may be changed while it runs; with `frozen` set it accepts
    connections and forwards nothing, either way (a host that is frozen, not gone). The next
    `reset` connections are accepted and reset at once (RST: the client sees ECONNRESET), as a
    server going down or coming up may do; `accepted` counts every connection taken.
    """

    def __init__(self, upstream_host: str, upstream_port: int, delay: float) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay = delay
        self.frozen = False
        self.reset = 0
        self.accepted = 0
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            if self.reset > 0:
                self.reset -= 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            self._spawn(self._pump, client, server, 0.0)
            self._spawn(self._pump, server, client, None)

    def _pump(self, src: socket.socket, dst: socket.socket, fixed: Optional[float]) -> None:
        try:
            while not self._stop.is_set():
                if self.frozen:
                    time.sleep(0.05)
                    continue
                ready, _, _ = select.select([src], [], [], 0.2)
                if not ready:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                wait = self.delay if fixed is None else fixed
                if wait:
                    time.sleep(wait)
                dst.sendall(data)
        except (OSError, ValueError):  # closed under us by close(): fd -1
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        """Stop accepting and end every forwarded connection."""
        self._stop.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(2)
