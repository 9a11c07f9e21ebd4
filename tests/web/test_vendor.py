"""The page's files as shipped: the vendored MQTT.js is the one its README names, with
its licence, and every file of the folder goes into the wheel."""

from __future__ import annotations

import glob
import hashlib
import json
import re
import tomllib
from pathlib import Path

from tests.support.processes import REPO

WEB = REPO / "bridge" / "web"
VENDOR = WEB / "static" / "vendor"


def test_the_bundle_is_the_one_the_readme_names() -> None:
    readme = (VENDOR / "README.md").read_text(encoding="utf-8")
    pinned = re.search(r"SHA-256 of `mqtt\.esm\.js`: `([0-9a-f]{64})`", readme)
    version = re.search(r"Version: mqtt@(\d+\.\d+\.\d+)", readme)
    assert pinned is not None and version is not None, "README must give version and SHA-256"
    assert hashlib.sha256((VENDOR / "mqtt.esm.js").read_bytes()).hexdigest() == pinned.group(1)
    assert "npm pack mqtt@VERSION" in readme  # the update recipe
    assert version.group(1) == "5.16.0"


def test_the_bundle_is_an_es_module_with_its_licence() -> None:
    bundle = (VENDOR / "mqtt.esm.js").read_text(encoding="utf-8")
    assert "export default " in bundle  # what `import mqtt from "mqtt"` takes
    assert "eval(" not in bundle and "new Function" not in bundle  # CSP forbids both
    licence = (VENDOR / "mqtt.LICENSE.md").read_text(encoding="utf-8")
    assert "The MIT License" in licence and "MQTT.js contributors" in licence


def test_the_page_maps_mqtt_to_the_bundle() -> None:
    page = (WEB / "static" / "index.html").read_text(encoding="utf-8")
    found = re.search(r'<script type="importmap">(.*?)</script>', page, re.DOTALL)
    assert found is not None
    target = json.loads(found.group(1))["imports"]["mqtt"]
    assert (WEB / "static" / target).resolve() == (VENDOR / "mqtt.esm.js").resolve()


def test_every_static_file_is_package_data() -> None:
    """setuptools globs package-data patterns from the package folder, recursively."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["bridge.web"]
    shipped = {Path(name) for pattern in patterns
               for name in glob.glob(pattern, root_dir=WEB, recursive=True)
               if (WEB / name).is_file()}
    present = {path.relative_to(WEB) for path in (WEB / "static").rglob("*") if path.is_file()}
    assert present and present <= shipped, sorted(map(str, present - shipped))
