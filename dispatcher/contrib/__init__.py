"""Enqueue inside the transaction of an ORM the caller already uses (optional extras)."""
