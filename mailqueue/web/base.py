"""What every route of the web app shares.

One :class:`Web` per app holds its state (the token, login sessions, the
failed-attempt limit, a short cache) and the helpers the page and the API
both use: checking the bearer token and the CSRF token, rendering, and the
data both show. :func:`page` and :func:`endpoint` wrap a route of the page
or of the JSON API: they check access and turn domain errors into the
status code each face answers with. A route finds its ``Web`` on
``request.app.state.web`` (set by ``create_app``).
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
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.responses import JSONResponse as _StarletteJSON

from .. import api
from ..config import get_settings
from ..errors import InvalidMessageError, NotFoundError
from ..statuses import MessageStatus
from . import payload
from .payload import BodyTooLarge, parse_time, read_form, refuse_nul
from .security import FailureLimiter, SessionStore, TooManyAttempts, client_key

__all__ = [
    "CSRF_COOKIE",
    "JSONResponse",
    "LOOPBACK_HOSTS",
    "SESSION_COOKIE",
    "WINDOWS",
    "Web",
    "endpoint",
    "page",
    "web_of",
]

SESSION_COOKIE = "mq_session"
CSRF_COOKIE = "mq_csrf"
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "[::1]", "::1"]
MAX_LIMIT = 200

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


WINDOWS = {"1h": (3600, 60), "6h": (6 * 3600, 600), "24h": (86400, 3600), "7d": (7 * 86400, 21600)}
"""The chart's windows: name -> (window, bucket) in seconds."""


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else None


def client(request: Request) -> str:
    return client_key(request.client.host if request.client else None)


class Web:
    """One app's state and the helpers its routes share."""

    def __init__(self, *, token: str | None, clock: Callable[[], float]) -> None:
        settings = get_settings()
        self.token = token
        self.sessions = SessionStore(settings.web_session_s, clock)
        self.failures = FailureLimiter(settings.web_auth_failures_per_min, clock)
        self.cache = _Cache(5.0)

    # -- access ---------------------------------------------------------------------------

    def token_matches(self, given: str) -> bool:
        return bool(self.token) and hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), (self.token or "").encode()
        )

    def bearer_ok(self, request: Request) -> bool | None:
        """Whether the bearer token is right (None: none sent); ``TooManyAttempts`` first."""
        given = bearer(request)
        if given is None:
            return None
        who = client(request)
        self.failures.check(who)
        if self.token_matches(given):
            self.failures.succeeded(who)
            return True
        self.failures.failed(who)
        return False

    def has_session(self, request: Request) -> bool:
        return self.sessions.is_valid(request.cookies.get(SESSION_COOKIE, ""))

    @staticmethod
    def csrf_token(request: Request) -> str:
        return request.cookies.get(CSRF_COOKIE) or request.state.new_csrf

    @staticmethod
    def csrf_ok(request: Request, form: dict[str, str]) -> bool:
        sent = form.get("csrf", "")
        cookie = request.cookies.get(CSRF_COOKIE, "")
        return bool(cookie) and hmac.compare_digest(
            sent.encode("utf-8", "surrogateescape"), cookie.encode("utf-8", "surrogateescape")
        )

    @staticmethod
    def set_cookie(request: Request, response: Response, name: str, value: str, **kw: Any) -> None:
        response.set_cookie(
            name,
            value,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            **kw,
        )

    # -- answers --------------------------------------------------------------------------

    def render(
        self,
        request: Request,
        name: str,
        status_code: int = 200,
        headers: dict[str, str] | None = None,
        **ctx: Any,
    ) -> HTMLResponse:
        html = _templates.get_template(name).render(
            request=request,
            csrf=self.csrf_token(request),
            auth=bool(self.token) and getattr(request.state, "authed", False),
            **ctx,
        )
        response = HTMLResponse(html, status_code=status_code, headers=headers)
        if not request.cookies.get(CSRF_COOKIE):
            self.set_cookie(request, response, CSRF_COOKIE, request.state.new_csrf)
        return response

    def too_many(self, request: Request, exc: TooManyAttempts, *, api_call: bool) -> Response:
        headers = {"Retry-After": str(exc.retry_after)}
        if api_call:
            return JSONResponse(
                {"error": "too_many_attempts", "detail": str(exc)}, status_code=429, headers=headers
            )
        return self.render(
            request, "error.html", 429, headers, title="Too many attempts", detail=str(exc)
        )

    # -- data, shared by page and API -----------------------------------------------------

    async def stats_data(self) -> dict[str, Any]:
        return await self.cache.get("stats", api.stats)

    async def series_data(self, window: str) -> dict[str, Any]:
        window_s, bucket_s = WINDOWS.get(window, WINDOWS["24h"])
        return await self.cache.get(
            f"series:{window}",
            lambda: api.series(window_s=window_s, bucket_s=bucket_s),
        )

    @staticmethod
    async def list_data(params: Any) -> tuple[api.Filters, list[Any], int]:
        filters = _filters(params)
        limit = _limit(params)
        before = _param(params, "before")
        rows = await run_in_threadpool(api.search, filters, limit=limit, before=before)
        return filters, rows, limit

    @staticmethod
    async def detail_data(message_id: str) -> dict[str, Any]:
        info = await run_in_threadpool(api.get_status, message_id)
        meta, headers = await run_in_threadpool(api.message_meta, message_id)
        data = info.to_dict()
        data["metadata"] = meta or {}
        data["headers"] = headers.decode("utf-8", errors="replace")
        attempts = await run_in_threadpool(api.get_attempts, message_id)
        data["history"] = [a.to_dict() for a in attempts]
        return data


def web_of(request: Request) -> Web:
    """The ``Web`` of the app serving ``request``."""
    web: Web = request.app.state.web
    return web


Handler = Callable[[Request], Awaitable[Response]]


def page(fn: Handler) -> Handler:
    """A route of the status page: login (or bearer) required, CSRF on POST, HTML errors."""

    async def wrapper(request: Request) -> Response:
        web = web_of(request)
        request.state.new_csrf = secrets.token_urlsafe(24)
        try:
            if web.token:
                request.state.authed = web.bearer_ok(request) or web.has_session(request)
                if not request.state.authed:
                    return RedirectResponse(
                        "/login?" + urlencode({"next": request.url.path}), status_code=303
                    )
            if request.method == "POST":
                form = await read_form(request)
                request.state.form = form  # the body is read once: the route's fields
                if not web.csrf_ok(request, form):
                    return web.render(
                        request,
                        "error.html",
                        403,
                        title="Forbidden",
                        detail="CSRF check failed",
                    )
            return await fn(request)
        except TooManyAttempts as exc:
            return web.too_many(request, exc, api_call=False)
        except BodyTooLarge as exc:
            return web.render(request, "error.html", 413, title="Too large", detail=str(exc))
        except NotFoundError as exc:
            return web.render(request, "error.html", 404, title="Not found", detail=str(exc))
        except InvalidMessageError as exc:
            return web.render(request, "error.html", 400, title="Bad request", detail=str(exc))

    return wrapper


def endpoint(fn: Callable[[Request], Awaitable[Any]]) -> Handler:
    """A route of the JSON API: bearer token required, JSON POSTs, errors as JSON."""

    async def wrapper(request: Request) -> Response:
        web = web_of(request)
        try:
            if web.token and not web.bearer_ok(request):
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
            return web.too_many(request, exc, api_call=True)
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
