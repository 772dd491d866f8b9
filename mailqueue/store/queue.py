"""The statements that move a message through the queue, behind one ``Store``.

Every state change is one short transaction on a few indexed rows; each
responsibility is a module, its PostgreSQL and SQLite statements side by side:

* ``insert``   (``insert.py``) writes messages and recipients (optionally in
  the caller's transaction);
* ``claim``    (``claim.py``) atomically takes due messages for one worker with
  a lease (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite serializes
  writers), and ``renew``/``release`` that lease;
* ``record``   (``record.py``) writes each recipient's outcome and releases the
  lease; a recipient that is ``sent`` is never changed again;
* ``suppression`` (``suppression.py``) the suppression list, which ``claim``
  reads in its transaction;
* ``due``      (``schedule.py``) the one rule for what may be tried now, and
  ``take_due``, what the scheduler must hand to the broker.
"""

from __future__ import annotations

from sqlalchemy import Engine

from .claim import ClaimedMessage, ClaimedRecipient, ClaimStatements
from .insert import InsertStatements, NewMessage, NewRecipient
from .record import MessageOutcome, RecipientOutcome, RecordStatements, derive_status
from .schedule import ScheduleStatements
from .suppression import SuppressionStatements

__all__ = [
    "NewMessage",
    "NewRecipient",
    "ClaimedMessage",
    "ClaimedRecipient",
    "RecipientOutcome",
    "MessageOutcome",
    "Store",
    "derive_status",
]


class Store(
    InsertStatements,
    ClaimStatements,
    RecordStatements,
    ScheduleStatements,
    SuppressionStatements,
):
    """Queue statements bound to one engine."""

    def __init__(
        self,
        engine: Engine,
        *,
        unpinged: Engine | None = None,
        fold_local_case: bool | None = None,
    ) -> None:
        if fold_local_case is None:
            from ..config import get_settings

            fold_local_case = get_settings().suppression_local_case_insensitive
        self.fold_local_case = fold_local_case
        """Suppression keys lower-case the local part too (see ``suppression.address_key``)."""
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"
        self.unpinged = unpinged or engine
        """The pool ``enqueue()``'s one statement runs on (see ``_insert_one_pg``)."""
