"""SQL is the queue's source of truth: tables, engines and the statements on them."""

from .db import dispose_engines, get_engine, normalize_url
from .models import MessageStatus, RecipientStatus
from .queue import Store

__all__ = [
    "MessageStatus",
    "RecipientStatus",
    "Store",
    "dispose_engines",
    "get_engine",
    "normalize_url",
]
