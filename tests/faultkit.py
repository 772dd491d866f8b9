"""Real faults for tests and the chaos run: a Redis of our own to kill, a cuttable TCP path.

Nothing here touches the machine's shared services: the Redis is a private
``redis-server`` on a free port, and the database outage is a TCP proxy in
front of PostgreSQL that drops every connection and refuses new ones.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A throw-away redis-server without persistence: killing it loses everything queued."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="mq-redis-"))

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
            + ["--save", "", "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: the queue's contents are gone, as after a crash without persistence."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target``; ``cut()`` is an outage, ``restore()`` ends it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._up = True
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = False
        self._cut_after: tuple[bytes, float] | None = None
        self._muted: set[socket.socket] = set()  # clients whose replies are dropped
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            for a, b, upward in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(a, b, upward), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, upward: bool) -> None:
        try:
            while data := source.recv(65536):
                if not upward and sink in self._muted:
                    continue  # the reply is lost on the way back
                armed = self._cut_after
                if upward and armed is not None and armed[0] in data:
                    self._cut_after = None
                    self._muted.add(source)
                    threading.Timer(armed[1], self._drop, args=(source, sink)).start()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every open connection and refuse new ones (the database is 'down')."""
        self._up = False
        with self._lock:
            sockets = list(self._sockets)
        self._drop(*sockets)

    def restore(self) -> None:
        self._up = True

    def cut_after(self, marker: bytes, wait_s: float = 0.5) -> None:
        """Forward the next request containing ``marker`` to the server, drop every
        reply to that client, and close its connection ``wait_s`` later: the server
        did the work, the client never hears it (an ambiguous commit). Other and
        new connections are left alone."""
        self._cut_after = (marker, wait_s)

    def _drop(self, *pair: socket.socket) -> None:
        with self._lock:
            self._sockets.difference_update(pair)
        for s in pair:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self._muted.difference_update(pair)

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()
