// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {TestBase} from "./utils/TestBase.sol";
import {ModelRegistry} from "../src/ModelRegistry.sol";
import {PaymentChannelsFixture} from "./PaymentChannels.t.sol";
import {IModelRegistry} from "../src/interfaces/IModelRegistry.sol";

contract ModelRegistryPublishTest is TestBase {
    ModelRegistry internal registry;
    address internal constant PUBLISHER = address(0xB0B);
    address internal constant STRANGER = address(0xBAD);
    bytes32 internal constant MODEL = keccak256("model");
    bytes32 internal constant MANIFEST = keccak256("manifest");
    bytes32 internal constant WEIGHTS = keccak256("weights");
    string internal constant URL = "https://broker.example/v1";

    function setUp() public {
        registry = new ModelRegistry();
    }

    function _measurements(uint256 n) internal pure returns (bytes32[] memory m) {
        m = new bytes32[](n);
        for (uint256 i; i < n; ++i) {
            m[i] = keccak256(abi.encode("measurement", i));
        }
    }

    function _publish() internal {
        vm.prank(PUBLISHER);
        registry.publish(MODEL, 300, MANIFEST, WEIGHTS, 7, URL, _measurements(2));
    }

    function test_publish_registersListsAndEmits() public {
        bytes32[] memory m = _measurements(2);
        vm.expectEmit(address(registry));
        emit IModelRegistry.ModelRegistered(MODEL, PUBLISHER, 300);
        vm.expectEmit(address(registry));
        emit IModelRegistry.ModelPublished(MODEL, PUBLISHER, MANIFEST, WEIGHTS, 7, URL);
        vm.expectEmit(address(registry));
        emit IModelRegistry.MeasurementsChanged(MODEL, m);
        _publish();

        (address publisher, uint16 bps) = registry.terms(MODEL);
        vm.assertEq(publisher, PUBLISHER);
        vm.assertEq(uint256(bps), 300);
        (bytes32 manifest, bytes32 weights, uint256 floor, string memory url) = registry.listing(MODEL);
        vm.assertEq(manifest, MANIFEST);
        vm.assertEq(weights, WEIGHTS);
        vm.assertEq(floor, 7);
        vm.assertEq(keccak256(bytes(url)), keccak256(bytes(URL)));
        bytes32[] memory stored = registry.allowedMeasurements(MODEL);
        vm.assertEq(stored.length, 2);
        vm.assertEq(stored[1], m[1]);
        vm.assertTrue(registry.isMeasurementAllowed(MODEL, m[0]));
        vm.assertFalse(registry.isMeasurementAllowed(MODEL, keccak256("other")));
        vm.assertTrue(registry.isPublished(MODEL));
    }

    function test_publish_upgradesARegisteredModelAndItsRoyalty() public {
        vm.startPrank(PUBLISHER);
        registry.register(MODEL, 100);
        vm.expectEmit(address(registry));
        emit IModelRegistry.RoyaltyChanged(MODEL, 100, 300);
        registry.publish(MODEL, 300, MANIFEST, WEIGHTS, 7, URL, _measurements(1));
        vm.stopPrank();
        (, uint16 bps) = registry.terms(MODEL);
        vm.assertEq(uint256(bps), 300);
    }

    function test_publish_revertsForAnotherPublishersModel() public {
        vm.prank(PUBLISHER);
        registry.register(MODEL, 100);
        vm.expectRevert(abi.encodeWithSelector(IModelRegistry.ModelExists.selector, MODEL));
        vm.prank(STRANGER);
        registry.publish(MODEL, 300, MANIFEST, WEIGHTS, 7, URL, _measurements(1));
    }

    function test_publish_revertsWhenAlreadyPublished() public {
        _publish();
        vm.expectRevert(abi.encodeWithSelector(IModelRegistry.AlreadyPublished.selector, MODEL));
        vm.prank(PUBLISHER);
        registry.publish(MODEL, 300, MANIFEST, WEIGHTS, 7, URL, _measurements(1));
    }

    function test_publish_validatesInputs() public {
        vm.startPrank(PUBLISHER);
        vm.expectRevert(IModelRegistry.ZeroModelId.selector);
        registry.publish(bytes32(0), 1, MANIFEST, WEIGHTS, 0, URL, _measurements(1));
        vm.expectRevert(abi.encodeWithSelector(IModelRegistry.InvalidRoyalty.selector, uint16(10_001)));
        registry.publish(MODEL, 10_001, MANIFEST, WEIGHTS, 0, URL, _measurements(1));
        vm.expectRevert(IModelRegistry.ZeroHash.selector);
        registry.publish(MODEL, 1, bytes32(0), WEIGHTS, 0, URL, _measurements(1));
        vm.expectRevert(IModelRegistry.ZeroHash.selector);
        registry.publish(MODEL, 1, MANIFEST, bytes32(0), 0, URL, _measurements(1));
        vm.expectRevert(IModelRegistry.InvalidKeyBrokerUrl.selector);
        registry.publish(MODEL, 1, MANIFEST, WEIGHTS, 0, "", _measurements(1));
        vm.expectRevert(IModelRegistry.InvalidKeyBrokerUrl.selector);
        registry.publish(MODEL, 1, MANIFEST, WEIGHTS, 0, string(new bytes(257)), _measurements(1));
        vm.expectRevert(abi.encodeWithSelector(IModelRegistry.TooManyMeasurements.selector, uint256(33)));
        registry.publish(MODEL, 1, MANIFEST, WEIGHTS, 0, URL, _measurements(33));
        bytes32[] memory zero = new bytes32[](1);
        vm.expectRevert(IModelRegistry.ZeroMeasurement.selector);
        registry.publish(MODEL, 1, MANIFEST, WEIGHTS, 0, URL, zero);
        vm.stopPrank();
        vm.assertFalse(registry.isPublished(MODEL));
    }

    function test_updates_byPublisherEmit() public {
        _publish();
        vm.startPrank(PUBLISHER);
        vm.expectEmit(address(registry));
        emit IModelRegistry.ReleaseUpdated(MODEL, keccak256("m2"), keccak256("w2"));
        registry.updateRelease(MODEL, keccak256("m2"), keccak256("w2"));
        vm.expectEmit(address(registry));
        emit IModelRegistry.PriceFloorChanged(MODEL, 7, 9);
        registry.setPriceFloor(MODEL, 9);
        vm.expectEmit(address(registry));
        emit IModelRegistry.KeyBrokerChanged(MODEL, "https://b2");
        registry.setKeyBroker(MODEL, "https://b2");
        bytes32[] memory one = _measurements(1);
        vm.expectEmit(address(registry));
        emit IModelRegistry.MeasurementsChanged(MODEL, one);
        registry.setAllowedMeasurements(MODEL, one);
        vm.stopPrank();
        (bytes32 manifest, bytes32 weights, uint256 floor, string memory url) = registry.listing(MODEL);
        vm.assertEq(manifest, keccak256("m2"));
        vm.assertEq(weights, keccak256("w2"));
        vm.assertEq(floor, 9);
        vm.assertEq(keccak256(bytes(url)), keccak256("https://b2"));
        vm.assertEq(registry.allowedMeasurements(MODEL).length, 1);
        vm.assertFalse(registry.isMeasurementAllowed(MODEL, _measurements(2)[1])); // revoked
    }

    function test_updates_revertForStrangersAndUnpublishedModels() public {
        _publish();
        vm.startPrank(STRANGER);
        vm.expectRevert(IModelRegistry.NotPublisher.selector);
        registry.updateRelease(MODEL, MANIFEST, WEIGHTS);
        vm.expectRevert(IModelRegistry.NotPublisher.selector);
        registry.setPriceFloor(MODEL, 1);
        vm.expectRevert(IModelRegistry.NotPublisher.selector);
        registry.setKeyBroker(MODEL, URL);
        vm.expectRevert(IModelRegistry.NotPublisher.selector);
        registry.setAllowedMeasurements(MODEL, _measurements(1));
        vm.stopPrank();

        bytes32 registeredOnly = keccak256("registered-only");
        vm.startPrank(PUBLISHER);
        registry.register(registeredOnly, 1);
        vm.expectRevert(abi.encodeWithSelector(IModelRegistry.NotPublished.selector, registeredOnly));
        registry.setPriceFloor(registeredOnly, 1);
        vm.stopPrank();
    }

    function test_setAllowedMeasurements_emptyListStopsReleases() public {
        _publish();
        vm.prank(PUBLISHER);
        registry.setAllowedMeasurements(MODEL, new bytes32[](0));
        vm.assertEq(registry.allowedMeasurements(MODEL).length, 0);
    }

    function test_listing_unpublishedIsEmpty() public view {
        (bytes32 manifest,, uint256 floor, string memory url) = registry.listing(MODEL);
        vm.assertEq(manifest, bytes32(0));
        vm.assertEq(floor, 0);
        vm.assertEq(bytes(url).length, 0);
        vm.assertFalse(registry.isPublished(MODEL));
    }
}

/// @notice A channel for a published model pays the publisher its share on every settle.
contract PublishedModelRoyaltyTest is PaymentChannelsFixture {
    bytes32 internal constant PUBLISHED = keccak256("model/published");

    function setUp() public override {
        super.setUp();
        bytes32[] memory m = new bytes32[](1);
        m[0] = keccak256("measurement");
        vm.prank(publisher);
        registry.publish(PUBLISHED, 1_000, keccak256("manifest"), keccak256("weights"), 1, "https://b", m);
    }

    function test_settle_creditsPublisherOnEverySettle() public {
        bytes32 id = _openWith(address(token), 1_000_000, SALT, signer, PUBLISHED, 1_000);
        _settle(id, 1_000);
        vm.assertEq(channels.earnings(address(token), publisher), 100);
        vm.assertEq(channels.earnings(address(token), payee), 900);
        _settle(id, 2_505);
        vm.assertEq(channels.earnings(address(token), publisher), 250); // floor(2505 * 10%)
        vm.assertEq(channels.earnings(address(token), payee), 2_255);
    }
}
