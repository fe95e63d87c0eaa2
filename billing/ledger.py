"""The ledger: settles usage counters from Redis into usage_minutes, and keeps node_costs.

Adapters only: the math is in billing.math. Every write is an upsert of an absolute value,
so running any of these twice changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from billing import schema
from billing.math import UsageCounter, aggregate, node_cost, utc
from billing.tables import node_costs, open_db, usage_minutes

SETTLE_DELAY_S = 5.0     # a minute is settled once it closed this long ago (late beats)
SETTLE_WINDOW_S = 900.0  # closed minutes are re-settled this long, to take late reports


@dataclass(frozen=True)
class UsageRow:
    user_id: str
    minute: datetime
    model: str
    region: str
    seconds: float


class Ledger:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, url: str, migrate: bool = True) -> Ledger:
        """`migrate`: bring the schema to the code's revision (local runs, tests); else
        only check it is there (deployed processes: `voicectl migrate` runs first) and
        raise SchemaError saying so."""
        engine = open_db(url)
        if migrate:
            schema.upgrade(engine)
        else:
            schema.check(engine)
        return cls(engine)

    def _upsert(self, table: Any, rows: Sequence[dict[str, Any]], keys: Sequence[str],
                update_cols: Sequence[str], conn: Any) -> None:
        if not rows:
            return
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        stmt = dialect.insert(table).values(list(rows))
        if update_cols:
            stmt = stmt.on_conflict_do_update(
                index_elements=list(keys),
                set_={c: getattr(stmt.excluded, c) for c in update_cols})
        else:
            stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
        conn.execute(stmt)

    # --- usage -------------------------------------------------------------------------
    def settle(self, minutes: Iterable[tuple[int, dict[str, float]]]) -> int:
        """Write the rows of these minutes (minute_s, counters); returns rows written."""
        counters = []
        for minute_s, fields in minutes:
            for field, seconds in fields.items():
                user, session, node, model, region = field.split("|")
                counters.append(UsageCounter(minute_s, user, session, node, model, region,
                                             seconds))
        rows = [{"user_id": u, "minute": utc(m), "model": model, "region": region,
                 "seconds": secs}
                for (u, m, model, region), secs in sorted(aggregate(counters).items())]
        with self.engine.begin() as conn:
            self._upsert(usage_minutes, rows, ["user_id", "minute", "model", "region"],
                         ["seconds"], conn)
        return len(rows)

    def settle_from(self, state: Any, now: float) -> int:
        """Settle every recently closed minute from the live counters (idempotent)."""
        closed = [m for m in state.usage_minutes(now - 60 - SETTLE_DELAY_S)
                  if m >= now - SETTLE_WINDOW_S]
        return self.settle((m, state.usage_counters(m)) for m in closed)

    def usage(self, user: str | None = None, since: datetime | None = None) -> list[UsageRow]:
        q = select(usage_minutes).order_by(usage_minutes.c.minute, usage_minutes.c.user_id)
        if user is not None:
            q = q.where(usage_minutes.c.user_id == user)
        if since is not None:
            q = q.where(usage_minutes.c.minute >= since)
        with self.engine.connect() as conn:
            return [UsageRow(r.user_id, r.minute, r.model, r.region, float(r.seconds))
                    for r in conn.execute(q)]

    # --- the GPU bill --------------------------------------------------------------------
    def open_nodes(self, nodes: Iterable[dict[str, Any]]) -> None:
        """A row per node from its request on (stopped_at NULL); existing rows are kept."""
        rows = [{"node_id": n["id"], "provider": n["provider"], "region": n["region"],
                 "model": n["model"], "started_at": utc(n["started_s"]), "stopped_at": None,
                 "price_per_hour": Decimal(n["price_per_hour"]), "cost": None} for n in nodes]
        with self.engine.begin() as conn:
            self._upsert(node_costs, rows, ["node_id"], [], conn)

    def close_node(self, node: dict[str, Any], stopped_s: float, increment_s: int) -> Decimal:
        """Stop a node's meter (once: a second close keeps the first stop time)."""
        self.open_nodes([node])
        cost = node_cost(node["started_s"], stopped_s, Decimal(node["price_per_hour"]),
                         increment_s)
        with self.engine.begin() as conn:
            conn.execute(update(node_costs)
                         .where(node_costs.c.node_id == node["id"],
                                node_costs.c.stopped_at.is_(None))
                         .values(stopped_at=utc(stopped_s), cost=cost))
        return cost

    def node_costs(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in
                    conn.execute(select(node_costs).order_by(node_costs.c.started_at))]

    def check(self) -> str:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return "ok"
        except SQLAlchemyError as e:
            return f"unreachable: {type(e).__name__}"


def day_totals(rows: Iterable[UsageRow]) -> list[dict[str, Any]]:
    """Seconds per user and UTC day, for `voicectl usage`."""
    totals: dict[tuple[str, str], float] = {}
    for r in rows:
        key = (r.user_id, r.minute.date().isoformat())
        totals[key] = totals.get(key, 0.0) + r.seconds
    return [{"user": u, "day": d, "seconds": round(s, 3), "minutes": round(s / 60, 2)}
            for (u, d), s in sorted(totals.items())]


def start_of_day(t: datetime) -> datetime:
    return t - timedelta(hours=t.hour, minutes=t.minute, seconds=t.second,
                         microseconds=t.microsecond)
