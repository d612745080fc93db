// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @dev A recipient that rejects ETH (a payee, publisher or payer that cannot be paid by push).
contract RevertingReceiver {
    error NoEth();

    receive() external payable {
        revert NoEth();
    }
}
