"""The billing schema is Alembic's: migrated databases equal the models, a database that
`create_all` made before migrations is adopted with its rows, and deployed processes refuse
a database `voicectl migrate` has not brought up. SQLite, and PostgreSQL when
TEST_DATABASE_URL is set."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import datetime

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, insert, inspect, text

from billing import schema
from billing.ledger import Ledger
from billing.tables import metadata, open_db, usage_minutes
from common.errors import SchemaError


def differences(engine: Engine) -> list[object]:
    """What Alembic's autogenerate would change to make the database equal the models."""
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), metadata))


def revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return schema.current(conn)


def test_migrated_schema_equals_the_models(db_url: str) -> None:
    ledger = Ledger.open(db_url)
    assert revision(ledger.engine) == schema.head()
    assert differences(ledger.engine) == []
    assert schema.upgrade(ledger.engine) == schema.head()   # a second run changes nothing
    ledger.engine.dispose()


def test_a_create_all_database_is_adopted_with_its_rows(db_url: str) -> None:
    engine = create_engine(db_url)
    with engine.begin() as conn:                     # what Ledger.open's create_all made
        command.upgrade(schema._alembic(conn), schema.BASELINE)   # before migrations:
        conn.execute(text("DROP TABLE alembic_version"))          # that schema, unversioned
    row = {"user_id": "old", "minute": datetime(2026, 11, 1, 12, 0), "model": "miku",
           "region": "us-west", "seconds": 42.0}
    with engine.begin() as conn:
        conn.execute(insert(usage_minutes).values(row))
    assert "alembic_version" not in inspect(engine).get_table_names()
    ledger = Ledger.open(db_url)
    assert revision(ledger.engine) == schema.head()
    assert differences(ledger.engine) == []
    assert [(r.user_id, r.seconds) for r in ledger.usage()] == [("old", 42.0)]
    engine.dispose()
    ledger.engine.dispose()


def test_deployed_processes_need_voicectl_migrate(db_url: str) -> None:
    with pytest.raises(SchemaError, match="voicectl migrate"):
        Ledger.open(db_url, migrate=False)
    env = {**os.environ, "DATABASE_URL": db_url}
    for _ in range(2):                               # running it again is harmless
        out = subprocess.run([sys.executable, "-m", "voicectl", "migrate"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert f"-> {schema.head()}" in out.stdout
    ledger = Ledger.open(db_url, migrate=False)
    assert revision(ledger.engine) == schema.head()
    ledger.engine.dispose()


@pytest.mark.skipif(not os.environ.get("TEST_DATABASE_URL"), reason="PostgreSQL only: "
                    "set TEST_DATABASE_URL")
def test_concurrent_upgrades_on_postgresql_take_turns(db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite: deployments migrate once, before the webapp starts")
    engines = [open_db(db_url) for _ in range(4)]
    barrier = threading.Barrier(len(engines))
    errors: list[BaseException] = []

    def upgrade(engine: Engine) -> None:
        barrier.wait()
        try:
            schema.upgrade(engine)
        except BaseException as e:  # noqa: BLE001  reported below
            errors.append(e)

    threads = [threading.Thread(target=upgrade, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert revision(engines[0]) == schema.head() and differences(engines[0]) == []
    for e in engines:
        e.dispose()
