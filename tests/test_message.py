"""Composing messages: every feature of the classic SMTP libraries, round-tripped.

Each test composes a message, delivers it to the real dev SMTP server with
``send_now`` (the same pool and delivery code the workers use), parses what
the server received with the standard library's ``email`` parser, and
asserts on headers, parts, attachments and encodings.
"""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import mailqueue
from mailqueue import Attachment, InvalidMessageError, Message, extract_addresses
from mailqueue.cli import cli
from mailqueue.message import build_envelope

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def roundtrip(server, message: Message) -> tuple[EmailMessage, object]:
    """Send ``message`` now; return what the server received, parsed, and its envelope."""
    result = mailqueue.send_now(message)
    result.raise_for_error()
    received = server.messages[-1]
    parsed = email.message_from_bytes(received.data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed, received


@pytest.fixture(autouse=True)
def _relay(sqlite_stack):
    """Every test here sends through the dev server configured by the stack."""
    return sqlite_stack


# --------------------------------------------------------------------------- addresses


def test_addresses_with_display_names_in_any_language(smtp_server):
    parsed, received = roundtrip(
        smtp_server,
        Message(
            sender=("Zoë Ångström", "zoe@example.com"),
            to=['"Müller, Jürgen" <jm@example.com>', "plain@example.com"],
            cc=[("李小龙", "lee@example.com")],
            reply_to="Support <help@example.com>",
            sender_header="Robot <robot@example.com>",
            subject="s",
            text="t",
        ),
    )
    assert parsed["From"].addresses[0].display_name == "Zoë Ångström"
    assert [a.display_name for a in parsed["To"].addresses] == ["Müller, Jürgen", ""]
    assert parsed["Cc"].addresses[0].display_name == "李小龙"
    assert parsed["Reply-To"].addresses[0].addr_spec == "help@example.com"
    assert parsed["Sender"].addresses[0].addr_spec == "robot@example.com"
    assert received.data.isascii()  # non-ASCII names travel as RFC 2047 encoded words
    assert received.mail_from == "robot@example.com"  # Sender, when given, is the envelope
    assert set(received.rcpt_tos) == {"jm@example.com", "plain@example.com", "lee@example.com"}


def test_envelope_is_settable_apart_from_the_headers(smtp_server):
    parsed, received = roundtrip(
        smtp_server,
        Message(
            sender="news@example.com",
            to="Subscribers <list@example.com>",
            envelope_from="bounces+123@example.com",
            envelope_to=["ana@example.org", "bo@example.org"],
            subject="Newsletter",
            text="t",
        ),
    )
    assert received.mail_from == "bounces+123@example.com"
    assert received.rcpt_tos == ("ana@example.org", "bo@example.org")
    assert str(parsed["To"]) == "Subscribers <list@example.com>"


def test_null_reverse_path_for_bounces(smtp_server):
    _, received = roundtrip(
        smtp_server,
        Message(sender="mailer-daemon@example.com", to="x@example.com", envelope_from="", text="t"),
    )
    assert received.mail_from == ""


def test_special_use_domains_and_address_literals_reach_the_relay(smtp_server):
    """Django's default senders (webmaster@localhost, root@localhost), .local hosts and
    address literals: the relay decides, as Django's own SMTP backend lets it (#16)."""
    parsed, received = roundtrip(
        smtp_server,
        Message(
            sender="webmaster@localhost",
            to=["root@localhost", "Printer <a@printer.LOCAL>", "ops@[127.0.0.1]"],
            text="t",
        ),
    )
    assert received.mail_from == "webmaster@localhost"
    assert sorted(received.rcpt_tos) == ["a@printer.local", "ops@[127.0.0.1]", "root@localhost"]
    assert [a.addr_spec for a in parsed["To"].addresses] == [
        "root@localhost",
        "a@printer.local",
        "ops@[127.0.0.1]",
    ]


@pytest.mark.parametrize("address", ["a@localhost.", "a@.local", "a@x..local", "a b@localhost"])
def test_special_use_domains_still_need_valid_syntax(address):
    with pytest.raises(InvalidMessageError):
        build_envelope(Message(sender="a@example.com", to=[address], text="t"))


def test_bcc_is_delivered_and_appears_nowhere_in_the_bytes(smtp_server):
    _, received = roundtrip(
        smtp_server,
        Message(
            sender="a@example.com",
            to="to@example.com",
            cc="cc@example.com",
            bcc=["Secret Person <secret@example.com>", "hidden@example.com"],
            subject="s",
            text="t",
        ),
    )
    assert set(received.rcpt_tos) == {
        "to@example.com",
        "cc@example.com",
        "secret@example.com",
        "hidden@example.com",
    }
    lowered = received.data.lower()
    assert b"bcc" not in lowered and b"secret" not in lowered and b"hidden" not in lowered


def test_extract_addresses_handles_quotes_groups_and_comments():
    assert extract_addresses('you@there.com, "Bob" <bob@example.com>') == [
        "you@there.com",
        "bob@example.com",
    ]
    assert extract_addresses('"Doe, Jane" <jane@example.com>, x@example.com (Mr. X)') == [
        "jane@example.com",
        "x@example.com",
    ]
    assert extract_addresses("team: a@example.com, b@example.com;, c@example.com") == [
        "a@example.com",
        "b@example.com",
        "c@example.com",
    ]
    assert extract_addresses("undisclosed-recipients:;") == []


_local = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789._+-", min_size=1, max_size=20
).filter(lambda s: not s.startswith(".") and not s.endswith(".") and ".." not in s)
_domain = st.sampled_from(["example.com", "mail.example.org", "x.test"])
_name = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=30)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(_name, _local, _domain), min_size=1, max_size=5))
def test_extract_addresses_inverts_formatting(entries):
    """Whatever the display names (commas, quotes, any script), the bare addresses come back."""
    from email.headerregistry import Address

    header = ", ".join(str(Address(display_name=n, addr_spec=f"{u}@{d}")) for n, u, d in entries)
    assert extract_addresses(header) == [f"{u}@{d}" for _, u, d in entries]


_ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
_any_local = st.one_of(
    st.text(alphabet=_ATEXT + ".", min_size=0, max_size=12),
    st.text(alphabet=_ATEXT + '. "@<>()[],;:\\éü\u00a0\u0130', max_size=12),
    st.sampled_from(["Postmaster", "INFO", "abuse", "a" * 64, "a" * 65, "a" * 240, "x..y"]),
)
_label = st.text(alphabet="abcXYZ019-_", min_size=0, max_size=8)
_any_domain = st.one_of(
    st.lists(_label, min_size=1, max_size=4).map(".".join),
    st.sampled_from(
        [
            "Example.ORG",
            "example.com.",
            "localhost",
            "x.test",
            "a.invalid",
            "mail.example",
            "123.com",
            "a.b.123",
            "xn--bcher-kva.example",
            "ab--cd.example",
            "-a.example",
            "bücher.example",
            "ｅｘａｍｐｌｅ.com",
            "[127.0.0.1]",
            "[IPv6:::1]",
            "ex ample.com",
            "a" * 63 + ".com",
            "a" * 64 + ".com",
            ".".join(["abcdefghi"] * 25) + ".com",
            "",
        ]
    ),
)


@settings(max_examples=400, deadline=None)
@given(_any_local, _any_domain)
@example("a" * 242, "example.com")  # 254 characters: still valid
@example("a" * 243, "example.com")  # 255: too long
@example("Postmaster", "example.com")
def test_plain_addresses_get_the_validators_own_verdict(local, domain):
    """The shortcut for plain ASCII addresses answers exactly as email-validator would
    (normalised form, SMTPUTF8 need, valid or not), or leaves the address to it."""
    from mailqueue.message import _plain_ascii, _validator_verdict

    address = f"{local}@{domain}"
    shortcut = _plain_ascii(address)
    if shortcut is not None:
        assert (shortcut, False, None) == _validator_verdict(address)


def test_the_plain_address_shortcut_is_taken_for_everyday_addresses():
    from mailqueue.message import _plain_ascii

    assert _plain_ascii("Jane.Doe+news@Example.ORG") == "Jane.Doe+news@example.org"
    assert _plain_ascii("user1234@mail.example.com") == "user1234@mail.example.com"
    assert _plain_ascii("Postmaster@example.com") is None  # the validator lowercases it
    assert _plain_ascii("jörg@example.com") is None  # SMTPUTF8: the validator decides


def test_recipients_are_deduplicated_case_insensitively_first_kind_wins():
    env = build_envelope(
        Message(
            sender="a@example.com",
            to=["X@example.com"],
            cc=["x@EXAMPLE.com", "y@example.com"],
            bcc=["Y@example.com", "z@example.com"],
            text="t",
        )
    )
    assert [(r.address, r.kind) for r in env.recipients] == [
        ("X@example.com", "to"),
        ("y@example.com", "cc"),
        ("z@example.com", "bcc"),
    ]


# --------------------------------------------------------------------------- headers


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=120))
def test_subject_in_any_language_round_trips(subject):
    data = build_envelope(Message(sender="a@example.com", to="b@example.com", subject=subject)).data
    assert data.isascii()
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    # The parser unfolds; leading/trailing and repeated whitespace is not significant.
    assert " ".join(str(parsed.get("Subject", "")).split()) == " ".join(subject.split())


def test_custom_headers_as_mapping_or_list_and_generated_ids(smtp_server):
    parsed, _ = roundtrip(
        smtp_server,
        Message(
            sender="a@example.com",
            to="b@example.com",
            subject="s",
            text="t",
            headers=[
                ("X-Tag", "welcome"),
                ("X-Tag", "été"),
                ("List-Unsubscribe", "<mailto:u@x.org>"),
            ],
        ),
    )
    assert parsed.get_all("X-Tag") == ["welcome", "été"]
    assert parsed["List-Unsubscribe"] == "<mailto:u@x.org>"
    assert parsed["Message-ID"].endswith("@example.com>")
    assert parsed["Date"].datetime is not None

    parsed, _ = roundtrip(
        smtp_server,
        Message(
            sender="a@example.com",
            to="b@example.com",
            text="t",
            headers={"Message-ID": "<mine@example.com>", "X-Priority": "1"},
        ),
    )
    assert parsed["Message-ID"] == "<mine@example.com>"
    assert parsed["X-Priority"] == "1"


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(subject="hi\r\nBcc: victim@example.com"), "subject"),
        (dict(subject="hi\nX: y"), "subject"),
        (dict(headers={"X-Tag": "a\r\nInjected: yes"}), "headers"),
        (dict(headers={"X-Bad:Name": "v"}), "headers"),
        (dict(headers={"Bcc": "someone@example.com"}), "headers"),
        (dict(to=["Eve <eve@example.com>\r\nBcc: victim@example.com"]), "to"),
        (dict(to=[("Eve\r\nBcc: v@example.com", "eve@example.com")]), "to"),
        (dict(sender="a@example.com\nBcc: v@example.com"), "sender"),
        (dict(attachments=[Attachment(filename="a\r\nb.txt", content=b"x")]), "attachments"),
        (dict(to=["not an address"]), "to"),
        (dict(to=["a@b@example.com"]), "to"),
        (dict(to=[]), "to"),
        (dict(charset="no-such-charset"), "charset"),
    ],
)
def test_bad_input_is_an_error_never_a_new_header(fields, field):
    base = dict(sender="a@example.com", to=["b@example.com"], subject="s", text="t")
    base.update(fields)
    with pytest.raises(InvalidMessageError) as caught:
        build_envelope(Message(**base))
    assert caught.value.field == field


# --------------------------------------------------------------------------- bodies


def test_text_only_with_charset_and_subtype(smtp_server):
    parsed, _ = roundtrip(
        smtp_server,
        Message(
            sender="a@example.com",
            to="b@example.com",
            text="Grüße, naïve café",
            charset="iso-8859-1",
            text_subtype="markdown",
        ),
    )
    assert parsed.get_content_type() == "text/markdown"
    assert parsed.get_content_charset() == "iso-8859-1"
    assert parsed.get_content().strip() == "Grüße, naïve café"


def test_html_only_and_text_plus_html_alternative(smtp_server):
    parsed, _ = roundtrip(
        smtp_server, Message(sender="a@example.com", to="b@example.com", html="<p>Ünï</p>")
    )
    assert parsed.get_content_type() == "text/html"
    assert parsed.get_content().strip() == "<p>Ünï</p>"

    parsed, _ = roundtrip(
        smtp_server,
        Message(sender="a@example.com", to="b@example.com", text="plain ü", html="<b>rich ü</b>"),
    )
    assert parsed.get_content_type() == "multipart/alternative"
    assert parsed.get_body(("plain",)).get_content().strip() == "plain ü"
    assert parsed.get_body(("html",)).get_content().strip() == "<b>rich ü</b>"


def test_attachments_from_bytes_and_files_with_mime_types(smtp_server, tmp_path):
    pdf = tmp_path / "rapport été.pdf"
    pdf.write_bytes(b"%PDF-1.4 fake")
    parsed, _ = roundtrip(
        smtp_server,
        Message(
            sender="a@example.com",
            to="b@example.com",
            text="see attached",
            attachments=[
                Attachment.from_path(pdf),
                Attachment(filename="data.csv", content=b"a,b\r\n1,2\r\n"),
                Attachment(filename="blob", content=bytes(range(256))),
                Attachment(filename="x.bin", content=b"\0\1", content_type="application/x-custom"),
            ],
        ),
    )
    assert parsed.get_content_type() == "multipart/mixed"
    found = {p.get_filename(): p for p in parsed.iter_attachments()}
    assert found["rapport été.pdf"].get_content_type() == "application/pdf"
    assert found["rapport été.pdf"].get_content() == b"%PDF-1.4 fake"
    assert found["data.csv"].get_content_type() == "text/csv"
    assert found["blob"].get_content_type() == "application/octet-stream"
    assert found["blob"].get_content() == bytes(range(256))
    assert found["x.bin"].get_content_type() == "application/x-custom"


def test_inline_images_are_related_to_the_html_by_cid(smtp_server):
    parsed, _ = roundtrip(
        smtp_server,
        Message(
            sender="a@example.com",
            to="b@example.com",
            text="logo",
            html='<p><img src="cid:logo"></p>',
            attachments=[
                Attachment(filename="logo.png", content=PNG, inline=True, content_id="logo"),
                Attachment(filename="terms.txt", content=b"terms"),
            ],
        ),
    )
    html = parsed.get_body(("html",))
    related = next(p for p in parsed.walk() if p.get_content_type() == "multipart/related")
    image = next(p for p in related.iter_parts() if p.get_content_type() == "image/png")
    assert image["Content-ID"] == "<logo>"
    assert image.get_content_disposition() == "inline"
    assert image.get_content() == PNG
    assert 'src="cid:logo"' in html.get_content()
    assert [p.get_filename() for p in parsed.iter_attachments()] == ["terms.txt"]


def test_preamble_and_epilogue_frame_the_multipart(smtp_server):
    _, received = roundtrip(
        smtp_server,
        Message(
            sender="a@example.com",
            to="b@example.com",
            text="t",
            html="<p>h</p>",
            preamble="This is a MIME message.",
            epilogue="The end.",
        ),
    )
    parsed = email.message_from_bytes(received.data, policy=email.policy.default)
    assert parsed.preamble.strip() == "This is a MIME message."
    assert parsed.epilogue.strip() == "The end."


def test_a_ready_made_message_passes_through_untouched_apart_from_bcc(smtp_server):
    raw = (
        b"From: Ana <ana@example.com>\n"
        b"To: bo@example.com\n"
        b"Bcc: secret@example.com,\n"
        b"  other-secret@example.com\n"
        b"Subject: =?utf-8?q?caf=C3=A9?=\n"
        b"X-Custom:   spacing   kept\n"
        b"Content-Type: text/plain\n"
        b"\n"
        b"Body line 1\n"
        b".leading dot\n"
    )
    _, received = roundtrip(smtp_server, Message(eml=raw))
    assert received.mail_from == "ana@example.com"
    assert set(received.rcpt_tos) == {
        "bo@example.com",
        "secret@example.com",
        "other-secret@example.com",
    }
    expected = raw.replace(b"Bcc: secret@example.com,\n  other-secret@example.com\n", b"")
    assert received.data == expected.replace(b"\n", b"\r\n")


def test_a_nested_email_message_object_is_sent_as_built(smtp_server):
    inner = EmailMessage()
    inner["Subject"] = "forwarded"
    inner.set_content("inner body")
    outer = EmailMessage()
    outer["From"] = "a@example.com"
    outer["To"] = "b@example.com"
    outer["Subject"] = "Fwd: forwarded"
    outer.set_content("see below")
    outer.add_attachment(inner)  # message/rfc822 inside multipart/mixed
    outer.preamble = "nested"
    parsed, _ = roundtrip(smtp_server, Message(eml=outer, envelope_to=["c@example.com"]))
    assert smtp_server.messages[-1].rcpt_tos == ("c@example.com",)
    attached = next(parsed.iter_attachments())
    assert attached.get_content_type() == "message/rfc822"
    assert attached.get_content()["Subject"] == "forwarded"


# --------------------------------------------------------------------------- SMTP extensions


def test_international_mailbox_uses_smtputf8_when_offered(smtp_server):
    _, received = roundtrip(
        smtp_server,
        Message(sender="a@example.com", to="josé@example.com", subject="s", text="t"),
    )
    assert received.rcpt_tos == ("josé@example.com",)
    assert "SMTPUTF8" in received.mail_options


def test_international_domain_is_punycoded_without_smtputf8(smtp_server):
    _, received = roundtrip(
        smtp_server,
        Message(sender="a@example.com", to="ana@bücher.example", subject="s", text="t"),
    )
    assert received.rcpt_tos == ("ana@xn--bcher-kva.example",)
    assert "SMTPUTF8" not in received.mail_options


def test_smtputf8_needed_but_not_offered_is_a_clear_error(smtp_server):
    smtp_server.smtputf8 = False
    result = mailqueue.send_now(
        Message(sender="a@example.com", to="josé@example.com", subject="s", text="t")
    )
    assert type(result.error).__name__ == "DeliveryError"
    assert "SMTPUTF8" in str(result.error)
    assert [r.status for r in result.recipients] == ["failed"]
    assert smtp_server.messages == []


def test_advertised_size_is_sent_and_respected(smtp_server):
    smtp_server.max_size = 2000
    ok, received = roundtrip(
        smtp_server, Message(sender="a@example.com", to="b@example.com", text="small")
    )
    assert any(o.startswith("SIZE=") for o in received.mail_options)
    result = mailqueue.send_now(
        Message(sender="a@example.com", to="b@example.com", text="x" * 5000)
    )
    assert result.error is not None and result.error.code == 552
    assert "SIZE limit of 2000" in str(result.error)
    assert len(smtp_server.messages) == 1


# --------------------------------------------------------------------------- send now


def test_send_now_reports_each_recipient_like_the_classic_clients(smtp_server):
    smtp_server.reject = ["gone@*"]
    smtp_server.defer = ["busy@*"]
    result = mailqueue.send_now(
        Message(
            sender="a@example.com",
            to=["ok@example.com", "gone@example.com", "busy@example.com"],
            text="t",
        )
    )
    assert result.accepted == ["ok@example.com"]
    assert result.data_code == 250
    failed = {r.address: (r.status, r.code, r.enhanced_code) for r in result.rcpt_failed}
    assert failed == {
        "gone@example.com": ("failed", 550, "5.1.1"),
        "busy@example.com": ("deferred", 450, "4.2.0"),
    }
    with pytest.raises(mailqueue.RecipientError) as caught:
        mailqueue.send_now(
            Message(sender="a@example.com", to="gone@example.com", text="t")
        ).raise_for_error()
    assert caught.value.code == 550 and caught.value.retryable is False


# --------------------------------------------------------------------------- the command line


def test_cli_send_now_with_every_composition_flag(smtp_server, tmp_path):
    logo = tmp_path / "logo.png"
    logo.write_bytes(PNG)
    doc = tmp_path / "doc.txt"
    doc.write_text("document")
    result = CliRunner().invoke(
        cli,
        [
            "send", "--now",
            "--from", "Zoë <zoe@example.com>",
            "--to", "to@example.com",
            "--cc", "cc@example.com",
            "--bcc", "bcc@example.com",
            "--reply-to", "reply@example.com",
            "--sender", "robot@example.com",
            "--subject", "Grüße",
            "--text", "plain",
            "--html", '<img src="cid:logo">',
            "--inline", f"logo={logo}",
            "--attach", str(doc),
            "--header", "X-Campaign: spring",
            "--envelope-from", "bounce@example.com",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    received = smtp_server.messages[-1]
    assert received.mail_from == "bounce@example.com"
    assert set(received.rcpt_tos) == {"to@example.com", "cc@example.com", "bcc@example.com"}
    assert b"bcc@example.com" not in received.data
    parsed = email.message_from_bytes(received.data, policy=email.policy.default)
    assert str(parsed["Subject"]) == "Grüße"
    assert parsed["X-Campaign"] == "spring"
    assert parsed["Sender"] == "robot@example.com"
    assert any(p["Content-ID"] == "<logo>" for p in parsed.walk())
    assert [p.get_filename() for p in parsed.iter_attachments()] == ["doc.txt"]
    assert "sent" in result.output and "250" in result.output


def test_cli_send_now_exits_3_and_shows_the_refusal(smtp_server):
    smtp_server.reject = ["gone@*"]
    result = CliRunner().invoke(
        cli, ["send", "--now", "--from", "a@example.com", "--to", "gone@example.com", "--text", "t"]
    )
    assert result.exit_code == 3
    assert "550" in result.output and "gone@example.com" in result.output


@pytest.mark.parametrize("size", [0, 1, 57, 58, 57 * 1024, 57 * 1024 + 1, 300_001])
def test_attachment_bytes_survive_encoding_at_every_size(size):
    content = bytes((i * 7) % 256 for i in range(size))
    data = build_envelope(
        Message(
            sender="a@example.com",
            to="b@example.com",
            text="t",
            attachments=[Attachment(filename="f.bin", content=content)],
        )
    ).data
    assert all(len(line) <= 78 for line in data.split(b"\r\n"))
    assert b"\n" not in data.replace(b"\r\n", b"")
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    (part,) = parsed.iter_attachments()
    assert part.get_content() == content


def test_8bit_content_to_a_7bit_relay_is_a_clear_error_and_composed_mail_is_7bit(smtp_server):
    raw = "From: a@example.com\r\nTo: b@example.com\r\nSubject: s\r\n\r\ncafé\r\n".encode()
    smtp_server.eightbitmime = False
    result = mailqueue.send_now(Message(eml=raw))
    assert type(result.error).__name__ == "DeliveryError" and "8BITMIME" in str(result.error)
    assert smtp_server.messages == []
    # What mailqueue composes itself is always 7-bit clean, so it goes through.
    parsed, received = roundtrip(
        smtp_server, Message(sender="a@example.com", to="b@example.com", text="café")
    )
    assert received.data.isascii() and parsed.get_content().strip() == "café"
    smtp_server.eightbitmime = True
    _, received = roundtrip(smtp_server, Message(eml=raw))
    assert "BODY=8BITMIME" in received.mail_options and received.data == raw
