"""The web app's guards: login sessions, the failed-attempt limit, security headers.

Sessions
    A login creates a random session id (``secrets.token_urlsafe(32)``, 256
    bits) and sets it as the ``HttpOnly``, ``SameSite=Strict`` cookie; the
    cookie is ``Secure`` when the request came over HTTPS. Only a SHA-256 of
    the id is kept, in this process's memory, with its expiry. Each login
    gets a new id; ``/logout`` (a POST carrying the CSRF token) forgets it,
    so the old cookie is refused from then on, even if someone kept a copy.

    What follows from keeping sessions in memory: restarting the web process
    logs everyone out (the API's bearer token is unaffected). Several web
    processes (``uvicorn --workers``, replicas behind a load balancer) do not
    share sessions: a request that lands on another process than the one
    that saw the login is sent to the login page. Run one web process, or
    make the balancer keep a browser on one process (sticky sessions).

Failed attempts
    A wrong token at ``/login`` or in ``Authorization: Bearer`` counts as a
    failure of the client's address (an IPv6 client's /64, since one host
    usually holds a whole /64). After ``limit`` failures within a minute,
    login and bearer attempts from that address are answered 429 with
    ``Retry-After``, without looking at the token, until the oldest failure
    is a minute old. Behind a reverse proxy every client has the proxy's
    address unless uvicorn is told to trust its ``X-Forwarded-For``
    (``--forwarded-allow-ips``); then one client's failures lock everyone
    out for that minute, which is the safer way to be wrong.

Headers
    Every response, error pages and the JSON API included, carries a strict
    Content-Security-Policy (no script at all, styles only from this origin,
    no framing), ``X-Frame-Options: DENY``, ``X-Content-Type-Options:
    nosniff`` and ``Referrer-Policy: same-origin``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "SECURITY_HEADERS",
    "FailureLimiter",
    "SecurityHeaders",
    "SessionStore",
    "TooManyAttempts",
    "client_key",
]

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]

Clock = Callable[[], float]


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).digest()


class SessionStore:
    """Session ids of this process, each valid until its expiry or its logout.

    Keyed by the SHA-256 of the id, so neither a memory dump nor the timing
    of a dictionary lookup gives away a usable cookie. At most
    ``max_sessions`` are kept: past that the oldest login is dropped (only a
    token holder can log in, so this bounds memory, not an attack).
    """

    def __init__(self, lifetime_s: float, clock: Clock, *, max_sessions: int = 1000) -> None:
        self.lifetime_s = lifetime_s
        self._clock = clock
        self._max = max_sessions
        self._expiry: OrderedDict[bytes, float] = OrderedDict()

    def create(self) -> str:
        """A new random session id, valid for ``lifetime_s`` from now."""
        self._prune()
        session_id = secrets.token_urlsafe(32)
        self._expiry[_digest(session_id)] = self._clock() + self.lifetime_s
        while len(self._expiry) > self._max:
            self._expiry.popitem(last=False)
        return session_id

    def is_valid(self, session_id: str) -> bool:
        """Whether ``session_id`` was created here, has not expired and was not ended."""
        if not session_id:
            return False
        key = _digest(session_id)
        expires = self._expiry.get(key)
        if expires is None:
            return False
        if self._clock() >= expires:
            del self._expiry[key]
            return False
        return True

    def end(self, session_id: str) -> None:
        """Forget ``session_id`` (logout); unknown ids are ignored."""
        if session_id:
            self._expiry.pop(_digest(session_id), None)

    def _prune(self) -> None:
        now = self._clock()
        for key in [k for k, expires in self._expiry.items() if now >= expires]:
            del self._expiry[key]


class TooManyAttempts(Exception):
    """The client sent too many wrong tokens lately: answer 429 with ``Retry-After``."""

    def __init__(self, retry_after: int, limit: int) -> None:
        super().__init__(retry_after, limit)
        self.retry_after = retry_after
        self.limit = limit

    def __str__(self) -> str:
        return (
            f"too many wrong tokens from your address: try again in {self.retry_after} s "
            f"(at most {self.limit} per minute)"
        )


class FailureLimiter:
    """At most ``limit`` failed attempts per client in any ``window_s`` (a sliding window).

    Memory is bounded: a client keeps at most ``limit`` timestamps, and at
    most ``max_clients`` clients are tracked (the longest quiet ones are
    dropped first).
    """

    def __init__(
        self, limit: int, clock: Clock, *, window_s: float = 60.0, max_clients: int = 10_000
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._max_clients = max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str) -> int | None:
        """Seconds until ``client`` may try again, or None when it may try now."""
        times = self._failures.get(client)
        if times is None:
            return None
        now = self._clock()
        while times and now - times[0] >= self.window_s:
            times.popleft()
        if not times:
            del self._failures[client]
            return None
        if len(times) < self.limit:
            return None
        return max(1, math.ceil(times[0] + self.window_s - now))

    def check(self, client: str) -> None:
        """Raise ``TooManyAttempts`` when ``client`` must wait before its next attempt."""
        wait = self.retry_after(client)
        if wait is not None:
            raise TooManyAttempts(wait, self.limit)

    def failed(self, client: str) -> None:
        """Count one failed attempt by ``client``."""
        times = self._failures.pop(client, None)
        if times is None:
            times = deque(maxlen=self.limit)
        times.append(self._clock())
        self._failures[client] = times  # most recent last: the quiet ones go first
        while len(self._failures) > self._max_clients:
            self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        """A right token: the client's earlier typos are forgiven."""
        self._failures.pop(client, None)


def client_key(host: str | None) -> str:
    """The address a failure is counted against: the IP, or an IPv6 client's /64."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class SecurityHeaders:
    """ASGI middleware: add ``SECURITY_HEADERS`` to every HTTP response, errors included."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in SECURITY_HEADERS if n not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
