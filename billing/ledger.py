"""The ledger: settles usage counters from Redis into usage_minutes, and keeps node_costs.

Adapters only: the math is in billing.math. Every write is an upsert of an absolute value,
so running any of these twice changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, bindparam, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from billing import schema
from billing.math import UsageCounter, aggregate, epoch, node_cost, parse_counter, utc, vanished
from billing.tables import node_costs, open_db, usage_counters, usage_minutes

log = logging.getLogger("billing")

SETTLE_BATCH_MINUTES = 60    # dirty minutes per transaction
SETTLE_MAX_MINUTES = 1440    # per settle call, oldest first: a backlog drains a day per tick
ROWS_PER_STATEMENT = 500     # SQLite caps a statement's parameters
LAST_SEEN_STEP_S = 30.0      # node_costs.last_seen_at moves on when this much behind
SETTLE_LOCK_KEY = 0x766F6365   # PostgreSQL: one settle transaction at a time (advisory lock)


@dataclass(frozen=True)
class UsageRow:
    user_id: str
    minute: datetime
    model: str
    region: str
    seconds: float


class Ledger:
    """The billing tables. `reader` answers the webapp's requests (a user's usage, the
    health check) on a fresh connection each, so a hung database fails them within the
    connect timeout; billing's own work uses the pooled `engine`."""

    def __init__(self, engine: Engine, reader: Engine | None = None) -> None:
        self.engine, self.reader = engine, reader or engine
        self._postgres = engine.dialect.name == "postgresql"

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
        return cls(engine, open_db(url, pooled=False))

    def _upsert(self, table: Any, rows: Sequence[dict[str, Any]], keys: Sequence[str],
                update_cols: Sequence[str], conn: Any,
                merge: Callable[[Any, Any], Any] | None = None) -> None:
        """Insert `rows`; on a key already there, set `update_cols` to the new value (or to
        `merge(old column, new value)`), or keep the old row if there are none."""
        insert = postgresql.insert if self._postgres else sqlite.insert
        for at in range(0, len(rows), ROWS_PER_STATEMENT):
            stmt = insert(table).values(list(rows[at:at + ROWS_PER_STATEMENT]))
            if update_cols:
                new = {c: getattr(stmt.excluded, c) for c in update_cols}
                stmt = stmt.on_conflict_do_update(
                    index_elements=list(keys),
                    set_={c: merge(table.c[c], v) if merge else v for c, v in new.items()})
            else:
                stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
            conn.execute(stmt)

    # --- usage -------------------------------------------------------------------------
    def settle(self, minutes: Iterable[tuple[int, Mapping[str, float]]],
               rejected: list[str] | None = None) -> int:
        """Bill these minutes' counters (minute_s, live-state counters); returns the
        usage_minutes rows written. A counter is merged by its maximum (counters only
        grow), and each row it touches is set to the sum of all its counters on record, so
        a minute whose live counters were partly forgotten still bills in full. A malformed
        counter is skipped, logged and described in `rejected`; the rest bill."""
        counters: dict[tuple[str, datetime, str, str, str, str], UsageCounter] = {}
        for minute_s, fields in minutes:
            for field, seconds in fields.items():
                c = parse_counter(minute_s, field, seconds)
                if c is None:
                    what = (f"usage counter {field[:200]!r} = {seconds!r} s of minute "
                            f"{minute_s}: not user|session|node|model|region with 0-60 s "
                            "in a UTC minute; not billed")
                    log.warning("%s", what)
                    if rejected is not None:
                        rejected.append(what)
                    continue
                counters[(c.user, utc(c.minute_s), c.model, c.region, c.node, c.session)] = c
        if not counters:
            return 0
        rows = [{"user_id": k[0], "minute": k[1], "model": k[2], "region": k[3],
                 "node_id": k[4], "session": k[5], "seconds": c.seconds}
                for k, c in sorted(counters.items())]
        touched = {(c.user, c.minute_s, c.model, c.region) for c in counters.values()}
        with self.engine.begin() as conn:
            if self._postgres:   # SQLite serialises writers itself
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                             {"key": SETTLE_LOCK_KEY})
            self._upsert(usage_counters, rows, ["user_id", "minute", "model", "region",
                                                "node_id", "session"], ["seconds"], conn,
                         merge=func.greatest if self._postgres else func.max)
            on_record = conn.execute(select(usage_counters).where(usage_counters.c.minute.in_(
                sorted({r["minute"] for r in rows}))))
            totals = aggregate(UsageCounter(int(epoch(r.minute)), r.user_id, r.session,
                                            r.node_id, r.model, r.region, float(r.seconds))
                               for r in on_record)
            out = [{"user_id": u, "minute": utc(m), "model": model, "region": region,
                    "seconds": secs}
                   for (u, m, model, region), secs in sorted(totals.items())
                   if (u, m, model, region) in touched]
            self._upsert(usage_minutes, out, ["user_id", "minute", "model", "region"],
                         ["seconds"], conn)
        return len(out)

    def settle_from(self, state: Any, now: float) -> int:
        """Settle every dirty minute that started before `now`, however old (oldest first,
        SETTLE_MAX_MINUTES per call). A minute is marked clean only after its transaction
        committed, and only if no report changed it meanwhile. Returns rows written."""
        dirty = state.dirty_minutes(now, SETTLE_MAX_MINUTES)
        written = 0
        rejected: list[str] = []
        for at in range(0, len(dirty), SETTLE_BATCH_MINUTES):
            got = [(m, state.usage_counters(m)) for m in dirty[at:at + SETTLE_BATCH_MINUTES]]
            try:
                written += self.settle(got, rejected)
            except (DataError, IntegrityError):   # a row the database refuses: find it
                for one in got:                  # (an outage raises on: the tick retries)
                    try:
                        written += self.settle([one], rejected)
                    except (DataError, IntegrityError) as e:
                        rejected.append(f"minute {one[0]}: the database refused it: {e}")
                        log.error("%s", rejected[-1])
            for minute_s, counters in got:
                state.mark_settled(minute_s, counters)
        if rejected:
            state.record_rejected(rejected)
        return written

    def usage(self, user: str | None = None, since: datetime | None = None) -> list[UsageRow]:
        q = select(usage_minutes).order_by(usage_minutes.c.minute, usage_minutes.c.user_id)
        if user is not None:
            q = q.where(usage_minutes.c.user_id == user)
        if since is not None:
            q = q.where(usage_minutes.c.minute >= since)
        with self.reader.connect() as conn:
            return [UsageRow(r.user_id, r.minute, r.model, r.region, float(r.seconds))
                    for r in conn.execute(q)]

    # --- the GPU bill --------------------------------------------------------------------
    def open_nodes(self, nodes: Iterable[Mapping[str, Any]]) -> None:
        """A row per node from its request on (stopped_at NULL); existing rows are kept, and
        their last_seen_at moves on once the node's last heartbeat is LAST_SEEN_STEP_S newer
        (a write per node every half minute, not per tick)."""
        nodes = list(nodes)
        rows = [{"node_id": n["id"], "provider": n["provider"], "region": n["region"],
                 "model": n["model"], "started_at": utc(n["started_s"]), "stopped_at": None,
                 "price_per_hour": Decimal(n["price_per_hour"]), "cost": None,
                 "last_seen_at": utc(n["last_seen_s"]) if n.get("last_seen_s") else None}
                for n in nodes]
        seen = {str(n["id"]): float(n["last_seen_s"]) for n in nodes if n.get("last_seen_s")}
        with self.engine.begin() as conn:
            self._upsert(node_costs, rows, ["node_id"], [], conn)
            if not seen:
                return
            stale = [{"b_id": node_id, "b_seen": utc(seen[node_id])}
                     for node_id, at in self._open_bills(conn)
                     if node_id in seen and (at is None or at < seen[node_id] - LAST_SEEN_STEP_S)]
            if stale:
                conn.execute(update(node_costs)
                             .where(node_costs.c.node_id == bindparam("b_id"),
                                    node_costs.c.stopped_at.is_(None))
                             .values(last_seen_at=bindparam("b_seen")), stale)

    def close_node(self, node: Mapping[str, Any], stopped_s: float, increment_s: int
                   ) -> Decimal:
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

    def open_bills(self) -> list[tuple[str, float | None]]:
        """(node id, last heartbeat on record) of every node whose meter still runs."""
        with self.engine.connect() as conn:
            return self._open_bills(conn)

    @staticmethod
    def _open_bills(conn: Any) -> list[tuple[str, float | None]]:
        q = select(node_costs.c.node_id, node_costs.c.last_seen_at).where(
            node_costs.c.stopped_at.is_(None))
        return [(r.node_id, epoch(r.last_seen_at) if r.last_seen_at else None)
                for r in conn.execute(q)]

    def close_vanished(self, open_bills: Iterable[tuple[str, float | None]], fleet: Set[str],
                       now: float, increment_of: Callable[[str], int]) -> dict[str, float]:
        """Stop the meters of `open_bills` (read before `fleet`) whose node the fleet no
        longer knows: the live state was lost (a Redis flush, a restart without its data),
        so nobody will stop them. Each stops at the node's last heartbeat on record, else
        now (see billing.math.vanished and docs/faults.md). Returns node id -> stop time."""
        stops = vanished(open_bills, fleet, now)
        if not stops:
            return {}
        with self.engine.begin() as conn:
            rows = list(conn.execute(select(node_costs).where(
                node_costs.c.node_id.in_(sorted(stops)), node_costs.c.stopped_at.is_(None))))
            for r in rows:
                started = epoch(r.started_at)
                stop = max(started, stops[r.node_id])
                conn.execute(update(node_costs)
                             .where(node_costs.c.node_id == r.node_id,
                                    node_costs.c.stopped_at.is_(None))
                             .values(stopped_at=utc(stop),
                                     cost=node_cost(started, stop, Decimal(r.price_per_hour),
                                                    increment_of(r.provider))))
                log.warning("node %s vanished from the live state with its meter running: "
                            "its bill stops at %s", r.node_id, utc(stop).isoformat())
        return {r.node_id: max(epoch(r.started_at), stops[r.node_id]) for r in rows}

    def node_costs(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in
                    conn.execute(select(node_costs).order_by(node_costs.c.started_at))]

    def check(self) -> str:
        """"ok" if the database takes a write (into a temporary table, rolled back): a
        read-only or full database answers SELECT 1 but cannot bill."""
        try:
            with self.reader.connect() as conn, conn.begin() as tx:
                conn.execute(text("CREATE TEMPORARY TABLE IF NOT EXISTS health_check (x int)"))
                conn.execute(text("INSERT INTO health_check VALUES (1)"))
                tx.rollback()
            return "ok"
        except SQLAlchemyError as e:
            return f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


def day_totals(rows: Iterable[UsageRow]) -> list[dict[str, Any]]:
    """Seconds per user and UTC day, for `voicectl usage`."""
    totals: dict[tuple[str, str], float] = {}
    for r in rows:
        key = (r.user_id, r.minute.date().isoformat())
        totals[key] = totals.get(key, 0.0) + r.seconds
    return [{"user": u, "day": d, "seconds": round(s, 3), "minutes": round(s / 60, 2)}
            for (u, d), s in sorted(totals.items())]
