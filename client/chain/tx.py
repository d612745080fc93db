"""Sending contract transactions from a local key, and the base of every contract client: a revert becomes one
typed error (`TransactionFailed`) carrying the contract's own custom-error name and a hint saying what to do."""

from __future__ import annotations

from typing import Any, ClassVar

from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.contract import Contract
from web3.contract.contract import ContractConstructor, ContractFunction
from web3.exceptions import ContractCustomError, ContractLogicError
from web3.types import TxReceipt, Wei

from dcml.client.chain.contracts import abi
from dcml.client.wire.errors import ChainError


class TransactionFailed(ChainError):
    """A transaction reverted or could not be sent; `reason` names the contract's custom error when it has one,
    `hint` says what to do about it."""

    template: ClassVar[str] = "{action} failed: {reason}"

    def __init__(self, action: str, reason: str, hint: str = "") -> None:
        super().__init__(self.template.format(action=action, reason=reason) + (f" ({hint})" if hint else ""),
                         reason=reason)
        self.action = action
        self.hint = hint


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


def revert_name(exc: BaseException) -> str | None:
    """The custom error a revert carries (its 4-byte selector looked up in every shipped ABI), or None."""
    global _SELECTORS
    data = getattr(exc, "data", None)
    if isinstance(data, str) and data.startswith("0x") and len(data) >= 10:
        if _SELECTORS is None:
            _SELECTORS = _error_selectors()
        return _SELECTORS.get(data[2:10])
    return None


def decode_revert(exc: BaseException) -> str:
    """The revert's custom error name, or the node's own text when it carries none (a require string, a panic)."""
    return revert_name(exc) or str(exc)


def send(w3: Web3, account: LocalAccount, fn: ContractFunction | ContractConstructor, *, value: int = 0,
         action: str = "", min_gas: int = 0) -> TxReceipt:
    """Estimate (which surfaces reverts with their reason), sign, send and wait for one transaction.
    `min_gas` floors the limit where the estimate's state may not be the one the transaction meets."""
    action = action or (fn.fn_name if isinstance(fn, ContractFunction) else "deploy")
    try:
        gas = fn.estimate_gas({"from": account.address, "value": Wei(value)})
    except (ContractCustomError, ContractLogicError) as exc:
        raise TransactionFailed(action, decode_revert(exc)) from exc
    tx = fn.build_transaction({
        "from": account.address,
        "value": Wei(value),
        "gas": max(gas + gas // 5, min_gas),
        "nonce": w3.eth.get_transaction_count(account.address, "pending"),
        "chainId": w3.eth.chain_id,
    })
    # eth_account annotates a narrower dict than the TxParams web3 builds (same keys, TypedDict vs dict).
    signed = account.sign_transaction(tx)  # type: ignore[arg-type]
    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60)
    if receipt["status"] != 1:
        raise TransactionFailed(action, f"reverted in block {receipt['blockNumber']} (tx {tx_hash.hex()})")
    return receipt


def send_eth(w3: Web3, account: LocalAccount, to: str, value: int) -> TxReceipt:
    """A plain ETH transfer (e.g. gas money for a node's enclave address)."""
    tx: dict[str, Any] = {"from": account.address, "to": Web3.to_checksum_address(to), "value": value,
                          "gas": 21_000, "gasPrice": w3.eth.gas_price, "chainId": w3.eth.chain_id,
                          "nonce": w3.eth.get_transaction_count(account.address, "pending")}
    tx_hash = w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60)
    if receipt["status"] != 1:
        raise TransactionFailed("send ETH", f"reverted (tx {tx_hash.hex()})")
    return receipt


class ContractClient:
    """Base of the clients of one contract: `_send` runs a transaction and turns a revert into `error` (a
    TransactionFailed) named after the contract's custom error, with the hint `hints` gives for that name."""

    abi_name: ClassVar[str]
    error: ClassVar[type[TransactionFailed]] = TransactionFailed
    hints: ClassVar[dict[str, str]] = {}

    def __init__(self, w3: Web3, address: str, contract_abi: list[dict] | None = None) -> None:
        self.w3 = w3
        self._abi = contract_abi if contract_abi is not None else abi(self.abi_name)
        self.contract: Contract = w3.eth.contract(address=Web3.to_checksum_address(address), abi=self._abi)
        self.address = self.contract.address

    @property
    def error_names(self) -> frozenset[str]:
        """The contract's custom errors: a refusal naming one is the contract's answer; anything else may be
        transient (gas, RPC, a reorg)."""
        return frozenset(e["name"] for e in self._abi if e.get("type") == "error")

    def refused(self, action: str, reason: str) -> TransactionFailed:
        """The typed error for `reason` (a custom error name), with its hint."""
        return self.error(action, reason, self.hints.get(reason, ""))

    def _send(self, account: LocalAccount, fn: ContractFunction, action: str, value: int = 0,
              min_gas: int = 0) -> TxReceipt:
        try:
            return send(self.w3, account, fn, value=value, action=action, min_gas=min_gas)
        except TransactionFailed as exc:
            raise self.refused(action, exc.reason) from exc
