"""The chat page at /, in headless Chromium: type, send, see thinking and answer land in their places."""

import shutil

import pytest
from requires import requires

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = requires(bool(CHROMIUM and DRIVER),
                      "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _send(driver, text):
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def _wait_for(driver, script, timeout=120, fail_on_error=True):
    """Polls script until it returns something true; fails at once on an error shown in the page
    (unless told not to), and on timeout with what the page shows."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    def done(d):
        error = d.execute_script("const e = document.querySelector('.msg.error'); return e && e.textContent")
        if error and fail_on_error:
            pytest.fail(f"the page shows an error: {error}")
        return d.execute_script(script)

    try:
        return WebDriverWait(driver, timeout).until(done)
    except TimeoutException:
        shown = driver.execute_script("return document.getElementById('log').innerText")
        console = [entry["message"] for entry in driver.get_log("browser")]
        pytest.fail(f"after {timeout} s the page shows {shown!r}; its console: {console}")


def test_thinking_and_answer_arrive_in_their_places(answering, serve, browser, tmp_path):
    with serve(*answering) as url:
        browser.get(url + "/")
        assert browser.find_element("id", "model").text == "qwen3-tiny"
        _send(browser, "What is 2+2?")
        answer = _wait_for(browser, "const a = document.querySelector('.assistant .answer');"
                                    "return a && a.textContent === 'The answer is 4.' && a.textContent")
        assert answer == "The answer is 4."
        thought = browser.execute_script("return document.querySelector('.assistant details.thinking .thought').textContent")
        assert thought == "Let me think"
        hidden = browser.execute_script("return document.querySelector('.assistant details.thinking').hidden")
        assert hidden is False
        browser.save_screenshot(str(tmp_path / "chat_page.png"))

        # thinking off: the next reply comes without a thinking block
        browser.find_element("id", "think").click()
        _wait_for(browser, "return !document.getElementById('send').disabled")
        _send(browser, "Hello")
        _wait_for(browser, "const a = document.querySelectorAll('.assistant .answer');"
                           "return a.length === 2 && a[1].textContent === 'Hi there!'")
        hidden = browser.execute_script("return document.querySelectorAll('.assistant details.thinking')[1].hidden")
        assert hidden is True


def test_api_key_field(answering, serve, browser):
    with serve(*answering, api_key="sesame") as url:
        browser.get(url + "/")
        browser.execute_script("localStorage.clear(); document.getElementById('key').value = '';")
        _send(browser, "What is 2+2?")
        error = _wait_for(browser, "const e = document.querySelector('.msg.error'); return e && e.textContent",
                          fail_on_error=False)
        assert "Authorization" in error
        key = browser.find_element("id", "key")
        key.send_keys("sesame")
        _send(browser, "What is 2+2?")
        _wait_for(browser, "const a = document.querySelectorAll('.assistant .answer');"
                           "return a.length === 2 && a[1].textContent === 'The answer is 4.'", fail_on_error=False)
        browser.get(url + "/")  # the key is remembered
        assert browser.find_element("id", "key").get_attribute("value") == "sesame"
