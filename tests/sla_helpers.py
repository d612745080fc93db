"""A fresh anvil of its own (the SLA tests move its clock) and the channel they dispute: shared by the court and
watcher tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from web3 import Web3

from dcml.client.chain.channel import ETH, ZERO_ADDRESS, ChannelParams
from dcml.client.chain.devnet import Devnet
from dcml.client.wire.receipts import model_id_for

MODEL = model_id_for("tiny")


@contextmanager
def escrow_chain() -> Iterator[tuple[Web3, str]]:
    """A fresh anvil with the devnet's contracts; yields (w3, PaymentChannels address). The tests deploy their
    own NodeRegistry and SLACourt on it, with a stake and bond of their own."""
    with Devnet() as devnet:
        assert devnet.deployment is not None
        w3 = Web3(Web3.HTTPProvider(devnet.rpc_url, request_kwargs={"timeout": 30}))
        yield w3, devnet.deployment.payment_channels


def channel_params(payer: str, payee: str) -> ChannelParams:
    return ChannelParams(payer=payer, payee=payee, token=ETH, salt=b"\x5a" * 32, authorized_signer=payer,
                         model_id=bytes.fromhex(MODEL[2:]), publisher=ZERO_ADDRESS, publisher_bps=0)
