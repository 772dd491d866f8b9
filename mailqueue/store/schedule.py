"""What is due, and the scheduler's side of it: ``take_due`` hands ids to the broker.

``due`` is the one rule for "this message may be tried now"; ``claim`` takes
messages by it, the scheduler dispatches them by it.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, and_, or_, select, update

from .models import MESSAGES, MessageStatus, utcnow

__all__ = ["ScheduleStatements", "due"]

M = MESSAGES

WAITING = (MessageStatus.QUEUED, MessageStatus.DEFERRED)
"""Messages that wait for their ``next_attempt_at``."""


def due(now: dt.datetime) -> Any:
    """Messages that may be tried at ``now``: waiting ones whose time has come, and
    ones whose worker's lease ran out."""
    return or_(
        and_(M.c.status.in_(WAITING), M.c.next_attempt_at <= now),
        and_(M.c.status == MessageStatus.SENDING, M.c.lease_until < now),
    )


class ScheduleStatements:
    """``Store.take_due`` and ``Store.mark_undispatched`` (see ``queue.Store``)."""

    engine: Engine
    is_postgres: bool

    def take_due(self, *, limit: int, redispatch_after_s: float) -> list[tuple[uuid.UUID, int]]:
        """(id, priority) of the messages the broker must carry now, higher lanes first;
        marks them dispatched.

        Due messages whose id was never handed over (or so long ago that the
        task must have been lost), and messages whose worker's lease ran out.
        Within ``limit``, a high message due now is taken before a bulk backlog.
        """
        now = utcnow()
        stale = now - dt.timedelta(seconds=redispatch_after_s)
        not_in_flight = or_(M.c.dispatched_at.is_(None), M.c.dispatched_at < stale)
        pick = (
            select(M.c.id, M.c.priority)
            .where(due(now), not_in_flight)
            .order_by(M.c.priority, M.c.next_attempt_at)
            .limit(limit)
        )
        if self.is_postgres:
            pick = pick.with_for_update(skip_locked=True)
        with self.engine.begin() as conn:
            rows = [(row.id, row.priority) for row in conn.execute(pick)]
            if rows:
                conn.execute(
                    update(M).where(M.c.id.in_([i for i, _ in rows])).values(dispatched_at=now)
                )
        return rows

    def mark_undispatched(self, ids: Sequence[uuid.UUID]) -> None:
        """The broker did not take these ids: let the scheduler send them soon."""
        with self.engine.begin() as conn:
            conn.execute(
                update(M).where(M.c.id.in_(ids), M.c.status.in_(WAITING)).values(dispatched_at=None)
            )
