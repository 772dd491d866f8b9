"""The status page and the JSON API, as one Starlette app.

Access: with a token, the API wants ``Authorization: Bearer <token>`` and
the page a login (the token typed once; the browser then holds a random
session id, see ``security.py``). Without a token the app only runs bound to
loopback and only when asked explicitly (``--no-auth-on-loopback``); it then
also refuses other ``Host`` headers, so a web page elsewhere cannot reach it
through DNS rebinding. Wrong tokens are counted per client address and
answered 429 past the limit.

Every state change is a POST. Page forms (logout included) carry a CSRF
token that must match a ``SameSite=Strict`` cookie; API POSTs must be JSON
(a cross-site form can not send that without a CORS preflight, which this
app never grants). The one exception is ``/u/<token>``, the one-click
unsubscribe link (``routes_unsubscribe.py``): open to anyone holding a signed
token, as RFC 8058 requires, and able to do nothing but suppress the address
that token names.

Input is bounded before it is read (``payload.py``): a JSON body over
``api_body_limit`` is answered 413 from its ``Content-Length`` or as soon as
a chunked body passes the limit, nesting is capped, and every field is
type-checked, so bad input is a 4xx naming the field, never a 500.

Nothing secret is ever rendered: relay URLs are shown without passwords and
settings are never dumped. Every response carries a strict CSP (the page
runs no script and loads its one stylesheet from ``/static``),
``X-Frame-Options: DENY``, ``nosniff`` and ``Referrer-Policy``.

Where things are: ``base.py`` holds what every route shares (the app's state,
access checks, rendering, the data the page and the API both show),
``routes_page.py`` the page's routes, ``routes_api.py`` the JSON API's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware

from . import routes_api, routes_page, routes_unsubscribe
from .base import CSRF_COOKIE, LOOPBACK_HOSTS, SESSION_COOKIE, Web
from .security import SecurityHeaders

__all__ = ["CSRF_COOKIE", "LOOPBACK_HOSTS", "SESSION_COOKIE", "create_app"]


class _App(Starlette):
    """Starlette with ``SecurityHeaders`` outside everything, its own 500 page included."""

    def build_middleware_stack(self) -> Any:
        return SecurityHeaders(super().build_middleware_stack())


def create_app(
    *,
    token: str | None,
    allow_anonymous: bool = False,
    clock: Callable[[], float] = time.monotonic,
    unsubscribe_only: bool = False,
) -> Starlette:
    """The ASGI app; ``token=None`` requires ``allow_anonymous`` (loopback only).

    ``clock`` (seconds, monotonic) times sessions and the failed-attempt
    window; tests pass their own to move time without sleeping.
    ``unsubscribe_only``: only ``/u/<token>`` and the stylesheet, for the
    process exposed to the internet; no page, no API, no token.
    """
    if unsubscribe_only:
        app = _App(routes=routes_unsubscribe.routes() + routes_page.public_routes())
        app.state.web = Web(token=None, clock=clock)
        return app
    if not token and not allow_anonymous:
        raise ValueError("a token is required unless anonymous loopback access is allowed")
    middleware = []
    if not token:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_HOSTS))
    app = _App(
        routes=routes_page.routes() + routes_api.routes() + routes_unsubscribe.routes(),
        middleware=middleware,
    )
    app.state.web = Web(token=token, clock=clock)
    return app
