"""Contract ABIs shipped with the package (extracted from the Foundry build by `make abi`)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from web3 import Web3
from web3.contract import Contract

ABI_DIR = Path(__file__).parent / "abi"


@cache
def abi(name: str) -> list[dict]:
    return json.loads((ABI_DIR / f"{name}.json").read_text())


def contract(w3: Web3, name: str, address: str) -> Contract:
    return w3.eth.contract(address=Web3.to_checksum_address(address), abi=abi(name))
