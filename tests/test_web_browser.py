"""The status page in a real headless Chromium: what a person sees and clicks.

Needs Debian's ``chromium`` and ``chromium-driver``. With ``CI=true`` the
session installs them when missing (and fails if it cannot); on a laptop
without them these tests are skipped with the reason.

``MAILQUEUE_UPDATE_SCREENSHOT=1`` also writes ``docs/status-page.png`` (the one in the
README comes from ``docs/make_screenshot.py``, over a day of made-up traffic).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import mailqueue
from mailqueue import Message
from mailqueue.web.app import create_app
from mailqueue.worker.service import Deliverer

from .system_packages import require_debian_packages

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "browser-test-token"
DOCS = Path(__file__).resolve().parent.parent / "docs"

# The first test may install Chromium (CI): give its setup time beyond the usual 120 s.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="session")
def browser_binaries() -> None:
    require_debian_packages(
        ["chromium", "chromium-driver"], [CHROMIUM, CHROMEDRIVER], "headless Chromium"
    )


@pytest.fixture
def browser(browser_binaries: None) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="mq-chromium-")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_web(sqlite_stack) -> Iterator[str]:
    """``mailqueue web`` in this process (so it sees the test's settings), on a free port."""
    import uvicorn

    port = _free_port()
    config = uvicorn.Config(
        create_app(token=TOKEN), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "web server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def deliver(stack, ids) -> None:
    async def go() -> None:
        d = Deliverer(stack.settings, stack.store)
        try:
            await d.deliver_batch([uuid.UUID(str(i)) for i in ids])
        finally:
            await d.aclose()

    asyncio.run(go())


def _login(driver, base: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(base + "/")
    assert "/login" in driver.current_url
    driver.find_element(By.NAME, "token").send_keys(TOKEN)
    driver.find_element(By.ID, "login").click()
    _wait(lambda: driver.find_elements(By.ID, "message-counts"), "the status page")


def _wait(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _csp_violations(driver) -> list[str]:
    """What the browser's console said about the Content-Security-Policy since last asked."""
    return [
        e["message"]
        for e in driver.get_log("browser")
        if "Content Security Policy" in e["message"] or "Content-Security-Policy" in e["message"]
    ]


def _counts(driver, box: str) -> dict[str, int]:
    from selenium.webdriver.common.by import By

    cards = driver.find_elements(By.CSS_SELECTOR, f"#{box} .card")
    return {
        c.get_attribute("data-status"): int(c.find_element(By.CSS_SELECTOR, ".n").text)
        for c in cards
    }


def test_status_page_shows_counts_chart_and_filters(browser, live_web, sqlite_stack, smtp_server):
    from selenium.webdriver.common.by import By

    smtp_server.reject = ["bounce*@*"]
    ids = [
        mailqueue.enqueue(
            Message(
                sender="shop@example.com",
                to=[f"customer{i}@example.org"],
                subject=f"Order #{1000 + i}",
                text="Thanks!",
            ),
            metadata={"tag": "orders"},
        )
        for i in range(4)
    ]
    ids.append(
        mailqueue.enqueue(
            Message(
                sender="news@example.com",
                to=["bounce@example.net", "reader@example.org"],
                subject="Newsletter",
                text="News",
            ),
            metadata={"tag": "news"},
        )
    )
    ids.append(
        mailqueue.enqueue(
            Message(sender="news@example.com", to=["bounce2@example.net"], subject="Hi", text="x")
        )
    )
    deliver(sqlite_stack, ids)
    mailqueue.enqueue(Message(sender="shop@example.com", to=["later@example.org"], text="x"))

    _login(browser, live_web)
    assert _counts(browser, "message-counts") == {
        "queued": 1,
        "sending": 0,
        "deferred": 0,
        "sent": 4,
        "partial": 1,
        "failed": 1,
        "cancelled": 0,
        "suppressed": 0,
    }
    assert _counts(browser, "recipient-counts")["failed"] == 2
    bars = browser.find_elements(By.CSS_SELECTOR, "svg.chart rect.sent")
    assert len(bars) == 24 and max(float(b.get_attribute("height")) for b in bars) > 0
    rows = browser.find_elements(By.CSS_SELECTOR, "#messages tbody tr[data-id]")
    assert len(rows) == 7
    # the strict CSP blocks nothing the page uses: the stylesheet applies, no violation logged
    header = browser.find_element(By.TAG_NAME, "header")
    assert header.value_of_css_property("background-color") == "rgba(29, 36, 48, 1)"
    legend = browser.find_element(By.CSS_SELECTOR, ".legend .sw.bad")
    assert legend.value_of_css_property("background-color") == "rgba(217, 63, 63, 1)"
    assert _csp_violations(browser) == []

    if os.environ.get("MAILQUEUE_UPDATE_SCREENSHOT"):
        DOCS.mkdir(exist_ok=True)
        browser.save_screenshot(str(DOCS / "status-page.png"))

    # search by recipient: a person types an address and presses Search
    browser.find_element(By.NAME, "recipient").send_keys("bounce@example.net")
    browser.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
    _wait(lambda: "recipient=" in browser.current_url, "the filtered list")
    rows = browser.find_elements(By.CSS_SELECTOR, "#messages tbody tr[data-id]")
    assert [r.get_attribute("data-id") for r in rows] == [ids[4]]
    assert "partial" in rows[0].text and "Newsletter" in rows[0].text


def test_failed_recipient_shows_code_and_reply_and_retry_requeues(
    browser, live_web, sqlite_stack, smtp_server
):
    from selenium.webdriver.common.by import By

    smtp_server.reject = ["gone@*"]
    mid = mailqueue.enqueue(
        Message(
            sender="app@example.com",
            to=["ok@example.org", "gone@example.org"],
            subject="Receipt",
            text="x",
        )
    )
    deliver(sqlite_stack, [mid])

    _login(browser, live_web)
    browser.find_element(By.CSS_SELECTOR, f'#messages tr[data-id="{mid}"] a').click()
    _wait(lambda: browser.find_elements(By.ID, "recipients"), "the message page")
    assert browser.find_element(By.ID, "message-status").text == "partial"
    gone = browser.find_element(By.CSS_SELECTOR, '#recipients tr[data-address="gone@example.org"]')
    assert gone.find_element(By.CSS_SELECTOR, ".rstatus").text == "failed"
    assert gone.find_element(By.CSS_SELECTOR, ".code").text.startswith("550")
    reply = gone.find_element(By.CSS_SELECTOR, ".reply").text
    stored = {r.address: r.reply for r in mailqueue.get_status(mid).recipients}
    assert reply and reply == stored["gone@example.org"]
    assert "Subject: Receipt" in browser.find_element(By.ID, "headers").text

    smtp_server.reject = []  # the mailbox exists again: retry from the page
    browser.find_element(By.ID, "retry").click()
    _wait(lambda: browser.find_elements(By.ID, "notice"), "the retry notice")
    assert browser.find_element(By.ID, "message-status").text == "queued"
    gone = browser.find_element(By.CSS_SELECTOR, '#recipients tr[data-address="gone@example.org"]')
    assert gone.find_element(By.CSS_SELECTOR, ".rstatus").text == "pending"

    deliver(sqlite_stack, [mid])
    browser.refresh()
    assert browser.find_element(By.ID, "message-status").text == "sent"
    assert len(smtp_server.received_for("ok@example.org")) == 1  # never sent twice
    assert len(smtp_server.received_for("gone@example.org")) == 1


def test_log_out_ends_the_session_for_good(browser, live_web, sqlite_stack):
    from selenium.webdriver.common.by import By

    _login(browser, live_web)
    session = browser.get_cookie("mq_session")
    assert session and session["httpOnly"] and session["sameSite"] == "Strict"
    assert "browser-test-token" not in session["value"]

    browser.find_element(By.CSS_SELECTOR, "header form button").click()
    _wait(lambda: "/login" in browser.current_url, "the login page")
    assert browser.get_cookie("mq_session") is None
    # the cookie as it was before the logout opens nothing any more
    browser.add_cookie({"name": "mq_session", "value": session["value"], "path": "/"})
    browser.get(live_web + "/")
    assert "/login" in browser.current_url
    assert _csp_violations(browser) == []

    _login(browser, live_web)  # and a new login gets a new session
    assert browser.get_cookie("mq_session")["value"] != session["value"]
