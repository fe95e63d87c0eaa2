"""Alembic migrations of the billing schema (run by billing.schema)."""
