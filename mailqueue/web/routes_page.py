"""The status page: the list and chart, one message, retry and cancel, the suppression
list, login and logout."""

from __future__ import annotations

import secrets
from pathlib import Path
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from .. import api
from ..statuses import MessageStatus, RecipientStatus, SuppressionReason
from .base import CSRF_COOKIE, SESSION_COOKIE, WINDOWS, client, page, web_of
from .chart import render_chart
from .payload import BodyTooLarge, read_form
from .security import TooManyAttempts

__all__ = ["NOTICES", "routes"]

STYLESHEET = (Path(__file__).parent / "static" / "mailqueue.css").read_bytes()
NOTICES = {
    "requeued": "Requeued for delivery: failed and deferred recipients will be tried again.",
    "nothing-to-retry": "Nothing to retry: no failed or deferred recipient (or it is sending).",
    "cancelled": "Cancelled the recipients that were not sent yet.",
    "suppressed": "Added to the suppression list: queued mail to it will not be sent.",
    "unsuppressed": "Removed from the suppression list.",
    "not-suppressed": "That address was not on the list in that scope.",
}
"""Fixed texts shown after an action: the URL names one, it never carries the words."""


@page
async def index(request: Request) -> Response:
    web = web_of(request)
    window = request.query_params.get("window", "24h")
    if window not in WINDOWS:
        window = "24h"
    filters, rows, limit = await web.list_data(request.query_params)
    stats = await web.stats_data()
    series = await web.series_data(window)
    older = None
    if len(rows) == limit:
        older = "/?" + urlencode({**filters.as_query(), "before": rows[-1].id, "window": window})
    return web.render(
        request,
        "index.html",
        stats=stats,
        series=series,
        chart=render_chart(series),
        window=window,
        windows=list(WINDOWS),
        filters=filters,
        rows=rows,
        older=older,
        paged=bool(request.query_params.get("before")),
        newest="/?" + urlencode({**filters.as_query(), "window": window}),
        message_statuses=MessageStatus.ALL,
        recipient_statuses=RecipientStatus.ALL,
        notice=None,
        form=request.query_params,
    )


@page
async def message_page(request: Request) -> Response:
    web = web_of(request)
    data = await web.detail_data(request.path_params["message_id"])
    return web.render(
        request,
        "message.html",
        m=data,
        notice=NOTICES.get(request.query_params.get("notice", "")),
        can_retry=any(
            r["status"] in (RecipientStatus.FAILED, RecipientStatus.DEFERRED)
            for r in data["recipients"]
        ),
        can_cancel=any(r["status"] in RecipientStatus.OPEN for r in data["recipients"]),
    )


@page
async def message_retry(request: Request) -> Response:
    mid = request.path_params["message_id"]
    count = await run_in_threadpool(api.retry, mid)
    web_of(request).cache.clear()
    notice = "requeued" if count else "nothing-to-retry"
    return RedirectResponse(f"/messages/{mid}?" + urlencode({"notice": notice}), 303)


@page
async def message_cancel(request: Request) -> Response:
    mid = request.path_params["message_id"]
    await run_in_threadpool(api.cancel, mid)
    web_of(request).cache.clear()
    return RedirectResponse(f"/messages/{mid}?" + urlencode({"notice": "cancelled"}), 303)


@page
async def suppressions_page(request: Request) -> Response:
    web = web_of(request)
    params = request.query_params
    reason = params.get("reason") or None
    address = (params.get("address") or "").strip() or None
    before = params.get("before")
    limit = 100
    rows = await run_in_threadpool(
        lambda: api.suppressions(
            reason=reason,
            address=address,
            limit=limit,
            before=int(before) if before and before.isdigit() else None,
        )
    )
    older = None
    if len(rows) == limit:
        query = {k: v for k, v in (("reason", reason), ("address", address)) if v}
        older = "/suppressions?" + urlencode({**query, "before": rows[-1].id})
    stats = await web.stats_data()
    return web.render(
        request,
        "suppressions.html",
        rows=rows,
        older=older,
        counts=stats["suppressions"],
        reasons=SuppressionReason.ALL,
        reason=reason,
        address=address or "",
        notice=NOTICES.get(params.get("notice", "")),
    )


@page
async def suppressions_add(request: Request) -> Response:
    form = request.state.form
    await run_in_threadpool(
        lambda: api.suppress(
            form.get("address", ""),
            reason=form.get("reason") or SuppressionReason.MANUAL,
            scope=form.get("scope") or None,
            note=form.get("note") or None,
        )
    )
    web_of(request).cache.clear()
    return RedirectResponse("/suppressions?notice=suppressed", 303)


@page
async def suppressions_remove(request: Request) -> Response:
    form = request.state.form
    removed = await run_in_threadpool(
        lambda: api.unsuppress(form.get("address", ""), scope=form.get("scope") or None)
    )
    web_of(request).cache.clear()
    notice = "unsuppressed" if removed else "not-suppressed"
    return RedirectResponse(f"/suppressions?notice={notice}", 303)


async def login(request: Request) -> Response:
    web = web_of(request)
    request.state.new_csrf = secrets.token_urlsafe(24)
    nxt = request.query_params.get("next", "/")
    if not nxt.startswith("/") or nxt.startswith("//") or "\\" in nxt:
        nxt = "/"
    if request.method == "GET":
        return web.render(request, "login.html", next=nxt, error=None)
    who = client(request)
    try:
        web.failures.check(who)
        form = await read_form(request)
    except TooManyAttempts as exc:
        return web.too_many(request, exc, api_call=False)
    except BodyTooLarge as exc:
        return web.render(request, "login.html", 413, next=nxt, error=str(exc))
    if not web.csrf_ok(request, form):
        return web.render(request, "login.html", 403, next=nxt, error="CSRF check failed")
    if not web.token_matches(form.get("token", "")):
        if web.token:
            web.failures.failed(who)
        return web.render(request, "login.html", 401, next=nxt, error="wrong token")
    web.failures.succeeded(who)
    response = RedirectResponse(nxt, status_code=303)
    web.set_cookie(
        request,
        response,
        SESSION_COOKIE,
        web.sessions.create(),
        max_age=int(web.sessions.lifetime_s),
    )
    # a fresh CSRF token for the new session: one planted before login is worthless
    web.set_cookie(request, response, CSRF_COOKIE, secrets.token_urlsafe(24))
    return response


async def logout(request: Request) -> Response:
    web = web_of(request)
    request.state.new_csrf = secrets.token_urlsafe(24)
    try:
        form = await read_form(request)
    except BodyTooLarge as exc:
        return web.render(request, "error.html", 413, title="Too large", detail=str(exc))
    if not web.csrf_ok(request, form):
        request.state.authed = web.has_session(request)
        return web.render(request, "error.html", 403, title="Forbidden", detail="CSRF check failed")
    web.sessions.end(request.cookies.get(SESSION_COOKIE, ""))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict")
    return response


async def stylesheet(request: Request) -> Response:
    return Response(
        STYLESHEET,
        media_type="text/css",
        headers={"Cache-Control": "public, max-age=3600"},
    )


def routes() -> list[Route]:
    return [
        Route("/", index),
        Route("/messages/{message_id}", message_page),
        Route("/messages/{message_id}/retry", message_retry, methods=["POST"]),
        Route("/messages/{message_id}/cancel", message_cancel, methods=["POST"]),
        Route("/suppressions", suppressions_page),
        Route("/suppressions/add", suppressions_add, methods=["POST"]),
        Route("/suppressions/remove", suppressions_remove, methods=["POST"]),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/static/mailqueue.css", stylesheet),
    ]
