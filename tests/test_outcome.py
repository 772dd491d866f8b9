"""The reply → outcome table, row by row, without a server (``smtp.outcome.judge``).

Both send paths (one command at a time and PIPELINING) only collect what the
relay said into a ``Transcript``; these rows pin what each transcript means
for every recipient, for the connection, and for an in-line retry.
"""

from __future__ import annotations

import pytest

from mailqueue.errors import DeliveryError
from mailqueue.smtp.outcome import Failure, Reply, Stage, Transcript, Verdict, judge

RCPTS = ("a@example.com", "b@example.com", "c@example.com")
OK = Reply(250, "2.1.5 OK")
QUEUED = Reply(250, "2.0.0 OK: queued")
REFUSED = Reply(550, "5.1.1 <b@example.com>: User unknown")
LATER = Reply(450, "4.2.0 <c@example.com>: try again later")
CLOSING = Reply(421, "4.3.2 Service shutting down")


def said(**fields) -> Transcript:
    fields.setdefault("mail", Reply(250, "2.1.0 OK"))
    return Transcript(**fields)


def sent_to_all() -> Transcript:
    return said(rcpt=[OK, OK, OK], data=QUEUED, content_sent=True)


def row(name: str, transcript: Transcript, expect: str, connection: str, retry_now=False):
    """``expect``: per recipient ``status/code/error class`` (``-`` for none), then the
    summary error's class after ``=>``."""
    per, summary = expect.split(" => ")
    expected = [
        (status, None if code == "-" else int(code), None if kind == "-" else kind)
        for status, code, kind in (e.split("/") for e in per.split())
    ]
    summary_type = None if summary == "-" else summary
    return pytest.param(transcript, expected, summary_type, connection, retry_now, id=name)


def broken(stage: Stage, how: str, rcpt: list[Reply], content_sent=False) -> Transcript:
    mail = None if stage == "MAIL" else Reply(250, "OK")
    failure = Failure(stage, how, "boom")
    return said(mail=mail, rcpt=rcpt, content_sent=content_sent, failure=failure)


SENT = "sent/250/-"
CLOSED = "deferred/421/ConnectError"
DATA_GONE = "deferred/-/ConnectError"
ROWS = [
    row("all accepted, DATA 2xx", sent_to_all(), f"{SENT} {SENT} {SENT} => -", "keep"),
    row(
        "RCPT 251 counts as accepted",
        said(rcpt=[Reply(251, "2.1.5 will forward"), OK, OK], data=QUEUED, content_sent=True),
        f"{SENT} {SENT} {SENT} => -",
        "keep",
    ),
    row(
        "MAIL 4xx",
        said(mail=Reply(451, "4.3.0 try later")),
        "deferred/451/SenderError " * 3 + "=> SenderError",
        "reset",
    ),
    row(
        "MAIL 5xx",
        said(mail=Reply(553, "5.7.1 sender not allowed")),
        "failed/553/SenderError " * 3 + "=> SenderError",
        "reset",
    ),
    *[
        row(
            f"{stage} 421: the session is closing before anything was sent",
            transcript,
            f"{CLOSED} {CLOSED} {CLOSED} => ConnectError",
            "poison",
            retry_now=True,
        )
        for stage, transcript in [("MAIL", said(mail=CLOSING)), ("RCPT", said(rcpt=[OK, CLOSING]))]
    ],
    row(
        "RCPT mixed accept and refuse, DATA 2xx",
        said(rcpt=[OK, REFUSED, LATER], data=QUEUED, content_sent=True),
        f"{SENT} failed/550/RecipientError deferred/450/RecipientError => RecipientError",
        "keep",
    ),
    row(
        "RCPT all refused: no DATA",
        said(rcpt=[REFUSED, REFUSED, LATER]),
        "failed/550/RecipientError " * 2 + "deferred/450/RecipientError => RecipientError",
        "reset",
    ),
    row(
        "RCPT 421 but the content went through (pipelined)",
        said(rcpt=[OK, CLOSING, OK], data=QUEUED, content_sent=True),
        f"{SENT} deferred/421/RecipientError {SENT} => RecipientError",
        "poison",
    ),
    row(
        "DATA 4xx",
        said(rcpt=[OK, REFUSED, OK], data=Reply(451, "4.3.0 busy"), content_sent=True),
        "deferred/451/DeliveryError failed/550/RecipientError deferred/451/DeliveryError"
        " => DeliveryError",
        "reset",
    ),
    row(
        "DATA 5xx",
        said(rcpt=[OK, OK, OK], data=Reply(554, "5.6.0 content rejected"), content_sent=True),
        "failed/554/DeliveryError " * 3 + "=> DeliveryError",
        "reset",
    ),
    row(
        "DATA refused before the content (no 354)",
        said(rcpt=[OK, OK, LATER], data=Reply(554, "5.5.1 no valid recipients")),
        "failed/554/DeliveryError " * 2 + "deferred/450/RecipientError => DeliveryError",
        "reset",
    ),
    row(
        "DATA 421 after the content",
        said(rcpt=[OK, OK, OK], data=CLOSING, content_sent=True),
        "deferred/421/DeliveryError " * 3 + "=> DeliveryError",
        "poison",
    ),
    *[
        row(
            f"{how} waiting for {stage}, before any content",
            broken(stage, how, {"MAIL": [], "RCPT": [OK], "DATA": [OK, OK, OK]}[stage]),
            f"{DATA_GONE} {DATA_GONE} {DATA_GONE} => ConnectError",
            "poison",
            retry_now=True,
        )
        for stage in ("MAIL", "RCPT", "DATA")
        for how in ("timed out", "dropped")
    ],
    row(
        "unexpected reply ends the session during RCPT",
        said(rcpt=[REFUSED], failure=Failure("RCPT", "ended", "x", Reply(503, "5.5.1 bad"))),
        "deferred/503/ConnectError " * 3 + "=> ConnectError",
        "poison",
        retry_now=True,
    ),
    *[
        row(
            f"{how} after the content: may have been delivered",
            broken("DATA", how, [OK, REFUSED, OK], content_sent=True),
            f"{DATA_GONE} failed/550/RecipientError {DATA_GONE} => ConnectError",
            "poison",
        )
        for how in ("timed out", "dropped")
    ],
    row(
        "unexpected reply after the content",
        said(
            rcpt=[OK, LATER, OK],
            content_sent=True,
            failure=Failure("DATA", "ended", "x", Reply(500, "garbled")),
        ),
        "deferred/500/ConnectError deferred/450/RecipientError deferred/500/ConnectError"
        " => ConnectError",
        "poison",
    ),
    row(
        "refused before sending (predicted from EHLO)",
        Transcript(refused_before=DeliveryError("too big", code=552, reply="5.3.4 too big")),
        "failed/552/DeliveryError " * 3 + "=> DeliveryError",
        "keep",
    ),
]


@pytest.mark.parametrize(("transcript", "expected", "summary", "connection", "retry_now"), ROWS)
def test_each_row_of_the_table(transcript, expected, summary, connection, retry_now):
    verdict = judge("app@example.com", RCPTS, transcript)
    result = verdict.result
    assert [r.address for r in result.recipients] == list(RCPTS)
    assert [(r.status, r.code, r.error) for r in result.recipients] == expected
    assert type(result.error).__name__ == summary if summary else result.error is None
    assert (verdict.connection, verdict.retry_now) == (connection, retry_now)


@pytest.mark.parametrize(("transcript", "expected", "summary", "connection", "retry_now"), ROWS)
def test_an_accepted_recipient_is_never_sent_twice(
    transcript, expected, summary, connection, retry_now
):
    """Whenever the relay may have the message, nothing is retried in-line; a
    retry in-line always carries every recipient, because none can have it."""
    verdict: Verdict = judge("app@example.com", RCPTS, transcript)
    statuses = {r.status for r in verdict.result.recipients}
    if transcript.content_sent or "sent" in statuses:
        assert not verdict.retry_now
    if verdict.retry_now:
        assert statuses == {"deferred"}
    if "sent" in statuses:
        assert verdict.result.accepted == [
            a for a, r in zip(RCPTS, transcript.rcpt, strict=True) if r.code in (250, 251)
        ]


def test_replies_and_reasons_are_the_relays_words():
    result = judge("app@example.com", RCPTS, said(rcpt=[OK, REFUSED, LATER], data=QUEUED)).result
    sent, refused, later = result.recipients
    assert (sent.reply, refused.reply, later.reply) == (
        QUEUED.message,
        REFUSED.message,
        LATER.message,
    )
    assert refused.enhanced_code == "5.1.1" and later.enhanced_code == "4.2.0"
    assert (result.data_code, result.data_reply) == (250, QUEUED.message)
    assert result.error is not None and result.error.code == 450  # the last refusal
    assert "<c@example.com>" in str(result.error.reason)


def test_messages_say_where_it_broke():
    def reason(transcript: Transcript) -> str:
        error = judge("app@example.com", RCPTS, transcript).result.error
        assert error is not None
        return str(error.reason)

    assert reason(said(mail=CLOSING)) == "the relay ended the session during MAIL"
    assert reason(said(rcpt=[CLOSING])) == "the relay ended the session during RCPT"
    assert reason(said(mail=None, failure=Failure("MAIL", "timed out", "slow"))) == (
        "the connection timed out during MAIL: slow"
    )
    dropped = said(rcpt=[OK] * 3, content_sent=True, failure=Failure("DATA", "dropped", "x"))
    assert "may have been delivered" in reason(dropped)
    assert (
        judge("a@example.com", RCPTS, dropped)
        .result.recipients[0]
        .reply.startswith(reason(dropped))
    )


def test_all_refused_sums_up_with_a_count_one_refused_with_its_address():
    many = judge("app@example.com", RCPTS, said(rcpt=[REFUSED] * 3)).result.error
    one = judge("app@example.com", RCPTS[:1], said(rcpt=[REFUSED])).result.error
    assert many is not None and many.reason == "the relay refused all 3 recipients"
    assert many.code == 550
    assert one is not None and one.reason == "the relay refused the recipient <a@example.com>"
