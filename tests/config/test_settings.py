"""Configuration: the example file, precedence file < env < flags, validation, CLI mapping.

Pure unit tests: nothing here starts a broker or llama.cpp.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr, ValidationError

from bridge import cli
from bridge.config.settings import (
    DeploymentConfig,
    DeviceSettings,
    LlamaSettings,
    MqttSettings,
    WebSettings,
    load_config,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "bridge.example.toml"

# Settings whose value in the example deliberately differs from the default
# (section, key) -> value. None today: every active line shows the default.
DELIBERATE_DIFFERENCES: dict[tuple[str, str], Any] = {}

_SECTION_RE = re.compile(r"^\s*\[([A-Za-z0-9_]+)\]\s*(#.*)?$")
_ACTIVE_KEY_RE = re.compile(r"^\s*([A-Za-z0-9_]+)\s*=")
_COMMENTED_KEY_RE = re.compile(r"^\s*#\s?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(\S.*)$")

SECTIONS: dict[str, type[BaseModel]] = {
    "": DeploymentConfig,
    "mqtt": MqttSettings,
    "llama": LlamaSettings,
    "device": DeviceSettings,
    "web": WebSettings,
}
TABLES = {"mqtt", "llama", "device", "web"}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BRIDGE_* variable of the machine running the tests may leak into a load."""
    for name in list(os.environ):
        if name.upper().startswith("BRIDGE_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "bridge.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def field_names(section: str) -> set[str]:
    names = set(SECTIONS[section].model_fields)
    return names - TABLES if section == "" else names


# ---------------------------------------------------------------------------- the example


class ExampleLine:
    """One key line of the example file: active (``key = v``) or commented (``# key = v``)."""

    def __init__(self, section: str, key: str, value: str | None, lineno: int) -> None:
        self.section, self.key, self.value, self.lineno = section, key, value, lineno


def example_key_lines(text: str) -> list[ExampleLine]:
    """Every key the example documents, with its section, in file order."""
    section = ""
    found: list[ExampleLine] = []
    for lineno, line in enumerate(text.splitlines()):
        if m := _SECTION_RE.match(line):
            section = m.group(1)
        elif m := _COMMENTED_KEY_RE.match(line):
            found.append(ExampleLine(section, m.group(1), m.group(2), lineno))
        elif m := _ACTIVE_KEY_RE.match(line):
            found.append(ExampleLine(section, m.group(1), None, lineno))
    return found


def test_example_loads_and_equals_the_defaults() -> None:
    loaded = load_config(EXAMPLE).model_dump()
    defaults = load_config().model_dump()
    for (section, key), value in DELIBERATE_DIFFERENCES.items():
        target = loaded[section] if section else loaded
        assert target[key] == value
        (defaults[section] if section else defaults)[key] = value
    assert loaded == defaults


def test_every_active_value_in_the_example_is_the_default() -> None:
    """Key by key, so a wrong default names the key (the comparison above only says 'differs')."""
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    defaults = load_config()
    for section in SECTIONS:
        values = data if section == "" else data[section]
        current = defaults if section == "" else getattr(defaults, section)
        for key, value in values.items():
            if section == "" and key in TABLES:
                continue
            cfg = load_config(**({section: {key: value}} if section else {key: value}))
            got = getattr(cfg if section == "" else getattr(cfg, section), key)
            expected = DELIBERATE_DIFFERENCES.get((section, key), getattr(current, key))
            assert got == expected, f"[{section}] {key} = {value!r} is not the default {expected!r}"


def test_every_setting_appears_in_the_example() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    data = tomllib.loads(text)  # the file is valid TOML as a whole
    assert set(data) - field_names("") <= TABLES
    documented: dict[str, set[str]] = {s: set() for s in SECTIONS}
    for line in example_key_lines(text):
        assert line.section in SECTIONS, f"line {line.lineno + 1}: unknown table [{line.section}]"
        documented[line.section].add(line.key)
    for section in SECTIONS:
        missing = field_names(section) - documented[section]
        unknown = documented[section] - field_names(section)
        where = f"[{section}]" if section else "top level"
        assert not missing, f"{where}: settings missing from the example: {sorted(missing)}"
        assert not unknown, f"{where}: keys in the example that are not settings: {sorted(unknown)}"


def test_every_key_in_the_example_has_an_explanation_above_it() -> None:
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    for key_line in example_key_lines("\n".join(lines)):
        prose = []
        i = key_line.lineno - 1
        while i >= 0 and lines[i].lstrip().startswith("#"):
            if not _COMMENTED_KEY_RE.match(lines[i]):
                prose.append(lines[i])
            i -= 1
        # key lines directly below another key (e.g. tls, then ca_file) share its block
        while not prose and i >= 0 and _ACTIVE_KEY_RE.match(lines[i]):
            i -= 1
            while i >= 0 and lines[i].lstrip().startswith("#"):
                if not _COMMENTED_KEY_RE.match(lines[i]):
                    prose.append(lines[i])
                i -= 1
        assert prose, f"line {key_line.lineno + 1}: {key_line.key} has no comment saying what it is"


def test_commented_out_alternatives_are_valid_settings(tmp_path: Path) -> None:
    """Uncommenting every ``# key = value`` line yields a configuration that loads."""
    text = EXAMPLE.read_text(encoding="utf-8")
    merged: dict[str, Any] = tomllib.loads(text)
    alternatives = [ln for ln in example_key_lines(text) if ln.value is not None]
    assert len(alternatives) >= 10
    for alt in alternatives:
        parsed = tomllib.loads(f"{alt.key} = {alt.value}")  # each one is valid TOML
        target = merged.setdefault(alt.section, {}) if alt.section else merged
        target[alt.key] = parsed[alt.key]
    mqtt, llama = merged.pop("mqtt"), merged.pop("llama")
    cfg = load_config(mqtt=mqtt, llama=llama, **merged)
    assert cfg.mqtt.host == "127.0.0.1"  # the alternative the comment promises
    assert cfg.llama.urls and all(u.startswith("http") for u in cfg.llama.urls)
    assert cfg.shared_group is not None and cfg.metrics_port is not None


def test_example_header_maps_every_run_flag() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    header = text.split("prefix = ", 1)[0]
    run = _subparser(cli.build_parser(), "run")
    flags = {opt for action in run._actions for opt in action.option_strings
             if opt.startswith("--") and opt != "--help"}
    missing = {f for f in flags if f not in header}
    assert not missing, f"run flags not explained in the example's header: {sorted(missing)}"
    for env in ("BRIDGE_", "BRIDGE_MQTT__", "BRIDGE_LLAMA__"):
        assert env in header


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub: argparse.ArgumentParser = action.choices[name]
            return sub
    raise AssertionError(f"no subcommand {name}")


# ---------------------------------------------------------------------------- precedence


def test_precedence_file_then_env_then_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, 'chunk_bytes = 256\nflush_ms = 10.0\nprefix = "file"\n')
    assert load_config(path).chunk_bytes == 256

    monkeypatch.setenv("BRIDGE_CHUNK_BYTES", "300")
    cfg = load_config(path)
    assert (cfg.chunk_bytes, cfg.flush_ms, cfg.prefix) == (300, 10.0, "file")

    cfg = load_config(path, chunk_bytes=400)
    assert (cfg.chunk_bytes, cfg.flush_ms, cfg.prefix) == (400, 10.0, "file")


def test_nested_env_merges_with_the_file_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, '[mqtt]\nhost = "filehost"\nport = 1000\n\n[llama]\nretries = 5\n')
    monkeypatch.setenv("BRIDGE_MQTT__PORT", "2000")
    monkeypatch.setenv("BRIDGE_LLAMA__URLS", '["http://envhost:8080/"]')
    cfg = load_config(path, mqtt={"username": "u"})
    assert cfg.mqtt.host == "filehost"
    assert cfg.mqtt.port == 2000
    assert cfg.mqtt.username == "u"
    assert cfg.llama.urls == ["http://envhost:8080"]  # trailing slash stripped
    assert cfg.llama.retries == 5


def test_nested_env_without_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_MQTT__PORT", "8883")
    monkeypatch.setenv("BRIDGE_MQTT__PASSWORD", "s3cret")
    cfg = load_config()
    assert cfg.mqtt.port == 8883
    assert isinstance(cfg.mqtt.password, SecretStr)
    assert cfg.mqtt.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(cfg)


def test_qos_from_the_environment_is_coerced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_MQTT__QOS", "0")
    assert load_config().mqtt.qos == 0
    monkeypatch.setenv("BRIDGE_MQTT__QOS", "3")
    with pytest.raises(ValidationError, match="qos"):
        load_config()


def test_overrides_with_none_do_not_mask_file_or_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, 'chunk_bytes = 256\n[mqtt]\nhost = "filehost"\n'
                           '[llama]\nurls = ["http://file:1"]\n')
    monkeypatch.setenv("BRIDGE_FLUSH_MS", "7")
    cfg = load_config(path, chunk_bytes=None, flush_ms=None,
                      mqtt={"host": None, "port": None}, llama={"urls": None})
    assert cfg.chunk_bytes == 256
    assert cfg.flush_ms == 7.0
    assert cfg.mqtt.host == "filehost"
    assert cfg.mqtt.port == 1883
    assert cfg.llama.urls == ["http://file:1"]


def test_override_inside_a_table_keeps_the_other_file_keys(tmp_path: Path) -> None:
    path = write(tmp_path, '[mqtt]\nhost = "filehost"\nport = 1000\n')
    cfg = load_config(path, mqtt={"port": 1884})
    assert (cfg.mqtt.host, cfg.mqtt.port) == ("filehost", 1884)


# ---------------------------------------------------------------------------- validation


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "chunk_bytes = = 3\n", name="broken.toml")
    with pytest.raises(ValueError, match=r"broken\.toml.*invalid TOML"):
        load_config(path)


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("text", "name"),
    [("chunk_byte = 256\n", "chunk_byte"),
     ('[mqtt]\nhots = "x"\n', "hots"),
     ("[llama]\nurl = []\n", "url"),
     ("[mqttt]\nport = 1\n", "mqttt")],
)
def test_unknown_key_is_named(tmp_path: Path, text: str, name: str) -> None:
    with pytest.raises(ValidationError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert name in message
    assert "Extra inputs are not permitted" in message


@pytest.mark.parametrize("prefix", ["a/#", "+", "llm/", "/llm", "a/+/b", ""])
def test_invalid_prefix_says_what_to_change(prefix: str) -> None:
    with pytest.raises(ValidationError) as info:
        load_config(prefix=prefix)
    message = str(info.value)
    assert "prefix" in message
    assert "use levels like 'llm'" in message


@pytest.mark.parametrize("prefix", ["$share", "$SYS/llm"])
def test_prefix_starting_with_dollar_is_rejected(prefix: str) -> None:
    with pytest.raises(ValidationError, match="prefix"):
        load_config(prefix=prefix)


def test_valid_multilevel_prefix() -> None:
    cfg = load_config(prefix="site1/llm")
    assert cfg.topics.request("dev") == "site1/llm/request/dev"


def test_chunk_bytes_above_max_chunk_bytes_is_rejected() -> None:
    with pytest.raises(ValidationError, match="chunk_bytes 1024 exceeds max_chunk_bytes 512"):
        load_config(chunk_bytes=1024, max_chunk_bytes=512)


def test_max_chunk_bytes_above_max_message_bytes_is_rejected() -> None:
    with pytest.raises(ValidationError, match="max_chunk_bytes must not exceed max_message_bytes"):
        load_config(max_chunk_bytes=8192, max_message_bytes=4096)


def test_chunk_bytes_below_the_minimum_is_rejected() -> None:
    with pytest.raises(ValidationError, match="chunk_bytes"):
        load_config(chunk_bytes=5)


@pytest.mark.parametrize("url", ["localhost:8080", "ftp://x", "127.0.0.1:8080/", "HTTP//x"])
def test_llama_url_without_scheme_is_rejected(url: str) -> None:
    with pytest.raises(ValidationError, match="must start with http:// or https://"):
        load_config(llama={"urls": [url]})


def test_llama_urls_lose_trailing_slash() -> None:
    cfg = load_config(llama={"urls": ["http://a:8080/", "https://b/"]})
    assert cfg.llama.urls == ["http://a:8080", "https://b"]


# ---------------------------------------------------------------------------- server_url


def test_server_url_is_the_single_llama_url() -> None:
    cfg = DeploymentConfig(server_url="http://localhost:8080/")
    assert cfg.llama.urls == ["http://localhost:8080"]
    assert cfg.server_url == "http://localhost:8080"
    assert cfg == DeploymentConfig(llama={"urls": ["http://localhost:8080"]})  # type: ignore[arg-type]
    assert "server_url" not in cfg.model_dump()  # one place holds the URL: llama.urls
    assert DeploymentConfig().server_url is None  # the embedded llama.cpp
    assert load_config(server_url=None).llama.urls == []


def test_server_url_keeps_the_other_llama_settings() -> None:
    cfg = DeploymentConfig(server_url="http://h:1", llama={"retries": 5, "names": ["gpu"]})  # type: ignore[arg-type]
    assert (cfg.llama.urls, cfg.llama.retries, cfg.llama.names) == (["http://h:1"], 5, ["gpu"])
    given = LlamaSettings(idle_timeout_s=9.0)
    cfg = DeploymentConfig(server_url="http://h:1", llama=given)
    assert (cfg.llama.urls, cfg.llama.idle_timeout_s) == (["http://h:1"], 9.0)
    assert given.urls == []  # the caller's settings object is not changed


def test_server_url_equal_to_llama_urls_is_fine() -> None:
    cfg = DeploymentConfig(server_url="http://h:1/", llama={"urls": ["http://h:1"]})  # type: ignore[arg-type]
    assert cfg.llama.urls == ["http://h:1"]


@pytest.mark.parametrize("urls", [["http://other:1"], ["http://h:1", "http://other:1"]])
def test_server_url_conflicting_with_llama_urls_says_what_to_change(urls: list[str]) -> None:
    with pytest.raises(ValidationError) as info:
        DeploymentConfig(server_url="http://h:1", llama={"urls": urls})  # type: ignore[arg-type]
    message = str(info.value)
    assert "server_url 'http://h:1' and llama.urls" in message and "disagree" in message
    assert "give the llama-server URL once" in message and "not both" in message


@pytest.mark.parametrize("url", ["localhost:8080", "http://", 8080])
def test_bad_server_url_is_named(url: Any) -> None:
    with pytest.raises(ValidationError, match="server_url"):
        DeploymentConfig(server_url=url)


def test_server_url_in_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, 'server_url = "http://file:8080"\n[llama]\nretries = 2\n')
    cfg = load_config(path)
    assert (cfg.llama.urls, cfg.llama.retries) == (["http://file:8080"], 2)
    # the same URL from another source agrees; a different one is the conflict above
    assert load_config(path, llama={"urls": ["http://file:8080"]}).server_url == "http://file:8080"
    monkeypatch.setenv("BRIDGE_LLAMA__URLS", '["http://env:8080"]')
    with pytest.raises(ValidationError, match="disagree"):
        load_config(path)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"mqtt": {"port": 0}}, "port"), ({"mqtt": {"qos": 3}}, "qos"),
     ({"mqtt": {"protocol": "4"}}, "protocol"), ({"bridge_id": "a/b"}, "bridge_id"),
     ({"shared_group": "g#"}, "shared_group"), ({"log_level": "LOUD"}, "log_level"),
     ({"llama": {"retries": 0}}, "retries"), ({"metrics_port": 70000}, "metrics_port")],
)
def test_out_of_range_values_are_named(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        load_config(**overrides)
    assert field in str(info.value)


def test_mqtt_client_id_defaults_from_bridge_id() -> None:
    assert load_config(bridge_id="gw1").mqtt_client_id == "llm-bridge-gw1"
    assert load_config(bridge_id="gw1", mqtt={"client_id": "x"}).mqtt_client_id == "x"


def test_default_bridge_id_comes_from_the_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "edge box#1" + "x" * 80)
    bridge_id = load_config().bridge_id
    assert bridge_id.startswith("edge-box-1")
    assert len(bridge_id) == 48
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    assert load_config().bridge_id == "bridge"


def test_default_bridge_id_on_a_non_ascii_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "café")
    assert load_config().bridge_id == "caf-"


@pytest.mark.parametrize("mqtt", [{"reconnect_max_s": 0.5},
                                  {"reconnect_min_s": 60.0, "reconnect_max_s": 30.0}])
def test_reconnect_backoff_bounds_are_consistent(mqtt: dict[str, float]) -> None:
    with pytest.raises(ValidationError, match="reconnect"):
        load_config(mqtt=mqtt)


def test_queue_size_zero_is_not_a_silent_outage() -> None:
    with pytest.raises(ValidationError, match="queue_size"):
        load_config(queue_size=0)


# ---------------------------------------------------------------------------- the CLI


def test_cli_run_flags_map_to_the_config(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(
        ["run", "--mqtt-host", "h", "--llama-url", "http://a", "--llama-url", "http://b",
         "--chunk-bytes", "256"])
    cfg = cli._config(args)
    assert cfg.mqtt.host == "h"
    assert cfg.llama.urls == ["http://a", "http://b"]
    assert cfg.chunk_bytes == 256
    # unset flags leave defaults alone
    defaults = load_config()
    assert cfg.mqtt.port == defaults.mqtt.port
    assert cfg.flush_ms == defaults.flush_ms
    assert cfg.max_concurrent is None
    assert cfg.mqtt.tls is False


def test_cli_flags_beat_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, 'chunk_bytes = 300\nflush_ms = 5.0\n[mqtt]\nhost = "file"\nport = 1\n'
                           'tls = true\n[llama]\nurls = ["http://file"]\n')
    monkeypatch.setenv("BRIDGE_MQTT__PORT", "2")
    monkeypatch.setenv("BRIDGE_FLUSH_MS", "6")
    args = cli.build_parser().parse_args(
        ["run", "--config", str(path), "--mqtt-port", "3", "--prefix", "site/llm",
         "--mqtt-ca", "/ca.crt", "--shared-group", "g1", "--max-concurrent", "2",
         "--log-level", "DEBUG", "--metrics-port", "9100", "--bridge-id", "b1",
         "--sessions-db", "s.db", "--mqtt-username", "u", "--mqtt-password", "p",
         "--mqtt-protocol", "5", "--sessions-url", "rediss://:pw@redis.lan:6380/1"])
    cfg = cli._config(args)
    assert cfg.chunk_bytes == 300          # file only
    assert cfg.flush_ms == 6.0             # env beats file
    assert cfg.mqtt.port == 3              # flag beats env and file
    assert cfg.mqtt.host == "file"
    assert cfg.mqtt.tls is True            # --mqtt-tls not given: file value kept
    assert cfg.llama.urls == ["http://file"]
    assert cfg.prefix == "site/llm"
    assert cfg.mqtt.ca_file == Path("/ca.crt")
    assert (cfg.shared_group, cfg.max_concurrent, cfg.log_level) == ("g1", 2, "DEBUG")
    assert (cfg.metrics_port, cfg.bridge_id, cfg.sessions_db) == (9100, "b1", Path("s.db"))
    assert cfg.mqtt.username == "u"
    assert cfg.mqtt.password is not None and cfg.mqtt.password.get_secret_value() == "p"
    assert cfg.mqtt.protocol == "5"
    assert cfg.sessions_url == "rediss://:pw@redis.lan:6380/1"


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "127.0.0.1:6379", "valkey://h"])
def test_sessions_url_must_be_redis_or_rediss(url: str) -> None:
    with pytest.raises(ValidationError, match=r"sessions_url must start with redis:// or "
                                              r"rediss://"):
        load_config(sessions_url=url)
    assert load_config(sessions_url="").sessions_url is None  # empty: not set


def test_cli_ask_reads_mqtt_flags_only(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(["ask", "hi", "--mqtt-host", "h", "--chunk-bytes", "5"])
    cfg = cli._config(args)
    assert cfg.mqtt.host == "h"
    assert cfg.chunk_bytes == load_config().chunk_bytes  # ask's --chunk-bytes is per request


def test_cli_bad_chunk_bytes_exits_2_without_starting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(*args: Any, **kwargs: Any) -> int:
        raise AssertionError("the bridge was started despite an invalid configuration")

    monkeypatch.setattr(cli, "run", must_not_run)
    code = cli.main(["run", "--chunk-bytes", "5"])
    assert code == 2
    err = capsys.readouterr().err
    assert "configuration error" in err
    assert "chunk_bytes" in err


def test_cli_invalid_config_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "run", lambda *a, **k: pytest.fail("started"))
    path = write(tmp_path, "[mqtt\n", name="bad.toml")
    assert cli.main(["run", "--config", str(path)]) == 2
    assert "bad.toml" in capsys.readouterr().err
