"""A stop the way it is deployed: prefork children leave stopping to the main process.

systemd's default ``KillMode=control-group``, supervisord's ``stopasgroup``
and ``kill -TERM -<pgid>`` send SIGTERM to every process of the worker, the
prefork children too. A child killed that way dies in the middle of its
batch (the relay's 250s it had not recorded yet are sent again later), and
an idle child can die holding a pool lock the main process then waits on
for ever during its warm shutdown (issue #21: an idle worker hung in 5 of
10 tries).

So a child blocks SIGTERM and a thread of its own waits for it
(``sigwaitinfo``), which says who sent it:

* its parent (billiard terminating the pool: a cold shutdown) — the child
  does what it always did: the SIGTERM handler runs (``SystemExit``), and
  if the child cannot run it within ``PARENT_TERM_GRACE_S`` it exits at once;
* anyone else (systemd, a supervisor, a shell) — ignored and logged: the
  main process got the same signal, stops taking tasks, lets each child
  finish its batch and record it (Celery's warm shutdown), then ends the
  children itself.

The solo and threads pools have no children; their one process handles the
signal as before.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import threading
import time

__all__ = ["shield_child_from_group_sigterm"]

log = logging.getLogger("mailqueue.worker")

PARENT_TERM_GRACE_S = 3.0


def shield_child_from_group_sigterm() -> bool:
    """In a prefork child (``worker_process_init``): only its parent's SIGTERM ends it.

    Must run in the child's main thread before it starts other threads, which
    inherit the blocked signal. Returns False where this cannot work
    (no ``sigwaitinfo``), leaving the default behaviour.
    """
    if not hasattr(signal, "sigwaitinfo") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return False
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(
        target=_wait_for_sigterm, args=(parent,), name="mailqueue-sigterm", daemon=True
    ).start()
    return True


def _wait_for_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            _end_as_asked()
            return
        log.info(
            "worker child %d: SIGTERM from pid %d ignored; the main process stops this "
            "child after its batch is recorded",
            os.getpid(),
            info.si_pid,
        )


def _end_as_asked() -> None:
    """The parent's SIGTERM: run the handler in the main thread, as if delivered there."""
    _thread.interrupt_main(signal.SIGTERM)
    time.sleep(PARENT_TERM_GRACE_S)
    # The main thread is blocked in a call that the simulated signal does not interrupt.
    os._exit(128 + signal.SIGTERM)
