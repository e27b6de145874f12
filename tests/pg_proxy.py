"""A loopback TCP proxy in front of the test PostgreSQL server that can lose the answer to
a COMMIT: the server gets the COMMIT and commits, but the client never hears so (its
connection is closed instead). The one case where a client cannot tell whether its write
happened, made on demand (:meth:`CommitCutter.cut_next_commit`).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path
from types import TracebackType

from psycopg.conninfo import conninfo_to_dict

__all__ = ["CommitCutter"]


class CommitCutter:
    """Listens on 127.0.0.1 and forwards each connection to the server's Unix socket."""

    def __init__(self, database_url: str) -> None:
        params = conninfo_to_dict(database_url)
        self._target = str(Path(str(params["host"])) / f".s.PGSQL.{params.get('port') or 5432}")
        self._listener = socket.create_server(("127.0.0.1", 0))
        port = self._listener.getsockname()[1]
        user = params.get("user") or "postgres"
        self.url = f"postgresql://{user}@127.0.0.1:{port}/{params['dbname']}"
        self._lock = threading.Lock()
        self._armed = False
        #: COMMITs whose answer was dropped
        self.cuts = 0
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_next_commit(self) -> None:
        """Drop the answer to the next COMMIT any client sends, and close its connection."""
        with self._lock:
            self._armed = True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            server = socket.socket(socket.AF_UNIX)
            server.connect(self._target)
            with self._lock:
                self._sockets += [client, server]
            cutting = threading.Event()
            threading.Thread(target=self._up, args=(client, server, cutting), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, cutting), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, cutting: threading.Event) -> None:
        """Client to server; a COMMIT while armed marks this connection for the cut."""
        while data := _receive(client):
            with self._lock:
                if self._armed and b"COMMIT" in data:
                    self._armed = False
                    cutting.set()
            try:
                server.sendall(data)
            except OSError:
                break
        _close(server)

    def _down(self, server: socket.socket, client: socket.socket, cutting: threading.Event) -> None:
        """Server to client; once cutting, the next answer (the COMMIT's) is dropped."""
        while data := _receive(server):
            if cutting.is_set():
                with self._lock:
                    self.cuts += 1
                break
            try:
                client.sendall(data)
            except OSError:
                break
        _close(client)
        _close(server)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                _close(sock)

    def __enter__(self) -> CommitCutter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _receive(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
