"""Accounting: per-minute usage and the GPU bill (SQLAlchemy)."""
