"""Billing math: pure functions, no I/O, no clock.

Usage arrives as cumulative counters (seconds streamed by one session on one node in one
UTC minute); the settled value of a (user, minute, model, region) row is the sum of the
latest counters, so settling twice, or again after a late report, never counts twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal

MICRO = Decimal("0.000001")


@dataclass(frozen=True)
class UsageCounter:
    """Seconds one session streamed on one node within one UTC minute (cumulative)."""

    minute_s: int      # unix seconds at the start of the minute
    user: str
    session: str
    node: str
    model: str
    region: str
    seconds: float


RowKey = tuple[str, int, str, str]   # user, minute_s, model, region


def aggregate(counters: Iterable[UsageCounter]) -> dict[RowKey, float]:
    """Rows of usage_minutes: seconds per user, minute, model and region (capped at 60)."""
    rows: dict[RowKey, float] = {}
    for c in counters:
        key = (c.user, c.minute_s, c.model, c.region)
        rows[key] = rows.get(key, 0.0) + c.seconds
    return {k: round(min(60.0, v), 3) for k, v in rows.items()}


LAST_MINUTE_S = 253402300740   # 9999-12-31 23:59 UTC: the last minute a datetime holds


def parse_counter(minute_s: int, field: str, seconds: float) -> UsageCounter | None:
    """A live-state counter ("user|session|node|model|region"); None if malformed: a bad
    field, a minute that is not a UTC minute a datetime can hold, or seconds outside
    0-60 (the settler skips it and bills the rest)."""
    parts = field.split("|")
    if len(parts) != 5 or not all(parts):
        return None
    if not 0 <= minute_s <= LAST_MINUTE_S or minute_s % 60 or not 0.0 <= seconds <= 60.0:
        return None
    user, session, node, model, region = parts
    return UsageCounter(minute_s, user, session, node, model, region, seconds)


def vanished(open_bills: Iterable[tuple[str, float | None]], fleet: Set[str],
             now: float) -> dict[str, float]:
    """When the meter stops for each open bill (node id, last heartbeat on record) whose
    node the fleet no longer knows: at that heartbeat, else now (none on record)."""
    return {node_id: (seen if seen is not None else now)
            for node_id, seen in open_bills if node_id not in fleet}


def utc(t: float) -> datetime:
    """Naive UTC datetime (what both SQLite and PostgreSQL store here)."""
    return datetime.fromtimestamp(t, UTC).replace(tzinfo=None)


def epoch(t: datetime) -> float:
    """Unix seconds of a naive UTC datetime (as utc() made it)."""
    return t.replace(tzinfo=UTC).timestamp()


def node_cost(started_s: float, stopped_s: float, price_per_hour: Decimal,
              increment_s: int = 1) -> Decimal:
    """Exact cost of a node: its lifetime rounded up to whole billing increments."""
    lifetime = Decimal(str(max(0.0, stopped_s - started_s)))
    inc = Decimal(max(1, increment_s))
    billed = (lifetime / inc).to_integral_value(rounding=ROUND_CEILING) * inc
    return (billed * price_per_hour / Decimal(3600)).quantize(MICRO, rounding=ROUND_HALF_UP)
