"""The digits app in a real browser: headless Chromium opens it, moves a slider, sees a new grid.

Chromium and its driver come from Debian (``apt-get install chromium chromium-driver``);
browser builds cannot be downloaded here, so Selenium is pointed at the installed
binaries and never asked to fetch one. Without them the test fails in CI (``CI=true``)
with what to install, and is reported as skipped elsewhere.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytest.importorskip("gradio")

from msdda.app import build_app, free_port, launch  # noqa: E402

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVER = ("/usr/bin/chromedriver",)
INSTALL = (
    "the browser test needs Debian's Chromium and its driver (/usr/bin/chromium, "
    "/usr/bin/chromedriver) and selenium: apt-get install -y chromium chromium-driver "
    "(scripts/test.sh does it as root), pip install 'msdda[browser]'"
)
WAIT_S = 90  # the most any one wait for the page may take


def _first(paths) -> str | None:
    return next((p for p in paths if Path(p).is_file() and os.access(p, os.X_OK)), None)


def _missing(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}: {INSTALL}")
    pytest.skip(f"{reason}: {INSTALL}")


@pytest.fixture
def browser(tmp_path, monkeypatch):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed")
    binary, driver = _first(CHROMIUM), _first(DRIVER) or shutil.which("chromedriver")
    if binary is None or driver is None:
        _missing("no Chromium browser or driver found")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not download anything
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1100")
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    options.add_argument("--no-proxy-server")
    try:
        drv = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    except Exception as err:  # a broken installation: say what is needed
        _missing(f"Chromium did not start ({type(err).__name__}: {err})")
    drv.set_page_load_timeout(WAIT_S)
    yield drv
    drv.quit()


@pytest.fixture
def served(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    page = build_app(front_samples=1)
    url = launch(page, "127.0.0.1", free_port(), block=False, quiet=True)
    yield url
    page.close()


def _grid_src(driver) -> str:
    imgs = driver.find_elements("css selector", "#msdda-grid img")
    return imgs[0].get_attribute("src") if imgs else ""


def _fetch(url: str) -> bytes:
    from urllib.request import urlopen

    assert urlparse(url).hostname == "127.0.0.1"
    with urlopen(url, timeout=WAIT_S) as response:
        return response.read()


def test_moving_a_slider_shows_a_new_grid(browser, served, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(served)
    wait = WebDriverWait(browser, WAIT_S)
    first = wait.until(lambda d: _grid_src(d) or False)  # the grid of the page's load
    browser.save_screenshot(str(tmp_path / "before.png"))

    slider = browser.find_elements("css selector", "input[type=range]")[0]  # legibility
    box = slider.size["width"]
    ActionChains(browser).click_and_hold(slider).move_by_offset(box // 3, 0).release().perform()
    second = wait.until(lambda d: (_grid_src(d) not in ("", first)) and _grid_src(d))
    browser.save_screenshot(str(tmp_path / "after.png"))

    assert second != first
    assert _fetch(first) != _fetch(second)  # the picture itself changed, not only its name
    assert (tmp_path / "after.png").stat().st_size > 0
    message = browser.find_element("css selector", "#msdda-message").text
    assert "Refused" not in message

    # nothing was fetched from outside: every resource the page loaded is the app's own
    names = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    host = urlparse(served).netloc
    outside = [n for n in names if urlparse(n).scheme in ("http", "https")]
    outside = [n for n in outside if urlparse(n).netloc != host]
    assert names and outside == []
