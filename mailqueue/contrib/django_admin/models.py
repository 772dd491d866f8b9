"""mailqueue's tables as unmanaged Django models: Django reads them, never creates or alters them.

The tables belong to mailqueue's Alembic migrations (``mailqueue migrate``);
``managed = False`` keeps Django's ``migrate`` away from them. Column types
match what SQLAlchemy writes on SQLite and PostgreSQL: UUIDs as 32 hex
characters on SQLite and ``uuid`` on PostgreSQL, naive UTC text on SQLite.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models

from ...statuses import MessageStatus, RecipientStatus, SuppressionReason

__all__ = [
    "Attempt",
    "Message",
    "Recipient",
    "Relay",
    "Suppression",
    "TagOf",
    "database_alias",
]


def database_alias() -> str:
    """The Django database that holds mailqueue's tables (read on every request)."""
    alias = getattr(settings, "MAILQUEUE_DJANGO_ADMIN_DATABASE", None) or getattr(
        settings, "MAILQUEUE_DJANGO_DATABASE", None
    )
    return str(alias or "default")


class TagOf(models.Func):
    """``meta['tag']`` spelled exactly as migration 0003's expression index is built.

    PostgreSQL ``(meta ->> 'tag')``, SQLite ``json_extract(meta, '$.tag')``:
    an index on an expression serves only a query with the same expression
    (a bound parameter in place of the key would not do on SQLite).
    """

    arity = 1
    output_field = models.CharField()

    def as_sql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        if connection.vendor == "postgresql":
            template = "(%(expressions)s ->> 'tag')"
        elif connection.vendor == "sqlite":
            template = "json_extract(%(expressions)s, '$.tag')"
        else:  # not a database mailqueue supports; correct, without an index
            raise NotImplementedError(f"mailqueue's tables are not on {connection.vendor}")
        return super().as_sql(compiler, connection, template=template, **extra)


class _JSONColumn(models.JSONField):  # type: ignore[type-arg]
    """``meta`` is ``json`` (not ``jsonb``) on PostgreSQL: psycopg hands it over decoded."""

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        if value is None or isinstance(value, str | bytes | bytearray):
            return super().from_db_value(value, expression, connection)
        return value


class Message(models.Model):
    """One message (``mq_message``): envelope, scheduling state and last error."""

    id = models.UUIDField(primary_key=True)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    status = models.CharField(max_length=16, choices=[(s, s) for s in MessageStatus.ALL])
    relay = models.CharField(max_length=64)
    mail_from = models.CharField("from", max_length=320)
    subject = models.TextField()
    size = models.IntegerField()
    content = models.BinaryField()
    smtputf8 = models.BooleanField("SMTPUTF8")
    eightbit = models.BooleanField("8BITMIME")
    attempts = models.IntegerField()
    next_attempt_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    dispatched_at = models.DateTimeField(null=True)
    lease_owner = models.CharField(max_length=64, null=True)
    lease_until = models.DateTimeField(null=True)
    idempotency_key = models.CharField(max_length=255, null=True)
    meta = _JSONColumn("metadata", null=True)
    last_error = models.CharField(max_length=64, null=True)
    last_reply = models.TextField(null=True)
    worker = models.CharField(max_length=64, null=True)
    list_id = models.CharField("list id", max_length=255, null=True)

    class Meta:
        managed = False
        db_table = "mq_message"
        default_permissions = ("view",)
        permissions = [("steer_message", "Can retry and cancel messages")]

    def __str__(self) -> str:
        return f"{self.subject or '(no subject)'} [{self.id}]"


class Recipient(models.Model):
    """One recipient of one message (``mq_recipient``) and its latest outcome."""

    id = models.BigAutoField(primary_key=True)
    message = models.ForeignKey(
        Message,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="recipients",
    )
    address = models.CharField(max_length=320)
    kind = models.CharField(max_length=8)
    status = models.CharField(max_length=16, choices=[(s, s) for s in RecipientStatus.ALL])
    attempts = models.IntegerField()
    smtp_code = models.SmallIntegerField(null=True)
    enhanced_code = models.CharField(max_length=16, null=True)
    reply = models.TextField(null=True)
    error = models.CharField(max_length=64, null=True)
    updated_at = models.DateTimeField()
    sent_at = models.DateTimeField(null=True)

    class Meta:
        managed = False
        db_table = "mq_recipient"
        default_permissions = ()

    def __str__(self) -> str:
        return self.address


class Attempt(models.Model):
    """One recipient's result in one attempt (``mq_attempt``)."""

    id = models.BigAutoField(primary_key=True)
    message = models.ForeignKey(
        Message, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+"
    )
    recipient = models.ForeignKey(
        Recipient, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+"
    )
    status = models.CharField(max_length=16)
    smtp_code = models.SmallIntegerField(null=True)
    enhanced_code = models.CharField(max_length=16, null=True)
    reply = models.TextField(null=True)
    error = models.CharField(max_length=64, null=True)
    worker = models.CharField(max_length=200, null=True)
    at = models.DateTimeField()

    class Meta:
        managed = False
        db_table = "mq_attempt"
        default_permissions = ()


class Relay(models.Model):
    """A relay's pause after auth or TLS failures (``mq_relay``)."""

    name = models.CharField(max_length=100, primary_key=True)
    paused_until = models.DateTimeField(null=True)
    failures = models.IntegerField()
    last_error = models.CharField(max_length=64, null=True)
    last_reply = models.TextField(null=True)
    updated_at = models.DateTimeField()

    class Meta:
        managed = False
        db_table = "mq_relay"
        default_permissions = ("view",)
        verbose_name = "relay pause"

    def __str__(self) -> str:
        return self.name


class Suppression(models.Model):
    """An address on the suppression list (``mq_suppression``); edited through
    ``mailqueue suppress``, the JSON API or the status page, so the keys stay right."""

    id = models.BigAutoField(primary_key=True)
    address = models.CharField(max_length=320)
    address_key = models.CharField("compared as", max_length=320)
    reason = models.CharField(max_length=16, choices=[(r, r) for r in SuppressionReason.ALL])
    scope = models.CharField(max_length=262, blank=True)
    created_at = models.DateTimeField()
    note = models.TextField(null=True)

    class Meta:
        managed = False
        db_table = "mq_suppression"
        default_permissions = ("view",)
        verbose_name = "suppressed address"

    def __str__(self) -> str:
        return f"{self.address} ({self.scope or 'everywhere'})"
