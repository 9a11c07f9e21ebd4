"""One plain paho publisher, as fast as paho and the broker allow: the limit a bridge works under.

Publishes payloads of ``--size`` bytes on one topic at ``--qos`` for ``--duration``
seconds, with the same flow control as the bridge's :class:`bridge.mqtt.link.MqttLink`
(at most ``--window`` messages handed to paho and not yet acknowledged -- at QoS 0:
not yet written, seen through their ``MQTTMessageInfo`` without an ``on_publish`` --,
paho's in-flight window at its default of 20, TCP_NODELAY) but nothing else: no JSON,
no chunking, no MQTT 5 properties. A :mod:`bench.device` ``count`` subscriber measures what arrives.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.device import no_delay


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rawpub")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--qos", type=int, default=1)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--topic", default="bench/raw")
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--window", type=int, default=1000)
    p.add_argument("--inflight", type=int, default=20)
    p.add_argument("--v5", action="store_true")
    a = p.parse_args(argv)

    cond = threading.Condition()
    outstanding = 0
    connected = threading.Event()

    def on_publish(*_: Any) -> None:
        nonlocal outstanding
        with cond:
            outstanding -= 1
            cond.notify()

    c = no_delay(mqtt.Client(CallbackAPIVersion.VERSION2,
                             client_id=f"bench-rawpub-{time.time_ns()}",
                             protocol=mqtt.MQTTv5 if a.v5 else mqtt.MQTTv311))
    c.max_inflight_messages_set(a.inflight)
    c.max_queued_messages_set(0)
    c.on_connect = lambda *_: connected.set()
    unwritten: collections.deque[mqtt.MQTTMessageInfo] = collections.deque()
    if a.qos > 0:
        c.on_publish = on_publish
    c.connect(a.host, a.port, keepalive=60)
    c.loop_start()
    if not connected.wait(10):
        raise SystemExit("rawpub: no CONNACK within 10 s")
    body = b'{"type":"chunk","id":"r1","seq":1,"text":"'
    payload = (body + b"x" * max(0, a.size - len(body) - 2) + b'"}')[:max(a.size, 1)]
    sent = 0
    cpu0 = time.process_time()
    t0 = time.monotonic()
    end = t0 + a.duration
    while time.monotonic() < end:
        for _ in range(100):
            if a.qos == 0:  # as MqttLink does at QoS 0
                while True:
                    while unwritten and (unwritten[0].rc != mqtt.MQTT_ERR_SUCCESS
                                         or unwritten[0].is_published()):
                        unwritten.popleft()
                    if len(unwritten) < a.window:
                        break
                    time.sleep(0.005)
                info = c.publish(a.topic, payload, qos=0)
                if info.rc == mqtt.MQTT_ERR_SUCCESS:
                    unwritten.append(info)
            else:
                with cond:
                    while outstanding >= a.window:
                        cond.wait(0.5)
                    outstanding += 1
                c.publish(a.topic, payload, qos=a.qos)
            sent += 1
    with cond:  # let the window drain (bounded)
        cond.wait_for(lambda: outstanding <= 0, 10)
    drain_end = time.monotonic() + 10
    while unwritten and not unwritten[-1].is_published() and time.monotonic() < drain_end:
        unwritten[-1].wait_for_publish(0.1)
    elapsed = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    c.disconnect()
    c.loop_stop()
    print(json.dumps({"sent": sent, "seconds": round(elapsed, 3), "pub_per_s": sent / elapsed,
                      "cpu_pct": 100 * cpu / elapsed, "us_per_msg": 1e6 * cpu / max(sent, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
