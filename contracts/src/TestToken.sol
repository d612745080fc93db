// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title TestToken
/// @notice An 18-decimal ERC-20 for devnets and tests.
/// @dev DEVNET FAUCET: `mint` is open to anyone. Never deploy this where the token must have value.
contract TestToken is ERC20 {
    /// @param name_ Token name.
    /// @param symbol_ Token symbol.
    constructor(string memory name_, string memory symbol_) ERC20(name_, symbol_) {}

    /// @notice Mints `amount` to `to`. Anyone may call it (devnet faucet).
    /// @param to Recipient.
    /// @param amount Amount, in the token's smallest unit (18 decimals).
    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }
}
