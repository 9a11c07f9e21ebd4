"""Profiles: named presets from the configuration, chosen by a request's ``profile``.

- configuration and merging rules on their own;
- the bridge with a fake llama-server that records the exact request bodies
  (system prompt, sampling defaults, overrides, the max_tokens cap, tools);
- the bridge against the real llama.cpp server (same answer as sending the
  profile's system prompt and settings directly);
- ``SIGHUP`` reloading the profiles of a running ``python -m bridge run`` while a
  stream is in flight.
"""

from __future__ import annotations

import logging
import signal
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from bridge import cli
from bridge.config.profiles import SAMPLING_FIELDS, Profile, ProfileRegistry, UnknownProfile
from bridge.config.settings import load_config
from bridge.llama.client import LlamaCppClient
from bridge.protocol.address import ReplyAddress
from bridge.protocol.errors import RequestRejected
from bridge.protocol.messages import BridgeRequest, ErrorCode
from bridge.service.intake import Accepted, apply_profile
from tests.support.bridge_proc import running_bridge
from tests.support.cli_proc import RunningBridge
from tests.support.device import ask, bridge_client
from tests.support.fake_llama import FakeLlama
from tests.support.processes import REPO as ROOT
from tests.support.processes import MosquittoProcess
from tests.support.prompts import SEED, system, user
from tests.support.recorder import Recorder, check_reply_stream, text_of
from tests.support.waiting import REPLY_TIMEOUT as TIMEOUT

EXAMPLE = ROOT / "config" / "bridge.example.toml"

KITCHEN: dict[str, Any] = {
    "system": "You are the kitchen assistant.", "temperature": 0.3, "top_p": 0.8, "top_k": 7,
    "min_p": 0.1, "stop": ["\n\n"], "seed": 5, "repeat_penalty": 1.2, "think": False,
    "max_tokens": 30}
TOOLS = [{"type": "function", "function": {"name": "get_time", "description": "the time",
                                           "parameters": {"type": "object", "properties": {}}}}]


# ============================================================================ configuration


def test_profiles_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text('[profiles.kitchen]\nsystem = "Be brief."\ntemperature = 0.2\n'
                    'max_tokens = 64\n\n[profiles.plain]\n', encoding="utf-8")
    cfg = load_config(path)
    assert cfg.profiles["kitchen"] == Profile(system="Be brief.", temperature=0.2, max_tokens=64)
    assert cfg.profiles["plain"] == Profile()


@pytest.mark.parametrize(("text", "named"), [
    ('[profiles.k]\nsytem = "x"\n', "sytem"),
    ("[profiles.k]\ntemperature = 9\n", "temperature"),
    ('[profiles."a b"]\nsystem = "x"\n', "profile name"),
    ('[profiles."a\\n"]\nsystem = "x"\n', "profile name"),  # no request could name it
])
def test_bad_profiles_are_named(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValidationError, match=named):
        load_config(path)


def test_the_examples_profile_tables_load() -> None:
    """The indented ``[profiles.NAME]`` example in the example config is valid as written."""
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#   [profiles."))
    block: list[str] = []
    for line in lines[start:]:
        if line.startswith("#   "):
            block.append(line[4:])
        elif line.strip() != "#":
            break
    profiles = load_config(**tomllib.loads("\n".join(block))).profiles
    assert len(profiles) >= 2 and any(p.tools for p in profiles.values())
    assert any(p.system for p in profiles.values())


# ============================================================================ merging


def accepted(**fields: Any) -> Accepted:
    """As intake makes it, with max_tokens_cap = 48."""
    request = BridgeRequest.model_validate(fields)
    return Accepted("dev", request, ReplyAddress("llm/reply/dev/r1", "r1", None), None, 0.0, 512,
                    min(request.max_tokens or 48, 48))


def test_profile_fills_in_what_the_request_leaves_unset() -> None:
    acc = apply_profile(accepted(messages=[user("hi")]), Profile(**KITCHEN), 48)
    req = acc.request
    assert [m.model_dump(exclude_none=True) for m in req.messages or []] == \
        [system(KITCHEN["system"]), user("hi")]
    assert req.sampling() == {k: KITCHEN[k] for k in ("temperature", "top_p", "top_k", "min_p",
                                                      "stop", "seed", "repeat_penalty")}
    assert req.think is False
    assert acc.max_tokens == 30


def test_request_fields_win_and_max_tokens_is_capped() -> None:
    acc = apply_profile(accepted(messages=[system("mine"), user("hi")], temperature=0.9,
                                 stop="END", think=True, max_tokens=100),
                        Profile(**KITCHEN), 48)
    req = acc.request
    assert [m.content for m in req.messages or []] == ["mine", "hi"]
    assert (req.temperature, req.stop, req.think, req.top_k) == (0.9, "END", True, 7)
    assert acc.max_tokens == 30  # the profile's cap
    assert apply_profile(accepted(messages=[user("x")], max_tokens=10), Profile(**KITCHEN),
                         48).max_tokens == 10
    # the bridge's max_tokens_cap bounds the profile too
    assert apply_profile(accepted(messages=[user("x")]), Profile(max_tokens=500), 48).max_tokens \
        == 48


def test_prompt_requests_get_sampling_but_no_system_or_tools() -> None:
    acc = apply_profile(accepted(prompt="Once"), Profile(system="S", tools=TOOLS,
                                                         temperature=0.1), 48)
    assert acc.request.prompt == "Once" and acc.request.messages is None
    assert acc.request.tools is None and acc.request.temperature == 0.1


def test_profile_tools_make_a_single_reply() -> None:
    acc = apply_profile(accepted(messages=[user("time?")]),
                        Profile(tools=TOOLS, tool_choice="auto"), 48)
    assert acc.request.tools == TOOLS and acc.request.tool_choice == "auto"
    assert acc.request.wants_single_reply


def test_unknown_profile_lists_the_known_ones() -> None:
    registry = ProfileRegistry({"b": Profile(), "a": Profile()})
    with pytest.raises(UnknownProfile, match="unknown profile 'c': this bridge knows a, b"):
        registry.get("c")
    with pytest.raises(UnknownProfile, match="has no profiles configured"):
        ProfileRegistry().get("a")


def test_an_unknown_profile_is_a_bad_request() -> None:
    with pytest.raises(RequestRejected) as info:
        ProfileRegistry().get("a")
    assert isinstance(info.value, UnknownProfile) and info.value.code == ErrorCode.bad_request
    assert not info.value.retryable


@pytest.mark.parametrize(("name", "bad"), [
    ("temperature", 5.5), ("top_p", 1.5), ("top_k", -1), ("top_k", 100_001), ("min_p", 2),
    ("repeat_penalty", 10.5), ("stop", ["x"] * 17), ("max_tokens", 0), ("tools", [{}] * 129),
])
def test_a_profile_takes_what_a_request_takes(name: str, bad: Any) -> None:
    with pytest.raises(ValidationError, match=name):
        Profile.model_validate({name: bad})
    with pytest.raises(ValidationError, match=name):
        BridgeRequest.model_validate({"messages": [user("hi")], name: bad})


def test_sampling_fields_are_the_plain_defaults() -> None:
    """max_tokens is left to the cap rule; everything else a profile samples with is copied."""
    assert SAMPLING_FIELDS == ("temperature", "top_p", "top_k", "min_p", "stop", "seed",
                               "repeat_penalty")


def test_reload_swaps_profiles_and_keeps_them_on_a_bad_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text('[profiles.p]\nsystem = "old"\n', encoding="utf-8")
    running = load_config(path)
    fake_bridge = SimpleNamespace(profiles=ProfileRegistry(running.profiles))
    log = logging.getLogger("test.reload")
    path.write_text('flush_ms = 10.0\n[profiles.p]\nsystem = "new"\n[profiles.q]\n',
                    encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="test.reload"):
        assert cli.reload_profiles(fake_bridge, running,  # type: ignore[arg-type]
                                   lambda: load_config(path), log)
    assert fake_bridge.profiles.get("p").system == "new"
    assert fake_bridge.profiles.names() == ["p", "q"]
    assert "flush_ms" in caplog.text  # changed, but only applied after a restart
    path.write_text("[profiles.p\n", encoding="utf-8")
    assert not cli.reload_profiles(fake_bridge, running,  # type: ignore[arg-type]
                                   lambda: load_config(path), log)
    assert fake_bridge.profiles.get("p").system == "new"


# ============================================================================ bridge + fake llama


def test_profiles_reach_llama_server(mosquitto: MosquittoProcess) -> None:
    profiles = {"kitchen": KITCHEN, "tools": {"tools": TOOLS, "tool_choice": "auto"},
                "big": {"max_tokens": 500}}
    with FakeLlama() as fake, \
            running_bridge(mosquitto.host, mosquitto.port, [fake.url], max_tokens_cap=48,
                           profiles=profiles), \
            bridge_client(mosquitto, "dev-prof", protocol="5") as dev:
        plain = ask(dev, {"profile": "kitchen", "messages": [user("hi")]})
        override = ask(dev, {"profile": "kitchen", "messages": [system("mine"), user("hi")],
                             "temperature": 0.9, "max_tokens": 100, "stop": "END"})
        smaller = ask(dev, {"profile": "kitchen", "messages": [user("hi")], "max_tokens": 10})
        prompt = ask(dev, {"profile": "kitchen", "prompt": "Once upon"})
        tools = ask(dev, {"profile": "tools", "messages": [user("time?")]})
        big = ask(dev, {"profile": "big", "messages": [user("hi")]})
        unknown = ask(dev, {"profile": "nope", "messages": [user("hi")]})
        bodies = fake.wait_bodies(6)
    for msgs in (plain, override, smaller, prompt, big):
        assert msgs[-1].type == "done", msgs[-1]
    b_plain, b_override, b_smaller, b_prompt, b_tools, b_big = bodies
    assert b_plain["messages"] == [system(KITCHEN["system"]), user("hi")]
    sampling = {k: KITCHEN[k] for k in ("temperature", "top_p", "top_k", "min_p", "stop", "seed",
                                        "repeat_penalty")}
    assert {k: b_plain[k] for k in sampling} == sampling
    assert b_plain["max_tokens"] == 30
    assert b_plain["chat_template_kwargs"] == {"enable_thinking": False}
    # the request's own fields win; its max_tokens is capped by the profile's
    assert b_override["messages"] == [system("mine"), user("hi")]
    assert (b_override["temperature"], b_override["stop"], b_override["top_k"]) == (0.9, "END", 7)
    assert b_override["max_tokens"] == 30
    assert b_smaller["max_tokens"] == 10
    # a plain completion: the sampling settings, no system prompt
    assert b_prompt["prompt"] == "Once upon" and "messages" not in b_prompt
    assert b_prompt["temperature"] == 0.3
    # a profile with tools: one non-streamed call, one reply
    assert [m.type for m in tools if m.type != "progress"] == ["start", "reply"]
    assert b_tools["tools"] == TOOLS and b_tools["tool_choice"] == "auto"
    assert b_tools["stream"] is False
    assert b_big["max_tokens"] == 48  # max_tokens_cap bounds a profile's max_tokens
    assert [m.type for m in unknown] == ["error"]
    assert unknown[0].code == "bad_request"
    assert "unknown profile 'nope'" in unknown[0].message
    assert "big, kitchen, tools" in unknown[0].message


# ============================================================================ real llama.cpp


def test_real_llama_profile_answers_like_its_settings_sent_directly(
        mosquitto: MosquittoProcess, llama_server: str) -> None:
    pirate: dict[str, Any] = {"system": "You are a pirate. Answer like one.", "temperature": 0.0,
                              "seed": SEED, "max_tokens": 24}
    with running_bridge(mosquitto.host, mosquitto.port, [llama_server],
                        profiles={"pirate": pirate}), \
            bridge_client(mosquitto, "dev-pirate", protocol="5") as dev:
        with_profile = ask(dev, {"profile": "pirate", "messages": [user("Where is the ship?")]})
        without = ask(dev, {"messages": [user("Where is the ship?")], "temperature": 0,
                            "seed": SEED, "max_tokens": 24})
    with LlamaCppClient(llama_server) as client:
        direct = client.chat([system(pirate["system"]), user("Where is the ship?")],
                             temperature=0, seed=SEED, max_tokens=24)
    assert with_profile[-1].type == "done"
    assert text_of(with_profile) == (direct.content or "")
    assert direct.usage is not None
    assert with_profile[-1].usage.prompt_tokens == direct.usage.prompt_tokens
    assert with_profile[-1].usage.prompt_tokens > without[-1].usage.prompt_tokens
    assert with_profile[-1].usage.completion_tokens <= 24


# ============================================================================ SIGHUP


def test_sighup_reloads_profiles_while_a_stream_runs(mosquitto: MosquittoProcess,
                                                     tmp_path: Path) -> None:
    conf = tmp_path / "bridge.toml"
    conf.write_text('[profiles.p]\nsystem = "old system"\n', encoding="utf-8")
    rec = Recorder(mosquitto.host, mosquitto.port, topic_filter="llm/reply/dev-hup/#")
    try:
        with FakeLlama(slots=2) as fake:
            bridge = RunningBridge("--config", str(conf), "--mqtt-host", mosquitto.host,
                                    "--mqtt-port", str(mosquitto.port), "--llama-url", fake.url,
                                    "--bridge-id", "hup-test",
                                    "--sessions-db", str(tmp_path / "s.db"))
            try:
                bridge.wait_line(" ready: ")
                with bridge_client(mosquitto, "dev-hup", protocol="5") as dev:
                    gate = fake.hold_next()
                    dev.send({"id": "a", "profile": "p", "messages": [user("first")]},
                             subscribe=False)
                    fake.wait_bodies(1)  # "a" streams, held after its first piece

                    conf.write_text('[profiles.p]\nsystem = "new system"\n\n[profiles.q]\n'
                                    'temperature = 0.5\n', encoding="utf-8")
                    mark = len(bridge.lines)
                    bridge.proc.send_signal(signal.SIGHUP)
                    bridge.wait_line("profiles reloaded: p, q", after=mark)

                    dev.send({"id": "b", "profile": "p", "messages": [user("second")]},
                             subscribe=False)
                    b = rec.wait_terminal("llm/reply/dev-hup/b", TIMEOUT)
                    dev.send({"id": "c", "profile": "q", "messages": [user("third")]},
                             subscribe=False)
                    c = rec.wait_terminal("llm/reply/dev-hup/c", TIMEOUT)
                    a_so_far = [m for m in rec.messages if m.topic == "llm/reply/dev-hup/a"]
                    assert not any(b'"done"' in m.payload for m in a_so_far), \
                        "the first stream ended before the reload; the test proves nothing"
                    gate.set()
                    a = rec.wait_terminal("llm/reply/dev-hup/a", TIMEOUT)

                    # a broken file: the profiles in force stay
                    conf.write_text("[profiles.p\n", encoding="utf-8")
                    mark = len(bridge.lines)
                    bridge.proc.send_signal(signal.SIGHUP)
                    bridge.wait_line("configuration reload failed", after=mark)
                    d = list(dev.ask({"profile": "p", "messages": [user("fourth")]},
                                     idle_timeout=TIMEOUT))
                bodies = fake.wait_bodies(4)
            finally:
                code = bridge.stop()
    finally:
        rec.close()
    assert code == 0, "".join(bridge.lines)
    assert "Traceback" not in "".join(bridge.lines), "".join(bridge.lines)
    for msgs in (a, b, c, d):
        check_reply_stream(msgs)
        assert msgs[-1].type == "done", msgs[-1]
    assert text_of(a) == "Hello from the fake."  # the running stream was not disturbed
    assert bodies[0]["messages"][0] == system("old system")
    assert bodies[1]["messages"][0] == system("new system")
    assert bodies[2]["messages"] == [user("third")] and bodies[2]["temperature"] == 0.5
    assert bodies[3]["messages"][0] == system("new system")
