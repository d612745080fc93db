"""Proof-of-Response receipts: signing and the durable store."""
