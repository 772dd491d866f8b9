"""Hand committed ids to the broker from a background thread.

Celery's ``send_task`` costs about 0.6 ms (building the task message,
kombu's producer, a broker round trip): a third of a single ``enqueue()``
on PostgreSQL. Nothing the caller relies on needs it inside the call: the
rows are committed before their ids get here, and SQL is the promise. So
``enqueue`` returns after its commit, and this thread sends the ids,
putting everything that piled up meanwhile into as few tasks as the batch
size allows (many web requests enqueueing at once share tasks). Ids of
different priority lanes never share a task; a high lane's ids waiting
with others are sent first.

What can go wrong, and who covers it:

* the broker refuses: ``dispatch`` flags the rows ``dispatched_at = NULL``
  and the scheduler sends them at its next tick;
* the process exits normally: an ``atexit`` hook waits for the hand-off
  (``flush``), as it does when the settings change;
* the process is killed between commit and hand-off (a window of
  microseconds to milliseconds): the scheduler sends the ids once
  ``redispatch_after_s`` has passed, as for a task the broker lost.

``MAILQUEUE_DISPATCH=inline`` sends in the caller's thread instead.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence

from ..config import Settings
from ..priority import NORMAL

__all__ = ["Handoff"]

log = logging.getLogger("mailqueue.dispatch")

Sender = Callable[[Sequence[uuid.UUID], Settings, int], object]


class Handoff:
    """A queue of (settings, lane, ids) and the daemon thread that sends them, per process."""

    def __init__(self, send: Sender) -> None:
        self._send = send
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a child starts empty, threadless
        atexit.register(self.flush)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._pending: list[_Submission] = []
        self._busy = False
        self._thread: threading.Thread | None = None

    def submit(self, ids: Sequence[uuid.UUID], settings: Settings, priority: int = NORMAL) -> None:
        """Queue ``ids`` (already committed, all of lane ``priority``) for the broker;
        returns at once."""
        if not ids:
            return
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="mailqueue-dispatch", daemon=True
                )
                self._thread.start()
            self._pending.append((settings, priority, list(ids)))
            self._cond.notify()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every submitted id was handed over (or flagged); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                if self._thread is None or not self._thread.is_alive():
                    return not self._pending
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                batch, self._pending = self._pending, []
                self._busy = True
            try:
                for settings, priority, ids in _merged(batch):
                    self._send(ids, settings, priority)
            except Exception:  # noqa: BLE001 - never let the thread die; the scheduler covers
                log.exception("dispatch failed; the scheduler will send these ids")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


_Submission = tuple[Settings, int, list[uuid.UUID]]


def _merged(batch: list[_Submission]) -> list[_Submission]:
    """Submissions under the same settings and lane become one list (one task per
    ``batch_size`` ids instead of one per enqueue call), higher lanes first: a
    password reset that arrived while a newsletter's ids were being sent goes
    out before the ids that piled up behind them."""
    out: list[_Submission] = []
    for settings, priority, ids in batch:
        for i, (s, p, _) in enumerate(out):
            if s is settings and p == priority:
                out[i][2].extend(ids)
                break
        else:
            out.append((settings, priority, list(ids)))
    # stable: same-lane groups keep their order, settings groups keep theirs within a lane
    return sorted(out, key=lambda sub: sub[1])
