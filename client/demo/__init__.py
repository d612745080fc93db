"""The demo stories: the composition root that starts a devnet, a publisher, nodes and a client together."""
