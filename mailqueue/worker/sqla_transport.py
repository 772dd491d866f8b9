"""kombu's SQLAlchemy transport, polling every 0.2 s, for mailqueue's Celery app only.

The serverless broker polls its table, by default once a second. The interval
cannot be passed as a transport option (kombu hands every transport option of
this transport to ``create_engine()``, which refuses unknown ones), and setting
it on kombu's class would change every SQLAlchemy broker connection in the
process, other apps' too. So mailqueue's app names this subclass as its
``broker_transport`` (see ``app.py``); kombu imports it only then.

Its channel also walks the lanes' queues in priority order (``lanes.py``)
instead of kombu's round robin. And it stops polling as soon as the worker is
asked to stop: Celery's polling loop (``synloop``) drains for up to 2 s, and
once more after it saw the stop, so a SIGTERMed worker on this broker spent
~4 s polling before its warm shutdown began (~6 s to exit, measured).
"""

from __future__ import annotations

from time import monotonic, sleep
from typing import Any

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

    def drain_events(self, connection: Any, timeout: Any = None, **kwargs: Any) -> Any:
        """kombu's ``drain_events(connection, timeout=None)``, which also returns (as a
        timeout) once the worker has been asked to stop, instead of polling on for the
        rest of ``timeout``."""
        from celery.worker import state  # imported by the worker that runs this

        time_start = monotonic()
        assert self.cycle is not None  # set up with the connection's first channel
        get = self.cycle.get
        interval = self.polling_interval
        if timeout and interval > timeout:
            interval = timeout
        while True:
            if state.should_stop is not None or state.should_terminate is not None:
                raise TimeoutError()
            try:
                get(self._deliver, timeout=timeout)
            except Empty:
                if timeout is not None and monotonic() - time_start >= timeout:
                    raise TimeoutError() from None
                sleep(interval)
            else:
                return
