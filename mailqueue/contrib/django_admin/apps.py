"""The app's configuration: label ``mailqueue`` and a check that its database exists."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.core import checks


class MailqueueAdminConfig(AppConfig):
    name = "mailqueue.contrib.django_admin"
    label = "mailqueue"
    verbose_name = "Mail queue"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        checks.register(check_database)


def check_database(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``MAILQUEUE_DJANGO_ADMIN_DATABASE`` must name an entry of ``DATABASES``."""
    from django.conf import settings

    from .models import database_alias

    alias = database_alias()
    if alias in settings.DATABASES:
        return []
    return [
        checks.Error(
            f"the mailqueue admin reads the Django database {alias!r}, which is not in DATABASES",
            hint="add an entry for mailqueue's database to DATABASES and name it in "
            "MAILQUEUE_DJANGO_ADMIN_DATABASE (or MAILQUEUE_DJANGO_DATABASE)",
            id="mailqueue.E001",
        )
    ]
