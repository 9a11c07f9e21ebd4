"""Fixtures of the web page's tests: one headless Chromium for the whole session.

Starting Chromium costs a second or two and a few hundred MB, so the browser is shared;
``browser`` hands it to each test with a desktop-sized window and an empty console.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.browser import DESKTOP, Browser, running_browser


@pytest.fixture(scope="session")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """The session's headless Chromium (fails, saying how to install it, if missing)."""
    log = tmp_path_factory.mktemp("chromium") / "chromedriver.log"
    with running_browser(DESKTOP, log_path=log) as browser:
        yield browser


@pytest.fixture
def browser(chromium: Browser) -> Browser:
    """The shared Chromium on a blank page, desktop-sized, its console emptied."""
    chromium.size(DESKTOP)
    chromium.open("about:blank")
    chromium.clear_console()
    return chromium
