"""Accounting: per-minute usage and the GPU bill (SQLAlchemy: SQLite or PostgreSQL)."""

from billing.ledger import Ledger, UsageRow, day_totals
from billing.math import aggregate, node_cost

__all__ = ["Ledger", "UsageRow", "aggregate", "day_totals", "node_cost"]
