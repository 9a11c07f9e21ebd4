"""llm_bridge: ask a llamacpp-mqtt-bridge from MicroPython, over umqtt.simple.

One blocking call per question::

    from llm_bridge import LLMBridge

    bridge = LLMBridge("kitchen", "192.168.1.10")
    bridge.connect()
    answer = bridge.ask("Why is the sky blue?", on_text=lambda t: print(t, end=""),
                        max_tokens=64)
    print(answer.finish_reason)

The wire protocol is docs/protocol.md of the bridge: a request on ``P/request/{client}``,
its reply messages (``start``, ``chunk``, ``progress``, then ``done``, ``reply`` or
``error``, numbered by ``seq``) on ``P/reply/{client}/{id}``, a cancel on
``P/cancel/{client}``. What this client does with them:

* Text goes to ``on_text(text)`` as each ``chunk`` arrives; nothing is kept unless
  ``collect=True`` (then the answer's ``text`` holds it all).
* Every request is JSON (plain text becomes one user message) and carries an ``id`` and
  ``max_packet``, the largest MQTT PUBLISH this device wants to receive; the bridge sizes
  every reply message to fit it.
* ``seq`` order: an earlier ``seq`` again is a copy (QoS 1 redelivery, a replay) and is
  dropped; a later one than expected means messages were lost: :class:`SequenceError`.
* The bridge sends ``progress`` every ``heartbeat_s`` while it holds a request. After
  ``3 * heartbeat_s`` of silence the same request (same id) is sent again, at most
  ``max_resends`` times in a row; after ``idle_timeout_s`` of silence :class:`ReplyTimeout`.
* A bridge that lost the request answers the resend anew from ``seq`` 0. The client
  follows the new answer: copies of what it delivered are dropped, and where the new
  answer differs it calls ``on_restart(kept)``: the first ``kept`` characters already
  given to ``on_text`` stand, the rest is void and the new answer's text follows. Without
  ``on_restart`` that case raises :class:`AnswerChanged` (text was already given out).
* An ``error`` reply raises :class:`BridgeError` (``code``, ``message``, ``retryable``).

MicroPython notes: no allocation per chunk beyond what umqtt.simple reads and
``json.loads`` makes of it (plus 2 bytes of digest per reply message, kept to tell a copy
from a restarted answer); every wait is bounded by a socket timeout.
"""

try:
    import json
except ImportError:  # old MicroPython firmware
    import ujson as json

try:
    import errno
except ImportError:
    import uerrno as errno

import time

try:
    from binascii import crc32 as _crc32
    from binascii import hexlify
except ImportError:
    try:
        from ubinascii import crc32 as _crc32
        from ubinascii import hexlify
    except ImportError:  # a port built without binascii.crc32
        from ubinascii import hexlify

        _crc32 = None

try:
    import socket as _socket
except ImportError:
    try:
        import usocket as _socket
    except ImportError:
        _socket = None

import umqtt.simple as _umqtt_simple
from umqtt.simple import MQTTClient

try:
    _ticks_ms = time.ticks_ms
    _ticks_diff = time.ticks_diff
except AttributeError:  # CPython (tests, host tools): a monotonic millisecond clock

    def _ticks_ms():
        return int(time.monotonic() * 1000)

    def _ticks_diff(new, old):
        return new - old


__version__ = "0.1.0"

HEARTBEAT_S = 5
"""The bridge's default ``heartbeat_s``: a ``progress`` comes at least this often."""
MAX_RESENDS = 3
"""Resends of one request in a row without an answer in between, at most."""
DEFAULT_MAX_PACKET = 1024
"""Largest PUBLISH packet to ask for. umqtt.simple reads every payload whole into one new
bytes object, and ``json.loads`` makes a dict and strings of about the same size again:
1 KiB stays well inside the contiguous free heap of an ESP8266 (about 20-30 KiB free after
WiFi) or an ESP32, and leaves most of the packet for text: topic, header and the JSON
around a chunk's text take about 265 bytes with a 64-character name and id, about 100 with
short ones. Smaller values mean more messages for the same text."""

_IPPROTO_TCP = getattr(_socket, "IPPROTO_TCP", 6)
_TCP_NODELAY = getattr(_socket, "TCP_NODELAY", 1)
_TIMEOUT_ERRNOS = (getattr(errno, "ETIMEDOUT", 110), getattr(errno, "EAGAIN", 11), 110, 116, 11)
_NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"


class LLMError(Exception):
    """Base class of this module's exceptions."""


class BridgeError(LLMError):
    """The bridge answered with an ``error`` message.

    Attributes:
        code: the wire code (``bad_request``, ``busy``, ``backend_unavailable`` ...).
        message: what to change (may be empty: the bridge shortens it to fit max_packet).
        retryable: sending the same request again (same id) may succeed.
        retry_after_ms: wait this long first (``busy``, ``rate_limited``), or None.
        backend_type: llama-server's error type for ``backend_error``, or None.
        request_id: the request's id.
    """

    def __init__(self, code, message, retryable, retry_after_ms=None, backend_type=None,
                 request_id=None):
        super().__init__(code + ": " + message if message else code)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after_ms = retry_after_ms
        self.backend_type = backend_type
        self.request_id = request_id


class ReplyTimeout(LLMError):
    """No message of the request for ``idle_timeout_s``, resends included.

    Attributes:
        request_id: the request's id.
        resends: how often the request was sent again.
    """

    def __init__(self, request_id, seconds, resends):
        super().__init__("no reply for " + str(seconds) + " s (request " + request_id
                         + ", " + str(resends) + " resends); is the bridge running?")
        self.request_id = request_id
        self.resends = resends


class SequenceError(LLMError):
    """A ``seq`` was skipped: reply messages were lost (or an answer restarted out of order).

    Attributes:
        expected: the ``seq`` the next message had to have.
        got: the ``seq`` that came.
    """

    def __init__(self, message, expected=None, got=None):
        super().__init__(message)
        self.expected = expected
        self.got = got


class AnswerChanged(SequenceError):
    """A resend was answered anew, differently from the text given to ``on_text`` already,
    and no ``on_restart`` was given to take the change.

    Attributes:
        kept: characters of the text given out that the new answer repeats.
        given: characters given out.
    """

    def __init__(self, kept, given):
        super().__init__("the answer started again and differs after character " + str(kept)
                         + " of the " + str(given) + " given out; pass on_restart= to follow it")
        self.kept = kept
        self.given = given


class Answer:
    """How a request ended (``done`` or ``reply``).

    Attributes:
        id: the request id.
        type: ``"done"`` (streamed) or ``"reply"`` (``stream: false``, tools).
        finish_reason: ``stop``, ``length``, ``cancelled``, ``cleared`` ...
        usage: llama-server's token counts, or None (the bridge drops it to fit max_packet).
        timings: the bridge's timings, or None (likewise).
        tool_calls: a ``reply``'s tool calls, or None.
        text: the whole text with ``collect=True``, else None.
        pieces: how often text was given to ``on_text``.
        resends: how often the request was sent again after silence.
        restarts: how often the answer started again.
    """

    def __init__(self, request_id):
        self.id = request_id
        self.type = None
        self.finish_reason = None
        self.usage = None
        self.timings = None
        self.tool_calls = None
        self.text = None
        self.pieces = 0
        self.resends = 0
        self.restarts = 0

    def __repr__(self):
        return ("<Answer " + str(self.id) + " " + str(self.type) + " "
                + str(self.finish_reason) + ">")


class _Ask:
    """The state of the request being answered (one at a time)."""

    def __init__(self, request_id, topic, payload, on_text, on_restart, on_event, collect, now):
        self.id = request_id
        self.topic = topic  # bytes: P/reply/{client}/{id}
        self.payload = payload  # bytes, kept for resends
        self.on_text = on_text
        self.on_restart = on_restart
        self.on_event = on_event
        self.parts = [] if collect else None
        self.answer = Answer(request_id)
        self.expected = 0  # the seq the next new message must have
        self.rerun = 0  # copies of seq 0, 1, ... seen again in order (a replay or a restart)
        self.rerun_chars = 0  # characters of text in those copies
        self.given = 0  # characters given to on_text for the current answer
        self.heard = now  # the last message of this request, or the publish
        self.quiet_since = now  # the later of ``heard`` and the last resend
        self.resends_in_row = 0
        self.finished = False
        self.error = None
        self.cancel_wanted = False
        self.cancel_sent = False

    def fail(self, exc):
        if self.error is None:
            self.error = exc
        self.finished = True


class _Net:
    """Stands in for umqtt.simple's ``socket`` module while it connects, so that the
    socket it makes has a timeout (bounding the TCP connect and the CONNACK)."""

    def __init__(self, real, timeout_s):
        self._real = real
        self._timeout_s = timeout_s
        self.made = None

    def socket(self, *args):
        sock = self._real.socket(*args)
        try:  # noqa: SIM105 -- MicroPython has no contextlib
            sock.settimeout(self._timeout_s)
        except (AttributeError, OSError):
            pass
        self.made = sock
        return sock

    def getaddrinfo(self, *args):
        return self._real.getaddrinfo(*args)

    def __getattr__(self, name):
        return getattr(self._real, name)


class _TimedSock:
    """umqtt.simple's socket, with every blocking read bounded.

    umqtt.simple's ``wait_msg`` calls ``setblocking(True)`` after a packet's first byte,
    which on a real socket removes any timeout; here it sets ``timeout_s`` instead, and
    :meth:`arm` sets a shorter wait for the first byte only. ``armed`` tells whether a
    timeout came before the first byte (nothing read: harmless) or within a packet (the
    stream is broken).
    """

    def __init__(self, sock, timeout_s):
        self.sock = sock
        self.timeout_s = timeout_s
        self.armed = False

    def arm(self, timeout_s):
        self.armed = True
        self._timeout(timeout_s)

    def _timeout(self, seconds):
        try:  # noqa: SIM105 -- MicroPython has no contextlib
            self.sock.settimeout(seconds)
        except (AttributeError, OSError):
            pass

    def read(self, n):
        return self.sock.read(n)

    def write(self, buf, n=None):
        if n is None:
            return self.sock.write(buf)
        return self.sock.write(buf, n)

    def setblocking(self, flag):
        if flag:
            self.armed = False
            self._timeout(self.timeout_s)
        else:
            self.sock.setblocking(False)

    def settimeout(self, seconds):
        self._timeout(seconds)

    def setsockopt(self, *args):
        return self.sock.setsockopt(*args)

    def close(self):
        self.sock.close()


def _close(sock):
    try:  # noqa: SIM105 -- MicroPython has no contextlib
        sock.close()
    except (AttributeError, OSError):
        pass


def _is_timeout(exc):
    code = exc.args[0] if exc.args else None
    return code in _TIMEOUT_ERRNOS or code == "timed out"


def _digest(data):
    """16 bits of a payload: tells a copy from a different message of the same ``seq``."""
    if _crc32 is not None:
        return _crc32(data) & 0xFFFF
    value = 5381
    for byte in data:
        value = ((value << 5) + value + byte) & 0xFFFF
    return value


def _new_id():
    try:
        import os

        raw = os.urandom(6)
    except (ImportError, AttributeError, OSError, NotImplementedError):
        import random

        raw = bytes([random.getrandbits(8) for _ in range(6)])
    return hexlify(raw).decode()


def _check_name(what, name):
    if not 1 <= len(name) <= 64 or name[0] in "_.-":
        raise ValueError(what + " must be 1-64 characters of [A-Za-z0-9_.-], "
                         "starting with a letter or digit")
    for char in name:
        if char not in _NAME_CHARS:
            raise ValueError(what + " may not contain " + repr(char))


class LLMBridge:
    """A device's connection to the bridge: one request at a time, answered by :meth:`ask`.

    Args:
        client: this device's name: the ``{client}`` topic level and the MQTT client id.
        server: the broker's host name or address.
        port: the broker's port (0: 1883, or 8883 with ``ssl``).
        prefix: the bridge's topic prefix.
        user, password: broker credentials.
        qos: 0 or 1, for the request and the reply subscription (umqtt.simple speaks
            MQTT 3.1.1 and has no QoS 2).
        max_packet: the largest PUBLISH packet (header, topic, payload) to receive; sent
            as ``max_packet`` in every request (see :data:`DEFAULT_MAX_PACKET`).
        heartbeat_s: the bridge's ``heartbeat_s``; silence of three of them means the
            request or its answer was lost, and the request is sent again.
        max_resends: resends in a row without an answer, at most.
        idle_timeout_s: silence after which :meth:`ask` gives up (default
            ``(max_resends + 1) * 3 * heartbeat_s``: 60 s).
        socket_timeout_s: bound on connecting and on every read within a packet.
        keepalive: MQTT keepalive in seconds (0: none); :meth:`ask` pings while it waits.
        ssl, ssl_params: TLS, passed to umqtt.simple when given: ``ssl=True`` and
            ``ssl_params`` for umqtt.simple 1.3, an ``ssl.SSLContext`` for 1.4 and later.
        mqtt: an MQTTClient-like object to use instead of a new ``umqtt.simple.MQTTClient``
            (umqtt.robust, or a test double).
        clock: a millisecond clock (default ``time.ticks_ms``); differences are taken
            with ``time.ticks_diff`` where it exists.
    """

    def __init__(self, client, server, port=0, prefix="llm", user=None, password=None,
                 qos=1, max_packet=DEFAULT_MAX_PACKET, heartbeat_s=HEARTBEAT_S,
                 max_resends=MAX_RESENDS, idle_timeout_s=None, socket_timeout_s=10,
                 keepalive=60, ssl=False, ssl_params=None, mqtt=None, clock=None):
        _check_name("client", client)
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        if not isinstance(max_packet, int) or max_packet < 1:
            raise ValueError("max_packet must be a positive int")
        self.client = client
        self.server = server
        self.port = port
        self.qos = qos
        self.max_packet = max_packet
        self.heartbeat_s = heartbeat_s
        self.max_resends = max_resends
        self.resend_ms = int(3 * heartbeat_s * 1000)
        if idle_timeout_s is None:
            idle_timeout_s = (max_resends + 1) * 3 * heartbeat_s
        self.idle_timeout_s = idle_timeout_s
        self.idle_ms = int(idle_timeout_s * 1000)
        self.socket_timeout_s = socket_timeout_s
        self.keepalive = keepalive
        self._clock = clock or _ticks_ms
        self._request_topic = (prefix + "/request/" + client).encode()
        self._cancel_topic = (prefix + "/cancel/" + client).encode()
        self._reply_prefix = prefix + "/reply/" + client + "/"
        if mqtt is None:
            args = (client.encode(), server, port, user, password, keepalive)
            if ssl_params:  # umqtt.simple 1.3 (and 1.7's legacy form): ssl=True + params
                mqtt = MQTTClient(*args, ssl=ssl, ssl_params=ssl_params)
            elif ssl:  # umqtt.simple >= 1.4: an SSLContext; 1.3: True
                mqtt = MQTTClient(*args, ssl=ssl)
            else:
                mqtt = MQTTClient(*args)
        self._mqtt = mqtt
        self._mqtt.set_callback(self._on_message)  # bound once: no allocation per message
        self._tsock = None
        self._st = None
        self._digests = bytearray(128)  # 2 bytes per seq, grown by doubling, reused
        self._last_out = self._clock()
        self.connected = False
        self.undecodable = 0  # payloads on a reply topic of ours that were not reply messages

    # ------------------------------------------------------------------ connection

    def connect(self):
        """Connect (clean session), set TCP_NODELAY, subscribe to ``P/reply/{client}/+``.

        Raises:
            OSError: the broker is unreachable or does not answer in ``socket_timeout_s``.
            umqtt.simple.MQTTException: the broker refused the connection.
        """
        self.close()
        mqtt = self._mqtt
        real = getattr(_umqtt_simple, "socket", None)
        net = None
        if real is not None:
            net = _Net(real, self.socket_timeout_s)
            _umqtt_simple.socket = net
        try:
            try:  # umqtt.simple >= 1.5 takes a timeout, and sets it on its socket itself
                mqtt.connect(True, self.socket_timeout_s)
            except TypeError:  # older ones take none: the _Net stand-in sets it
                mqtt.connect(True)
        except Exception:
            if net is not None and net.made is not None:
                _close(net.made)  # sockets are few on a microcontroller: never leak one
            raise
        finally:
            if net is not None:
                _umqtt_simple.socket = real
        raw = net.made if net is not None else None
        if raw is not None:
            # A request or cancel must not wait for the broker's delayed ACK.
            try:  # noqa: SIM105 -- MicroPython has no contextlib
                raw.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
            except (AttributeError, OSError, TypeError):
                pass  # many ports have no TCP_NODELAY
        sock = getattr(mqtt, "sock", None)
        if sock is not None and not isinstance(sock, _TimedSock):
            self._tsock = _TimedSock(sock, self.socket_timeout_s)
            mqtt.sock = self._tsock
            self._tsock.setblocking(True)
        self.connected = True
        self._guard(mqtt.subscribe, (self._reply_prefix + "+").encode(), self.qos)
        self._last_out = self._clock()
        return self

    def close(self):
        """Disconnect (best effort; never raises)."""
        if self.connected:
            self.connected = False
            try:  # noqa: SIM105 -- MicroPython has no contextlib
                self._mqtt.disconnect()
            except Exception:  # a dead connection is closed all the same
                pass
            sock = getattr(self._mqtt, "sock", None)
            if sock is not None:  # disconnect() does not close it when its write fails
                _close(sock)
        self._tsock = None

    def __enter__(self):
        return self.connect()

    def __exit__(self, *exc):
        self.close()

    def ping(self):
        """Keep the connection alive between asks (at least every ``keepalive / 2`` s);
        connects if it is not connected."""
        if not self.connected:
            self.connect()
            return
        self._guard(self._mqtt.ping)
        self._last_out = self._clock()

    def _guard(self, call, *args):
        """Run an umqtt.simple call; a broken stream (its asserts, reads of nothing) is
        an OSError, and the connection is closed."""
        if self._tsock is not None:
            self._tsock.setblocking(True)  # the full socket timeout for acks
        try:
            return call(*args)
        except (IndexError, AssertionError) as exc:
            self.close()
            raise OSError("MQTT connection broken: " + repr(exc)) from None
        except OSError:
            self.close()
            raise

    def _publish(self, topic, payload):
        self._guard(self._mqtt.publish, topic, payload, False, self.qos)
        self._last_out = self._clock()

    def _pump(self, wait_ms):
        """Wait up to ``wait_ms`` for one packet and handle it."""
        sock = self._tsock
        if sock is not None:
            sock.arm(max(wait_ms, 1) / 1000)
        try:
            op = self._mqtt.wait_msg()
        except OSError as exc:
            if _is_timeout(exc) and (sock is None or sock.armed):
                return  # nothing arrived: not an error
            self.close()
            raise
        except (IndexError, AssertionError) as exc:
            self.close()
            raise OSError("MQTT connection broken: " + repr(exc)) from None
        finally:
            if sock is not None:
                sock.setblocking(True)
        if op is not None and op & 0xF0 != 0x30 and sock is not None:
            self._skip(sock)  # umqtt.simple >= 1.4 also returns the op of a PUBLISH it handled

    def _skip(self, sock):
        """Read past a packet umqtt.simple returned unread (a stray ack)."""
        length = 0
        shift = 0
        while True:
            byte = sock.read(1)[0]
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
        if length:
            sock.read(length)

    # ------------------------------------------------------------------ asking

    def ask(self, request, on_text=None, collect=False, on_restart=None, on_event=None,
            **fields):
        """Send one request and wait for its end, giving text to ``on_text`` as it comes.

        Args:
            request: plain text (one user message), a list of chat messages, or a dict:
                the JSON request (``messages`` or ``prompt``, sampling fields ...); the
                caller's dict is not changed. ``id`` is added if missing, ``max_packet``
                always.
            on_text: called with each new piece of text (``chunk`` text, a ``reply``'s
                content).
            collect: keep the text and return it as ``answer.text``.
            on_restart: called with ``kept`` when a resend was answered anew and the
                new answer differs: keep the first ``kept`` characters given out so far
                and drop the rest; the new text follows through ``on_text``.
            on_event: called with every new reply message (a dict), ``start`` and
                ``progress`` included.
            fields: more request fields (``max_tokens=32``, ``temperature=0`` ...).

        Returns:
            Answer: ``finish_reason``, ``usage`` and ``timings`` when the bridge sent them.

        Raises:
            BridgeError: the bridge answered ``error``.
            ReplyTimeout: nothing came for ``idle_timeout_s``, resends included.
            SequenceError: messages were lost (a ``seq`` gap).
            AnswerChanged: see ``on_restart``.
            OSError: the MQTT connection failed (call :meth:`connect` and ask again).
        """
        if self._st is not None:
            raise LLMError("ask() is already running (called from a callback?)")
        payload, request_id = self._request(request, fields)
        if not self.connected or self._stale():
            self.connect()
        st = _Ask(request_id, (self._reply_prefix + request_id).encode(), payload, on_text,
                  on_restart, on_event, collect, self._clock())
        self._st = st
        try:
            self._publish(self._request_topic, payload)
            now = self._clock()
            st.heard = st.quiet_since = now
            self._run(st)
        except BaseException as exc:
            if not isinstance(exc, ReplyTimeout):
                # MemoryError, KeyboardInterrupt ... may have come in the middle of a
                # packet: the stream cannot be trusted; the next ask connects again.
                self.close()
            raise
        finally:
            self._st = None
        if st.error is not None:
            if not isinstance(st.error, (BridgeError, ReplyTimeout)) and self.connected:
                # The answer is of no use any more: free the bridge's slot.
                try:  # noqa: SIM105 -- MicroPython has no contextlib
                    self.cancel(request_id)
                except OSError:
                    pass
            raise st.error
        answer = st.answer
        if st.parts is not None:
            answer.text = "".join(st.parts)
        return answer

    def cancel(self, request_id=None):
        """Ask the bridge to stop a request; its answer ends ``done`` ``cancelled``.

        Within :meth:`ask` (from ``on_text``), the running request is cancelled once the
        current message is handled; otherwise ``request_id`` is published at once.
        """
        st = self._st
        if st is not None and (request_id is None or request_id == st.id):
            st.cancel_wanted = True
            return
        if request_id is None:
            raise ValueError("no ask is running: name the request id to cancel")
        self._publish(self._cancel_topic, json.dumps({"id": request_id}).encode())

    def _request(self, request, fields):
        if isinstance(request, dict):
            body = dict(request)
        elif isinstance(request, list):
            body = {"messages": request}
        elif isinstance(request, (str, bytes)):
            if isinstance(request, bytes):
                request = request.decode()
            body = {"messages": [{"role": "user", "content": request}]}
        else:
            raise TypeError("request must be text, a list of messages or a dict")
        body.update(fields)
        request_id = body.get("id")
        if request_id is None:
            request_id = body["id"] = _new_id()
        if not isinstance(request_id, str):
            raise ValueError("id must be a string")
        _check_name("id", request_id)
        wanted = body.get("max_packet")
        if not isinstance(wanted, int) or wanted > self.max_packet:
            body["max_packet"] = self.max_packet
        return json.dumps(body).encode(), request_id

    def _stale(self):
        """No packet sent for a keepalive: the broker may have dropped the connection
        (it does after 1.5 keepalives), so :meth:`ask` connects again first."""
        idle = _ticks_diff(self._clock(), self._last_out)
        return self.keepalive and idle >= self.keepalive * 1000

    def _run(self, st):
        while not st.finished:
            if st.cancel_wanted and not st.cancel_sent:
                st.cancel_sent = True
                self._publish(self._cancel_topic, json.dumps({"id": st.id}).encode())
            now = self._clock()
            if _ticks_diff(now, st.heard) >= self.idle_ms:
                raise ReplyTimeout(st.id, self.idle_timeout_s, st.answer.resends)
            if (st.resends_in_row < self.max_resends
                    and _ticks_diff(now, st.quiet_since) >= self.resend_ms):
                st.resends_in_row += 1
                st.answer.resends += 1
                self._publish(self._request_topic, st.payload)
                st.quiet_since = now = self._clock()
            wait = self.idle_ms - _ticks_diff(now, st.heard)
            if st.resends_in_row < self.max_resends:
                wait = min(wait, self.resend_ms - _ticks_diff(now, st.quiet_since))
            if self.keepalive:
                ping_in = self.keepalive * 500 - _ticks_diff(now, self._last_out)
                if ping_in <= 0:
                    self.ping()
                    ping_in = self.keepalive * 500
                wait = min(wait, ping_in)
            self._pump(wait)

    # ------------------------------------------------------------------ reply messages

    def _on_message(self, topic, payload):
        """umqtt.simple's callback: one PUBLISH on ``P/reply/{client}/+``."""
        st = self._st
        if st is None or st.finished or topic != st.topic:
            return  # another request's message (an earlier one ended or given up)
        try:
            msg = json.loads(payload)
            seq = msg["seq"]
            kind = msg["type"]
            if msg.get("id") != st.id or not isinstance(seq, int) or seq < 0:
                raise ValueError
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            self.undecodable += 1
            return
        st.heard = st.quiet_since = self._clock()
        digest = _digest(payload)
        if seq == st.expected:
            st.rerun = 0
            st.rerun_chars = 0
            self._accept(st, msg, kind, seq, digest)
        elif seq > st.expected:
            st.fail(SequenceError("expected seq " + str(st.expected) + ", got " + str(seq)
                                  + ": messages of request " + st.id + " were lost",
                                  st.expected, seq))
        else:
            self._earlier(st, msg, kind, seq, digest)

    def _earlier(self, st, msg, kind, seq, digest):
        """A ``seq`` handed over already: a copy, or the answer starting again."""
        i = 2 * seq
        if (self._digests[i] << 8 | self._digests[i + 1]) == digest:
            # A copy. Copies of seq 0, 1, ... in order may be a new answer repeating the
            # first one: count what they repeat until it catches up or differs.
            if seq == st.rerun:
                st.rerun += 1
                st.rerun_chars += len(_text_of(msg, kind))
            return
        if seq != st.rerun:
            st.fail(SequenceError("request " + st.id + "'s answer started again (seq "
                                  + str(seq) + " differs from the first answer's), but only "
                                  + str(st.rerun) + " messages of it came before",
                                  st.rerun, seq))
            return
        kept = st.rerun_chars
        given = st.given
        st.answer.restarts += 1
        st.given = kept
        st.rerun = 0
        st.rerun_chars = 0
        if st.parts is not None:
            text = "".join(st.parts)[:kept]
            st.parts = [text] if text else []
        if st.on_restart is not None:
            try:
                st.on_restart(kept)
            except Exception as exc:  # raised by ask(), not into umqtt
                st.fail(exc)
                return
        elif st.on_text is not None and given > kept:
            st.fail(AnswerChanged(kept, given))
            return
        self._accept(st, msg, kind, seq, digest)

    def _accept(self, st, msg, kind, seq, digest):
        """The next message of the answer."""
        i = 2 * seq
        if i + 2 > len(self._digests):
            self._digests.extend(bytes(len(self._digests)))
        self._digests[i] = digest >> 8
        self._digests[i + 1] = digest & 0xFF
        st.expected = seq + 1
        st.resends_in_row = 0
        try:
            if st.on_event is not None:
                st.on_event(msg)
            text = _text_of(msg, kind)
            if text:
                st.given += len(text)
                st.answer.pieces += 1
                if st.parts is not None:
                    st.parts.append(text)
                if st.on_text is not None:
                    st.on_text(text)
        except Exception as exc:  # raised by ask(), not into umqtt
            st.fail(exc)
            return
        if kind == "done" or kind == "reply":
            answer = st.answer
            answer.type = kind
            answer.finish_reason = msg.get("finish_reason")
            answer.usage = msg.get("usage")
            answer.timings = msg.get("timings")
            answer.tool_calls = msg.get("tool_calls")
            st.finished = True
        elif kind == "error":
            st.fail(BridgeError(msg.get("code") or "internal", msg.get("message") or "",
                                msg.get("retryable") is True, msg.get("retry_after_ms"),
                                msg.get("backend_type"), st.id))


def _text_of(msg, kind):
    """The text a message adds to the answer ("" for none)."""
    if kind == "chunk":
        text = msg.get("text")
    elif kind == "reply":
        text = msg.get("content")
    else:
        return ""
    return text if isinstance(text, str) else ""
