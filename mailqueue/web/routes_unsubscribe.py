"""``/u/<token>``: the one-click unsubscribe links (RFC 8058) that the worker writes.

These two routes are the only ones open without a login: the token is the
authority (it names one address and list, and only the holder of
``MAILQUEUE_UNSUBSCRIBE_SECRET`` can make one), and RFC 8058 has the mailbox
provider POST it with no cookie and no CSRF token. They read nothing but the
token and answer nothing but a short page about it, so they open no other
part of the app.

- ``GET`` shows a confirmation page with a button; it never unsubscribes
  (link scanners and previews fetch every URL in a message).
- ``POST`` (the provider's ``List-Unsubscribe=One-Click`` body, or the
  page's button; the body is read, bounded, and otherwise ignored) records
  the suppression through ``api.unsubscribe`` and answers 200, again and
  again for the same token.
- A token that does not verify is a 400 with a plain sentence, and counts
  against the client address: past ``MAILQUEUE_WEB_AUTH_FAILURES_PER_MIN``
  a minute, 429. All requests count against ``MAILQUEUE_UNSUBSCRIBE_PER_MIN``
  (high by default: Gmail and Yahoo post from a few addresses).

Responses are ``no-store`` and ``Referrer-Policy: no-referrer``: the URL
holds the token, which must not travel on to another site.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import api
from ..errors import ConfigError, InvalidMessageError, UnsubscribeTokenError
from ..unsubscribe import PATH_PREFIX
from .base import client, web_of
from .payload import FORM_MAX_BODY, BodyTooLarge, read_body
from .security import TooManyAttempts

__all__ = ["routes"]

_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Robots-Tag": "none"}


async def unsubscribe(request: Request) -> Response:
    web = web_of(request)
    token = request.path_params["token"]
    who = client(request)

    def answer(status: int, title: str, detail: str, **ctx: object) -> Response:
        headers = dict(_HEADERS)
        if status == 429:
            headers["Retry-After"] = str(ctx["retry_after"])
        return web.render_public(
            "unsubscribe.html", status, headers, title=title, detail=detail, **ctx
        )

    try:
        web.unsubscribe_requests.check(who)
        web.unsubscribe_failures.check(who)
    except TooManyAttempts as exc:
        return answer(
            429,
            "Too many requests",
            f"too many unsubscribe requests from your address: try again in {exc.retry_after} s",
            retry_after=exc.retry_after,
        )
    web.unsubscribe_requests.failed(who)  # counts every request, good or bad
    try:
        if request.method == "POST":
            await read_body(request, FORM_MAX_BODY)
            found = await run_in_threadpool(api.unsubscribe, token)
            return answer(200, "Unsubscribed", "", found=found, done=True)
        found = await run_in_threadpool(api.read_unsubscribe, token)
        return answer(200, "Unsubscribe", "", found=found, done=False)
    except UnsubscribeTokenError as exc:
        web.unsubscribe_failures.failed(who)
        return answer(400, "Invalid link", str(exc))
    except BodyTooLarge as exc:
        return answer(413, "Too large", str(exc))
    except InvalidMessageError:
        # A token we signed for an address the suppression list cannot hold (one the
        # relay took but mailqueue's address rules refuse, e.g. a bare local name).
        return answer(
            400,
            "Cannot unsubscribe",
            "this address cannot be unsubscribed here; please reply to the sender",
        )
    except ConfigError:
        return answer(
            503,
            "Unavailable",
            "unsubscribing is not set up on this server yet; please reply to the sender",
        )


def routes() -> list[Route]:
    return [Route(PATH_PREFIX + "{token}", unsubscribe, methods=["GET", "POST"])]
