"""The naive producer: ``python naive_produce.py COUNT`` (environment as for naive_app).

Like the other phases it sends 100 distinct messages composed up front, over
and over, so that the naive figure is not charged for MIME composition either.
With ``NAIVE_GO=path`` it creates ``path.ready`` once it is set up and starts
when ``path`` exists, so the clock does not time its interpreter start-up.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import naive_app
from run import envelope

if __name__ == "__main__":
    count = int(sys.argv[1])
    distinct = [envelope(i) for i in range(min(count, 100))]
    if go := os.environ.get("NAIVE_GO"):
        Path(go + ".ready").touch()
        while not os.path.exists(go):
            time.sleep(0.001)
    for i in range(count):
        mail_from, rcpts, data = distinct[i % len(distinct)]
        naive_app.enqueue_one(mail_from, rcpts[0], data)
