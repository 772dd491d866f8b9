"""ESMTP PIPELINING (RFC 2920) for MAIL, RCPT… and DATA over an aiosmtplib session.

aiosmtplib runs one command at a time: it writes a command, then waits for
its reply. Its protocol keeps exactly one reply waiter, parses only the first
reply in a chunk, and *drops* bytes that arrive while no command is pending
or while a parsed reply waits to be picked up. Pipelined replies arrive
several to a segment, so we cannot use ``execute_command`` for them.

Instead, for the length of one transaction, under the protocol's command
lock (nothing else may talk on the session meanwhile), we route the
protocol's ``data_received`` to a small reader that appends every byte to
the protocol's own buffer and parses *all* complete replies with the
protocol's own parser. Then:

1. MAIL FROM, every RCPT TO and DATA go out in one write (RFC 2920 §3.1:
   DATA is the last command of the group);
2. exactly one reply is read per command, in order — every RCPT reply is
   kept, per recipient;
3. only if DATA answered 354 is the content sent (dot-stuffed, in slices
   with flow control, so a big message is not copied whole again); if the
   server said 354 although MAIL or every RCPT failed, a lone "." ends the
   empty transaction (RFC 2920 §3.1) and the final reply is reported as not
   delivering anything.

Timeouts and disconnects close the session (a half-read pipeline cannot be
trusted) and raise aiosmtplib's own exceptions, so callers handle them like
any other. ``Pipeline.phase`` says whether any content byte had been written
("DATA") when it failed — before that, nothing can have been delivered —
and ``Pipeline.received`` keeps the replies read until then.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    LINE_ENDINGS_REGEX,
    PERIOD_REGEX,
    SMTPProtocol,
)
from aiosmtplib.response import SMTPResponse

from .outcome import ACCEPTED_RCPT

__all__ = ["Pipeline", "PipelinedReplies", "send_pipelined", "supports_pipelining"]

CHUNK = 256 * 1024
"""Bytes of content dot-stuffed and written at a time (split at a line end)."""


def supports_pipelining(smtp: aiosmtplib.SMTP) -> bool:
    return smtp.supports_extension("pipelining")


@dataclass(frozen=True)
class PipelinedReplies:
    """One reply per command sent, in order."""

    mail: SMTPResponse
    rcpt: tuple[SMTPResponse, ...]
    data_start: SMTPResponse
    """The reply to DATA itself: 354 to go on, anything else refuses the content."""
    data: SMTPResponse | None
    """The reply after the content's final dot; None when the content was not sent."""


class _Reader:
    """Parses every reply out of the protocol's buffer as bytes arrive."""

    def __init__(self, protocol: SMTPProtocol) -> None:
        self.protocol = protocol
        self.replies: collections.deque[SMTPResponse] = collections.deque()
        self.error: BaseException | None = None
        self.wake: asyncio.Future[None] | None = None

    def feed(self, data: bytes) -> None:
        protocol = self.protocol
        protocol._buffer.extend(data)
        try:
            while (reply := protocol._read_response_from_buffer()) is not None:
                self.replies.append(reply)
        except Exception as exc:  # noqa: BLE001 - a malformed reply ends the session
            self.error = exc
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)

    async def next(self, timeout: float | None) -> SMTPResponse:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.replies:
            if self.error is not None:
                raise self.error
            lost = self.protocol._response_waiter  # failed by connection_lost / EOF
            if lost is None or lost.done() or not self.protocol.is_connected:
                raise aiosmtplib.SMTPServerDisconnected("Connection lost")
            wake: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self.wake = wake
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            waiting: set[asyncio.Future[Any]] = {wake, lost}
            done, _ = await asyncio.wait(
                waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response")
        return self.replies.popleft()


_PLAIN_ADDRESS = re.compile(r"[^\s<>()\[\],;:\"\\@]+@[^\s<>()\[\],;:\"\\@]+")
"""local@domain with nothing that needs quoting or parsing (what the queue stores)."""


def _angle(address: str) -> str:
    """``<address>`` as aiosmtplib's ``quote_address`` would write it.

    ``quote_address`` parses every address with ``email.utils`` (8 % of a busy
    worker's CPU); the envelopes the queue stores are plain addr-specs already
    validated at enqueue, so only anything else still goes through it.
    """
    if _PLAIN_ADDRESS.fullmatch(address):
        return f"<{address}>"
    return quote_address(address)


def _rebind(protocol: SMTPProtocol) -> None:
    """Make the transport see the protocol's current ``data_received``.

    asyncio's own transports look the method up on every read, but uvloop's
    keep the bound method they found when the protocol was set: setting the
    same protocol again makes them look once more.
    """
    transport = protocol.transport
    if transport is not None and not transport.is_closing():
        transport.set_protocol(protocol)


class Pipeline:
    """One pipelined transaction on one connected ``aiosmtplib.SMTP``."""

    def __init__(self, smtp: aiosmtplib.SMTP) -> None:
        self.smtp = smtp
        self.phase = "MAIL"
        """``"MAIL"`` until the first content byte is written, then ``"DATA"``."""
        self.received: list[SMTPResponse] = []
        """Every reply read so far, in order: what the relay said even if ``send`` raised."""

    async def send(
        self,
        mail_from: str,
        recipients: Sequence[str],
        data: bytes | bytearray,
        *,
        mail_options: Sequence[str] = (),
        encoding: str = "ascii",
        timeout: float | None,
        data_timeout: float | None = None,
    ) -> PipelinedReplies:
        if not recipients:
            raise ValueError("a transaction needs at least one recipient")
        commands = [
            b" ".join(
                [b"MAIL", b"FROM:" + _angle(mail_from).encode(encoding)]
                + [o.encode("ascii") for o in mail_options]
            )
        ]
        commands += [b"RCPT TO:" + _angle(r).encode(encoding) for r in recipients]
        for command in commands:
            if COMMAND_INJECTION_REGEX.search(command):
                raise ValueError("Command arg contains a prohibited control character")
        commands.append(b"DATA")

        if self.smtp.is_ehlo_or_helo_needed:
            await self.smtp._ehlo_or_helo_if_needed()
        protocol = self.smtp.protocol
        if protocol is None or protocol._command_lock is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        async with protocol._command_lock:
            reader = _Reader(protocol)
            protocol._buffer.clear()  # anything here was unsolicited: aiosmtplib drops it too
            protocol.data_received = reader.feed  # type: ignore[method-assign]
            _rebind(protocol)
            clean = False
            try:
                protocol.write(b"\r\n".join(commands) + b"\r\n")
                got = self.received
                for _ in range(len(commands)):
                    got.append(await reader.next(timeout))
                mail, rcpt, data_start = got[0], tuple(got[1:-1]), got[-1]
                final = None
                if data_start.code == 354:
                    anyone = mail.code == 250 and any(r.code in ACCEPTED_RCPT for r in rcpt)
                    if anyone:
                        self.phase = "DATA"
                        await self._write_content(protocol, data)
                        final = await reader.next(data_timeout)
                        got.append(final)
                    else:
                        protocol.write(b".\r\n")  # end the empty transaction, keep in step
                        await reader.next(timeout)
                clean = not reader.replies and not protocol._buffer
                return PipelinedReplies(mail, rcpt, data_start, final)
            finally:
                del protocol.data_received  # back to the class's method
                _rebind(protocol)
                if not clean:
                    # Timed out, dropped, or replies we cannot pair with a command.
                    self.smtp.close()

    async def _write_content(self, protocol: SMTPProtocol, data: bytes | bytearray) -> None:
        """Write ``data`` as aiosmtplib would (CRLF line ends, dot-stuffed, then "."),
        a slice at a time: each slice ends at a line end, so a line start within a
        slice is a line start in the message, and the transport's buffer is drained
        between slices instead of holding another copy of the whole message."""
        if len(data) <= CHUNK and _wire_ready(data):
            # The common case: already CRLF and nothing to dot-stuff (checked at C
            # speed); content and final dot leave in one write.
            protocol.write(bytes(data) + (b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n"))
            await protocol._drain_helper()
            return
        view = memoryview(data)
        start, size = 0, len(data)
        tail = b""
        while start < size:
            end = size if size - start <= CHUNK else (data.find(b"\n", start + CHUNK) + 1 or size)
            piece = LINE_ENDINGS_REGEX.sub(b"\r\n", view[start:end].tobytes())
            protocol.write(PERIOD_REGEX.sub(b"..", piece))
            tail, start = piece[-2:], end
            await protocol._drain_helper()
        protocol.write(b".\r\n" if tail == b"\r\n" else b"\r\n.\r\n")
        await protocol._drain_helper()


def _wire_ready(data: bytes | bytearray) -> bool:
    """True when ``data`` needs no change to go out as DATA content: every line ends
    in CRLF (no bare CR or LF) and no line starts with a dot."""
    crlf = data.count(b"\r\n")
    return (
        data.count(b"\n") == crlf
        and data.count(b"\r") == crlf
        and b"\n." not in data
        and not data.startswith(b".")
    )


async def send_pipelined(
    smtp: aiosmtplib.SMTP,
    mail_from: str,
    recipients: Sequence[str],
    data: bytes | bytearray,
    *,
    mail_options: Sequence[str] = (),
    encoding: str = "ascii",
    timeout: float | None = None,
    data_timeout: float | None = None,
) -> PipelinedReplies:
    """Send one envelope with PIPELINING; see ``Pipeline.send``."""
    return await Pipeline(smtp).send(
        mail_from,
        recipients,
        data,
        mail_options=mail_options,
        encoding=encoding,
        timeout=timeout,
        data_timeout=data_timeout,
    )
