// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ERC3009} from "../src/ERC3009.sol";

/// @title TestToken
/// @notice An 18-decimal ERC-20 with ERC-3009 authorizations (EIP-712 domain: the token name, version "1") for
///         devnets and tests.
/// @dev DEVNET FAUCET: `mint` is open to anyone. Never deploy this where the token must have value.
contract TestToken is ERC3009 {
    /// @param name_ Token name.
    /// @param symbol_ Token symbol.
    constructor(string memory name_, string memory symbol_) ERC20(name_, symbol_) EIP712(name_, "1") {}

    /// @notice Mints `amount` to `to`. Anyone may call it (devnet faucet).
    /// @param to Recipient.
    /// @param amount Amount, in the token's smallest unit (18 decimals).
    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }
}
