"""The client SDK: the `Client` facade, the paying transport, spend store, disputes, discovery, gateway and CLI."""
