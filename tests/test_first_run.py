"""What a new user meets first: installing, scripts/quickstart, and --help."""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.cli import build_parser
from bridge.config.settings import DeploymentConfig
from tests.support.processes import REPO as ROOT
from tests.support.processes import free_port
from tests.support.prompts import TEMPLATE_MARKERS

SCRIPTS = [ROOT / "scripts" / name for name in ("setup", "quickstart", "test", "check")] + [
    ROOT / ".ci" / "run"]


# ---------------------------------------------------------------------------- packaging


def test_license_is_an_spdx_string() -> None:
    """A TOML table is deprecated (PEP 639): setuptools warns about it on every install."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["license"] == "MIT"
    # setuptools reads an SPDX string from 77.0 on; older ones reject it.
    requires = pyproject["build-system"]["requires"]
    setuptools = [r for r in requires if r.startswith("setuptools")]
    assert setuptools == ["setuptools>=77"], requires


# ---------------------------------------------------------------------------- apt


@pytest.fixture
def fake_apt(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path, Path]]:
    """An apt-get (and sudo) that only record how they were called, and a lock file.

    Yields:
        (environment for scripts/apt, the lock file, the record of calls)
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "apt-get").write_text(
        f'#!/bin/sh\necho "DEBIAN_FRONTEND=$DEBIAN_FRONTEND $*" >> {calls}\n')
    (bin_dir / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    lock = tmp_path / "lock-frontend"
    lock.write_bytes(b"")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}",
               APT_LOCK_FILES=f"{tmp_path / 'no-such-lock'} {lock}")
    yield env, lock, calls


def test_apt_passes_the_lock_timeout_when_the_lock_is_free(
        fake_apt: tuple[dict[str, str], Path, Path]) -> None:
    env, _, calls = fake_apt
    done = subprocess.run([ROOT / "scripts" / "apt", "install", "-y", "mosquitto"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "waiting" not in done.stdout
    assert calls.read_text() == (
        "DEBIAN_FRONTEND=noninteractive -o DPkg::Lock::Timeout=300 install -y mosquitto\n")


def test_apt_waits_for_a_held_lock_and_says_so(
        fake_apt: tuple[dict[str, str], Path, Path]) -> None:
    """Another package manager holds the lock (as dpkg does: an fcntl write lock): the
    script says it waits, and runs apt-get only once the lock is free."""
    env, lock, calls = fake_apt
    with open(lock, "r+b") as held:
        fcntl.lockf(held, fcntl.LOCK_EX)
        proc = subprocess.Popen([ROOT / "scripts" / "apt", "update"], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "another package manager is running" in first, first
        assert f"{lock}, held by pid {os.getpid()}" in first, first
        assert "waiting for it to finish, at most 300 s" in first, first
        assert not calls.exists()  # apt-get has not run while the lock is held
        fcntl.lockf(held, fcntl.LOCK_UN)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert "the package manager lock is free after" in rest, rest
    assert calls.read_text() == (
        "DEBIAN_FRONTEND=noninteractive -o DPkg::Lock::Timeout=300 update\n")


def test_apt_gives_up_after_its_timeout(fake_apt: tuple[dict[str, str], Path, Path]) -> None:
    env, lock, calls = fake_apt
    with open(lock, "r+b") as held:
        fcntl.lockf(held, fcntl.LOCK_EX)
        done = subprocess.run([ROOT / "scripts" / "apt", "update"],
                              env={**env, "APT_LOCK_TIMEOUT": "0"}, capture_output=True,
                              text=True, timeout=60)
    assert done.returncode == 1
    assert "APT_LOCK_TIMEOUT" in done.stderr
    assert not calls.exists()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_scripts_run_apt_get_only_through_scripts_apt(script: Path) -> None:
    """Only scripts/apt waits for the package manager's lock: nothing calls apt-get
    directly (a hint printed for the user may name it)."""
    for number, line in enumerate(script.read_text(encoding="utf-8").splitlines(), 1):
        code = line.strip()
        if code.startswith(("#", "echo ")):
            continue
        assert not re.search(r"\bapt-get\s+(-\S+\s+)*(update|install|upgrade)\b", code), \
            f"{script.name}:{number}: {line}"


# ---------------------------------------------------------------------------- quickstart


def test_quickstart_shows_progress_and_prints_a_clean_answer(tmp_path: Path) -> None:
    """scripts/quickstart after setup (this interpreter's environment): it says what it
    waits for, streams an answer without chat-template debris, and stops the bridge."""
    port = free_port()
    env = dict(os.environ, QUICKSTART_SETUP="0", VENV=str(Path(sys.executable).parent.parent),
               BRIDGE_MQTT__PORT=str(port), TMPDIR=str(tmp_path))
    done = subprocess.run([ROOT / "scripts" / "quickstart", "Say hello."], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "== starting the bridge" in out and "loads the model" in out, out
    assert re.search(r"\[ *\d+ s\] .*starting an embedded llama\.cpp", out), out
    assert re.search(r"== ready after \d+ s", out), out
    answer = out.split("(the answer streams below, then a summary)\n", 1)[1]
    answer = answer.split("== stopping the bridge", 1)[0]
    assert answer.strip(), out
    assert not any(marker in answer for marker in TEMPLATE_MARKERS), answer
    assert "tokens, first token" in done.stderr  # ask's summary line
    assert "== done." in out
    # the bridge (and its broker) stopped: nothing listens on the port any more
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()


# ---------------------------------------------------------------------------- --help


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", ["run", "ask", "status"])
def test_every_flag_has_help_with_its_default(command: str) -> None:
    """Every option says what it does, and every option that takes a value its default."""
    sub = _subcommands()[command]
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{command} {name}: no help"
        if action.option_strings and action.nargs != 0:
            assert "default" in action.help, f"{command} {name}: no default in {action.help!r}"
    groups = {a.dest: g.title for g in sub._action_groups for a in g._group_actions}
    assert groups["config"] == "configuration"


def test_run_help_shows_the_configured_defaults() -> None:
    """The defaults in ``run --help`` are the configuration's, not copies that drift."""
    fields = DeploymentConfig.model_fields
    run = _subcommands()["run"]
    helps = {a.dest: a.help or "" for a in run._actions}
    for dest in ("chunk_bytes", "flush_ms", "sessions_db", "log_level", "metrics_host",
                 "prefix"):
        default = fields[dest].default
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        assert shown in helps[dest], (dest, helps[dest])
    assert "1883" in helps["mqtt_port"]
    ask = _subcommands()["ask"]
    assert str(fields["max_tokens_default"].default) in next(
        a.help or "" for a in ask._actions if a.dest == "max_tokens")
    flat = " ".join(ask.format_help().split())
    assert "many seconds without a reply message (default 120)" in flat, flat
    flat = " ".join(_subcommands()["status"].format_help().split())
    assert "many seconds for status messages (default 3)" in flat, flat


def test_ask_sends_no_max_tokens_unless_given() -> None:
    """Without --max-tokens the bridge's default (or the profile's) applies."""
    args = build_parser().parse_args(["ask", "hi"])
    assert args.max_tokens is None
