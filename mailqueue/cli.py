"""The ``mailqueue`` command: a stable interface that scripts and ops rely on.

Commands parse input, call one service, and turn domain errors into exit
codes: 0 done, 1 not found or nothing to do (``retry`` and ``cancel`` that
changed nothing), 2 bad input (``InvalidMessageError``, a usage error, a value
outside the allowed ones, an ambiguous id prefix) or a configuration or
connection mistake (``ConfigError``: an unknown ``MAILQUEUE_*`` name, a bad
value or URL, a database that cannot be reached, has no tables or needs a
driver that is not installed, a port in use; and ``check`` that found a
problem), 3 ``send --now`` and a recipient was refused, each with one line on
stderr (``error: <field>: <reason>``), never a traceback (``--debug`` shows
it). ``--json`` output is meant for scripts and never holds a secret.

Wherever a message id goes (``status``, ``retry``, ``cancel``, ``list
--before``) a unique prefix of at least 8 hex digits will do.

Whatever came from a message, a recipient, a relay or the database is shown
through :func:`shown` and as Rich ``Text``, never as Rich markup: a subject
``[/bold]`` or ``[link=…]`` is printed as written, and control characters
(ESC, CR, C1, bidi overrides) are printed escaped, so stored mail cannot
restyle, break or rewrite the operator's terminal. ``--json`` escapes them
as JSON does.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click

from . import api
from .config import DEV_PORT, get_settings
from .errors import ConfigError, InvalidMessageError, NotFoundError, SMTPError
from .present import (
    messages_table,
    print_status,
    relays_table,
    shown,
    stats_table,
    stats_watch_view,
)
from .statuses import MessageStatus

__all__ = ["main", "shown"]


class _Failed(click.ClickException):
    """Exit 2 with one line on stderr: ``error: <what>: <reason>``."""

    exit_code = 2

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {shown(self.message)}", file=file, err=True)


class _NotFound(_Failed):
    """Exit 1 with one line: the message asked for does not exist."""

    exit_code = 1


_NOTHING_TO_DO = 1
"""``retry`` and ``cancel`` that changed nothing (as for an id that is not found)."""

_debug = False
"""``--debug``: configuration and connection errors keep their traceback."""

_EXTRAS = {"psycopg": "postgres", "psycopg2": "postgres", "redis": "redis", "uvicorn": "web"}


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """Refusals become exit 2 (1: not found) with one line, never a traceback."""
    import sqlalchemy.exc

    try:
        yield
    except _Failed:
        raise
    except ConfigError as exc:
        if _debug:
            raise
        raise _Failed(str(exc)) from None
    except sqlalchemy.exc.SQLAlchemyError as exc:  # a database mistake met mid-command
        if _debug:
            raise
        from .migrate import database_error

        raise _Failed(str(database_error(exc))) from None
    except ModuleNotFoundError as exc:
        module = (exc.name or "").split(".")[0]
        if _debug or module not in _EXTRAS:
            raise
        raise _Failed(
            f"the module {module!r} is not installed: pip install 'mailqueue[{_EXTRAS[module]}]' "
            "(from a checkout: pip install '.[" + _EXTRAS[module] + "]')"
        ) from None
    except InvalidMessageError as exc:
        raise _Failed(str(exc)) from None
    except NotFoundError as exc:
        raise _NotFound(str(exc)) from None
    except click.exceptions.NoArgsIsHelpError:
        raise
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        raise _Failed(exc.format_message() + hint) from None


class _Group(click.Group):
    """The ``mailqueue`` group: every command's errors go through ``_one_line_errors``."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with _one_line_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_errors():
            return super().invoke(ctx)


_PORT = click.IntRange(0, 65535)
"""A TCP port (0: any free one)."""

_BIND_ERRORS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)


@contextlib.contextmanager
def _binding(option: str) -> Iterator[None]:
    """A port that cannot be listened on (in use, not ours, no such address) is exit 2."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _BIND_ERRORS:
            raise
        reason = exc.strerror or str(exc)
        raise _Failed(
            f"{option}: cannot listen: {reason}; stop what uses that port or give another {option}"
        ) from None


def _port_free(host: str, port: int, option: str) -> None:
    """Refuse before starting a server on a port something else holds."""
    import socket

    with _binding(option):
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))


def _full_id(value: str) -> str:
    """A message id given whole or by a unique prefix (at least 8 hex digits)."""
    return api.resolve_id(value)


def _relay_name(value: str | None, option: str) -> str | None:
    """A relay name that is configured or still has waiting messages, else exit 2
    naming the ones that are."""
    if value is None:
        return None
    settings = get_settings()
    known = {r.name for r in settings.all_relays} | {"default"}
    if value in known:
        return value
    waiting = {d.relay for d in api.queue_depth()}
    if value in waiting:
        return value
    names = ", ".join(sorted(known | waiting))
    raise click.BadParameter(f"no relay named {value!r} (known: {names})", param_hint=option)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _ensure_schema() -> None:
    """Before a command that writes: on SQLite, create or upgrade the tables
    silently; any other database must have been migrated (``mailqueue migrate``),
    else one line says so and the command exits 2.
    """
    url = get_settings().database_url
    if url.startswith("sqlite"):
        from .migrate import upgrade

        upgrade(url)
    _require_schema()


def _require_schema() -> None:
    """Before a command that reads the tables: exit 2 with one line when the
    database cannot be reached, has no mailqueue tables (a SQLite file that
    does not exist is not created) or is at another revision than the code."""
    from .migrate import require_schema

    require_schema()


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level to stderr.")
@click.option(
    "--debug", is_flag=True, help="Show the traceback of configuration and connection errors."
)
@click.version_option(package_name="mailqueue")
def cli(verbose: bool, debug: bool) -> None:
    """A durable mail delivery queue (configure with MAILQUEUE_* variables).

    MAILQUEUE_LOG_JSON=1 logs JSON lines; MAILQUEUE_METRICS_PORT makes `worker`
    and `scheduler` serve Prometheus metrics on that port, on 127.0.0.1 unless
    MAILQUEUE_METRICS_ADDR names another address.
    """
    from .logging_setup import configure_logging

    global _debug
    _debug = debug
    configure_logging(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


@cli.command()
def migrate() -> None:
    """Create or upgrade the tables (Alembic upgrade to head)."""
    from .config import hide_password
    from .migrate import upgrade

    upgrade()
    click.echo(f"database at head: {hide_password(get_settings().database_url)}")


# RFC 5322 field name: printable US-ASCII but ':' (and so no space or control).
_FIELD_NAME = re.compile(r"[!-9;-~]+")


def _header(value: str) -> tuple[str, str]:
    name, sep, rest = value.partition(":")
    if not sep:
        raise click.BadParameter(f"{value!r} is not 'Name: value'", param_hint="--header")
    name = name.strip(" \t")
    if not _FIELD_NAME.fullmatch(name):
        raise click.BadParameter(
            f"{name!r} is not a header name (printable ASCII, no spaces, no ':')",
            param_hint="--header",
        )
    # Only blanks are trimmed: a line break left in the value is refused, not dropped.
    return name, rest.strip(" \t")


@contextlib.contextmanager
def _reading(path: str | Path, field: str) -> Iterator[None]:
    """A file given on the command line that cannot be read is bad input of ``field``."""
    try:
        yield
    except OSError as exc:
        raise InvalidMessageError(
            f"cannot read {str(path)!r}: {exc.strerror}", field=field
        ) from None
    except UnicodeDecodeError as exc:
        raise InvalidMessageError(
            f"{str(path)!r} is not UTF-8 text ({exc.reason})", field=field
        ) from None


def _attachment(path: Path, field: str, **options: Any) -> Any:
    from .message import Attachment

    with _reading(path, field):
        return Attachment.from_path(path, **options)


def _send_at(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidMessageError(
            f"{value!r} is not an ISO 8601 date-time (e.g. 2026-05-01T09:00:00+02:00)",
            field="send_at",
        ) from None
    if when.tzinfo is None:
        raise InvalidMessageError(
            f"{value!r} has no UTC offset: add one (e.g. +02:00 or Z)", field="send_at"
        )
    return when


@cli.command()
@click.option("--from", "sender", required=True, help="From address, e.g. 'Ana <ana@x.org>'.")
@click.option("--to", multiple=True, help="Recipient (repeatable).")
@click.option("--cc", multiple=True, help="Cc recipient (repeatable).")
@click.option("--bcc", multiple=True, help="Bcc recipient (repeatable; never in headers).")
@click.option("--reply-to", multiple=True, help="Reply-To address (repeatable).")
@click.option("--subject", default="", help="Subject (any language).")
@click.option("--text", help="Plain-text body ('-' reads standard input).")
@click.option("--html", help="HTML body ('@file.html' reads a file).")
@click.option(
    "--eml",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Send a ready-made RFC 5322 message file as it is (Bcc removed).",
)
@click.option(
    "--attach",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Attach a file (repeatable).",
)
@click.option(
    "--inline",
    multiple=True,
    metavar="[CID=]FILE",
    help="An image for the HTML, referenced as cid:CID (default CID: the file name).",
)
@click.option(
    "--header", "headers", multiple=True, help="Custom header 'Name: value' (repeatable)."
)
@click.option("--sender", "sender_header", help="Sender header (who sent it on From's behalf).")
@click.option("--envelope-from", help="MAIL FROM, when it differs from From ('' for <>).")
@click.option("--envelope-to", multiple=True, help="RCPT TO instead of To+Cc+Bcc (repeatable).")
@click.option("--charset", default="utf-8", show_default=True, help="Charset of text bodies.")
@click.option(
    "--text-subtype", default="plain", show_default=True, help="text/<subtype> of --text."
)
@click.option(
    "--now",
    is_flag=True,
    help="Send at once without the queue; print each recipient's reply (exit 3 if any refused).",
)
@click.option("--relay", help="Named relay to send through (default: the default relay).")
@click.option(
    "--priority",
    type=click.Choice(["high", "normal", "bulk"], case_sensitive=False),
    default=None,
    help="Lane: high goes before the others (password resets), bulk after (newsletters); "
    "default normal.",
)
@click.option(
    "--send-at",
    metavar="WHEN",
    help="Keep the message until then: ISO 8601 with a UTC offset (2026-05-01T09:00+02:00).",
)
@click.option(
    "--list-id",
    metavar="ID",
    help="The mailing list it belongs to (RFC 2919, news.example.com): adds List-Id, "
    "and list:<ID> suppressions apply.",
)
@click.option(
    "--unsubscribe",
    is_flag=True,
    help="Give each recipient a one-click List-Unsubscribe link (RFC 8058; needs "
    "MAILQUEUE_UNSUBSCRIBE_URL; one SMTP transaction per recipient).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def send(
    sender: str,
    to: tuple[str, ...],
    cc: tuple[str, ...],
    bcc: tuple[str, ...],
    reply_to: tuple[str, ...],
    subject: str,
    text: str | None,
    html: str | None,
    eml: Path | None,
    attach: tuple[Path, ...],
    inline: tuple[str, ...],
    headers: tuple[str, ...],
    sender_header: str | None,
    envelope_from: str | None,
    envelope_to: tuple[str, ...],
    charset: str,
    text_subtype: str,
    now: bool,
    relay: str | None,
    priority: str | None,
    send_at: str | None,
    list_id: str | None,
    unsubscribe: bool,
    as_json: bool,
) -> None:
    """Enqueue one message and print its id (or, with --now, send it and print the replies)."""
    from .message import Message

    if text == "-":
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError as exc:
            raise InvalidMessageError(
                f"standard input is not UTF-8 text ({exc.reason})", field="text"
            ) from None
    if html and html.startswith("@"):
        with _reading(html[1:], "html"):
            html = Path(html[1:]).read_text(encoding="utf-8")
    if eml is not None and (text or html or attach or inline or subject):
        raise click.UsageError(
            "--eml sends the file as it is: drop --subject/--text/--html/--attach/--inline"
        )
    if eml is None and not (subject or text or html or attach or inline):
        raise click.UsageError(
            "nothing to send: give --subject and a body (--text, --html, --attach), or --eml FILE"
        )
    raw_eml = None
    if eml is not None:
        with _reading(eml, "eml"):
            raw_eml = eml.read_bytes()
    when = _send_at(send_at)
    if now and when is not None:
        raise click.UsageError("--now sends at once: drop --send-at")
    if now and priority is not None:
        raise click.UsageError("--now sends at once, without the queue's lanes: drop --priority")
    if now and (list_id or unsubscribe):
        raise click.UsageError("--now sends without the queue: drop --list-id/--unsubscribe")
    message = Message(
        sender=sender,
        to=list(to),
        cc=list(cc),
        bcc=list(bcc),
        reply_to=list(reply_to),
        sender_header=sender_header,
        subject=subject,
        text=text,
        html=html,
        text_subtype=text_subtype,
        charset=charset,
        attachments=[_attachment(p, "attach") for p in attach] + [_inline(v) for v in inline],
        headers=[_header(h) for h in headers],
        envelope_from=envelope_from,
        envelope_to=list(envelope_to) or None,
        eml=raw_eml,
    )
    if now:
        _send_now(message, as_json, relay)
        return
    _ensure_schema()
    message_id = api.enqueue(
        message,
        relay=relay,
        send_at=when,
        priority=priority,
        list_id=list_id,
        unsubscribe=unsubscribe,
    )
    _echo_json({"id": message_id}) if as_json else click.echo(message_id)


def _inline(value: str) -> Any:
    cid, sep, path = value.partition("=")
    if not sep:
        cid, path = "", value
    file = Path(path)
    if not file.is_file():
        raise click.BadParameter(f"{path!r} is not a file", param_hint="--inline")
    return _attachment(file, "inline", inline=True, content_id=cid or file.name)


def _send_now(message: Any, as_json: bool, relay: str | None) -> None:
    try:
        result = api.send_now(message, relay=relay)
    except SMTPError as exc:  # the session itself failed: TLS, AUTH, unreachable
        if as_json:
            _echo_json({"error": type(exc).__name__, "code": exc.code, "reply": exc.reply})
        click.echo(f"error: {type(exc).__name__}: {shown(exc)}", err=True)
        sys.exit(3)
    rows = [
        {
            "address": r.address,
            "status": r.status,
            "code": r.code,
            "enhanced_code": r.enhanced_code,
            "reply": r.reply,
        }
        for r in result.recipients
    ]
    if as_json:
        _echo_json(
            {
                "data_code": result.data_code,
                "data_reply": result.data_reply,
                "error": type(result.error).__name__ if result.error else None,
                "recipients": rows,
            }
        )
    else:
        for row in rows:
            click.echo(
                f"{row['status']:<9} {row['code'] or '-':<4} {shown(row['address'])}  "
                f"{shown(row['reply'])}"
            )
        if result.data_code is not None:
            click.echo(f"DATA: {result.data_code} {shown(result.data_reply)}")
        if result.error is not None:
            click.echo(f"error: {shown(result.error)}", err=True)
    if result.rcpt_failed:
        sys.exit(3)


@cli.command()
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes (default: CPUs).",
)
@click.option(
    "-P",
    "--pool",
    "pool_kind",
    default="prefork",
    type=click.Choice(["prefork", "solo", "threads"]),
    help="Celery execution pool.",
)
@click.option(
    "-l",
    "--loglevel",
    default="INFO",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False),
    help="Celery log level.",
)
@click.option(
    "--check-health",
    is_flag=True,
    help="Start nothing: exit 0 if the worker writing MAILQUEUE_HEALTH_FILE is consuming, "
    "1 if not (a container healthcheck).",
)
@click.option(
    "--max-age",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="With --check-health: oldest heartbeat (seconds) still healthy.",
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(
    concurrency: int | None,
    pool_kind: str,
    loglevel: str,
    check_health: bool,
    max_age: float,
    celery_args: tuple[str, ...],
) -> None:
    """Start a Celery worker that delivers queued mail (extra args go to Celery).

    It consumes the three priority lanes' queues (<queue>.high, <queue>,
    <queue>.bulk), higher lanes first. It exits 0 only when asked to stop
    (SIGTERM, SIGINT); 1 when its broker
    consumer died or did not consume for MAILQUEUE_WORKER_STALL_S seconds
    (default 60), so that its supervisor restarts it.
    """
    from .logging_setup import log_startup
    from .worker import liveness

    if check_health:
        healthy, said = liveness.check_health(liveness.health_file(), max_age)
        click.echo(said, err=not healthy)
        sys.exit(0 if healthy else 1)
    try:
        liveness.stall_s()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    from .worker.app import get_app

    settings = get_settings()
    logging.getLogger("mailqueue").setLevel(loglevel.upper())
    log_startup("worker", settings)
    _check_broker(settings.broker_url)
    from .smtp.dkim import load_signer

    load_signer(settings)  # a DKIM key that cannot be read is exit 2 here, not in a child
    _ensure_schema()
    _serve_metrics(multiprocess=True)
    from .priority import lane_queues

    # Every lane's queue; the order they are taken in is the transport's (worker/lanes.py).
    queues = ",".join(lane_queues(settings.queue_name))
    argv = ["worker", f"--loglevel={loglevel}", f"--pool={pool_kind}", "-Q", queues]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    sys.exit(liveness.run_worker(get_app(), [*argv, *celery_args]))


def _check_broker(url: str) -> None:
    """A broker URL kombu has no transport for is exit 2 (reaching it is Celery's job:
    it retries with backoff and logs each attempt)."""
    from kombu import Connection

    from .config import hide_password

    try:
        Connection(url).transport  # noqa: B018 - resolves the transport class, connects nothing
    except KeyError as exc:
        raise ConfigError(
            f"MAILQUEUE_BROKER_URL={hide_password(url)!r}: {exc.args[0]} (use redis://host:6379/0, "
            "amqp://user@host// or sqla+sqlite:////absolute/path.db)",
            name="MAILQUEUE_BROKER_URL",
        ) from None


@cli.command()
def scheduler() -> None:
    """Dispatch due, deferred and orphaned messages, forever."""
    from .logging_setup import log_startup
    from .scheduler import run_scheduler

    logging.getLogger("mailqueue").setLevel(logging.INFO)
    log_startup("scheduler", get_settings())
    _ensure_schema()
    _serve_metrics(multiprocess=False)
    run_scheduler()


def _serve_metrics(*, multiprocess: bool) -> None:
    """Serve Prometheus metrics when MAILQUEUE_METRICS_PORT is set.

    A worker's prefork children write multiprocess files that its parent
    serves (PROMETHEUS_MULTIPROC_DIR, or a fresh folder under the temp dir).
    """
    import os
    import tempfile

    from . import metrics

    try:
        port = metrics.metrics_port()
    except ValueError:
        raise click.UsageError("MAILQUEUE_METRICS_PORT must be a port number") from None
    if port is None:
        return
    if multiprocess:
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.path.join(
            tempfile.gettempdir(), f"mailqueue-metrics-{port}"
        )
        metrics.enable_multiprocess(directory)
    metrics.serve(port)


@cli.command()
@click.argument("message_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--history", is_flag=True, help="Also every attempt's result per recipient.")
def status(message_id: str, as_json: bool, history: bool) -> None:
    """Show one message and each recipient's outcome."""
    from rich.console import Console

    _require_schema()
    message_id = _full_id(message_id)
    info = api.get_status(message_id)
    attempts = api.get_attempts(message_id) if history else []
    if as_json:
        data = info.to_dict()
        if history:
            data["history"] = [a.to_dict() for a in attempts]
        _echo_json(data)
        return
    print_status(Console(), info, attempts if history else None)


@cli.command("list")
@click.option(
    "--status",
    "status_",
    type=click.Choice([s.value for s in MessageStatus]),
    help="Only messages with this status.",
)
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--before", help="Page: messages older than this id (or a unique prefix of it).")
@click.option("--relay", help="Only messages for this relay.")
@click.option("--sender", help="Only messages with this envelope sender.")
@click.option("--recipient", help="Only messages to this address.")
@click.option("--tag", help="Only messages enqueued with metadata {'tag': TAG}.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_(
    status_: str | None,
    limit: int,
    before: str | None,
    relay: str | None,
    sender: str | None,
    recipient: str | None,
    tag: str | None,
    as_json: bool,
) -> None:
    """List messages, newest first (ids in full: give any unique 8+ digit prefix elsewhere)."""
    from rich.console import Console

    _require_schema()
    if before is not None:
        before = _full_id(before)
    relay = _relay_name(relay, "--relay")
    if relay or sender or recipient or tag:
        filters = api.Filters(
            status=status_, relay=relay, sender=sender, recipient=recipient, tag=tag
        )
        rows = api.search(filters, limit=limit, before=before)
    else:
        rows = api.list_messages(status=status_, limit=limit, before=before)
    if as_json:
        _echo_json([r.to_dict() for r in rows])
        return
    Console().print(messages_table(rows), soft_wrap=False)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="Refresh until interrupted (Ctrl-C).")
@click.option(
    "--interval",
    type=click.FloatRange(min=0, min_open=True),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes.",
)
@click.option(
    "--count", type=click.IntRange(min=1), default=None, hidden=True, help="Stop after N refreshes."
)
def stats(as_json: bool, watch: bool, interval: float, count: int | None) -> None:
    """Counts per message status and per recipient status (--watch refreshes)."""
    _require_schema()
    if not watch:
        data: dict[str, Any] = dict(api.stats())
        paused = [r for r in api.relays() if r["paused"]]
        data["paused_relays"] = [
            {k: r[k] for k in ("name", "paused_until", "last_error", "last_reply")} for r in paused
        ]
        if as_json:
            _echo_json(data)
            return
        from rich.console import Console

        Console().print(stats_table(data))
        for r in paused:
            click.secho(
                shown(
                    f"relay {r['name']} PAUSED until {r['paused_until']}: {r['last_error']}: "
                    f"{r['last_reply']}"
                ),
                fg="red",
                err=True,
            )
        return
    _watch_stats(as_json, interval, count)


def _watch_stats(as_json: bool, interval: float, count: int | None) -> None:
    import time

    from rich.console import Console
    from rich.live import Live

    def view() -> Any:
        data = api.stats()
        return data, stats_watch_view(data, api.queue_depth(), interval)

    n = 0
    if as_json:  # one JSON object per line, for scripts that follow along
        while count is None or n < count:
            data = dict(api.stats())
            depth = [
                {
                    "relay": d.relay,
                    "waiting": d.waiting,
                    "due": d.due,
                    "oldest_due_age_s": round(d.oldest_due_age_s, 3),
                }
                for d in api.queue_depth()
            ]
            click.echo(
                json.dumps({"time": time.time(), **data, "queue_depth": depth}, sort_keys=True)
            )
            n += 1
            if count is None or n < count:
                time.sleep(interval)
        return
    console = Console()
    with Live(view()[1], console=console, auto_refresh=False) as live:
        n = 1
        while count is None or n < count:
            time.sleep(interval)
            live.update(view()[1], refresh=True)
            n += 1


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--resume", metavar="NAME", help="Lift NAME's pause now (after fixing it).")
def relays(as_json: bool, resume: str | None) -> None:
    """The configured relays (never their secrets) and any pause after auth/TLS failures."""
    _require_schema()
    if resume is not None:
        try:
            resumed = api.resume_relay(resume)
        except KeyError as exc:
            raise click.BadParameter(str(exc.args[0]), param_hint="--resume") from None
        click.echo(f"relay {resume} resumed" if resumed else f"relay {resume} was not paused")
        return
    rows = api.relays()
    if as_json:
        _echo_json(rows)
        return
    from rich.console import Console

    Console().print(relays_table(rows))


def _duration(value: str | None, option: str) -> Any:
    if value is None:
        return None
    try:
        return api.parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


@cli.command()
@click.argument("message_id", required=False)
@click.option("--failed", "all_failed", is_flag=True, help="Every message with failed recipients.")
@click.option(
    "--since", help="With --failed: only recipients that failed this recently (15m, 1h, 2d)."
)
def retry(message_id: str | None, all_failed: bool, since: str | None) -> None:
    """Requeue failed and deferred recipients (sent ones are never resent)."""
    if bool(message_id) == all_failed:
        raise click.UsageError("give a message id or --failed")
    if since and not all_failed:
        raise click.UsageError("--since goes with --failed")
    window = _duration(since, "--since")
    _require_schema()
    if window is not None:
        count = api.retry_failed_since(window)
    elif all_failed:
        count = api.retry_failed()
    else:
        count = api.retry(_full_id(message_id or ""))
    click.echo(f"requeued {count} message(s)")
    if not count:
        sys.exit(_NOTHING_TO_DO)


@cli.command()
@click.argument("message_id", required=False)
@click.option("--relay", help="Cancel every waiting message on this relay instead.")
def cancel(message_id: str | None, relay: str | None) -> None:
    """Cancel the recipients of a message (or of a relay's waiting messages) not sent yet."""
    if bool(message_id) == bool(relay):
        raise click.UsageError("give a message id or --relay")
    _require_schema()
    if relay:
        relay = _relay_name(relay, "--relay") or ""
        count = api.cancel_relay(relay)
        click.echo(f"cancelled {count} message(s) on relay {relay}")
        if not count:
            sys.exit(_NOTHING_TO_DO)
        return
    message_id = _full_id(message_id or "")
    before = api.get_status(message_id)
    info = api.cancel(message_id)
    click.echo(f"{info.id} {info.status}")
    if not _cancelled_any(before, info):
        click.echo(f"nothing to cancel: {info.id} is {info.status}", err=True)
        sys.exit(_NOTHING_TO_DO)


def _cancelled_any(before: Any, after: Any) -> bool:
    """Did ``cancel`` change a recipient (from open to cancelled)?"""

    def cancelled(info: Any) -> int:
        return sum(r.status == "cancelled" for r in info.recipients)

    return cancelled(after) > cancelled(before)


@cli.command()
@click.option(
    "--older-than",
    "older_than",
    required=True,
    help="Delete terminal messages last updated longer ago than this (e.g. 30d).",
)
def purge(older_than: str) -> None:
    """Delete finished messages (sent, partial, failed, cancelled) and their recipients."""
    window = _duration(older_than, "--older-than")
    _require_schema()
    count = api.purge(window)
    click.echo(f"purged {count} message(s)")


CHECK_FAILED = 2
"""``mailqueue check`` found a problem (as for any configuration or connection mistake)."""

_RELAY_FIXES = {
    "AuthError": "check the relay's user name and password (password_file, or the URL's)",
    "UnknownAuthError": "set auth_mechanisms to one the relay offers, or ask its admin",
    "TLSError": "check starttls, tls_ca_file and the relay's certificate (its name and issuer)",
    "ConnectError": "check the relay's host and port, and that it is running and reachable",
    "ClusterLimitError": "check MAILQUEUE_LIMITS_REDIS_URL",
}


class _Check:
    """One line of ``mailqueue check``."""

    def __init__(self, name: str, ok: bool, detail: str, fix: str | None = None) -> None:
        self.name, self.ok, self.detail, self.fix = name, ok, detail, fix

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail, "fix": self.fix}

    def line(self) -> str:
        fix = f": {self.fix}" if self.fix else ""
        return shown(f"{'ok' if self.ok else 'PROBLEM':<8} {self.name}: {self.detail}{fix}")


def _check_settings() -> tuple[_Check, Any]:
    from .config import hide_password

    try:
        settings = get_settings()
    except ConfigError as exc:
        return _Check("settings", False, str(exc)), None
    names = ", ".join(r.name for r in settings.all_relays)
    return _Check(
        "settings",
        True,
        f"database {hide_password(settings.database_url)}, broker "
        f"{hide_password(settings.broker_url)}, relays {names}",
    ), settings


def _check_database(settings: Any) -> _Check:
    from .config import hide_password
    from .migrate import SchemaError, require_schema

    shown_url = hide_password(settings.database_url)
    try:
        require_schema(settings.database_url)
    except SchemaError as exc:
        return _Check("database", False, str(exc), None)
    except ConfigError as exc:
        return _Check("database", False, str(exc), "check MAILQUEUE_DATABASE_URL")
    return _Check("database", True, f"{shown_url} reachable, tables at the code's revision")


def _check_broker_reachable(settings: Any) -> _Check:
    import os

    from kombu import Connection
    from sqlalchemy.engine import make_url

    from .config import hide_password

    url = settings.broker_url
    shown_url = hide_password(url)
    try:
        _check_broker(url)
    except ConfigError as exc:
        return _Check("broker", False, str(exc), None)
    except Exception as exc:  # noqa: BLE001 - kombu's transport would not load (a missing extra)
        missing = exc.name if isinstance(exc, ImportError) else None
        module = missing or url.split(":", 1)[0].split("+")[0]
        extra = _EXTRAS.get(module.split(".")[0], "all")
        return _Check(
            "broker",
            False,
            f"{shown_url}: kombu cannot load its transport ({type(exc).__name__}: "
            f"{api.without_secrets(str(exc), url)})",
            f"pip install 'mailqueue[{extra}]' (from a checkout: pip install '.[{extra}]')",
        )
    if url.startswith("sqla+sqlite"):  # a file: check its folder, create nothing
        path = make_url(url[len("sqla+") :]).database or ""
        folder = os.path.dirname(os.path.abspath(path))
        if not os.access(folder, os.W_OK):
            return _Check(
                "broker",
                False,
                f"{shown_url}: the folder {folder} does not exist or cannot be written",
                "create it or set MAILQUEUE_BROKER_URL",
            )
        state = "exists" if os.path.exists(path) else "will be created by the first worker"
        return _Check("broker", True, f"{shown_url} ({os.path.abspath(path)} {state})")
    try:
        with Connection(url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is the answer
        return _Check(
            "broker",
            False,
            f"cannot reach {shown_url}: {type(exc).__name__}: {api.without_secrets(str(exc), url)}",
            "check MAILQUEUE_BROKER_URL and that the broker is running",
        )
    return _Check("broker", True, f"{shown_url} reachable")


def _check_relay(relay: Any) -> _Check:
    name = f"relay {relay.name}"
    try:
        seen = api.probe_relay(relay.name)
    except SMTPError as exc:
        said = f" (server said: {exc.code} {exc.reply or ''}".rstrip() + ")" if exc.code else ""
        return _Check(
            name,
            False,
            f"{type(exc).__name__}: {exc.reason}{said}",
            _RELAY_FIXES.get(type(exc).__name__, exc.hint),
        )
    except ConfigError as exc:
        return _Check(name, False, str(exc), None)
    how = "implicit TLS" if relay.implicit_tls else "STARTTLS"
    tls = f"{how} {seen['tls']}" if seen["tls"] else "no TLS"
    auth = f"AUTH as {seen['auth']!r}" if seen["auth"] else "no AUTH"
    return _Check(name, True, f"{seen['url']}: EHLO, {tls}, {auth}, QUIT (no message sent)")


def _check_cluster_redis(settings: Any) -> _Check | None:
    from .config import hide_password

    limited = [r.name for r in settings.all_relays if r.cluster_max_connections or r.rate_limit]
    url = settings.cluster_redis_url
    if not limited or url is None:  # (limits without Redis are refused by the settings)
        return None
    shown_url = hide_password(url)
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except ModuleNotFoundError:
        return _Check(
            "cluster limits",
            False,
            "the module 'redis' is not installed",
            "pip install 'mailqueue[redis]'",
        )
    except Exception as exc:  # noqa: BLE001 - any failure to connect is the answer
        return _Check(
            "cluster limits",
            False,
            f"cannot reach Redis at {shown_url}: {type(exc).__name__}: "
            f"{api.without_secrets(str(exc), url)}",
            "check MAILQUEUE_LIMITS_REDIS_URL and that Redis is running",
        )
    return _Check(
        "cluster limits", True, f"Redis at {shown_url} reachable (relays {', '.join(limited)})"
    )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def check(as_json: bool) -> None:
    """Check the settings, the database, the broker, each relay and Redis; send nothing.

    Each relay gets EHLO, STARTTLS or implicit TLS and AUTH as configured, then
    QUIT. One line per check; exit 0 when all pass, 2 when any does not.
    """
    first, settings = _check_settings()
    checks = [first]
    if settings is not None:
        checks.append(_check_database(settings))
        checks.append(_check_broker_reachable(settings))
        checks.extend(_check_relay(relay) for relay in settings.all_relays)
        redis_check = _check_cluster_redis(settings)
        if redis_check is not None:
            checks.append(redis_check)
    ok = all(c.ok for c in checks)
    if as_json:
        _echo_json({"ok": ok, "checks": [c.to_dict() for c in checks]})
    else:
        for c in checks:
            click.echo(c.line())
    if not ok:
        sys.exit(CHECK_FAILED)


@cli.command()
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default)."
)
@click.option(
    "--port",
    type=_PORT,
    default=DEV_PORT,
    show_default=True,
    help="Port to listen on (the default relay's port; 2525 was the default before).",
)
@click.option("--reject", multiple=True, help="Answer 550 to recipients matching this glob.")
@click.option("--defer", multiple=True, help="Answer 450 to recipients matching this glob.")
@click.option(
    "--max-size",
    type=click.IntRange(min=1),
    default=33554432,
    show_default=True,
    help="Largest message (SIZE).",
)
@click.option(
    "--maildir", type=click.Path(file_okay=False, path_type=Path), help="Also store mail here."
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False),
    help="Certificate (PEM) for STARTTLS and --tls-port.",
)
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="Its private key.")
@click.option("--tls-port", type=_PORT, help="Also listen with implicit TLS (smtps) here.")
@click.option(
    "--require-auth",
    "users",
    multiple=True,
    metavar="USER:PASS",
    help="Require AUTH (PLAIN, LOGIN, CRAM-MD5; offered over TLS only). Repeatable.",
)
@click.option("--pipelining", is_flag=True, help="Advertise ESMTP PIPELINING (RFC 2920).")
def devserver(
    host: str,
    port: int,
    reject: tuple[str, ...],
    defer: tuple[str, ...],
    max_size: int,
    maildir: Path | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_port: int | None,
    users: tuple[str, ...],
    pipelining: bool,
) -> None:
    """Run a local SMTP server that records mail (for development and tests)."""
    from .devserver import serve

    if (tls_port is not None or tls_key) and not tls_cert:
        raise click.UsageError("--tls-port and --tls-key need --tls-cert")
    credentials = {}
    for entry in users:
        user, sep, password = entry.partition(":")
        if not sep or not user:
            raise click.BadParameter("expected USER:PASS", param_hint="--require-auth")
        credentials[user] = password
    with _binding("--port" if tls_port is None else "--port/--tls-port"):
        serve(
            host=host,
            port=port,
            reject=reject,
            defer=defer,
            maildir=maildir,
            max_size=max_size,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_port=tls_port,
            users=credentials,
            pipelining=pipelining,
        )


@cli.command()
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default)."
)
@click.option("--port", type=_PORT, default=8025, show_default=True)
@click.option(
    "--token",
    envvar="MAILQUEUE_WEB_TOKEN",
    help="Access token for the page and API (env MAILQUEUE_WEB_TOKEN).",
)
@click.option(
    "--no-auth-on-loopback",
    "no_auth",
    is_flag=True,
    help="Allow access without a token; only when bound to 127.0.0.1/::1/localhost.",
)
@click.option(
    "--unsubscribe-only",
    is_flag=True,
    help="Serve only the one-click unsubscribe links (/u/…), no page or API: the "
    "process to expose to the internet (needs MAILQUEUE_UNSUBSCRIBE_SECRET, no token).",
)
def web(host: str, port: int, token: str | None, no_auth: bool, unsubscribe_only: bool) -> None:
    """Serve the status page and the JSON API (needs the 'web' extra)."""
    try:
        import uvicorn

        from .web.app import LOOPBACK_HOSTS, create_app
    except ImportError as exc:
        raise click.UsageError(
            f"the web page needs the 'web' extra: pip install 'mailqueue[web]' ({exc})"
        ) from None
    if unsubscribe_only:
        if no_auth:
            raise click.UsageError("--unsubscribe-only needs no --no-auth-on-loopback")
        if not get_settings().unsubscribe_secret:
            raise click.UsageError(
                "--unsubscribe-only serves links signed with MAILQUEUE_UNSUBSCRIBE_SECRET: "
                "set it (the same as the workers')"
            )
        token = None
    elif not token:
        if not no_auth:
            raise click.UsageError(
                "give --token (or MAILQUEUE_WEB_TOKEN), or --no-auth-on-loopback to run "
                "without one on 127.0.0.1"
            )
        if host not in LOOPBACK_HOSTS:
            raise click.UsageError(f"--no-auth-on-loopback needs a loopback --host, not {host}")
    elif no_auth:
        raise click.UsageError("--token and --no-auth-on-loopback exclude each other")
    from .logging_setup import log_startup

    log_startup("web", get_settings())
    _port_free(host, port, "--port")
    _ensure_schema()
    app = create_app(
        token=token or None, allow_anonymous=no_auth, unsubscribe_only=unsubscribe_only
    )
    what = "unsubscribe links only" if unsubscribe_only else "token" if token else "no auth"
    click.echo(f"mailqueue web on http://{host}:{port}/ ({what})")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


@cli.command()
@click.option(
    "--messages",
    type=click.IntRange(min=1),
    default=300,
    show_default=True,
    help="How many to enqueue.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("mailqueue-demo"),
    show_default=True,
    help="Fresh state goes here.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Worker processes.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=180.0,
    show_default=True,
    help="Give up after seconds.",
)
def demo(messages: int, workdir: Path, concurrency: int, timeout: float) -> None:
    """The whole loop on the embedded default: dev server, worker, scheduler, mail."""
    from .demo import run_demo

    sys.exit(run_demo(messages=messages, workdir=workdir, concurrency=concurrency, timeout=timeout))


@cli.group()
def bounces() -> None:
    """Read the bounces and complaints that come back (see docs/bounces.md)."""


@bounces.command("ingest")
@click.option(
    "--maildir",
    type=click.Path(file_okay=False, path_type=Path),
    help="A Maildir the MTA fills: reads new/, moves each report to cur/.",
)
@click.option(
    "--mbox",
    type=click.Path(dir_okay=False, path_type=Path),
    help="An mbox the MTA fills: reads it, moves its reports to <mbox>.done.",
)
def bounces_ingest(maildir: Path | None, mbox: Path | None) -> None:
    """Record and apply every report in a mailbox, then move it out of the way."""
    from .inbound import ingest_maildir, ingest_mbox

    if (maildir is None) == (mbox is None):
        raise click.UsageError("give one of --maildir or --mbox")
    _require_schema()
    try:
        outcome = ingest_maildir(maildir) if maildir is not None else ingest_mbox(mbox)  # type: ignore[arg-type]
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    applied = ", ".join(f"{n} {s}" for s, n in sorted(outcome.applied.items())) or "none changed"
    click.echo(
        f"{outcome.read} reports: {applied}; {outcome.unmatched} unmatched, "
        f"{outcome.unparsed} unparsed"
    )


@bounces.command("list")
@click.option("--unmatched", is_flag=True, help="Only reports tied to no row (unparsed too).")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@click.option("--before", type=int, help="Page: reports older than this id.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def bounces_list(unmatched: bool, limit: int, before: int | None, as_json: bool) -> None:
    """Reports that came back, newest first, with what they did or why not."""
    from .inbound import reports

    _require_schema()
    found = reports(unmatched=unmatched, limit=limit, before=before)
    if as_json:
        _echo_json([r.as_dict() for r in found])
        return
    for r in found:
        what = r.effect or r.reason or r.verdict or ""
        code = f" {r.enhanced_code}" if r.enhanced_code else ""
        click.echo(
            shown(
                f"{r.id:>8}  {r.received_at:%Y-%m-%d %H:%M:%S}  {r.kind:<9} "
                f"{r.address or '-'}{code}: {what}"
            )
        )


@bounces.command("serve")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default)."
)
@click.option("--port", type=_PORT, default=2526, show_default=True, help="Port to bind (0: any).")
@click.option(
    "--max-size",
    type=click.IntRange(min=1),
    default=10 * 1024 * 1024,
    show_default=True,
    help="Largest report accepted (bytes).",
)
@click.option(
    "--rate",
    type=click.IntRange(min=1),
    default=600,
    show_default=True,
    help="Reports one client address may send per minute (more: 451, retried).",
)
def bounces_serve(host: str, port: int, max_size: int, rate: int) -> None:
    """Take reports over SMTP for MAILQUEUE_BOUNCE_DOMAIN only, and record them."""
    from .bounceserver import serve
    from .config import get_settings

    if get_settings().bounce_domain is None:
        raise click.ClickException(
            "MAILQUEUE_BOUNCE_DOMAIN is not set: set it (and MAILQUEUE_BOUNCE_SECRET) to "
            "the domain whose mail this endpoint takes"
        )
    _require_schema()
    _serve_metrics(multiprocess=False)
    with _binding("--port"):
        serve(host, port, max_size=max_size, rate_per_minute=rate)


# -- the suppression list ----------------------------------------------------------------

_REASONS = click.Choice(["unsubscribed", "bounced", "complained", "manual"])
_SCOPE_HELP = "domain:<sender domain> or list:<list id> (default: everywhere)."


@cli.group()
def suppress() -> None:
    """The suppression list: addresses never sent to (checked when a worker claims mail)."""


@suppress.command("add")
@click.argument("address")
@click.option("--reason", type=_REASONS, default="manual", show_default=True)
@click.option("--scope", help=_SCOPE_HELP)
@click.option("--note", help="Free text kept with the entry.")
@click.option("--json", "as_json", is_flag=True, help="Print the entry as JSON.")
def suppress_add(
    address: str, reason: str, scope: str | None, note: str | None, as_json: bool
) -> None:
    """Add ADDRESS (an entry already there takes the new reason and note)."""
    _ensure_schema()
    entry = api.suppress(address, reason=reason, scope=scope, note=note)
    if as_json:
        _echo_json(entry.as_dict())
    else:
        click.echo(f"suppressed {entry.address} ({entry.reason}, {entry.scope or 'everywhere'})")


@suppress.command("remove")
@click.argument("address")
@click.option("--scope", help=_SCOPE_HELP)
def suppress_remove(address: str, scope: str | None) -> None:
    """Take ADDRESS off the list (exit 1 if it was not there)."""
    _require_schema()
    if not api.unsuppress(address, scope=scope):
        raise _NotFound(f"{address} is not suppressed in scope {scope or 'everywhere'}")
    click.echo(f"removed {address} ({scope or 'everywhere'})")


@suppress.command("list")
@click.option("--reason", type=_REASONS, help="Only entries with this reason.")
@click.option("--scope", help="Only entries of this scope ('' for everywhere).")
@click.option("--address", help="Only entries for this address.")
@click.option("--limit", type=click.IntRange(1, 10000), default=100, show_default=True)
@click.option("--before", type=int, help="Page: entries older than this id.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def suppress_list(
    reason: str | None,
    scope: str | None,
    address: str | None,
    limit: int,
    before: int | None,
    as_json: bool,
) -> None:
    """Entries, newest first."""
    _require_schema()
    entries = api.suppressions(
        reason=reason, scope=scope, address=address, limit=limit, before=before
    )
    if as_json:
        _echo_json([e.as_dict() for e in entries])
        return
    for e in entries:
        click.echo(
            shown(
                f"{e.id:>8}  {e.created_at:%Y-%m-%d %H:%M:%S}  {e.reason:<12}  "
                f"{e.scope or 'everywhere'}  {e.address}" + (f"  ({e.note})" if e.note else "")
            )
        )


@suppress.command("import")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
def suppress_import(file: str) -> None:
    """Add the entries of a CSV FILE ('-': standard input) with the header
    address,reason,scope,note; a bad row refuses the whole file (its line is named)."""
    _ensure_schema()

    def progress(n: int) -> None:
        click.echo(f"\rwritten {n}", nl=False, err=True)

    with _reading(file, "FILE"):
        if file == "-":
            count = api.import_suppressions(sys.stdin, progress=progress)
        else:
            with open(file, encoding="utf-8-sig", newline="") as fh:
                count = api.import_suppressions(fh, progress=progress)
    if count:
        click.echo("", err=True)
    click.echo(f"imported {count} entries")


@suppress.command("export")
@click.argument("file", required=False, type=click.Path(dir_okay=False, allow_dash=True))
def suppress_export(file: str | None) -> None:
    """Write every entry as CSV to FILE (default: standard output)."""
    _require_schema()
    if not file or file == "-":
        api.export_suppressions(sys.stdout)
        return
    try:
        with open(file, "w", encoding="utf-8", newline="") as out:
            count = api.export_suppressions(out)
    except OSError as exc:
        raise _Failed(f"cannot write {file!r}: {exc.strerror}") from None
    click.echo(f"exported {count} entries to {file}", err=True)


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # refusals: one line, see _one_line_errors
        exc.show()
        sys.exit(exc.exit_code)
