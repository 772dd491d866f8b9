"""The one backoff rule (mailqueue/backoff.py) and the recorder's retry of SQL writes.

Pure functions and a scripted store: no clock, no server.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from mailqueue.backoff import JITTER, backoff_s
from mailqueue.store.queue import MessageOutcome
from mailqueue.worker.service import _Recorder


class _Bound(random.Random):
    """A random source that always draws the lowest or the highest factor."""

    def __init__(self, high: bool) -> None:
        super().__init__()
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


LOW, HIGH = _Bound(False), _Bound(True)


@pytest.mark.parametrize(
    ("failures", "expected"),
    [(-3, 300), (0, 300), (1, 300), (2, 600), (3, 1200), (4, 2400), (5, 4000), (50, 4000)],
)
def test_doubles_from_the_base_up_to_the_cap(failures, expected):
    kwargs = {"base_s": 300.0, "max_s": 4000.0}
    assert backoff_s(failures, rng=LOW, **kwargs) == pytest.approx(expected * (1 - JITTER))
    assert backoff_s(failures, rng=HIGH, **kwargs) == pytest.approx(expected * (1 + JITTER))


def test_the_jitter_stays_within_20_percent_and_spreads():
    rng = random.Random(20)
    waits = [backoff_s(3, base_s=10.0, max_s=1000.0, rng=rng) for _ in range(2000)]
    assert all(40 * 0.8 <= w <= 40 * 1.2 for w in waits)
    # Spread over the range, not stuck at one value: workers do not stampede.
    assert min(waits) < 40 * 0.85 and max(waits) > 40 * 1.15
    assert len(set(waits)) > 1900


def test_the_cap_holds_for_any_number_of_failures():
    for failures in (60, 1024, 1100, 10**6):
        assert backoff_s(failures, base_s=300.0, max_s=4000.0, rng=HIGH) == 4000.0 * 1.2


def test_the_module_random_is_the_default_source():
    w = backoff_s(1, base_s=1.0, max_s=10.0)
    assert 0.8 <= w <= 1.2


class _FlakyStore:
    """``record`` fails ``failures`` times, then takes everything."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[list[MessageOutcome]] = []
        self.recorded: list[MessageOutcome] = []

    def record(self, outcomes: list[MessageOutcome], *, owner: str) -> None:
        self.calls.append(list(outcomes))
        if self.failures:
            self.failures -= 1
            raise ConnectionError("the database is down")
        self.recorded.extend(outcomes)


def _outcome() -> MessageOutcome:
    return MessageOutcome(
        message_id=uuid.uuid4(),
        next_attempt_at=None,
        recipients=(),
        last_error=None,
        last_reply=None,
    )


def test_the_recorder_keeps_outcomes_until_sql_takes_them(caplog):
    store = _FlakyStore(failures=3)
    recorder = _Recorder(store, "owner")  # type: ignore[arg-type]
    recorder.retry_initial_s = recorder.retry_max_s = 0.001
    first, later = _outcome(), _outcome()

    async def scenario() -> None:
        one = asyncio.create_task(recorder.record(first))
        while not store.calls:  # the first write is failing: a second outcome comes
            await asyncio.sleep(0)
        await asyncio.gather(one, recorder.record(later))

    asyncio.run(scenario())
    assert store.recorded == [first, later]  # each once, none lost
    assert len(store.calls) == 4
    assert all(first in call for call in store.calls)
    assert store.calls[-1] == [first, later]
    assert caplog.text.count("keeping them, retry in") == 3
