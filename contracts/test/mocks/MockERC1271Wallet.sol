// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";

/// @dev A smart-contract wallet that accepts a digest signed by its owner key (ERC-1271).
contract MockERC1271Wallet {
    bytes4 internal constant MAGIC = 0x1626ba7e;

    address public immutable owner;
    bool public revoked;

    constructor(address owner_) {
        owner = owner_;
    }

    /// @dev Contract signatures are revocable: after this every signature is refused.
    function revoke() external {
        revoked = true;
    }

    function isValidSignature(bytes32 hash, bytes calldata signature) external view returns (bytes4) {
        (address recovered, ECDSA.RecoverError err,) = ECDSA.tryRecover(hash, signature);
        if (!revoked && err == ECDSA.RecoverError.NoError && recovered == owner) return MAGIC;
        return 0xffffffff;
    }
}
