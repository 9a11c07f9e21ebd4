"""A TCP relay on 127.0.0.1 that can hold one direction: a broker that stops reading.

Put it between a client and a server (the bridge and Mosquitto): bytes flow both
ways until :meth:`TcpRelay.hold_upstream`; then what the client sends is kept back
(the server receives nothing more -- no PUBLISH, no PUBACK, no PINGREQ), while what
the server sends still reaches the client. :meth:`TcpRelay.release` forwards what was
held, in order, and resumes. It models a broker (or a network path) that is slow to
take our packets while it keeps delivering its own -- the case where a client's
publish window fills up although messages keep arriving.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from contextlib import suppress

_IO_S = 0.02


class TcpRelay:
    """Relays connections from a free local port to ``(host, port)``.

    Args:
        host: the server's address.
        port: the server's port.
    """

    def __init__(self, host: str, port: int) -> None:
        self._upstream = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host = "127.0.0.1"
        self.port: int = self._listener.getsockname()[1]
        self._hold = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.held_bytes = 0
        self.held_publishes = 0  # MQTT PUBLISH packets that arrived while holding
        self.last_held_publish: float | None = None  # time.monotonic() of the latest one
        self._acceptor = threading.Thread(target=self._accept_loop, name="tcp-relay",
                                          daemon=True)

    def __enter__(self) -> TcpRelay:
        self._acceptor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Close everything and join the threads."""
        self._stop.set()
        self._listener.close()
        self._acceptor.join(5)
        for thread in list(self._threads):
            thread.join(5)

    def hold_upstream(self) -> None:
        """From now on keep back what clients send (the server sees silence)."""
        self._hold.set()

    def release(self) -> None:
        """Forward what was held and resume."""
        self._hold.clear()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.05)
                if not ready:
                    continue
                client, _ = self._listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._relay, args=(client,), daemon=True,
                                      name="tcp-relay-conn")
            self._threads.append(thread)
            thread.start()

    def _relay(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self._upstream, timeout=5)
        except OSError:
            client.close()
            return
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending = bytearray()  # client -> server bytes held back
        frames = _MqttFrames()
        try:
            while not self._stop.is_set():
                if pending and not self._hold.is_set():
                    server.sendall(pending)
                    pending.clear()
                ready, _, _ = select.select([client, server], [], [], _IO_S)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is server:
                        client.sendall(data)
                        continue
                    publishes = frames.feed(data)
                    if self._hold.is_set():
                        pending += data
                        self.held_bytes += len(data)
                        if publishes:
                            self.held_publishes += publishes
                            self.last_held_publish = time.monotonic()
                    else:
                        server.sendall(data)
        except OSError:
            return
        finally:
            for sock in (client, server):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


class _MqttFrames:
    """Splits one direction of an MQTT connection into packets; counts PUBLISH packets."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> int:
        self._buf += data
        publishes = 0
        while len(self._buf) >= 2:
            length, multiplier, pos = 0, 1, 1
            while True:  # "remaining length": 1-4 bytes, 7 bits each
                if pos >= len(self._buf):
                    return publishes
                byte = self._buf[pos]
                length += (byte & 0x7F) * multiplier
                multiplier *= 128
                pos += 1
                if not byte & 0x80 or pos > 4:
                    break
            if len(self._buf) < pos + length:
                return publishes
            publishes += int(self._buf[0] >> 4 == 3)
            del self._buf[:pos + length]
        return publishes
