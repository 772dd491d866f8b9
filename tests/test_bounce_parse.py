"""Bounce and complaint parsing (issue #18): the corpus, and hostile input.

Every ``tests/bounce_corpus/*.eml`` is read and compared whole with its entry
in ``expected.json``. Hostile inputs must come back as a ``Report`` with a
reason, never as an exception.
"""

from __future__ import annotations

import base64
import json
import pathlib
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailqueue.bounces.parse import MAX_CONTENT_TYPES, Kind, Report, Verdict, parse_report

CORPUS = pathlib.Path(__file__).parent / "bounce_corpus"
EXPECTED = json.loads((CORPUS / "expected.json").read_text())
SAMPLES = sorted(p.name for p in CORPUS.glob("*.eml"))


def as_expected(report: Report) -> dict[str, object]:
    found: dict[str, object] = {"kind": str(report.kind)}
    if report.reason:
        found["reason"] = report.reason
    if report.feedback_type:
        found["feedback_type"] = report.feedback_type
    found["original_message_id"] = report.original_message_id
    found["original_envelope_from"] = list(report.original_envelope_from)
    found["recipients"] = [
        {
            "address": r.address,
            "verdict": str(r.verdict),
            "status": r.status,
            "diagnostic": r.diagnostic,
        }
        for r in report.recipients
    ]
    return found


def test_every_sample_has_an_expected_result() -> None:
    assert sorted(EXPECTED) == SAMPLES


@pytest.mark.parametrize("name", SAMPLES)
def test_corpus(name: str) -> None:
    data = (CORPUS / name).read_bytes()
    assert as_expected(parse_report(data)) == EXPECTED[name]
    # CRLF line ends, as an SMTP server hands them over, read the same.
    assert as_expected(parse_report(data.replace(b"\n", b"\r\n"))) == EXPECTED[name]


def test_the_enhanced_code_judges_a_failed_action() -> None:
    report = parse_report((CORPUS / "multi_recipient_dsn.eml").read_bytes())
    verdicts = {r.address: r.verdict for r in report.recipients}
    assert verdicts == {
        "first@example.net": Verdict.HARD,
        "second@example.net": Verdict.DELIVERED,
        "third@example.net": Verdict.SOFT,  # Action: failed, but 4.4.7
    }


def test_a_cut_report_still_reads_and_says_it_was_cut() -> None:
    data = (CORPUS / "postfix_user_unknown.eml").read_bytes()
    huge = data.replace(b"Thanks for your order.", b"x" * 5_000_000)
    report = parse_report(huge, max_bytes=len(data))
    assert report.kind == Kind.DSN and report.truncated
    assert report.recipients[0].address == "nobody@example.net"
    assert report.reason == f"cut at {len(data)} bytes"


def nested(depth: int) -> bytes:
    head = b"From: MAILER-DAEMON@x.example\nSubject: Undelivered\n"
    body = b"Content-Type: text/plain\n\nuser@example.net 550 5.1.1 no\n"
    for level in range(depth):
        b = f"b{level}".encode()
        body = (
            b"Content-Type: multipart/mixed; boundary="
            + b
            + b"\n\n--"
            + b
            + b"\n"
            + body
            + b"\n--"
            + b
            + b"--\n"
        )
    return head + body


def test_deep_nesting_is_refused_with_a_reason() -> None:
    report = parse_report(nested(MAX_CONTENT_TYPES + 5))
    assert report.kind == Kind.UNPARSED
    assert report.reason == f"refused: more than {MAX_CONTENT_TYPES} Content-Type headers"
    # Nested message/rfc822 without boundaries is bounded the same way.
    rfc822 = b"Content-Type: message/rfc822\n\n" * 5000
    assert parse_report(rfc822).kind == Kind.UNPARSED


def test_nesting_within_the_limit_is_read() -> None:
    report = parse_report(nested(3))
    assert [(r.address, r.status) for r in report.recipients] == [("user@example.net", "5.1.1")]


def test_an_overlong_content_type_is_refused_before_parsing() -> None:
    # email.message._parseparam is quadratic in this header on 3.11.7/3.12.1.
    header = b"Content-Type: multipart/report; boundary=x" + b';a="\\"' * 20000 + b"\n"
    report = parse_report(header + b"\nbody\n")
    assert report.kind == Kind.UNPARSED
    assert report.reason.startswith("refused: a Content-Type header longer than")
    folded = b"Content-Type: multipart/report;\n" + b" a=b;\n" * 500 + b"\nbody\n"
    assert parse_report(folded).reason.startswith("refused: a Content-Type header longer than")


def test_too_many_header_fields_are_refused() -> None:
    data = b"X-A: b\n" * 600 + b"Subject: Undelivered\n\n<u@example.net>: 550 5.1.1\n"
    report = parse_report(data)
    assert report.kind == Kind.UNPARSED
    assert report.reason == "refused: more than 500 header fields"


def test_attachments_are_never_decompressed(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = zlib.compress(b"\0" * 10_000_000)
    data = (
        (CORPUS / "zip_attachment.eml")
        .read_bytes()
        .replace(
            b"UEsDBBQAAAAIAAAAIQAAAAAAAAAAAAAAAAAIAAAAYm9tYi50eHTtwTEBAAAAwqD1T20JT6AAAAAAAAAAAAAAAAAA",
            base64.encodebytes(bomb),
        )
    )

    def refuse(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("the parser decompressed an attachment")

    monkeypatch.setattr(zlib, "decompress", refuse)
    monkeypatch.setattr(zlib, "decompressobj", refuse)
    report = parse_report(data)
    assert [(r.address, r.status) for r in report.recipients] == [("zipped@example.net", "5.1.1")]


def test_an_autoreply_is_kept_as_unparsed_not_read_as_a_bounce() -> None:
    report = parse_report((CORPUS / "autoreply.eml").read_bytes())
    assert report.kind == Kind.UNPARSED and report.recipients == ()
    assert report.reason == "not a bounce or complaint this reads (text/plain)"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4000))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    assert isinstance(parse_report(data), Report)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(SAMPLES),
    st.lists(st.tuples(st.integers(0, 10_000), st.binary(max_size=40)), max_size=8),
    st.integers(0, 10_000),
)
def test_mangled_samples_never_raise(name: str, edits: list[tuple[int, bytes]], cut: int) -> None:
    data = bytearray((CORPUS / name).read_bytes())
    for at, chunk in edits:
        at %= len(data) + 1
        data[at : at + len(chunk)] = chunk
    report = parse_report(bytes(data[: len(data) - cut % 200]))
    assert isinstance(report, Report)
    assert all(isinstance(r.verdict, Verdict) for r in report.recipients)
