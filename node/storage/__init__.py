"""Durable storage shared by the node's ledgers and receipt store: one group-commit writer."""
