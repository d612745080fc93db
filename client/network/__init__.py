"""The libp2p overlay shared by nodes and clients (optional: needs the `p2p` extra)."""
