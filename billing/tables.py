"""The billing tables (SQLAlchemy Core) and the engine: SQLite by default, PostgreSQL by URL.

Minutes are stored as UTC datetimes without a zone (SQLite keeps none), money as exact
Numeric. The schema is made and versioned by Alembic (billing/schema.py, billing/migrations):
a change here needs a new revision in billing/migrations/versions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Float,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    String,
    Table,
    create_engine,
    event,
)
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

metadata = MetaData()

usage_minutes = Table(
    "usage_minutes", metadata,
    Column("user_id", String(64), nullable=False),
    Column("minute", DateTime(timezone=False), nullable=False),   # UTC, start of the minute
    Column("model", String(64), nullable=False),
    Column("region", String(64), nullable=False),
    Column("seconds", Float, nullable=False),
    PrimaryKeyConstraint("user_id", "minute", "model", "region"),
)

node_costs = Table(
    "node_costs", metadata,
    Column("node_id", String(64), primary_key=True),
    Column("provider", String(64), nullable=False),
    Column("region", String(64), nullable=False),
    Column("model", String(64), nullable=False),
    Column("started_at", DateTime(timezone=False), nullable=False),   # UTC, when requested
    Column("stopped_at", DateTime(timezone=False), nullable=True),    # NULL while running
    Column("price_per_hour", Numeric(12, 6), nullable=False),
    Column("cost", Numeric(14, 6), nullable=True),                    # exact dollars
    # UTC, the node's last heartbeat as the settle step saw it (refreshed every
    # LAST_SEEN_STEP_S): where a bill stops when the node vanished with the live state
    Column("last_seen_at", DateTime(timezone=False), nullable=True),
)

# What usage_minutes sums: cumulative seconds per session connection, node and minute, as
# nodes reported them; a minute is never billed from part of them (see Ledger.settle).
usage_counters = Table(
    "usage_counters", metadata,
    Column("user_id", String(64), nullable=False),
    Column("minute", DateTime(timezone=False), nullable=False),   # UTC, start of the minute
    Column("model", String(64), nullable=False),
    Column("region", String(64), nullable=False),
    Column("node_id", String(64), nullable=False),
    Column("session", String(96), nullable=False),                # "session:connection"
    Column("seconds", Float, nullable=False),
    # minute first: settling reads every counter of the minutes it touches
    PrimaryKeyConstraint("minute", "user_id", "model", "region", "node_id", "session"),
)


CONNECT_TIMEOUT_S = 5       # a database that does not answer is down, not slow
STATEMENT_TIMEOUT_MS = 15000   # no statement of ours takes longer; a hung one is cut


def open_db(url: str, pooled: bool = True) -> Engine:
    """An engine for `url` (the schema is billing.schema's); SQLite gets WAL and a busy
    timeout; PostgreSQL a connect and a statement timeout, so a hung database fails the
    call that met it (and the tick retries) instead of holding a worker thread forever.
    Not `pooled`: a new connection per call, for requests that must fail fast: a pooled
    one waits as long as a hung server stays silent (no client-side read timeout exists)."""
    parsed = make_url(url)
    kwargs: dict[str, Any] = ({"pool_timeout": CONNECT_TIMEOUT_S} if pooled
                              else {"poolclass": NullPool})
    sqlite = parsed.get_backend_name() == "sqlite"
    if parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S,
                                  "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"}
    if sqlite:
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    engine = create_engine(url, pool_pre_ping=pooled, **kwargs)
    if sqlite:
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
    return engine
