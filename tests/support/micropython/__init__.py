"""Run the MicroPython client (clients/micropython/llm_bridge.py) under CPython.

umqtt.simple imports MicroPython's ``usocket``, ``ustruct`` and ``ubinascii``:
:func:`load` registers CPython stand-ins under those names (:mod:`.usocket` with
MicroPython's stream semantics; CPython's ``struct`` and ``binascii`` as they are), puts
the umqtt.simple that ``scripts/fetch-umqtt`` extracted on ``sys.path`` and imports the
client from its file.
"""

from __future__ import annotations

import binascii
import importlib.util
import os
import struct
import sys
from pathlib import Path
from types import ModuleType

from tests.support.micropython import usocket

REPO = Path(__file__).resolve().parents[3]
CLIENT_DIR = REPO / "clients" / "micropython"
CLIENT_FILE = CLIENT_DIR / "llm_bridge.py"


class UmqttMissing(RuntimeError):
    """umqtt/simple.py is not where scripts/fetch-umqtt puts it."""


def umqtt_candidates() -> list[Path]:
    """Where ``umqtt/simple.py`` is looked for, in order: ``$VENV/micropython`` (the
    setting scripts/setup and scripts/fetch-umqtt share), the running venv's, the repo's
    ``.venv``."""
    found: list[Path] = []
    venv = os.environ.get("VENV")
    if venv:
        path = Path(venv)
        found.append((path if path.is_absolute() else REPO / path) / "micropython")
    found.append(Path(sys.prefix) / "micropython")
    found.append(REPO / ".venv" / "micropython")
    return found


def umqtt_dir() -> Path:
    """The directory holding ``umqtt/simple.py``.

    Raises:
        UmqttMissing: not found; the message says to run scripts/fetch-umqtt.
    """
    candidates = umqtt_candidates()
    for path in candidates:
        if (path / "umqtt" / "simple.py").is_file():
            return path
    raise UmqttMissing("umqtt/simple.py (MicroPython's umqtt.simple) is not in "
                       + ", ".join(str(p) for p in candidates)
                       + ": run scripts/fetch-umqtt")


def install_shims() -> None:
    """Make ``import usocket``, ``ustruct`` and ``ubinascii`` work as on MicroPython."""
    sys.modules.setdefault("usocket", usocket)
    sys.modules.setdefault("ustruct", struct)
    sys.modules.setdefault("ubinascii", binascii)


def load() -> ModuleType:
    """The client module ``llm_bridge``, running on umqtt.simple over CPython sockets.

    Raises:
        UmqttMissing: scripts/fetch-umqtt has not been run.
    """
    loaded = sys.modules.get("llm_bridge")
    if loaded is not None:
        return loaded
    where = str(umqtt_dir())
    install_shims()
    if where not in sys.path:
        sys.path.append(where)
    spec = importlib.util.spec_from_file_location("llm_bridge", CLIENT_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["llm_bridge"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["llm_bridge"]
        raise
    return module
