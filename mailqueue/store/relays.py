"""Relay pauses: auth and TLS failures stop a relay, not every message's attempts."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from ..backoff import backoff_s
from .models import RELAYS, utcnow

__all__ = ["RelayState", "pause_relay", "resume_relay", "relay_states"]

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


# A relay's pause after its n-th auth/TLS failure in a row: 30 s, 60 s, 120 s …
# up to 30 min, with the jitter of every backoff so workers do not stampede.
PAUSE_BASE_S = 30.0
PAUSE_MAX_S = 1800.0


def pause_relay(engine: Engine, name: str, *, error: str, reply: str) -> dt.datetime:
    """Count one more failure for ``name`` and pause it; return until when."""
    now = utcnow()
    with engine.begin() as conn:
        failures = conn.execute(select(T.c.failures).where(T.c.name == name)).scalar()
        failures = (failures or 0) + 1
        until = now + dt.timedelta(
            seconds=backoff_s(failures, base_s=PAUSE_BASE_S, max_s=PAUSE_MAX_S)
        )
        values = dict(
            paused_until=until,
            failures=failures,
            last_error=error,
            last_reply=reply[:2000],
            updated_at=now,
        )
        if not conn.execute(update(T).where(T.c.name == name).values(**values)).rowcount:
            try:
                with conn.begin_nested():
                    conn.execute(insert(T).values(name=name, **values))
            except IntegrityError:  # another worker inserted it first
                conn.execute(update(T).where(T.c.name == name).values(**values))
    return until


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
