"""A local SMTP server for development and tests (aiosmtpd), with fault controls.

It accepts mail and keeps what it received (in memory, and optionally in a
Maildir), answers 550/450 to recipients that match ``reject``/``defer``
globs, and can misbehave on purpose (``faults``) so that tests and the demo
exercise what real relays do: slow replies, 421 closing, connections dropped
in the middle of DATA, a server that stops answering.

It runs its own event loop in a background thread, so it works the same from
synchronous tests, from asyncio code, and from ``mailqueue devserver``. It
binds to 127.0.0.1 unless told otherwise: never an open relay by accident.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import fnmatch
import hmac
import json
import mailbox
import signal
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from .config import DEV_PORT

__all__ = ["DevServer", "Faults", "Received", "serve"]

HookResult = bool | str | None
AddressHook = Callable[[str], HookResult]
AuthHook = Callable[[str, str, str], bool]
"""``on_auth(mechanism, user, secret)``: True accepts (secret: password or OAuth2 token)."""


@dataclass(frozen=True)
class Received:
    """One message as the server received it."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    peer: str
    session_id: int
    received_at: dt.datetime
    mail_options: tuple[str, ...] = ()
    tls: bool = False
    """The session was encrypted (STARTTLS or implicit TLS)."""
    auth_user: str | None = None


@dataclass
class Faults:
    """Misbehaviour on demand; counters count down as they fire.

    * ``reply_delay_s``: wait this long before answering MAIL, RCPT and DATA.
    * ``data_reply``: answer DATA with this reply (e.g. ``"554 5.6.0 Rejected"``)
      instead of accepting, and keep nothing.
    * ``drop_in_data``: for the next N messages, drop the connection after the
      content arrived, before replying (the client cannot know if it was taken).
    * ``hang_in_data``: for the next N messages, never answer DATA.
    * ``close_421_after``: after N messages on a connection, answer the next
      MAIL with 421 and close it (what busy relays do).
    * ``refuse_connections``: greet with 554 and hang up.
    """

    reply_delay_s: float = 0.0
    data_reply: str | None = None
    drop_in_data: int = 0
    hang_in_data: int = 0
    close_421_after: int | None = None
    refuse_connections: bool = False


def _matches(address: str, patterns: Iterable[str]) -> bool:
    address = address.lower()
    return any(fnmatch.fnmatchcase(address, p.lower()) for p in patterns)


def _hook_reply(result: HookResult, refusal: str) -> str | None:
    """Map a user hook's answer to an SMTP reply (None: accept)."""
    if result is None or result is True:
        return None
    if result is False:
        return refusal
    return str(result)


class _Handler:
    def __init__(self, server: DevServer) -> None:
        self.server = server

    async def _delay(self) -> None:
        if self.server.faults.reply_delay_s:
            await asyncio.sleep(self.server.faults.reply_delay_s)

    async def handle_EHLO(
        self, smtp: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.server.pipelining:
            # aiosmtpd reads commands one by one from its stream, so pipelined
            # MAIL/RCPT/DATA (RFC 2920) are answered in order; it just does not say so.
            responses.insert(len(responses) - 1, "250-PIPELINING")
        if not self.server.eightbitmime:  # act like a 7-bit-only relay
            responses = [r for r in responses if "8BITMIME" not in r.upper()]
            responses[-1] = "250 " + responses[-1][4:]
        return responses

    async def handle_MAIL(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        await self._delay()
        if self.server.on_sender is not None:
            refusal = _hook_reply(
                self.server.on_sender(address), f"553 5.7.1 <{address}>: Sender address rejected"
            )
            if refusal:
                return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        await self._delay()
        server = self.server
        if _matches(address, server.reject):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        if _matches(address, server.defer):
            return (
                f"450 4.2.0 <{address}>: Recipient address rejected: "
                "Mailbox temporarily unavailable, try again later"
            )
        if server.on_recipient is not None:
            refusal = _hook_reply(
                server.on_recipient(address), f"550 5.1.1 <{address}>: Recipient address rejected"
            )
            if refusal:
                return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        await self._delay()
        faults = self.server.faults
        if faults.drop_in_data > 0:
            faults.drop_in_data -= 1
            assert smtp.transport is not None
            cast(asyncio.Transport, smtp.transport).abort()
            await asyncio.sleep(3600)  # cancelled by connection_lost
        if faults.hang_in_data > 0:
            faults.hang_in_data -= 1
            await asyncio.sleep(3600)  # until the client gives up and hangs up
        if faults.data_reply:
            return faults.data_reply
        assert isinstance(smtp, _DevSMTP)
        smtp.delivered += 1
        self.server._record(
            Received(
                mail_from="" if envelope.mail_from == "<>" else envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=envelope.original_content or b"",
                peer=f"{session.peer[0]}:{session.peer[1]}" if session.peer else "",
                session_id=smtp.session_id,
                received_at=dt.datetime.now(dt.UTC),
                mail_options=tuple(envelope.mail_options),
                tls=smtp.transport is not None
                and smtp.transport.get_extra_info("sslcontext") is not None,
                auth_user=session.auth_data if isinstance(session.auth_data, str) else None,
            )
        )
        return "250 2.0.0 OK: queued"


class _DevSMTP(SMTP):
    """aiosmtpd's SMTP, counting connections and honouring ``close_421_after``."""

    def __init__(self, devserver: DevServer, session_id: int, **kwargs: Any) -> None:
        super().__init__(_Handler(devserver), **kwargs)
        self.devserver = devserver
        self.session_id = session_id
        self.delivered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            if transport.get_extra_info("sslcontext") is not None:
                # Implicit TLS: tell aiosmtpd the session is encrypted, so it
                # offers AUTH (it only knows about STARTTLS).
                self._tls_protocol = transport  # type: ignore[assignment]
            self.devserver._opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.devserver._closed(self)
        super().connection_lost(error)

    async def auth_CRAM__MD5(self, _: SMTP, args: list[str]) -> AuthResult:
        """CRAM-MD5 (RFC 2195): aiosmtpd has no built-in one."""
        challenge = f"<{uuid.uuid4().hex}@{self.devserver.hostname}>".encode()
        answer = await self.challenge_auth(challenge)
        if not isinstance(answer, bytes):
            return AuthResult(success=False, handled=True)
        user, _sep, digest = answer.decode("utf-8", "replace").rpartition(" ")
        ok = self.devserver._check_cram(user, challenge, digest)
        return AuthResult(success=ok, handled=False, auth_data=user)

    async def auth_XOAUTH2(self, _: SMTP, args: list[str]) -> AuthResult:
        """XOAUTH2 as Gmail and Outlook speak it, with the JSON error challenge."""
        if len(args) < 2:
            return AuthResult(success=False, handled=False)
        try:
            fields = base64.b64decode(args[1]).decode().split("\x01")
        except (ValueError, UnicodeError):
            return AuthResult(success=False, handled=False)
        values = dict(f.split("=", 1) for f in fields if "=" in f)
        user = values.get("user", "")
        token = values.get("auth", "").removeprefix("Bearer ")
        if self.devserver._check("XOAUTH2", user, token):
            return AuthResult(success=True, handled=False, auth_data=user)
        error = json.dumps({"status": "401", "schemes": "Bearer", "scope": "mail"})
        await self.challenge_auth(base64.b64encode(error.encode()), encode_to_b64=False)
        return AuthResult(success=False, handled=False)

    async def smtp_MAIL(self, arg: str | None) -> None:
        if self.devserver.require_auth and not (self.session and self.session.authenticated):
            await self.push("530 5.7.0 Authentication required")
            return
        limit = self.devserver.faults.close_421_after
        if limit is not None and self.delivered >= limit:
            await self.push("421 4.3.2 Service shutting down, closing transmission channel")
            assert self.transport is not None
            self.transport.close()
            return
        await super().smtp_MAIL(arg)


class _Refuser(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"554 5.3.2 Not accepting connections\r\n")
        transport.close()


class DevServer:
    """An SMTP server on a background thread; ``start()`` it, read ``.messages``.

    >>> with DevServer(reject=["bounce*@*"]) as server:
    ...     relay_url = server.url
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        hostname: str = "mailqueue-devserver",
        reject: Iterable[str] = (),
        defer: Iterable[str] = (),
        maildir: str | Path | None = None,
        on_sender: AddressHook | None = None,
        on_recipient: AddressHook | None = None,
        max_size: int | None = 33554432,
        smtputf8: bool = True,
        eightbitmime: bool = True,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_port: int | None = None,
        starttls: bool = True,
        users: dict[str, str] | None = None,
        oauth_tokens: dict[str, str] | None = None,
        on_auth: AuthHook | None = None,
        require_auth: bool = False,
        auth_over_plaintext: bool = False,
        auth_exclude: Iterable[str] = (),
        pipelining: bool = False,
    ) -> None:
        """``tls_cert``/``tls_key`` enable STARTTLS (unless ``starttls=False``) and,
        with ``tls_port`` (0 picks one), an implicit-TLS listener. ``users``
        (PLAIN, LOGIN, CRAM-MD5), ``oauth_tokens`` (XOAUTH2, user -> token) or
        ``on_auth`` check credentials; ``require_auth`` refuses MAIL before AUTH.
        AUTH is offered only over TLS unless ``auth_over_plaintext``."""
        self.host = host
        self.port = port
        self.hostname = hostname
        self.reject: list[str] = list(reject)
        self.defer: list[str] = list(defer)
        self.on_sender = on_sender
        self.on_recipient = on_recipient
        self.max_size = max_size
        self.smtputf8 = smtputf8
        self.eightbitmime = eightbitmime
        self.pipelining = pipelining
        """Advertise PIPELINING in the EHLO reply (RFC 2920)."""
        self.faults = Faults()
        self.messages: list[Received] = []
        self.connections_total = 0
        self.connections_open = 0
        self.connections_peak = 0
        self.on_message: Callable[[Received], None] | None = None
        self.tls_port = tls_port
        self.starttls = starttls
        self.users = dict(users or {})
        self.oauth_tokens = dict(oauth_tokens or {})
        self.on_auth = on_auth
        self.require_auth = require_auth
        self.auth_over_plaintext = auth_over_plaintext
        self.auth_exclude = [m.upper() for m in auth_exclude]
        self.auth_attempts: list[tuple[str, str, bool]] = []
        """(mechanism, user, accepted) for every AUTH, never the secret."""
        self._tls: ssl.SSLContext | None = None
        if tls_cert is not None:
            self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls.load_cert_chain(str(tls_cert), str(tls_key) if tls_key else None)
        elif tls_port is not None:
            raise ValueError("tls_port needs tls_cert (and tls_key)")
        self._tls_server: asyncio.AbstractServer | None = None
        self._maildir = mailbox.Maildir(Path(maildir), create=True) if maildir else None
        self._lock = threading.Lock()
        self._open: set[_DevSMTP] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None

    # -- lifecycle

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    def start(self) -> DevServer:
        """Listen (again, on the same port after a stop); return self."""
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="mailqueue-devserver", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._listen(loop), loop).result(10)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            loop.close()
            raise
        self._loop, self._thread = loop, thread
        return self

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        """The server's TLS context (tests tweak it, e.g. to require client certificates)."""
        return self._tls

    @property
    def tls_url(self) -> str:
        return f"smtps://{self.host}:{self.tls_port}"

    async def _listen(self, loop: asyncio.AbstractEventLoop) -> None:
        auth = bool(self.users or self.oauth_tokens or self.on_auth or self.require_auth)

        def factory(implicit: bool) -> Callable[[], asyncio.BaseProtocol]:
            def protocol() -> asyncio.BaseProtocol:
                if self.faults.refuse_connections:
                    return _Refuser()
                with self._lock:
                    session_id = self.connections_total + 1
                options: dict[str, Any] = {}
                if auth:
                    options.update(
                        authenticator=self._authenticator,
                        auth_required=False,  # enforced in smtp_MAIL (aiosmtpd warns otherwise)
                        auth_require_tls=not self.auth_over_plaintext,
                        auth_exclude_mechanism=self.auth_exclude,
                    )
                return _DevSMTP(
                    self,
                    session_id,
                    hostname=self.hostname,
                    data_size_limit=self.max_size,
                    enable_SMTPUTF8=self.smtputf8,
                    decode_data=False,
                    timeout=60,
                    tls_context=self._tls if (self.starttls and not implicit) else None,
                    loop=loop,
                    **options,
                )

            return protocol

        self._server = await loop.create_server(
            factory(False), self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        if self._tls is not None and self.tls_port is not None:
            self._tls_server = await loop.create_server(
                factory(True), self.host, self.tls_port, ssl=self._tls, reuse_address=True
            )
            self.tls_port = self._tls_server.sockets[0].getsockname()[1]

    def _authenticator(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if isinstance(data, LoginPassword):
            user = data.login.decode("utf-8", "replace")
            ok = self._check(mechanism, user, data.password.decode("utf-8", "replace"))
            return AuthResult(success=ok, handled=False, auth_data=user)
        return AuthResult(success=False, handled=False)

    def _check(self, mechanism: str, user: str, secret: str) -> bool:
        if self.on_auth is not None:
            ok = bool(self.on_auth(mechanism, user, secret))
        elif mechanism == "XOAUTH2":
            expected = self.oauth_tokens.get(user)
            ok = expected is not None and hmac.compare_digest(expected, secret)
        else:
            expected = self.users.get(user)
            ok = expected is not None and hmac.compare_digest(expected, secret)
        self.auth_attempts.append((mechanism, user, ok))
        return ok

    def _check_cram(self, user: str, challenge: bytes, digest: str) -> bool:
        password = self.users.get(user)
        expected = hmac.new(password.encode(), challenge, "md5").hexdigest() if password else None
        ok = expected is not None and hmac.compare_digest(expected, digest)
        self.auth_attempts.append(("CRAM-MD5", user, ok))
        return ok

    def stop(self) -> None:
        """Stop listening and hang up on every open session. Safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
            self._loop = self._thread = self._server = self._tls_server = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._tls_server is not None:
            self._tls_server.close()
        for protocol in list(self._open):
            if protocol.transport is not None:
                cast(asyncio.Transport, protocol.transport).abort()
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what it saw

    def _opened(self, protocol: _DevSMTP) -> None:
        with self._lock:
            self._open.add(protocol)
            self.connections_total += 1
            self.connections_open += 1
            self.connections_peak = max(self.connections_peak, self.connections_open)

    def _closed(self, protocol: _DevSMTP) -> None:
        with self._lock:
            if protocol in self._open:
                self._open.discard(protocol)
                self.connections_open -= 1

    def _record(self, received: Received) -> None:
        with self._lock:
            self.messages.append(received)
        if self._maildir is not None:
            head = (
                f"Return-Path: <{received.mail_from}>\r\n"
                f"Delivered-To: {', '.join(received.rcpt_tos)}\r\n"
            ).encode()
            self._maildir.add(head + received.data)
        if self.on_message is not None:
            self.on_message(received)

    def received_for(self, address: str) -> list[Received]:
        """Every message whose envelope named ``address`` (case-insensitive)."""
        address = address.lower()
        with self._lock:
            return [m for m in self.messages if address in (r.lower() for r in m.rcpt_tos)]

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Block until at least ``count`` messages arrived; raise ``TimeoutError`` if not."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.messages)} of {count} messages after {timeout}s")
            time.sleep(0.01)
        return list(self.messages)

    def clear(self) -> None:
        """Forget received messages and connection counts (the server keeps running)."""
        with self._lock:
            self.messages.clear()
            self.connections_total = 0
            self.connections_peak = self.connections_open


def serve(
    host: str = "127.0.0.1",
    port: int = DEV_PORT,
    *,
    reject: Iterable[str] = (),
    defer: Iterable[str] = (),
    maildir: str | Path | None = None,
    max_size: int | None = 33554432,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_port: int | None = None,
    users: dict[str, str] | None = None,
    pipelining: bool = False,
) -> None:
    """Run a DevServer in the foreground until SIGINT/SIGTERM, printing a line per message."""
    server = DevServer(
        host,
        port,
        reject=reject,
        defer=defer,
        maildir=maildir,
        max_size=max_size,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_port=tls_port,
        users=users,
        require_auth=bool(users),
        pipelining=pipelining,
    )

    def show(m: Received) -> None:
        print(
            f"{m.received_at:%H:%M:%S} from <{m.mail_from}> to "
            f"{', '.join(f'<{r}>' for r in m.rcpt_tos)} ({len(m.data)} bytes)",
            flush=True,
        )

    server.on_message = show
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    extra = f" and {server.tls_url} (implicit TLS)" if tls_port is not None else ""
    tls = ", STARTTLS" if tls_cert else ""
    auth = f", AUTH required ({len(users or {})} user(s))" if users else ""
    print(
        f"mailqueue devserver listening on {server.url}{extra}{tls}{auth} (Ctrl-C to stop)",
        flush=True,
    )
    try:
        stop.wait()
    finally:
        server.stop()
        print(f"stopped after {len(server.messages)} messages", flush=True)
