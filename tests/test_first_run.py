"""What a new user meets first: installing, scripts/quickstart, and --help."""

from __future__ import annotations

import tomllib
from pathlib import Path

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
