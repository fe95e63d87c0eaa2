"""Alembic's entry into the billing schema: always run by billing.schema on a connection
it opens (there is no alembic.ini; `voicectl migrate` is the command)."""

from alembic import context

from billing.tables import metadata

context.configure(connection=context.config.attributes["connection"],
                  target_metadata=metadata,
                  render_as_batch=True)   # SQLite alters tables by copying them
with context.begin_transaction():
    context.run_migrations()
