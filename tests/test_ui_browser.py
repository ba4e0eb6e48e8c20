"""The chat page in a real headless Chromium (Selenium, the system chromedriver): type a
message, watch the answer stream in, keep a screenshot in tests/artifacts/, and see a
broken upload refused with a message on the page.

Skips where Chromium is not installed, except in CI (env CI set), where it fails:
.ci/run installs Debian's chromium and chromium-driver, so a skip there would hide a
broken set-up."""

import os
import time
from pathlib import Path

import pytest

from workbench.ui import browser
from workbench.ui.app import build_app

ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="module")
def page(request):
    try:
        browser.find_browser()
    except browser.BrowserMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc}: CI must run the browser test (.ci/run installs them)")
        pytest.skip(str(exc))
    app = build_app(request.getfixturevalue("embedded"))  # only once there is a browser to use it
    url = browser.launch(app)
    driver = browser.chrome()
    try:
        browser.open_page(driver, url)
        yield driver
    finally:
        driver.quit()
        app.close()


@pytest.mark.embedded
def test_typed_message_streams_an_answer_into_the_page(page):
    browser.set_number(page, "temperature", 0)
    seen = browser.send_and_wait(page, "What is the capital of France? Answer in one sentence.")
    shot = browser.screenshot(page, ARTIFACTS / "ui-chat.png")
    assert "Paris" in seen[-1]
    assert len(seen) >= 2, f"the answer appeared all at once, not streamed: {seen}"
    stats = browser.stats_text(page)
    assert "tok/s" in stats and "KV cache" in stats
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank window


@pytest.mark.embedded
def test_a_broken_image_is_refused_with_a_message_and_the_text_is_kept(page, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    broken = tmp_path / "photo.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    page.find_element(By.CSS_SELECTOR, "#message input[type=file]").send_keys(str(broken))
    box = page.find_element(By.CSS_SELECTOR, "#message textarea")
    time.sleep(1)  # the upload
    box.send_keys("What is in this photo?", Keys.ENTER)
    deadline = time.monotonic() + 30
    while (
        not any("could not read the image photo.png" in t for t in browser.toasts(page)) and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    browser.screenshot(page, ARTIFACTS / "ui-bad-image.png")
    assert any("could not read the image photo.png" in t for t in browser.toasts(page)), browser.toasts(page)
    assert box.get_attribute("value") == "What is in this photo?"
