"""A bounded pool of reused SMTP connections to one relay, for one event loop.

Modelled on httpcore's pool: the pool's state is plain data (a list of
connections, a queue of waiters) changed only by code that never awaits, so
on one event loop no lock is needed; connect and close happen outside those
steps. A connection is handed out and marked busy in the same step, so the
open count never exceeds ``max_size`` even while connections are being made.

Connections are known to the pool only through small predicates
(``is_idle``, ``has_expired``, ``is_usable``). Expiry is checked whenever a
connection is handed out or returned; an idle connection is also closed by a
timer when its idle deadline passes, so the relay does not hold sockets for a
worker that has gone quiet.

A connection that timed out, dropped, or heard 421 is *poisoned*: it is
closed and never handed out again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiosmtplib

from .. import metrics as _metrics
from ..config import RelayConfig, Settings
from .cluster_limits import ClusterLimits, Lease
from .session import TokenCache, close_session, open_session

__all__ = ["Connection", "Pool", "PoolStats", "pool_for_relay"]

_GAUGES_EVERY_S = 0.05

log = logging.getLogger("mailqueue.pool")


class Connection:
    """One SMTP session and the bookkeeping the pool needs about it."""

    def __init__(self, smtp: aiosmtplib.SMTP, *, number: int) -> None:
        self.smtp = smtp
        self.protocol = smtp.protocol  # kept: aiosmtplib forgets it when a send path closes
        self.number = number
        self.opened_at = time.monotonic()
        self.last_used_at = self.opened_at
        self.messages = 0
        self.busy = False
        self.poisoned = False
        self.lease: Lease | None = None  # its cluster-wide slot, if the relay has a limit

    def is_idle(self) -> bool:
        """Open and not handed out."""
        return not self.busy and self.is_usable()

    def is_usable(self) -> bool:
        """Still connected, not poisoned by a failure, and its cluster slot still held."""
        lost_slot = self.lease is not None and self.lease.lost
        return not self.poisoned and not lost_slot and self.smtp.is_connected

    def has_expired(self, now: float, relay: RelayConfig) -> bool:
        """Carried its share of messages, lived too long, or sat idle too long."""
        return (
            self.messages >= relay.max_messages_per_connection
            or now - self.opened_at >= relay.max_connection_age_s
            or (not self.busy and now - self.last_used_at >= relay.idle_timeout_s)
        )

    def needs_check(self, now: float, relay: RelayConfig) -> bool:
        """Idle long enough that the server may have dropped it quietly."""
        return now - self.last_used_at >= relay.check_after_idle_s

    def poison(self) -> None:
        """Never hand this connection out again."""
        self.poisoned = True


@dataclass
class PoolStats:
    """Counters that tests, metrics and the demo read."""

    opened: int = 0
    closed: int = 0
    messages: int = 0
    waits: int = 0
    peak_open: int = 0
    open_now: int = field(default=0)


Connector = Callable[[RelayConfig], Awaitable[aiosmtplib.SMTP]]


class Pool:
    """At most ``relay.pool_size`` connections to one relay, reused across messages.

    Use ``async with pool.connection() as conn:``. Leaving the block returns
    the connection; call ``conn.poison()`` first when it must not be reused.
    """

    def __init__(
        self,
        relay: RelayConfig,
        *,
        connector: Connector | None = None,
        limits: ClusterLimits | None = None,
    ) -> None:
        if relay.pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self.relay = relay
        self.limits = limits  # cluster-wide connection slots and rate (Redis)
        self._yielding: asyncio.Task[None] | None = None
        self.tokens = TokenCache()  # OAuth2 tokens outlive any one connection
        self._connector = connector or (lambda r: open_session(r, self.tokens))
        self._connections: list[Connection] = []
        self._reserved = 0  # slots taken by connections being opened
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._numbers = 0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.stats = PoolStats()
        self._gauges_at = 0.0  # when the pool gauges were last written
        self._gauges_timer: asyncio.TimerHandle | None = None

    # -- state, changed only by the non-awaiting methods below ----------------

    @property
    def open_count(self) -> int:
        return len(self._connections) + self._reserved

    @property
    def idle_count(self) -> int:
        return sum(1 for c in self._connections if c.is_idle())

    @property
    def busy_count(self) -> int:
        return sum(1 for c in self._connections if c.busy) + self._reserved

    def _take(self) -> tuple[Connection | None, bool, list[Connection]]:
        """Hand out an idle connection or reserve a slot for a new one.

        Returns ``(connection, reserved, to_close)``; both empty means wait.
        """
        now = time.monotonic()
        to_close = self._drop_unusable(now)
        for conn in self._connections:
            if conn.is_idle():
                conn.busy = True
                return conn, False, to_close
        if self.open_count < self.relay.pool_size:
            self._reserved += 1
            self._note_open()
            return None, True, to_close
        return None, False, to_close

    def _drop_unusable(self, now: float) -> list[Connection]:
        """Remove expired, poisoned and disconnected idle connections."""
        keep, drop = [], []
        for conn in self._connections:
            if not conn.busy and (not conn.is_usable() or conn.has_expired(now, self.relay)):
                drop.append(conn)
            else:
                keep.append(conn)
        if drop:
            self._connections = keep
            self._wake_one()
        return drop

    def _changed(self, *, now: bool = False) -> None:
        """Refresh the pool gauges: at most every 50 ms, and a timer writes the state the
        pool settles in. (On every hand-out and return they were ~7 % of a busy
        worker's CPU: two walks over the connections and three locked gauge writes.)"""
        clock = time.monotonic()
        if now or clock - self._gauges_at >= _GAUGES_EVERY_S:
            self._gauges_at = clock
            _metrics.pool_changed(self)
        elif self._gauges_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                _metrics.pool_changed(self)
                return
            self._gauges_timer = loop.call_later(_GAUGES_EVERY_S, self._gauges_due)

    def _gauges_due(self) -> None:
        self._gauges_timer = None
        self._changed(now=True)

    def _note_open(self) -> None:
        self.stats.open_now = self.open_count
        self.stats.peak_open = max(self.stats.peak_open, self.stats.open_now)
        self._changed()

    def _give_back(self, conn: Connection) -> list[Connection]:
        conn.busy = False
        conn.last_used_at = time.monotonic()
        to_close = self._drop_unusable(conn.last_used_at)
        if conn in self._connections:
            if not self._wake_one() and self.limits is not None:
                self._yield_slots_if_wanted()
            self._arm_idle_timer()
        self._changed()
        return to_close

    def _wake_one(self) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return True
        return False

    def _yield_slots_if_wanted(self) -> None:
        """A connection fell idle: if other processes wait for a cluster slot, close idle ones."""
        if self._yielding is None or self._yielding.done():
            self._yielding = asyncio.ensure_future(self._yield_slots())

    async def _yield_slots(self) -> None:
        assert self.limits is not None
        if not await self.limits.others_waiting():
            return
        for conn in [c for c in self._connections if c.is_idle()]:
            if conn.is_idle():  # not borrowed while an earlier one was closing
                await self._close(conn)

    def _arm_idle_timer(self) -> None:
        if self._idle_timer is None:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(self.relay.idle_timeout_s, self._on_idle_timer)

    def _on_idle_timer(self) -> None:
        self._idle_timer = None
        to_close = self._drop_unusable(time.monotonic())
        for conn in to_close:
            asyncio.ensure_future(self._close(conn))
        if any(c.is_idle() for c in self._connections):
            self._arm_idle_timer()

    # -- I/O -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """Borrow a connection: reused when one is idle, else opened within the bound."""
        conn = await self._acquire()
        try:
            yield conn
        except BaseException:
            conn.poison()  # an exception mid-transaction leaves the session in doubt
            raise
        finally:
            conn.messages += 1
            for dead in self._give_back(conn):
                await self._close(dead)

    async def _acquire(self) -> Connection:
        if self._closed:
            raise RuntimeError("pool is closed")
        while True:
            conn, reserved, to_close = self._take()
            for dead in to_close:
                await self._close(dead)
            if conn is not None:
                if conn.needs_check(time.monotonic(), self.relay) and not await self._alive(conn):
                    self._connections.remove(conn)
                    await self._close(conn)
                    self._wake_one()
                    continue
                self.stats.messages += 1
                self._changed()
                return conn
            if reserved:
                ours = len(self._connections) + self._reserved - 1  # open or opening
                if self.limits is None or not self.limits.max_connections or not ours:
                    return await self._open()
                # Connected already, under a cluster-wide limit: a further connection
                # only if a slot is free now, else wait for one of ours. (Queueing for
                # a slot left messages stuck there while our connections fell idle,
                # and made every holder hand its slots around at each batch's end.)
                try:
                    lease = await self.limits.try_acquire()
                except BaseException:
                    self._unreserve()
                    raise
                if lease is not None:
                    return await self._open(lease)
                self._unreserve()
                if any(c.is_idle() for c in self._connections):
                    continue  # one came back while we asked Redis
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            self.stats.waits += 1
            _metrics.pool_waited(self)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass on the wake-up we were given
                raise

    def _unreserve(self) -> None:
        """Give back a slot ``_take`` reserved for a connection that will not be opened."""
        self._reserved -= 1
        self.stats.open_now = self.open_count
        self._changed()

    async def _open(self, lease: Lease | None = None) -> Connection:
        try:
            if self.limits is not None and lease is None:
                lease = await self.limits.acquire()
            smtp = await self._connector(self.relay)
        except BaseException:
            if lease is not None:
                assert self.limits is not None
                await asyncio.shield(self.limits.release(lease))
            self._unreserve()
            self._wake_one()
            raise
        self._reserved -= 1
        self._numbers += 1
        conn = Connection(smtp, number=self._numbers)
        conn.lease = lease
        conn.busy = True
        self._connections.append(conn)
        self.stats.opened += 1
        self.stats.messages += 1
        _metrics.pool_opened(self)
        log.debug("opened connection %d to %s", conn.number, self.relay.safe_url)
        return conn

    async def _alive(self, conn: Connection) -> bool:
        try:
            await conn.smtp.noop(timeout=min(10.0, self.relay.command_timeout_s))
        except (aiosmtplib.SMTPException, OSError):
            conn.poison()
            return False
        return True

    async def _close(self, conn: Connection) -> None:
        """Say QUIT when the session is healthy, then drop the socket."""
        if conn in self._connections:
            self._connections.remove(conn)
        self.stats.closed += 1
        self.stats.open_now = self.open_count
        self._changed()
        # Shielded: a cancelled caller must not leave the socket half closed.
        await asyncio.shield(
            close_session(conn.smtp, say_quit=not conn.poisoned, protocol=conn.protocol)
        )
        if conn.lease is not None and self.limits is not None:
            lease, conn.lease = conn.lease, None
            await asyncio.shield(self.limits.release(lease))

    async def aclose(self) -> None:
        """Close every idle connection and refuse new borrowers."""
        self._closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        for conn in list(self._connections):
            if not conn.busy:
                await self._close(conn)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(RuntimeError("pool is closed"))
        if self._gauges_timer is not None:
            self._gauges_timer.cancel()
            self._gauges_timer = None
        self._changed(now=True)  # the pool's last state, whatever the throttle held back
        if self.limits is not None and not any(c.busy for c in self._connections):
            await self.limits.aclose()


def pool_for_relay(relay: RelayConfig, settings: Settings) -> Pool:
    """A pool for ``relay``, sharing its cluster-wide limits through Redis when it has any."""
    limits = None
    if relay.has_cluster_limits and settings.cluster_redis_url:
        limits = ClusterLimits(relay, settings.cluster_redis_url)
    return Pool(relay, limits=limits)
