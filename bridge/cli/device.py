"""``llamacpp-mqtt-bridge ask`` and ``status``: the commands that talk to a bridge as a device.

Both connect to the broker with :class:`bridge.mqtt.device.BridgeClient`, as any device
would, and print what comes back.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from bridge.cli.exits import EXIT_ERROR_REPLY, EXIT_NO_ANSWER, EXIT_OK
from bridge.config.settings import DeploymentConfig


def ask(cfg: DeploymentConfig, args: argparse.Namespace) -> int:
    """Publish one prompt, print the answer as it streams, then a summary line."""
    from bridge.mqtt.device import BridgeClient
    from bridge.protocol.errors import ReplyTimeout, SequenceError

    request: dict[str, Any] = {"messages": [{"role": "user", "content": args.prompt}]}
    for key in ("max_tokens", "temperature", "seed", "chunk_bytes", "max_packet", "session",
                "profile"):
        if getattr(args, key) is not None:
            request[key] = getattr(args, key)
    client = BridgeClient(cfg.mqtt, prefix=cfg.prefix,
                          client=args.client or f"ask-{int(time.time() * 1000) % 10**8}")
    t0 = time.monotonic()
    first: float | None = None
    try:
        client.connect()
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_ANSWER
    try:
        for msg in client.ask(request, idle_timeout=args.timeout):
            if args.json:
                # what arrived, not the defaults of fields a small max_packet left out
                print(msg.model_dump_json(exclude_none=True, exclude_unset=True), flush=True)
            if msg.type == "chunk" and msg.text is not None:
                first = first or time.monotonic()
                if not args.json:
                    sys.stdout.write(msg.text)
                    sys.stdout.flush()
            elif msg.type == "reply" and not args.json:
                print(msg.content or json.dumps(msg.tool_calls), end="")
            elif msg.type == "error":
                why = msg.message or "(no message: it did not fit max_packet)"
                print(f"\nerror [{msg.code}]: {why}", file=sys.stderr)
                return EXIT_ERROR_REPLY
            elif msg.type in ("done", "reply"):
                total = time.monotonic() - t0
                ttft = f"{(first - t0) * 1000:.0f} ms" if first else "-"
                tps = msg.timings.tokens_per_s
                # A small max_packet may have left the counts out: say so, do not print 0.
                tokens = f"{msg.usage.completion_tokens} tokens" \
                    if "completion_tokens" in msg.usage.model_fields_set else "tokens not sent"
                print(f"\n[{msg.finish_reason}] {tokens}, "
                      f"first token {ttft}, total {total:.2f} s"
                      + (f", {tps:.1f} tokens/s" if tps else ""), file=sys.stderr)
        return EXIT_OK
    except (ReplyTimeout, SequenceError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return EXIT_NO_ANSWER
    finally:
        client.close()


def status(cfg: DeploymentConfig, timeout: float) -> int:
    """Print the retained status message of every bridge under the prefix."""
    from bridge.mqtt.device import BridgeClient

    client = BridgeClient(cfg.mqtt, prefix=cfg.prefix)
    try:
        client.connect()
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_ANSWER
    seen: dict[str, dict[str, Any]] = {}
    try:
        client.subscribe(cfg.topics.status_filter())
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            got = client.next_message(timeout=min(left, 0.5 if seen else left))
            if got is None:
                if seen:
                    break  # retained messages arrive at once; a quiet half second ends it
                continue
            topic, payload = got
            try:
                seen[topic] = json.loads(payload)
            except ValueError:
                seen[topic] = {"state": "unreadable", "raw": payload[:80].decode("latin-1")}
    finally:
        client.close()
    if not seen:
        print(f"no bridge status under {cfg.prefix}/status/+", file=sys.stderr)
        return EXIT_NO_ANSWER
    for topic, body in sorted(seen.items()):
        backends = ", ".join(f"{b.get('name')} {'ok' if b.get('healthy') else 'DOWN'}"
                             f" ({b.get('active', 0)}/{b.get('slots', '?')} busy)"
                             for b in body.get("backends", []))
        print(f"{topic}: {body.get('state')}"
              + (f", mqtt {body['mqtt']}" if "mqtt" in body else "")
              + (f", queued {body.get('queued', 0)}, active {body.get('active', 0)}"
                 if body.get("state") == "online" else f" ({body.get('reason', '')})")
              + (f", backends: {backends}" if backends else "")
              + (f", stats {json.dumps(body['stats'])}" if "stats" in body else ""))
    return EXIT_OK
