"""A real node for tests and benchmarks: the HTTP daemon (synthetic engine, simulated TEE) plus the overlay.

    python -m dcml.client.demo.p2p_node --data-dir /tmp/n0 --model demo --listen /ip4/127.0.0.1/tcp/0 \
        [--bootstrap MADDR]

Prints one JSON line per node ({"address", "peer_id", "addrs", "endpoint", "attestation_hash", ...}),
then "READY"; runs until stdin closes or SIGTERM. `--count K` runs K nodes in one process (benchmarks).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dcml.client.attestation.verify import AttestationDocument
from dcml.client.chain.registration import attestation_hash
from dcml.client.network.overlay import OverlayConfig
from dcml.client.wire.advert import AdvertDomain, resolve_model_id
from dcml.node import __version__
from dcml.node.api.app import create_app
from dcml.node.api.server import BackgroundServer
from dcml.node.config import NodeSettings
from dcml.node.identity import EnclaveIdentity
from dcml.node.network.service import AdvertTerms, ModelOffer, P2PService
from dcml.node.tee.document import build_attestation_document
from dcml.node.tee.simulated import SimulatedProvider


def registration_attestation_hash(doc: AttestationDocument) -> str:
    """The hash the NodeRegistry stores for this attestation, as adverts carry it."""
    return "0x" + attestation_hash(doc).hex()


def start_node(data_dir: Path, models: list[str], price_in: int, price_out: int, overlay: OverlayConfig,
               *, interval_s: float, ttl_s: int, bad_attestation: bool) -> tuple[BackgroundServer, P2PService]:
    settings = NodeSettings(data_dir=data_dir, engine={"kind": "synthetic", "served_model_name": models[0]},
                            tee={"provider": "simulated"})
    # --bad-attestation: quotes signed by an unknown key, so the client's verification fails.
    provider = SimulatedProvider(Ed25519PrivateKey.generate() if bad_attestation else None)
    identity = EnclaveIdentity.generate()
    server = BackgroundServer(create_app(settings, provider=provider, identity=identity)).start()
    doc = build_attestation_document(identity, provider, bytes(32), node_version=__version__)
    terms = AdvertTerms(endpoint=server.url, attestation_hash=registration_attestation_hash(doc),
                        models=tuple(ModelOffer(resolve_model_id(m), price_in, price_out) for m in models))
    service = P2PService(identity, terms, overlay, AdvertDomain(), interval_s=interval_s, ttl_s=ttl_s)
    service.start()
    return server, service


def describe(server: BackgroundServer, service: P2PService) -> str:
    return json.dumps({"address": service.identity.address, "peer_id": service.overlay.peer_id,
                       "addrs": service.addrs(), "endpoint": server.url,
                       "attestation_hash": service.terms.attestation_hash,
                       "models": [m.model_id for m in service.terms.models]})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--price-in", type=int, default=1)
    p.add_argument("--price-out", type=int, default=2)
    p.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    p.add_argument("--bootstrap", action="append", default=[])
    p.add_argument("--interval", type=float, default=30.0)
    p.add_argument("--ttl", type=int, default=120)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--bad-attestation", action="store_true")
    p.add_argument("--log-level", default="WARNING")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    def start(i: int, bootstrap: list[str]) -> tuple[BackgroundServer, P2PService]:
        return start_node(a.data_dir / str(i), a.model, a.price_in, a.price_out,
                          OverlayConfig(listen=a.listen, bootstrap=tuple(bootstrap)),
                          interval_s=a.interval, ttl_s=a.ttl, bad_attestation=a.bad_attestation)

    nodes = [start(0, a.bootstrap)]
    # Later nodes of this process start together and join through the given peers or the first node.
    with ThreadPoolExecutor(max(1, a.count - 1)) as pool:
        boot = a.bootstrap or [nodes[0][1].addrs()[0]]
        nodes += list(pool.map(lambda i: start(i, boot), range(1, a.count)))
    for server, service in nodes:
        print(describe(server, service), flush=True)
    print("READY", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())

    def until_stdin_closes() -> None:  # the parent closing our stdin means: stop
        sys.stdin.read()
        done.set()

    threading.Thread(target=until_stdin_closes, daemon=True).start()
    done.wait()
    for server, service in nodes:
        service.stop()
        server.stop(timeout=5)


if __name__ == "__main__":
    main()
