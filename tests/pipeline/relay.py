"""A TCP relay in front of a store that goes down for a while when a request it relays matches a
pattern: its connections cut, new ones refused (nothing listens), then it listens again on the same
port. A store's outage of a few seconds, placed at the request the test names."""
from __future__ import annotations

import random
import socket
import threading
import time

# Below the kernel's ephemeral ports (32768-60999 on Linux) and above Ray's workers' (10002-19999):
# while the relay is down, no outgoing connection can take its port, which it listens on again.
PORTS = range(20000, 32000)


class OutageRelay:
    def __init__(self, target_port: int, outages: list[bytes], down_s: float = 3.0) -> None:
        """`outages`: for each, a byte pattern of a request (`PUT /bucket/out/`) whose first
        appearance, after the previous outage's, takes the relay down for `down_s` seconds; that
        request is not relayed."""
        self.target_port, self.down_s = target_port, down_s
        self.waiting = list(outages)
        self.happened: list[bytes] = []
        self.failures: list[str] = []           # what went wrong in the relay itself (a test asserts none)
        self._lock = threading.Lock()
        self._connections: list[socket.socket] = []
        self._down_since = 0.0
        self._closed = False
        self._listener, self.port = self._listen_anywhere()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.waiting = []
        self._stop_listening()
        self._cut_connections()

    def _listen_anywhere(self) -> tuple[socket.socket, int]:
        for port in random.sample(PORTS, 50):
            try:
                return self._listen(port), port
            except OSError:
                continue
        raise OSError("no free port for the relay")

    def _listen(self, port: int) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("127.0.0.1", port))
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        return listener

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:         # closed: down for a while, or for good
                if not self._back_up():
                    return
                continue
            try:
                store = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError as e:
                self.failures.append(f"the store refused the relay: {e}")
                client.close()
                continue
            with self._lock:
                self._connections += [client, store]
            threading.Thread(target=self._pump, args=(client, store, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(store, client, False), daemon=True).start()

    def _back_up(self) -> bool:
        """After an outage, listening again on the same port; False once closed for good."""
        with self._lock:
            if self._closed or not self._down_since:
                return False
        time.sleep(max(0.0, self._down_since + self.down_s - time.monotonic()))
        try:
            self._listener = self._listen(self.port)
        except OSError as e:
            self.failures.append(f"the relay could not listen again on {self.port}: {e}")
            return False
        with self._lock:
            self._down_since = 0.0
        return True

    def _pump(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        try:
            while data := source.recv(65536):
                if requests and self._outage_for(data):
                    return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                s.close()

    def _outage_for(self, data: bytes) -> bool:
        """Whether `data` starts the next outage (then taken: connections cut, nothing listening)."""
        with self._lock:
            if not self.waiting or self.waiting[0] not in data:
                return False
            self.happened.append(self.waiting.pop(0))
            self._down_since = time.monotonic()
        self._stop_listening()
        self._cut_connections()
        return True

    def _stop_listening(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)      # wakes the accept() waiting on it (close alone does not)
        except OSError:
            pass
        self._listener.close()

    def _cut_connections(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for s in connections:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
