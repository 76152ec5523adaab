"""A TCP relay a test controls: forward, refuse new connections, drop or freeze old ones.

Put it between a client and a real server to make the server look down (refused),
restarted (every open connection dropped) or cut off (connections stay open but nothing
is forwarded any more, as with a server that stops answering).
"""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpRelay:
    """Relays 127.0.0.1:<port> to ``upstream``, with faults switched on and off at will."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._silent: list[socket.socket] = []  # accepted while frozen, never answered
        self._frozen = threading.Event()
        self._listener: socket.socket | None = None
        self.port = 0
        self.accepting = False
        self.open()

    def url_for(self, url: str) -> str:
        """``url`` (a SQLAlchemy or redis URL on the upstream) pointed at the relay."""
        host, port = self.upstream
        return url.replace(f"{host}:{port}", f"127.0.0.1:{self.port}", 1)

    def open(self) -> None:
        """Accept connections (again), on the same port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self.accepting = True
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def refuse(self) -> None:
        """Close the listening socket: new connections are refused."""
        self.accepting = False
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()

    def drop(self) -> None:
        """Close every relayed connection, as a server restart does."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def freeze(self) -> None:
        """Stop forwarding in both directions; connections stay open (a silent server)."""
        self._frozen.set()

    def thaw(self) -> None:
        self._frozen.clear()

    def close(self) -> None:
        self.refuse()
        self.thaw()
        self.drop()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self._frozen.is_set():
                self._silent.append(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, server))
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                while self._frozen.is_set():
                    self._frozen_wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def _frozen_wait(self) -> None:
        # Wake up now and then to see whether the relay was thawed.
        threading.Event().wait(0.05)
