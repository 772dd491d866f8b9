"""The one backoff rule: how long to wait after the n-th failure in a row.

Doubling from a base, capped, with ±20 % jitter so that workers that failed
together do not all come back together. It schedules the long waits that
live in rows: a deferred recipient's ``next_attempt_at``
(``MAILQUEUE_RETRY_BASE_S`` / ``MAILQUEUE_RETRY_MAX_S``, worker/service.py)
and a paused relay's ``paused_until`` (store/relays.py). Short retries inside
one attempt (seconds) are tenacity's.

A leaf module (standard library only), so that every layer may use it.
"""

from __future__ import annotations

import random

__all__ = ["JITTER", "backoff_s"]

JITTER = 0.2
"""The wait is the capped delay times a uniform factor in [1 - JITTER, 1 + JITTER]."""

# 2.0 ** 1000 is still a float; far beyond any cap, and no OverflowError
# however many times a message has been tried.
_MAX_EXPONENT = 1000


def backoff_s(
    failures: int, *, base_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait after the ``failures``-th failure in a row.

    ``base_s`` after the first (and for 0 or less), doubling after each
    further one, at most ``max_s``; then ±20 % jitter, so the result lies in
    ``[0.8 · min(max_s, base_s · 2^(failures-1)), 1.2 · …]``.
    """
    exponent = min(max(0, failures - 1), _MAX_EXPONENT)
    delay = min(max_s, base_s * 2.0**exponent)
    return delay * (rng or random).uniform(1 - JITTER, 1 + JITTER)
