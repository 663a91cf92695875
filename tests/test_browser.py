"""The browser page end to end: a real headless Chromium captures examples/front_door.wav as
its (fake) microphone, resamples it to 16 kHz in the page's AudioWorklet and streams it over
the WebSocket to the server, which runs the embedded demo model; the page must show the
doorbell reply with its emotion.

Chromium's fake capture reads the 16 kHz WAV as it is (it converts to the capture rate, 44.1
or 48 kHz, itself) and loops it; the page resamples that back to 16 kHz.

Needs Chromium, its chromedriver and selenium (Debian: apt-get install chromium
chromium-driver; pip install selenium); skips without them. Screenshots go to the test's tmp
dir and, when LISTENLOOP_ARTIFACTS names a folder, there too.
"""
from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import threading

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WAV = ROOT / "examples" / "front_door.wav"
REPLY = "Someone is at the door."
REPLY_TIMEOUT_S = 60.0


def _browser_paths():
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install 'selenium>=4')")
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("Chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    return chromium, driver


class _Server:
    """The aiohttp app on a free loopback port, served from a background thread's event loop."""

    def __init__(self, app):
        from aiohttp import web

        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self.thread = threading.Thread(target=self.loop.run_forever, name="browser-test-server", daemon=True)
        self.thread.start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@pytest.fixture(scope="module")
def runtime():
    import listenloop

    rt = listenloop.Runtime()  # the embedded demo model
    try:
        yield rt
    finally:
        rt.close()


@pytest.fixture
def serve(runtime):
    """Factory: create_app options -> a started _Server (closed after the test)."""
    pytest.importorskip("aiohttp")
    from listenloop.server import create_app

    servers = []

    def start(**options):
        servers.append(_Server(create_app(runtime, **options)))
        return servers[-1]

    try:
        yield start
    finally:
        for srv in servers:
            srv.close()


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={WAV}", "--autoplay-policy=no-user-gesture-required",
                "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--window-size=900,1100", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _save_screenshot(driver, tmp_path, name: str) -> pathlib.Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    artifacts = os.environ.get("LISTENLOOP_ARTIFACTS")
    if artifacts:
        folder = pathlib.Path(artifacts)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / name)
    return path


def _page_state(driver) -> str:
    """What the page shows, for failure messages."""
    from selenium.webdriver.common.by import By

    parts = [f"{i}: {driver.find_element(By.ID, i).text!r}" for i in ("status", "replies", "drops", "stats", "notices")]
    logs = [entry.get("message", "") for entry in driver.get_log("browser")][-20:]
    return "; ".join(parts) + "\nbrowser console:\n" + "\n".join(logs)


@pytest.mark.timeout(240)
def test_page_streams_the_microphone_and_shows_the_reply(browser, serve, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = serve()
    browser.get(server.url + "/")
    assert browser.title == "listenloop"
    start = browser.find_element(By.ID, "start")
    assert browser.find_element(By.ID, "status").text == "idle"
    start.click()

    try:
        WebDriverWait(browser, 20, poll_frequency=0.2).until(
            lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "listening")
        WebDriverWait(browser, REPLY_TIMEOUT_S, poll_frequency=0.25).until(
            lambda d: REPLY in d.find_element(By.ID, "replies").text)
        # the reply has finished streaming (ReplyEnded) and carries its emotion
        WebDriverWait(browser, 10, poll_frequency=0.2).until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#replies > li')].some("
            "li => li.dataset.state === 'done' && li.textContent.includes(arguments[0]))", REPLY))
    except TimeoutException:
        _save_screenshot(browser, tmp_path, "browser-failure.png")
        pytest.fail(f"the page never showed {REPLY!r}\n{_page_state(browser)}")

    reply = browser.execute_script(
        "const li = [...document.querySelectorAll('#replies > li')].find(li => li.textContent.includes(arguments[0]));"
        "return {emotion: li.dataset.emotion, emoji: li.querySelector('.emoji').textContent,"
        "        label: li.querySelector('.emoji').getAttribute('aria-label')};", REPLY)
    assert reply == {"emotion": "NORMAL", "emoji": "😐", "label": "neutral"}, reply

    # the timeline drew the decisions so far; the drop counters are there and readable
    timeline = browser.find_element(By.ID, "timeline")
    assert timeline.tag_name == "canvas"
    assert "p_speak" in timeline.get_attribute("aria-label")
    assert browser.execute_script("return document.getElementById('timeline').width") > 0
    drops = browser.find_element(By.ID, "drops")
    assert "Audio dropped" in drops.text and "Events dropped" in drops.text and "Clipped" in drops.text
    for counter in ("drop-samples", "drop-events", "drop-clipped"):
        assert int(browser.find_element(By.ID, counter).get_attribute("data-value")) >= 0

    errors = [e["message"] for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert not errors, errors  # nothing failed to load (every asset is the server's own) and no script error
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(r => r.name)")
    assert resources and all(r.startswith(server.url + "/") for r in resources), resources

    shot = _save_screenshot(browser, tmp_path, "browser.png")
    assert shot.stat().st_size > 0
    # the same page at a phone's width
    browser.set_window_size(360, 1000)
    overflow = browser.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than a 360 px window"
    _save_screenshot(browser, tmp_path, "browser-360px.png")
    browser.set_window_size(900, 1100)

    # Stop: the page sends {"type": "finish"}; the server sends the rest and closes.
    start.click()
    try:
        WebDriverWait(browser, 30, poll_frequency=0.2).until(
            lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "closed")
    except TimeoutException:
        pytest.fail(f"the connection did not close after stop\n{_page_state(browser)}")
    status = browser.find_element(By.ID, "status").text
    assert status.startswith("closed: finished (") and status.endswith(" chunks)"), status
    assert browser.find_element(By.ID, "start").get_attribute("aria-pressed") == "false"


@pytest.mark.timeout(120)
def test_page_passes_its_api_key_on(browser, serve):
    """With an API key every request needs it: the page's ?key= reaches its files, the worklet
    and the WebSocket."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    key = "k3y with spaces&symbols"
    server = serve(api_key=key)
    from urllib.parse import quote

    browser.get(f"{server.url}/?key={quote(key, safe='')}")
    start = WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "start"))
    # the stylesheet loaded (the button is styled) and app.js runs (it wrote the drop counters)
    assert browser.execute_script("return getComputedStyle(arguments[0]).borderTopWidth", start) == "0px"
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "drop-events").text == "0")
    start.click()
    try:
        WebDriverWait(browser, 20, poll_frequency=0.2).until(
            lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "listening")
        WebDriverWait(browser, 20, poll_frequency=0.2).until(lambda d: d.execute_script(
            "return document.getElementById('timeline').getAttribute('aria-label').includes('p_speak')"))
    except TimeoutException:
        pytest.fail(f"the page did not stream with the API key\n{_page_state(browser)}")
    start.click()
    WebDriverWait(browser, 30, poll_frequency=0.2).until(
        lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "closed")


@pytest.mark.timeout(120)
def test_page_says_why_the_server_refused(browser, serve):
    """A refused WebSocket (here: the server's one session is taken) closes with the server's reason."""
    import aiohttp
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = serve(max_sessions=1)

    async def occupy():
        client = aiohttp.ClientSession()
        ws = await client.ws_connect(server.url + "/v1/pcm")
        assert (await ws.receive_json(timeout=10))["event"] == "Ready"
        return client, ws

    async def release(client, ws):
        await ws.close()
        await client.close()

    client, ws = asyncio.run_coroutine_threadsafe(occupy(), server.loop).result(timeout=30)
    try:
        browser.get(server.url + "/")
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "drop-events").text == "0")
        browser.find_element(By.ID, "start").click()
        WebDriverWait(browser, 20, poll_frequency=0.2).until(
            lambda d: "session limit" in d.find_element(By.ID, "status").text)
        status = browser.find_element(By.ID, "status")
        assert status.get_attribute("data-state") == "closed" and "HTTP 503" in status.text, status.text
        assert browser.find_element(By.ID, "start").get_attribute("aria-pressed") == "false"
    finally:
        asyncio.run_coroutine_threadsafe(release(client, ws), server.loop).result(timeout=30)
