// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @dev A registry that breaks ModelRegistry's bound: every model has a royalty above 10_000 bps.
contract BogusRegistry {
    function terms(bytes32) external pure returns (address publisher, uint16 royaltyBps) {
        return (address(0x9B), 10_001);
    }
}
