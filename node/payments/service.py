"""The node's payment side wired together: chain reader, verifier, ledger and settlement worker.

Its HTTP routes (vouchers, channel state) live in `node.api.payments`, which also runs it as its own process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from eth_account.signers.local import LocalAccount

from dcml.client.chain.connect import connect
from dcml.client.chain.deployment import Deployment
from dcml.client.wire.voucher import VoucherDomain
from dcml.node.payments.chain import ChannelChain
from dcml.node.payments.ledger import Ledger
from dcml.node.payments.settlement import SettlementWorker
from dcml.node.payments.verifier import VoucherVerifier

log = logging.getLogger("dcml.payments")


@dataclass(frozen=True)
class PaymentSettings:
    deployment: Path
    data_dir: Path
    settle_threshold: int = 10**18
    settle_interval: float = 2.0
    cache_ttl: float = 30.0  # a read syncs the channel index when older (the poller keeps it far younger)
    index_poll_s: float = 1.0  # how often the channel index follows the escrow's logs
    rpc_url: str | None = None  # overrides the deployment file's
    close_margin: int = 60
    min_settle_value: int = 0  # no settle or close for less (its gas would exceed it)
    confirmations: int = 1  # of a channel's opening before its vouchers count


class Payments:
    def __init__(self, settings: PaymentSettings, payee: LocalAccount) -> None:
        self.deployment = Deployment.load(settings.deployment)
        if settings.rpc_url:
            self.deployment = self.deployment.model_copy(update={"rpc_url": settings.rpc_url})
        self.w3 = connect(self.deployment.rpc_url, chain_id=self.deployment.chain_id)
        self.payee = payee
        self.chain = ChannelChain(self.w3, self.deployment, ttl=settings.cache_ttl,
                                  confirmations=settings.confirmations, payee=payee.address,
                                  store=settings.data_dir / "channel_index.sqlite")
        self.index_poll_s = settings.index_poll_s
        # Catch up on the events missed while down (from the persisted cursor) before anything is admitted.
        self.chain.sync()
        self.ledger = Ledger(settings.data_dir / "ledger.sqlite")
        self.domain = VoucherDomain(self.deployment.chain_id, self.deployment.payment_channels)
        self.verifier = VoucherVerifier(self.domain, self.chain, self.ledger, payee.address,
                                        close_margin=settings.close_margin)
        self.worker = SettlementWorker(self.chain, self.ledger, payee, threshold=settings.settle_threshold,
                                       interval=settings.settle_interval, min_value=settings.min_settle_value)

    def start(self) -> None:
        self.chain.start(self.index_poll_s)
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop(flush=True)
        self.chain.stop()
        self.ledger.close()
