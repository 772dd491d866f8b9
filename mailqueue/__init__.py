"""mailqueue: a durable mail delivery queue.

Applications ``enqueue`` messages; the rows in SQL are the promise. Celery
workers claim them, deliver through a bounded pool of reused SMTP
connections, and record every recipient's outcome.
"""

from __future__ import annotations

from .api import (
    asend_now,
    cancel,
    enqueue,
    enqueue_many,
    get_attempts,
    get_status,
    get_status_by_key,
    list_messages,
    relays,
    resume_relay,
    retry,
    retry_failed,
    send_now,
    stats,
)
from .config import RelayConfig, Settings, configure, get_settings, on_configure
from .errors import (
    AuthError,
    ConnectError,
    DeliveryError,
    HeaderInjectionError,
    InvalidMessageError,
    MailQueueError,
    NotFoundError,
    RecipientError,
    SenderError,
    SMTPError,
    TLSError,
    UnknownAuthError,
)
from .message import Attachment, Message, extract_addresses

__version__ = "0.1.0"

__all__ = [
    "Attachment",
    "AuthError",
    "ConnectError",
    "DeliveryError",
    "HeaderInjectionError",
    "InvalidMessageError",
    "MailQueueError",
    "Message",
    "NotFoundError",
    "RecipientError",
    "RelayConfig",
    "SMTPError",
    "SenderError",
    "Settings",
    "TLSError",
    "UnknownAuthError",
    "cancel",
    "configure",
    "enqueue",
    "enqueue_many",
    "extract_addresses",
    "get_settings",
    "get_status",
    "get_attempts",
    "get_status_by_key",
    "list_messages",
    "retry",
    "retry_failed",
    "send_now",
    "relays",
    "resume_relay",
    "asend_now",
    "stats",
]


def _reset_caches() -> None:
    """Drop engines, the Celery app and the deliverer built from old settings."""
    from .store.db import dispose_engines
    from .worker import app as worker_app

    worker_app.reset()
    dispose_engines()


def _wire() -> None:
    """Hand the lower layers what they may not import: the one place that knows both."""
    from . import metrics
    from .store.ops import queue_depth
    from .store.queue import derive_status
    from .store.relays import relay_states
    from .store.suppression import count_by_reason

    on_configure(_reset_caches)
    metrics.read_store_with(
        metrics.StoreReads(
            derive_status=derive_status,
            queue_depth=queue_depth,
            relay_states=relay_states,
            suppressions=count_by_reason,
        )
    )


_wire()
