"""Observability: Prometheus metrics, the per-request log line, the status ``stats`` (SPEC §7)."""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from bridge.backends import Backend
from bridge.client import BridgeClient
from bridge.config import MqttSettings, load_config
from bridge.llama_client import LlamaCppClient
from bridge.metrics import BridgeMetrics, LiveState, MetricsError, outcome_label
from bridge.service import Bridge
from bridge.wire import Timings, Usage
from tests.support.bridge_proc import running_bridge
from tests.support.processes import EmbeddedBroker, free_port
from tests.support.recorder import Recorder, check_reply_stream

TIMEOUT = 120.0


def _samples(exposition: bytes | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of a Prometheus text exposition."""
    text = exposition.decode() if isinstance(exposition, bytes) else exposition
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _live(backends: list[Backend] | None = None) -> LiveState:
    return LiveState(queued=lambda: 3, active=lambda: 2, backends=lambda: backends or [],
                     published=lambda: (10, 2048), accepted=lambda: 7)


def test_outcome_labels() -> None:
    assert [outcome_label(o) for o in ("done", "reply", "cancelled", "expired", "error:timeout",
                                       "error:backend_error", "error:", "?")] == \
        ["done", "reply", "cancelled", "expired", "timeout", "backend_error", "internal",
         "unknown"]


def test_metrics_of_one_bridge_are_private_and_complete() -> None:
    backend = Backend("http://127.0.0.1:9", LlamaCppClient("http://127.0.0.1:9"),
                      healthy=True, slots=4, active=1)
    first = BridgeMetrics("b1", "0.1.0", _live([backend]))
    second = BridgeMetrics("b2", "0.1.0", _live())  # a second registry: no name clash
    first.request_finished("done", backend.url,
                           Timings(queue_ms=5, ttft_ms=120, total_ms=900, tokens_per_s=42.0),
                           Usage(prompt_tokens=11, completion_tokens=30))
    first.request_finished("error:timeout", None,
                           Timings(queue_ms=1, ttft_ms=None, total_ms=600_000), Usage())
    first.request_rejected("bad_request")
    first.request_rejected("bad_request")
    first.request_rejected("busy")

    s = _samples(first.exposition())
    assert s[("llm_bridge_info", (("bridge_id", "b1"), ("version", "0.1.0")))] == 1
    assert s[("llm_bridge_requests_accepted_total", ())] == 7
    assert s[("llm_bridge_requests_total", (("outcome", "done"),))] == 1
    assert s[("llm_bridge_requests_total", (("outcome", "timeout"),))] == 1
    assert s[("llm_bridge_requests_rejected_total", (("code", "bad_request"),))] == 2
    assert s[("llm_bridge_requests_rejected_total", (("code", "busy"),))] == 1
    assert s[("llm_bridge_queue_depth", ())] == 3
    assert s[("llm_bridge_active_requests", ())] == 2
    assert s[("llm_bridge_published_messages_total", ())] == 10
    assert s[("llm_bridge_published_bytes_total", ())] == 2048
    assert s[("llm_bridge_tokens_total", (("kind", "completion"),))] == 30
    url = (("backend", backend.url),)
    assert s[("llm_bridge_backend_healthy", url)] == 1
    assert s[("llm_bridge_backend_slots", url)] == 4
    assert s[("llm_bridge_backend_active", url)] == 1
    assert s[("llm_bridge_backend_requests_total", url)] == 1
    # histograms: one TTFT (the timed-out request had none), bucket bounds as documented
    assert s[("llm_bridge_time_to_first_token_seconds_count", ())] == 1
    assert s[("llm_bridge_time_to_first_token_seconds_bucket", (("le", "0.1"),))] == 0
    assert s[("llm_bridge_time_to_first_token_seconds_bucket", (("le", "0.25"),))] == 1
    assert s[("llm_bridge_tokens_per_second_bucket", (("le", "50.0"),))] == 1
    assert s[("llm_bridge_tokens_per_second_bucket", (("le", "30.0"),))] == 0
    assert s[("llm_bridge_request_duration_seconds_count", ())] == 2
    assert s[("llm_bridge_request_duration_seconds_bucket", (("le", "600.0"),))] == 2

    other = _samples(second.exposition())
    assert ("llm_bridge_requests_total", (("outcome", "done"),)) not in other
    assert other[("llm_bridge_time_to_first_token_seconds_count", ())] == 0

    snap = first.snapshot()
    assert snap["outcomes"] == {"done": 1, "timeout": 1}
    assert snap["rejected_by_code"] == {"bad_request": 2, "busy": 1}
    assert (snap["published_messages"], snap["published_bytes"]) == (10, 2048)
    assert snap["uptime_s"] >= 0


def test_metrics_port_taken_fails_before_anything_starts(amqtt_broker: EmbeddedBroker) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = load_config(mqtt={"host": amqtt_broker.host, "port": amqtt_broker.port},
                          llama={"urls": ["http://127.0.0.1:9"]}, metrics_port=port,
                          bridge_id="metrics-taken")
        bridge = Bridge(cfg, cfg.llama.urls)
        with pytest.raises(MetricsError, match=f"127.0.0.1:{port}"):
            bridge.start()
        assert bridge.workers is None and not bridge.link.connected


def test_metrics_endpoint_log_line_and_status_stats(
    amqtt_broker: EmbeddedBroker, llama_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    settings = MqttSettings(host=amqtt_broker.host, port=amqtt_broker.port)
    caplog.set_level(logging.INFO, logger="bridge.requests")
    rec = Recorder(amqtt_broker.host, amqtt_broker.port, topic_filter="llm/status/metrics-e2e")
    try:
        with running_bridge(amqtt_broker.host, amqtt_broker.port, [llama_server],
                            bridge_id="metrics-e2e", metrics_port=port,
                            status_interval_s=0.5) as bridge, \
                BridgeClient(settings, client="dev-metrics") as dev:
            assert bridge.metrics_port == port
            # loopback only by default (prometheus-client alone would bind 0.0.0.0)
            assert bridge.metrics._server.server_address[0] == "127.0.0.1"
            msgs = list(dev.ask({"id": "m-1", "prompt": "Hello", "max_tokens": 8},
                                idle_timeout=TIMEOUT))
            check_reply_stream(msgs)
            assert msgs[-1].type == "done"
            bad = list(dev.ask({"id": "m-2", "prompt": "x", "colour": "red"},
                               idle_timeout=TIMEOUT))
            assert bad[-1].type == "error" and bad[-1].code == "bad_request"

            resp = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
            assert resp.status_code == 200
            s = _samples(resp.text)
            published = (bridge.link.published, bridge.link.published_bytes)

            # the status message carries the same counters, and goes out periodically
            since = len(rec.messages)
            assert rec.wait_for(lambda ms: len(ms) > since + 1, 10)
            status = json.loads(rec.messages[-1].payload)
    finally:
        rec.close()

    assert s[("llm_bridge_requests_accepted_total", ())] == 1
    assert s[("llm_bridge_requests_total", (("outcome", "done"),))] == 1
    assert s[("llm_bridge_requests_rejected_total", (("code", "bad_request"),))] == 1
    assert s[("llm_bridge_time_to_first_token_seconds_count", ())] == 1
    assert s[("llm_bridge_tokens_total", (("kind", "completion"),))] == \
        msgs[-1].usage.completion_tokens
    # every message of the request (and the error, and status) was counted
    assert s[("llm_bridge_published_messages_total", ())] >= len(msgs) + 1
    assert 0 < s[("llm_bridge_published_messages_total", ())] <= published[0]
    assert 0 < s[("llm_bridge_published_bytes_total", ())] <= published[1]
    url = (("backend", llama_server),)
    assert s[("llm_bridge_backend_healthy", url)] == 1
    assert s[("llm_bridge_backend_slots", url)] == 2
    assert s[("llm_bridge_backend_requests_total", url)] == 1
    assert s[("llm_bridge_queue_depth", ())] == 0

    stats: dict[str, Any] = status["stats"]
    assert status["state"] == "online"
    assert stats["accepted"] == 1 and stats["rejected"] == 1
    assert stats["outcomes"] == {"done": 1} and stats["rejected_by_code"] == {"bad_request": 1}
    assert stats["published_messages"] > 0 and stats["published_bytes"] > 0
    assert stats["uptime_s"] > 0 and stats["completion_tokens"] > 0

    # one line per request: id, client, tokens, ttft, duration, outcome
    lines = [r.getMessage() for r in caplog.records if r.name == "bridge.requests"]
    done = next(ln for ln in lines if "id=m-1 " in ln)
    for field in ("client=dev-metrics", "outcome=done", f"backend={llama_server}",
                  f"completion_tokens={msgs[-1].usage.completion_tokens}", "ttft_ms=",
                  "total_ms=", "tokens_per_s="):
        assert field in done, (field, done)
    rejected = next(ln for ln in lines if "id=m-2 " in ln)
    assert "outcome=error code=bad_request" in rejected and "client=dev-metrics" in rejected
