"""What the web app reads from a request: bounded bodies, bounded JSON, typed fields.

The contract: whatever bytes arrive, the answer is a 201 or a 4xx naming what
was wrong, never a 500, and no request's body is read past its limit.

* ``read_body`` refuses a body over its limit before reading it when the
  ``Content-Length`` says so, and otherwise stops reading (a chunked body)
  as soon as the limit is passed: ``BodyTooLarge``, answered 413.
* ``load_json`` refuses what is not strict JSON (``NaN``, ``Infinity``,
  duplicate keys), strings no database column or mail header can carry
  (NUL, lone UTF-16 surrogates) and nesting deeper than the limit:
  ``InvalidMessageError`` naming the top-level field, a 400.
* ``enqueue_args`` turns ``POST /api/v1/messages`` into ``enqueue``
  arguments, checking every field's JSON type before anything uses it.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request

from ..api import TAG_KEY
from ..errors import InvalidMessageError

__all__ = [
    "ENQUEUE_FIELDS",
    "FORM_MAX_BODY",
    "BodyTooLarge",
    "enqueue_args",
    "load_json",
    "read_body",
    "read_form",
    "refuse_nul",
]

FORM_MAX_BODY = 64 * 1024
"""The page's forms carry a CSRF token and at most a token: 64 KiB is plenty."""
METADATA_MAX_BYTES = 64 * 1024
"""``metadata`` is a few labels for the operator, not a payload: 64 KiB as JSON."""
TAG_MAX_CHARS = 255
"""``metadata.tag`` is indexed (migration 0003); PostgreSQL's index rows hold ~2.7 kB."""
RELAY_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_NOT_TEXT = re.compile(r"[\x00\ud800-\udfff]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

ENQUEUE_FIELDS = (
    "sender",
    "to",
    "cc",
    "bcc",
    "reply_to",
    "subject",
    "text",
    "html",
    "headers",
    "attachments",
    "relay",
    "send_at",
    "idempotency_key",
    "metadata",
    "list_id",
    "priority",
    "unsubscribe",
)
SUPPRESSION_FIELDS = ("address", "reason", "scope", "note")
_ATTACHMENT_FIELDS = ("filename", "content_base64", "content_type")


class BodyTooLarge(Exception):
    """The request body is over ``limit`` bytes (answered 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit

    def __str__(self) -> str:
        return f"the request body is over the limit of {self.limit} bytes"


def declared_length(request: Request) -> int | None:
    """The ``Content-Length`` as a number (None when absent); a bad one is a 400."""
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    if not raw.strip().isdigit():
        raise InvalidMessageError("Content-Length is not a number", field="body")
    return int(raw)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read chunk by chunk and never past ``limit`` bytes (``BodyTooLarge``)."""
    length = declared_length(request)
    if length is not None and length > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_form(request: Request) -> dict[str, str]:
    """A small ``application/x-www-form-urlencoded`` form (anything else reads as empty)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, FORM_MAX_BODY)
    if ctype != "application/x-www-form-urlencoded":
        return {}
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return {}
    return dict(parse_qsl(text, keep_blank_values=True, max_num_fields=100))


def _refuse_constant(name: str) -> Any:
    raise InvalidMessageError(f"the body is not strict JSON: {name} is not a number", field="body")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidMessageError(f"the key {key!r} appears twice", field="body")
            seen.add(key)
    return result


def load_json(raw: bytes, *, max_depth: int) -> Any:
    """Parse ``raw`` as strict UTF-8 JSON nested at most ``max_depth`` arrays/objects deep."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidMessageError("the body is not UTF-8", field="body") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_pairs)
    except RecursionError:
        raise _too_deep(max_depth) from None
    except ValueError as exc:
        if isinstance(exc, InvalidMessageError):
            raise
        raise InvalidMessageError(
            f"the body is not valid JSON ({exc.__class__.__name__} at {_where(exc)})",
            field="body",
        ) from None
    _check_tree(value, max_depth)
    return value


def _where(exc: ValueError) -> str:
    pos = getattr(exc, "pos", None)
    return f"character {pos}" if pos is not None else "the start"


def _too_deep(max_depth: int) -> InvalidMessageError:
    return InvalidMessageError(
        f"the body nests arrays/objects more than {max_depth} deep", field="body"
    )


def _check_tree(value: Any, max_depth: int) -> None:
    """Depth and string checks without recursion: an explicit stack of (value, depth, field)."""
    stack: list[tuple[Any, int, str]] = [(value, 0, "body")]
    while stack:
        item, depth, field = stack.pop()
        if isinstance(item, str):
            found = _NOT_TEXT.search(item)
            if found and found.group() == "\x00":
                raise InvalidMessageError("must not contain NUL (\\u0000)", field=field)
            if found:
                raise InvalidMessageError(
                    "holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text",
                    field=field,
                )
            continue
        if isinstance(item, dict | list):
            depth += 1
            if depth > max_depth:
                raise _too_deep(max_depth)
            if isinstance(item, dict):
                for key, child in item.items():
                    # the body's own keys name the field; a key that cannot be one is "body"
                    name = key if depth == 1 and key.isidentifier() else field
                    stack.append((key, depth, name))
                    stack.append((child, depth, name))
            else:
                stack.extend((child, depth, field) for child in item)


def refuse_nul(value: str | None, field: str) -> None:
    """NUL fits neither a PostgreSQL text column nor a header: refuse it (400)."""
    if value is not None and "\x00" in value:
        raise InvalidMessageError("must not contain NUL (\\u0000)", field=field)


# -- POST /api/v1/messages ------------------------------------------------------------------


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidMessageError(f"must be a string, not {_json_type(value)}", field=name)
    return value


def _optional_bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidMessageError(f"must be true or false, not {_json_type(value)}", field=name)
    return value


def _addresses(body: dict[str, Any], name: str) -> list[str]:
    value = body.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise InvalidMessageError(
        f"must be a string or a list of strings, not {_json_type(value)}", field=name
    )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _headers(body: dict[str, Any]) -> list[tuple[str, str]]:
    headers = body.get("headers")
    if headers is None:
        return []
    if not isinstance(headers, dict):
        raise InvalidMessageError(
            f"must be an object of header names to strings, not {_json_type(headers)}",
            field="headers",
        )
    for name, value in headers.items():
        if not isinstance(value, str):
            raise InvalidMessageError(
                f"the value of {name!r} must be a string, not {_json_type(value)}",
                field="headers",
            )
    return list(headers.items())


def _attachments(body: dict[str, Any]) -> list[Any]:
    from ..message import Attachment

    items = body.get("attachments")
    if items is None:
        return []
    if not isinstance(items, list):
        raise InvalidMessageError(
            f"must be an array of objects, not {_json_type(items)}", field="attachments"
        )
    attachments = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidMessageError(
                f"#{index} must be an object, not {_json_type(item)}", field="attachments"
            )
        unknown = sorted(set(item) - set(_ATTACHMENT_FIELDS))
        if unknown:
            raise InvalidMessageError(
                f"#{index}: unknown key(s) {', '.join(map(repr, unknown))} "
                f"(known: {', '.join(_ATTACHMENT_FIELDS)})",
                field="attachments",
            )
        filename = item.get("filename")
        if not isinstance(filename, str) or not filename:
            raise InvalidMessageError(
                f"#{index} needs a filename (a non-empty string)", field="attachments"
            )
        content_b64 = item.get("content_base64", "")
        if not isinstance(content_b64, str):
            raise InvalidMessageError(
                f"#{index}: content_base64 must be a string, not {_json_type(content_b64)}",
                field="attachments",
            )
        content_type = item.get("content_type")
        if content_type is not None and not isinstance(content_type, str):
            raise InvalidMessageError(
                f"#{index}: content_type must be a string, not {_json_type(content_type)}",
                field="attachments",
            )
        try:
            content = base64.b64decode(content_b64, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidMessageError(
                f"#{index}: content_base64 is not base64", field="attachments"
            ) from None
        attachments.append(
            Attachment(filename=filename, content=content, content_type=content_type)
        )
    return attachments


def _send_at(body: dict[str, Any], lifetime_s: float) -> dt.datetime | None:
    value = body.get("send_at")
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidMessageError(
            f"must be an ISO 8601 date-time string, not {_json_type(value)}", field="send_at"
        )
    when = parse_time(value, "send_at")
    assert when is not None
    try:
        when + dt.timedelta(seconds=lifetime_s)
    except OverflowError:
        raise InvalidMessageError("is too far in the future", field="send_at") from None
    return when


def parse_time(value: str | None, field: str) -> dt.datetime | None:
    """An ISO 8601 date or date-time in UTC (a time without offset is taken as UTC)."""
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidMessageError(
            f"{value!r} is not an ISO 8601 date or time", field=field
        ) from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=dt.UTC)
    try:
        return parsed.astimezone(dt.UTC)
    except OverflowError:
        raise InvalidMessageError(f"{value!r} is out of range", field=field) from None


def _metadata(body: dict[str, Any]) -> dict[str, Any] | None:
    metadata = body.get("metadata")
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidMessageError(
            f"must be an object, not {_json_type(metadata)}", field="metadata"
        )
    encoded = json.dumps(metadata, ensure_ascii=False)
    if len(encoded.encode("utf-8")) > METADATA_MAX_BYTES:
        raise InvalidMessageError(
            f"is over {METADATA_MAX_BYTES} bytes as JSON; keep it to a few labels",
            field="metadata",
        )
    tag = metadata.get(TAG_KEY)
    if tag is not None and not (isinstance(tag, str) and len(tag) <= TAG_MAX_CHARS):
        raise InvalidMessageError(
            f"{TAG_KEY} must be a string of at most {TAG_MAX_CHARS} characters",
            field="metadata",
        )
    return metadata


def _check_body(body: Any, known: tuple[str, ...]) -> None:
    """A request body must be a JSON object of ``known`` fields only."""
    if not isinstance(body, dict):
        raise InvalidMessageError(
            f"the body must be a JSON object, not {_json_type(body)}", field="body"
        )
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise InvalidMessageError(
            f"unknown field(s): {', '.join(map(repr, unknown))} (known: {', '.join(known)})",
            field="body",
        )


def enqueue_args(body: Any, *, lifetime_s: float) -> dict[str, Any]:
    """The JSON body of ``POST /api/v1/messages`` as ``enqueue(message, **rest)`` arguments.

    Raises ``InvalidMessageError`` naming the field for any value of the
    wrong JSON type, any unknown field, and what the store cannot hold.
    The message itself (addresses, header values, sizes) is then checked by
    ``Message`` as for every other caller. ``null`` is the same as absent.
    """
    from ..message import Message

    _check_body(body, ENQUEUE_FIELDS)
    strings = {
        name: _optional_str(body, name)
        for name in (
            "sender",
            "subject",
            "text",
            "html",
            "relay",
            "idempotency_key",
            "list_id",
            "priority",
        )
    }
    relay = strings["relay"]
    if relay is not None and not RELAY_NAME.fullmatch(relay):
        raise InvalidMessageError("1 to 64 letters, digits, '.', '_' or '-'", field="relay")
    key = strings["idempotency_key"]
    if key is not None and (not 0 < len(key) <= 255 or _CONTROL.search(key)):
        raise InvalidMessageError(
            "must be 1 to 255 characters, none of them control characters",
            field="idempotency_key",
        )
    message = Message(
        sender=strings["sender"],
        to=_addresses(body, "to"),
        cc=_addresses(body, "cc"),
        bcc=_addresses(body, "bcc"),
        reply_to=_addresses(body, "reply_to"),
        subject=strings["subject"] or "",
        text=strings["text"],
        html=strings["html"],
        headers=_headers(body),
        attachments=_attachments(body),
    )
    return {
        "message": message,
        "relay": relay,
        "send_at": _send_at(body, lifetime_s),
        "idempotency_key": key,
        "metadata": _metadata(body),
        "list_id": strings["list_id"],
        "priority": strings["priority"],  # the word is checked by api.enqueue, refused whole
        "unsubscribe": _optional_bool(body, "unsubscribe"),
    }


def suppression_args(body: Any) -> dict[str, Any]:
    """The JSON body of ``POST /api/v1/suppressions`` as ``suppress(**args)`` arguments;
    the values themselves are checked by ``api.suppress``."""
    _check_body(body, SUPPRESSION_FIELDS)
    args = {name: _optional_str(body, name) for name in SUPPRESSION_FIELDS}
    if args["address"] is None:
        raise InvalidMessageError("an address is required", field="address")
    if args["reason"] is None:
        del args["reason"]
    return args
