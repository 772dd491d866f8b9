"""The dev server's hooks and limits, as users who embed it from Python rely on them."""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest

from mailqueue.devserver import DevServer

DATA = b"Subject: s\r\n\r\nbody\r\n"


async def talk(server: DevServer, sender: str, recipients: list[str], data: bytes = DATA):
    smtp = aiosmtplib.SMTP(hostname=server.host, port=server.port, timeout=5, start_tls=False)
    await smtp.connect()
    try:
        return await smtp.sendmail(sender, recipients, data)
    finally:
        await smtp.quit()


def test_sender_and_recipient_hooks_accept_refuse_or_answer_their_own_reply():
    server = DevServer(
        on_sender=lambda a: a.endswith("@example.com") or "553 5.7.1 not our domain",
        on_recipient=lambda a: a != "nobody@example.com",
    ).start()
    try:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as caught:
            asyncio.run(talk(server, "x@elsewhere.org", ["a@example.com"]))
        assert (caught.value.code, caught.value.message) == (553, "5.7.1 not our domain")
        errors, _ = asyncio.run(
            talk(server, "app@example.com", ["a@example.com", "nobody@example.com"])
        )
        assert errors["nobody@example.com"][0] == 550
        (received,) = server.messages
        assert (received.mail_from, received.rcpt_tos) == ("app@example.com", ("a@example.com",))
    finally:
        server.stop()


def test_auth_hook_decides_and_mail_before_auth_is_refused():
    seen = []

    def on_auth(mechanism: str, user: str, secret: str) -> bool:
        seen.append((mechanism, user))
        return (user, secret) == ("bob", "pw")

    server = DevServer(on_auth=on_auth, require_auth=True, auth_over_plaintext=True).start()

    async def login(user: str, password: str):
        smtp = aiosmtplib.SMTP(hostname=server.host, port=server.port, timeout=5, start_tls=False)
        await smtp.connect()
        try:
            await smtp.ehlo()
            await smtp.auth_plain(user, password)
            return await smtp.sendmail("a@example.com", ["b@example.com"], DATA)
        finally:
            smtp.close()

    try:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as caught:
            asyncio.run(talk(server, "a@example.com", ["b@example.com"]))
        assert caught.value.code == 530  # authentication required
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            asyncio.run(login("bob", "wrong"))
        asyncio.run(login("bob", "pw"))
        assert seen == [("PLAIN", "bob"), ("PLAIN", "bob")]
        assert [m.auth_user for m in server.messages] == ["bob"]
        assert server.auth_attempts == [("PLAIN", "bob", False), ("PLAIN", "bob", True)]
    finally:
        server.stop()


def test_max_size_is_advertised_and_enforced():
    server = DevServer(max_size=1000).start()
    try:
        with pytest.raises(aiosmtplib.SMTPResponseException) as caught:
            asyncio.run(talk(server, "a@example.com", ["b@example.com"], DATA + b"x" * 2000))
        assert caught.value.code == 552
        assert server.messages == []
    finally:
        server.stop()


def test_binds_to_loopback_and_restarts_on_the_same_port(tmp_path):
    server = DevServer(maildir=tmp_path / "mail").start()
    try:
        assert server.host == "127.0.0.1"
        port = server.port
        asyncio.run(talk(server, "a@example.com", ["b@example.com"]))
        server.stop()
        server.start()
        assert server.port == port
        asyncio.run(talk(server, "a@example.com", ["c@example.com"]))
        assert len(server.messages) == 2
        stored = sorted((tmp_path / "mail" / "new").iterdir())
        assert len(stored) == 2
        assert b"Delivered-To: c@example.com" in b"".join(p.read_bytes() for p in stored)
    finally:
        server.stop()


def test_data_reply_fault_refuses_the_message():
    server = DevServer().start()
    server.faults.data_reply = "554 5.6.0 Message rejected as spam"
    try:
        with pytest.raises(aiosmtplib.SMTPDataError) as caught:
            asyncio.run(talk(server, "a@example.com", ["b@example.com"]))
        assert caught.value.code == 554
        assert server.messages == []
    finally:
        server.stop()
