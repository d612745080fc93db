// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {PaymentChannelsFixture} from "./PaymentChannels.t.sol";

/// @dev One scenario per test, for `forge test --match-test <name> --gas-report` (each external
///      call is then its own transaction, 21k base and calldata included). The last call of each
///      test is the one measured; earlier calls set the scenario up.
contract PaymentChannelsGasTest is PaymentChannelsFixture {
    function test_gas_open_eth_noRoyalty() public {
        _openWith(ETH, 1 ether, SALT, signer, FREE_MODEL, 0);
    }

    function test_gas_open_eth_royalty() public {
        _open(ETH, 1 ether);
    }

    function test_gas_open_erc20_royalty() public {
        _open(address(token), 1 ether);
    }

    function test_gas_open_erc20_noRoyalty() public {
        _openWith(address(token), 1 ether, SALT, signer, FREE_MODEL, 0);
    }

    /// @dev The first settle of a channel: the payee's and publisher's earnings slots are created.
    function test_gas_settle_first_royalty() public {
        bytes32 id = _open(ETH, 1 ether);
        _settle(id, 0.1 ether);
    }

    function test_gas_topUp_eth() public {
        bytes32 id = _open(ETH, 1 ether);
        vm.prank(payer);
        channels.topUp{value: 1 ether}(_p(id), 1 ether);
    }

    function test_gas_topUp_erc20() public {
        bytes32 id = _open(address(token), 1 ether);
        vm.prank(payer);
        channels.topUp(_p(id), 1 ether);
    }

    /// @dev settle #1 credits fresh earnings slots (zero -> non-zero); settle #2 is the steady state.
    function test_gas_settle_royalty() public {
        bytes32 id = _open(ETH, 1 ether);
        _settle(id, 0.1 ether);
        _settle(id, 0.2 ether);
    }

    function test_gas_settle_noRoyalty() public {
        bytes32 id = _openWith(ETH, 1 ether, SALT, signer, FREE_MODEL, 0);
        _settle(id, 0.1 ether);
        _settle(id, 0.2 ether);
    }

    function test_gas_close_withVoucher() public {
        bytes32 id = _open(ETH, 1 ether);
        _settle(id, 0.1 ether);
        bytes memory sig = _voucher(id, 0.2 ether);
        vm.prank(payee);
        channels.close(_p(id), 0.2 ether, sig);
    }

    /// @dev The same close when the payer already holds an unclaimed balance in the token (its
    ///      refund credit then updates a warm-able non-zero slot instead of creating one).
    function test_gas_close_withVoucher_payerHasBalance() public {
        bytes32 earlier = _openWith(ETH, 1 ether, keccak256("earlier"), signer, MODEL, BPS);
        vm.prank(payee);
        channels.close(_p(earlier), 0, "");
        bytes32 id = _open(ETH, 1 ether);
        _settle(id, 0.1 ether);
        bytes memory sig = _voucher(id, 0.2 ether);
        vm.prank(payee);
        channels.close(_p(id), 0.2 ether, sig);
    }

    function test_gas_close_atSettled() public {
        bytes32 id = _open(ETH, 1 ether);
        _settle(id, 0.1 ether);
        vm.prank(payee);
        channels.close(_p(id), 0.1 ether, "");
    }

    function test_gas_requestClose() public {
        bytes32 id = _open(ETH, 1 ether);
        vm.prank(payer);
        channels.requestClose(_p(id));
    }

    function test_gas_withdraw() public {
        bytes32 id = _open(ETH, 1 ether);
        _settle(id, 0.1 ether);
        vm.prank(payer);
        channels.requestClose(_p(id));
        vm.warp(block.timestamp + GRACE);
        vm.prank(payer);
        channels.withdraw(_p(id));
    }

    function test_gas_claimEarnings_eth() public {
        bytes32 id = _open(ETH, 1 ether);
        _settle(id, 0.1 ether);
        vm.prank(payee);
        channels.claimEarnings(ETH);
    }

    function test_gas_claimEarnings_erc20() public {
        bytes32 id = _open(address(token), 1 ether);
        _settle(id, 0.1 ether);
        vm.prank(payee);
        channels.claimEarnings(address(token));
    }
}
