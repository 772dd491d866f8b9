"""kombu's SQLAlchemy transport, polling every 0.2 s, for mailqueue's Celery app only.

The serverless broker polls its table, by default once a second. The interval
cannot be passed as a transport option (kombu hands every transport option of
this transport to ``create_engine()``, which refuses unknown ones), and setting
it on kombu's class would change every SQLAlchemy broker connection in the
process, other apps' too. So mailqueue's app names this subclass as its
``broker_transport`` (see ``app.py``); kombu imports it only then.

Its channel also walks the lanes' queues in priority order (``lanes.py``)
instead of kombu's round robin.
"""

from __future__ import annotations

from kombu.transport.sqlalchemy import Channel as _KombuSqlaChannel
from kombu.transport.sqlalchemy import Transport as _KombuSqlaTransport
from kombu.transport.virtual import Empty

from .lanes import LaneFairCycle

__all__ = ["POLLING_INTERVAL_S", "SqlaTransport"]

POLLING_INTERVAL_S = 0.2


class SqlaChannel(_KombuSqlaChannel):
    """kombu's channel, taking from the lanes' queues highest lane first (``lanes.py``)."""

    def _reset_cycle(self) -> None:
        self._cycle = LaneFairCycle(self._get_and_deliver, self._active_queues, Empty)


class SqlaTransport(_KombuSqlaTransport):
    """The same transport, the same tables; the polling interval and the queue order differ."""

    Channel = SqlaChannel
    polling_interval = POLLING_INTERVAL_S
