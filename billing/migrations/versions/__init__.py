"""One revision per file; the newest is the schema billing/tables.py describes."""
