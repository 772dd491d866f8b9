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
from collections.abc import Mapping
from typing import Any

from .config import (
    HOME_NAME,
    Settings,
    hide_password,
    is_secret_parameter,
    legacy_default_files,
    mailqueue_home,
    setting_sources,
)

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


def _sqlite_file(url: str) -> str | None:
    """The file a ``sqlite:///`` or ``sqla+sqlite:///`` URL names, made absolute."""
    for prefix in ("sqlite:///", "sqla+sqlite:///"):
        if url.startswith(prefix):
            path = url.removeprefix(prefix).split("?", 1)[0]
            return os.path.abspath(path) if path and path != ":memory:" else None
    return None


def startup_lines(
    process: str, settings: Settings, environ: Mapping[str, str] | None = None
) -> list[tuple[int, str]]:
    """What ``process`` logs as it starts: the database, broker and relays it uses
    (passwords hidden), where each came from, the file of a SQLite URL, and a
    WARNING for each default that is an older version's file in the working
    directory (see ``config.default_urls``). ``(level, text)`` pairs."""
    env = os.environ if environ is None else environ
    sources = setting_sources(env)
    legacy = {
        what: path
        for what, path in legacy_default_files(env).items()
        if sources[what] == "default"
        and _sqlite_file(getattr(settings, f"{what}_url")) == str(path)
    }

    def where(what: str, url: str) -> str:
        file = _sqlite_file(url)
        source = sources[what]
        if what in legacy:
            source = "default of an older version, in the working directory"
        elif source == "default" and file and os.path.dirname(file) == str(mailqueue_home(env)):
            source = (
                f"default, in {HOME_NAME}" if env.get(HOME_NAME) else "default, user data folder"
            )
        return f"{hide_password(url)} ({source}{', file ' + file if file else ''})"

    relays = ", ".join(
        f"{r.name}={r.safe_url} ({sources.get('relay ' + r.name, 'default')})"
        for r in settings.all_relays
    )
    lines = [
        (
            logging.INFO,
            f"{process} starting: database {where('database', settings.database_url)}; "
            f"broker {where('broker', settings.broker_url)}; relays {relays}",
        )
    ]
    if legacy:
        home = mailqueue_home(env)
        files = " and ".join(str(p) for p in legacy.values())
        names = " and ".join(
            f"MAILQUEUE_{what.upper()}_URL={'sqla+' if what == 'broker' else ''}sqlite:///{p}"
            for what, p in legacy.items()
        )
        lines.append(
            (
                logging.WARNING,
                f"{process} uses {files}, left in the working directory by an older "
                f"mailqueue whose default was relative: a process started in another "
                f"directory uses {home} instead and never sees this mail. Either move "
                f"the file(s) into {home} (with every mailqueue process stopped), or "
                f"pin them in every process with {names}",
            )
        )
    if process in ("worker", "web") and settings.unsubscribe_url:
        if not settings.unsubscribe_secret:
            effect = (
                "messages queued with unsubscribe=True fail instead of going out"
                if process == "worker"
                else "unsubscribe links answer 503"
            )
            lines.append(
                (
                    logging.WARNING,
                    f"{process}: MAILQUEUE_UNSUBSCRIBE_URL is set but "
                    f"MAILQUEUE_UNSUBSCRIBE_SECRET is not, so {effect}: set the same "
                    "secret for the workers and mailqueue web (docs/bulk-senders.md)",
                )
            )
        elif process == "web":
            lines.append(
                (
                    logging.INFO,
                    f"web: one-click unsubscribe links {settings.unsubscribe_url.rstrip('/')}"
                    "/u/… are served without login (docs/bulk-senders.md)",
                )
            )
    return lines


def log_startup(process: str, settings: Settings) -> None:
    """Log :func:`startup_lines` (the INFO line is shown even when the CLI logs warnings only)."""
    if startup_log.getEffectiveLevel() > logging.INFO:
        startup_log.setLevel(logging.INFO)
    for level, text in startup_lines(process, settings):
        startup_log.log(level, "%s", text)
