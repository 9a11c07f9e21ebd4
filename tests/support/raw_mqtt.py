"""A device that speaks MQTT over a bare socket and keeps every packet exactly as it arrived.

Written by hand, on purpose: the device-bound tests must count the bytes a device really
receives (fixed header, topic, packet id, properties, payload), not what a client
library reports. It knows just enough MQTT 3.1.1 and 5 for that: CONNECT, SUBSCRIBE,
PUBLISH at QoS 0/1 with PUBACK, and reading PUBLISH packets.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tests.support.waiting import LOOPBACK_TIMEOUT

_CONNECT, _CONNACK, _PUBLISH, _PUBACK, _SUBSCRIBE, _SUBACK = 1, 2, 3, 4, 8, 9
_CORRELATION_DATA = 0x09


def encode_varint(value: int) -> bytes:
    """``value`` as an MQTT Variable Byte Integer."""
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


@dataclass(frozen=True)
class Packet:
    """One packet as received: ``wire`` is every byte of it, header included."""

    kind: int
    flags: int
    wire: bytes
    body: bytes

    @property
    def size(self) -> int:
        return len(self.wire)


@dataclass(frozen=True)
class Publish:
    """A PUBLISH packet taken apart."""

    topic: str
    payload: bytes
    qos: int
    size: int
    properties: bytes


class RawDevice:
    """A connected device; every PUBLISH it receives is kept in :attr:`publishes`.

    Args:
        host, port: the broker (loopback).
        client_id: the MQTT client id.
        version: 4 (MQTT 3.1.1) or 5.
    """

    def __init__(self, host: str, port: int, client_id: str, *, version: int) -> None:
        if version not in (4, 5):
            raise ValueError(f"version is 4 (3.1.1) or 5, not {version}")
        self.version = version
        self.publishes: list[Publish] = []
        self._cond = threading.Condition()
        self._buf = b""
        self._acks: set[int] = set()
        self._next_pid = 1
        self._closed = False
        self._sock = socket.create_connection((host, port), timeout=LOOPBACK_TIMEOUT)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        props = b"\x00" if version == 5 else b""
        body = _string("MQTT") + bytes([version, 0x02]) + struct.pack("!H", 60) + props \
            + _string(client_id)
        self._send(_CONNECT << 4, body)
        connack = self._read_packet()
        if connack.kind != _CONNACK or connack.body[1] != 0:
            raise ConnectionError(f"broker refused the connection: {connack.body!r}")
        self._reader = threading.Thread(target=self._read_loop, name="raw-device", daemon=True)
        self._reader.start()

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe and wait for the SUBACK."""
        pid = self._pid()
        props = b"\x00" if self.version == 5 else b""
        self._send((_SUBSCRIBE << 4) | 0x02,
                   struct.pack("!H", pid) + props + _string(topic_filter) + bytes([qos]))
        self._wait(lambda: pid in self._acks, "SUBACK")

    def publish(self, topic: str, payload: bytes, *, correlation_data: bytes | None = None
                ) -> None:
        """Publish at QoS 1 and wait for the PUBACK."""
        pid = self._pid()
        props = b""
        if self.version == 5:
            inner = b"" if correlation_data is None else \
                bytes([_CORRELATION_DATA]) + _string(correlation_data)
            props = encode_varint(len(inner)) + inner
        self._send((_PUBLISH << 4) | 0x02, _string(topic) + struct.pack("!H", pid) + props
                   + payload)
        self._wait(lambda: pid in self._acks, "PUBACK")

    def wait_for(self, predicate: Callable[[list[Publish]], bool], timeout: float) -> bool:
        """Wait until ``predicate(publishes)`` holds; False after ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.publishes), timeout)

    def on_topic(self, topic: str) -> list[Publish]:
        with self._cond:
            return [p for p in self.publishes if p.topic == topic]

    def close(self) -> None:
        with self._cond:
            self._closed = True
        with contextlib.suppress(OSError):
            self._sock.sendall(b"\xe0\x00")  # DISCONNECT
        self._sock.close()
        self._reader.join(LOOPBACK_TIMEOUT)

    # ------------------------------------------------------------------ internals

    def _pid(self) -> int:
        with self._cond:
            pid = self._next_pid
            self._next_pid += 1
            return pid

    def _send(self, first: int, body: bytes) -> None:
        self._sock.sendall(bytes([first]) + encode_varint(len(body)) + body)

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(done, LOOPBACK_TIMEOUT):
                raise TimeoutError(f"no {what} within {LOOPBACK_TIMEOUT} s")

    def _recv_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError("broker closed the connection")
            self._buf += data
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _read_packet(self) -> Packet:
        head = self._recv_exactly(1)
        length, multiplier, raw_len = 0, 1, b""
        while True:
            byte = self._recv_exactly(1)
            raw_len += byte
            length += (byte[0] & 0x7F) * multiplier
            multiplier *= 128
            if not byte[0] & 0x80:
                break
        body = self._recv_exactly(length)
        return Packet(head[0] >> 4, head[0] & 0x0F, head + raw_len + body, body)

    def _read_loop(self) -> None:
        self._sock.settimeout(None)  # close() ends the wait
        while True:
            try:
                packet = self._read_packet()
            except OSError:
                return
            except ConnectionError:
                return
            if packet.kind == _PUBLISH:
                self._received(packet)
            elif packet.kind in (_PUBACK, _SUBACK):
                with self._cond:
                    self._acks.add(struct.unpack("!H", packet.body[:2])[0])
                    self._cond.notify_all()

    def _received(self, packet: Packet) -> None:
        body = packet.body
        qos = (packet.flags >> 1) & 0x03
        (topic_len,) = struct.unpack("!H", body[:2])
        at = 2 + topic_len
        topic = body[2:at].decode()
        if qos:
            pid = body[at:at + 2]
            at += 2
            self._sock.sendall(bytes([_PUBACK << 4, 2]) + pid)
        props = b""
        if self.version == 5:
            length, shift, start = 0, 0, at
            while True:
                byte = body[at]
                at += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            props = body[start:at + length]
            at += length
        with self._cond:
            self.publishes.append(Publish(topic, body[at:], qos, packet.size, props))
            self._cond.notify_all()
