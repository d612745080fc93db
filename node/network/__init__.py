"""The node's presence on the network: registry registration and libp2p adverts."""
