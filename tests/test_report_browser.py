"""The report in a real headless browser (Chromium, software WebGL): the index, a page's console, the 3D view.

Needs chromium and chromedriver on the PATH or in /usr/bin (Debian: `apt-get install -y --no-install-recommends
chromium chromium-driver`) and selenium (the `dev` extra). Skipped, saying what is missing, where
they are not installed, unless OFER_REQUIRE_BROWSER=1 (CI), which turns the skip into a failure.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np
import pytest

from conftest import REPORT_ODD_NAME
from ofer.report import build_report

CHROMIUM = Path(shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium")
CHROMEDRIVER = Path(shutil.which("chromedriver") or "/usr/bin/chromedriver")
BACKGROUND_BGR = (0xF2, 0xF2, 0xF2)  # the viewer's scene background (report.js)


def missing_browser() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.is_file():
            return f"{path} not found (apt-get install -y --no-install-recommends chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = missing_browser()
    if reason is not None:
        if os.environ.get("OFER_REQUIRE_BROWSER") == "1":
            pytest.fail(f"OFER_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="ofer-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--disable-quic", f"--user-data-dir={profile}", "--window-size=1100,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def report(report_outputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("browser") / "out"
    shutil.copytree(report_outputs, out)
    return build_report(out).parent


def canvas_picture(driver) -> np.ndarray:
    """The viewer's canvas as the browser shows it (BGR)."""
    png = driver.find_element("id", "viewer").screenshot_as_png
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)


def test_the_index_lists_every_image(browser, report):
    browser.get(report.joinpath("index.html").as_uri())
    names = [cell.text for cell in browser.find_elements("css selector", "#images tr td:nth-child(2) a")]
    info = json.loads((report.parent / "summary.json").read_text())
    assert sorted(names) == sorted(info["reconstructed"] + list(info["failed"]))
    failed = browser.find_element("xpath", "//tr[td[2]/a[text()='broken']]").text
    assert info["failed"]["broken"] in failed
    # The thumbnails loaded (the browser decoded them: they have a size).
    sizes = browser.execute_script("return Array.from(document.images).map(i => i.naturalWidth)")
    assert len(sizes) == 4 and all(s > 100 for s in sizes)


def test_a_page_loads_without_errors_and_draws_the_mesh(browser, report):
    browser.get_log("browser")  # drop what earlier pages logged
    page = report / "images" / f"{REPORT_ODD_NAME}.html"
    browser.get(page.as_uri())
    assert quote(REPORT_ODD_NAME) in browser.current_url
    assert browser.find_element("id", "viewer").get_attribute("data-drawn") == "true"
    assert browser.find_element("id", "viewer-message").text == ""
    errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]
    assert errors == []
    plain = canvas_picture(browser)
    drawn = np.abs(plain.astype(int) - BACKGROUND_BGR).sum(2) > 12  # (H, W) pixels that are not background
    width = drawn.shape[1]
    for half in (drawn[:, : width // 2], drawn[:, width // 2 :]):  # the front and the side view
        assert 0.1 < half.mean() < 0.9
    # Colouring by the shape spread paints the same pixels in colour (plain shading is grey).
    browser.find_element("css selector", "input[value=shape]").click()
    coloured = canvas_picture(browser)
    saturation = cv2.cvtColor(coloured, cv2.COLOR_BGR2HSV)[..., 1]
    assert (saturation[drawn] > 80).mean() > 0.8 and (cv2.cvtColor(plain, cv2.COLOR_BGR2HSV)[..., 1][drawn] < 30).all()
    assert browser.find_element("id", "legend").is_displayed()
    # Stepping to an expression sample changes the drawn mesh.
    browser.find_element("id", "next").click()
    assert "expression sample 0" in browser.find_element("id", "mesh-label").text
    assert np.abs(canvas_picture(browser).astype(int) - coloured).sum() > 0
    assert [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []
