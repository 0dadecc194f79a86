"""A TCP proxy to a real service that goes away for a while: an outage on demand, for the trainer tests."""

from __future__ import annotations

import socket
import threading
import time


class OutageProxy:
    """Forwards 127.0.0.1:<port> to ``target``. The first time a client sends bytes containing
    ``trigger``, that request is not forwarded: every connection is cut and the port stops listening
    (connection refused) for ``outage_s`` seconds, then the proxy listens and forwards again."""

    def __init__(self, target: tuple[str, int], trigger: bytes, outage_s: float) -> None:
        self.target, self.trigger, self.outage_s = target, trigger, outage_s
        self.triggered = threading.Event()
        self.back = threading.Event()
        self.outage_started = 0.0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._listener = self._listen(0)
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        sock.settimeout(0.2)  # a close from another thread does not wake a blocked accept
        return sock

    def _accept(self) -> None:
        while not self._closed:
            listener = self._listener
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed for the outage (or for good): wait until it listens again
                if self._closed:
                    return
                self.back.wait(1.0)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client and not self.triggered.is_set() and self.trigger in data:
                    self._outage()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def _outage(self) -> None:
        self.triggered.set()
        self.outage_started = time.monotonic()
        self._listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        threading.Thread(target=self._restore, daemon=True).start()

    def _restore(self) -> None:
        time.sleep(self.outage_s)
        if not self._closed:
            self._listener = self._listen(self.port)
            self.back.set()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            for s in self._conns:
                s.close()
