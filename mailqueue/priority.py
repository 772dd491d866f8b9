"""Priority lanes: the words callers use, the numbers rows store, the queues tasks ride.

A password reset must not wait behind a newsletter. Each message carries a
lane: ``high``, ``normal`` (the default) or ``bulk``. The row stores it as a
small number (high 0, normal 1, bulk 2) so the scheduler can ``ORDER BY``
it; a dispatch batch holds one lane only and goes to that lane's broker
queue, ``<queue>.high``, ``<queue>`` (the name deployments already use) or
``<queue>.bulk``. Workers consume the three in priority order, with the
starvation guard of ``worker/lanes.py``.
"""

from __future__ import annotations

from .errors import InvalidMessageError

__all__ = [
    "BULK",
    "HIGH",
    "NORMAL",
    "PRIORITIES",
    "lane_queue",
    "lane_queues",
    "priority_value",
    "priority_word",
]

HIGH = 0
NORMAL = 1
BULK = 2

PRIORITIES: dict[str, int] = {"high": HIGH, "normal": NORMAL, "bulk": BULK}
"""Each word a caller may give, and the number its rows store (lower goes first)."""

_WORDS = {value: word for word, value in PRIORITIES.items()}
_SUFFIX = {HIGH: ".high", NORMAL: "", BULK: ".bulk"}


def priority_value(word: object, *, field: str = "priority") -> int:
    """The stored number for ``word``; ``InvalidMessageError`` listing the words if unknown.

    ``None`` is the default lane, ``normal``. Case and surrounding spaces are
    forgiven (a header value, a form field); anything else is refused whole.
    """
    if word is None:
        return NORMAL
    if isinstance(word, str):
        value = PRIORITIES.get(word.strip().lower())
        if value is not None:
            return value
        shown = repr(word[:40])
    else:
        shown = f"a {type(word).__name__}"
    raise InvalidMessageError(
        f"{shown} is not a priority: use one of {', '.join(PRIORITIES)}", field=field
    )


def priority_word(value: int) -> str:
    """The word for a stored number (an unknown number reads as ``normal``)."""
    return _WORDS.get(value, "normal")


def lane_queue(queue_name: str, priority: int) -> str:
    """The broker queue of one lane: ``<queue>.high``, ``<queue>``, ``<queue>.bulk``."""
    return queue_name + _SUFFIX.get(priority, "")


def lane_queues(queue_name: str) -> list[str]:
    """Every lane's broker queue, highest lane first (what a worker consumes)."""
    return [lane_queue(queue_name, p) for p in sorted(_WORDS)]
