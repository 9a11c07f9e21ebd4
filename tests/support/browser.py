"""Headless Chromium for the web page's tests: Debian's ``chromium`` driven by Selenium.

Nothing is downloaded: Selenium is given the browser and the driver by path
(``/usr/bin/chromium``, ``/usr/bin/chromedriver``) and ``SE_OFFLINE=true`` stops
Selenium Manager from fetching either. Missing ones fail with the command that installs
them. The console is collected (``goog:loggingPrefs``), so a test can say the page
logged no error, and screenshots are written as PNG files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.wait import WebDriverWait

__all__ = [
    "CHROMEDRIVER",
    "CHROMIUM",
    "DESKTOP",
    "PHONE",
    "Browser",
    "require_chromium",
    "running_browser",
]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL = "apt-get install chromium chromium-driver"

#: Window sizes (CSS pixels) the page is tried at.
DESKTOP = (1280, 900)
PHONE = (390, 844)

#: Seconds a page may take to load, and a condition to hold, on a slow shared machine.
PAGE_TIMEOUT = 60.0

T = TypeVar("T")


def require_chromium() -> None:
    """Fail, saying how to install them, when Chromium or its driver is missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} missing: {INSTALL}")


class Browser:
    """One headless Chromium, its console log kept across page loads.

    Args:
        driver: the running Selenium driver.
    """

    def __init__(self, driver: webdriver.Chrome) -> None:
        self.driver = driver
        self.console: list[dict[str, Any]] = []

    def size(self, width_height: tuple[int, int]) -> None:
        """Resize the window, e.g. to :data:`DESKTOP` or :data:`PHONE`."""
        self.driver.set_window_size(*width_height)

    def open(self, url: str) -> None:
        """Load ``url`` (and keep what the console said so far)."""
        self.read_console()
        self.driver.get(url)

    def read_console(self) -> list[dict[str, Any]]:
        """Every console entry since the browser started (Chromium hands each out once)."""
        # get_log is untyped in Selenium; each entry is a dict (level, message, ...).
        entries: list[dict[str, Any]] = self.driver.get_log("browser")  # type: ignore[no-untyped-call]
        self.console.extend(entries)
        return self.console

    def severe(self) -> list[str]:
        """The console's errors: uncaught exceptions, console.error, failed loads."""
        return [entry["message"] for entry in self.read_console()
                if entry.get("level") == "SEVERE"]

    def assert_no_console_errors(self) -> None:
        """Fail with the messages if the console has any error."""
        errors = self.severe()
        assert not errors, "browser console errors:\n" + "\n".join(errors)

    def clear_console(self) -> None:
        """Forget what the console said so far (e.g. before loading another page)."""
        self.read_console()
        self.console.clear()

    def screenshot(self, path: Path) -> Path:
        """Write the visible window as a PNG file (folders made as needed)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        assert self.driver.save_screenshot(str(path)), f"no screenshot written to {path}"
        return path

    def wait(self, condition: Callable[[webdriver.Chrome], T],
             timeout: float = PAGE_TIMEOUT, message: str = "") -> T:
        """Wait until ``condition(driver)`` is truthy and return it.

        Raises:
            TimeoutError: it was not within ``timeout`` seconds; the message adds the
                console's errors, the usual reason.
        """
        try:
            return WebDriverWait(self.driver, timeout).until(condition)
        except Exception as exc:  # selenium's TimeoutException, and the page gone
            raise TimeoutError(f"{message or condition} not within {timeout:g} s; console "
                               f"errors: {self.severe()}") from exc

    def text(self, css: str) -> str:
        """The visible text of the first element ``css`` selects ('' if none)."""
        found = self.driver.find_elements(By.CSS_SELECTOR, css)
        return found[0].text if found else ""

    def find(self, css: str) -> list[WebElement]:
        """Every element ``css`` selects."""
        return list(self.driver.find_elements(By.CSS_SELECTOR, css))


def _options(width_height: tuple[int, int]) -> Options:
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                f"--window-size={width_height[0]},{width_height[1]}",
                # No calls home from a test machine (updates, sync, field trials).
                "--no-first-run", "--disable-background-networking", "--disable-sync",
                "--disable-component-update", "--disable-default-apps"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return options


@contextmanager
def running_browser(width_height: tuple[int, int] = DESKTOP,
                    log_path: Path | None = None) -> Iterator[Browser]:
    """Start headless Chromium, yield it, quit it.

    Args:
        width_height: the window size.
        log_path: where chromedriver writes its own log (default: nowhere).

    Raises:
        RuntimeError: Chromium or chromedriver is not installed (says how to).
    """
    require_chromium()
    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager download anything
    service = Service(str(CHROMEDRIVER), log_output=str(log_path) if log_path else None)
    driver = webdriver.Chrome(options=_options(width_height), service=service)
    try:
        driver.set_page_load_timeout(PAGE_TIMEOUT)
        yield Browser(driver)
    finally:
        driver.quit()
