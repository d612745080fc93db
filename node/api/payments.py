"""The payment routes: clients post vouchers (`POST /v1/payments/vouchers`) and read their channel's account
(`GET /v1/payments/channels/{id}`); and the HTTP form of the payment side's refusals (`PaymentNeeded`).

`python -m dcml.node.api.payments` runs the payment side as its own process (vouchers and settlement, no
inference: the crash tests kill it); the node daemon mounts the same router with its gate's intake.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from eth_account import Account
from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from dcml.client.wire import safejson
from dcml.client.wire.access import AUTH_HEADER, channel_resource, recover_auth
from dcml.client.wire.errors import ErrorType, PaymentReason, error_object
from dcml.client.wire.voucher import Voucher
from dcml.node.api.errors import APIError
from dcml.node.payments.access import payer_may_read
from dcml.node.payments.errors import PaymentNeeded
from dcml.node.payments.ledger import ChannelBalance
from dcml.node.payments.service import Payments, PaymentSettings
from dcml.node.payments.verifier import VoucherRejected, parse_voucher

MAX_VOUCHER_BODY = 4096  # bytes; a voucher is ~300
VOUCHERS_PATH = "/v1/payments/vouchers"
AcceptVoucher = Callable[[Voucher], Awaitable[ChannelBalance]]


class PaymentAPIError(APIError):
    """A `PaymentNeeded` as the API answers it: its status, reason as `code` and x402 headers."""

    error_type = ErrorType.PAYMENT

    def __init__(self, exc: PaymentNeeded) -> None:
        super().__init__(exc.message, code=exc.reason, headers=exc.headers)
        self.status = exc.status


def payment_error(status: int, reason: str, message: str) -> JSONResponse:
    """The wire's error shape (`client.wire.errors`), with the rejection reason as `code`."""
    return JSONResponse(status_code=status, content=error_object(message, ErrorType.PAYMENT, reason))


async def voucher_answer(raw: bytes, take: AcceptVoucher) -> tuple[int, dict]:
    """`POST /v1/payments/vouchers`: the status and JSON answer for a posted body. `take` returns once the voucher
    is durable: only then is it acknowledged."""
    try:  # bounded and depth-limited: a voucher is ~300 bytes of flat JSON
        body = safejson.loads(raw, max_bytes=MAX_VOUCHER_BODY)
    except ValueError as exc:
        return 400, error_object(f"body is not a voucher ({exc}): send {{channelId, cumulativeAmount, signature}}",
                                 ErrorType.PAYMENT, PaymentReason.MALFORMED)
    try:
        balance = await take(parse_voucher(body))
    except VoucherRejected as exc:
        return 400 if exc.reason.startswith("malformed") else 402, error_object(str(exc), ErrorType.PAYMENT,
                                                                                exc.reason)
    return 200, {"channelId": balance.channel_id, "accepted": str(balance.accepted), "spent": str(balance.spent)}


def payments_router(payments: Payments, accept: AcceptVoucher | None = None) -> APIRouter:
    """`POST /v1/payments/vouchers` and `GET /v1/payments/channels/{id}`. `accept` verifies and durably
    records a voucher (default: the verifier's own commit, off the event loop); the paid node passes its
    gate's (`PaymentGate.accept`: group commit, and wakes the streams waiting for funds)."""
    router = APIRouter()

    async def verifier_accept(voucher: Voucher) -> ChannelBalance:
        return await run_in_threadpool(payments.verifier.accept, voucher)

    take = accept or verifier_accept

    @router.post(VOUCHERS_PATH)
    async def post_voucher(request: Request) -> JSONResponse:
        """Also served by `node.api.voucher_route` on the node (same answers, without FastAPI's routing)."""
        status, answer = await voucher_answer(await request.body(), take)
        return JSONResponse(answer, status_code=status)

    @router.get("/v1/payments/channels/{channel_id}")
    async def get_channel(channel_id: str, request: Request) -> JSONResponse:
        """The node's account of one channel: what it accepted, what was served, what is settled. For the
        channel's payer (or session key) only (`client.access`); anyone else gets the same 404 as no channel."""
        signer = recover_auth(request.headers.get(AUTH_HEADER), payments.payee.address, channel_resource(channel_id))
        if signer is None:
            return payment_error(401, PaymentReason.AUTH_REQUIRED, "channel state is for its payer only: sign the "
                                 f"read with the payer or session key ({AUTH_HEADER}, see client.access)")
        allowed = await run_in_threadpool(payer_may_read, payments.chain, channel_id, signer)
        balance = payments.ledger.get(channel_id) if allowed else None
        if balance is None:
            return payment_error(404, PaymentReason.UNKNOWN_CHANNEL, f"no voucher accepted for channel {channel_id} "
                                 "that this signer may read")
        return JSONResponse({"channelId": balance.channel_id, "accepted": str(balance.accepted),
                             "spent": str(balance.spent), "settled": str(balance.settled),
                             "finalized": balance.finalized})

    return router


def create_payments_app(payments: Payments) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    payee = Account.from_key(os.environ[args.payee_key_env])
    settings = PaymentSettings(Path(args.deployment), Path(args.data_dir), settle_threshold=args.threshold,
                               settle_interval=args.interval)
    uvicorn.run(create_payments_app(Payments(settings, payee)), host="127.0.0.1", port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
