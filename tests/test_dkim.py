"""DKIM: what the relay received verifies with the domain's public keys.

Messages go through the worker's own code (``Deliverer.deliver_batch``) to
the dev server, on both send paths (one command at a time, and PIPELINING),
and through a real ``mailqueue worker`` process once. Each received message
is verified with dkimpy against the test keys (RSA 2048 and Ed25519), served
by a ``dnsfunc`` in place of DNS.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import sqlite3
import subprocess
import sys
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import dkim
import nacl.signing
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import mailqueue
from mailqueue import Attachment, Message
from mailqueue.config import ConfigError, DkimKey, check_names, settings_from_env
from mailqueue.smtp.dkim import from_domain, load_signer
from mailqueue.worker.app import flush_dispatch
from mailqueue.worker.service import Deliverer

from .conftest import wait_until

RSA_SELECTOR = "mq2026"
ED_SELECTOR = "mq2026e"


@dataclass(frozen=True)
class KeyPair:
    rsa_pem: str
    rsa_public_b64: str
    ed_seed_b64: str
    ed_public_b64: str

    def dns(self, domain: str = "example.com"):
        """A dkimpy ``dnsfunc`` serving this domain's two public keys."""
        records = {
            f"{RSA_SELECTOR}._domainkey.{domain}.": f"v=DKIM1; k=rsa; p={self.rsa_public_b64}",
            f"{ED_SELECTOR}._domainkey.{domain}.": f"v=DKIM1; k=ed25519; p={self.ed_public_b64}",
        }

        def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
            record = records.get(name.decode("ascii"))
            return record.encode("ascii") if record else None

        return dnsfunc

    @property
    def secrets(self) -> list[str]:
        """Pieces of the private keys that must never show anywhere."""
        body = "".join(self.rsa_pem.strip().splitlines()[1:-1])
        return [body[40:100], body[-100:-40], self.ed_seed_b64]


@pytest.fixture(scope="module")
def keys() -> KeyPair:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode("ascii")
    public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    seed = nacl.signing.SigningKey.generate()
    return KeyPair(
        rsa_pem=pem,
        rsa_public_b64=base64.b64encode(public).decode("ascii"),
        ed_seed_b64=base64.b64encode(bytes(seed)).decode("ascii"),
        ed_public_b64=base64.b64encode(bytes(seed.verify_key)).decode("ascii"),
    )


def dkim_env(keys: KeyPair, tmp_path: Path, *, ed25519: bool = True) -> dict[str, str]:
    """The worker's environment for example.com: RSA key in a file, Ed25519 in a variable."""
    key_file = tmp_path / "example.com.rsa.pem"
    key_file.write_text(keys.rsa_pem)
    key_file.chmod(0o600)
    env = {
        "MAILQUEUE_DKIM__EXAMPLE_COM__SELECTOR": RSA_SELECTOR,
        "MAILQUEUE_DKIM__EXAMPLE_COM__KEY_FILE": str(key_file),
    }
    if ed25519:
        env["MAILQUEUE_DKIM__EXAMPLE_COM__ED25519_SELECTOR"] = ED_SELECTOR
        env["MAILQUEUE_DKIM__EXAMPLE_COM__ED25519_KEY"] = keys.ed_seed_b64
    return env


def with_dkim(stack, keys: KeyPair, tmp_path: Path, *, ed25519: bool = True):
    dkim_settings = settings_from_env(dkim_env(keys, tmp_path, ed25519=ed25519)).dkim
    return stack.reconfigure(dkim=dkim_settings)


def deliver(settings, store, ids) -> None:
    async def go() -> None:
        deliverer = Deliverer(settings, store)
        try:
            await deliverer.deliver_batch([uuid.UUID(str(i)) for i in ids])
        finally:
            await deliverer.aclose()

    asyncio.run(go())


def signatures(data: bytes) -> list[dict[bytes, bytes]]:
    """The tags of each DKIM-Signature header, top first."""
    d = dkim.DKIM(data)
    return [
        dkim.util.parse_tag_value(value)
        for name, value in d.headers
        if name.lower() == b"dkim-signature"
    ]


def verify_each(data: bytes, dnsfunc) -> list[bool]:
    """Each signature's verdict, top first (what ``dkim.verify`` says of the first one)."""
    d = dkim.DKIM(data)
    verdicts = []
    for i in range(len(signatures(data))):
        try:
            verdicts.append(bool(d.verify(idx=i, dnsfunc=dnsfunc)))
        except dkim.ValidationError:  # e.g. "body hash mismatch": dkim.verify's False
            verdicts.append(False)
    return verdicts


MESSAGES = {
    "plain": Message(
        sender="News <news@example.com>",
        to=["ann@example.org"],
        subject="plain text",
        text="Hello.\n.a line that starts with a dot\n..and two\n.\nend\n",
    ),
    "multipart with attachment": Message(
        sender="news@example.com",
        to=["ann@example.org"],
        cc=["bob@example.org"],
        reply_to=["help@example.com"],
        subject="with attachment",
        text="see attached",
        html="<p>see <b>attached</b></p>",
        attachments=[Attachment(filename="report.pdf", content=bytes(range(256)) * 200)],
        headers={
            "List-Unsubscribe": "<https://example.com/u/abc>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        },
    ),
    "non-ASCII headers": Message(
        sender=("Zoë Grünwald – Café", "news@example.com"),
        to=[("Jürgen Æther", "j@example.org")],
        subject="Grüße aus Köln — ½ price, 日本語の件名",
        text="Schöne Grüße\n",
    ),
    "long folded headers": Message(
        sender="news@example.com",
        to=[f"reader{i}@example.org" for i in range(40)],
        subject="a long subject " * 30,
        text="body\n" * 500,
        headers={"X-Campaign": "word " * 200},
    ),
    # Over the size the worker signs in a thread instead of on its event loop.
    "big, signed in a thread": Message(
        sender="news@example.com",
        to=["ann@example.org"],
        subject="a big one",
        text="see attached",
        attachments=[Attachment(filename="big.bin", content=bytes(range(256)) * 1600)],
    ),
}


@pytest.mark.both_paths
@pytest.mark.parametrize("kind", list(MESSAGES))
def test_what_the_relay_received_verifies_with_rsa_and_ed25519(
    kind, sqlite_stack, smtp_server, keys, tmp_path
):
    settings = with_dkim(sqlite_stack, keys, tmp_path)
    mid = mailqueue.enqueue(MESSAGES[kind])

    deliver(settings, sqlite_stack.store, [mid])

    assert mailqueue.get_status(mid).status == "sent"
    (received,) = {m.data for m in smtp_server.messages}  # one copy, whatever the recipients
    tags = signatures(received)
    assert [(t[b"a"], t[b"d"], t[b"s"], t[b"c"]) for t in tags] == [
        (b"rsa-sha256", b"example.com", RSA_SELECTOR.encode(), b"relaxed/relaxed"),
        (b"ed25519-sha256", b"example.com", ED_SELECTOR.encode(), b"relaxed/relaxed"),
    ]
    assert verify_each(received, keys.dns()) == [True, True]
    signed = [h.strip() for h in re.split(rb"\s*:\s*", tags[0][b"h"])]
    assert signed.count(b"from") == 2  # oversigned
    assert b"subject" in signed and b"message-id" in signed and b"mime-version" in signed
    if kind == "multipart with attachment":
        assert {b"cc", b"reply-to", b"list-unsubscribe", b"list-unsubscribe-post"} <= set(signed)


def test_with_a_bounce_domain_each_recipients_copy_verifies(
    sqlite_stack, smtp_server, keys, tmp_path, monkeypatch
):
    """VERP sends one transaction per recipient, each with its own return path; the
    bytes are the same for all (the return path is no header), so they are signed once
    and every copy the relay received carries that same valid signature."""
    monkeypatch.setenv("MAILQUEUE_BOUNCE_SECRET", "s" * 32)
    with_dkim(sqlite_stack, keys, tmp_path)
    settings = sqlite_stack.reconfigure(bounce_domain="bounce.example.com")
    mid = mailqueue.enqueue(MESSAGES["multipart with attachment"])

    deliver(settings, sqlite_stack.store, [mid])

    assert mailqueue.get_status(mid).status == "sent"
    copies = smtp_server.messages
    assert sorted(a for m in copies for a in m.rcpt_tos) == ["ann@example.org", "bob@example.org"]
    assert len({m.mail_from for m in copies}) == 2  # a return path each
    assert all(m.mail_from.endswith("@bounce.example.com") for m in copies)
    (received,) = {m.data for m in copies}
    assert verify_each(received, keys.dns()) == [True, True]


@pytest.mark.both_paths
def test_a_raw_message_with_dots_and_bare_line_feeds_verifies(
    sqlite_stack, smtp_server, keys, tmp_path
):
    settings = with_dkim(sqlite_stack, keys, tmp_path, ed25519=False)
    eml = (
        b"From: news@example.com\nTo: ann@example.org\nSubject: raw\n"
        b"Message-ID: <raw-1@example.com>\nDate: Sat, 05 Dec 2026 22:00:00 +0000\n\n"
        b".\n..\n.dot first\ntrailing spaces   \n\n\n"
    )
    mid = mailqueue.enqueue(Message(eml=eml, envelope_to=["ann@example.org"]))

    deliver(settings, sqlite_stack.store, [mid])

    (received,) = [m.data for m in smtp_server.messages]
    assert b"\r\n.dot first\r\n" in received  # unstuffed by the server, as it went in
    assert verify_each(received, keys.dns()) == [True]


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda d: d.replace(b"Hello.", b"Hello!"), id="body"),
        pytest.param(
            lambda d: d.replace(b"Subject: plain text", b"Subject: plain text!"), id="subject"
        ),
        pytest.param(
            lambda d: d.replace(b"\r\n\r\n", b"\r\nFrom: evil@example.net\r\n\r\n", 1),
            id="a second From",
        ),
    ],
)
def test_a_tampered_message_fails_verification(tamper, sqlite_stack, smtp_server, keys, tmp_path):
    settings = with_dkim(sqlite_stack, keys, tmp_path)
    mid = mailqueue.enqueue(MESSAGES["plain"])
    deliver(settings, sqlite_stack.store, [mid])
    (received,) = [m.data for m in smtp_server.messages]
    assert verify_each(received, keys.dns()) == [True, True]

    changed = tamper(received)

    assert changed != received
    assert verify_each(changed, keys.dns()) == [False, False]


def test_a_domain_without_a_key_is_sent_unsigned(sqlite_stack, smtp_server, keys, tmp_path, caplog):
    settings = with_dkim(sqlite_stack, keys, tmp_path)
    mid = mailqueue.enqueue(
        Message(sender="app@other.example", to=["ann@example.org"], subject="s", text="t")
    )
    with caplog.at_level(logging.DEBUG, logger="mailqueue"):
        deliver(settings, sqlite_stack.store, [mid])

    assert mailqueue.get_status(mid).status == "sent"
    (received,) = [m.data for m in smtp_server.messages]
    assert b"DKIM-Signature" not in received
    assert any(
        "no DKIM key for its From domain other.example" in r.getMessage()
        and r.levelno == logging.DEBUG
        for r in caplog.records
    )


def test_the_signing_domain_is_the_header_from_domain():
    assert from_domain(b'To: a@b.example\r\nFrom: "A, B" <x@Mail.Example.COM>\r\n') == (
        "mail.example.com"
    )
    assert from_domain(b"From:\r\n  Name\r\n <x@example.com>\r\nTo: y@z.example\r\n") == (
        "example.com"
    )
    assert from_domain(b"From: x@b\xc3\xbccher.example\r\n") == "xn--bcher-kva.example"
    assert from_domain(b"To: a@b.example\r\n") is None


def test_keys_never_reach_rows_payloads_logs_or_reprs(
    sqlite_stack, keys, tmp_path, smtp_server, caplog
):
    """Rows, the embedded broker's task rows, logs at DEBUG, reprs, the CLI's --json."""
    stack = sqlite_stack
    if True:
        settings = with_dkim(stack, keys, tmp_path)
        env = dkim_env(keys, tmp_path)
        with caplog.at_level(logging.DEBUG):
            mid = mailqueue.enqueue(MESSAGES["plain"])
            flush_dispatch()
            deliver(settings, stack.store, [mid])
        (received,) = [m.data for m in smtp_server.messages]
        assert verify_each(received, keys.dns()) == [True, True]

        seen = {
            "repr(settings)": repr(settings),
            "str(settings)": str(settings),
            "repr(settings.dkim)": repr(settings.dkim),
            "describe": repr([k.describe() for k in settings.dkim.values()]),
            "repr(signer)": repr(vars(load_signer(settings))),
            "logs": "\n".join(r.getMessage() for r in caplog.records),
            "rows": _dump_sqlite(Path(settings.database_url.removeprefix("sqlite:///"))),
            "task payloads": _dump_sqlite(
                Path(settings.broker_url.removeprefix("sqla+sqlite:///"))
            ),
            "received": received.decode("latin-1"),
        }
        # The dumps hold what they should: the message, and its id in the task.
        assert uuid.UUID(mid).hex in seen["rows"] and "plain text" in seen["rows"]
        assert str(mid) in seen["task payloads"], seen["task payloads"][:2000]
        leaks = [where for where, text in seen.items() for s in keys.secrets if s in text]
        assert not leaks

        # The CLI's own views of the worker's settings.
        out = subprocess.run(
            [sys.executable, "-m", "mailqueue", "relays", "--json"],
            env={**stack.env(), **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert not [s for s in keys.secrets if s in out.stdout + out.stderr]


def _dump_sqlite(path: Path) -> str:
    """Every value of every table of a SQLite file, as text."""
    db = sqlite3.connect(path)
    try:
        parts = []
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'"):
            for row in db.execute(f'SELECT * FROM "{table}"'):
                for value in row:
                    if isinstance(value, bytes):
                        value = value.decode("latin-1")
                    parts.append(str(value))
        return "\n".join(parts)
    finally:
        db.close()


@pytest.mark.slow
def test_a_real_worker_signs_what_it_sends(sqlite_stack, smtp_server, keys, tmp_path, spawn):
    spawn(
        "worker",
        "--concurrency",
        "1",
        "--loglevel",
        "WARNING",
        env=sqlite_stack.env(**dkim_env(keys, tmp_path)),
    )
    mid = mailqueue.enqueue(MESSAGES["multipart with attachment"])
    wait_until(lambda: mailqueue.get_status(mid).status == "sent", timeout=60, what="delivery")
    (received,) = {m.data for m in smtp_server.messages}
    assert verify_each(received, keys.dns()) == [True, True]


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("KEY_FILE", "/nonexistent/dkim.pem", "cannot read MAILQUEUE_DKIM__EXAMPLE_COM__KEY_FILE"),
        ("KEY", "-----BEGIN RSA PRIVATE KEY-----\nTOPSECRETMATERIAL\n-----END RSA PRIVATE KEY-----",
         "is not an RSA private key"),
    ],
)  # fmt: skip
def test_a_key_that_cannot_be_loaded_stops_the_worker_with_exit_2(
    option, value, words, sqlite_stack, tmp_path
):
    env = sqlite_stack.env(
        MAILQUEUE_DKIM__EXAMPLE_COM__SELECTOR=RSA_SELECTOR,
        **{f"MAILQUEUE_DKIM__EXAMPLE_COM__{option}": value},
    )
    done = subprocess.run(
        [sys.executable, "-m", "mailqueue", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "DKIM" in line]
    assert len(errors) == 1 and words in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert "TOPSECRETMATERIAL" not in done.stdout + done.stderr


def test_an_ed25519_key_that_is_not_one_is_refused(keys, tmp_path):
    env = dkim_env(keys, tmp_path)
    env["MAILQUEUE_DKIM__EXAMPLE_COM__ED25519_KEY"] = "bm90IGEga2V5"
    with pytest.raises(ConfigError, match="ED25519_KEY\\) is not an Ed25519 private key") as err:
        load_signer(settings_from_env(env))
    assert "bm90IGEga2V5" not in str(err.value)


def test_the_names_and_their_mistakes(keys, tmp_path):
    check_names(["MAILQUEUE_DKIM__EXAMPLE_COM__ED25519_KEY_FILE"], "environment")
    misspelt = "MAILQUEUE_DKIM__EXAMPLE_COM__" + "SELECTR"
    with pytest.raises(ConfigError, match="did you mean MAILQUEUE_DKIM__EXAMPLE_COM__SELECTOR"):
        settings_from_env({misspelt: "s"})
    with pytest.raises(ConfigError, match="set MAILQUEUE_DKIM__EXAMPLE_COM__SELECTOR"):
        settings_from_env({"MAILQUEUE_DKIM__EXAMPLE_COM__KEY": keys.rsa_pem})
    with pytest.raises(ConfigError, match="set one of MAILQUEUE_DKIM__EXAMPLE_COM__KEY_FILE"):
        settings_from_env({"MAILQUEUE_DKIM__EXAMPLE_COM__SELECTOR": "s"})
    # A domain with a '-' is named by its DOMAIN option.
    settings = settings_from_env(
        {
            "MAILQUEUE_DKIM__SHOP__DOMAIN": "my-shop.example",
            "MAILQUEUE_DKIM__SHOP__SELECTOR": "s1",
            "MAILQUEUE_DKIM__SHOP__KEY": keys.rsa_pem.replace("\n", "\\n"),  # one line
        }
    )
    assert list(settings.dkim) == ["my-shop.example"]
    assert load_signer(settings) is not None
    assert repr(settings.dkim["my-shop.example"]) == (
        "DkimKey(domain='my-shop.example', selector='s1', ed25519_selector=None)"
    )
    assert isinstance(replace(settings.dkim["my-shop.example"]), DkimKey)
    assert load_signer(settings_from_env({})) is None


def test_a_weak_rsa_key_is_refused():
    # cryptography will not make one that short any more; openssl still does
    pem = subprocess.run(
        ["openssl", "genrsa", "768"], capture_output=True, text=True, check=True
    ).stdout
    settings = settings_from_env(
        {"MAILQUEUE_DKIM__EXAMPLE_COM__SELECTOR": "s", "MAILQUEUE_DKIM__EXAMPLE_COM__KEY": pem}
    )
    with pytest.raises(ConfigError, match="has 768 bits"):
        load_signer(settings)


def test_rows_hold_the_message_unsigned(sqlite_stack, smtp_server, keys, tmp_path):
    """Signing happens at delivery: the stored content has no signature (keys can rotate)."""
    settings = with_dkim(sqlite_stack, keys, tmp_path)
    mid = mailqueue.enqueue(MESSAGES["plain"])
    deliver(settings, sqlite_stack.store, [mid])
    with sqlite_stack.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM mq_message")).all()
    assert rows and "DKIM-Signature" not in repr(rows)
    assert b"DKIM-Signature" in smtp_server.messages[0].data


def test_the_openssl_rsa_signature_is_the_one_dkimpy_would_write(keys, tmp_path, monkeypatch):
    """The worker has OpenSSL make the RSA signature; PKCS #1 v1.5 gives the same bytes."""
    monkeypatch.setattr(dkim.time, "time", lambda: 1_800_000_000.0)  # one t= for both
    signer = load_signer(settings_from_env(dkim_env(keys, tmp_path, ed25519=False)))
    assert signer is not None
    data = (
        b"From: news@example.com\r\nTo: a@example.org\r\nSubject: same\r\n"
        b"Date: Sat, 05 Dec 2026 22:00:00 +0000\r\n\r\nbody\r\n"
    )
    ours = signer.sign(data).data
    theirs = dkim.sign(
        data,
        RSA_SELECTOR.encode(),
        b"example.com",
        keys.rsa_pem.encode(),
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"to", b"subject", b"date", b"from"],
    )
    assert ours == theirs + data


@pytest.mark.both_paths
def test_a_relay_that_requires_dkim_fails_what_it_cannot_sign(
    sqlite_stack, smtp_server, keys, tmp_path
):
    """``dkim=required`` on a relay: no key for the From domain, nothing sent, a clear error."""
    settings = with_dkim(sqlite_stack, keys, tmp_path)
    strict = replace(settings.relays["bulk"], dkim="required")
    settings = sqlite_stack.reconfigure(relays={"bulk": strict})
    signed = mailqueue.enqueue(MESSAGES["plain"], relay="bulk")
    unsigned = mailqueue.enqueue(
        Message(sender="app@other.example", to=["ann@example.org"], subject="s", text="t"),
        relay="bulk",
    )

    deliver(settings, sqlite_stack.store, [signed, unsigned])

    assert [verify_each(m.data, keys.dns()) for m in smtp_server.messages] == [[True, True]]
    info = mailqueue.get_status(unsigned)
    assert info.status == "failed"
    assert "requires DKIM (dkim=required)" in (info.last_reply or "")
    assert "other.example has no DKIM key" in (info.last_reply or "")
    assert "MAILQUEUE_DKIM__OTHER_EXAMPLE__SELECTOR" in (info.last_reply or "")
    assert mailqueue.get_status(signed).status == "sent"


def test_the_relay_option_is_checked():
    with pytest.raises(ConfigError, match="dkim must be optional or required"):
        settings_from_env(
            {"MAILQUEUE_RELAY__BULK__URL": "smtp://x", "MAILQUEUE_RELAY__BULK__DKIM": "yes"}
        )
    settings = settings_from_env(
        {"MAILQUEUE_RELAY__BULK__URL": "smtp://x", "MAILQUEUE_RELAY__BULK__DKIM": "required"}
    )
    assert settings.relays["bulk"].dkim == "required" and settings.relay.dkim == "optional"
