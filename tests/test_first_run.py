"""What a new user meets first: installing, scripts/quickstart, and --help."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pytest

from bridge.cli import build_parser
from bridge.config import DeploymentConfig

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- packaging


def test_license_is_an_spdx_string() -> None:
    """A TOML table is deprecated (PEP 639): setuptools warns about it on every install."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["license"] == "MIT"
    # setuptools reads an SPDX string from 77.0 on; older ones reject it.
    requires = pyproject["build-system"]["requires"]
    setuptools = [r for r in requires if r.startswith("setuptools")]
    assert setuptools == ["setuptools>=77"], requires


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
