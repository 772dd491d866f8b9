"""The Django admin for mailqueue in a real headless Chromium, on both database stacks.

A person logs in as a superuser, opens the messages list, filters it, opens a
message, presses Retry, and cancels another from the list with the action
menu. The Django project is ``tests/django_project`` served by a WSGI server
in this process (with the admin's static files); on PostgreSQL mailqueue's
tables live in the ``pg`` database and Django's users in ``default``.

Needs Debian's ``chromium`` and ``chromium-driver`` (see ``test_web_browser.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from django.test import override_settings

import mailqueue
from tests.test_django import dj  # noqa: F401  (fixtures)
from tests.test_django_admin import Seeded, _user, django_env, seeded  # noqa: F401  (fixtures)
from tests.test_web_browser import _wait, browser, browser_binaries  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(900)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def live_admin(seeded: Seeded) -> Iterator[str]:  # noqa: F811
    """The test project (admin and static files) on a free port, in a thread of this process."""
    from django.contrib.staticfiles.handlers import StaticFilesHandler
    from django.core.wsgi import get_wsgi_application

    server = make_server(
        "127.0.0.1",
        0,
        StaticFilesHandler(get_wsgi_application()),
        server_class=_Server,
        handler_class=_QuietHandler,
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with override_settings(ALLOWED_HOSTS=["127.0.0.1"]):
            yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _subjects(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#result_list td.field-subject")]


def _notes(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "ul.messagelist li")]


def _recipient_statuses(driver) -> dict[str, str]:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#mq-recipients tbody tr")
    return {
        r.find_elements(By.TAG_NAME, "td")[0].text: r.find_element(
            By.CSS_SELECTOR, ".mq-status"
        ).text
        for r in rows
    }


def test_superuser_filters_opens_a_message_and_retries_it(browser, live_admin, seeded):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _user("boss", superuser=True)
    browser.get(live_admin + "/admin/mailqueue/message/")
    _wait(lambda: browser.find_elements(By.ID, "id_username"), "the login page")
    browser.find_element(By.ID, "id_username").send_keys("boss")
    browser.find_element(By.ID, "id_password").send_keys("pw")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    _wait(lambda: browser.find_elements(By.ID, "result_list"), "the messages list")
    assert _subjects(browser) == ["Bulk offer", "Newsletter", "Receipt 42", "Welcome Ana"]
    # the admin's own stylesheet is served and applies
    header = browser.find_element(By.ID, "header")
    assert header.value_of_css_property("display") == "flex"

    # filter by status: the link in the side bar
    browser.find_element(By.CSS_SELECTOR, "#changelist-filter a[href*='status=partial']").click()
    _wait(lambda: "status=partial" in browser.current_url, "the filtered list")
    assert _subjects(browser) == ["Receipt 42"]

    # the tag, typed in, keeps the status filter
    browser.find_element(By.ID, "mq-filter-tag").send_keys("welcome")
    browser.find_element(By.CSS_SELECTOR, "form.mq-text-filter input[type=submit]").click()
    _wait(lambda: "tag=welcome" in browser.current_url, "the tag filter")
    assert "status=partial" in browser.current_url and _subjects(browser) == []
    browser.get(live_admin + "/admin/mailqueue/message/?status=partial")

    # search by a recipient's address
    browser.find_element(By.ID, "searchbar").send_keys("cy@example.org")
    browser.find_element(By.CSS_SELECTOR, "#changelist-search input[type=submit]").click()
    _wait(lambda: "q=cy" in browser.current_url, "the search")
    assert _subjects(browser) == ["Receipt 42"]

    # open it: each recipient's status and every attempt
    browser.find_element(By.LINK_TEXT, "Receipt 42").click()
    _wait(lambda: browser.find_elements(By.ID, "mq-recipients"), "the message page")
    assert _recipient_statuses(browser) == {
        "bounce-bo@example.org": "failed",
        "cy@example.org": "sent",
    }
    attempts = browser.find_elements(By.CSS_SELECTOR, "#mq-attempts tbody tr")
    assert len(attempts) == 2 and "550" in attempts[0].text

    # Retry: the refused recipient is pending again, the accepted one untouched
    browser.find_element(By.ID, "mq-retry").click()
    _wait(lambda: _notes(browser), "the retry note")
    assert _notes(browser)[0].startswith("Retry: 1 of 1 message(s) requeued")
    assert _recipient_statuses(browser) == {
        "bounce-bo@example.org": "pending",
        "cy@example.org": "sent",
    }
    assert mailqueue.get_status(seeded.bounced).status == "queued"

    # Cancel from the list, with the action menu
    browser.get(live_admin + "/admin/mailqueue/message/?status=queued&relay=bulk")
    _wait(lambda: browser.find_elements(By.ID, "result_list"), "the list")
    assert _subjects(browser) == ["Bulk offer"]
    browser.find_element(By.CSS_SELECTOR, "#result_list input.action-select").click()
    Select(browser.find_element(By.NAME, "action")).select_by_value("cancel_messages")
    browser.find_element(By.CSS_SELECTOR, "button[name=index], input[name=index]").click()
    _wait(lambda: _notes(browser), "the cancel note")
    assert _notes(browser) == ["Cancel: 1 recipient(s) cancelled in 1 of 1 message(s)."]
    assert mailqueue.get_status(seeded.bulk).status == "cancelled"
    assert mailqueue.get_status(seeded.queued).status == "queued"
