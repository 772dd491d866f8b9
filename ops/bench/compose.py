"""Composition and validation rate: ``build_envelope`` against the ``email`` package.

What enqueue spends before it touches the database: validating the addresses,
writing the header block (and reading it back, since the input-boundary
work), the body. The naive way, in the same run, is what an app does without
mailqueue: an ``email.message.EmailMessage`` with the same fields, serialized
with ``as_bytes()`` (no validation, no check).

    .venv/bin/python ops/bench/compose.py [--n 3000] [--rounds 5] [--enqueue-many 20000]

``--enqueue-many N`` also times ``enqueue_many`` of N ``plain`` messages
into a fresh SQLite database (dispatch to an idle SQLite broker included),
the figure composition weighs on. To compare two commits, run this script
with each checkout's interpreter (or ``PYTHONPATH``), from outside both
checkouts, alternating.

Three kinds of message, all with a text and an HTML body: ``plain`` (plain
addresses, ASCII subject), ``names`` (display names needing quotes, one with
a comma), ``intl`` (a subject and a name in other scripts). Rounds alternate
mailqueue and naive; the best round of each is printed, with the median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from email.message import EmailMessage

from mailqueue import Message
from mailqueue.message import build_envelope

KINDS = {
    "plain": dict(
        sender="Shop <shop@example.com>",
        to=lambda i: [f"customer{i}@example.org"],
        subject=lambda i: f"Your order #{i} has shipped",
    ),
    "names": dict(
        sender='"Example Shop, Customer Care" <care@example.com>',
        to=lambda i: [f'"Doe, Jane {i}" <jane{i}@example.org>', f"Bob Smith <bob{i}@example.net>"],
        subject=lambda i: f'Re: [ticket {i}] your question about "returns"',
    ),
    "intl": dict(
        sender=("Zoë Ångström", "zoe@example.com"),
        to=lambda i: [(f"山田 太郎 {i}", f"taro{i}@example.jp")],
        subject=lambda i: f"Grüße aus Köln — ご注文 {i} を発送しました",
    ),
}


def mq_messages(kind: str, n: int) -> list[Message]:
    k = KINDS[kind]
    return [
        Message(
            sender=k["sender"],
            to=k["to"](i),
            subject=k["subject"](i),
            text=f"Hello {i},\nyour parcel is on its way.\n",
            html=f"<p>Hello {i},</p><p>your parcel is on its way.</p>",
        )
        for i in range(n)
    ]


def naive(msg: Message) -> bytes:
    em = EmailMessage()
    sender = msg.sender
    em["From"] = f"{sender[0]} <{sender[1]}>" if isinstance(sender, tuple) else sender
    em["To"] = ", ".join(
        f'"{t[0]}" <{t[1]}>' if isinstance(t, tuple) else t
        for t in msg.to  # type: ignore[union-attr]
    )
    em["Subject"] = msg.subject
    em.set_content(msg.text or "")
    em.add_alternative(msg.html or "", subtype="html")
    return em.as_bytes()


def timed(fn, messages: list[Message]) -> float:
    start = time.perf_counter()
    for m in messages:
        fn(m)
    return len(messages) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="messages per round and kind")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--enqueue-many", type=int, default=0, metavar="N")
    args = parser.parse_args()
    if args.enqueue_many:
        enqueue_many(args.enqueue_many)
        return
    print(f"Python {sys.version.split()[0]}; {args.n} messages a round, {args.rounds} rounds")
    for kind in KINDS:
        messages = mq_messages(kind, args.n)
        build_envelope(messages[0])  # warm the address caches as a long-running app has them
        ours: list[float] = []
        theirs: list[float] = []
        for r in range(args.rounds):
            ours.append(timed(build_envelope, messages))
            theirs.append(timed(naive, messages))
            line = f"{ours[-1]:,.0f} vs {theirs[-1]:,.0f} msg/s"
            print(f"  {kind} round {r + 1}/{args.rounds}: {line}", file=sys.stderr)
        print(
            f"{kind:6} mailqueue build_envelope: best {max(ours):8,.0f} msg/s "
            f"(median {statistics.median(ours):,.0f}); email package as_bytes: best "
            f"{max(theirs):8,.0f} msg/s (median {statistics.median(theirs):,.0f})"
        )


def enqueue_many(n: int) -> None:
    import os
    import tempfile

    folder = tempfile.mkdtemp(prefix="mq-compose-bench-")
    os.environ["MAILQUEUE_DATABASE_URL"] = f"sqlite:///{folder}/mq.db"
    os.environ["MAILQUEUE_BROKER_URL"] = f"sqla+sqlite:///{folder}/broker.db"
    os.environ["MAILQUEUE_QUEUE"] = "idle"
    import mailqueue
    from mailqueue import api
    from mailqueue.migrate import upgrade
    from mailqueue.worker.app import flush_dispatch

    mailqueue.configure()
    upgrade(os.environ["MAILQUEUE_DATABASE_URL"])
    messages = mq_messages("plain", n)
    start = time.perf_counter()
    api.enqueue_many(messages, progress=lambda k: print(f"  {k}/{n}", file=sys.stderr))
    flush_dispatch()
    seconds = time.perf_counter() - start
    print(
        f"enqueue_many {n} plain messages into SQLite: {n / seconds:,.0f} msg/s "
        f"({mailqueue.__file__})"
    )


if __name__ == "__main__":
    main()
