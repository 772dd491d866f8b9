"""Relay pauses: auth and TLS failures stop a relay, not every message's attempts.

The backoff grows once per failure *event*, not once per message that sees it
(``pause_relay``); a session the relay accepts again ends the series
(``resume_relay``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Engine, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from ..backoff import backoff_s
from .models import RELAYS, utcnow

__all__ = ["Pause", "RelayState", "pause_relay", "resume_relay", "relay_states"]

T = RELAYS


@dataclass(frozen=True)
class RelayState:
    name: str
    paused_until: dt.datetime | None
    failures: int
    last_error: str | None
    last_reply: str | None
    updated_at: dt.datetime

    @property
    def paused(self) -> bool:
        return self.paused_until is not None and self.paused_until > utcnow()

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "paused": self.paused,
            "paused_until": self.paused_until.isoformat() if self.paused_until else None,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_reply": self.last_reply,
        }


# A relay's pause after its n-th auth/TLS failure event in a row: 30 s, 60 s, 120 s …
# up to 30 min, with the jitter of every backoff so workers do not stampede.
PAUSE_BASE_S = 30.0
PAUSE_MAX_S = 1800.0


@dataclass(frozen=True)
class Pause:
    """What ``pause_relay`` found or did: the relay is paused until ``until``."""

    until: dt.datetime
    failures: int
    """Failure events in a row (what the backoff doubled on)."""
    started: bool
    """True when this call began the pause; False when it was already paused."""


def pause_relay(engine: Engine, name: str, *, error: str, reply: str) -> Pause:
    """Pause ``name`` after an auth/TLS failure, once per event; return the pause.

    A failure event is the first failure seen while the relay is not paused
    (first ever, or after the last pause ran out). The messages in flight
    that hit the same problem while it is paused do not count again: with
    100 messages failing on one bad certificate, ``failures`` is 1 and the
    pause is one base length. The pause only starts with a compare-and-set
    (``UPDATE … WHERE failures = <read> AND not paused``), so of many workers
    failing at once exactly one extends it and the others read its length;
    the last writer does not decide. Works the same on SQLite and PostgreSQL
    (under READ COMMITTED the WHERE is checked again on the locked row).
    """
    reply = reply[:2000]
    for _ in range(_PAUSE_TRIES):
        now = utcnow()
        with engine.begin() as conn:
            row = conn.execute(
                select(T.c.failures, T.c.paused_until).where(T.c.name == name)
            ).first()
            if row is not None and row.paused_until is not None and row.paused_until > now:
                return Pause(row.paused_until, row.failures, started=False)
            failures = (row.failures if row is not None else 0) + 1
            until = now + dt.timedelta(
                seconds=backoff_s(failures, base_s=PAUSE_BASE_S, max_s=PAUSE_MAX_S)
            )
            values = dict(
                paused_until=until,
                failures=failures,
                last_error=error,
                last_reply=reply,
                updated_at=now,
            )
            if row is None:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(T).values(name=name, **values))
                except IntegrityError:  # another worker inserted it first: read its pause
                    continue
                return Pause(until, failures, started=True)
            not_paused = or_(T.c.paused_until.is_(None), T.c.paused_until <= now)
            swapped = conn.execute(
                update(T)
                .where(T.c.name == name, T.c.failures == row.failures, not_paused)
                .values(**values)
            ).rowcount
            if swapped:
                return Pause(until, failures, started=True)
        # Another worker started (or an operator resumed) it meanwhile: read again.
    raise RuntimeError(f"relay {name!r}: could not record its pause after {_PAUSE_TRIES} tries")


_PAUSE_TRIES = 20


def resume_relay(engine: Engine, name: str) -> bool:
    """The relay accepted a session again (or an operator fixed it): forget its failures."""
    with engine.begin() as conn:
        return bool(
            conn.execute(
                update(T)
                .where(T.c.name == name, T.c.failures > 0)
                .values(paused_until=None, failures=0, updated_at=utcnow())
            ).rowcount
        )


def relay_states(engine: Engine) -> list[RelayState]:
    with engine.connect() as conn:
        rows = conn.execute(select(T).order_by(T.c.name)).all()
    return [
        RelayState(r.name, r.paused_until, r.failures, r.last_error, r.last_reply, r.updated_at)
        for r in rows
    ]
