"""A failing relay is paused once per failure event, not once per message that sees it.

Issue #21: with an untrusted relay certificate every message in flight
counted one more failure, so 100 messages paused the relay for ~35 minutes
on the first event, and the last writer decided the length. The pause
doubles per *event* (the first failure while the relay is not paused) and
``failures`` counts events.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

import pytest
import sqlalchemy as sa
import trustme

import mailqueue
from mailqueue import Message
from mailqueue.backoff import JITTER
from mailqueue.devserver import DevServer
from mailqueue.store.models import RELAYS, utcnow
from mailqueue.store.relays import PAUSE_BASE_S, pause_relay, relay_states, resume_relay

from .test_delivery import deliver, make_due


@pytest.fixture(autouse=True)
def _no_relay_state(stack):
    """The PostgreSQL test database lives for the session: start with no pause, and
    leave none behind for the tests that run after these."""
    with stack.engine.begin() as conn:
        conn.execute(sa.delete(RELAYS))
    yield
    with stack.engine.begin() as conn:
        conn.execute(sa.delete(RELAYS))


def state(stack, name: str = "default"):
    (found,) = [s for s in relay_states(stack.engine) if s.name == name]
    return found


def pause_length_s(st) -> float:
    assert st.paused_until is not None
    return (st.paused_until - st.updated_at).total_seconds()


def base_pause_after(failures: int) -> tuple[float, float]:
    """The range the documented backoff allows after the n-th event (±jitter)."""
    delay = PAUSE_BASE_S * 2 ** (failures - 1)
    return delay * (1 - JITTER), delay * (1 + JITTER)


def expire_pause(stack, name: str = "default") -> None:
    """The pause ran out (as if its minutes had passed)."""
    with stack.engine.begin() as conn:
        conn.execute(
            sa.update(RELAYS)
            .where(RELAYS.c.name == name)
            .values(paused_until=utcnow() - dt.timedelta(seconds=1))
        )


def test_a_hundred_concurrent_failures_are_one_event_of_the_base_length(stack):
    """100 workers' threads report the same trouble at once: one pause, failures=1,
    everyone is told the same end, and exactly one call began it."""
    start = threading.Barrier(100)
    pauses = []

    def fail() -> None:
        start.wait()
        pauses.append(pause_relay(stack.engine, "default", error="TLSError", reply="bad cert"))

    threads = [threading.Thread(target=fail) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(pauses) == 100
    assert sum(p.started for p in pauses) == 1
    assert {p.until for p in pauses} == {state(stack).paused_until}
    st = state(stack)
    assert st.failures == 1 and st.paused
    low, high = base_pause_after(1)
    assert low <= pause_length_s(st) <= high


def test_the_pause_doubles_per_event_and_a_resume_ends_the_series(stack):
    for event in (1, 2, 3):
        for _ in range(5):  # five messages see each event
            pause_relay(stack.engine, "default", error="TLSError", reply="bad cert")
        st = state(stack)
        assert st.failures == event
        low, high = base_pause_after(event)
        assert low <= pause_length_s(st) <= high
        expire_pause(stack)
    assert resume_relay(stack.engine, "default")
    pause_relay(stack.engine, "default", error="AuthError", reply="535 no")
    st = state(stack)
    assert st.failures == 1 and st.last_error == "AuthError"


@pytest.fixture(scope="module")
def untrusted_tls_server(tmp_path_factory):
    """An SMTPS server whose certificate comes from a CA nobody trusts."""
    root = tmp_path_factory.mktemp("pki")
    cert = trustme.CA().issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(root / "server.pem")
    cert.private_key_pem.write_to_path(root / "server.key")
    server = DevServer(
        tls_cert=str(root / "server.pem"), tls_key=str(root / "server.key"), tls_port=0
    ).start()
    yield server
    server.stop()


@pytest.mark.parametrize("smtp_server", ["sequential"], indirect=True)
def test_a_hundred_messages_in_flight_on_an_untrusted_certificate_pause_once(
    stack, smtp_server, untrusted_tls_server, caplog
):
    """The issue's run: 100 messages in flight, each fails the TLS handshake. The relay
    is paused once for the base length (failures=1), logged once; every message goes
    back to wait for the relay without spending an attempt. The next event, after the
    pause ran out, doubles it."""
    stack.reconfigure(
        relay_url=f"smtps://127.0.0.1:{untrusted_tls_server.tls_port}", relay_pool_size=20
    )
    ids = mailqueue.enqueue_many(
        [Message(sender="app@example.com", to=f"r{i}@example.com", text="t") for i in range(100)]
    )
    with caplog.at_level(logging.ERROR, logger="mailqueue.worker"):
        deliver(stack, ids)
    st = state(stack)
    assert (st.failures, st.last_error) == (1, "TLSError")
    low, high = base_pause_after(1)
    assert low <= pause_length_s(st) <= high
    assert caplog.text.count("relay default paused until") == 1
    infos = [mailqueue.get_status(i) for i in ids]
    assert {i.status for i in infos} == {"deferred"}
    assert {i.attempts for i in infos} == {0}
    assert untrusted_tls_server.messages == []

    expire_pause(stack)
    make_due(stack, ids)
    deliver(stack, ids)
    st = state(stack)
    assert st.failures == 2
    low, high = base_pause_after(2)
    assert low <= pause_length_s(st) <= high
