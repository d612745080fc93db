"""The one way this project reaches a chain: a JSON-RPC HTTP provider with a timeout (a hung RPC must fail a
call, not freeze a node or a payer), optionally checked against the chain id a deployment names."""

from __future__ import annotations

from web3 import Web3

from dcml.client.wire.errors import ChainError

DEFAULT_TIMEOUT_S = 30.0


class WrongChain(ChainError):
    """The RPC serves another chain than the deployment says: a voucher or receipt signed there is void here."""

    reason = "wrong_chain"


def connect(rpc_url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, chain_id: int | None = None) -> Web3:
    """A Web3 over HTTP(S) with `timeout_s` per request. With `chain_id`, one `eth_chainId` call checks that the
    RPC serves that chain. No middleware: the chains we deploy on (anvil, OP-stack L2s) need none."""
    w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": timeout_s}))
    if chain_id is not None and (served := w3.eth.chain_id) != chain_id:
        raise WrongChain(f"RPC {rpc_url} is chain {served}, but the deployment says {chain_id}: point rpc_url at "
                         "the deployment's chain")
    return w3
