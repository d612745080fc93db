// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {NodeRegistry} from "../src/NodeRegistry.sol";
import {SLACourt} from "../src/SLACourt.sol";
import {SLACourtFixture} from "./SLACourt.t.sol";
import {INodeRegistry} from "../src/interfaces/INodeRegistry.sol";
import {ISLACourt} from "../src/interfaces/ISLACourt.sol";

/// @notice Issue 19, finding 6: a node facing a no-response dispute must not be able to exit and withdraw its
///         stake before the court judges it (formerly `finalize` then paid the client 0).
contract SLACourtExitTest is SLACourtFixture {
    /// @dev Rewires the fixture onto a registry whose unbonding equals the response window, as the devnet's
    ///      (3600/3600) and a 7-day/7-day deployment both do: the exit would end with the window.
    function _rewire(uint64 unbonding, uint32 window) internal {
        registry = new NodeRegistry(address(token), 100e18, unbonding, 1 hours, OWNER);
        court = new SLACourt(registry, address(escrow), BOND);
        vm.prank(OWNER);
        registry.setSlasher(address(court));
        vm.prank(operator);
        token.approve(address(registry), type(uint256).max);
        _register(NODE_KEY);
        ISLACourt.Terms memory t = _terms();
        t.responseWindow = window;
        _publish(node, t);
        vm.warp(block.timestamp + 2 hours);
    }

    function _openSilent() internal returns (bytes32 id) {
        ISLACourt.Acceptance memory a = _acceptance(keccak256("silent"));
        bytes memory sig = _signA(NODE_KEY, a);
        vm.warp(a.deadline + 1);
        id = _openNR(BOND, a, sig);
    }

    function _escape(uint64 unbonding, uint32 window) internal {
        _rewire(unbonding, window);
        bytes32 id = _openSilent();
        vm.assertEq(registry.openDisputes(node), 1);
        // The attacker: exit as soon as the dispute opens, withdraw when the answer window closes.
        vm.prank(operator);
        registry.requestExit(node);
        vm.warp(block.timestamp + (unbonding > window ? unbonding : window) + 1);
        vm.prank(operator);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.DisputesPending.selector, node, 1));
        registry.withdrawStake(node);
        // The court still judges it, and the client is paid in full from the stake that stayed.
        uint256 before = token.balanceOf(CLIENT);
        vm.assertEq(court.finalize(id), 50e18);
        vm.assertEq(token.balanceOf(CLIENT) - before, 50e18);
        vm.assertEq(registry.openDisputes(node), 0);
        // Then the rest of the stake leaves normally.
        uint256 opBefore = token.balanceOf(operator);
        vm.prank(operator);
        registry.withdrawStake(node);
        vm.assertEq(token.balanceOf(operator) - opBefore, STAKE - 50e18);
    }

    function test_exitDuringDispute_devnetParameters() public {
        _escape(3600, 3600);
    }

    function test_exitDuringDispute_sevenDays() public {
        _escape(7 days, 7 days);
    }

    function test_answeredDisputeReleasesTheLock() public {
        _rewire(3600, 3600);
        bytes32 id = _openSilent();
        vm.prank(operator);
        registry.requestExit(node);
        ISLACourt.Receipt memory r = _receipt(keccak256("silent"));
        bytes memory sig = _signR(NODE_KEY, r);
        vm.prank(operator); // the bond goes to whoever answers
        court.answer(id, r, sig);
        vm.assertEq(registry.openDisputes(node), 0);
        vm.warp(block.timestamp + 3601);
        vm.prank(operator);
        registry.withdrawStake(node);
        vm.assertEq(registry.getNode(node).stake, 0);
    }

    function test_onlyTheSlasherLocks() public {
        vm.prank(THIEF);
        vm.expectRevert(INodeRegistry.NotSlasher.selector);
        registry.lockStake(node);
        vm.prank(address(court));
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.NoOpenDispute.selector, node));
        registry.unlockStake(node);
    }
}
