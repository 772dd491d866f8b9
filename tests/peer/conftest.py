"""Peer suites: other projects' own tests, run against mailqueue with only the import changed.

``flask_mail/`` holds Flask-Mail 0.10.0's test files (see its README): the
``from flask_mail import ...`` lines read ``from mailqueue.contrib.flask
import ...``; nothing else differs. This file is the shim around them:

* every test gets a fresh embedded stack (SQLite file, kombu's SQLite
  transport, the dev SMTP server as relay), so each ``send`` really writes
  rows; after the test, what it queued is delivered in-process with the
  worker's own code, and each message must reach the relay as the bytes its
  ``as_bytes()`` showed (boundaries aside) for every recipient;
* :data:`SKIP` lists the tests that depend on synchronous delivery, each
  with its reason; :data:`DIFFERENT` the deliberate differences (xfail,
  strict: they fail today, and a pass would be noticed).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailqueue.contrib.flask import Message, email_dispatched
from tests.contrib_helpers import all_ids, deliver

HERE = Path(__file__).parent

SKIP: dict[str, str] = {
    f"flask_mail/test_connection.py::{name}": (
        "synchronous delivery: asserts smtplib's sendmail() is called during send(); "
        "mailqueue queues and a worker delivers later (its bytes are checked after the test)"
    )
    for name in (
        "test_sendmail_with_ascii_recipient",
        "test_sendmail_with_non_ascii_recipient",
        "test_sendmail_with_ascii_body",
        "test_sendmail_with_non_ascii_body",
    )
}

_M = "flask_mail/test_message.py::"
DIFFERENT: dict[str, str] = {
    _M + "test_multiline_subject": (
        "#15: CR and LF are refused in the subject (BadHeaderError), folded or not; "
        "Flask-Mail sends a subject folded by the caller"
    ),
    _M + "test_unicode_sender": (
        "'Name <a@x.org>>' is refused as malformed; Flask-Mail's parseaddr drops the stray '>'"
    ),
    _M + "test_unicode_sender_tuple": (
        "('Name', 'a@x.org>') is refused as malformed; Flask-Mail's parseaddr drops the stray '>'"
    ),
    _M + "test_reply_to": (
        "header writer: an ASCII display name is written as it is; Flask-Mail writes "
        "=?utf-8?q?somebody?="
    ),
    _M + "test_unicode_headers": (
        "header writer: encoded words are Q-encoded UTF-8 (same decoded text); "
        "Flask-Mail picks the shorter of B and Q"
    ),
    _M + "test_message_charset": (
        "header writer: headers are UTF-8 encoded words whatever the body charset; "
        "Flask-Mail writes ISO-2022-JP words for charset='shift_jis' (the body charsets match)"
    ),
    _M + "test_plain_message_with_unicode_attachment": (
        "RFC 2231 file names are labelled utf-8; Flask-Mail writes the label UTF8"
    ),
    _M + "test_html_message_with_attachments": (
        "mailqueue's composer ends a text part with a line break; Flask-Mail's MIMEText does not"
    ),
    _M + "test_json_message": (
        "alternatives other than text and html (alts={'json': ...}) are refused "
        "(InvalidMessageError, field 'alts'): mailqueue composes text and html only"
    ),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.path))
        if HERE not in path.parents:
            continue
        key = f"{path.relative_to(HERE).as_posix()}::{item.name}"
        if key in SKIP:
            item.add_marker(pytest.mark.skip(reason=SKIP[key]))
        elif key in DIFFERENT:
            item.add_marker(pytest.mark.xfail(reason=DIFFERENT[key], strict=True))


_BOUNDARY = re.compile(rb'boundary="([^"]+)"')


def _normalized(data: bytes) -> bytes:
    for i, boundary in enumerate(_BOUNDARY.findall(data)):
        data = data.replace(boundary, b"BOUNDARY-%d" % i)
    return data


@pytest.fixture(autouse=True)
def _mailqueue_stack(request: pytest.FixtureRequest) -> Iterator[None]:
    """A fresh queue for each peer test; afterwards, what it queued must arrive as shown."""
    stack = request.getfixturevalue("sqlite_stack")
    server = request.getfixturevalue("smtp_server")
    shown: dict[str, tuple[bytes, set[str]]] = {}

    def remember(app: object, message: Message) -> None:
        if message.mailqueue_id is not None:
            envelope_to = {
                a[1] if isinstance(a, tuple) else re.sub(r".*<|>.*", "", a) for a in message.send_to
            }
            shown[message.mailqueue_id] = (message.as_bytes(), envelope_to)

    with email_dispatched.connected_to(remember):
        yield
    ids = [str(uuid.UUID(i)) for i in all_ids(stack)]
    if not ids:
        return
    assert set(ids) == set(shown), "queued rows and dispatched messages differ"
    deliver(stack, ids)
    received = {}
    for envelope in server.messages:
        mid = envelope.data.split(b"Message-ID: ", 1)[1].split(b"\r\n", 1)[0]
        received.setdefault(mid, []).append(envelope)
    for data, recipients in shown.values():
        mid = data.split(b"Message-ID: ", 1)[1].split(b"\r\n", 1)[0]
        envelopes = received[mid]
        assert {r for e in envelopes for r in e.rcpt_tos} == recipients
        assert all(_normalized(e.data) == _normalized(data) for e in envelopes)
