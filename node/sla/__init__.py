"""SLA terms published on-chain and the watcher that answers disputes."""
