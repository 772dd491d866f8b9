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
app never grants).

Input is bounded before it is read (``payload.py``): a JSON body over
``api_body_limit`` is answered 413 from its ``Content-Length`` or as soon as
a chunked body passes the limit, nesting is capped, and every field is
type-checked, so bad input is a 4xx naming the field, never a 500.

Nothing secret is ever rendered: relay URLs are shown without passwords and
settings are never dumped. Every response carries a strict CSP (the page
runs no script and loads its one stylesheet from ``/static``),
``X-Frame-Options: DENY``, ``nosniff`` and ``Referrer-Policy``.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.responses import JSONResponse as _StarletteJSON
from starlette.routing import Route

from .. import api
from ..config import get_settings
from ..errors import InvalidMessageError, NotFoundError
from ..statuses import MessageStatus, RecipientStatus
from . import payload
from .chart import render_chart
from .payload import BodyTooLarge, parse_time, read_body, read_form, refuse_nul
from .security import (
    FailureLimiter,
    SecurityHeaders,
    SessionStore,
    TooManyAttempts,
    client_key,
)

__all__ = ["create_app"]

SESSION_COOKIE = "mq_session"
CSRF_COOKIE = "mq_csrf"
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "[::1]", "::1"]
MAX_LIMIT = 200
STYLESHEET = (Path(__file__).parent / "static" / "mailqueue.css").read_bytes()
NOTICES = {
    "requeued": "Requeued for delivery: failed and deferred recipients will be tried again.",
    "nothing-to-retry": "Nothing to retry: no failed or deferred recipient (or it is sending).",
    "cancelled": "Cancelled the recipients that were not sent yet.",
}
"""Fixed texts shown after an action: the URL names one, it never carries the words."""

_templates = Environment(
    loader=FileSystemLoader(str(Path(__file__).parent / "templates")),
    autoescape=select_autoescape(["html"]),
)


def _fmt_time(value: Any) -> str:
    if not value:
        return "–"
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value.strftime("%Y-%m-%d %H:%M:%S")


_templates.filters["t"] = _fmt_time


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class JSONResponse(_StarletteJSON):
    """JSON with ISO 8601 datetimes wherever they sit."""

    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, default=_json_default, ensure_ascii=False, separators=(",", ":")
        ).encode("utf-8")


class _Cache:
    """Tiny time-bounded memo: the counts and the chart cost a scan of an index."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._values: dict[str, tuple[float, Any]] = {}

    async def get(self, key: str, fn: Callable[[], Any]) -> Any:
        hit = self._values.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        value = await run_in_threadpool(fn)
        self._values[key] = (now, value)
        return value

    def clear(self) -> None:
        self._values.clear()


def _param(params: Any, name: str) -> str | None:
    value = (params.get(name) or "").strip() or None
    refuse_nul(value, name)
    return value


def _filters(params: Any) -> api.Filters:
    status = _param(params, "status")
    if status and status not in MessageStatus.ALL:
        raise InvalidMessageError(f"unknown status {status!r}", field="status")
    return api.Filters(
        status=status,
        relay=_param(params, "relay"),
        sender=_param(params, "sender"),
        recipient=_param(params, "recipient"),
        tag=_param(params, "tag"),
        since=parse_time(_param(params, "since"), "since"),
        until=_until(_param(params, "until")),
    )


def _until(value: str | None) -> dt.datetime | None:
    """A bare date means "to the end of that day"; a time is taken as it is."""
    parsed = parse_time(value, "until")
    if parsed is not None and value is not None and len(value.strip()) == 10:
        parsed += dt.timedelta(days=1)
    return parsed


def _limit(params: Any, default: int = 50) -> int:
    try:
        value = int(params.get("limit") or default)
    except ValueError:  # also a number of more than 4300 digits
        raise InvalidMessageError("limit must be a number", field="limit") from None
    return max(1, min(MAX_LIMIT, value))


_WINDOWS = {"1h": (3600, 60), "6h": (6 * 3600, 600), "24h": (86400, 3600), "7d": (7 * 86400, 21600)}


class _App(Starlette):
    """Starlette with ``SecurityHeaders`` outside everything, its own 500 page included."""

    def build_middleware_stack(self) -> Any:
        return SecurityHeaders(super().build_middleware_stack())


def create_app(
    *,
    token: str | None,
    allow_anonymous: bool = False,
    clock: Callable[[], float] = time.monotonic,
) -> Starlette:
    """The ASGI app; ``token=None`` requires ``allow_anonymous`` (loopback only).

    ``clock`` (seconds, monotonic) times sessions and the failed-attempt
    window; tests pass their own to move time without sleeping.
    """
    if not token and not allow_anonymous:
        raise ValueError("a token is required unless anonymous loopback access is allowed")
    settings = get_settings()
    sessions = SessionStore(settings.web_session_s, clock)
    failures = FailureLimiter(settings.web_auth_failures_per_min, clock)
    cache = _Cache(5.0)

    def token_matches(given: str) -> bool:
        return bool(token) and hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), (token or "").encode()
        )

    def bearer(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        return header[7:].strip() if header[:7].lower() == "bearer " else None

    def client(request: Request) -> str:
        return client_key(request.client.host if request.client else None)

    def bearer_ok(request: Request) -> bool | None:
        """Whether the bearer token is right (None: none sent); ``TooManyAttempts`` first."""
        given = bearer(request)
        if given is None:
            return None
        who = client(request)
        failures.check(who)
        if token_matches(given):
            failures.succeeded(who)
            return True
        failures.failed(who)
        return False

    def has_session(request: Request) -> bool:
        return sessions.is_valid(request.cookies.get(SESSION_COOKIE, ""))

    def csrf_token(request: Request) -> str:
        return request.cookies.get(CSRF_COOKIE) or request.state.new_csrf

    def csrf_ok(request: Request, form: dict[str, str]) -> bool:
        sent = form.get("csrf", "")
        cookie = request.cookies.get(CSRF_COOKIE, "")
        return bool(cookie) and hmac.compare_digest(
            sent.encode("utf-8", "surrogateescape"), cookie.encode("utf-8", "surrogateescape")
        )

    def set_cookie(request: Request, response: Response, name: str, value: str, **kw: Any) -> None:
        response.set_cookie(
            name,
            value,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            **kw,
        )

    def render(
        request: Request,
        name: str,
        status_code: int = 200,
        headers: dict[str, str] | None = None,
        **ctx: Any,
    ) -> HTMLResponse:
        html = _templates.get_template(name).render(
            request=request,
            csrf=csrf_token(request),
            auth=bool(token) and getattr(request.state, "authed", False),
            **ctx,
        )
        response = HTMLResponse(html, status_code=status_code, headers=headers)
        if not request.cookies.get(CSRF_COOKIE):
            set_cookie(request, response, CSRF_COOKIE, request.state.new_csrf)
        return response

    def too_many(request: Request, exc: TooManyAttempts, *, api_call: bool) -> Response:
        headers = {"Retry-After": str(exc.retry_after)}
        if api_call:
            return JSONResponse(
                {"error": "too_many_attempts", "detail": str(exc)}, status_code=429, headers=headers
            )
        return render(
            request, "error.html", 429, headers, title="Too many attempts", detail=str(exc)
        )

    def page(
        fn: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapper(request: Request) -> Response:
            request.state.new_csrf = secrets.token_urlsafe(24)
            try:
                if token:
                    request.state.authed = bearer_ok(request) or has_session(request)
                    if not request.state.authed:
                        return RedirectResponse(
                            "/login?" + urlencode({"next": request.url.path}), status_code=303
                        )
                if request.method == "POST":
                    form = await read_form(request)
                    if not csrf_ok(request, form):
                        return render(
                            request,
                            "error.html",
                            403,
                            title="Forbidden",
                            detail="CSRF check failed",
                        )
                return await fn(request)
            except TooManyAttempts as exc:
                return too_many(request, exc, api_call=False)
            except BodyTooLarge as exc:
                return render(request, "error.html", 413, title="Too large", detail=str(exc))
            except NotFoundError as exc:
                return render(request, "error.html", 404, title="Not found", detail=str(exc))
            except InvalidMessageError as exc:
                return render(request, "error.html", 400, title="Bad request", detail=str(exc))

        return wrapper

    def endpoint(
        fn: Callable[[Request], Awaitable[Any]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapper(request: Request) -> Response:
            try:
                if token and not bearer_ok(request):
                    return JSONResponse(
                        {"error": "unauthorized", "detail": "send Authorization: Bearer <token>"},
                        status_code=401,
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                if request.method == "POST":
                    ctype = request.headers.get("content-type", "").split(";")[0].strip()
                    if ctype != "application/json":
                        return JSONResponse(
                            {
                                "error": "bad_request",
                                "detail": "POST bodies must be application/json",
                            },
                            status_code=415,
                        )
                    length = payload.declared_length(request)
                    if length is not None and length > get_settings().api_body_limit:
                        raise BodyTooLarge(get_settings().api_body_limit)
                result = await fn(request)
            except TooManyAttempts as exc:
                return too_many(request, exc, api_call=True)
            except BodyTooLarge as exc:
                return JSONResponse(
                    {
                        "error": "too_large",
                        "field": "body",
                        "detail": f"{exc} (MAILQUEUE_API_MAX_BODY)",
                    },
                    status_code=413,
                )
            except NotFoundError as exc:
                return JSONResponse({"error": "not_found", "detail": str(exc)}, status_code=404)
            except InvalidMessageError as exc:
                return JSONResponse(
                    {"error": "invalid", "field": exc.field, "detail": str(exc)}, status_code=400
                )
            if isinstance(result, Response):
                return result
            return JSONResponse(result)

        return wrapper

    # -- data, shared by page and API ------------------------------------------------

    async def stats_data() -> dict[str, Any]:
        return await cache.get("stats", api.stats)

    async def series_data(window: str) -> dict[str, Any]:
        window_s, bucket_s = _WINDOWS.get(window, _WINDOWS["24h"])
        return await cache.get(
            f"series:{window}",
            lambda: api.series(window_s=window_s, bucket_s=bucket_s),
        )

    async def list_data(params: Any) -> tuple[api.Filters, list[Any], int]:
        filters = _filters(params)
        limit = _limit(params)
        before = _param(params, "before")
        rows = await run_in_threadpool(api.search, filters, limit=limit, before=before)
        return filters, rows, limit

    async def detail_data(message_id: str) -> dict[str, Any]:
        info = await run_in_threadpool(api.get_status, message_id)
        meta, headers = await run_in_threadpool(api.message_meta, message_id)
        data = info.to_dict()
        data["metadata"] = meta or {}
        data["headers"] = headers.decode("utf-8", errors="replace")
        attempts = await run_in_threadpool(api.get_attempts, message_id)
        data["history"] = [a.to_dict() for a in attempts]
        return data

    # -- the page ---------------------------------------------------------------------

    @page
    async def index(request: Request) -> Response:
        window = request.query_params.get("window", "24h")
        if window not in _WINDOWS:
            window = "24h"
        filters, rows, limit = await list_data(request.query_params)
        stats = await stats_data()
        series = await series_data(window)
        older = None
        if len(rows) == limit:
            older = "/?" + urlencode(
                {**filters.as_query(), "before": rows[-1].id, "window": window}
            )
        return render(
            request,
            "index.html",
            stats=stats,
            series=series,
            chart=render_chart(series),
            window=window,
            windows=list(_WINDOWS),
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
        data = await detail_data(request.path_params["message_id"])
        return render(
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
        cache.clear()
        notice = "requeued" if count else "nothing-to-retry"
        return RedirectResponse(f"/messages/{mid}?" + urlencode({"notice": notice}), 303)

    @page
    async def message_cancel(request: Request) -> Response:
        mid = request.path_params["message_id"]
        await run_in_threadpool(api.cancel, mid)
        cache.clear()
        return RedirectResponse(f"/messages/{mid}?" + urlencode({"notice": "cancelled"}), 303)

    async def login(request: Request) -> Response:
        request.state.new_csrf = secrets.token_urlsafe(24)
        nxt = request.query_params.get("next", "/")
        if not nxt.startswith("/") or nxt.startswith("//") or "\\" in nxt:
            nxt = "/"
        if request.method == "GET":
            return render(request, "login.html", next=nxt, error=None)
        who = client(request)
        try:
            failures.check(who)
            form = await read_form(request)
        except TooManyAttempts as exc:
            return too_many(request, exc, api_call=False)
        except BodyTooLarge as exc:
            return render(request, "login.html", 413, next=nxt, error=str(exc))
        if not csrf_ok(request, form):
            return render(request, "login.html", 403, next=nxt, error="CSRF check failed")
        if not token_matches(form.get("token", "")):
            if token:
                failures.failed(who)
            return render(request, "login.html", 401, next=nxt, error="wrong token")
        failures.succeeded(who)
        response = RedirectResponse(nxt, status_code=303)
        set_cookie(
            request,
            response,
            SESSION_COOKIE,
            sessions.create(),
            max_age=int(sessions.lifetime_s),
        )
        # a fresh CSRF token for the new session: one planted before login is worthless
        set_cookie(request, response, CSRF_COOKIE, secrets.token_urlsafe(24))
        return response

    async def logout(request: Request) -> Response:
        request.state.new_csrf = secrets.token_urlsafe(24)
        try:
            form = await read_form(request)
        except BodyTooLarge as exc:
            return render(request, "error.html", 413, title="Too large", detail=str(exc))
        if not csrf_ok(request, form):
            request.state.authed = has_session(request)
            return render(request, "error.html", 403, title="Forbidden", detail="CSRF check failed")
        sessions.end(request.cookies.get(SESSION_COOKIE, ""))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict")
        return response

    async def stylesheet(request: Request) -> Response:
        return Response(
            STYLESHEET,
            media_type="text/css",
            headers={"Cache-Control": "public, max-age=3600"},
        )

    # -- the JSON API -----------------------------------------------------------------

    @endpoint
    async def api_stats(request: Request) -> Any:
        return await run_in_threadpool(api.stats)

    @endpoint
    async def api_series(request: Request) -> Any:
        window = request.query_params.get("window", "24h")
        if window not in _WINDOWS:
            raise InvalidMessageError(
                f"window must be one of {', '.join(_WINDOWS)}", field="window"
            )
        return await series_data(window)

    @endpoint
    async def api_list(request: Request) -> Any:
        _filters_, rows, limit = await list_data(request.query_params)
        return {
            "messages": [r.to_dict() for r in rows],
            "next_before": rows[-1].id if len(rows) == limit else None,
        }

    @endpoint
    async def api_status(request: Request) -> Any:
        return await detail_data(request.path_params["message_id"])

    @endpoint
    async def api_retry(request: Request) -> Any:
        mid = request.path_params["message_id"]
        count = await run_in_threadpool(api.retry, mid)
        cache.clear()
        info = await run_in_threadpool(api.get_status, mid)
        return {"requeued": count, "status": info.status}

    @endpoint
    async def api_cancel(request: Request) -> Any:
        info = await run_in_threadpool(api.cancel, request.path_params["message_id"])
        cache.clear()
        return info.to_dict()

    @endpoint
    async def api_enqueue(request: Request) -> Any:
        current = get_settings()
        raw = await read_body(request, current.api_body_limit)
        body = payload.load_json(raw, max_depth=current.api_max_depth)
        kwargs = payload.enqueue_args(body, lifetime_s=current.message_lifetime_s)
        message_id = await run_in_threadpool(lambda: api.enqueue(kwargs.pop("message"), **kwargs))
        cache.clear()
        return JSONResponse({"id": message_id}, status_code=201)

    async def healthz(request: Request) -> Response:
        try:
            await run_in_threadpool(api.ping)
        except Exception as exc:  # noqa: BLE001 - report, never raise
            return JSONResponse({"ok": False, "error": type(exc).__name__}, status_code=503)
        return JSONResponse({"ok": True})

    routes = [
        Route("/", index),
        Route("/messages/{message_id}", message_page),
        Route("/messages/{message_id}/retry", message_retry, methods=["POST"]),
        Route("/messages/{message_id}/cancel", message_cancel, methods=["POST"]),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/static/mailqueue.css", stylesheet),
        Route("/healthz", healthz),
        Route("/api/v1/stats", api_stats),
        Route("/api/v1/series", api_series),
        Route("/api/v1/messages", api_list),
        Route("/api/v1/messages", api_enqueue, methods=["POST"]),
        Route("/api/v1/messages/{message_id}", api_status),
        Route("/api/v1/messages/{message_id}/retry", api_retry, methods=["POST"]),
        Route("/api/v1/messages/{message_id}/cancel", api_cancel, methods=["POST"]),
    ]
    middleware = []
    if not token:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_HOSTS))
    return _App(routes=routes, middleware=middleware)
