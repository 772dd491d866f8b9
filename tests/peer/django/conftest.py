"""Django's own backend tests, run against ``mailqueue.contrib.django.EmailBackend``.

``django52_mail_tests.py`` and ``django61_mail_tests.py`` hold Django's
backend-agnostic test classes verbatim (Django 5.2's ``BaseEmailBackendTests``,
6.1's ``SharedEmailBackendTests``; see their headers). ``test_django52.py``
and ``test_django61.py`` subclass them the way Django's own test suite does
for each of its backends, implementing the mixin's hooks:

* the backend is mailqueue's, with Django's default settings
  (``DEFAULT_FROM_EMAIL`` webmaster@localhost, ``SERVER_EMAIL`` root@localhost);
  each send writes rows in a SQLite queue;
* a real ``mailqueue worker`` process (kombu's SQLite transport) delivers
  them to the dev SMTP server, for the whole module;
* ``get_mailbox_content()`` waits until the worker has finished every queued
  message, then returns what the SMTP server received, parsed, one entry per
  message, in the order the messages were queued (the worker may deliver
  them in another order: that is the one difference the issue allows, and
  the order of the rows is what the tests' ``messages[0]``/``messages[1]``
  then read);
* ``flush_mailbox()`` drains the queue and forgets what the server received.

:data:`DIFFERENT` lists the known differences, each a strict xfail with its
reason (a pass would be noticed); :data:`SKIP` the tests skipped, with theirs.
"""

from __future__ import annotations

import email
import email.policy
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
import sqlalchemy as sa

import mailqueue
from mailqueue.config import configure, settings_from_env
from mailqueue.devserver import DevServer
from mailqueue.migrate import upgrade
from tests.conftest import Stack, _base_settings
from tests.test_hostile_django import _setup_django

HERE = Path(__file__).parent

SKIP: dict[str, str] = {}

DIFFERENT: dict[str, str] = {}
# Both empty today: every test of both suites passes. (Bare names with no domain,
# Django tickets #15042 and #24416, are handed to the relay as Django's SMTP
# backend hands them: tests/test_django.py.)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.path))
        if HERE not in path.parents:
            continue
        key = "::".join([path.name, *item.nodeid.split("::")[1:]])
        if key in SKIP:
            item.add_marker(pytest.mark.skip(reason=SKIP[key]))
        elif key in DIFFERENT:
            item.add_marker(pytest.mark.xfail(reason=DIFFERENT[key], strict=True))


class Mailbox:
    """The queue, its worker and the SMTP server it delivers to, seen as Django's mailbox."""

    def __init__(self, stack: Stack, server: DevServer, worker: subprocess.Popen[bytes], log: Path):
        self.stack, self.server, self.worker, self.log = stack, server, worker, log

    def drain(self, timeout: float = 60.0) -> None:
        """Wait until the worker has finished every queued message (sent, failed or deferred)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.stack.engine.connect() as conn:
                left = conn.execute(
                    sa.text("SELECT count(*) FROM mq_message WHERE status IN ('queued', 'sending')")
                ).scalar_one()
            if not left:
                return
            if self.worker.poll() is not None:
                raise AssertionError(f"the worker exited:\n{self.log.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{left} message(s) still queued after {timeout:.0f}s; worker log:\n"
                    + self.log.read_text(errors="replace")
                )
            time.sleep(0.05)

    def content(self, read: Callable[[bytes], bytes] = bytes) -> list[EmailMessage]:
        """What the server received, one message per queued message, in the order queued;
        each message's bytes pass through ``read`` first, as Django's own SMTP test
        handler treats them (5.2: ``data.rstrip()``; 6.1: CRLF read as LF)."""
        self.drain()
        with self.stack.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT content FROM mq_message ORDER BY rowid")).scalars()
            order = {_message_id(bytes(c)): i for i, c in enumerate(rows)}
        received = sorted(
            self.server.messages, key=lambda e: order.get(_message_id(e.data), len(order))
        )
        return [
            email.message_from_bytes(read(e.data), policy=email.policy.default)  # type: ignore[misc]
            for e in received
        ]

    def envelopes(self) -> list[tuple[str, tuple[str, ...]]]:
        self.drain()
        return [(e.mail_from, tuple(e.rcpt_tos)) for e in self.server.messages]

    def flush(self) -> None:
        self.drain()
        with self.stack.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM mq_recipient"))
            conn.execute(sa.text("DELETE FROM mq_message"))
        self.server.messages.clear()


def _message_id(data: bytes) -> bytes:
    head = data.partition(b"\r\n\r\n")[0]
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"message-id:"):
            return line.partition(b":")[2].strip()
    return b""


@pytest.fixture(scope="module", autouse=True)
def peer_mailbox(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Mailbox]:
    """One queue, one real ``mailqueue worker`` and one dev SMTP server for the module
    (module-scoped and autouse: Django is set up before the test classes' ``setUpClass``)."""
    _setup_django(tmp_path_factory, request)
    tmp = tmp_path_factory.mktemp("peer-django")
    server = DevServer().start()
    settings = _base_settings(
        f"sqlite:///{tmp / 'mailqueue.db'}",
        f"sqla+sqlite:///{tmp / 'broker.db'}",
        server.url,
        f"mq-peer-{uuid.uuid4().hex[:8]}",
    )
    upgrade(settings.database_url)
    stack = Stack("sqlite", configure(settings))
    log = tmp / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "mailqueue", "worker", "-P", "solo", "--loglevel", "WARNING"],
            env=stack.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Mailbox(stack, server, worker, log)
    finally:
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        server.stop()
        mailqueue._reset_caches()
        configure(settings_from_env({}))


@pytest.fixture(autouse=True)
def _peer_mailbox(request: pytest.FixtureRequest) -> Iterator[None]:
    """Hands the mailbox to each Django test case, empty; empties it again afterwards."""
    if request.instance is None or not hasattr(request.instance, "get_mailbox_content"):
        yield
        return
    mailbox: Mailbox = request.getfixturevalue("peer_mailbox")
    mailbox.flush()
    request.instance.mailbox = mailbox
    yield
    mailbox.flush()


@pytest.fixture(autouse=True)
def _mailqueue_stack() -> None:
    """Replaces ``tests/peer/conftest.py``'s fixture of that name (Flask-Mail's per-test
    stack): Django's tests share :func:`peer_mailbox`'s queue and worker."""
