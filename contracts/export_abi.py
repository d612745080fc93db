"""Copy the ABIs the Python package needs from the Foundry build into client/chain/abi/ (committed).

Run by `make build`; `tests/test_abi.py` fails if the committed copies drift from the sources.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
CONTRACTS = ("PaymentChannels", "ModelRegistry", "TestToken", "NodeRegistry", "SLACourt")


def main() -> None:
    dest = HERE.parent / "client" / "chain" / "abi"
    dest.mkdir(exist_ok=True)
    for name in CONTRACTS:
        art = json.loads((HERE / "out" / f"{name}.sol" / f"{name}.json").read_text())
        (dest / f"{name}.json").write_text(json.dumps(art["abi"], indent=1) + "\n")
    print(f"exported {len(CONTRACTS)} ABIs to {dest}", file=sys.stderr)


if __name__ == "__main__":
    main()
