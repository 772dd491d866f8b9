"""Make docs/status-page.png: the status page over a day of made-up traffic.

    .venv/bin/python docs/make_screenshot.py

Needs Debian's chromium and chromium-driver. Builds a throw-away SQLite
database in a temporary folder, fills it with 24 hours of messages (a relay
outage in the afternoon shows as a burst of failures), serves the real app
and saves what headless Chromium shows.
"""

from __future__ import annotations

import datetime as dt
import random
import tempfile
import threading
import time
import uuid
from pathlib import Path

import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from sqlalchemy import insert

import mailqueue
from mailqueue.config import configure, settings_from_env
from mailqueue.migrate import upgrade
from mailqueue.store import get_engine
from mailqueue.store.models import MessageRow, RecipientRow
from mailqueue.web.app import create_app

OUT = Path(__file__).resolve().parent / "status-page.png"
TOKEN = "screenshot"


def fill(url: str) -> None:
    rng = random.Random(7)
    now = dt.datetime.now(dt.UTC)
    messages, recipients = [], []
    senders = ["shop@example.com", "news@example.com", "alerts@example.com"]
    for i in range(4000):
        created = now - dt.timedelta(seconds=rng.uniform(0, 86400))
        hours_ago = (now - created).total_seconds() / 3600
        outage = 5 < hours_ago < 6.5
        roll = rng.random()
        if outage:
            status = "failed" if roll < 0.45 else "sent"
        elif hours_ago < 0.1:
            status = rng.choice(["queued", "deferred", "sent", "sent"])
        else:
            status = "failed" if roll < 0.03 else "partial" if roll < 0.05 else "sent"
        mid = uuid.uuid4()
        sender = senders[i % 3]
        messages.append(
            dict(
                id=mid,
                created_at=created,
                updated_at=created,
                status=status,
                relay="default",
                mail_from=sender,
                subject=f"Order #{10000 + i}" if sender.startswith("shop") else "Weekly news",
                size=2048,
                content=b"Subject: x\r\n\r\nx",
                smtputf8=False,
                eightbit=False,
                attempts=1,
                next_attempt_at=created,
                expires_at=created + dt.timedelta(days=5),
                meta={"tag": "orders" if sender.startswith("shop") else "news"},
                last_error="RecipientError" if status in ("failed", "partial") else None,
            )
        )
        kinds = ["failed"] if status == "failed" else ["sent"]
        if status == "partial":
            kinds = ["sent", "failed"]
        if status in ("queued", "deferred"):
            kinds = ["pending" if status == "queued" else "deferred"]
        for n, rstatus in enumerate(kinds):
            recipients.append(
                dict(
                    message_id=mid,
                    address=f"customer{i}-{n}@example.org",
                    kind="to",
                    status=rstatus,
                    attempts=1,
                    smtp_code={"sent": 250, "failed": 550, "deferred": 451}.get(rstatus),
                    reply="5.1.1 <customer@example.org>: user unknown"
                    if rstatus == "failed"
                    else None,
                    error="RecipientError" if rstatus == "failed" else None,
                    updated_at=created + dt.timedelta(seconds=2),
                    sent_at=created + dt.timedelta(seconds=2) if rstatus == "sent" else None,
                )
            )
    engine = get_engine(url)
    with engine.begin() as conn:
        conn.execute(insert(MessageRow.__table__), messages)
        conn.execute(insert(RecipientRow.__table__), recipients)


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="mq-shot-"))
    url = f"sqlite:///{folder / 'mq.db'}"
    configure(settings_from_env({"MAILQUEUE_DATABASE_URL": url}))
    upgrade(url)
    fill(url)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(token=None, allow_anonymous=True), port=18099, log_level="warning"
        )
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1150",
        f"--user-data-dir={folder / 'profile'}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(
        service=Service(executable_path="/usr/bin/chromedriver"), options=options
    )
    try:
        driver.get("http://127.0.0.1:18099/")
        driver.save_screenshot(str(OUT))
    finally:
        driver.quit()
        server.should_exit = True
        mailqueue._reset_caches()
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
