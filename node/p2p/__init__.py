"""The libp2p overlay (py-libp2p on trio, in its own thread): signed adverts over GossipSub and the DHT."""
