"""Sending contract transactions from a local key, with reverts turned into readable errors."""

from __future__ import annotations

from typing import Any

from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.contract.contract import ContractFunction
from web3.exceptions import ContractCustomError, ContractLogicError
from web3.types import TxReceipt

from dcml.client.chain.contracts import abi


class TransactionFailed(RuntimeError):
    """A transaction reverted or could not be sent; `reason` names the contract's custom error."""

    def __init__(self, action: str, reason: str) -> None:
        super().__init__(f"{action} failed: {reason}")
        self.action = action
        self.reason = reason


def _error_selectors() -> dict[str, str]:
    """4-byte selector -> custom error name, over every ABI we ship (for readable reverts)."""
    from dcml.client.chain.contracts import ABI_DIR

    out: dict[str, str] = {}
    for path in ABI_DIR.glob("*.json"):
        for item in abi(path.stem):
            if item.get("type") == "error":
                sig = f"{item['name']}({','.join(i['type'] for i in item['inputs'])})"
                out[Web3.keccak(text=sig)[:4].hex()] = item["name"]
    return out


_SELECTORS: dict[str, str] | None = None


def decode_revert(exc: Exception) -> str:
    global _SELECTORS
    data = getattr(exc, "data", None)
    if isinstance(data, str) and data.startswith("0x") and len(data) >= 10:
        if _SELECTORS is None:
            _SELECTORS = _error_selectors()
        name = _SELECTORS.get(data[2:10])
        if name:
            return name
    return str(exc)


def send(w3: Web3, account: LocalAccount, fn: ContractFunction, *, value: int = 0, action: str = "",
         min_gas: int = 0) -> TxReceipt:
    """Estimate (which surfaces reverts with their reason), sign, send and wait for one transaction.
    `min_gas` floors the limit where the estimate's state may not be the one the transaction meets."""
    action = action or fn.fn_name
    params: dict[str, Any] = {"from": account.address, "value": value}
    try:
        gas = fn.estimate_gas(params)
    except (ContractCustomError, ContractLogicError) as exc:
        raise TransactionFailed(action, decode_revert(exc)) from exc
    tx = fn.build_transaction(
        {
            **params,
            "gas": max(gas + gas // 5, min_gas),
            "nonce": w3.eth.get_transaction_count(account.address, "pending"),
            "chainId": w3.eth.chain_id,
        }
    )
    signed = account.sign_transaction(tx)
    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60)
    if receipt["status"] != 1:
        raise TransactionFailed(action, f"reverted in block {receipt['blockNumber']} (tx {tx_hash.hex()})")
    return receipt


def send_eth(w3: Web3, account: LocalAccount, to: str, value: int) -> TxReceipt:
    """A plain ETH transfer (e.g. gas money for a node's enclave address)."""
    tx = {"from": account.address, "to": Web3.to_checksum_address(to), "value": value, "gas": 21_000,
          "gasPrice": w3.eth.gas_price, "nonce": w3.eth.get_transaction_count(account.address, "pending"),
          "chainId": w3.eth.chain_id}
    tx_hash = w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60)
    if receipt["status"] != 1:
        raise TransactionFailed("send ETH", f"reverted (tx {tx_hash.hex()})")
    return receipt
