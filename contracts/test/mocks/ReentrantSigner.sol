// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";

/// @dev A malicious ERC-1271 signer: inside `isValidSignature` it calls back into `target` with
///      armed calldata (e.g. the same settle again), then accepts its owner's signatures.
///      The callback runs in the STATICCALL context of the verifier, so it cannot change state.
contract ReentrantSigner {
    bytes4 internal constant MAGIC = 0x1626ba7e;

    address public immutable owner;
    address public target;
    bytes public reentryData;

    constructor(address owner_) {
        owner = owner_;
    }

    function arm(address target_, bytes calldata data) external {
        target = target_;
        reentryData = data;
    }

    /// @dev Not declared `view` on purpose (the selector is the same): it tries a state-changing call.
    function isValidSignature(bytes32 hash, bytes calldata signature) external returns (bytes4) {
        if (target != address(0)) {
            // Bounded gas: a call that fails in a static context burns all the gas it is given.
            (bool ok,) = target.call{gas: 100_000}(reentryData);
            ok; // the outcome is observed by the caller through the channel's state
        }
        (address recovered, ECDSA.RecoverError err,) = ECDSA.tryRecover(hash, signature);
        if (err == ECDSA.RecoverError.NoError && recovered == owner) return MAGIC;
        return 0xffffffff;
    }
}
