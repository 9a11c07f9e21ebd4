"""The import rules of ARCHITECTURE.md hold, and ``scripts/check`` enforces them.

``scripts/check layers`` runs import-linter with the contracts in pyproject.toml. Each test
runs it on a copy of the package, so a deliberate violation never touches the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _copy_repo(dest: Path) -> Path:
    """The parts of the repository ``scripts/check layers`` reads, with this venv linked."""
    shutil.copytree(ROOT / "bridge", dest / "bridge",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "scripts", dest / "scripts")
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    (dest / ".venv").symlink_to(Path(sys.prefix))
    return dest


def _check_layers(repo: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VENV")}
    return subprocess.run([str(repo / "scripts" / "check"), "layers"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_package_keeps_its_layers_and_has_no_cycles(tmp_path: Path) -> None:
    done = _check_layers(_copy_repo(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(("module", "line", "expected"), [
    # upward: the protocol layer must not know the service built on it
    ("protocol/topics.py", "import bridge.service.bridge",
     "bridge.protocol is not allowed to import bridge.service"),
    # sideways: llama and mqtt are independent of each other
    ("llama/sse.py", "from bridge.mqtt import link",
     "bridge.llama is not allowed to import bridge.mqtt"),
    # a cycle inside one layer, seen only by the type checker
    ("protocol/packet.py",
     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import bridge.protocol.topics",
     "No cycles are allowed in bridge.protocol"),
])
def test_scripts_check_fails_on_a_forbidden_import(tmp_path: Path, module: str, line: str,
                                                   expected: str) -> None:
    repo = _copy_repo(tmp_path)
    target = repo / "bridge" / module
    target.write_text(target.read_text() + f"\n{line}\n")
    done = _check_layers(repo)
    assert done.returncode != 0
    assert expected in done.stdout, done.stdout + done.stderr
    assert "BROKEN" in done.stdout
