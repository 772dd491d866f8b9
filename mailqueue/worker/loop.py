"""The bridge from Celery's synchronous tasks to one asyncio loop per process.

Celery has no native async tasks, and an aiosmtplib connection belongs to the
event loop that opened it. ``asyncio.run()`` per task would close the loop
and with it every pooled connection. So each worker process keeps one event
loop running in a daemon thread for its whole life; tasks hand coroutines to
it with ``get_loop_thread().run()`` and block until they finish. This works the same under the
prefork pool (one loop per child, created lazily after the fork), the solo
pool, and the threads pool (several tasks share the loop and its pools, which
bound connections for the whole process).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread", "get_loop_thread"]

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed (measured in ops/bench), else asyncio's.

    ``MAILQUEUE_EVENT_LOOP=asyncio`` chooses asyncio's own loop anyway.
    """
    if os.environ.get("MAILQUEUE_EVENT_LOOP", "uvloop").lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class LoopThread:
    """An event loop running forever in a background thread of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._on_stop: list[Callable[[], Coroutine[Any, Any, Any]]] = []

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, started on first use (and again in a forked child)."""
        if self._loop is not None and self._pid == os.getpid():
            return self._loop
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                self._start()
            assert self._loop is not None
            return self._loop

    def _start(self) -> None:
        loop = new_event_loop()
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._on_stop = []  # anything registered in a parent belongs to the parent's loop
        self._thread = threading.Thread(target=main, name="mailqueue-loop", daemon=True)
        self._thread.start()
        ready.wait()
        self._loop = loop
        self._pid = os.getpid()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (from any other thread)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop())
        return future.result(timeout)

    def on_stop(self, closer: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Register a coroutine function to await when the loop stops (pool closing)."""
        self._on_stop.append(closer)

    def stop(self, timeout: float = 10.0) -> None:
        """Await the registered closers, then stop the loop and its thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None or self._pid != os.getpid():
                self._loop = self._thread = None
                return
            closers, self._on_stop = self._on_stop, []

            async def shutdown() -> None:
                for closer in closers:
                    with contextlib.suppress(Exception):  # closing must go on
                        await asyncio.wait_for(closer(), timeout)

            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout + 1)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            if not thread.is_alive():
                loop.close()
            self._loop = self._thread = None


_bridge = LoopThread()


def get_loop_thread() -> LoopThread:
    return _bridge
