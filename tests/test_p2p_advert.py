"""The advert wire format, the DHT record validator, admission checks and ranking (no network)."""

from __future__ import annotations

import time

import pytest
from eth_account import Account

from dcml.client.network.records import AdvertRecordValidator
from dcml.client.sdk.discovery import Discovery, RegisteredNode, StaticRegistry
from dcml.client.wire.advert import (
    Advert,
    AdvertDomain,
    AdvertError,
    AdvertReason,
    NodeOffer,
    SignedAdvert,
    advert_dht_key,
    check_fresh,
    rank_offers,
    resolve_model_id,
    sign_advert,
    verify_signature,
)

DOMAIN = AdvertDomain()
ATT = "0x" + "ab" * 32
MODEL = resolve_model_id("demo")


def make_advert(account, *, seq: int = 1, ttl: int = 60, peer: str = "12D3KooWpeer", att: str = ATT,
                issued: float | None = None) -> Advert:
    now = int(time.time() if issued is None else issued)
    return Advert(node=account.address, peerId=peer, endpoint="http://127.0.0.1:1", models=[MODEL],
                  pricesIn=[1], pricesOut=[2], attestationHash=att, issuedAt=now, expiresAt=now + ttl, sequence=seq)


def test_sign_and_verify_roundtrip() -> None:
    acct = Account.create()
    signed = sign_advert(acct, make_advert(acct), DOMAIN)
    again = SignedAdvert.from_bytes(signed.to_bytes())
    assert verify_signature(again, DOMAIN).node == acct.address


def test_forged_and_tampered_adverts_fail() -> None:
    acct, other = Account.create(), Account.create()
    advert = make_advert(acct)
    sig = bytes(other.sign_message(advert.signable(DOMAIN)).signature).hex()
    forged = SignedAdvert(advert=advert, signature="0x" + sig)
    with pytest.raises(AdvertError) as e:
        verify_signature(forged, DOMAIN)
    assert e.value.reason is AdvertReason.BAD_SIGNATURE
    signed = sign_advert(acct, advert, DOMAIN)
    tampered = SignedAdvert(advert=advert.model_copy(update={"endpoint": "http://evil"}), signature=signed.signature)
    with pytest.raises(AdvertError):
        verify_signature(tampered, DOMAIN)
    with pytest.raises(AdvertError):  # another registry's domain
        verify_signature(signed, AdvertDomain(chain_id=1))
    with pytest.raises(AdvertError) as e:
        SignedAdvert.from_bytes(b"{not json")
    assert e.value.reason is AdvertReason.MALFORMED


def test_expiry() -> None:
    acct = Account.create()
    with pytest.raises(AdvertError) as e:
        check_fresh(make_advert(acct, issued=time.time() - 100, ttl=10))
    assert e.value.reason is AdvertReason.EXPIRED


def test_dht_validator_binds_key_to_peer_and_selects_newest() -> None:
    acct = Account.create()
    v = AdvertRecordValidator(DOMAIN)
    old = sign_advert(acct, make_advert(acct, seq=1), DOMAIN).to_bytes()
    new = sign_advert(acct, make_advert(acct, seq=2), DOMAIN).to_bytes()
    v.validate(advert_dht_key("12D3KooWpeer"), new)
    with pytest.raises(ValueError):
        v.validate(advert_dht_key("12D3KooWother"), new)  # a valid advert under someone else's key
    with pytest.raises(ValueError):
        v.validate(advert_dht_key("12D3KooWpeer"), new[:-3] + b"00}")
    assert v.select("k", [old, new, old]) == 1


def test_admission_reasons_in_order() -> None:
    good, unregistered, stale = Account.create(), Account.create(), Account.create()
    reg = StaticRegistry([RegisteredNode(good.address, ATT),
                          RegisteredNode(stale.address, "0x" + "cd" * 32)])
    d = Discovery([], reg, allow_simulated=True)
    assert d.admit(sign_advert(good, make_advert(good, seq=5), DOMAIN).to_bytes()) is not None
    assert d.admit(sign_advert(unregistered, make_advert(unregistered), DOMAIN).to_bytes()) is None
    assert d.admit(sign_advert(stale, make_advert(stale), DOMAIN).to_bytes()) is None
    assert d.admit(sign_advert(good, make_advert(good, seq=6, issued=time.time() - 100, ttl=10), DOMAIN)
                   .to_bytes()) is None
    assert d.admit(sign_advert(good, make_advert(good, seq=4), DOMAIN).to_bytes()) is None
    reasons = [i.reason for i in d.ignored]
    assert reasons == [AdvertReason.UNREGISTERED, AdvertReason.ATTESTATION_HASH_MISMATCH, AdvertReason.EXPIRED,
                       AdvertReason.REPLAYED]
    assert [a.node for a, _ in d.candidates(MODEL)] == [good.address]
    assert d.candidates(resolve_model_id("other")) == []


def test_ranking_price_then_latency() -> None:
    acct = Account.create()
    adv = make_advert(acct)

    def offer(name: str, pin: int, pout: int, lat: float) -> NodeOffer:
        return NodeOffer(name, "", MODEL, pin, pout, lat, adv)

    ranked = rank_offers([offer("a", 1, 3, 1.0), offer("b", 1, 2, 9.0), offer("c", 1, 2, 2.0), offer("d", 0, 2, 50)])
    assert [o.address for o in ranked] == ["d", "c", "b", "a"]
