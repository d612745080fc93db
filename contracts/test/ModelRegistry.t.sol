// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {TestBase} from "./utils/TestBase.sol";
import {ModelRegistry} from "../src/ModelRegistry.sol";
import {IModelRegistry} from "../src/interfaces/IModelRegistry.sol";

contract ModelRegistryTest is TestBase {
    ModelRegistry internal registry;
    address internal constant PUBLISHER = address(0xB0B);
    address internal constant STRANGER = address(0xBAD);
    bytes32 internal constant MODEL = keccak256("model");

    function setUp() public {
        registry = new ModelRegistry();
    }

    function test_register_storesTermsAndEmits() public {
        vm.expectEmit(address(registry));
        emit IModelRegistry.ModelRegistered(MODEL, PUBLISHER, 250);
        vm.prank(PUBLISHER);
        registry.register(MODEL, 250);
        (address publisher, uint16 bps) = registry.terms(MODEL);
        vm.assertEq(publisher, PUBLISHER);
        vm.assertEq(uint256(bps), 250);
    }

    function test_register_acceptsZeroAndFullRoyalty() public {
        vm.startPrank(PUBLISHER);
        registry.register(MODEL, 0);
        registry.register(keccak256("other"), 10_000);
        vm.stopPrank();
        (, uint16 bps) = registry.terms(keccak256("other"));
        vm.assertEq(uint256(bps), 10_000);
    }

    function test_register_revertsWhenModelExists() public {
        vm.prank(PUBLISHER);
        registry.register(MODEL, 1);
        vm.expectRevert(abi.encodeWithSelector(IModelRegistry.ModelExists.selector, MODEL));
        vm.prank(STRANGER);
        registry.register(MODEL, 2);
    }

    function test_register_revertsOnRoyaltyAbove10000() public {
        vm.expectRevert(abi.encodeWithSelector(IModelRegistry.InvalidRoyalty.selector, uint16(10_001)));
        vm.prank(PUBLISHER);
        registry.register(MODEL, 10_001);
    }

    function test_register_revertsOnZeroModelId() public {
        vm.expectRevert(IModelRegistry.ZeroModelId.selector);
        vm.prank(PUBLISHER);
        registry.register(bytes32(0), 1);
    }

    function test_setRoyalty_updatesAndEmits() public {
        vm.startPrank(PUBLISHER);
        registry.register(MODEL, 100);
        vm.expectEmit(address(registry));
        emit IModelRegistry.RoyaltyChanged(MODEL, 100, 700);
        registry.setRoyalty(MODEL, 700);
        vm.stopPrank();
        (address publisher, uint16 bps) = registry.terms(MODEL);
        vm.assertEq(publisher, PUBLISHER);
        vm.assertEq(uint256(bps), 700);
    }

    function test_setRoyalty_revertsWhenNotPublisher() public {
        vm.prank(PUBLISHER);
        registry.register(MODEL, 100);
        vm.expectRevert(IModelRegistry.NotPublisher.selector);
        vm.prank(STRANGER);
        registry.setRoyalty(MODEL, 0);
    }

    function test_setRoyalty_revertsOnUnregisteredModel() public {
        vm.expectRevert(IModelRegistry.NotPublisher.selector);
        vm.prank(STRANGER);
        registry.setRoyalty(MODEL, 0);
    }

    function test_setRoyalty_revertsOnRoyaltyAbove10000() public {
        vm.startPrank(PUBLISHER);
        registry.register(MODEL, 100);
        vm.expectRevert(abi.encodeWithSelector(IModelRegistry.InvalidRoyalty.selector, uint16(20_000)));
        registry.setRoyalty(MODEL, 20_000);
        vm.stopPrank();
    }

    function test_terms_unregisteredIsZero() public view {
        (address publisher, uint16 bps) = registry.terms(MODEL);
        vm.assertEq(publisher, address(0));
        vm.assertEq(uint256(bps), 0);
    }

    function testFuzz_register_acceptsExactlyBpsUpTo10000(bytes32 modelId, uint16 bps, address publisher) public {
        vm.assume(modelId != bytes32(0));
        vm.prank(publisher);
        if (bps > 10_000) vm.expectRevert(abi.encodeWithSelector(IModelRegistry.InvalidRoyalty.selector, bps));
        registry.register(modelId, bps);
        (address storedPublisher, uint16 storedBps) = registry.terms(modelId);
        if (bps <= 10_000) {
            vm.assertEq(storedPublisher, publisher);
            vm.assertEq(uint256(storedBps), bps);
        } else {
            vm.assertEq(storedPublisher, address(0));
        }
    }
}
