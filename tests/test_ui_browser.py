"""The chat page in a real headless Chromium (Selenium, the system chromedriver): type a
message, watch the answer stream in, keep a screenshot in tests/artifacts/, see a broken
upload refused with a message on the page, and find a conversation again after a reload,
exported as JSON and imported back identical.

Skips where Chromium is not installed, except in CI (env CI set), where it fails:
.ci/run installs Debian's chromium and chromium-driver, so a skip there would hide a
broken set-up."""

import json
import os
import time
from pathlib import Path

import pytest

from workbench.ui import browser
from workbench.ui.app import build_app

ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def page(request, downloads):
    try:
        browser.find_browser()
    except browser.BrowserMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc}: CI must run the browser test (.ci/run installs them)")
        pytest.skip(str(exc))
    app = build_app(request.getfixturevalue("embedded"))  # only once there is a browser to use it
    url = browser.launch(app)
    driver = browser.chrome(downloads=downloads)
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


@pytest.mark.embedded
def test_a_conversation_survives_a_reload_and_exports_and_imports_identical(page, downloads, tmp_path):
    from selenium.webdriver.common.by import By

    browser.reload(page)  # an empty message box (the test before leaves a broken upload in it)
    page.find_element(By.ID, "new-chat").click()
    browser.wait_for(lambda: not browser.chat_texts(page), what="a fresh chat")
    browser.set_number(page, "temperature", 0)
    browser.set_number(page, "max_tokens", 24)
    system = page.find_element(By.CSS_SELECTOR, "#system textarea")
    system.clear()
    system.send_keys("You are a geography teacher.")
    answer = browser.send_and_wait(page, "Name the capital of Italy.")[-1]
    title = "*Name the capital of Italy."
    browser.wait_for(lambda: title in browser.radio_labels(page, "conversation-list"), what="the chat in the list")
    shown = browser.chat_texts(page)
    assert shown == [("user", "Name the capital of Italy."), ("bot", answer)]

    browser.reload(page)  # kept in the browser: the page comes back where it was
    browser.wait_for(lambda: browser.chat_texts(page) == shown, what=f"the chat after a reload ({shown})")
    assert title in browser.radio_labels(page, "conversation-list")
    assert (
        page.find_element(By.CSS_SELECTOR, "#system textarea").get_attribute("value") == "You are a geography teacher."
    )

    exported = browser.download(page, "export-json", downloads)
    data = json.loads(exported.read_text(encoding="utf-8"))
    assert data["format"] == "workbench-conversation" and data["system"] == "You are a geography teacher."
    user, reply = data["messages"][-2:]
    assert user == {"role": "user", "content": "Name the capital of Italy.", "attachments": []}
    assert reply["content"] == answer and reply["stats"]["decode_tokens_per_s"] > 0
    assert reply["model"]["name"] == "original" and reply["model"]["config"]["model"]["source"].startswith("embedded:")

    before = browser.radio_labels(page, "conversation-list")
    bad = tmp_path / "broken.json"
    bad.write_text('{"format": "workbench-conversation", "version": 1, "messages": [}')
    browser.upload(page, "import-json", bad)
    browser.wait_for(
        lambda: any("broken.json is not valid JSON" in t for t in browser.toasts(page)), what="the refusal"
    )
    assert browser.radio_labels(page, "conversation-list") == before and browser.chat_texts(page) == shown

    browser.upload(page, "import-json", exported)
    browser.wait_for(
        lambda: len(browser.radio_labels(page, "conversation-list")) == len(before) + 1, what="the imported chat"
    )
    assert browser.radio_labels(page, "conversation-list")[0] == title  # first in the list, shown
    browser.wait_for(lambda: browser.chat_texts(page) == shown, what="the imported chat in the window")
    again = browser.download(page, "export-json", downloads)
    assert again.read_bytes() == exported.read_bytes()

    # Regenerate (greedy: the same answer again, in place) and undo (the question back in the box).
    # The reload put the generation settings back to the config's (temperature 0.7, 512 tokens).
    browser.set_number(page, "temperature", 0)
    browser.set_number(page, "max_tokens", 24)
    page.find_element(By.CSS_SELECTOR, "#chatbot button[aria-label='Retry']").click()
    browser.wait_for(lambda: "tok/s" in browser.stats_text(page), timeout=120, what="the regenerated reply")
    browser.wait_for(lambda: browser.chat_texts(page) == shown, what="the regenerated chat")
    page.find_element(By.CSS_SELECTOR, "#chatbot button[aria-label='Undo']").click()
    browser.wait_for(lambda: browser.chat_texts(page) == [], what="the chat after an undo")
    box = page.find_element(By.CSS_SELECTOR, "#message textarea")
    assert box.get_attribute("value") == "Name the capital of Italy."
    assert len(browser.radio_labels(page, "conversation-list")) == len(before) + 1  # nothing added by either
