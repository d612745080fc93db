"""Discovery on loopback: time until a fresh client holds verified adverts of all N nodes, and node memory.

Starts N real nodes (`node.p2p.demo_node`: HTTP daemon + overlay; K nodes per process for large N), lets
the overlay settle, then starts a `Discovery` client on one bootstrap peer and calls `discover("demo")`
until every node is verified (signature, registry, expiry, replay, live attestation, latency).

    .venv/bin/python bench/bench_discovery.py --nodes 10 --nodes 50
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from dcml.client.demo.kit.p2p import NodeProcess, rss_mib, spawn, wait_ready
from dcml.client.sdk.discovery import Discovery, StaticRegistry


def run(n: int, per_process: int, settle_s: float, base: Path) -> dict:
    t0 = time.monotonic()
    procs_n = -(-n // per_process)
    first = wait_ready(spawn(base / "p0", ["demo"], count=min(per_process, n), interval=30, ttl=120))
    boot = [first.nodes[0].addrs[0]]
    rest: list[NodeProcess] = []
    left = n - len(first.nodes)
    for i in range(1, procs_n):
        k = min(per_process, left)
        left -= k
        rest.append(spawn(base / f"p{i}", ["demo"], bootstrap=boot, count=k, interval=30, ttl=120))
    procs = [first]
    try:
        procs += [wait_ready(p, timeout=180) for p in rest]
        nodes = [x for p in procs for x in p.nodes]
        up_s = time.monotonic() - t0
        time.sleep(settle_s)
        rss = [rss_mib(p.proc.pid) for p in procs]
        registry = StaticRegistry([x.registered(peer_id="") for x in nodes])  # peers found via the overlay only
        t1 = time.monotonic()
        with Discovery(boot, registry, allow_simulated=True) as disc:
            joined_s = time.monotonic() - t1
            rounds, found = 0, 0
            while time.monotonic() - t1 < 60:
                rounds += 1
                found = len(disc.discover("demo"))
                if found == n:
                    break
                time.sleep(0.2)
            all_s = time.monotonic() - t1
            t2 = time.monotonic()
            again = len(disc.discover("demo"))
            warm_s = time.monotonic() - t2
        return {"nodes": n, "processes": len(procs), "nodes_per_process": per_process, "startup_s": up_s,
                "client_join_s": joined_s, "all_verified_s": all_s, "found": found, "rounds": rounds,
                "warm_discover_s": warm_s, "warm_found": again, "rss_mib_per_process": rss}
    finally:
        for p in procs:
            p.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, action="append", help="N (repeatable; default 10 and 50)")
    ap.add_argument("--per-process", type=int, default=0, help="nodes per process (default: 1 if N <= 10, else 10)")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds the overlay runs before the client starts")
    a = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    for n in a.nodes or [10, 50]:
        k = a.per_process or (1 if n <= 10 else 10)
        with tempfile.TemporaryDirectory(prefix="bench-discovery-") as tmp:
            r = run(n, k, a.settle, Path(tmp))
        rss = r["rss_mib_per_process"]
        print(f"N={n:3d} ({r['processes']} processes x {k} nodes): nodes up in {r['startup_s']:.1f} s; client joined "
              f"in {r['client_join_s']:.2f} s; verified adverts of {r['found']}/{n} nodes "
              f"{r['all_verified_s']:.2f} s after client start ({r['rounds']} discover rounds); warm discover "
              f"{r['warm_discover_s']:.2f} s ({r['warm_found']}/{n})")
        print(f"       RSS per process: median {statistics.median(rss):.0f} MiB, max {max(rss):.0f} MiB"
              + (f" ({statistics.median(rss) / k:.0f} MiB per node)" if k > 1 else " (one node + overlay)"))


if __name__ == "__main__":
    main()
