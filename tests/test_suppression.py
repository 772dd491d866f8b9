"""The suppression list: checked when a worker claims a message, never sent to.

Asserted on what the dev SMTP server received and what the status table
says, on both stacks; the worker is the real one (a spawned ``mailqueue
worker``) or the very code its task runs (``Deliverer.deliver_batch``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mailqueue
from mailqueue import Message, api
from mailqueue.errors import InvalidMessageError
from mailqueue.store.record import derive_status
from mailqueue.store.suppression import address_key

from .conftest import wait_until
from .test_delivery import deliver

TERMINAL = {"sent", "partial", "failed", "cancelled", "suppressed"}


def statuses(mid: str) -> dict[str, str]:
    return {r.address: r.status for r in mailqueue.get_status(mid).recipients}


@pytest.mark.slow
def test_a_suppression_added_while_the_message_waits_stops_it_at_claim(stack, smtp_server, spawn):
    """Queued first, suppressed after: the worker withholds that recipient, sends the rest."""
    mixed = mailqueue.enqueue(
        Message(
            sender="app@example.com",
            to=["keep@example.com", "Gone@Example.COM"],
            subject="s",
            text="t",
        )
    )
    alone = mailqueue.enqueue(
        Message(sender="app@example.com", to="gone@example.com", subject="s", text="t")
    )
    # After enqueue, before any worker runs: only a claim-time check can see it.
    api.suppress("Gone@example.com", reason="unsubscribed", note="clicked the link")
    api.suppress("gone@example.com", reason="bounced")  # local parts differ: another entry

    spawn("worker", "--concurrency", "1", "--loglevel", "WARNING", env=stack.env())
    wait_until(
        lambda: {mailqueue.get_status(m).status for m in (mixed, alone)} <= TERMINAL,
        timeout=60,
        what="both messages terminal",
    )

    assert len(smtp_server.received_for("keep@example.com")) == 1
    assert smtp_server.received_for("Gone@example.com") == []
    assert smtp_server.received_for("gone@example.com") == []
    info = mailqueue.get_status(mixed)
    assert info.status == "partial"
    by_address = {r.address: r for r in info.recipients}
    gone = by_address["Gone@example.com"]
    assert (gone.status, gone.error, gone.reply, gone.attempts) == (
        "suppressed",
        "Suppressed",
        "suppressed: unsubscribed (everywhere)",
        0,
    )
    assert mailqueue.get_status(alone).status == "suppressed"
    assert statuses(alone) == {"gone@example.com": "suppressed"}
    history = [(a.address, a.status, a.reply) for a in mailqueue.get_attempts(alone)]
    assert history == [("gone@example.com", "suppressed", "suppressed: bounced (everywhere)")]
    counts = mailqueue.stats()
    assert counts["recipients"]["suppressed"] == 2
    assert counts["messages"]["suppressed"] == 1


def test_scopes_apply_to_their_sender_domain_or_list_only(stack, smtp_server):
    api.suppress("reader@example.com", scope="domain:News.Example.org")
    api.suppress("fan@example.com", reason="unsubscribed", scope="list:weekly.example.org")

    def send(sender: str, to: str, list_id: str | None = None) -> str:
        msg = Message(sender=sender, to=to, subject="s", text="t")
        return mailqueue.enqueue(msg, list_id=list_id)

    ids = {
        "domain hit": send("promo@news.example.org", "reader@example.com"),
        "other domain": send("billing@example.org", "reader@example.com"),
        "list hit": send("promo@example.org", "fan@example.com", "<Weekly.example.org>"),
        "other list": send("promo@example.org", "fan@example.com", "daily.example.org"),
        "no list": send("promo@example.org", "fan@example.com"),
    }
    deliver(stack, ids.values())

    got = {name: mailqueue.get_status(mid).status for name, mid in ids.items()}
    assert got == {
        "domain hit": "suppressed",
        "other domain": "sent",
        "list hit": "suppressed",
        "other list": "sent",
        "no list": "sent",
    }
    assert len(smtp_server.received_for("reader@example.com")) == 1
    assert len(smtp_server.received_for("fan@example.com")) == 2
    [why] = [r.reply for r in mailqueue.get_status(ids["list hit"]).recipients]
    assert why == "suppressed: unsubscribed (list:weekly.example.org)"


def test_local_part_case_counts_unless_configured(stack, smtp_server):
    api.suppress("Alice@EXAMPLE.com")
    lower, upper = (
        mailqueue.enqueue(Message(sender="a@example.com", to=to, text="t"))
        for to in ("alice@example.com", "Alice@example.com")
    )
    deliver(stack, [lower, upper])
    assert statuses(lower) == {"alice@example.com": "sent"}
    assert statuses(upper) == {"Alice@example.com": "suppressed"}
    assert api.is_suppressed("Alice@example.com") and not api.is_suppressed("alice@example.com")

    stack.reconfigure(suppression_local_case_insensitive=True)
    api.suppress("BOB@example.com")
    folded = mailqueue.enqueue(Message(sender="a@example.com", to="bob@Example.com", text="t"))
    deliver(stack, [folded])
    assert statuses(folded) == {"bob@example.com": "suppressed"}
    assert smtp_server.received_for("bob@example.com") == []


def test_removed_entries_no_longer_stop_mail_and_listing_pages(stack, smtp_server):
    for i in range(5):
        api.suppress(f"u{i}@example.com", reason="complained" if i % 2 else "manual")
    assert api.unsuppress("u0@EXAMPLE.com") is True
    assert api.unsuppress("u0@example.com") is False
    assert api.unsuppress("u1@example.com", scope="list:x.example.org") is False

    first = api.suppressions(limit=2)
    rest = api.suppressions(limit=10, before=first[-1].id)
    assert [e.address for e in first + rest] == [f"u{i}@example.com" for i in (4, 3, 2, 1)]
    assert [e.address for e in api.suppressions(reason="complained")] == [
        "u3@example.com",
        "u1@example.com",
    ]
    again = api.suppress("u3@example.com", reason="bounced", note="hard bounce")
    assert (again.reason, again.note) == ("bounced", "hard bounce")
    assert len(api.suppressions(address="u3@example.com")) == 1

    mid = mailqueue.enqueue(Message(sender="a@example.com", to="u0@example.com", text="t"))
    deliver(stack, [mid])
    assert mailqueue.get_status(mid).status == "sent"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"address": "not an address"}, "address"),
        ({"address": "x@example.com\r\nBcc: y@example.com"}, "address"),
        ({"address": "x@example.com", "reason": "angry"}, "reason"),
        ({"address": "x@example.com", "scope": "example.com"}, "scope"),
        ({"address": "x@example.com", "scope": "list:nodot"}, "scope"),
        ({"address": "x@example.com", "scope": "domain:bad domain"}, "scope"),
    ],
)
def test_bad_entries_are_refused_whole(sqlite_stack, kwargs, field):
    with pytest.raises(InvalidMessageError) as caught:
        api.suppress(**kwargs)
    assert caught.value.field == field
    assert api.suppressions() == []


@pytest.mark.parametrize("bad", ["no-dot", "a b.example.org", "x.example.org\r\n", "é.example.org"])
def test_enqueue_refuses_a_list_id_that_is_not_rfc_2919(sqlite_stack, bad):
    msg = Message(sender="a@example.com", to="b@example.com", text="t")
    with pytest.raises(InvalidMessageError) as caught:
        mailqueue.enqueue(msg, list_id=bad)
    assert caught.value.field == "list_id"
    with pytest.raises(InvalidMessageError):
        mailqueue.enqueue_many([msg], list_id=bad)
    assert mailqueue.stats()["messages"]["queued"] == 0


def test_import_refuses_a_bad_row_by_line_and_export_round_trips(sqlite_stack):
    bad = ["address,reason,scope,note\n", "a@example.com,bounced,,\n", "nope,manual,,\n"]
    with pytest.raises(InvalidMessageError, match="line 3"):
        api.import_suppressions(bad)
    assert api.suppressions() == []

    good = [
        "address,reason,scope,note\n",
        "a@example.com,bounced,,first\n",
        'b@example.com,unsubscribed,list:news.example.org,"with, comma"\n',
        "c@example.com,,domain:example.org,\n",
    ]
    seen: list[int] = []
    assert api.import_suppressions(good, progress=seen.append) == 3
    assert seen == [3]

    import io

    out = io.StringIO()
    assert api.export_suppressions(out) == 3
    rows = out.getvalue().splitlines()
    assert rows[0] == "address,reason,scope,note,created_at"
    assert rows[2].startswith('b@example.com,unsubscribed,list:news.example.org,"with, comma",')
    for entry in api.suppressions():
        api.unsuppress(entry.address, scope=entry.scope)
    assert api.import_suppressions(io.StringIO(out.getvalue())) == 3
    assert {(e.address, e.reason, e.scope, e.note) for e in api.suppressions()} == {
        ("a@example.com", "bounced", "", "first"),
        ("b@example.com", "unsubscribed", "list:news.example.org", "with, comma"),
        ("c@example.com", "manual", "domain:example.org", None),
    }


def test_message_status_words_with_suppressed_recipients():
    assert derive_status(["suppressed"]) == "suppressed"
    assert derive_status(["suppressed", "cancelled"]) == "suppressed"
    assert derive_status(["suppressed", "sent"]) == "partial"
    assert derive_status(["suppressed", "failed"]) == "failed"
    assert derive_status(["suppressed", "deferred"]) == "deferred"
    assert derive_status(["suppressed", "pending"]) == "queued"


_LOCAL = st.from_regex(r"[A-Za-z0-9._+-]{1,20}", fullmatch=True)
_LABEL = st.from_regex(r"[A-Za-z0-9]{1,10}", fullmatch=True)


@given(_LOCAL, st.lists(_LABEL, min_size=2, max_size=4), st.booleans())
def test_keys_ignore_domain_case_and_keep_local_case_unless_folded(local, labels, fold):
    domain = ".".join(labels)
    key = address_key(f"{local}@{domain.upper()}", fold_local=fold)
    assert key == address_key(f"{local}@{domain.lower()}", fold_local=fold)
    assert key == address_key(key, fold_local=fold)  # a key is its own key
    assert key.rpartition("@")[0] == (local.lower() if fold else local)
    if not fold and local.lower() != local:
        assert key != address_key(f"{local.lower()}@{domain}", fold_local=fold)


def test_idna_domains_are_one_key():
    assert address_key("x@BÜCHER.example") == address_key("x@xn--bcher-kva.example")


def run_cli(stack, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailqueue", "suppress", *args],
        env=stack.env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_add_list_remove_import_export_round_trip(sqlite_stack, tmp_path):
    added = run_cli(sqlite_stack, "add", "Ann@Example.com", "--reason", "bounced", "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["address_key"] == "Ann@example.com"
    assert run_cli(sqlite_stack, "add", "x@example.com", "--scope", "example.com").returncode == 2

    big = tmp_path / "big.csv"
    big.write_text(
        "address,reason,scope,note\n"
        + "".join(
            f"user{i}@example.org,unsubscribed,list:news.example.org,\n" for i in range(12000)
        )
    )
    imported = run_cli(sqlite_stack, "import", str(big))
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "imported 12000 entries"
    assert "written 5000" in imported.stderr and "written 12000" in imported.stderr

    bad = tmp_path / "bad.csv"
    bad.write_text("address,reason\nok@example.com,manual\nok2@example.com,furious\n")
    refused = run_cli(sqlite_stack, "import", str(bad))
    assert refused.returncode == 2
    assert "line 3" in refused.stderr and "furious" in refused.stderr
    assert not api.is_suppressed("ok@example.com")  # nothing of the file was written

    listed = json.loads(run_cli(sqlite_stack, "list", "--reason", "bounced", "--json").stdout)
    assert [e["address"] for e in listed] == ["Ann@example.com"]

    exported = run_cli(sqlite_stack, "export")
    lines = exported.stdout.splitlines()
    assert len(lines) == 1 + 12001
    assert run_cli(sqlite_stack, "remove", "ann@example.com").returncode == 1  # local case
    assert run_cli(sqlite_stack, "remove", "Ann@EXAMPLE.com").returncode == 0
    assert not api.is_suppressed("Ann@example.com")
    again = run_cli(sqlite_stack, "import", "-", stdin=exported.stdout)
    assert again.returncode == 0, again.stderr
    assert api.is_suppressed("Ann@example.com")
    assert api.is_suppressed("user11999@example.org", list_id="news.example.org")
    assert not api.is_suppressed("user11999@example.org")  # list-scoped only


def test_json_api_adds_lists_and_removes_entries_behind_the_token(stack, smtp_server):
    from starlette.testclient import TestClient

    from mailqueue.web.app import create_app

    auth = {"Authorization": "Bearer t0ken-for-suppression-tests"}
    with TestClient(create_app(token="t0ken-for-suppression-tests")) as client:
        assert client.get("/api/v1/suppressions").status_code == 401
        entry = {"address": "x@example.com", "reason": "complained"}
        assert client.post("/api/v1/suppressions", json=entry).status_code == 401
        assert client.delete("/api/v1/suppressions?address=x@example.com").status_code == 401

        made = client.post("/api/v1/suppressions", json=entry, headers=auth)
        assert made.status_code == 201
        assert (made.json()["reason"], made.json()["scope"]) == ("complained", "")
        scoped = {"address": "x@example.com", "scope": "list:news.example.org", "note": "n"}
        assert client.post("/api/v1/suppressions", json=scoped, headers=auth).status_code == 201
        bad = client.post(
            "/api/v1/suppressions", json={"address": "x@example.com", "reason": "x"}, headers=auth
        )
        assert (bad.status_code, bad.json()["field"]) == (400, "reason")
        extra = client.post("/api/v1/suppressions", json={**entry, "why": 1}, headers=auth)
        assert (extra.status_code, extra.json()["field"]) == (400, "body")

        page = client.get("/api/v1/suppressions?limit=1", headers=auth).json()
        assert [e["scope"] for e in page["suppressions"]] == ["list:news.example.org"]
        rest = client.get(f"/api/v1/suppressions?before={page['next_before']}", headers=auth).json()
        assert [e["scope"] for e in rest["suppressions"]] == [""]
        assert rest["next_before"] is None
        stats = client.get("/api/v1/stats", headers=auth).json()
        assert stats["suppressions"]["complained"] == 1

        mid = client.post(
            "/api/v1/messages",
            json={
                "sender": "a@example.org",
                "to": "x@example.com",
                "text": "t",
                "list_id": "news.example.org",
            },
            headers=auth,
        ).json()["id"]
        deliver(stack, [mid])
        assert mailqueue.get_status(mid).status == "suppressed"
        assert smtp_server.received_for("x@example.com") == []

        gone = client.delete("/api/v1/suppressions?address=x@example.com", headers=auth)
        assert (gone.status_code, gone.json()) == (200, {"removed": True})
        again = client.delete("/api/v1/suppressions?address=x@example.com", headers=auth)
        assert again.status_code == 404
        assert [e.scope for e in api.suppressions()] == ["list:news.example.org"]


def test_status_page_counts_and_edits_the_list_behind_login_and_csrf(stack, smtp_server):
    import re

    from starlette.testclient import TestClient

    from mailqueue.web.app import create_app

    api.suppress("old@example.com", reason="bounced")
    mid = mailqueue.enqueue(Message(sender="a@example.org", to="old@example.com", text="t"))
    deliver(stack, [mid])
    with TestClient(create_app(token="page-token-for-suppression")) as client:
        assert client.get("/suppressions", follow_redirects=False).status_code == 303
        login = client.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', login.text).group(1)
        client.post("/login", data={"token": "page-token-for-suppression", "csrf": csrf})

        index = client.get("/")
        card = re.search(r'data-status="suppressed"><div class="n">(\d+)', index.text)
        assert card is not None and card.group(1) == "1"  # the message card comes first
        assert "Suppression list</a>: 1 entries · bounced 1" in index.text

        page = client.get("/suppressions")
        assert "old@example.com" in page.text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        forged = client.post("/suppressions/add", data={"csrf": "x", "address": "n@example.com"})
        assert forged.status_code == 403 and not api.is_suppressed("n@example.com")
        added = client.post(
            "/suppressions/add",
            data={"csrf": csrf, "address": "n@example.com", "reason": "complained", "scope": ""},
        )
        assert added.status_code == 200 and "Added to the suppression list" in added.text
        assert api.is_suppressed("n@example.com")
        bad = client.post("/suppressions/add", data={"csrf": csrf, "address": "nope"})
        assert bad.status_code == 400
        removed = client.post(
            "/suppressions/remove", data={"csrf": csrf, "address": "old@example.com", "scope": ""}
        )
        assert "Removed from the suppression list" in removed.text
        assert [e.address for e in api.suppressions()] == ["n@example.com"]


def test_metrics_count_suppressed_recipients_once_and_the_list_per_reason(stack, smtp_server):
    from prometheus_client import REGISTRY

    from mailqueue import metrics

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    metrics.get()
    rcpt = ("mailqueue_recipients_total", {"relay": "default", "outcome": "suppressed"})
    msgs = ("mailqueue_messages_total", {"relay": "default", "outcome": "suppressed"})
    before = sample(rcpt[0], **rcpt[1]), sample(msgs[0], **msgs[1])

    smtp_server.defer = ["later@*"]
    api.suppress("no@example.com", reason="complained")
    mid = mailqueue.enqueue(
        Message(sender="a@example.org", to=["no@example.com", "later@example.com"], text="t")
    )
    gone = mailqueue.enqueue(Message(sender="a@example.org", to="no@example.com", text="t"))
    deliver(stack, [mid, gone])
    assert statuses(mid) == {"no@example.com": "suppressed", "later@example.com": "deferred"}
    smtp_server.defer = []
    from .test_delivery import make_due

    make_due(stack, [mid])
    deliver(stack, [mid])  # the second attempt must not count the suppressed one again
    assert mailqueue.get_status(mid).status == "partial"

    assert sample(rcpt[0], **rcpt[1]) - before[0] == 2
    assert sample(msgs[0], **msgs[1]) - before[1] == 1
    metrics.observe_queue(stack.engine)
    assert sample("mailqueue_suppressions", reason="complained") == 1
    assert sample("mailqueue_suppressions", reason="bounced") == 0


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_migration_0006_adds_the_list_and_list_id_and_reverses(kind, empty_database):
    import sqlalchemy as sa
    from alembic import command

    from mailqueue.migrate import alembic_config, upgrade

    url = empty_database

    def shape() -> tuple[set[str], set[str], set[str]]:
        engine = sa.create_engine(url)
        try:
            inspector = sa.inspect(engine)
            tables = set(inspector.get_table_names())
            columns = {c["name"] for c in inspector.get_columns("mq_message")}
            unique = (
                {u["name"] for u in inspector.get_unique_constraints("mq_suppression")}
                | {i["name"] for i in inspector.get_indexes("mq_suppression") if i["unique"]}
                if "mq_suppression" in tables
                else set()
            )
        finally:
            engine.dispose()
        return tables, columns, unique

    upgrade(url, "0005")
    tables, columns, _ = shape()
    assert "mq_suppression" not in tables and "list_id" not in columns
    upgrade(url, "0006")
    tables, columns, unique = shape()
    assert "mq_suppression" in tables and "list_id" in columns
    assert "uq_mq_suppression_key_scope" in unique
    command.downgrade(alembic_config(url), "0005")
    tables, columns, _ = shape()
    assert "mq_suppression" not in tables and "list_id" not in columns
    engine = sa.create_engine(url)
    listing = (
        "SELECT name FROM sqlite_master WHERE type = 'index'"
        if kind == "sqlite"
        else "SELECT indexname FROM pg_indexes WHERE tablename = 'mq_message'"
    )
    with engine.connect() as conn:
        indexes = set(conn.execute(sa.text(listing)).scalars())
    engine.dispose()
    assert "ix_mq_message_tag_created" in indexes  # mq_message was not rebuilt
    upgrade(url, "0006")


def test_anymail_calls_a_suppressed_recipient_rejected(sqlite_stack, smtp_server):
    from mailqueue.contrib.status import anymail_statuses

    api.suppress("x@example.com", reason="complained")
    mid = mailqueue.enqueue(
        Message(sender="a@example.org", to=["x@example.com", "y@example.com"], text="t")
    )
    deliver(sqlite_stack, [mid])
    assert anymail_statuses(mailqueue.get_status(mid)) == {"rejected", "sent"}


def test_a_deferred_recipient_suppressed_before_its_retry_is_never_sent(stack, smtp_server):
    """The bounce/complaint arrives while the recipient waits for a retry."""
    from .test_delivery import make_due

    smtp_server.defer = ["slow@*"]
    mid = mailqueue.enqueue(
        Message(sender="a@example.org", to=["slow@example.com", "ok@example.com"], text="t")
    )
    deliver(stack, [mid])
    assert statuses(mid) == {"slow@example.com": "deferred", "ok@example.com": "sent"}
    api.suppress("slow@example.com", reason="complained")
    smtp_server.defer = []
    make_due(stack, [mid])
    deliver(stack, [mid])
    info = mailqueue.get_status(mid)
    assert info.status == "partial"
    by_address = {r.address: r for r in info.recipients}
    assert (by_address["slow@example.com"].status, by_address["slow@example.com"].attempts) == (
        "suppressed",
        1,  # the deferred try counts; the suppression is not an attempt
    )
    assert smtp_server.received_for("slow@example.com") == []
    assert len(smtp_server.received_for("ok@example.com")) == 1
