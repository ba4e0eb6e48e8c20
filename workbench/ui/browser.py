"""Drive the chat page in a real headless Chromium (Selenium with the system chromedriver):
what the browser test and the README screenshot both do, so the picture is the tested page."""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

from workbench.serve.live import free_port

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


class BrowserMissing(RuntimeError):
    """No Chromium or chromedriver on this machine; the message says how to install them."""


def find_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or BrowserMissing."""
    if importlib.util.find_spec("selenium") is None:
        raise BrowserMissing("selenium is needed to drive the browser: pip install selenium==4.51.0 (the dev extra)")
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        raise BrowserMissing(
            "headless Chromium and chromedriver are needed (Debian/Ubuntu: apt-get install chromium chromium-driver)"
        )
    return browser, driver


def launch(app) -> str:
    """Start `app` on a free loopback port in this process; its URL."""
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}/"


def chrome(width: int = 1360, height: int = 980, downloads: Path | None = None):
    """Headless Chromium; files the page downloads land in `downloads`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    if downloads is not None:
        options.add_experimental_option(
            "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
        )
    # The system chromedriver: Selenium Manager would otherwise try to download one.
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def open_page(driver, url: str):
    """Load the page and wait until the message box takes input; returns the box."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    return WebDriverWait(driver, 60).until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#message textarea")))


def set_number(driver, elem_id: str, value: float) -> None:
    """Type a value into a slider's number box, as a person would."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value), Keys.TAB)


def send_and_wait(driver, message: str, timeout: float = 180) -> list[str]:
    """Type `message` into the open page, press Enter, and wait until the streamed answer
    is finished (the stats line shows its speed). Returns every distinct text the answer
    bubble showed on the way, the final answer last."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, "#message textarea")
    box.send_keys(message)
    box.send_keys(Keys.ENTER)
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            bubbles = driver.find_elements(By.CSS_SELECTOR, "#chatbot .bot")
            text = bubbles[-1].text.strip() if bubbles else ""
            done = "tok/s" in driver.find_element(By.ID, "stats").text
        except StaleElementReferenceException:  # re-rendered between find and read
            continue
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        if done and text:
            time.sleep(0.3)  # the last chunk's render
            final = driver.find_elements(By.CSS_SELECTOR, "#chatbot .bot")[-1].text.strip()
            return seen if seen[-1] == final else [*seen, final]
        time.sleep(0.05)
    raise TimeoutError(f"no finished answer within {timeout:.0f}s; last seen: {seen[-1:]!r}")


def wait_for(check, timeout: float = 30, what: str = "the page"):
    """`check()`'s first truthy value, tried until `timeout`; TimeoutError names `what`."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except StaleElementReferenceException:  # re-rendered between find and read
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.1)


def reload(driver) -> None:
    """Reload the page as a person would, and wait until it takes input again."""
    driver.refresh()
    open_page(driver, driver.current_url)


def chat_texts(driver) -> list[tuple[str, str]]:
    """(user|bot, text) of each message in the chat, top to bottom."""
    from selenium.webdriver.common.by import By

    return [
        ("user" if "user" in (e.get_attribute("class") or "").split() else "bot", e.text.strip())
        for e in driver.find_elements(By.CSS_SELECTOR, "#chatbot .user, #chatbot .bot")
    ]


def radio_labels(driver, elem_id: str) -> list[str]:
    """The choices of a gr.Radio, as shown; the selected one marked with a leading '*'."""
    from selenium.webdriver.common.by import By

    return [
        ("*" if "selected" in (e.get_attribute("class") or "") else "") + e.text.strip()
        for e in driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} label")
    ]


def download(driver, elem_id: str, folder: Path, timeout: float = 30) -> Path:
    """Click a gr.DownloadButton and wait for its file in `folder` (chrome(downloads=folder))."""
    from selenium.webdriver.common.by import By

    before = set(folder.iterdir())
    driver.find_element(By.ID, elem_id).click()

    def arrived():
        # Chromium writes into a hidden ".org.chromium.Chromium.*" or "*.crdownload" file and
        # renames it when done; only the renamed file is the download.
        new = [
            p
            for p in set(folder.iterdir()) - before
            if not p.name.startswith(".") and not p.name.endswith(".crdownload") and p.exists()
        ]
        return new[0] if new else None

    return wait_for(arrived, timeout, f"the download from #{elem_id}")


def upload(driver, elem_id: str, path: Path) -> None:
    """Hand a file to a gr.UploadButton, as picking it in the file dialog does."""
    from selenium.webdriver.common.by import By

    # Gradio renders the (hidden) file input beside the button, not inside it.
    driver.find_element(By.XPATH, f"//*[@id='{elem_id}']/..//input[@type='file']").send_keys(str(path))


def stats_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "stats").text


def toasts(driver) -> list[str]:
    """The text of every notification on the page (Gradio's gr.Error / gr.Warning toasts)."""
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']")]


def screenshot(driver, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(out))
    return out
