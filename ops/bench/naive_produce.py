"""The naive producer: ``python naive_produce.py COUNT`` (environment as for naive_app).

Like the other phases it sends 100 distinct messages composed up front, over
and over, so that the naive figure is not charged for MIME composition either.
"""

from __future__ import annotations

import sys

import naive_app
from run import envelope

if __name__ == "__main__":
    count = int(sys.argv[1])
    distinct = [envelope(i) for i in range(min(count, 100))]
    for i in range(count):
        mail_from, rcpts, data = distinct[i % len(distinct)]
        naive_app.enqueue_one(mail_from, rcpts[0], data)
