"""Drive the chat page in a real headless Chromium (Selenium with the system chromedriver):
what the browser test and the README screenshot both do, so the picture is the tested page."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


class BrowserMissing(RuntimeError):
    """No Chromium or chromedriver on this machine; the message says how to install them."""


def find_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or BrowserMissing."""
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        raise BrowserMissing(
            "headless Chromium and chromedriver are needed (Debian/Ubuntu: apt-get install chromium chromium-driver)"
        )
    return browser, driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(app) -> str:
    """Start `app` on a free loopback port in this process; its URL."""
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}/"


def chrome(width: int = 1360, height: int = 980):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(arg)
    # The system chromedriver: Selenium Manager would otherwise try to download one.
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def send_and_wait(driver, url: str, message: str, timeout: float = 120) -> tuple[str, str]:
    """Open the page, type `message`, press Enter, and wait for the streamed answer to
    finish (the stats line appears). Returns (answer text, stats text)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    box = WebDriverWait(driver, 60).until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#message textarea")))
    box.send_keys(message)
    box.send_keys(Keys.ENTER)
    WebDriverWait(driver, timeout, poll_frequency=0.2).until(
        lambda d: "tok/s" in d.find_element(By.ID, "stats").text
    )
    time.sleep(0.5)  # the last chunk's render
    bubbles = driver.find_elements(By.CSS_SELECTOR, "#chatbot .bot")
    return (bubbles[-1].text if bubbles else ""), driver.find_element(By.ID, "stats").text


def screenshot(driver, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(out))
    return out
