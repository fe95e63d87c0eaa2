"""Settlement catches up however old an unsettled minute is, and never bills a minute from
part of its counters: real Redis, SQLite and (when TEST_DATABASE_URL is set) PostgreSQL.

A minute's counters are dirty from the report that grew them (the same script) until a
settle step billed them; a dirty hash never expires. Billing keeps every counter, so a
report that arrives after the live state forgot a settled minute adds to it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from billing.ledger import Ledger
from provisioner.state import USAGE_DIRTY, State, usage_key

HOUR = 3600


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    ledger = Ledger.open(db_url)
    yield ledger
    ledger.engine.dispose()


def billed(ledger: Ledger, user: str) -> list[float]:
    return [r.seconds for r in ledger.usage(user)]


def test_a_minute_never_settled_three_hours_ago_is_settled(state: State,
                                                          ledger: Ledger) -> None:
    now = time.time()
    old = int(now // 60) * 60 - 3 * HOUR
    state.report_usage([(old, "u1|s1:a|n1|miku|us-west", 42.0),
                        (old, "u2|s2:a|n1|miku|us-west", 7.5)])
    assert state.r.ttl(usage_key(old)) == -1        # dirty: kept until billed, however long
    assert ledger.settle_from(state, now) == 2
    assert billed(ledger, "u1") == [42.0] and billed(ledger, "u2") == [7.5]
    assert state.r.zcard(USAGE_DIRTY) == 0          # clean only once billed ...
    assert state.r.ttl(usage_key(old)) > 0          # ... and only then may it expire


def test_settling_again_settles_nothing_twice(state: State, ledger: Ledger) -> None:
    minute = int(time.time() // 60) * 60 - 2 * HOUR
    field = "u1|s1:a|n1|miku|us-west"
    state.report_usage([(minute, field, 30.0), (minute + 60, field, 60.0)])
    assert ledger.settle_from(state, time.time()) == 2
    first = ledger.usage("u1")
    assert ledger.settle_from(state, time.time()) == 0          # nothing dirty
    state.report_usage([(minute, field, 30.0), (minute, field, 12.0)])   # repeated, stale
    assert ledger.settle_from(state, time.time()) == 0
    assert ledger.usage("u1") == first and billed(ledger, "u1") == [30.0, 60.0]
    assert ledger.settle(((minute, {field: 30.0}),) * 2) == 1   # billing the same again
    assert ledger.usage("u1") == first                          # sets, never adds


def test_a_late_counter_after_the_minute_was_forgotten_adds_to_the_bill(
        state: State, ledger: Ledger) -> None:
    """A user resumed from node a to node b within one minute; b's ledger delivers its last
    seconds after the live state forgot the settled minute (its hash expired): the row is
    the sum of every counter on record, not of the one that came back."""
    minute = int(time.time() // 60) * 60 - 3 * HOUR
    state.report_usage([(minute, "u1|s1:a|n-a|miku|us-west", 30.0),
                        (minute, "u1|s1:b|n-b|miku|us-west", 20.0)])
    ledger.settle_from(state, time.time())
    assert billed(ledger, "u1") == [50.0]
    state.r.delete(usage_key(minute))                 # expired, as a settled minute does
    state.report_usage([(minute, "u1|s1:b|n-b|miku|us-west", 25.0)])   # delivered late
    assert ledger.settle_from(state, time.time()) == 1
    assert billed(ledger, "u1") == [55.0]


def test_a_report_while_settling_keeps_the_minute_dirty(state: State, ledger: Ledger) -> None:
    minute = int(time.time() // 60) * 60 - 60
    field = "u1|s1:a|n1|miku|us-west"
    state.report_usage([(minute, field, 10.0)])
    read = state.usage_counters(minute)               # the settle step reads ...
    state.report_usage([(minute, field, 14.0)])       # ... a beat grows the counter ...
    ledger.settle([(minute, read)])
    assert not state.mark_settled(minute, read)       # ... so it may not be marked clean
    assert state.r.ttl(usage_key(minute)) == -1
    ledger.settle_from(state, time.time())
    assert billed(ledger, "u1") == [14.0] and state.r.zcard(USAGE_DIRTY) == 0


def test_a_backlog_is_settled_oldest_first_and_open_minutes_too(state: State,
                                                               ledger: Ledger) -> None:
    now = int(time.time() // 60) * 60 + 30
    minutes = [now - 30 - 60 * k for k in range(200)]          # 200 minutes, newest open
    state.report_usage([(m, "u1|s1:a|n1|miku|us-west", 1.0) for m in minutes])
    assert ledger.settle_from(state, now) == 200
    assert len(billed(ledger, "u1")) == 200 and state.r.zcard(USAGE_DIRTY) == 0
    state.report_usage([(now - 30, "u1|s1:a|n1|miku|us-west", 20.0)])   # the open minute
    state.report_usage([(now + 30, "u1|s1:a|n1|miku|us-west", 1.0)])    # not begun yet
    assert ledger.settle_from(state, now) == 1
    assert sum(billed(ledger, "u1")) == 199 + 20.0
    assert [int(float(m)) for m in state.r.zrange(USAGE_DIRTY, 0, -1)] == [now + 30]
