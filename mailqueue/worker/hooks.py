"""``MAILQUEUE_ON_TERMINAL``: tell the app when a message reaches a terminal status.

The worker calls the configured ``module:callable`` (or ``module.callable``)
with the message's ``MessageInfo`` right after it recorded an attempt that
left the message ``sent``, ``partial`` or ``failed``; the rows are already
committed, so the callback sees the same truth ``get_status`` returns. It
runs in a thread of the worker process (blocking code is fine); an exception
is logged and never undoes or retries the delivery. It is best effort: a
worker killed between the commit and the call skips it (poll ``get_status``
for certainty), and nothing calls it for ``cancel()`` (the caller knows).

A report that comes back later (``inbound``: a bounce or a complaint that
turned a recipient ``bounced`` or ``complained``) calls it again with the
message's new ``MessageInfo``: the message was terminal already, and what is
new is in its recipients.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from functools import cache
from typing import Any

from ..store import admin
from ..store.models import TERMINAL_MESSAGE
from ..store.queue import Store

__all__ = ["notify_changed", "notify_if_terminal", "resolve_callable"]

log = logging.getLogger("mailqueue.worker")


@cache
def resolve_callable(path: str, setting: str = "MAILQUEUE_ON_TERMINAL") -> Callable[[Any], Any]:
    """Import ``module:attr`` (or ``module.attr``), the value of ``setting``."""
    import importlib

    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{setting}={path!r}: expected 'module:callable'")
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{setting}={path!r} is not callable")
    return target


def _notify(path: str, store: Store, message_id: uuid.UUID) -> None:
    info = admin.get_status(store.engine, message_id)
    if info.status in TERMINAL_MESSAGE:
        resolve_callable(path)(info)


async def notify_if_terminal(path: str, store: Store, message_id: uuid.UUID) -> None:
    try:
        await asyncio.to_thread(_notify, path, store, message_id)
    except Exception:  # noqa: BLE001 - the delivery is recorded; the callback is advisory
        log.exception("MAILQUEUE_ON_TERMINAL callback %s failed for %s", path, message_id)


def notify_changed(path: str, store: Store, message_id: uuid.UUID) -> None:
    """Call the hook for a message a report changed (from a thread; never raises)."""
    try:
        _notify(path, store, message_id)
    except Exception:  # noqa: BLE001 - the report is recorded; the callback is advisory
        log.exception("MAILQUEUE_ON_TERMINAL callback %s failed for %s", path, message_id)
