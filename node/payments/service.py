"""The node's payment side wired together: chain reader, verifier, ledger and settlement worker,
plus the HTTP route clients post vouchers to (`POST /v1/payments/vouchers`).

`python -m node.payments.service` runs it as its own process (used by the crash tests); the node
daemon mounts the same router.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from eth_account import Account
from eth_account.signers.local import LocalAccount
from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from web3 import Web3

from client import safejson
from client.access import AUTH_HEADER, channel_resource, recover_auth
from client.deployment import Deployment
from client.voucher import Voucher, VoucherDomain
from node.payments.access import payer_may_read
from node.payments.chain import ChannelChain
from node.payments.ledger import ChannelBalance, Ledger
from node.payments.settlement import SettlementWorker
from node.payments.verifier import VoucherRejected, VoucherVerifier, parse_voucher

log = logging.getLogger("dcml.payments")
MAX_VOUCHER_BODY = 4096  # bytes; a voucher is ~300


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
        self.w3 = Web3(Web3.HTTPProvider(self.deployment.rpc_url, request_kwargs={"timeout": 30}))
        if self.w3.eth.chain_id != self.deployment.chain_id:
            raise RuntimeError(f"RPC {self.deployment.rpc_url} is chain {self.w3.eth.chain_id}, "
                               f"but the deployment file says {self.deployment.chain_id}")
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


def payment_error(status: int, reason: str, message: str) -> JSONResponse:
    """OpenAI's error shape, with the rejection reason as `code`."""
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": "payment_error", "param": None, "code": reason}})


AcceptVoucher = Callable[[Voucher], Awaitable[ChannelBalance]]


def payments_router(payments: Payments, accept: AcceptVoucher | None = None) -> APIRouter:
    """`POST /v1/payments/vouchers` and `GET /v1/payments/channels/{id}`. `accept` verifies and durably
    records a voucher (default: the verifier's own commit, off the event loop); the paid node passes its
    group-committing version, which also wakes streams waiting for funds."""
    router = APIRouter()

    async def verifier_accept(voucher: Voucher) -> ChannelBalance:
        return await run_in_threadpool(payments.verifier.accept, voucher)

    accept = accept or verifier_accept

    @router.post("/v1/payments/vouchers")
    async def post_voucher(request: Request) -> JSONResponse:
        try:  # bounded and depth-limited: a voucher is ~300 bytes of flat JSON
            body = safejson.loads(await request.body(), max_bytes=MAX_VOUCHER_BODY)
        except ValueError as exc:
            return payment_error(400, "malformed", f"body is not a voucher ({exc}): send {{channelId, "
                                 "cumulativeAmount, signature}")
        try:
            voucher = parse_voucher(body)
            balance = await accept(voucher)  # returns once the voucher is durable: only then do we answer
        except VoucherRejected as exc:
            return payment_error(400 if exc.reason.startswith("malformed") else 402, exc.reason, str(exc))
        return JSONResponse({"channelId": balance.channel_id, "accepted": str(balance.accepted),
                             "spent": str(balance.spent)})

    @router.get("/v1/payments/channels/{channel_id}")
    async def get_channel(channel_id: str, request: Request) -> JSONResponse:
        """The node's account of one channel: what it accepted, what was served, what is settled. For the
        channel's payer (or session key) only (`client.access`); anyone else gets the same 404 as no channel."""
        signer = recover_auth(request.headers.get(AUTH_HEADER), payments.payee.address, channel_resource(channel_id))
        if signer is None:
            return payment_error(401, "auth_required", f"channel state is for its payer only: sign the read with "
                                 f"the payer or session key ({AUTH_HEADER}, see client.access)")
        allowed = await run_in_threadpool(payer_may_read, payments.chain, channel_id, signer)
        balance = payments.ledger.get(channel_id) if allowed else None
        if balance is None:
            return payment_error(404, "unknown_channel", f"no voucher accepted for channel {channel_id} that this "
                                 "signer may read")
        return JSONResponse({"channelId": balance.channel_id, "accepted": str(balance.accepted),
                             "spent": str(balance.spent), "settled": str(balance.settled),
                             "finalized": balance.finalized})

    return router


def create_payments_app(payments: Payments) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        payments.start()
        yield
        await run_in_threadpool(payments.stop)  # settles what is unsettled before exiting

    app = FastAPI(title="dcml payments", lifespan=lifespan)
    app.include_router(payments_router(payments))
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the node's voucher intake and settlement worker.")
    parser.add_argument("--deployment", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--payee-key-env", default="DCML_PAYEE_KEY", help="environment variable holding the key")
    parser.add_argument("--threshold", type=int, default=10**18)
    parser.add_argument("--interval", type=float, default=2.0)
    args = parser.parse_args()
    import os

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    payee = Account.from_key(os.environ[args.payee_key_env])
    settings = PaymentSettings(Path(args.deployment), Path(args.data_dir), settle_threshold=args.threshold,
                               settle_interval=args.interval)
    uvicorn.run(create_payments_app(Payments(settings, payee)), host="127.0.0.1", port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
