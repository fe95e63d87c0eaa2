"""The billing schema's version: Alembic migrations in billing/migrations, applied by
`voicectl migrate` (deployments, once, before the webapp starts) or by `Ledger.open` itself
on local runs. A deployed process only checks that the database is at the code's revision.

A database made before migrations existed (by `create_all`) has today's tables and no
`alembic_version`: it is stamped with the first revision, whose schema it has, then
upgraded like any other.
"""

from __future__ import annotations

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

from common.errors import SchemaError

BASELINE = "0001"           # the schema create_all made before migrations
PG_LOCK_KEY = 0x766F6963   # one upgrade at a time on PostgreSQL (an advisory lock)


def _alembic(conn: Connection | None = None) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", "billing:migrations")
    cfg.attributes["connection"] = conn
    return cfg


def head() -> str:
    """The revision this code needs."""
    found = ScriptDirectory.from_config(_alembic()).get_current_head()
    if found is None:
        raise SchemaError("billing/migrations/versions holds no revision: restore it")
    return found


def current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> str:
    """Bring the database to the code's revision (adopting a create_all database); returns
    the revision it was at before ("" for an empty database). Safe to run twice or at once
    from two processes on PostgreSQL."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
        before = current(conn)
        if before is None and inspect(conn).has_table("usage_minutes"):
            command.stamp(_alembic(conn), BASELINE)
            before = BASELINE
        command.upgrade(_alembic(conn), "head")
    return before or ""


def check(engine: Engine) -> None:
    """Raise SchemaError unless the database is at the code's revision."""
    with engine.connect() as conn:
        at = current(conn)
    if at != head():
        where = engine.url.render_as_string(hide_password=True)
        raise SchemaError(f"the billing database {where} is at schema revision "
                          f"{at or 'none (empty)'}, this code needs {head()}: run "
                          "`voicectl migrate` with the same DATABASE_URL first")
