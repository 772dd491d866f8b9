"""A read-only Django admin for mailqueue's tables.

Enable it with ``"mailqueue.contrib.django_admin"`` in ``INSTALLED_APPS``
(next to ``django.contrib.admin``); its app label is ``mailqueue``.

What it shows: the messages list (status, relay, tag and date filters; search
by a recipient's exact address or a message id), each message's page with
every recipient's latest outcome and every attempt, and the relays paused
after auth or TLS failures. What it changes: nothing directly. The two
actions, *Retry failed recipients* and *Cancel*, go through
``mailqueue.api`` exactly as ``mailqueue retry``/``cancel`` do; rows are never
added, edited or deleted here.

Where it reads: the Django database alias named by
``MAILQUEUE_DJANGO_ADMIN_DATABASE`` (default: ``MAILQUEUE_DJANGO_DATABASE``,
else ``"default"``). Put mailqueue's tables in Django's own database, or add
a ``DATABASES`` entry for mailqueue's database and name it there; the actions
write through ``MAILQUEUE_DATABASE_URL``, which must be the same database.

Built for big tables: nothing counts the whole table (the paginator counts
at most ``COUNT_CAP`` rows), no ``date_hierarchy`` and no filter facets,
newest-first order on ``(created_at, id)``, filter choices that come from
``mailqueue.statuses`` and the configured relays, and every filter and the
search read one of the indexes of migrations 0001 and 0003.
"""

from __future__ import annotations

__all__: list[str] = []
