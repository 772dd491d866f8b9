"""The header block: what mailqueue writes reads back as what the caller gave, or nothing is sent.

``headers.py`` writes the top header fields itself and ``check_block`` reads
the finished block back. These tests hold both to that: hostile display
names and subjects read back the same through the ``email`` package's
parser; a writer that goes wrong (the CPython bugs it replaces, simulated)
is caught by the check; control characters hidden in encoded words, several
addresses in one entry and oversized input are refused with the field named.
"""

from __future__ import annotations

import email
import email.policy
from email.headerregistry import Address
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mailqueue.message as message_module
from mailqueue import HeaderInjectionError, InvalidMessageError, Message, extract_addresses
from mailqueue.headers import CONTROL, Field, address_field, check_block, refuse_controls
from mailqueue.message import Limits, build_envelope

# Text rich in what breaks header writers: quotes, commas, encoded-word syntax,
# backslashes, angle brackets, non-ASCII, long words; never a control character.
HOSTILE = st.lists(
    st.one_of(
        st.sampled_from(list('"\\,;:<>()@=?_ \t.[]')),
        st.sampled_from(["=?", "?=", "?q?", "?b?", "=?utf-8?q?", "=0D", "=0A", "é", "日", "𐀀"]),
        st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")),
        st.text(alphabet="abcdefghij", min_size=60, max_size=120),  # long words
    ),
    max_size=40,
).map("".join)


def _hides_a_control(value: str) -> bool:
    try:
        refuse_controls(value, "test")
    except HeaderInjectionError:
        return True
    return False


def as_read(text: str) -> str:
    """What a reader makes of ``text`` in an unstructured field."""
    if "=?" not in text or not text.isascii():
        return text
    return str(email.policy.default.header_factory("X-Note", text))


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


def squash(text: str) -> str:
    return "".join(text.split())


@settings(max_examples=300, deadline=None)
@given(name=HOSTILE, subject=HOSTILE, note=HOSTILE)
def test_hostile_names_and_subjects_read_back_as_given(name, subject, note):
    if any(_hides_a_control(v) for v in (name, subject, note)):
        with pytest.raises(HeaderInjectionError):
            build_envelope(Message(sender="a@example.com", to=[(name, "a@example.org")], text="t",
                                   subject=subject, headers={"X-Note": note}))  # fmt: skip
        return
    env = build_envelope(
        Message(
            sender=("Shop", "shop@example.com"),
            to=[(name, "ana@example.org"), "bob@example.org"],
            reply_to=[(note, "help@example.com")],
            subject=subject,
            headers={"X-Note": note},
            text="body",
        )
    )
    assert [r.address for r in env.recipients] == ["ana@example.org", "bob@example.org"]
    head = env.data.partition(b"\r\n\r\n")[0]
    assert head.isascii()
    assert all(len(line) <= 998 for line in head.split(b"\r\n"))
    parsed = parse(env.data)
    to = parsed["To"].addresses
    assert [a.addr_spec for a in to] == ["ana@example.org", "bob@example.org"]
    assert squash(to[0].display_name) == squash(name)
    assert [a.addr_spec for a in parsed["Reply-To"].addresses] == ["help@example.com"]
    # Text is written as given; "=?…?=" in it is the caller's encoded word, which
    # readers decode (Django 5.2 hands over subjects encoded that way).
    assert squash(str(parsed.get("Subject", ""))) == squash(as_read(subject))
    assert squash(str(parsed["X-Note"])) == squash(as_read(note))
    names = [n.lower() for n in parsed]
    assert names == [
        "from", "to", "reply-to", *(["subject"] if subject else []), "date", "message-id",
        "x-note", "mime-version", "content-type", "content-transfer-encoding",
    ]  # fmt: skip
    assert parsed.get_content().strip() == "body"


def test_a_quoted_name_with_a_comma_stays_one_address_however_long():
    name = "evil@attacker.test, Customer Service Department of Example Shop International"
    for to in ([(name, "ana@example.org")], [f'"{name}" <ana@example.org>']):
        env = build_envelope(Message(sender="a@example.com", to=to, text="t"))
        assert [r.address for r in env.recipients] == ["ana@example.org"]
        (only,) = parse(env.data)["To"].addresses
        assert (only.display_name, only.addr_spec) == (name, "ana@example.org")


# ------------------------------------------------------------------ the check catches a writer


def test_the_check_refuses_a_writer_that_drops_the_quotes_of_a_name(monkeypatch):
    """gh-80222, simulated: a folded quoted name written without its quotes."""
    real = message_module.address_field

    def unquoting(name, addresses):
        return real(name, addresses).replace('"', "")

    monkeypatch.setattr(message_module, "address_field", unquoting)
    name = "evil@attacker.test, Customer Service"
    with pytest.raises(HeaderInjectionError) as caught:
        build_envelope(Message(sender="a@example.com", to=[(name, "ana@example.org")], text="t"))
    assert caught.value.field == "headers"
    assert "To reads back as" in str(caught.value)


def test_the_check_refuses_a_writer_that_decodes_encoded_words(monkeypatch):
    """CVE-2024-6923, simulated: a writer that puts what an encoded word means on the wire."""
    monkeypatch.setattr(
        message_module, "_text_field", lambda name, value: f"{name}: x\r\nBcc: evil@attacker.test"
    )
    with pytest.raises(HeaderInjectionError, match="bcc"):
        build_envelope(Message(sender="a@example.com", to="ana@example.org", subject="s", text="t"))


def test_the_check_refuses_a_blank_line_that_would_replace_the_body(monkeypatch):
    monkeypatch.setattr(
        message_module,
        "_text_field",
        lambda name, value: f"{name}: x\r\nContent-Type: text/html\r\n\r\n<h1>owned</h1>",
    )
    with pytest.raises(HeaderInjectionError):
        build_envelope(Message(sender="a@example.com", to="ana@example.org", subject="s", text="t"))


# --------------------------------------------------------------------------- refused at the input

ENCODED_CONTROLS = [
    "=?utf-8?q?x=0D=0ABcc:_evil@attacker.test?=",
    "=?utf-8?q?x=0ABcc:_evil@attacker.test?=",
    "=?utf-8?q?x=0DBcc:_evil@attacker.test?=",
    "=?utf-8?Q?x=00y?=",
    "=?utf-8?b?eA0KQmNjOiBldmlsQGF0dGFja2VyLnRlc3Q=?=",  # x\r\nBcc: evil@attacker.test
    "=?utf-8?b?eA0KQmNjOiBldmlsQGF0dGFja2VyLnRlc3Q?=",  # the same, its padding dropped
    "=?utf-8?q?x=0D=0A Bcc:_evil@attacker.test?=",  # whitespace inside: still decoded
    "abc=?utf-8?q?=0A?=def",  # inside an atom: still decoded
    "=?cp500?q?=25?=",  # EBCDIC: 0x25 is LF
    "=?utf-16-le?b?CgA=?=",  # UTF-16: LF
    "=?utf-8?q?=E2=80=A8?=",  # U+2028 LINE SEPARATOR
    "=?utf-8*en?q?=0A?=",  # RFC 2231 language tag
]


@pytest.mark.parametrize("word", ENCODED_CONTROLS)
@pytest.mark.parametrize("where", ["subject", "header", "name", "name-string", "filename"])
def test_encoded_words_that_decode_to_a_control_are_refused_everywhere(word, where):
    fields: dict = dict(sender="a@example.com", to=["ana@example.org"], text="t", html="<p>h</p>")
    if where == "subject":
        fields["subject"] = word
    elif where == "header":
        fields["headers"] = {"In-Reply-To": word}
    elif where == "name":
        fields["to"] = [(word, "ana@example.org")]
    elif where == "name-string":
        fields["to"] = [f"{word} <ana@example.org>"]
    else:
        fields["attachments"] = [message_module.Attachment(filename=word, content=b"x")]
    with pytest.raises(HeaderInjectionError):
        build_envelope(Message(**fields))


def test_harmless_encoded_words_pass_as_the_caller_wrote_them():
    env = build_envelope(
        Message(
            sender="a@example.com",
            to=["=?utf-8?q?Ana_Mar=C3=ADa?= <ana@example.org>"],
            subject="=?utf-8?q?Caf=C3=A9?=",  # pre-encoded, as Django 5.2 writes it
            text="t",
        )
    )
    parsed = parse(env.data)
    assert parsed["To"].addresses[0].display_name == "Ana María"
    assert str(parsed["Subject"]) == "Café"


@pytest.mark.parametrize(
    "entry",
    [
        "victim@example.com, attacker@evil.com",
        "victim@example.com; attacker@evil.com",
        "Friends: victim@example.com, attacker@evil.com;",
        '"V" <victim@example.com>, attacker@evil.com',
        ("Victim", "victim@example.com, attacker@evil.com"),
        ("Victim", "<victim@example.com>"),
    ],
)
@pytest.mark.parametrize("field", ["to", "cc", "bcc", "reply_to", "envelope_to"])
def test_one_entry_holds_one_address(entry, field):
    fields: dict = dict(sender="a@example.com", to=["ana@example.org"], text="t")
    fields[field] = [entry]
    with pytest.raises(InvalidMessageError) as caught:
        build_envelope(Message(**fields))
    assert caught.value.field == field


def test_a_bare_string_is_one_entry_too_and_extract_addresses_splits_on_purpose():
    with pytest.raises(InvalidMessageError, match="extract_addresses"):
        build_envelope(Message(sender="a@example.com", to="a@example.org, b@example.org", text="t"))
    split = extract_addresses('a@example.org, "B, Jr" <b@example.org>')
    assert split == ["a@example.org", "b@example.org"]
    env = build_envelope(Message(sender="a@example.com", to=split, text="t"))
    assert [r.address for r in env.recipients] == split


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"headers": {"X-Tag\n": "v"}}, "headers"),
        ({"headers": {"X-Tag\r": "v"}}, "headers"),
        ({"headers": {"X Tag": "v"}}, "headers"),
        ({"headers": {"": "v"}}, "headers"),
        ({"headers": {"X-Tag": 5}}, "headers"),
        ({"headers": [("X-Tag",)]}, "headers"),
        ({"text_subtype": "plain\0"}, "text_subtype"),
        ({"text_subtype": "plain; x=y"}, "text_subtype"),
        ({"charset": "utf-8\r\nX: y"}, "charset"),
        ({"text": "a\0b"}, "text"),
        ({"html": "<p>\0</p>"}, "html"),
        ({"attachments": [message_module.Attachment(filename="a\0.txt", content=b"")]}, None),
        (
            {
                "attachments": [
                    message_module.Attachment(
                        filename="a", content=b"", content_type="text/plain\0"
                    )
                ]
            },  # noqa: E501
            "attachments",
        ),
        (
            {
                "attachments": [
                    message_module.Attachment(filename="a", content=b"", content_type="text")
                ]
            },  # noqa: E501
            "attachments",
        ),
        (
            {
                "attachments": [
                    message_module.Attachment(filename="a b\u2028", content=b"", inline=True)
                ]
            },  # noqa: E501
            "attachments",
        ),
        ({"to": ["to@"]}, "to"),
        ({"to": ["@x.org"]}, "to"),
        ({"to": ['"unterminated <a@x.org']}, "to"),
        ({"to": ["<>"]}, "to"),
        ({"to": [5]}, "to"),
        ({"to": [("a", "b", "c")]}, "to"),
        ({"to": 5}, "to"),
    ],
)
def test_bad_input_is_an_invalid_message_error_naming_the_field(fields, field):
    base: dict = dict(sender="a@example.com", to=["ana@example.org"], text="t", html="<p>h</p>")
    base.update(fields)
    with pytest.raises(InvalidMessageError) as caught:
        build_envelope(Message(**base))
    assert caught.value.field == (field or "attachments")


def test_a_non_message_is_refused_not_an_attribute_error():
    for thing in ({}, None, "mail"):
        with pytest.raises(InvalidMessageError):
            build_envelope(thing)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- limits


def test_a_huge_subject_is_refused_by_its_length_before_any_composing(monkeypatch):
    def never(*_a, **_k):
        raise AssertionError("composed a value that is over the limit")

    monkeypatch.setattr(message_module, "_text_field", never)
    with pytest.raises(InvalidMessageError, match="MAILQUEUE_MAX_HEADER_LENGTH") as caught:
        build_envelope(Message(sender="a@example.com", to="b@example.org", subject="x" * 10**6))
    assert caught.value.field == "subject"


def test_limits_are_settings_and_the_limit_itself_is_accepted():
    limits = Limits(max_header_length=50, max_headers=3, max_recipients=4, max_header_block=2000)

    def env(**fields):
        base: dict = dict(sender="a@example.com", to=["b@example.org"], text="t")
        base.update(fields)
        return build_envelope(Message(**base), limits=limits)

    env(subject="s" * 50)
    with pytest.raises(InvalidMessageError, match="50-character"):
        env(subject="s" * 51)
    env(headers={f"X-{i}": "v" for i in range(3)})
    with pytest.raises(InvalidMessageError, match="MAILQUEUE_MAX_HEADERS"):
        env(headers={f"X-{i}": "v" for i in range(4)})
    env(to=[f"r{i}@example.org" for i in range(4)])
    with pytest.raises(InvalidMessageError, match="MAILQUEUE_MAX_RECIPIENTS"):
        env(to=[f"r{i}@example.org" for i in range(3)], bcc=["x@example.org", "y@example.org"])
    small_block = Limits(max_header_block=400)
    fits = Message(sender="a@example.com", to="b@example.org", headers={"X-1": "v" * 100})
    build_envelope(fits, limits=small_block)
    with pytest.raises(InvalidMessageError, match="MAILQUEUE_MAX_HEADER_BLOCK"):
        build_envelope(
            Message(sender="a@example.com", to="b@example.org", headers={"X-1": "v" * 400}),
            limits=small_block,
        )
    with pytest.raises(InvalidMessageError, match="MAILQUEUE_MAX_RECIPIENTS"):
        env(to=[f"r{i}@example.org" for i in range(100_000)])


def test_the_limits_come_from_the_environment():
    from mailqueue.config import settings_from_env

    s = settings_from_env(
        {
            "MAILQUEUE_MAX_HEADER_LENGTH": "100",
            "MAILQUEUE_MAX_HEADERS": "5",
            "MAILQUEUE_MAX_HEADER_BLOCK": "4096",
            "MAILQUEUE_MAX_RECIPIENTS": "7",
        }
    )
    assert s.limits == Limits(
        max_header_length=100, max_headers=5, max_header_block=4096, max_recipients=7
    )


# --------------------------------------------------------------------------- ready-made messages


def test_an_email_object_whose_serializer_splits_a_name_goes_out_as_one_address():
    msg = EmailMessage()
    msg["From"] = "shop@example.com"
    msg["To"] = (
        '"evil@attacker.test, Customer Service Department of Example Shop International"'
        " <ana@example.org>"
    )
    msg["Subject"] = "Your order"
    msg.set_content("body")
    env = build_envelope(Message(eml=msg))
    assert [r.address for r in env.recipients] == ["ana@example.org"]
    assert [a.addr_spec for a in parse(env.data)["To"].addresses] == ["ana@example.org"]


def test_an_email_object_with_an_encoded_line_break_is_refused():
    msg = EmailMessage()
    msg["From"] = "shop@example.com"
    msg["To"] = "ana@example.org"
    msg["Subject"] = "=?utf-8?q?x=0D=0ABcc:_evil@attacker.test?="
    msg.set_content("body")
    with pytest.raises(HeaderInjectionError):
        build_envelope(Message(eml=msg))


def test_raw_eml_recipients_come_from_parsed_headers_not_decoded_text():
    raw = (
        b"From: a@example.org\r\n"
        b"To: =?utf-8?q?evil=40attacker.test=2C?= <ana@example.org>\r\n"
        b"Subject: x\r\n\r\nbody\r\n"
    )
    env = build_envelope(Message(eml=raw))
    assert [r.address for r in env.recipients] == ["ana@example.org"]
    with pytest.raises(HeaderInjectionError):
        build_envelope(
            Message(eml=raw.replace(b"Subject: x", b"Subject: =?utf-8?q?x=0ABcc:_e@x.test?="))
        )


def test_control_pattern_is_what_the_readme_says():
    for char in "\r\n\0\x0b\x0c\x1b\x7f\x85\u2028\u2029":
        assert CONTROL.search(char)
    for char in "\t é日":
        assert not CONTROL.search(char)


@pytest.mark.parametrize(
    "name",
    [
        "Firstname Sürname",
        "Sürname Firstname",
        "Jörg Müller",
        "A Jörg B Müller C",
        "Jörg  Müller",
        " Jörg",
        '"Quoted" Jörg',
        "=?utf-8?q?x?= Jörg",
        "Jörg (comment) Müller",
        "Ünïcödé " * 12,
    ],
)
def test_a_non_ascii_display_name_keeps_its_atoms_and_reads_back_as_given(name):
    """Atoms as they are, the other words encoded (what the email package and Django
    6.1 write); read back, the name is the one given (the email package collapses
    spacing and splits long encoded names, so it judges only the plain ones)."""
    from email import message_from_bytes, policy

    field = address_field("From", [Address(name, "a", "example.com")])
    assert field.isascii()
    check_block(field, [Field("From", (Address(name, "a", "example.com"),))])  # mailqueue's reader
    if "  " not in name and len(name) < 40:  # the email package: plain spacing, one word
        parsed = message_from_bytes((field + "\r\n\r\n").encode("ascii"), policy=policy.SMTP)
        (address,) = parsed["From"].addresses
        assert (address.display_name, address.addr_spec) == (name, "a@example.com")


def test_a_name_with_atoms_and_a_non_ascii_word_is_written_as_the_email_package_does():
    from email.message import EmailMessage

    reference = EmailMessage(policy=email.policy.SMTP)
    reference["From"] = Address("Firstname Sürname", "a", "example.com")
    expected = reference.as_bytes().split(b"\r\n")[0].decode("ascii")
    assert address_field("From", [Address("Firstname Sürname", "a", "example.com")]) == expected
