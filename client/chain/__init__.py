"""Chain access: deployment, devnet, contract clients (channels, registries, SLA court) and transactions."""
