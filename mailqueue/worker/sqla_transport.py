"""kombu's SQLAlchemy transport, polling every 0.2 s, for mailqueue's Celery app only.

The serverless broker polls its table, by default once a second. The interval
cannot be passed as a transport option (kombu hands every transport option of
this transport to ``create_engine()``, which refuses unknown ones), and setting
it on kombu's class would change every SQLAlchemy broker connection in the
process, other apps' too. So mailqueue's app names this subclass as its
``broker_transport`` (see ``app.py``); kombu imports it only then.
"""

from __future__ import annotations

from kombu.transport.sqlalchemy import Transport as _KombuSqlaTransport

__all__ = ["POLLING_INTERVAL_S", "SqlaTransport"]

POLLING_INTERVAL_S = 0.2


class SqlaTransport(_KombuSqlaTransport):
    """The same transport, the same tables; only the polling interval differs."""

    polling_interval = POLLING_INTERVAL_S
