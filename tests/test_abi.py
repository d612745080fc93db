"""The ABIs shipped in client/chain/abi/ are exactly those of the contracts as built."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["PaymentChannels", "ModelRegistry", "TestToken", "NodeRegistry", "SLACourt"])
def test_shipped_abi_matches_the_build(name: str) -> None:
    built = json.loads((REPO / "contracts" / "out" / f"{name}.sol" / f"{name}.json").read_text())["abi"]
    shipped = json.loads((REPO / "client" / "chain" / "abi" / f"{name}.json").read_text())
    assert shipped == built, f"client/chain/abi/{name}.json is stale: run `make build` and commit the result"
