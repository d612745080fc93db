"""contracts/test/mocks/MockERC1271Wallet.sol, compiled (forge build; creation bytecode and ABI from
contracts/out/MockERC1271Wallet.sol/MockERC1271Wallet.json), so Python tests can deploy an ERC-1271 wallet
without a Solidity toolchain. Regenerate after changing the mock."""

from __future__ import annotations

from eth_account.signers.local import LocalAccount
from web3 import Web3

from dcml.client.chain.tx import send

ABI = [{'type': 'constructor',
  'inputs': [{'name': 'owner_', 'type': 'address', 'internalType': 'address'}],
  'stateMutability': 'nonpayable'},
 {'type': 'function',
  'name': 'isValidSignature',
  'inputs': [{'name': 'hash', 'type': 'bytes32', 'internalType': 'bytes32'},
             {'name': 'signature', 'type': 'bytes', 'internalType': 'bytes'}],
  'outputs': [{'name': '', 'type': 'bytes4', 'internalType': 'bytes4'}],
  'stateMutability': 'view'},
 {'type': 'function',
  'name': 'owner',
  'inputs': [],
  'outputs': [{'name': '', 'type': 'address', 'internalType': 'address'}],
  'stateMutability': 'view'},
 {'type': 'function', 'name': 'revoke', 'inputs': [], 'outputs': [], 'stateMutability': 'nonpayable'},
 {'type': 'function',
  'name': 'revoked',
  'inputs': [],
  'outputs': [{'name': '', 'type': 'bool', 'internalType': 'bool'}],
  'stateMutability': 'view'}]

BYTECODE = (
    "0x60a0604052348015600e575f5ffd5b506040516104e83803806104e8833981016040819052602b91603b565b6001600160a01b031660"
    "80526066565b5f60208284031215604a575f5ffd5b81516001600160a01b0381168114605f575f5ffd5b9392505050565b608051610464"
    "6100845f395f818160b801526101a301526104645ff3fe608060405234801561000f575f5ffd5b506004361061004a575f3560e01c8063"
    "1626ba7e1461004e57806363d256ce146100975780638da5cb5b146100b3578063b6549f75146100ff575b5f5ffd5b61006161005c3660"
    "0461038a565b610130565b6040517fffffffff000000000000000000000000000000000000000000000000000000009091168152602001"
    "5b60405180910390f35b5f546100a39060ff1681565b604051901515815260200161008e565b6100da7f00000000000000000000000000"
    "0000000000000000000000000000000000000081565b60405173ffffffffffffffffffffffffffffffffffffffff909116815260200161"
    "008e565b61012e5f80547fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff00166001179055565b005b5f5f"
    "5f6101728686868080601f0160208091040260200160405190810160405280939291908181526020018383808284375f92019190915250"
    "61024e92505050565b505f54919350915060ff1615801561019a57505f81600381111561019857610198610401565b145b80156101f157"
    "507f000000000000000000000000000000000000000000000000000000000000000073ffffffffffffffffffffffffffffffffffffffff"
    "168273ffffffffffffffffffffffffffffffffffffffff16145b1561022157507f1626ba7e000000000000000000000000000000000000"
    "0000000000000000000091506102479050565b507fffffffff000000000000000000000000000000000000000000000000000000009150"
    "505b9392505050565b5f5f5f8351604103610285576020840151604085015160608601515f1a61027788828585610297565b9550955095"
    "50505050610290565b505081515f91506002905b9250925092565b5f80807f7fffffffffffffffffffffffffffffff5d576e7357a4501d"
    "dfe92f46681b20a08411156102d057505f91506003905082610380565b604080515f808252602082018084528a905260ff891692820192"
    "909252606081018790526080810186905260019060a0016020604051602081039080840390855afa158015610321573d5f5f3e3d5ffd5b"
    "50506040517fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffe0015191505073ffffffffffffffffffffff"
    "ffffffffffffffffff811661037757505f925060019150829050610380565b92505f91508190505b9450945094915050565b5f5f5f6040"
    "848603121561039c575f5ffd5b83359250602084013567ffffffffffffffff8111156103b9575f5ffd5b8401601f810186136103c9575f"
    "5ffd5b803567ffffffffffffffff8111156103df575f5ffd5b8660208284010111156103f0575f5ffd5b93966020919091019550929350"
    "5050565b7f4e487b71000000000000000000000000000000000000000000000000000000005f52602160045260245ffdfea26469706673"
    "582212202161d23df054938311803eff3fa85f2df6a474d33de1881093467f8846375aca64736f6c63430008250033"
)


def deploy_wallet(w3: Web3, deployer: LocalAccount, owner: str):
    """A wallet that accepts digests signed by `owner` until `revoke()` is called; returns the contract."""
    factory = w3.eth.contract(abi=ABI, bytecode=BYTECODE)
    receipt = send(w3, deployer, factory.constructor(Web3.to_checksum_address(owner)), action="deploy wallet")
    return w3.eth.contract(address=receipt["contractAddress"], abi=ABI)
