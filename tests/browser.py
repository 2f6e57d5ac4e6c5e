"""Headless Chromium through its WebDriver (Debian's ``chromium`` and ``chromium-driver``)."""

from __future__ import annotations

import os
import shutil
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def chromium_paths() -> tuple[str, str] | None:
    """(browser, driver) executables, or None when this machine has no Chromium to drive."""
    browser = next(filter(None, map(shutil.which, BROWSERS)), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def missing_reason() -> str:
    return ("no headless Chromium: install Debian's chromium and chromium-driver "
            "(the README's test command does) to run the dashboard's browser tests")


def start_chromium(width: int = 1280, height: int = 800) -> Any:
    """A headless Chromium that keeps its console log; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = chromium_paths()
    assert found is not None, missing_reason()
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for argument in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-extensions", "--disable-background-networking", f"--window-size={width},{height}",
                     "--force-device-scale-factor=1"):
        options.add_argument(argument)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to start its sandbox as root
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(found[1]))
