"""Observability: Prometheus metrics, the per-request log line, the status ``stats``."""

from __future__ import annotations

import json
import logging
import re
import socket
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from bridge.config.settings import MqttSettings, load_config
from bridge.llama.client import LlamaCppClient
from bridge.llama.pool import Backend
from bridge.mqtt.device import BridgeClient
from bridge.protocol.address import ReplyAddress
from bridge.protocol.messages import TERMINAL_TYPES, BridgeRequest, ErrorCode, Timings, Usage
from bridge.service.bridge import Bridge
from bridge.service.intake import Accepted
from bridge.service.job import Job, Outcome, outcome_label
from bridge.service.metrics import BridgeMetrics, LiveState, MetricsError
from bridge.service.reply import ReplyChannel
from tests.support.bridge_proc import running_bridge
from tests.support.processes import BrokerInfo, EmbeddedBroker, free_port
from tests.support.publisher import RecordingPublisher
from tests.support.recorder import Recorder, check_reply_stream
from tests.support.waiting import REPLY_TIMEOUT as TIMEOUT
from tests.support.waiting import poll_until


def _samples(exposition: bytes | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of a Prometheus text exposition."""
    text = exposition.decode() if isinstance(exposition, bytes) else exposition
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _live(backends: list[Backend] | None = None) -> LiveState:
    return LiveState(queued=lambda: 3, active=lambda: 2, backends=lambda: backends or [],
                     published=lambda: (10, 2048))


def test_outcome_labels() -> None:
    assert [outcome_label(*o) for o in (
        (Outcome.done,), (Outcome.reply,), (Outcome.cancelled,), (Outcome.expired,),
        (Outcome.error, ErrorCode.timeout), (Outcome.error, ErrorCode.backend_error),
        (Outcome.error,), (Outcome.unknown,))] == \
        ["done", "reply", "cancelled", "expired", "timeout", "backend_error", "internal",
         "unknown"]


def test_request_log_outcome_and_label_of_a_job() -> None:
    reply = ReplyAddress("llm/reply/dev/r1", "r1")
    acc = Accepted("dev", BridgeRequest(prompt="x"), reply, None, 0.0, 512, 16)
    publisher = RecordingPublisher()
    job = Job(acc, ReplyChannel(publisher, reply, chunk_bytes=512, flush_s=0.0), deadline=0.0)

    def seen() -> tuple[str, str, bool]:
        return (job.outcome_text, job.label, job.ended_in_error)

    assert seen() == ("?", "unknown", False)
    job.outcome = Outcome.done
    assert seen() == ("done", "done", False)
    job.outcome = Outcome.publish_failed
    assert seen() == ("publish_failed", "publish_failed", False)
    job.failed(ErrorCode.timeout)
    assert seen() == ("error:timeout", "timeout", True)
    job.outcome = Outcome.shutdown
    assert seen() == ("error:shutdown", "shutdown", True)
    assert publisher.sent == []  # naming the outcome publishes nothing


def test_metrics_of_one_bridge_are_private_and_complete() -> None:
    backend = Backend("http://127.0.0.1:9", LlamaCppClient("http://127.0.0.1:9"),
                      name="gpu-a", healthy=True, slots=4, active=1)
    first = BridgeMetrics("b1", "0.1.0", _live([backend]))
    second = BridgeMetrics("b2", "0.1.0", _live())  # a second registry: no name clash
    for _ in range(7):
        first.request_accepted()
    first.request_finished("done", backend.url,
                           Timings(queue_ms=5, ttft_ms=120, total_ms=900, tokens_per_s=42.0,
                                   cache_n=8, prompt_n=3),
                           Usage(prompt_tokens=11, completion_tokens=30))
    first.request_finished("timeout", None,
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
    assert s[("llm_bridge_llama_prompt_tokens_total", (("source", "cache"),))] == 8
    assert s[("llm_bridge_llama_prompt_tokens_total", (("source", "read"),))] == 3
    url = (("backend", backend.url), ("name", backend.name))
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
    # the status `stats` counters are read from the same counts, first in the object
    assert first.summary() == {"accepted": 7, "rejected": 3, "done": 1, "errors": 1,
                               "cancelled": 0}
    assert list(snap)[:5] == ["accepted", "rejected", "done", "errors", "cancelled"]


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


ACTIVE = ("llm_bridge_active_requests", ())


@pytest.mark.parametrize("broker", ["amqtt", "mosquitto-v5"], indirect=True)
def test_metrics_endpoint_log_line_and_status_stats(
    broker: BrokerInfo, llama_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The real llama.cpp server behind a real bridge, on amqtt and on Mosquitto (MQTT 5):
    the active-requests gauge while a request runs, then the counters and histograms of a
    cancelled, a done and a rejected request, the same numbers in the status ``stats``, and
    the per-request log lines."""
    port = free_port()
    settings = MqttSettings(host=broker.host, port=broker.port, protocol=broker.protocol)
    caplog.set_level(logging.INFO, logger="bridge.requests")
    rec = Recorder(broker.host, broker.port, v5=broker.v5,
                   topic_filter="llm/status/metrics-e2e")

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        resp = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert resp.status_code == 200
        return _samples(resp.text)

    backend = (("backend", llama_server), ("name", "backend-1"))
    try:
        with running_bridge(broker.host, broker.port, [llama_server], protocol=broker.protocol,
                            bridge_id="metrics-e2e", metrics_port=port, max_tokens_cap=2000,
                            status_interval_s=0.5) as bridge, \
                BridgeClient(settings, client="dev-metrics") as dev:
            assert bridge.metrics_port == port
            assert bridge.link.is_v5 == broker.v5
            # loopback only by default (prometheus-client alone would bind 0.0.0.0)
            assert bridge.metrics._server.server_address[0] == "127.0.0.1"
            assert scrape()[ACTIVE] == 0

            # 1. A long request is running (it has sent text, and no terminal message):
            #    the gauges count it. Then it is cancelled.
            long_id = dev.send({"id": "m-long", "prompt": "Count: one, two, three,",
                                "max_tokens": 2000})
            replies = dev.replies(long_id, idle_timeout=TIMEOUT)
            long_msgs = []
            for msg in replies:
                long_msgs.append(msg)
                if msg.type in ("chunk", *TERMINAL_TYPES):
                    break
            assert long_msgs[-1].type == "chunk", long_msgs[-1]
            running = poll_until(scrape, lambda s: s[ACTIVE] > 0, 30)
            assert running[ACTIVE] == 1, "the active-requests gauge missed a running request"
            assert running[("llm_bridge_backend_active", backend)] == 1
            assert running[("llm_bridge_queue_depth", ())] == 0
            assert running[("llm_bridge_requests_accepted_total", ())] == 1
            dev.cancel(long_id)
            long_msgs += list(replies)
            check_reply_stream(long_msgs)
            assert (long_msgs[-1].type, long_msgs[-1].finish_reason) == ("done", "cancelled")

            # 2. One answered request, one refused at intake.
            msgs = list(dev.ask({"id": "m-1", "prompt": "Hello", "max_tokens": 8},
                                idle_timeout=TIMEOUT))
            check_reply_stream(msgs)
            assert msgs[-1].type == "done"
            bad = list(dev.ask({"id": "m-2", "prompt": "x", "colour": "red"},
                               idle_timeout=TIMEOUT))
            assert bad[-1].type == "error" and bad[-1].code == "bad_request"

            # nothing runs any more (a worker counts itself idle just after the terminal)
            s = poll_until(scrape, lambda s: s[ACTIVE] == 0, 30)
            published = (bridge.link.published, bridge.link.published_bytes)

            # the status message carries the same counters, and goes out periodically
            since = len(rec.messages)
            assert rec.wait_for(lambda ms: len(ms) > since + 1, 10)
            status = json.loads(rec.messages[-1].payload)
    finally:
        rec.close()

    assert s[ACTIVE] == 0
    assert s[("llm_bridge_backend_active", backend)] == 0
    assert s[("llm_bridge_requests_accepted_total", ())] == 2
    assert s[("llm_bridge_requests_total", (("outcome", "done"),))] == 1
    assert s[("llm_bridge_requests_total", (("outcome", "cancelled"),))] == 1
    assert s[("llm_bridge_requests_rejected_total", (("code", "bad_request"),))] == 1
    # both accepted requests produced text: two TTFT observations
    assert s[("llm_bridge_time_to_first_token_seconds_count", ())] == 2
    assert s[("llm_bridge_time_to_first_token_seconds_sum", ())] > 0
    # the done request has a rate (the cancelled one reports no usage, so it may have none)
    assert s[("llm_bridge_tokens_per_second_count", ())] >= 1
    assert s[("llm_bridge_tokens_per_second_sum", ())] > 0
    assert s[("llm_bridge_tokens_per_second_bucket", (("le", "+Inf"),))] == \
        s[("llm_bridge_tokens_per_second_count", ())]
    assert s[("llm_bridge_request_duration_seconds_count", ())] == 2
    # the tokens the devices were told about, no more and no less
    told = sum(m.usage.completion_tokens for m in (msgs[-1], long_msgs[-1]) if m.usage)
    assert s[("llm_bridge_tokens_total", (("kind", "completion"),))] == told
    assert told >= msgs[-1].usage.completion_tokens > 0
    # every message of the requests (and the error, and status) was counted
    assert s[("llm_bridge_published_messages_total", ())] >= len(msgs) + len(long_msgs) + 1
    assert 0 < s[("llm_bridge_published_messages_total", ())] <= published[0]
    assert 0 < s[("llm_bridge_published_bytes_total", ())] <= published[1]
    assert s[("llm_bridge_backend_healthy", backend)] == 1
    assert s[("llm_bridge_backend_slots", backend)] == 2
    assert s[("llm_bridge_backend_requests_total", backend)] == 2
    assert s[("llm_bridge_queue_depth", ())] == 0

    stats: dict[str, Any] = status["stats"]
    assert status["state"] == "online"
    assert stats["accepted"] == 2 and stats["rejected"] == 1
    assert stats["outcomes"] == {"done": 1, "cancelled": 1}
    assert stats["rejected_by_code"] == {"bad_request": 1}
    assert stats["published_messages"] > 0 and stats["published_bytes"] > 0
    assert stats["uptime_s"] > 0 and stats["completion_tokens"] == told

    # one line per request: id, client, tokens, ttft, duration, outcome
    lines = [r.getMessage() for r in caplog.records if r.name == "bridge.requests"]
    done = next(ln for ln in lines if "id=m-1 " in ln)
    for field in ("client=dev-metrics", "outcome=done", f"backend={llama_server}",
                  f"completion_tokens={msgs[-1].usage.completion_tokens}", "ttft_ms=",
                  "total_ms=", "tokens_per_s="):
        assert field in done, (field, done)
    # llama-server's own prompt time, to tell the model's share of ttft_ms from the bridge's
    assert re.search(r" llama_prompt_ms=\d+\.\d ", done), done
    # whether the broker took the terminal message (PUBACK at QoS 1)
    assert done.endswith(" terminal=acked"), done
    assert "outcome=cancelled" in next(ln for ln in lines if "id=m-long " in ln)
    rejected = next(ln for ln in lines if "id=m-2 " in ln)
    assert "outcome=error code=bad_request" in rejected and "client=dev-metrics" in rejected
