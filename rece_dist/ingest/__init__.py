"""`rece ingest`: real trace formats into a store (see docs/collecting.md)."""
