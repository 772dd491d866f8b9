"""``mailqueue bounces serve``: an inbound SMTP endpoint for the bounce domain.

Point the bounce domain's MX (or a transport map) here. It accepts RCPT only
for addresses at ``MAILQUEUE_BOUNCE_DOMAIN`` (everything else: 550, it is no
relay), refuses messages over ``max_size`` at SIZE and DATA (552), answers 451 to a
client address past ``rate_per_minute`` reports a minute, and
answers 250 only once the report is recorded, one ``mq_bounce`` row per
envelope recipient. If the database is unreachable it answers 451, so the
sending MTA keeps the report and tries again: nothing is lost. The parser
never raises, so a hostile report cannot crash the endpoint; at most
``max_concurrent`` reports are recorded at a time.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from .config import Settings, get_settings
from .inbound import ingest

__all__ = ["BounceServer", "MAX_SIZE", "serve"]

log = logging.getLogger("mailqueue.bounces")

MAX_SIZE = 10 * 1024 * 1024
"""Largest report accepted (bytes). DSNs return at most ~50 kB of the original."""

RATE_PER_MINUTE = 600
"""Reports one client address may send per minute; more get 451 (the MTA retries)."""

MAX_RECIPIENTS = 20
"""Envelope recipients of one report (a bounce has one)."""


class _Handler:
    def __init__(self, server: BounceServer) -> None:
        self.server = server

    async def handle_MAIL(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        if not self.server.rate.allow(peer):
            return "451 4.7.1 too many reports from your address; try again later"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        domain = self.server.domain.lower()
        if address.rpartition("@")[2].lower() != domain:
            return f"550 5.7.1 relaying denied: this server takes mail for @{domain} only"
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        if isinstance(raw, str):  # pragma: no cover - decode_data is off
            raw = raw.encode("utf-8", "surrogateescape")
        async with self.server.slots:
            try:
                for rcpt in envelope.rcpt_tos:
                    record = await asyncio.to_thread(
                        ingest, raw, source="smtp", envelope_to=rcpt, settings=self.server.settings
                    )
                    self.server.on_record(record)
            except Exception as exc:  # noqa: BLE001 - the sender must keep the report
                log.warning("could not record a report (%s); answered 451", type(exc).__name__)
                return "451 4.3.0 could not record the report now; try again later"
        return "250 2.0.0 report recorded"


class _Rate:
    """At most ``per_minute`` reports (MAIL commands) per client address, per minute."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.window: dict[str, tuple[float, int]] = {}

    def allow(self, peer: str) -> bool:
        now = time.monotonic()
        start, count = self.window.get(peer, (now, 0))
        if now - start >= 60:
            start, count = now, 0
        if count >= self.per_minute:
            return False
        if len(self.window) > 10_000:  # many clients: forget the old windows
            self.window = {p: w for p, w in self.window.items() if now - w[0] < 60}
        self.window[peer] = (start, count + 1)
        return True


class BounceServer:
    """The endpoint on its own event loop (``start``/``stop``) or in the foreground."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        settings: Settings | None = None,
        max_size: int = MAX_SIZE,
        max_concurrent: int = 8,
        rate_per_minute: int = RATE_PER_MINUTE,
        on_record: Callable[[Any], None] = lambda record: None,
    ) -> None:
        self.settings = settings or get_settings()
        if self.settings.bounce_domain is None:
            raise ValueError(
                "MAILQUEUE_BOUNCE_DOMAIN is not set: set it (and MAILQUEUE_BOUNCE_SECRET) "
                "to the domain whose mail this endpoint takes"
            )
        self.domain = self.settings.bounce_domain
        self.host, self.port = host, port
        self.max_size = max_size
        self.max_concurrent = max_concurrent
        self.rate = _Rate(rate_per_minute)
        self.on_record = on_record
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def listen(self) -> None:
        loop = asyncio.get_running_loop()
        self.slots = asyncio.Semaphore(self.max_concurrent)
        handler = _Handler(self)

        def protocol() -> asyncio.BaseProtocol:
            return SMTP(
                handler,
                data_size_limit=self.max_size,
                enable_SMTPUTF8=True,
                decode_data=False,
                timeout=60,
                hostname=self.domain,
                loop=loop,
            )

        self._server = await loop.create_server(protocol, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    def start(self) -> BounceServer:
        """Listen on a loop in a background thread (for tests and embedding)."""
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self.listen())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="mailqueue-bounces", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        loop = self._loop

        async def close() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
            loop.stop()

        asyncio.run_coroutine_threadsafe(close(), loop)
        if self._thread is not None:
            self._thread.join(10)
        loop.close()
        self._loop = None


def serve(
    host: str, port: int, *, max_size: int = MAX_SIZE, rate_per_minute: int = RATE_PER_MINUTE
) -> None:
    """Run in the foreground until SIGINT/SIGTERM, printing a line per report."""

    def show(record: Any) -> None:
        what = record.effect or ("unparsed" if record.kind == "unparsed" else "recorded")
        print(
            f"{record.kind} {record.address or '-'}: {what} {record.reason or ''}".rstrip(),
            flush=True,
        )

    server = BounceServer(
        host, port, max_size=max_size, rate_per_minute=rate_per_minute, on_record=show
    )

    async def main() -> None:
        await server.listen()
        print(f"taking reports for @{server.domain} on {server.host}:{server.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        assert server._server is not None
        server._server.close()
        await server._server.wait_closed()

    asyncio.run(main())
