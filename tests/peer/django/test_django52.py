"""Django 5.2's ``BaseEmailBackendTests`` against mailqueue's backend (see ``conftest.py``).

Runs in the default venv (Django 5.2); ``test_django61.py`` runs 6.1's
``SharedEmailBackendTests`` in ``.venv-django61``.
"""

from __future__ import annotations

import django
import pytest

if django.VERSION[:2] != (5, 2):
    pytest.skip("Django 5.2's own tests: run with Django 5.2 (.venv)", allow_module_level=True)

from django.conf import global_settings
from django.test import SimpleTestCase, override_settings

from .django52_mail_tests import BaseEmailBackendTests


@override_settings(
    DEFAULT_FROM_EMAIL=global_settings.DEFAULT_FROM_EMAIL,
    SERVER_EMAIL=global_settings.SERVER_EMAIL,
)
class MailqueueBackendTests(BaseEmailBackendTests, SimpleTestCase):
    """As Django's ``SMTPBackendTests``, with a queue and a worker between backend and server."""

    email_backend = "mailqueue.contrib.django.EmailBackend"

    def get_mailbox_content(self):
        # As Django 5.2's SMTPHandler reads what aiosmtpd received: data.rstrip().
        return self.mailbox.content(lambda data: data.rstrip())

    def flush_mailbox(self):
        self.mailbox.flush()
