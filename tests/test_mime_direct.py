"""The direct body writer for simple messages means exactly what the ``email`` package writes.

``mime_direct.write_simple`` writes the common MIME body (UTF-8 text and/or
HTML, no attachments) without ``email`` objects; the header fields above it
come from ``headers.py`` on both paths. Every message here is composed
twice, directly and through ``email`` (the direct writer switched off), and
both outputs are parsed with ``email``: headers and bodies must come out the
same.
"""

from __future__ import annotations

import email
import email.policy
import re
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mailqueue.message as message_module
from mailqueue import Message
from mailqueue.errors import InvalidMessageError
from mailqueue.message import build_envelope

LOCAL = st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9_+-]{1,8}){0,2}", fullmatch=True)
DOMAIN = st.from_regex(r"[a-z][a-z0-9]{0,10}\.(com|org|net)", fullmatch=True)
NAME = st.one_of(
    st.just(""), st.from_regex(r"[A-Za-z][A-Za-z0-9'-]{0,8}( [A-Za-z]{1,8}){0,2}", fullmatch=True)
)
PRINTABLE = string.ascii_letters + string.digits + string.punctuation + " "


@st.composite
def addresses(draw, *, max_size: int = 4):
    out = []
    for _ in range(draw(st.integers(1, max_size))):
        name, spec = draw(NAME), f"{draw(LOCAL)}@{draw(DOMAIN)}"
        style = draw(st.sampled_from(["bare", "string", "tuple"]))
        if style == "bare" or not name:
            out.append(spec)
        elif style == "string":
            out.append(f"{name} <{spec}>")
        else:
            out.append((name, spec))
    return out


SIMPLE_TEXT = st.lists(st.text(alphabet=PRINTABLE, max_size=78), max_size=8).map("\n".join)
ANY_TEXT = st.text(max_size=300).filter(lambda t: "\0" not in t)
# Every control character but TAB is refused in a header (headers.CONTROL).
CONTROLS = "".join(chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)] if c != 9) + "\u2028\u2029"
ONE_LINE = st.text(max_size=100).filter(lambda s: not any(c in s for c in CONTROLS))


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def compose_both(msg: Message, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, bytes | None]:
    """(what ``email`` writes, what the direct writer wrote or None when it declined)."""
    written: list[bytes | None] = []
    real = message_module.write_simple

    def spy(**kwargs):
        out = real(**kwargs)
        written.append(out)
        return out

    with monkeypatch.context() as m:
        m.setattr(message_module, "write_simple", spy)
        direct = build_envelope(msg).data
    with monkeypatch.context() as m:
        m.setattr(message_module, "write_simple", lambda **_: None)
        via_email = build_envelope(msg).data
    taken = written[0] if written else None
    if taken is None:
        return via_email, None
    assert direct.endswith(taken)  # the MIME part, below the composed header fields
    return via_email, direct


def assert_same_meaning(a: bytes, b: bytes) -> None:
    pa, pb = parse(a), parse(b)
    for name in ("From", "Sender", "To", "Cc", "Reply-To", "Subject", "X-Campaign", "List-Id"):
        assert str(pa.get(name)) == str(pb.get(name)), name
        if pa.get(name) is not None and name not in ("Subject", "X-Campaign", "List-Id"):
            assert [x.addr_spec for x in pa[name].addresses] == [
                x.addr_spec for x in pb[name].addresses
            ]
    assert "Bcc" not in pb
    assert pb["MIME-Version"] == "1.0"
    assert re.fullmatch(r"<[^<>@\s]+@[^<>\s]+>", str(pb["Message-ID"]))
    assert pb["Date"].datetime is not None
    assert pa.get_content_type() == pb.get_content_type()
    parts_a = list(pa.iter_parts()) if pa.is_multipart() else [pa]
    parts_b = list(pb.iter_parts()) if pb.is_multipart() else [pb]
    assert [(p.get_content_type(), p.get_content_charset(), p.get_content()) for p in parts_a] == [
        (p.get_content_type(), p.get_content_charset(), p.get_content()) for p in parts_b
    ]
    for line in b.split(b"\r\n"):
        assert b"\n" not in line and b"\r" not in line  # CRLF only
        assert len(line) <= 998


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sender=addresses(max_size=1),
    to=addresses(max_size=6),
    cc=st.one_of(st.just([]), addresses()),
    reply_to=st.one_of(st.just([]), addresses(max_size=1)),
    subject=st.text(alphabet=PRINTABLE, max_size=60).map(lambda s: " ".join(s.split())),
    text=st.one_of(st.none(), SIMPLE_TEXT),
    html=st.one_of(st.none(), SIMPLE_TEXT.map(lambda t: f"<p>{t}</p>")),
    tag=st.text(alphabet=string.ascii_letters + string.digits + "-", min_size=1, max_size=30),
)
def test_simple_messages_take_the_direct_path_and_mean_the_same(
    monkeypatch, sender, to, cc, reply_to, subject, text, html, tag
):
    msg = Message(
        sender=sender[0],
        to=to,
        cc=cc,
        bcc=["hidden@example.com"],
        reply_to=reply_to,
        subject=subject,
        text=text,
        html=html,
        headers={"X-Campaign": tag, "List-Id": f"<{tag}.lists.example.com>"},
    )
    via_email, direct = compose_both(msg, monkeypatch)
    assert direct is not None, "a simple message must not need the email package"
    assert_same_meaning(via_email, direct)
    assert b"hidden@example.com" not in direct


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    subject=ONE_LINE,
    text=st.one_of(st.none(), ANY_TEXT),
    html=st.one_of(st.none(), ANY_TEXT),
    name=ONE_LINE.map(lambda s: s[:30]),
)
def test_any_message_means_the_same_whichever_path_wrote_it(monkeypatch, subject, text, html, name):
    msg = Message(
        sender=(name, "from@example.com") if name.strip() else "from@example.com",
        to=["a@example.org", "B <b@example.org>"],
        subject=subject,
        text=text,
        html=html,
    )
    via_email, direct = compose_both(msg, monkeypatch)
    if direct is not None:
        assert_same_meaning(via_email, direct)


def test_long_address_lists_fold_like_the_email_package(monkeypatch):
    to = [f"recipient{i}@example.org" for i in range(40)]
    via_email, direct = compose_both(
        Message(sender="a@example.com", to=to, subject="s", text="t"), monkeypatch
    )
    assert direct is not None
    assert_same_meaning(via_email, direct)
    head = direct.split(b"\r\n\r\n")[0]
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    assert head.count(b"\r\n ") >= 10  # folded, not one long line


@pytest.mark.parametrize(
    "msg",
    [
        Message(sender=("Zoë", "a@example.com"), to="b@example.com", subject="s", text="t"),
        Message(sender="a@example.com", to='"Bob, Jr" <b@example.com>', subject="s", text="t"),
        Message(sender="a@example.com", to="b@example.com", subject="s" * 90, text="t"),
        Message(
            sender="a@example.com",
            to="b@example.com",
            text="t",
            headers={"Date": "Mon, 1 Jan 2024 00:00:00 +0000"},
        ),
    ],
    ids=["non-ascii-name", "quoted-name", "long-subject", "own-date"],
)
def test_any_header_takes_the_direct_body_path(monkeypatch, msg):
    via_email, direct = compose_both(msg, monkeypatch)
    assert direct is not None
    assert_same_meaning(via_email, direct)


@pytest.mark.parametrize(
    "msg",
    [
        Message(
            sender="a@example.com", to="b@example.com", subject="s", text="t", charset="iso-8859-1"
        ),
        Message(sender="a@example.com", to="b@example.com", text="t", text_subtype="enriched"),
    ],
    ids=["latin-1", "enriched"],
)
def test_the_email_package_writes_what_the_direct_path_declines(monkeypatch, msg):
    via_email, direct = compose_both(msg, monkeypatch)
    assert direct is None
    assert parse(via_email)["To"] is not None


@pytest.mark.parametrize("separator", list(CONTROLS))
def test_every_line_separator_and_control_in_a_header_is_refused(separator):
    with pytest.raises(InvalidMessageError, match="header injection is refused") as info:
        build_envelope(
            Message(sender="a@example.com", to="b@example.com", subject=f"x{separator}y", text="t")
        )
    assert info.value.field == "subject"


def test_subjects_in_any_language_are_encoded_words_on_the_direct_path(monkeypatch):
    subject = "Grüße aus Köln — 日本語のテスト, a subject long enough to need folding"
    msg = Message(
        sender="a@example.com",
        to="b@example.com",
        subject=subject,
        text="t",
        headers={"X-Campaign": "Été 2026"},
    )
    via_email, direct = compose_both(msg, monkeypatch)
    assert direct is not None
    assert_same_meaning(via_email, direct)
    assert parse(direct)["Subject"] == subject
    head = direct.split(b"\r\n\r\n")[0]
    assert head.isascii() and all(len(line) <= 78 for line in head.split(b"\r\n"))
