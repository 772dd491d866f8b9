"""The order in which a worker takes tasks from the lanes' queues, and the starvation guard.

kombu's default is fair, not prioritized: Redis rotates the queue it just
took from to the end of its BRPOP list (``round_robin_cycle``), the
SQLAlchemy transport walks its queues round robin (``FairCycle``), so a
high task behind a bulk backlog waited for one bulk task in every three
fetches, and a strict ``priority`` order (kombu's other option) lets steady
high traffic starve bulk forever. The rule here, for both transports:

* A consumer takes from the highest lane that has work: ``high``, then
  ``normal``, then ``bulk``;
* except that of every ``FAIR_EVERY`` tasks it takes, one is taken lower
  lanes first (``normal`` first once, ``bulk`` first once). So while a
  lower lane has work waiting it gets at least one task in ``FAIR_EVERY``
  of each consumer (no starvation), and ``high`` at least
  ``FAIR_EVERY - 2`` in ``FAIR_EVERY``.

Redis takes ``LaneCycle`` by name (the ``queue_order_strategy`` transport
option resolves a dotted path); the serverless SQLAlchemy broker's channel
uses ``LaneFairCycle`` (``sqla_transport.py``). Both rank a queue by its
name (``<queue>.high``, ``<queue>``, ``<queue>.bulk``), so any order of
``-Q`` works.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["FAIR_EVERY", "LANE_CYCLE_PATH", "LaneCycle", "LaneFairCycle", "lane_order"]

FAIR_EVERY = 10
"""Of every this many tasks a consumer takes, one goes normal-first and one bulk-first."""

LANE_CYCLE_PATH = "mailqueue.worker.lanes:LaneCycle"


def _rank(queue: str) -> int:
    if queue.endswith(".high"):
        return 0
    if queue.endswith(".bulk"):
        return 2
    return 1


def lane_order(queues: Sequence[str], taken: int) -> list[str]:
    """``queues`` in the order the ``taken``-th fetch tries them (see the module's rule)."""
    ordered = sorted(queues, key=_rank)
    turn = taken % FAIR_EVERY
    if turn == FAIR_EVERY - 1:  # bulk first, then normal, then high
        return ordered[::-1]
    if turn == FAIR_EVERY // 2 - 1:  # normal first, then bulk, then high
        return sorted(queues, key=lambda q: (_rank(q) == 0, _rank(q)))
    return ordered


class LaneCycle:
    """kombu's Redis queue cycle (``update``/``consume``/``rotate``) with the lane rule."""

    def __init__(self, it: list[str] | None = None) -> None:
        self.items: list[str] = it if it is not None else []
        self.taken = 0

    def update(self, it: Sequence[str]) -> None:
        self.items[:] = it

    def consume(self, n: int) -> list[str]:
        """The queues for the next BRPOP, in the order Redis tries them."""
        return lane_order(self.items[:n], self.taken)

    def rotate(self, last_used: str) -> str:
        """Called once per task received: counts toward the next fair turn."""
        self.taken += 1
        return last_used


class LaneFairCycle:
    """kombu's ``FairCycle`` (for virtual transports) with the lane rule."""

    def __init__(
        self, fun: Callable[..., Any], resources: list[str], predicate: type[Exception]
    ) -> None:
        self.fun = fun
        self.resources = resources
        self.predicate = predicate
        self.taken = 0

    def get(self, callback: Callable[..., Any], **kwargs: Any) -> Any:
        """Deliver one message from the first queue, in lane order, that has one."""
        if not self.resources:
            raise self.predicate()
        for queue in lane_order(self.resources, self.taken):
            try:
                result = self.fun(queue, callback, **kwargs)
            except self.predicate:
                continue
            self.taken += 1
            return result
        raise self.predicate()

    def close(self) -> None:
        """Nothing to close (kombu's interface)."""
