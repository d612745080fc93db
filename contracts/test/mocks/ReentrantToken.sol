// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @dev A malicious ERC-20: on every transfer it calls back into `target` with armed calldata
///      (as itself) and counts the callbacks that succeeded.
contract ReentrantToken is ERC20 {
    address public target;
    bytes public reentryData;
    uint256 public reentryAttempts;
    uint256 public reentrySuccesses;
    bool private _inCallback;

    constructor() ERC20("Reentrant", "EVIL") {}

    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    function arm(address target_, bytes calldata data) external {
        target = target_;
        reentryData = data;
    }

    function _update(address from, address to, uint256 value) internal override {
        super._update(from, to, value);
        if (target != address(0) && !_inCallback && from != address(0)) {
            _inCallback = true;
            reentryAttempts++;
            (bool ok,) = target.call(reentryData);
            if (ok) reentrySuccesses++;
            _inCallback = false;
        }
    }
}
