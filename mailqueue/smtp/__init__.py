"""Talking to relays: a bounded connection pool and one-envelope delivery."""

from .delivery import RecipientResult, TransactionResult, deliver
from .pool import Pool

__all__ = ["Pool", "RecipientResult", "TransactionResult", "deliver"]
