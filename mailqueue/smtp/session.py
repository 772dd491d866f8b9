"""Opening a session to a relay: connect, TLS as configured, and authenticate.

Safe by default: certificates are verified (host name included), STARTTLS
``required`` never falls back to plain text, and credentials are never sent
over an unencrypted connection unless ``allow_plaintext_auth`` says so.
Every failure becomes a typed error (``ConnectError``, ``TLSError``,
``AuthError``, ``UnknownAuthError``) whose text names the relay by its safe
URL and never contains a password or token.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import ssl
from collections.abc import Callable
from typing import Any, cast

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol

from ..config import RelayConfig
from ..errors import AuthError, ConnectError, TLSError, UnknownAuthError

__all__ = ["close_session", "open_session", "tls_context", "TokenCache"]

log = logging.getLogger("mailqueue.smtp")

_MECHANISMS = ("XOAUTH2", "CRAM-MD5", "PLAIN", "LOGIN")
_contexts: dict[tuple[Any, ...], ssl.SSLContext] = {}


def tls_context(relay: RelayConfig) -> ssl.SSLContext:
    """The client TLS context for ``relay`` (cached: building one reads the CA store)."""
    key = (
        relay.tls_verify,
        relay.tls_check_hostname,
        relay.tls_ca_file,
        relay.tls_ca_dir,
        relay.tls_client_cert,
        relay.tls_client_key,
        relay.tls_min_version,
    )
    context = _contexts.get(key)
    if context is None:
        try:
            context = ssl.create_default_context(cafile=relay.tls_ca_file, capath=relay.tls_ca_dir)
            context.minimum_version = getattr(
                ssl.TLSVersion, relay.tls_min_version.replace(".", "_")
            )
            if not relay.tls_verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            elif not relay.tls_check_hostname:
                context.check_hostname = False
            if relay.tls_client_cert:
                context.load_cert_chain(relay.tls_client_cert, relay.tls_client_key)
        except (OSError, ssl.SSLError) as exc:
            raise TLSError(
                f"cannot set up TLS for {relay.safe_url}: {exc}", retryable=False
            ) from None
        _contexts[key] = context
    return context


class TokenCache:
    """OAuth2 access tokens for XOAUTH2, kept per relay between connections.

    The provider is called only when there is no token yet, or with
    ``refresh=True`` after the relay refused the cached one.
    """

    def __init__(self) -> None:
        self._tokens: dict[str, str] = {}

    async def get(self, relay: RelayConfig, *, refresh: bool = False) -> str:
        if not refresh and relay.name in self._tokens:
            return self._tokens[relay.name]
        provider = _load_provider(relay)
        token = provider(relay.username, refresh)
        if inspect.isawaitable(token):
            token = await token
        if not isinstance(token, str) or not token:
            raise AuthError(
                f"the token provider of {relay.safe_url} returned no token", retryable=False
            )
        self._tokens[relay.name] = token
        return token


def _load_provider(relay: RelayConfig) -> Callable[..., Any]:
    assert relay.token_provider
    module, _, attr = relay.token_provider.partition(":")
    try:
        provider = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        raise AuthError(
            f"cannot import the token provider {relay.token_provider!r} of relay {relay.name!r}",
            retryable=False,
        ) from None
    return provider


def _tls_error(relay: RelayConfig, exc: BaseException) -> TLSError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        what = exc.verify_message or str(exc)
        advice = (
            "set tls_ca_file to the CA that signed it"
            if "issuer" in what or "self-signed" in what or "self signed" in what
            else "connect by the name on the certificate"
            if "Hostname mismatch" in what or "IP address mismatch" in what
            else "check the certificate"
        )
        return TLSError(
            f"the certificate of {relay.safe_url} did not verify ({what}); {advice}, "
            "or turn verification off explicitly (tls_verify=false / tls_check_hostname=false)",
            retryable=False,
        )
    return TLSError(f"TLS with {relay.safe_url} failed: {exc}", retryable=False)


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


async def open_session(relay: RelayConfig, tokens: TokenCache | None = None) -> aiosmtplib.SMTP:
    """Connect to ``relay``, secure the session as configured, log in; return it ready."""
    use_tls = relay.implicit_tls
    context = tls_context(relay) if use_tls or relay.starttls_mode != "off" else None
    smtp = aiosmtplib.SMTP(
        hostname=relay.host,
        port=relay.port,
        use_tls=use_tls,
        start_tls=False,
        tls_context=context if use_tls else None,
        timeout=relay.command_timeout_s,
        local_hostname=relay.ehlo_name,
    )
    try:
        await _connect(smtp, relay, context)
        if relay.username or relay.token_provider:
            await _authenticate(smtp, relay, tokens or TokenCache())
    except BaseException:
        await _discard(smtp)
        raise
    return smtp


async def _discard(smtp: aiosmtplib.SMTP) -> None:
    """Drop a failed session now, its socket really closed before we return."""
    await close_session(smtp, say_quit=False)


async def close_session(
    smtp: aiosmtplib.SMTP,
    *,
    say_quit: bool,
    timeout_s: float = 5.0,
    protocol: SMTPProtocol | None = None,
) -> None:
    """End a session and return only once its socket is closed.

    ``say_quit``: a healthy session says QUIT and, over TLS, closes with the
    close_notify exchange, which ends some turns of the event loop later,
    when the server's answer arrives (at most ``timeout_s``, then by force).
    Otherwise (a failed, timed-out or poisoned session) the connection is
    aborted at once. Either way this waits until the socket is closed:
    ``close()`` alone only schedules that, and when the loop stops before it
    happens (``asyncio.run`` ending after ``send_now``, a worker's loop
    stopping) the socket stays open until the garbage collector finds it and
    warns ``unclosed transport``. ``protocol``: the session's protocol, when
    ``smtp`` may have dropped it already (aiosmtplib's ``close()`` forgets it).
    """
    protocol = protocol or smtp.protocol
    transport = cast(
        asyncio.Transport | None, protocol.transport if protocol is not None else smtp.transport
    )
    if transport is None:  # never connected, or the connection is gone already
        smtp.close()
        return
    sock = transport.get_extra_info("socket")

    def closed() -> bool:
        # Either the protocol heard connection_lost, which asyncio calls once the
        # socket is closed, or the socket says so itself (a failed STARTTLS never
        # tells the SMTP protocol).
        lost = protocol is not None and protocol.transport is None
        return lost or (sock is not None and sock.fileno() == -1)

    quitted = False
    if say_quit and smtp.is_connected:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
            await smtp.quit(timeout=timeout_s)
            quitted = True
    smtp.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (timeout_s if quitted else 0.0)
    aborted, turns = False, 0
    while not closed():
        if not aborted and loop.time() >= deadline:
            transport.abort()  # no (more) waiting for the server
            aborted, turns = True, 0
        elif aborted and turns >= 10:
            log.warning("the connection to %s:%s did not close", smtp.hostname, smtp.port)
            return
        await asyncio.sleep(0 if aborted or turns < 5 else 0.005)
        turns += 1


async def _connect(
    smtp: aiosmtplib.SMTP, relay: RelayConfig, context: ssl.SSLContext | None
) -> None:
    try:
        await smtp.connect(timeout=relay.connect_timeout_s)
        await smtp.ehlo()
        mode = relay.starttls_mode
        if not relay.implicit_tls and mode != "off":
            if smtp.supports_extension("starttls"):
                await _starttls(smtp, relay, context)
            elif mode == "required":
                raise TLSError(
                    f"{relay.safe_url} does not offer STARTTLS and starttls=required: "
                    "refusing to continue in plain text",
                    retryable=False,
                )
    except (TLSError, AuthError):
        raise
    except aiosmtplib.SMTPResponseException as exc:
        raise ConnectError(
            f"{relay.safe_url} refused the session", code=exc.code, reply=exc.message
        ) from None
    except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
        cause = _ssl_cause(exc)
        if cause is not None:
            raise _tls_error(relay, cause) from None
        raise ConnectError(f"cannot connect to {relay.safe_url}: {exc}") from None


async def _starttls(
    smtp: aiosmtplib.SMTP, relay: RelayConfig, context: ssl.SSLContext | None
) -> None:
    """Upgrade the session; any failure here is a TLS failure, never a fallback to plain."""
    try:
        await smtp.starttls(tls_context=context, timeout=relay.connect_timeout_s)
    except aiosmtplib.SMTPResponseException as exc:
        raise TLSError(
            f"{relay.safe_url} refused STARTTLS", code=exc.code, reply=exc.message, retryable=False
        ) from None
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        cause = _ssl_cause(exc)
        if cause is not None:
            raise _tls_error(relay, cause) from None
        raise TLSError(
            f"the TLS handshake with {relay.safe_url} failed ({exc}); the relay may not accept "
            f"tls_min_version={relay.tls_min_version} or may want a client certificate",
            retryable=False,
        ) from None
    await smtp.ehlo()


def _encrypted(smtp: aiosmtplib.SMTP) -> bool:
    return smtp.get_transport_info("sslcontext") is not None


async def _authenticate(smtp: aiosmtplib.SMTP, relay: RelayConfig, tokens: TokenCache) -> None:
    if not _encrypted(smtp) and not relay.allow_plaintext_auth:
        raise TLSError(
            f"{relay.safe_url}: the session is not encrypted, so the credentials were not sent; "
            "use smtps:// or starttls=required (or allow_plaintext_auth=true, on purpose)",
            retryable=False,
        )
    offered = [m.upper() for m in smtp.server_auth_methods]
    wanted = list(relay.auth_mechanisms or _MECHANISMS)
    if not relay.token_provider:
        wanted = [m for m in wanted if m != "XOAUTH2"]
    elif relay.auth_mechanisms is None:
        wanted = ["XOAUTH2"]
    mechanism = next((m for m in wanted if m in offered), None)
    if mechanism is None:
        raise UnknownAuthError(
            f"{relay.safe_url} offers AUTH {' '.join(offered) or '(nothing)'}; "
            f"mailqueue is set to use {' '.join(wanted) or '(nothing)'}",
            retryable=False,
        )
    try:
        if mechanism == "XOAUTH2":
            await _xoauth2(smtp, relay, tokens)
            return
        password = relay.password
        if password is None:
            raise AuthError(
                f"relay {relay.name!r} has a user name but no password "
                "(set password_file or MAILQUEUE_RELAY_PASSWORD_FILE)",
                retryable=False,
            )
        login = {
            "CRAM-MD5": smtp.auth_crammd5,
            "PLAIN": smtp.auth_plain,
            "LOGIN": smtp.auth_login,
        }[mechanism]
        await login(relay.username or "", password)
    except aiosmtplib.SMTPAuthenticationError as exc:
        raise AuthError(
            f"{relay.safe_url} refused the credentials of {relay.username!r} ({mechanism})",
            code=exc.code,
            reply=exc.message,
        ) from None
    except aiosmtplib.SMTPResponseException as exc:
        raise AuthError(
            f"{relay.safe_url} refused AUTH {mechanism}", code=exc.code, reply=exc.message
        ) from None


async def _xoauth2(smtp: aiosmtplib.SMTP, relay: RelayConfig, tokens: TokenCache) -> None:
    user = relay.username or ""
    try:
        await smtp.auth_xoauth2(user, await tokens.get(relay))
        return
    except aiosmtplib.SMTPAuthenticationError as exc:
        log.info("relay %s refused the cached OAuth2 token (%s); refreshing", relay.name, exc.code)
    try:
        await smtp.auth_xoauth2(user, await tokens.get(relay, refresh=True))
    except aiosmtplib.SMTPAuthenticationError as exc:
        raise AuthError(
            f"{relay.safe_url} refused a fresh OAuth2 token for {user!r} (XOAUTH2)",
            code=exc.code,
            reply=exc.message,
        ) from None
