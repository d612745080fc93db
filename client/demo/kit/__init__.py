"""Local pieces for the demos, the tests and the benchmarks: paid nodes in this process or as real processes,
a bare-bones paying client, a cluster of p2p demo nodes, and fake GPUs. One copy, used by all three (tests and
benchmarks import it from here, never from each other)."""
