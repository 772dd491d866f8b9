"""Django 6.1's ``SharedEmailBackendTests`` against mailqueue's backend (see ``conftest.py``).

Runs in ``.venv-django61`` (Python 3.12, Django 6.1: ``make test-django61``);
``test_django52.py`` runs 5.2's ``BaseEmailBackendTests`` in the default venv.
"""

from __future__ import annotations

import django
import pytest

if django.VERSION[:2] != (6, 1):
    pytest.skip(
        "Django 6.1's own tests: run with Django 6.1 (.venv-django61)", allow_module_level=True
    )

from django.conf import global_settings
from django.test import SimpleTestCase, override_settings

from mailqueue.contrib.django import EmailBackend

from .django61_mail_tests import SharedEmailBackendTests


@override_settings(
    DEFAULT_FROM_EMAIL=global_settings.DEFAULT_FROM_EMAIL,
    SERVER_EMAIL=global_settings.SERVER_EMAIL,
)
class MailqueueBackendTests(SharedEmailBackendTests, SimpleTestCase):
    """As Django's ``SMTPBackendTests``, with a queue and a worker between backend and server."""

    backend_class = EmailBackend

    def get_mailbox_content(self):
        # As Django 6.1's SMTPHandler reads what aiosmtpd received: CRLF as LF.
        return self.mailbox.content(lambda data: data.replace(b"\r\n", b"\n"))

    def flush_mailbox(self):
        self.mailbox.flush()

    def test_fail_silently_arg_accepted(self):
        # The override Django's SharedEmailBackendTests asks of a backend that keeps
        # fail_silently (as its SMTPBackendTests does, verbatim): mailqueue's backend
        # takes it, in MAILERS OPTIONS too.
        for value in [True, False]:
            with self.subTest(fail_silently=value):
                backend = self.create_backend(fail_silently=value)
                self.assertIs(backend.fail_silently, value)
