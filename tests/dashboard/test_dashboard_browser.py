"""The dashboard in a real headless Chromium, served by a real ``cmm dashboard`` process: the page
loads without a console error (a Content-Security-Policy violation would be one), shows the
requests in the store, takes a new one live, and works with the keyboard and in a narrow window."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from browser import chromium_paths, missing_reason, start_chromium
from store_rows import create_store, insert, request_row
from support import process_env

pytestmark = pytest.mark.skipif(chromium_paths() is None, reason=missing_reason())

WAIT = 15.0


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cmm")
    directory.chmod(0o700)
    store = directory / "usage.sqlite3"
    create_store(store)
    now = time.time()
    insert(store, *(request_row(time=now - 300 + i * 30, model=f"claude-haiku-4-5-{i}", duration=0.2 + i / 10)
                    for i in range(5)),
           request_row(time=now - 10, route="passthrough", rule=None, model="claude-opus-4-5", status=529,
                       error="overloaded", served_model="claude-opus-4-5", upstream="anthropic"))
    return directory


def serve(argv: list[str], log: Path, env: dict[str, str]) -> Iterator[str]:
    """Start a dashboard process, yield the address it printed, stop it."""
    with log.open("wb") as out:
        child = subprocess.Popen([sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + WAIT
        while not (found := re.search(r"http://127\.0\.0\.1:\d+/\?token=[\w-]+", log.read_text())):
            assert child.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield found.group()
    finally:
        child.terminate()
        child.wait(10)
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def url(config_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from serve(["-m", "cmm.cli.main", "dashboard", "--config-dir", str(config_dir), "--port", "0", "--no-browser"],
                     tmp_path_factory.mktemp("log") / "dashboard.out", process_env(HOME=str(config_dir.parent)))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = start_chromium()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(autouse=True)
def fresh_log(browser: Any) -> None:
    """Each test reads only its own console messages."""
    browser.get_log("browser")


def wait_for(condition: Any, what: str) -> Any:
    deadline = time.monotonic() + WAIT
    while True:
        try:
            found = condition()
        except Exception:  # the element is not there yet, or was just replaced
            found = None
        if found:
            return found
        assert time.monotonic() < deadline, f"waited {WAIT:g} s for {what}"
        time.sleep(0.1)


def errors(driver: Any) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]


def feed_models(driver: Any) -> list[str]:
    from selenium.webdriver.common.by import By

    return [row.find_elements(By.CSS_SELECTOR, "td")[0].text
            for row in driver.find_elements(By.CSS_SELECTOR, "#feed tbody tr")]


def test_the_page_shows_the_store_and_takes_new_requests_live(browser: Any, url: str, config_dir: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(url)
    shown = wait_for(lambda: len(feed_models(browser)) == 6 and feed_models(browser), "the stored requests")
    assert shown == ["claude-opus-4-5", *(f"claude-haiku-4-5-{i}" for i in reversed(range(5)))]  # newest first
    failed = browser.find_element(By.CSS_SELECTOR, "#feed tbody tr.failed")
    assert "529 (overloaded)" in failed.text
    assert "cmm is not running" in browser.find_element(By.ID, "running").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "figure svg[role=img]")) == 3
    assert browser.find_element(By.CSS_SELECTOR, "#totals").text.count("6") >= 1
    wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#feed tbody").get_attribute("aria-live") == "polite",
             "the feed to become a live region")

    insert(config_dir / "usage.sqlite3", request_row(time=time.time(), model="claude-sonnet-4-5-live",
                                                     input_tokens=1234, output_tokens=56))
    wait_for(lambda: feed_models(browser)[0] == "claude-sonnet-4-5-live", "the new request at the top")
    newest = browser.find_element(By.CSS_SELECTOR, "#feed tbody tr")
    assert "1,304" in newest.text and "56" in newest.text  # input + both cache counts, and output
    assert errors(browser) == []


def test_the_period_switch_works_from_the_keyboard(browser: Any, url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(url)
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.TAB)
    assert browser.switch_to.active_element.text == "Skip to the request feed"
    for _ in range(20):
        browser.switch_to.active_element.send_keys(Keys.TAB)
        if browser.switch_to.active_element.text == "Last week":
            break
    else:
        pytest.fail("the period links cannot be reached with Tab")
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    wait_for(lambda: "range=week" in browser.current_url, "the week's page")
    current = browser.find_element(By.CSS_SELECTOR, "nav a[aria-current=page]")
    assert current.text == "Last week"
    assert browser.find_element(By.ID, "totals-heading").text == "Last week"
    assert errors(browser) == []


def test_a_narrow_window_needs_no_sideways_scrolling(browser: Any, url: str) -> None:
    browser.set_window_size(380, 800)
    try:
        browser.get(url)
        wait_for(lambda: feed_models(browser), "the feed")
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        browser.set_window_size(1280, 800)


def test_without_the_token_the_browser_gets_nothing(browser: Any, url: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(url.split("?")[0])
    assert "403 Forbidden" in browser.find_element(By.TAG_NAME, "body").text
    assert browser.find_elements(By.ID, "feed") == []


def counters(requests: int) -> dict[str, Any]:
    return {"running": True, "pid": 4242, "note": "", "workers": [], "routes": [
        {"route": "claude-haiku-4-5* → gemini-2.5-flash", "requests": requests, "errors": 1, "p50_ms": 612.0,
         "p99_ms": 2410.0, "bytes_in": 38_200_000, "bytes_out": 4_100_000}]}


def test_the_live_counters_follow_the_running_cmm(browser: Any, config_dir: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    status = tmp_path / "status.json"
    status.write_text(json.dumps(counters(412)))
    served = serve([str(Path(__file__).with_name("live_server.py")), str(config_dir / "usage.sqlite3"), str(status)],
                   tmp_path / "live.out", process_env())
    address = next(served)
    try:
        browser.get(address)

        def live_rows() -> list[str]:  # one script: the table is rebuilt every 2 s
            return list(browser.execute_script(
                'return Array.from(document.querySelectorAll("#live tbody tr"), r => r.innerText.replace(/\\s+/g, " "))'))

        wait_for(lambda: "cmm is running (pid 4242)" in browser.find_element(By.ID, "running").text, "running")
        assert wait_for(live_rows, "the counters") == [
            "claude-haiku-4-5* → gemini-2.5-flash 412 1 612 ms 2.41 s 38.2 MB 4.1 MB"]
        status.write_text(json.dumps(counters(413)))
        wait_for(lambda: " 413 " in live_rows()[0], "the counters to move")
        status.write_text(json.dumps({"running": False, "pid": None, "note": "", "routes": [], "workers": []}))
        wait_for(lambda: browser.find_element(By.ID, "running").text == "cmm is not running", "cmm to stop")
        assert live_rows() == ["No live counters while cmm is not running"]
        assert errors(browser) == []
    finally:
        served.close()


def test_the_totals_and_charts_are_redrawn_from_the_store(browser: Any, config_dir: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    status = tmp_path / "status.json"
    status.write_text(json.dumps(counters(1)))
    served = serve([str(Path(__file__).with_name("live_server.py")), str(config_dir / "usage.sqlite3"), str(status)],
                   tmp_path / "live.out", process_env())
    address = next(served)
    try:
        browser.get(address)

        # Read in one script each: the page replaces these elements every second, so an element
        # found in one WebDriver call may be gone by the next.
        def requests_figure() -> int:
            text = browser.execute_script('return document.querySelector("#totals .figures div dd").textContent')
            return int(text.replace(",", ""))

        def bar_titles() -> str:
            return str(browser.execute_script(
                'return Array.from(document.querySelectorAll("#fig-requests svg g title"), t => t.textContent).join(" ")'))

        before, titles = requests_figure(), bar_titles()
        insert(config_dir / "usage.sqlite3", request_row(time=time.time(), model="claude-redrawn"))
        wait_for(lambda: requests_figure() == before + 1, "the totals to count the new request")
        wait_for(lambda: bar_titles() != titles, "the requests chart to be redrawn")
        assert len(browser.find_elements(By.CSS_SELECTOR, "figure svg[role=img]")) == 3
        assert errors(browser) == []
    finally:
        served.close()
