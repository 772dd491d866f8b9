"""Per-relay limits shared by every worker process on every host, kept in Redis.

Providers limit the whole sending account, not one process: "at most 3
simultaneous connections", "at most 200 messages per second". A pool bounds
one process only, so these two limits live in Redis, and every decision is
one Lua script (atomic, one round trip) on Redis's own clock, so hosts with
skewed clocks still agree.

* **Connections** (``cluster_max_connections``): each open SMTP connection
  holds a *lease*, a member of a sorted set scored by its expiry. Holders
  renew their leases every ``ttl / 3``; the leases of a killed worker expire
  after ``ttl`` (default 30 s), so a crash cannot leak a slot for longer.
  A process that waits for a slot says so (a second, expiring set); a
  process that sees others waiting closes its connections when they fall
  idle instead of keeping them, so slots move between processes at batch
  boundaries rather than after the idle timeout.
* **Rate** (``rate_limit``, messages per second): GCRA with reservations.
  Each message reserves the next free send time and sleeps until it; the
  long-run rate never exceeds the limit, and a burst of ``rate_limit_burst``
  messages (default 50 ms worth) may go at once after a quiet spell, so a
  sender that fell a little behind catches up instead of losing the time.

Redis is found at ``MAILQUEUE_LIMITS_REDIS_URL``, else the broker when it
is Redis. If Redis cannot be reached, or no slot frees up within
``cluster_wait_s``, the attempt fails as a connection failure would: the
recipients are deferred, nothing is sent over the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from typing import Any

from .. import metrics as _metrics
from ..config import RelayConfig
from ..errors import ClusterLimitError

__all__ = ["ClusterLimits", "Lease"]

log = logging.getLogger("mailqueue.limits")

# KEYS: leases, waiters. ARGV: limit, ttl_ms, token, wait ("1": if refused, register
# as a waiter, so that holders hand over idle connections). Returns 1 (granted) or 0.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
  redis.call('ZREM', KEYS[2], ARGV[3])
  return 1
end
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[2], now + 2000, ARGV[3])
  redis.call('PEXPIRE', KEYS[2], 4000)
end
return 0
"""

# KEYS: leases. ARGV: ttl_ms, token... Returns the tokens that were no longer held.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local lost = {}
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
  else
    table.insert(lost, ARGV[i])
  end
end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return lost
"""

# KEYS: waiters. Returns how many other processes wait for a slot now.
_WAITING = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""

# KEYS: theoretical arrival time (µs). ARGV: interval_us, burst.
# Returns how many µs to wait before sending the message it reserved.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local send_at = tat - (tonumber(ARGV[2]) - 1) * interval
if send_at < now then send_at = now end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
return math.floor(send_at - now)
"""


class Lease:
    """One cluster-wide connection slot, held while an SMTP connection is open."""

    __slots__ = ("token", "lost")

    def __init__(self, token: str) -> None:
        self.token = token
        self.lost = False  # Redis no longer knows it: close the connection soon


class ClusterLimits:
    """The cluster-wide connection slots and send rate of one relay."""

    def __init__(self, relay: RelayConfig, redis_url: str, *, lease_ttl_s: float = 30.0) -> None:
        self.relay = relay
        self.max_connections = relay.cluster_max_connections
        self.rate = relay.rate_limit
        burst = relay.rate_limit_burst
        if burst is None:
            burst = int((self.rate or 0) * 0.05)
        self.burst = max(1, burst)
        self.wait_s = relay.cluster_wait_s
        self.ttl_ms = int(lease_ttl_s * 1000)
        prefix = f"mailqueue:limits:{relay.name}"
        self._leases_key = f"{prefix}:connections"
        self._waiters_key = f"{prefix}:waiting"
        self._rate_key = f"{prefix}:rate"
        self._redis_url = redis_url
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._held: dict[str, Lease] = {}
        self._renewer: asyncio.Task[None] | None = None
        self.waits = 0  # times a connection waited for a cluster slot

    def _redis(self) -> Any:
        """This process's client (made on first use, on the running loop)."""
        if self._client is None:
            import redis.asyncio as aioredis

            self._client = aioredis.Redis.from_url(
                self._redis_url, socket_timeout=5, socket_connect_timeout=5
            )
        return self._client

    def _script(self, name: str, source: str) -> Any:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self._redis().register_script(source)
        return script

    def _unreachable(self, exc: BaseException) -> ClusterLimitError:
        return ClusterLimitError(
            f"relay {self.relay.name!r}: the cluster limits store (Redis) is unreachable "
            f"({type(exc).__name__}: {exc}); nothing was sent, the recipients are deferred",
            retryable=True,
        )

    # -- connections ------------------------------------------------------------

    async def acquire(self) -> Lease | None:
        """Wait for a connection slot; None when the relay has no connection limit."""
        if not self.max_connections:
            return None
        import redis

        lease = Lease(uuid.uuid4().hex)
        deadline = time.monotonic() + self.wait_s
        delay = 0.02
        waited = False
        acquire = self._script("acquire", _ACQUIRE)
        while True:
            try:
                granted = await acquire(
                    keys=[self._leases_key, self._waiters_key],
                    args=[self.max_connections, self.ttl_ms, lease.token, "1"],
                )
            except redis.RedisError as exc:
                raise self._unreachable(exc) from None
            if granted:
                self._held[lease.token] = lease
                self._ensure_renewer()
                return lease
            if not waited:
                waited = True
                self.waits += 1
                _metrics.cluster_limit_waited(self.relay.name, "connections")
            if time.monotonic() >= deadline:
                await self._stop_waiting(lease)
                raise ClusterLimitError(
                    f"relay {self.relay.name!r}: no connection slot came free within "
                    f"{self.wait_s:g} s (cluster_max_connections={self.max_connections}); "
                    "the recipients are deferred",
                    retryable=True,
                )
            try:
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            except asyncio.CancelledError:
                await asyncio.shield(self._stop_waiting(lease))
                raise
            delay = min(delay * 2, 0.05)

    async def try_acquire(self) -> Lease | None:
        """A slot if one is free right now, else None (without queueing for one).

        For a process that already holds a connection to the relay: it waits for
        its own connection rather than for a further slot.
        """
        import redis

        lease = Lease(uuid.uuid4().hex)
        try:
            granted = await self._script("acquire", _ACQUIRE)(
                keys=[self._leases_key, self._waiters_key],
                args=[self.max_connections, self.ttl_ms, lease.token, "0"],
            )
        except redis.RedisError as exc:
            raise self._unreachable(exc) from None
        if not granted:
            return None
        self._held[lease.token] = lease
        self._ensure_renewer()
        return lease

    async def _stop_waiting(self, lease: Lease) -> None:
        """No longer ask holders to give up slots for us (else they would for 2 s)."""
        with contextlib.suppress(Exception):  # else the entry expires on its own
            await self._redis().zrem(self._waiters_key, lease.token)

    async def release(self, lease: Lease | None) -> None:
        """Give the slot back (when the connection closed)."""
        if lease is None:
            return
        self._held.pop(lease.token, None)
        try:
            await self._redis().zrem(self._leases_key, lease.token)
        except Exception as exc:  # noqa: BLE001 - the lease then expires on its own
            log.warning("could not release a connection slot of %s: %s", self.relay.name, exc)

    async def others_waiting(self) -> bool:
        """Whether another process waits for a slot (then idle connections close)."""
        if not self.max_connections:
            return False
        try:
            return bool(await self._script("waiting", _WAITING)(keys=[self._waiters_key]))
        except Exception:  # noqa: BLE001 - keep the connection; the lease stays honest
            return False

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        while self._held:
            await asyncio.sleep(self.ttl_ms / 3000)
            tokens = list(self._held)
            if not tokens:
                break
            try:
                lost = await self._script("renew", _RENEW)(
                    keys=[self._leases_key], args=[self.ttl_ms, *tokens]
                )
            except Exception as exc:  # noqa: BLE001 - try again at the next beat
                log.warning("could not renew connection slots of %s: %s", self.relay.name, exc)
                continue
            for token in lost:
                token = token.decode() if isinstance(token, bytes) else token
                lease = self._held.get(token)
                if lease is not None:
                    lease.lost = True
                    log.warning(
                        "relay %s: a connection slot expired in Redis; closing that connection",
                        self.relay.name,
                    )

    # -- rate -------------------------------------------------------------------

    async def pace(self) -> None:
        """Wait for this message's turn under the relay's cluster-wide rate."""
        if not self.rate:
            return
        import redis

        interval_us = max(1, int(1_000_000 / self.rate))
        try:
            wait_us = await self._script("reserve", _RESERVE)(
                keys=[self._rate_key], args=[interval_us, self.burst]
            )
        except redis.RedisError as exc:
            raise self._unreachable(exc) from None
        if wait_us > 0:
            _metrics.cluster_limit_waited(self.relay.name, "rate")
            await asyncio.sleep(wait_us / 1_000_000)

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        for lease in list(self._held.values()):
            await self.release(lease)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
