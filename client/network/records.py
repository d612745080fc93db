"""DHT record validation for the `/dcml-advert/<peer id>` namespace: only adverts signed by the node they name.

A record is accepted (on put, on inbound PUT_VALUE and on get) only if its EIP-712 signature recovers
to `advert.node` and `advert.peerId` is the peer id in the key; among several, the highest sequence wins.
"""

from __future__ import annotations

import logging

from libp2p.records.validator import Validator

from dcml.client.wire.advert import DHT_ADVERT_NS, AdvertDomain, AdvertError, SignedAdvert, verify_signature

log = logging.getLogger("dcml.p2p")


class AdvertRecordValidator(Validator):
    def __init__(self, domain: AdvertDomain) -> None:
        self.domain = domain

    def validate(self, key: str, value: bytes) -> None:
        prefix = f"/{DHT_ADVERT_NS}/"
        if not key.startswith(prefix):
            raise ValueError(f"key {key!r} is not in the {DHT_ADVERT_NS} namespace")
        try:
            advert = verify_signature(SignedAdvert.from_bytes(value), self.domain)
        except AdvertError as exc:
            raise ValueError(f"invalid advert record: {exc}") from exc
        if advert.peer_id != key[len(prefix):]:
            raise ValueError(f"advert names peer {advert.peer_id}, the key names {key[len(prefix):]}")

    def select(self, key: str, values: list[bytes]) -> int:
        best, best_seq = 0, -1
        for i, value in enumerate(values):
            try:
                seq = SignedAdvert.from_bytes(value).advert.sequence
            except AdvertError:
                continue
            if seq > best_seq:
                best, best_seq = i, seq
        return best
