"""Logging: plain text by default, JSON lines with ``MAILQUEUE_LOG_JSON=1``.

JSON records carry ``message_id``, ``recipient``, ``relay``, ``status``,
``smtp_code`` and ``attempt`` as fields when the log call has them (the
worker logs one record per recipient outcome, see ``log_attempt``). A filter
on every handler masks anything that looks like a password in a URL
(``scheme://user:secret@host``) or an ``AUTH``/``password=`` value, as a last
line of defence: mailqueue never logs secrets on purpose.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

from .config import Settings, hide_password, is_secret_parameter, setting_sources

__all__ = ["configure_logging", "json_enabled", "log_attempt", "log_startup", "SecretFilter"]

log = logging.getLogger("mailqueue.delivery")

_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S+")
_KEY_VALUE = re.compile(r"(?P<head>(?<![\w-])(?P<name>[\w-]+)\s*[=:]\s*)[^\s,;&]+", re.I)
_AUTH_LINE = re.compile(r"(?P<head>\bAUTH\s+(?:PLAIN|LOGIN|XOAUTH2)\s+)\S+", re.I)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def scrub(text: str) -> str:
    """``text`` with URL passwords and secret parameters (``hide_password``),
    ``password=…``-like values (the same names) and AUTH blobs masked."""
    text = _URL.sub(lambda m: hide_password(m.group()), text)
    text = _KEY_VALUE.sub(
        lambda m: m.group("head") + "***" if is_secret_parameter(m.group("name")) else m.group(),
        text,
    )
    return _AUTH_LINE.sub(lambda m: m.group("head") + "***", text)


class SecretFilter(logging.Filter):
    """Mask secrets in the formatted message and in string extras."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - leave broken records to the formatter
            return True
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD and isinstance(value, str):
                setattr(record, key, scrub(value))
        return True


_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime"}


def json_enabled(environ: dict[str, str] | None = None) -> bool:
    value = (environ if environ is not None else os.environ).get("MAILQUEUE_LOG_JSON", "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def _formatter(as_json: bool) -> logging.Formatter:
    if not as_json:
        return logging.Formatter(TEXT_FORMAT)
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s %(process)d",
        rename_fields={"levelname": "level", "name": "logger", "asctime": "time"},
        datefmt="%Y-%m-%dT%H:%M:%S%z",
    )


def configure_logging(level: int | str = logging.WARNING, *, as_json: bool | None = None) -> None:
    """One stderr handler on the root logger, text or JSON, with the secret filter."""
    as_json = json_enabled() if as_json is None else as_json
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_mailqueue", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._mailqueue = True  # type: ignore[attr-defined]
    handler.setFormatter(_formatter(as_json))
    handler.addFilter(SecretFilter())
    root.addHandler(handler)
    root.setLevel(level)


def log_attempt(message: Any, outcome: Any) -> None:
    """One record per recipient outcome of an attempt (INFO; failures at WARNING)."""
    if not log.isEnabledFor(logging.WARNING):
        return
    try:
        addresses = {r.id: r.address for r in message.recipients}
        for r in outcome.recipients:
            level = logging.WARNING if r.status == "failed" else logging.INFO
            if not log.isEnabledFor(level):
                continue
            log.log(
                level,
                "%s %s %s %s",
                message.id,
                addresses.get(r.recipient_id, "?"),
                r.status,
                f"{r.code or ''} {r.reply or r.error or ''}".strip(),
                extra={
                    "message_id": str(message.id),
                    "recipient": addresses.get(r.recipient_id),
                    "relay": message.relay,
                    "status": r.status,
                    "smtp_code": r.code,
                    "enhanced_code": r.enhanced_code,
                    "attempt": message.attempts,
                    "error": r.error,
                },
            )
    except Exception:  # noqa: BLE001 - logging never stops delivery
        logging.getLogger("mailqueue.metrics").debug("log_attempt failed", exc_info=True)


startup_log = logging.getLogger("mailqueue.startup")

_DEFAULT_RELATIVE = ("sqlite:///mailqueue.db", "sqla+sqlite:///mailqueue-broker.db")


def _sqlite_file(url: str) -> str | None:
    """The file a ``sqlite:///`` or ``sqla+sqlite:///`` URL names, made absolute."""
    for prefix in ("sqlite:///", "sqla+sqlite:///"):
        if url.startswith(prefix):
            path = url.removeprefix(prefix).split("?", 1)[0]
            return os.path.abspath(path) if path and path != ":memory:" else None
    return None


def startup_lines(
    process: str, settings: Settings, environ: dict[str, str] | None = None
) -> list[tuple[int, str]]:
    """What ``process`` logs as it starts: the database, broker and relays it uses
    (passwords hidden), where each came from, and a warning for a worker on the
    default relative SQLite files. ``(level, text)`` pairs."""
    sources = setting_sources(environ)

    def where(url: str, source: str) -> str:
        file = _sqlite_file(url)
        return f"{hide_password(url)} ({source}{', file ' + file if file else ''})"

    relays = ", ".join(
        f"{r.name}={r.safe_url} ({sources.get('relay ' + r.name, 'default')})"
        for r in settings.all_relays
    )
    lines = [
        (
            logging.INFO,
            f"{process} starting: database {where(settings.database_url, sources['database'])}; "
            f"broker {where(settings.broker_url, sources['broker'])}; relays {relays}",
        )
    ]
    relative = [
        (name, url)
        for name, url in (("database", settings.database_url), ("broker", settings.broker_url))
        if url in _DEFAULT_RELATIVE
    ]
    if process == "worker" and relative:
        what = " and ".join(f"{name} {url}" for name, url in relative)
        names = " and ".join(f"MAILQUEUE_{name.upper()}_URL" for name, _ in relative)
        lines.append(
            (
                logging.WARNING,
                f"worker runs on the default {what}, relative to the working directory "
                f"{os.getcwd()}: an app or scheduler started in another directory uses other "
                f"files and its mail never reaches this worker; set {names} (absolute paths) in "
                "every process",
            )
        )
    return lines


def log_startup(process: str, settings: Settings) -> None:
    """Log :func:`startup_lines` (the INFO line is shown even when the CLI logs warnings only)."""
    if startup_log.getEffectiveLevel() > logging.INFO:
        startup_log.setLevel(logging.INFO)
    for level, text in startup_lines(process, settings):
        startup_log.log(level, "%s", text)
