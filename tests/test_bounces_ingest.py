"""Reports coming back (issue #18): recorded, matched by VERP token, applied.

Mail is delivered by the worker's own code to the dev SMTP server with a
bounce domain set; the reports are then fed the ways an operator would:
over SMTP to ``mailqueue bounces serve``'s server, and from a Maildir or an
mbox through ``mailqueue bounces ingest``. The status table, the attempt
history and ``mq_bounce`` are the judges.
"""

from __future__ import annotations

import asyncio
import json
import mailbox
import smtplib
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from prometheus_client import REGISTRY

import mailqueue
from mailqueue import Message, api
from mailqueue.bounceserver import BounceServer
from mailqueue.cli import cli
from mailqueue.contrib.status import anymail_status
from mailqueue.store.models import BOUNCES, RecipientRow
from mailqueue.worker.service import Deliverer

from .conftest import BOUNCE_DOMAIN as DOMAIN
from .conftest import BOUNCE_SECRET as SECRET


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


CORPUS = Path(__file__).parent / "bounce_corpus"


def send(stack, *to: str):
    mid = mailqueue.enqueue(
        Message(sender="shop@example.com", to=list(to), subject="Your order", text="hi")
    )

    async def go() -> None:
        deliverer = Deliverer(stack.settings, stack.store)
        try:
            await deliverer.deliver_batch([uuid.UUID(str(mid))])
        finally:
            await deliverer.aclose()

    asyncio.run(go())
    return mid


def return_path(smtp_server, address: str) -> str:
    (got,) = smtp_server.received_for(address)
    return got.mail_from


def dsn(return_path: str, address: str, *, sample: str = "postfix_user_unknown.eml") -> bytes:
    marks = {
        "postfix_user_unknown.eml": (
            "b+1k-abcdefghijklmnop@bounce.example.com",
            "nobody@example.net",
        ),
        "postfix_delayed.eml": ("b+2a-qrstuvwxyzabcdef@bounce.example.com", "slow@example.net"),
        "arf_abuse.eml": ("b+8h-ffffffffffffffff@bounce.example.com", "angry@isp.example"),
    }
    token, original = marks[sample]
    text = (CORPUS / sample).read_bytes()
    return text.replace(token.encode(), return_path.encode()).replace(
        original.encode(), address.encode()
    )


def recipient(stack, mid, address: str) -> dict:
    info = mailqueue.get_status(mid)
    (r,) = [r for r in info.recipients if r.address == address]
    return {"status": r.status, "enhanced_code": r.enhanced_code, "reply": r.reply}


def bounce_rows(stack) -> list:
    with stack.engine.connect() as conn:
        return list(conn.execute(sa.select(BOUNCES).order_by(BOUNCES.c.id)))


def submit(server: BounceServer, rcpt: str, data: bytes) -> None:
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.sendmail("", [rcpt], data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))


def test_a_hard_bounce_over_smtp_turns_the_sent_recipient_bounced(verp, smtp_server, endpoint):
    mid = send(verp, "nobody@example.net", "fine@example.net")
    path = return_path(smtp_server, "nobody@example.net")

    counted = sample("mailqueue_bounce_reports_total", kind="dsn", effect="bounced")
    submit(endpoint, path, dsn(path, "nobody@example.net"))

    assert sample("mailqueue_bounce_reports_total", kind="dsn", effect="bounced") == counted + 1
    assert recipient(verp, mid, "nobody@example.net") == {
        "status": "bounced",
        "enhanced_code": "5.1.1",
        "reply": "550 5.1.1 <nobody@example.net>: Recipient address rejected: "
        "User unknown in virtual mailbox table",
    }
    assert recipient(verp, mid, "fine@example.net")["status"] == "sent"
    # The message's status follows its recipients (one delivered, one bounced).
    assert mailqueue.get_status(mid).status == "partial"
    history = [(a.address, a.status) for a in mailqueue.get_attempts(str(mid))]
    assert ("nobody@example.net", "sent") in history and history[-1] == (
        "nobody@example.net",
        "bounced",
    )
    (row,) = bounce_rows(verp)
    assert (row.kind, row.effect, row.envelope_to, row.source) == ("dsn", "bounced", path, "smtp")
    assert row.reason is None and row.raw.startswith(b"Return-Path: <>")
    assert SECRET.encode() not in row.raw and SECRET not in str(row.results)
    assert mailqueue.stats()["recipients"]["bounced"] == 1
    # The address is suppressed: the next message to it is stopped at claim.
    (entry,) = api.suppressions(address="nobody@example.net")
    assert (entry.reason, entry.scope) == ("bounced", "")
    assert entry.note.startswith("bounced report: 5.1.1 550 5.1.1 <nobody@example.net>")
    again = send(verp, "nobody@example.net")
    assert recipient(verp, again, "nobody@example.net")["status"] == "suppressed"
    assert len(smtp_server.received_for("nobody@example.net")) == 1


def test_a_bounce_calls_the_terminal_hook_with_the_new_status(verp, smtp_server, endpoint):
    from . import contrib_helpers

    endpoint.settings = verp.reconfigure(on_terminal="tests.contrib_helpers:record_terminal")
    mid = send(verp, "nobody@example.net", "fine@example.net")
    contrib_helpers.terminal_calls.clear()
    path = return_path(smtp_server, "nobody@example.net")
    submit(endpoint, path, dsn(path, "nobody@example.net"))
    (info,) = contrib_helpers.terminal_calls
    assert str(info.id) == str(mid)
    assert {r.address: r.status for r in info.recipients} == {
        "nobody@example.net": "bounced",
        "fine@example.net": "sent",
    }
    assert info.status == "partial"


def test_suppression_on_bounce_can_be_turned_off(verp, smtp_server, endpoint):
    endpoint.settings = verp.reconfigure(bounce_suppress=False)
    mid = send(verp, "nobody@example.net")
    path = return_path(smtp_server, "nobody@example.net")
    submit(endpoint, path, dsn(path, "nobody@example.net"))
    assert recipient(verp, mid, "nobody@example.net")["status"] == "bounced"
    assert api.suppressions(address="nobody@example.net") == []


def test_a_delayed_report_is_recorded_and_changes_nothing(verp, smtp_server, endpoint):
    mid = send(verp, "slow@example.net")
    path = return_path(smtp_server, "slow@example.net")
    submit(endpoint, path, dsn(path, "slow@example.net", sample="postfix_delayed.eml"))
    assert recipient(verp, mid, "slow@example.net")["status"] == "sent"
    (row,) = bounce_rows(verp)
    assert (row.verdict, row.effect, row.enhanced_code) == ("delayed", None, "4.4.1")
    assert row.recipient_id is not None


def test_a_forged_or_replayed_token_stays_unmatched(verp, smtp_server, endpoint):
    mid = send(verp, "a@example.net", "b@example.net")
    path_a = return_path(smtp_server, "a@example.net")
    path_b = return_path(smtp_server, "b@example.net")
    local, _, domain = path_a.partition("@")
    forged = f"{local[:-1]}{'a' if local[-1] != 'a' else 'b'}@{domain}"
    # a's token with b's row id: the MAC was made for a's row.
    replayed = f"{path_b.split('-')[0]}-{path_a.split('-', 1)[1]}"

    submit(endpoint, forged, dsn(forged, "a@example.net"))
    submit(endpoint, replayed, dsn(replayed, "b@example.net"))

    assert recipient(verp, mid, "a@example.net")["status"] == "sent"
    assert recipient(verp, mid, "b@example.net")["status"] == "sent"
    rows = bounce_rows(verp)
    assert [r.recipient_id for r in rows] == [None, None]
    assert all(
        r.reason.startswith("unmatched: the return path's token does not verify") for r in rows
    )


def test_a_report_for_a_never_sent_recipient_is_kept_unmatched(verp, smtp_server, endpoint):
    smtp_server.defer = ["later@*"]
    mid = send(verp, "later@example.net")
    path = return_path_for_row(verp, smtp_server, mid, "later@example.net")
    submit(endpoint, path, dsn(path, "later@example.net"))
    assert recipient(verp, mid, "later@example.net")["status"] == "deferred"
    (row,) = bounce_rows(verp)
    assert row.recipient_id is None
    assert row.reason == "unmatched: the recipient was never sent (it is deferred)"


def return_path_for_row(stack, smtp_server, mid, address: str) -> str:
    from mailqueue.bounces.verp import make_return_path

    with stack.engine.connect() as conn:
        rid = conn.execute(
            sa.select(RecipientRow.__table__.c.id).where(
                RecipientRow.__table__.c.address == address
            )
        ).scalar_one()
    return make_return_path(
        secret=SECRET.encode(),
        domain=DOMAIN,
        message_id=uuid.UUID(str(mid)),
        recipient_id=rid,
        address=address,
    )


def test_the_endpoint_takes_mail_for_the_bounce_domain_only(verp, endpoint):
    with smtplib.SMTP(endpoint.host, endpoint.port, timeout=10) as client:
        client.ehlo()
        client.mail("")
        code, words = client.rcpt("someone@example.net")
        assert code == 550 and b"relaying denied" in words
    big = b"Subject: x\r\n\r\n" + b"x" * (endpoint.max_size + 10)
    with pytest.raises(smtplib.SMTPException):
        submit(endpoint, f"b+1-aaaaaaaaaaaaaaaa@{DOMAIN}", big)
    assert bounce_rows(verp) == []


def test_hostile_and_unknown_reports_are_kept_with_a_reason(verp, endpoint):
    rcpt = f"b+1-aaaaaaaaaaaaaaaa@{DOMAIN}"
    submit(endpoint, rcpt, (CORPUS / "autoreply.eml").read_bytes())
    nested = b"Subject: Undelivered\r\n" + b"Content-Type: message/rfc822\r\n\r\n" * 2000
    submit(endpoint, rcpt, nested)
    rows = bounce_rows(verp)
    assert [(r.kind, r.reason) for r in rows] == [
        ("unparsed", "not a bounce or complaint this reads (text/plain)"),
        ("unparsed", "refused: more than 64 Content-Type headers"),
    ]
    # Kept and shown, never dropped: newest first, with the reason.
    shown = CliRunner().invoke(cli, ["bounces", "list", "--unmatched"])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("unparsed  -: refused: more than 64 Content-Type headers")
    assert lines[1].endswith("unparsed  -: not a bounce or complaint this reads (text/plain)")
    listed = json.loads(CliRunner().invoke(cli, ["bounces", "list", "--json"]).output)
    assert [r["kind"] for r in listed] == ["unparsed", "unparsed"]
    assert listed[0]["recipient_id"] is None and listed[0]["source"] == "smtp"


def test_maildir_ingest_applies_a_complaint_and_moves_what_it_read(verp, smtp_server, tmp_path):
    mid = send(verp, "angry@isp.example", "bounce@example.net")
    box = mailbox.Maildir(tmp_path / "bounces")
    box.add(
        dsn(
            return_path(smtp_server, "angry@isp.example"),
            "angry@isp.example",
            sample="arf_abuse.eml",
        )
    )
    path = return_path(smtp_server, "bounce@example.net")
    box.add(dsn(path, "bounce@example.net"))
    box.add((CORPUS / "autoreply.eml").read_bytes())

    result = CliRunner().invoke(cli, ["bounces", "ingest", "--maildir", str(tmp_path / "bounces")])

    assert result.exit_code == 0, result.output
    assert result.output == "3 reports: 1 bounced, 1 complained; 0 unmatched, 1 unparsed\n"
    assert recipient(verp, mid, "angry@isp.example")["status"] == "complained"
    assert recipient(verp, mid, "bounce@example.net")["status"] == "bounced"
    words = {r.address: anymail_status(r) for r in mailqueue.get_status(mid).recipients}
    assert words == {"angry@isp.example": "complained", "bounce@example.net": "bounced"}
    # A complaint came from a mailbox the mail reached; the bounce did not.
    assert mailqueue.get_status(mid).status == "partial"
    assert list((tmp_path / "bounces" / "new").iterdir()) == []
    moved = sorted(p.name for p in (tmp_path / "bounces" / "cur").iterdir())
    assert len(moved) == 3 and all(name.endswith(":2,S") for name in moved)
    # Read again: nothing new.
    again = CliRunner().invoke(cli, ["bounces", "ingest", "--maildir", str(tmp_path / "bounces")])
    assert again.output.startswith("0 reports")


def test_mbox_ingest_moves_reports_to_done(verp, smtp_server, tmp_path):
    mid = send(verp, "gone@example.net")
    path = return_path(smtp_server, "gone@example.net")
    box = mailbox.mbox(tmp_path / "bounces.mbox")
    box.add(dsn(path, "gone@example.net"))
    box.flush()
    box.close()

    result = CliRunner().invoke(
        cli, ["bounces", "ingest", "--mbox", str(tmp_path / "bounces.mbox")]
    )

    assert result.exit_code == 0, result.output
    assert recipient(verp, mid, "gone@example.net")["status"] == "bounced"
    assert count(tmp_path / "bounces.mbox") == 0
    assert count(tmp_path / "bounces.mbox.done") == 1


def count(path: Path) -> int:
    box = mailbox.mbox(path)
    try:
        return len(box)
    finally:
        box.close()


def test_without_a_bounce_domain_reports_are_kept_unmatched(stack, smtp_server, tmp_path):
    mid = send(stack, "x@example.net")
    box = mailbox.Maildir(tmp_path / "b")
    box.add(dsn(f"b+1-aaaaaaaaaaaaaaaa@{DOMAIN}", "x@example.net"))
    result = CliRunner().invoke(cli, ["bounces", "ingest", "--maildir", str(tmp_path / "b")])
    assert result.output == "1 reports: none changed; 1 unmatched, 0 unparsed\n"
    assert recipient(stack, mid, "x@example.net")["status"] == "sent"
    (row,) = bounce_rows(stack)
    assert row.reason.startswith("unmatched: MAILQUEUE_BOUNCE_DOMAIN is not set")


def test_reports_for_one_row_in_one_batch_apply_once_each_in_order(verp, smtp_server, tmp_path):
    mid = send(verp, "angry@isp.example")
    path = return_path(smtp_server, "angry@isp.example")
    box = mailbox.Maildir(tmp_path / "b")
    for name, data in [
        ("1", dsn(path, "angry@isp.example")),
        ("2", dsn(path, "angry@isp.example")),  # the same bounce again
        ("3", dsn(path, "angry@isp.example", sample="arf_abuse.eml")),
    ]:
        (tmp_path / "b" / "new" / name).write_bytes(data)
    del box

    result = CliRunner().invoke(cli, ["bounces", "ingest", "--maildir", str(tmp_path / "b")])

    assert result.output == "3 reports: 1 bounced, 1 complained; 0 unmatched, 0 unparsed\n"
    assert recipient(verp, mid, "angry@isp.example")["status"] == "complained"
    history = [a.status for a in mailqueue.get_attempts(str(mid))]
    assert history == ["sent", "bounced", "complained"]
    rows = bounce_rows(verp)
    assert [(r.effect, r.reason) for r in rows] == [
        ("bounced", None),
        (None, "recorded; the recipient is already bounced or was not sent"),
        ("complained", None),
    ]
    (entry,) = api.suppressions(address="angry@isp.example")
    assert entry.reason == "complained"


def test_events_posted_to_the_api_are_applied_by_message_id_or_return_path(verp, smtp_server):
    from starlette.testclient import TestClient

    from mailqueue.web.app import create_app

    mid = send(verp, "esp-hard@example.net", "esp-spam@example.net", "esp-late@example.net")
    path = return_path(smtp_server, "esp-spam@example.net")
    auth = {"Authorization": "Bearer token-for-events"}
    with TestClient(create_app(token="token-for-events")) as client:
        assert client.post("/api/v1/events", json={"events": []}).status_code == 401
        bad = client.post(
            "/api/v1/events",
            headers=auth,
            json={"events": [{"event": "bounced", "recipient": "x@example.net"}]},
        )
        assert bad.status_code == 400
        assert "message_id" in bad.text and "events[0]" in bad.text
        # A bad event refuses the whole request: nothing written.
        refused = client.post(
            "/api/v1/events",
            headers=auth,
            json={
                "events": [
                    {
                        "event": "bounced",
                        "recipient": "esp-hard@example.net",
                        "message_id": str(mid),
                    },
                    {
                        "event": "exploded",
                        "recipient": "esp-hard@example.net",
                        "message_id": str(mid),
                    },
                ]
            },
        )
        assert refused.status_code == 400 and "events[1].event" in refused.text
        assert bounce_rows(verp) == []

        ok = client.post(
            "/api/v1/events",
            headers=auth,
            json={
                "events": [
                    {
                        "event": "bounced",
                        "recipient": "esp-hard@example.net",
                        "message_id": str(mid),
                        "status": "5.1.1",
                        "diagnostic": "550 5.1.1 mailbox unavailable (via the ESP)",
                    },
                    {
                        "event": "complained",
                        "recipient": "esp-spam@example.net",
                        "return_path": path,
                    },
                    {
                        "event": "deferred",
                        "recipient": "esp-late@example.net",
                        "message_id": str(mid),
                    },
                    {"event": "bounced", "recipient": "nobody@example.net", "message_id": str(mid)},
                ]
            },
        )
    assert ok.status_code == 201, ok.text
    effects = [(e["effect"], e["reason"]) for e in ok.json()["events"]]
    assert effects == [
        ("bounced", None),
        ("complained", None),
        (None, None),
        (None, f"unmatched: message {mid} has no recipient nobody@example.net"),
    ]
    assert recipient(verp, mid, "esp-hard@example.net") == {
        "status": "bounced",
        "enhanced_code": "5.1.1",
        "reply": "550 5.1.1 mailbox unavailable (via the ESP)",
    }
    assert recipient(verp, mid, "esp-spam@example.net")["status"] == "complained"
    assert recipient(verp, mid, "esp-late@example.net")["status"] == "sent"
    assert [e.reason for e in api.suppressions(address="esp-hard@example.net")] == ["bounced"]
    with TestClient(create_app(token="token-for-events")) as client:
        listed = client.get("/api/v1/bounces?unmatched=1", headers=auth).json()
        assert [b["reason"] for b in listed["bounces"]] == [
            f"unmatched: message {mid} has no recipient nobody@example.net"
        ]
        everything = client.get("/api/v1/bounces?limit=2", headers=auth).json()
        assert len(everything["bounces"]) == 2 and everything["next_before"] is not None
        assert client.get("/api/v1/bounces").status_code == 401


def test_the_endpoint_answers_451_past_its_rate_per_client(verp):
    server = BounceServer(settings=verp.settings, rate_per_minute=2).start()
    try:
        rcpt = f"b+1-aaaaaaaaaaaaaaaa@{DOMAIN}"
        report = (CORPUS / "autoreply.eml").read_bytes()
        submit(server, rcpt, report)
        submit(server, rcpt, report)
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            submit(server, rcpt, report)
        assert refused.value.smtp_code == 451
        assert b"too many reports" in refused.value.smtp_error
    finally:
        server.stop()
    assert len(bounce_rows(verp)) == 2


def test_migration_0009_is_the_one_head_and_reverses(tmp_path):
    from alembic import command
    from alembic.script import ScriptDirectory

    from mailqueue.migrate import alembic_config, upgrade

    url = f"sqlite:///{tmp_path / 'm.db'}"
    config = alembic_config(url)
    assert ScriptDirectory.from_config(config).get_heads() == ["0009"]
    upgrade(url)
    engine = sa.create_engine(url)
    assert "mq_bounce" in sa.inspect(engine).get_table_names()
    command.downgrade(config, "-1")
    assert "mq_bounce" not in sa.inspect(engine).get_table_names()
    upgrade(url)
    assert "mq_bounce" in sa.inspect(engine).get_table_names()
    engine.dispose()
