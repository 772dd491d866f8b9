"""The JSON API (``/api/v1``) and the health check."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import api, inbound
from ..config import get_settings
from ..errors import InvalidMessageError, NotFoundError
from . import payload
from .base import WINDOWS, JSONResponse, _limit, _param, endpoint, web_of
from .payload import read_body

__all__ = ["routes"]


@endpoint
async def api_stats(request: Request) -> Any:
    return await run_in_threadpool(api.stats)


@endpoint
async def api_series(request: Request) -> Any:
    window = request.query_params.get("window", "24h")
    if window not in WINDOWS:
        raise InvalidMessageError(f"window must be one of {', '.join(WINDOWS)}", field="window")
    return await web_of(request).series_data(window)


@endpoint
async def api_list(request: Request) -> Any:
    _filters_, rows, limit = await web_of(request).list_data(request.query_params)
    return {
        "messages": [r.to_dict() for r in rows],
        "next_before": rows[-1].id if len(rows) == limit else None,
    }


@endpoint
async def api_status(request: Request) -> Any:
    return await web_of(request).detail_data(request.path_params["message_id"])


@endpoint
async def api_retry(request: Request) -> Any:
    mid = request.path_params["message_id"]
    count = await run_in_threadpool(api.retry, mid)
    web_of(request).cache.clear()
    info = await run_in_threadpool(api.get_status, mid)
    return {"requeued": count, "status": info.status}


@endpoint
async def api_cancel(request: Request) -> Any:
    info = await run_in_threadpool(api.cancel, request.path_params["message_id"])
    web_of(request).cache.clear()
    return info.to_dict()


@endpoint
async def api_enqueue(request: Request) -> Any:
    current = get_settings()
    raw = await read_body(request, current.api_body_limit)
    body = payload.load_json(raw, max_depth=current.api_max_depth)
    kwargs = payload.enqueue_args(body, lifetime_s=current.message_lifetime_s)
    message_id = await run_in_threadpool(lambda: api.enqueue(kwargs.pop("message"), **kwargs))
    web_of(request).cache.clear()
    return JSONResponse({"id": message_id}, status_code=201)


@endpoint
async def api_bounces(request: Request) -> Any:
    """Stored reports, newest first; ``unmatched=1``: only those tied to no row."""
    params = request.query_params
    limit = _limit(params, 50)
    before = _param(params, "before")
    if before is not None and not before.isdigit():
        raise InvalidMessageError("must be a report id (a whole number)", field="before")
    unmatched = _param(params, "unmatched") in ("1", "true", "yes")
    rows = await run_in_threadpool(
        lambda: inbound.reports(
            unmatched=unmatched, limit=limit, before=int(before) if before is not None else None
        )
    )
    return {
        "bounces": [r.as_dict() for r in rows],
        "next_before": rows[-1].id if len(rows) == limit else None,
    }


@endpoint
async def api_events(request: Request) -> Any:
    """Normalized bounce/complaint events (an ESP's webhooks, translated): see docs/bounces.md."""
    current = get_settings()
    raw = await read_body(request, current.api_body_limit)
    body = payload.load_json(raw, max_depth=current.api_max_depth)
    records = await run_in_threadpool(inbound.ingest_events, body)
    web_of(request).cache.clear()
    return JSONResponse(
        {
            "events": [
                {
                    "id": r.id,
                    "recipient_id": r.recipient_id,
                    "effect": r.effect,
                    "reason": r.reason,
                }
                for r in records
            ]
        },
        status_code=201,
    )


@endpoint
async def api_suppressions(request: Request) -> Any:
    params = request.query_params
    limit = min(_limit(params, 100), 10000)
    before = _param(params, "before")
    if before is not None and not before.isdigit():
        raise InvalidMessageError("must be an entry id (a whole number)", field="before")
    rows = await run_in_threadpool(
        lambda: api.suppressions(
            reason=_param(params, "reason"),
            scope=params.get("scope"),
            address=_param(params, "address"),
            limit=limit,
            before=int(before) if before is not None else None,
        )
    )
    return {
        "suppressions": [r.as_dict() for r in rows],
        "next_before": rows[-1].id if len(rows) == limit else None,
    }


@endpoint
async def api_suppress(request: Request) -> Any:
    current = get_settings()
    raw = await read_body(request, current.api_body_limit)
    args = payload.suppression_args(payload.load_json(raw, max_depth=current.api_max_depth))
    entry = await run_in_threadpool(lambda: api.suppress(**args))
    web_of(request).cache.clear()
    return JSONResponse(entry.as_dict(), status_code=201)


@endpoint
async def api_unsuppress(request: Request) -> Any:
    address = _param(request.query_params, "address")
    if address is None:
        raise InvalidMessageError("give ?address=… (&scope=… for a scoped entry)", field="address")
    scope = _param(request.query_params, "scope")
    if not await run_in_threadpool(lambda: api.unsuppress(address, scope=scope)):
        raise NotFoundError(f"{address} is not suppressed in scope {scope or 'everywhere'}")
    web_of(request).cache.clear()
    return {"removed": True}


async def healthz(request: Request) -> Response:
    try:
        await run_in_threadpool(api.ping)
    except Exception as exc:  # noqa: BLE001 - report, never raise
        return JSONResponse({"ok": False, "error": type(exc).__name__}, status_code=503)
    return JSONResponse({"ok": True})


def routes() -> list[Route]:
    return [
        Route("/healthz", healthz),
        Route("/api/v1/stats", api_stats),
        Route("/api/v1/series", api_series),
        Route("/api/v1/messages", api_list),
        Route("/api/v1/messages", api_enqueue, methods=["POST"]),
        Route("/api/v1/events", api_events, methods=["POST"]),
        Route("/api/v1/bounces", api_bounces),
        Route("/api/v1/messages/{message_id}", api_status),
        Route("/api/v1/messages/{message_id}/retry", api_retry, methods=["POST"]),
        Route("/api/v1/messages/{message_id}/cancel", api_cancel, methods=["POST"]),
        Route("/api/v1/suppressions", api_suppressions),
        Route("/api/v1/suppressions", api_suppress, methods=["POST"]),
        Route("/api/v1/suppressions", api_unsuppress, methods=["DELETE"]),
    ]
