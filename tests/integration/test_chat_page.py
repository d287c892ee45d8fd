"""The chat page at / in a real headless browser (Debian's chromium + chromedriver, through selenium):
it lists the served models, streams an answer, and the answer is the API's for the same settings."""

from __future__ import annotations

import shutil

import pytest

from tests.integration.test_serve import PROMPT, Server, get, post

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="no headless browser: install Debian's chromium and chromium-driver (apt-get install chromium "
           "chromium-driver) to run the chat page test",
)


@pytest.fixture(scope="module")
def page_server(tmp_path_factory, quickstart_run):
    s = Server(tmp_path_factory.mktemp("serve-log") / "page.log", str(quickstart_run))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_chat_page_streams_the_answer_of_the_picked_model(page_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(page_server.url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 2)
    assert [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "model")).options] == \
        ["qs", "tiny-llama-v3"]
    Select(browser.find_element(By.ID, "model")).select_by_value("qs")
    for field, value in (("temperature", "0"), ("max_tokens", "24")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "prompt").send_keys(PROMPT.replace("\n", ""))
    browser.find_element(By.ID, "send").click()
    done = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".assistant[data-done='1']")))
    expected = post(page_server, "/v1/chat/completions", {
        "model": "qs", "messages": [{"role": "user", "content": PROMPT.replace("\n", "")}], "temperature": 0,
        "max_tokens": 24}, key=None).json()["choices"][0]["message"]["content"]
    assert done.text.strip() == expected.strip() and expected.strip()
    assert page_server.health()["stats"]["requests"] == 2  # the page's request and ours
    assert not browser.find_elements(By.CSS_SELECTOR, ".error")


def test_chat_page_needs_nothing_from_the_network(page_server):
    text = get(page_server.url + "/").text  # no CDN, no external script or style: works offline
    assert "<script" in text and "src=" not in text and "http" not in text.replace(page_server.url, "")
