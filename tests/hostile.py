"""Hostile inputs (issue #15): one abstract case, one face per entry point, one judge.

A :class:`Case` says what a caller composes: sender, recipients, subject,
bodies, custom headers, attachments, per-message options. Each *face* hands
the case to one entry point the way a user of that entry point would write
it, and reports an :data:`Outcome`:

* :class:`Refused`: the entry point said no in its documented way
  (Python API and Flask: ``InvalidMessageError`` with a ``field``; CLI:
  exit code 2 and exactly one line on stderr; JSON API: HTTP 400 with
  ``{"error": "invalid", "field": ...}``; Django: a ``ValueError``, as
  Django's own SMTP backend raises for the same input);
* :class:`Delivered`: it accepted, and the message was delivered in-process
  (the worker's own code) to the built-in dev SMTP server, which reports
  MAIL FROM, the RCPT TO list and the DATA bytes it received;
* :class:`Accepted`: accepted and deliberately not delivered (a case whose
  only acceptable outcome is a refusal needs no delivery to be judged);
* :class:`Broken`: anything else: a raw exception, a traceback, a 500, a
  wrong exit code. Never acceptable.

:func:`judge` decides every outcome with the same rules: a refusal passes
(unless it names the wrong field of a limit), a delivery passes only when
nothing reached the wire that the caller did not name: no recipient, no
header, no header line, no body but the caller's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
import io
import json
import logging
import mimetypes
import re
import sys
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import mailqueue
from mailqueue.config import Settings, configure, settings_from_env
from mailqueue.devserver import DevServer, Received
from mailqueue.migrate import upgrade
from mailqueue.worker.service import Deliverer
from tests.conftest import Stack, _base_settings

Addr = str | tuple[str, str]

EVIL = "evil@attacker.test"
SENDER = "app@example.com"
ANA = "ana@example.org"
TEXT = "hello body"

# The headers mailqueue (or Django) writes on its own, once each.
ADDED_HEADERS = ("date", "message-id", "mime-version", "content-type", "content-transfer-encoding")
# What a MIME part (an attachment, an alternative) may carry.
PART_HEADERS = frozenset(
    {
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
        "content-id",
        "mime-version",
        "content-description",
    }
)
_BAD_CHARS = ("\r", "\n", "\0")


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Att:
    """An attachment as the caller gives it (``inline``: a cid: part of the HTML)."""

    filename: str = "note.txt"
    content: bytes = b"attached text"
    content_type: str | None = "text/plain"
    inline: bool = False
    content_id: str | None = None


@dataclass(frozen=True)
class Case:
    """What a caller composes, whatever the entry point.

    ``to`` is a list of entries (strings or ``(name, address)``), or one bare
    string. ``refuse``: a refusal is the only acceptable outcome. ``fields``:
    a refusal must name one of these fields (where the face reports one).
    ``options``: ``send_at``/``metadata`` as the entry point takes them.
    """

    name: str
    sender: Addr = SENDER
    to: Sequence[Addr] | str = (ANA,)
    cc: Sequence[Addr] = ()
    bcc: Sequence[Addr] = ()
    reply_to: Sequence[Addr] = ()
    subject: str = "Hello"
    text: str | None = TEXT
    html: str | None = None
    headers: Sequence[tuple[str, str]] = ()
    attachments: Sequence[Att] = ()
    text_subtype: str | None = None
    charset: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    refuse: bool = False
    fields: frozenset[str] | None = None

    def __str__(self) -> str:  # pytest ids
        return self.name

    @property
    def to_entries(self) -> list[Addr]:
        return [self.to] if isinstance(self.to, str) else list(self.to)

    def named(self, kind: str) -> list[str]:
        """The addr-specs the caller named in ``kind`` (to, cc, bcc, reply_to, sender)."""
        if kind == "sender":
            entries: Sequence[Addr] = [self.sender]
        else:
            entries = self.to_entries if kind == "to" else getattr(self, kind)
        out: list[str] = []
        for entry in entries:
            if isinstance(entry, tuple):
                out.append(entry[1])
            else:
                out.extend(_addr_specs(entry))
        return out

    def recipients(self) -> list[str]:
        return self.named("to") + self.named("cc") + self.named("bcc")

    def allowed_headers(self) -> Counter[str]:
        """How many times each top-level header name may appear on the wire."""
        allowed = Counter(name.lower() for name, _ in self.headers)
        for name in ADDED_HEADERS:
            allowed[name] = max(allowed[name], 1)
        allowed["from"] = allowed["subject"] = 1
        for kind, header in (("to", "to"), ("cc", "cc"), ("reply_to", "reply-to")):
            if self.named(kind):
                allowed[header] = 1
        return allowed


def _addr_specs(value: str) -> list[str]:
    """The addresses in a header-style string, as the standard parser reads them."""
    header = email.policy.default.header_factory("To", value)
    return [a.addr_spec for a in header.addresses]


def quoted(entry: Addr) -> str:
    """How a user writes ``(name, address)`` as one string: the name always quoted."""
    if isinstance(entry, str):
        return entry
    name, addr = entry
    if not name:
        return addr
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}" <{addr}>'


def nested(depth: int) -> dict[str, Any]:
    """``{"a": {"a": ... {"a": 1}}}``, ``depth`` levels, built without recursion."""
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Refused:
    face: str
    field: str | None
    detail: str


@dataclass(frozen=True)
class Accepted:
    face: str
    message_id: str


@dataclass(frozen=True)
class Delivered:
    face: str
    message_id: str
    wire: tuple[Received, ...]


@dataclass(frozen=True)
class Broken:
    face: str
    what: str


Outcome = Refused | Accepted | Delivered | Broken


class NotExpressible(Exception):
    """This face has no way to say what the case says (e.g. NUL in a command-line argument)."""


# --------------------------------------------------------------------------- environment


@dataclass(repr=False)
class Env:
    """One dev server, one SQLite store, configured process-wide; faces share it."""

    stack: Stack
    server: DevServer
    workdir: Path
    token: str = "hostile-token"
    _client: Any = None
    _flask: Any = None

    def __repr__(self) -> str:  # short, for hypothesis' and pytest's reports
        return f"Env({self.server.url}, {self.stack.settings.database_url})"

    @property
    def settings(self) -> Settings:
        return self.stack.settings

    def reset(self) -> None:
        """Before each test: these settings again, an empty mailbox."""
        if mailqueue.get_settings() != self.stack.settings:
            configure(self.stack.settings)
        self.server.clear()

    def reconfigure(self, **overrides: Any) -> Settings:
        """Change settings for one test (``reset`` puts the module's back)."""
        return configure(self.stack.settings, **overrides)

    @property
    def client(self) -> Any:
        """The JSON API (Starlette TestClient), answering 500 instead of raising."""
        if self._client is None:
            from starlette.testclient import TestClient

            from mailqueue.web.app import create_app

            self._client = TestClient(create_app(token=self.token), raise_server_exceptions=False)
            self._client.__enter__()
        return self._client

    @property
    def flask(self) -> tuple[Any, Any]:
        """A Flask app with the extension, no Flask-SQLAlchemy: ``send`` commits at once."""
        if self._flask is None:
            from flask import Flask

            from mailqueue.contrib.flask import MailQueue

            app = Flask("hostile")
            app.config["TESTING"] = True
            self._flask = (app, MailQueue(app))
        return self._flask

    def close(self) -> None:
        if self._client is not None:
            self._client.__exit__(None, None, None)


@contextlib.contextmanager
def environment(workdir: Path) -> Iterator[Env]:
    server = DevServer().start()
    try:
        settings = _base_settings(
            f"sqlite:///{workdir / 'mailqueue.db'}",
            f"sqla+sqlite:///{workdir / 'broker.db'}",
            server.url,
            f"mq-hostile-{uuid.uuid4().hex[:8]}",
        )
        upgrade(settings.database_url)
        env = Env(Stack("sqlite", configure(settings)), server, workdir)
        try:
            yield env
        finally:
            env.close()
    finally:
        server.stop()
        mailqueue._reset_caches()
        configure(settings_from_env({}))


def deliver(env: Env, message_id: str) -> tuple[Received, ...]:
    """Deliver one queued message exactly as a worker does; what the server received."""
    env.server.clear()

    async def go() -> None:
        deliverer = Deliverer(env.settings, env.stack.store)
        try:
            await deliverer.deliver_batch([uuid.UUID(message_id)])
        finally:
            await deliverer.aclose()

    asyncio.run(go())
    return tuple(env.server.messages)


# --------------------------------------------------------------------------- faces


def python_message(case: Case) -> mailqueue.Message:
    extra: dict[str, Any] = {}
    if case.text_subtype is not None:
        extra["text_subtype"] = case.text_subtype
    if case.charset is not None:
        extra["charset"] = case.charset
    return mailqueue.Message(
        sender=case.sender,
        to=case.to if isinstance(case.to, str) else list(case.to),
        cc=list(case.cc),
        bcc=list(case.bcc),
        reply_to=list(case.reply_to),
        subject=case.subject,
        text=case.text,
        html=case.html,
        headers=list(case.headers),
        attachments=[
            mailqueue.Attachment(
                filename=a.filename,
                content=a.content,
                content_type=a.content_type,
                inline=a.inline,
                content_id=a.content_id,
            )
            for a in case.attachments
        ],
        **extra,
    )


def _refused_by_mailqueue(face: str, exc: BaseException) -> Outcome:
    """Python API and Flask: an ``InvalidMessageError`` naming a field, nothing else."""
    if isinstance(exc, mailqueue.InvalidMessageError) and isinstance(exc.field, str) and exc.field:
        return Refused(face, exc.field, str(exc))
    return Broken(face, "".join(traceback.format_exception(exc)))


def python_face(case: Case, env: Env) -> Outcome:
    """``mailqueue.enqueue(Message(...), send_at=..., metadata=...)``."""
    try:
        return Accepted("python", mailqueue.enqueue(python_message(case), **case.options))
    except Exception as exc:  # noqa: BLE001 - judged: only InvalidMessageError is a refusal
        return _refused_by_mailqueue("python", exc)


def eml_message(case: Case) -> EmailMessage:
    """The case as a ready-made ``email.message.EmailMessage`` (what ``eml=`` users hold)."""
    msg = EmailMessage()
    msg["From"] = quoted(case.sender)
    for header, kind in (("To", "to"), ("Cc", "cc"), ("Bcc", "bcc"), ("Reply-To", "reply_to")):
        entries = case.to_entries if kind == "to" else list(getattr(case, kind))
        if entries:
            msg[header] = [
                Address(display_name=e[0], addr_spec=e[1]) if isinstance(e, tuple) else e
                for e in entries
            ]
    msg["Subject"] = case.subject
    for name, value in case.headers:
        msg[name] = value
    msg.set_content(case.text or "")
    return msg


def eml_face(case: Case, env: Env) -> Outcome:
    """``mailqueue.enqueue(Message(eml=<EmailMessage>))``."""
    try:
        msg = eml_message(case)
    except Exception as exc:  # the email package refused the caller's own object
        raise NotExpressible(f"EmailMessage refuses it: {exc}") from None
    try:
        return Accepted("eml", mailqueue.enqueue(mailqueue.Message(eml=msg), **case.options))
    except Exception as exc:  # noqa: BLE001
        return _refused_by_mailqueue("eml", exc)


def cli_argv(case: Case, workdir: Path | None) -> list[str]:
    """``mailqueue send ...`` for the case, or ``NotExpressible`` (no files written without
    ``workdir``)."""
    if case.options:
        raise NotExpressible("the CLI has no send_at/metadata options")
    argv = ["send", f"--from={quoted(case.sender)}"]
    for option, entries in (
        ("--to", case.to_entries),
        ("--cc", case.cc),
        ("--bcc", case.bcc),
        ("--reply-to", case.reply_to),
    ):
        argv += [f"{option}={quoted(e)}" for e in entries]
    argv.append(f"--subject={case.subject}")
    if case.text is not None:
        if case.text == "-":
            raise NotExpressible("'-' means standard input")
        argv.append(f"--text={case.text}")
    if case.html is not None:
        if case.html.startswith("@"):
            raise NotExpressible("'@' means a file")
        argv.append(f"--html={case.html}")
    for name, value in case.headers:
        if name != name.strip() or ":" in name:
            raise NotExpressible("'--header Name: value' trims the name and splits at ':'")
        argv.append(f"--header={name}: {value}")
    if case.text_subtype is not None:
        argv.append(f"--text-subtype={case.text_subtype}")
    if case.charset is not None:
        argv.append(f"--charset={case.charset}")
    for a in case.attachments:
        if not a.filename or "/" in a.filename or a.filename in (".", ".."):
            raise NotExpressible("the file name is not a file name")
        guessed = mimetypes.guess_type(a.filename, strict=False)[0] or "application/octet-stream"
        if a.content_type is not None and a.content_type != guessed:
            raise NotExpressible("the CLI guesses the content type from the file name")
        if "\0" in a.filename:
            raise NotExpressible("NUL in a file name")
        path = Path(a.filename)
        if workdir is not None:
            path = workdir / "cli-files" / uuid.uuid4().hex / a.filename
            path.parent.mkdir(parents=True)
            path.write_bytes(a.content)
        if a.inline:
            cid = a.content_id or ""
            if "=" in cid:
                raise NotExpressible("--inline CID=FILE splits at the first '='")
            argv.append(f"--inline={cid}={path}" if cid else f"--inline={path}")
        else:
            argv.append(f"--attach={path}")
    if any("\0" in arg for arg in argv):
        raise NotExpressible("a command line cannot carry NUL")
    return argv


@dataclass(frozen=True)
class CliRun:
    code: int
    stdout: str
    stderr: str


def run_cli(argv: Sequence[str]) -> CliRun:
    """``mailqueue <argv>`` through its real entry point (``mailqueue.cli:main``), in-process.

    What the interpreter would do with an exception that escapes ``main`` is
    done here: the traceback on stderr and exit code 1.
    """
    from mailqueue.cli import main

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    saved_argv = sys.argv
    sys.argv = ["mailqueue", *argv]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            err.write(exc.code + "\n")
    except Exception:  # noqa: BLE001 - what python would print and exit 1 with
        err.write(traceback.format_exc())
        code = 1
    finally:
        sys.argv = saved_argv
        root.handlers[:] = handlers
        root.setLevel(level)
    return CliRun(code, out.getvalue(), err.getvalue())


_CLI_ERROR = re.compile(r"^error: invalid message: (?:message #\d+: )?([\w.-]+): ")


def judge_cli_run(run: CliRun) -> Outcome:
    """Exit 0 with the id on stdout; exit 2 with one line on stderr; anything else is broken."""
    lines = run.stderr.splitlines()
    if "Traceback" in run.stderr or "Traceback" in run.stdout:
        return Broken("cli", f"exit {run.code} with a traceback:\n{run.stderr}")
    if run.code == 0:
        message_id = run.stdout.strip()
        try:
            uuid.UUID(message_id)
        except ValueError:
            return Broken("cli", f"exit 0 but stdout is not a message id: {run.stdout!r}")
        return Accepted("cli", message_id)
    if run.code == 2 and len(lines) == 1 and lines[0].strip():
        match = _CLI_ERROR.match(lines[0])
        return Refused("cli", match.group(1) if match else None, lines[0])
    return Broken("cli", f"exit {run.code}, stderr {run.stderr!r}, stdout {run.stdout!r}")


def cli_face(case: Case, env: Env) -> Outcome:
    """``mailqueue send --from ... --to ... --subject ... --header 'Name: value' ...``."""
    return judge_cli_run(run_cli(cli_argv(case, env.workdir)))


def json_body(case: Case) -> dict[str, Any]:
    """The case as the JSON API's ``POST /api/v1/messages`` body, or ``NotExpressible``."""
    if case.text_subtype is not None or case.charset is not None:
        raise NotExpressible("the JSON API has no text_subtype/charset")
    if any(a.inline for a in case.attachments):
        raise NotExpressible("the JSON API has no inline attachments")
    names = [name for name, _ in case.headers]
    if len(set(names)) != len(names):
        raise NotExpressible("JSON API headers are an object: one value a name")
    body: dict[str, Any] = {
        "sender": quoted(case.sender),
        "to": case.to if isinstance(case.to, str) else [quoted(e) for e in case.to],
        "cc": [quoted(e) for e in case.cc],
        "bcc": [quoted(e) for e in case.bcc],
        "reply_to": [quoted(e) for e in case.reply_to],
        "subject": case.subject,
        "headers": dict(case.headers),
    }
    if case.text is not None:
        body["text"] = case.text
    if case.html is not None:
        body["html"] = case.html
    if case.attachments:
        body["attachments"] = [
            {
                "filename": a.filename,
                "content_base64": base64.b64encode(a.content).decode(),
                **({"content_type": a.content_type} if a.content_type is not None else {}),
            }
            for a in case.attachments
        ]
    body.update(case.options)
    return body


def post_json(env: Env, content: bytes) -> Outcome:
    """POST raw JSON; 201 with an id, or a JSON 400 naming a field; anything else is broken."""
    response = env.client.post(
        "/api/v1/messages",
        content=content,
        headers={"Authorization": f"Bearer {env.token}", "Content-Type": "application/json"},
    )
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if response.status_code == 201 and isinstance(payload, dict) and "id" in payload:
        return Accepted("json", str(payload["id"]))
    if (
        response.status_code == 400
        and isinstance(payload, dict)
        and payload.get("error") == "invalid"
        and isinstance(payload.get("field"), str)
        and payload["field"]
    ):
        return Refused("json", payload["field"], str(payload.get("detail")))
    return Broken("json", f"HTTP {response.status_code}: {response.text[:2000]}")


def json_face(case: Case, env: Env) -> Outcome:
    """``POST /api/v1/messages`` with a JSON body (bearer token)."""
    body = json_body(case)
    metadata = body.pop("metadata", None)
    content = json.dumps(body)
    if metadata is not None:  # json.dumps cannot write what is too deep for it: splice it in
        content = content[:-1] + ', "metadata": ' + _deep_json(metadata) + "}"
    return post_json(env, content.encode())


def _deep_json(value: Any) -> str:
    depth = 0
    while isinstance(value, dict) and list(value) == ["a"]:
        value, depth = value["a"], depth + 1
    return '{"a": ' * depth + json.dumps(value) + "}" * depth


def flask_message(case: Case) -> Any:
    from mailqueue.contrib.flask import Message as FlaskMessage

    if isinstance(case.to, str):
        raise NotExpressible("Flask's recipients is a list")
    if len(case.reply_to) > 1:
        raise NotExpressible("Flask's reply_to is one address")
    if case.text_subtype is not None:
        raise NotExpressible("Flask has no text_subtype")
    names = [name for name, _ in case.headers]
    if len(set(names)) != len(names):
        raise NotExpressible("Flask's extra_headers is a dict")
    msg = FlaskMessage(
        case.subject,
        recipients=list(case.to),
        body=case.text,
        html=case.html,
        sender=case.sender,
        cc=list(case.cc),
        bcc=list(case.bcc),
        reply_to=case.reply_to[0] if case.reply_to else None,
        charset=case.charset,
        extra_headers=dict(case.headers),
        **case.options,
    )
    for a in case.attachments:
        msg.attach(
            a.filename,
            a.content_type,
            a.content,
            disposition="inline" if a.inline else None,
            headers={"Content-ID": f"<{a.content_id}>"} if a.content_id else None,
        )
    return msg


def flask_face(case: Case, env: Env) -> Outcome:
    """``mail.send(flask_mailqueue.Message(...))`` in an app context."""
    msg = flask_message(case)
    app, mail = env.flask
    try:
        with app.app_context():
            return Accepted("flask", mail.send(msg))
    except Exception as exc:  # noqa: BLE001
        return _refused_by_mailqueue("flask", exc)


def django_check(case: Case) -> None:
    if isinstance(case.to, str):
        raise NotExpressible("Django's to is a list (a string raises TypeError)")
    if any(a.inline for a in case.attachments):
        raise NotExpressible("inline parts are MIME objects in Django")
    names = [name.lower() for name, _ in case.headers]
    if len(set(names)) != len(names):
        raise NotExpressible("Django's headers is a dict")


def django_face(case: Case, env: Env) -> Outcome:
    """``django.core.mail.EmailMessage(...).send()`` through mailqueue's EmailBackend."""
    from django.core.mail import EmailMultiAlternatives

    from mailqueue.contrib.django import QueuedEmailMultiAlternatives

    django_check(case)
    try:
        kwargs: dict[str, Any] = dict(
            subject=case.subject,
            body=case.text or "",
            from_email=quoted(case.sender),
            to=[quoted(e) for e in case.to],
            cc=[quoted(e) for e in case.cc],
            bcc=[quoted(e) for e in case.bcc],
            reply_to=[quoted(e) for e in case.reply_to],
            headers=dict(case.headers),
        )
        if case.options:
            msg = QueuedEmailMultiAlternatives(**kwargs, **case.options)
        else:
            msg = EmailMultiAlternatives(**kwargs)
        if case.html is not None:
            msg.attach_alternative(case.html, "text/html")
        if case.text_subtype is not None:
            msg.content_subtype = case.text_subtype
        if case.charset is not None:
            msg.encoding = case.charset
        for a in case.attachments:
            msg.attach(a.filename, a.content, a.content_type)
        sent = msg.send()
    except ValueError as exc:  # InvalidMessageError, Django's BadHeaderError, sanitize_address
        return Refused("django", getattr(exc, "field", None), f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001
        return Broken("django", "".join(traceback.format_exception(exc)))
    if sent != 1:
        return Broken("django", f"send() returned {sent}, not 1")
    return Accepted("django", msg.mailqueue_id)


Face = Callable[[Case, Env], Outcome]
FACES: dict[str, Face] = {
    "python": python_face,
    "eml": eml_face,
    "cli": cli_face,
    "json": json_face,
    "flask": flask_face,
    "django": django_face,
}
CORE_FACES = ("python", "cli", "json", "flask")
"""The faces of ``tests/test_hostile.py``; Django's run in ``tests/test_hostile_django.py``."""


def run(face: str, case: Case, env: Env, *, deliver_it: bool | None = None) -> Outcome:
    """The case through one face; delivered when accepted (not for refusal-only cases)."""
    env.server.clear()
    outcome = FACES[face](case, env)
    if deliver_it is None:
        deliver_it = not case.refuse
    if isinstance(outcome, Accepted) and deliver_it:
        return Delivered(face, outcome.message_id, deliver(env, outcome.message_id))
    return outcome


# --------------------------------------------------------------------------- the judge


def _norm(addr: str) -> str:
    """An addr-spec compared case-insensitively on the domain (and without the folding
    white space RFC 5322 allows around its parts: ``"a @example.org"`` is ``a@example.org``)."""
    local, at, domain = addr.rpartition("@")
    return f"{local.strip()}@{domain.strip().lower()}" if at else addr.strip()


def _bad(value: str) -> bool:
    return any(c in value for c in _BAD_CHARS)


def _body_text(text: str) -> str:
    return text.replace("\r\n", "\n").strip()


def judge(case: Case, outcome: Outcome) -> None:
    """Assert that ``outcome`` is acceptable for ``case`` (see the module's documentation)."""
    where = f"[{outcome.face}] {case.name}"
    if isinstance(outcome, Broken):
        raise AssertionError(f"{where}: not a proper refusal:\n{outcome.what}")
    if isinstance(outcome, Refused):
        if case.fields is not None and outcome.face == "cli":  # the field is in its one line
            assert any(f in outcome.detail for f in case.fields), (
                f"{where}: refused, but the line names none of {sorted(case.fields)}: "
                f"{outcome.detail!r}"
            )
        elif case.fields is not None and outcome.face != "django":
            # The JSON API may refuse a whole body (its size, its nesting) as "body".
            fields = case.fields | {"body"} if outcome.face == "json" else case.fields
            assert outcome.field in fields, (
                f"{where}: refused, but naming {outcome.field!r}, not one of "
                f"{sorted(fields)} ({outcome.detail})"
            )
        return
    if case.refuse:
        wire = ""
        if isinstance(outcome, Delivered):
            wire = "\n".join(describe(r) for r in outcome.wire)
        raise AssertionError(f"{where}: accepted; only a refusal is acceptable\n{wire}")
    if isinstance(outcome, Accepted):
        return
    judge_wire(case, outcome.wire, where=where)


def describe(received: Received) -> str:
    head = received.data.partition(b"\r\n\r\n")[0].decode("utf-8", "replace")
    return (
        f"MAIL FROM:<{received.mail_from}> RCPT TO:{list(received.rcpt_tos)}\n"
        f"{head}\n[{len(received.data)} bytes of DATA]"
    )


def judge_wire(case: Case, wire: Sequence[Received], *, where: str) -> None:
    """Nothing on the wire the caller did not name: recipients, headers, lines, body."""
    assert wire, f"{where}: accepted but nothing reached the SMTP server"
    named = {_norm(a).lower() for a in case.recipients()}
    for received in wire:
        shown = describe(received)
        extra = [a for a in received.rcpt_tos if _norm(a).lower() not in named]
        assert not extra, f"{where}: RCPT TO {extra} was never named ({sorted(named)})\n{shown}"
        assert _norm(received.mail_from) == _norm(case.named("sender")[0]), (
            f"{where}: MAIL FROM {received.mail_from!r} is not the sender\n{shown}"
        )
        utf8 = any(o.upper() == "SMTPUTF8" for o in received.mail_options)
        _judge_headers(case, received.data, where=where, shown=shown, utf8=utf8)
        _judge_body(case, received.data, where=where, shown=shown)


def _parsed_headers(
    part: Any, *, where: str, shown: str, utf8: bool = False
) -> list[tuple[str, Any]]:
    """Each header of ``part`` parsed by ``email.policy.default``; one that the standard
    parser cannot read (it raises on some malformed address headers) is a finding.

    With ``utf8`` (the transaction said SMTPUTF8), header text is UTF-8 (RFC 6532):
    the bytes parser hands it over as surrogate escapes, read here as the UTF-8 it is."""
    out = []
    for name, raw in part.raw_items():
        if utf8 and any("\udc80" <= ch <= "\udcff" for ch in raw):
            try:
                raw = raw.encode("ascii", "surrogateescape").decode("utf-8")
            except UnicodeError:
                raise AssertionError(
                    f"{where}: header {name} is not UTF-8 in an SMTPUTF8 message: {raw!r}\n{shown}"
                ) from None
        try:
            value = email.policy.default.header_fetch_parse(name, raw)
            str(value)
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(
                f"{where}: header {name} on the wire does not parse ({exc!r}): {raw!r}\n{shown}"
            ) from None
        out.append((name, value))
    return out


def _judge_headers(case: Case, data: bytes, *, where: str, shown: str, utf8: bool = False) -> None:
    head = BytesHeaderParser(policy=email.policy.default).parsebytes(data)
    headers = _parsed_headers(head, where=where, shown=shown, utf8=utf8)
    names = Counter(name.lower() for name, _ in headers)
    assert not names.keys() & {"bcc", "resent-bcc"}, f"{where}: a Bcc header on the wire\n{shown}"
    allowed = case.allowed_headers()
    extra = {n: c for n, c in names.items() if c > allowed[n]}
    assert not extra, f"{where}: headers the caller did not compose: {extra}\n{shown}"
    for name, value in headers:
        assert not _bad(str(value)), (
            f"{where}: header {name} decodes to CR/LF/NUL: {str(value)!r}\n{shown}"
        )
    for header, kind in (("From", "sender"), ("To", "to"), ("Cc", "cc"), ("Reply-To", "reply_to")):
        values = [v for name, v in headers if name.lower() == header.lower()]
        on_wire = sorted(_norm(a.addr_spec) for v in values for a in v.addresses)
        expected = sorted(_norm(a) for a in case.named(kind))
        assert on_wire == expected, (
            f"{where}: {header} on the wire holds {on_wire}, the caller named {expected}\n{shown}"
        )


def _judge_body(case: Case, data: bytes, *, where: str, shown: str) -> None:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    for part in list(msg.walk())[1:]:
        headers = _parsed_headers(part, where=where, shown=shown)
        names = {name.lower() for name, _ in headers}
        assert names <= PART_HEADERS, (
            f"{where}: a MIME part carries headers {sorted(names - PART_HEADERS)}\n{shown}"
        )
        for name, value in headers:
            assert not _bad(str(value)), f"{where}: part header {name} holds CR/LF/NUL\n{shown}"
    for subtype, expected in ((case.text_subtype or "plain", case.text), ("html", case.html)):
        if expected is None:
            continue
        try:
            part = msg.get_body((subtype,))
            content = None if part is None else part.get_content()
        except Exception as exc:  # noqa: BLE001 - unreadable is a finding too
            raise AssertionError(
                f"{where}: the text/{subtype} part is unreadable: {exc!r}"
            ) from None
        assert content is not None, f"{where}: no text/{subtype} part\n{shown}"
        assert _body_text(content) == _body_text(expected), (
            f"{where}: the text/{subtype} part is not the caller's: {content[:300]!r}\n{shown}"
        )


def check(face: str, case: Case, env: Env) -> Outcome:
    """Run the case through the face and judge the outcome; return it for further checks."""
    outcome = run(face, case, env)
    judge(case, outcome)
    return outcome


_PLANS: dict[str, Callable[[Case], object]] = {
    "python": lambda case: None,
    "eml": lambda case: None,
    "cli": lambda case: cli_argv(case, None),
    "json": json_body,
    "flask": flask_message,
    "django": django_check,
}


def expressible(face: str, case: Case) -> bool:
    """Whether the face can say what the case says (decided without running anything)."""
    try:
        _PLANS[face](case)
    except NotExpressible:
        return False
    return True


def matrix(cases: Sequence[Case], faces: Sequence[str]) -> list[Any]:
    """``pytest.param(face, case)`` for every face that can express each case."""
    import pytest

    return [
        pytest.param(face, case, id=f"{face}-{case.name}")
        for case in cases
        for face in faces
        if expressible(face, case)
    ]


# --------------------------------------------------------------------------- the cases (issue #15)


def b64_word(text: str, charset: str = "utf-8") -> str:
    return f"=?{charset}?b?{base64.b64encode(text.encode()).decode()}?="


EW = "=?utf-8?q?x=0D=0ABcc:_evil@attacker.test?="
ENCODED_WORDS = {
    "q-crlf": EW,
    "q-lf": "=?utf-8?q?x=0ABcc:_evil@attacker.test?=",
    "q-cr": "=?utf-8?q?x=0DBcc:_evil@attacker.test?=",
    "q-nul": "=?utf-8?q?x=00Bcc:_evil@attacker.test?=",
    "Q-latin1-crlf": "=?ISO-8859-1?Q?x=0D=0ABcc:_evil@attacker.test?=",
    "b-crlf": b64_word("x\r\nBcc: evil@attacker.test"),
    "b-lf": b64_word("x\nBcc: evil@attacker.test"),
    "b-nul": b64_word("x\0Bcc: evil@attacker.test"),
    # A new Content-Type and a blank line: everything after it becomes the body.
    "q-body": "=?utf-8?q?x=0D=0AContent-Type:_text/plain=0D=0A=0D=0Aevil_body?=",
    "b-body": b64_word("x\r\nContent-Type: text/plain\r\n\r\nevil body"),
}
SHORT = ("q-crlf", "b-crlf", "q-body")
"""The variants tried in every place; the subject and X-Note get them all."""

PLACES = {
    "subject": lambda v: {"subject": v},
    "x-note": lambda v: {"headers": [("X-Note", v)]},
    "message-id": lambda v: {"headers": [("Message-ID", v)]},
    "in-reply-to": lambda v: {"headers": [("In-Reply-To", v)]},
    "references": lambda v: {"headers": [("References", v)]},
    "list-unsubscribe": lambda v: {"headers": [("List-Unsubscribe", v)]},
    "to-name": lambda v: {"to": [(v, ANA)]},
    "cc-name": lambda v: {"cc": [(v, "cc@example.org")]},
    "reply-to-name": lambda v: {"reply_to": [(v, "help@example.org")]},
    "from-name": lambda v: {"sender": (v, "app@example.com")},
}
ENCODED_WORD_CASES = [
    Case(f"{place}-{variant}", **make(ENCODED_WORDS[variant]))
    for place, make in PLACES.items()
    for variant in (ENCODED_WORDS if place in ("subject", "x-note") else SHORT)
]
BENIGN_CASES = [
    Case("plain"),
    Case("bare-string-one-address", to=f"Ana <{ANA}>"),
    Case("legit-encoded-word-subject", subject="=?utf-8?q?caf=C3=A9?="),
    Case("non-ascii-subject", subject="Grüße, café ☕"),
    Case("named", to=[("Ana Example", ANA)], reply_to=[("Help", "help@example.org")]),
    Case("custom-headers", headers=[("X-Note", "a note"), ("References", "<a@example.org>")]),
    Case("text-and-html", html="<p>hello</p>"),
    Case("attachment", attachments=[Att()]),
]


EML_CASES = [
    Case("eml-subject", subject=EW),
    Case("eml-subject-body", subject=ENCODED_WORDS["q-body"]),
    Case("eml-x-note", headers=[("X-Note", EW)]),
    Case("eml-to-name", to=[(EW, ANA)]),
]


LONG_NAME = "evil@attacker.test, Customer Service Department of Example Shop International"
QUOTED_NAME_CASES = [
    Case("quoted-name-pair", to=[(LONG_NAME, ANA)]),
    Case("quoted-name-string", to=[f'"{LONG_NAME}" <{ANA}>']),
    Case("quoted-name-cc", to=["bob@example.org"], cc=[(LONG_NAME, ANA)]),
]


def one_named_address(outcome: Outcome, header: str = "To") -> None:
    assert isinstance(outcome, Delivered), outcome
    for received in outcome.wire:
        msg = BytesHeaderParser(policy=email.policy.default).parsebytes(received.data)
        addresses = [a for v in msg.get_all(header) or [] for a in v.addresses]
        shown = describe(received)
        assert [a.addr_spec for a in addresses] == [ANA], f"{header}: {addresses}\n{shown}"
        assert addresses[0].display_name == LONG_NAME, shown


VICTIM_AND_ATTACKER = "victim@example.com, attacker@evil.com"
ONE_ENTRY_CASES = [
    Case("bcc-entry", bcc=[VICTIM_AND_ATTACKER], refuse=True),
    Case("to-entry", to=[VICTIM_AND_ATTACKER], refuse=True),
    Case("cc-entry", cc=[VICTIM_AND_ATTACKER], refuse=True),
    Case("reply-to-entry", reply_to=[VICTIM_AND_ATTACKER], refuse=True),
    Case("to-bare-string", to="a@example.com, b@example.com", refuse=True),
    Case("to-named-pair-string", to=[f"Ana <{ANA}>, {EVIL}"], refuse=True),
    Case("to-group", to=["friends: a@example.com, b@example.com;"], refuse=True),
    Case("bcc-semicolon", bcc=["victim@example.com; attacker@evil.com"], refuse=True),
]


HTML_CID = '<p>hi <img src="cid:img"></p>'
NAME_AND_NUL_CASES = [
    *[
        Case(f"header-name-{label}", headers=[(name, "v")], refuse=True)
        for label, name in [("lf", "X-Tag\n"), ("cr", "X-Tag\r"), ("space", "X Tag"), ("empty", "")]
    ],
    *[
        Case(
            f"attachment-type-{label}",
            attachments=[Att(content_type=f"text/plain{bad}")],
            refuse=True,
        )
        for label, bad in [
            ("nul", "\0"),
            ("crlf", "\r\nBcc: evil@attacker.test"),
            ("u2028", "\u2028x"),
        ]
    ],
    *[
        Case(f"attachment-name-{label}", attachments=[Att(filename=f"a{bad}.txt")], refuse=True)
        for label, bad in [
            ("nul", "\0"),
            ("crlf", "\r\nBcc: evil@attacker.test"),
            ("u2028", "\u2028"),
        ]
    ],
    *[
        Case(
            f"inline-cid-{label}",
            html=HTML_CID,
            attachments=[
                Att(
                    filename="img.png",
                    content=b"png",
                    content_type="image/png",
                    inline=True,
                    content_id=f"img{bad}",
                )
            ],
            refuse=True,
        )
        for label, bad in [
            ("nul", "\0"),
            ("crlf", "\r\nBcc: evil@attacker.test"),
            ("u2028", "\u2028"),
        ]
    ],
    *[
        Case(
            f"inline-name-{label}",
            html=HTML_CID,
            attachments=[
                Att(
                    filename=f"img{bad}.png",
                    content=b"png",
                    content_type="image/png",
                    inline=True,
                    content_id="img",
                )
            ],
            refuse=True,
        )
        for label, bad in [
            ("nul", "\0"),
            ("crlf", "\r\nBcc: evil@attacker.test"),
            ("u2028", "\u2028"),
        ]
    ],
    *[
        Case(f"text-subtype-{label}", text_subtype=f"plain{bad}", refuse=True)
        for label, bad in [
            ("nul", "\0"),
            ("crlf", "\r\nBcc: evil@attacker.test"),
            ("u2028", "\u2028"),
        ]
    ],
    *[
        Case(f"charset-{label}", charset=f"utf-8{bad}", refuse=True)
        for label, bad in [
            ("nul", "\0"),
            ("crlf", "\r\nBcc: evil@attacker.test"),
            ("u2028", "\u2028"),
        ]
    ],
    Case("text-nul", text="hello\0body", refuse=True),
    Case("html-nul", text=None, html="<p>hello\0body</p>", refuse=True),
]


MB = 1024 * 1024
RECIPIENT_FIELDS = frozenset({"to", "cc", "bcc", "recipients"})
BIG_CASES = [
    Case("subject-1mb", subject="word " * (MB // 5), refuse=True, fields=frozenset({"subject"})),
    Case(
        "header-value-1mb",
        headers=[("X-Note", "word " * (MB // 5))],
        refuse=True,
        fields=frozenset({"headers"}),
    ),
    Case(
        "headers-10000",
        headers=[(f"X-H{i}", "v") for i in range(10_000)],
        refuse=True,
        fields=frozenset({"headers"}),
    ),
    Case(
        "recipients-100000",
        to=[f"r{i}@example.com" for i in range(100_000)],
        refuse=True,
        fields=RECIPIENT_FIELDS,
    ),
]


RAW_EXCEPTION_CASES = [
    *[
        Case(f"address-{label}", to=[addr], refuse=True)
        for label, addr in [
            ("to-at", "to@"),
            ("at-domain", "@x.org"),
            ("a-at", "a@"),
            ("unterminated", '"unterminated <a@x.org'),
            ("empty-angle", "<>"),
        ]
    ],
    Case("sender-to-at", sender="to@", refuse=True),
    Case("content-type-text", attachments=[Att(content_type="text")], refuse=True),
    Case("content-type-slash", attachments=[Att(content_type="/")], refuse=True),
    Case("send-at-number", options={"send_at": 5}, refuse=True, fields=frozenset({"send_at"})),
    Case(
        "metadata-depth-10000",
        options={"metadata": nested(10_000)},
        refuse=True,
        fields=frozenset({"metadata"}),
    ),
]
