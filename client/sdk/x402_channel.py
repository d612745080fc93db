"""The `channel` scheme as an x402 SDK scheme client: any `x402Client` pays a dcml node with it.

    x402 = channel_x402_client(ChannelEvmScheme(w3, deployment, wallet, deposit=10**17))
    async with x402HttpxClient(x402) as http:
        r = await http.post(node_url + "/v1/chat/completions", json=request)

`ChannelEvmScheme` implements the SDK's `SchemeNetworkClient` protocol (`scheme`, `create_payment_payload`)
and its scheme hooks (`scheme_hooks.on_payment_response`). On the first offer for a payee and model it opens
a channel on-chain (a blocking transaction, like the SDK's own batch-settlement deposit); afterwards it signs
cumulative vouchers for what the node's last `PAYMENT-RESPONSE` says was spent plus what the offer says this
request needs, so at most one request's need is ever paid ahead. When a streamed answer spent more than its
admission figures showed, the node answers the retry with a 402 naming `requiredCumulative`; the hook learns it
and asks the SDK to retry once with a fresh payload.

What this client does not do (use `client.sdk.Client` for it): attest the node before paying, answer a
stream's mid-answer `payment-need-voucher` (keep `max_tokens` within the offer's `prepay`, or the stream ends
with `payment-timeout` after the credit window), verify receipts as they arrive.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from dcml.client.chain.channel import ChannelClient
from dcml.client.chain.deployment import Deployment
from dcml.client.wire.x402 import SCHEME, ChannelFigures, PaymentRequirement


@dataclass
class _Channel:
    channel_id: bytes
    session: LocalAccount
    deposit: int
    signed: int = 0  # highest cumulative amount signed
    spent: int = 0  # the node's spent figure, from its last PAYMENT-RESPONSE
    required: int = 0  # a requiredCumulative the node named after a retry


class ChannelEvmScheme:
    """x402 `SchemeNetworkClient` for `scheme: "channel"` on `eip155:<chainId>` (register it for that network)."""

    scheme = SCHEME

    def __init__(self, w3: Web3, deployment: Deployment, wallet: LocalAccount, *, deposit: int,
                 payee: str | None = None, max_price_per_token: int | None = None) -> None:
        self.deployment = deployment
        self.chain = ChannelClient(w3, deployment, wallet)
        self.deposit = deposit
        self.payee = payee  # when set (an attested node's address), offers naming another payee are refused
        self.max_price_per_token = max_price_per_token
        self._channels: dict[tuple[str, str, str], _Channel] = {}
        self._by_id: dict[str, _Channel] = {}
        self._lock = threading.Lock()
        self.scheme_hooks = SimpleNamespace(on_payment_response=self._on_payment_response)

    @property
    def network(self) -> str:
        return f"eip155:{self.deployment.chain_id}"

    def create_payment_payload(self, requirements: Any) -> dict[str, Any]:
        """The voucher (`PaymentPayload.payload`) for an offer; the SDK wraps it with `accepted`."""
        req = PaymentRequirement.model_validate(requirements.model_dump(by_alias=True))
        self._check(req)
        with self._lock:
            ch = self._channel(req)
            amount = max(ch.signed, ch.spent + req.amount, ch.required)
            if req.extra.channel_id and req.extra.channel_id.lower() == "0x" + ch.channel_id.hex():
                amount = max(amount, req.extra.required_cumulative or 0)
            if amount > ch.deposit:
                top = max(self.deposit, amount - ch.deposit)
                self.chain.top_up(ch.channel_id, top)
                ch.deposit += top
            ch.signed = amount
            return self.chain.sign_voucher(ch.session, ch.channel_id, amount).to_wire()

    def _check(self, req: PaymentRequirement) -> None:
        dep = self.deployment
        if req.network != self.network or req.extra.escrow.lower() != dep.payment_channels.lower():
            raise ValueError(f"the offer names escrow {req.extra.escrow} on {req.network}; this client pays "
                             f"{dep.payment_channels} on {self.network}")
        if self.payee is not None and req.pay_to.lower() != self.payee.lower():
            raise ValueError(f"the offer asks to pay {req.pay_to}, not the expected payee {self.payee}")
        highest = max(req.extra.price_per_input_token, req.extra.price_per_output_token)
        if self.max_price_per_token is not None and highest > self.max_price_per_token:
            raise ValueError(f"the offer charges {highest} per token, above max_price_per_token")

    def _channel(self, req: PaymentRequirement) -> _Channel:
        key = (req.pay_to.lower(), req.extra.model_id.lower(), req.asset.lower())
        ch = self._channels.get(key)
        if ch is None:
            session = Account.create()
            deposit = max(self.deposit, req.amount)
            channel_id = self.chain.open(req.pay_to, deposit, session_key=session.address, token=req.asset,
                                         model_id=bytes.fromhex(req.extra.model_id.removeprefix("0x")))
            ch = self._channels[key] = self._by_id["0x" + channel_id.hex()] = _Channel(channel_id, session, deposit)
        return ch

    def _on_payment_response(self, ctx: Any) -> Any:
        """Learn the node's figures; on a 402 naming one of our channels' requiredCumulative, retry once."""
        from x402.schemas import RecoveredResponseResult

        settle = ctx.settle_response
        if settle is not None and settle.extensions and SCHEME in settle.extensions:
            figures = ChannelFigures.model_validate(settle.extensions[SCHEME])
            with self._lock:
                ch = self._by_id.get(figures.channel_id.lower())
                if ch is not None:
                    ch.spent = max(ch.spent, figures.spent)
            return None
        required = ctx.payment_required
        offer = next((r for r in getattr(required, "accepts", []) if r.scheme == SCHEME), None)
        if offer is None or required.error != "insufficient_funds":
            return None
        extra = offer.extra or {}
        with self._lock:
            ch = self._by_id.get(str(extra.get("channelId", "")).lower())
            if ch is None or not str(extra.get("requiredCumulative", "")).isdigit():
                return None
            ch.required = max(ch.required, int(extra["requiredCumulative"]))
        return RecoveredResponseResult()


def channel_x402_client(scheme: ChannelEvmScheme, *, max_amount_per_payment: int | None = None) -> Any:
    """An `x402Client` with `scheme` registered for its network, and spend controls that allow its token
    (the SDK allows only assets it knows by default), each payment capped at `max_amount_per_payment`."""
    from x402 import x402Client
    from x402.client_base import SpendControlAsset

    asset = SpendControlAsset(network=scheme.network, asset=scheme.deployment.token)
    if max_amount_per_payment is not None:
        asset["max_amount_per_payment"] = str(max_amount_per_payment)
    client = x402Client().register(scheme.network, scheme)
    client.set_spend_controls({"allowed_assets": [asset]})
    return client
