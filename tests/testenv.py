"""The environment of one test process, set before anything reads it (conftest imports
this first): under pytest-xdist each worker gets its own numba cache and, with
TEST_DATABASE_URL, its own PostgreSQL database."""

from __future__ import annotations

import os

# Two test processes (pytest-xdist) compiling librosa's numba functions into one shared
# cache at once can corrupt it (seen: a segfault in yin on a fresh venv): a cache each.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(
        os.environ.get("TMPDIR", "/tmp"), f"voice-numba-{os.environ['PYTEST_XDIST_WORKER']}"))


def _private_database() -> None:
    """TEST_DATABASE_URL names a PostgreSQL database; this test process takes a fresh one
    of its own beside it (dropped at exit): tests reset their tables, and the other xdist
    worker, or another run on this machine, must not see that."""
    import atexit

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    base = make_url(os.environ["TEST_DATABASE_URL"])
    name = f"{base.database}_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}_{os.getpid()}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    os.environ["TEST_DATABASE_URL"] = base.set(database=name).render_as_string(
        hide_password=False)

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    atexit.register(drop)


if os.environ.get("TEST_DATABASE_URL"):
    _private_database()
