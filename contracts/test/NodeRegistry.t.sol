// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

import {TestBase} from "./utils/TestBase.sol";
import {NodeRegistry} from "../src/NodeRegistry.sol";
import {TestToken} from "./TestToken.sol";
import {FeeOnTransferToken} from "./mocks/FeeOnTransferToken.sol";
import {MockERC1271Wallet} from "./mocks/MockERC1271Wallet.sol";
import {INodeRegistry} from "../src/interfaces/INodeRegistry.sol";

/// @dev Shared fixture: an ERC-20-staked registry, an ETH-staked one, a node key and its operator.
abstract contract NodeRegistryFixture is TestBase {
    uint256 internal constant MIN_STAKE = 100e18;
    uint256 internal constant MIN_ETH_STAKE = 1 ether;
    uint64 internal constant UNBONDING = 7 days;
    uint64 internal constant EPOCH = 1 hours;

    uint256 internal constant NODE_KEY = 0xA11CE;
    uint256 internal constant OTHER_KEY = 0xB0B;
    uint256 internal constant OPERATOR_KEY = 0x0FE2;

    NodeRegistry internal registry; // ERC-20 stake
    NodeRegistry internal ethRegistry; // ETH stake
    TestToken internal token;
    address internal node;
    address internal operator;
    address internal constant OWNER = address(0x0A11);
    address internal constant SLASHER = address(0x5A5A);
    address internal constant STRANGER = address(0xBAD);
    address internal constant VICTIM = address(0xC11E);

    function setUp() public virtual {
        vm.warp(1_700_000_000);
        node = vm.addr(NODE_KEY);
        operator = vm.addr(OPERATOR_KEY);
        token = new TestToken("Stake", "STK");
        registry = new NodeRegistry(address(token), MIN_STAKE, UNBONDING, EPOCH, OWNER);
        ethRegistry = new NodeRegistry(address(0), MIN_ETH_STAKE, UNBONDING, EPOCH, OWNER);
        token.mint(operator, 1e30);
        vm.prank(operator);
        token.approve(address(registry), type(uint256).max);
        vm.deal(operator, 1_000 ether);
    }

    function _hpke() internal pure returns (bytes memory key) {
        key = new bytes(1216);
        for (uint256 i = 0; i < key.length; i++) {
            key[i] = bytes1(uint8(i));
        }
    }

    function _reg(NodeRegistry reg) internal view returns (INodeRegistry.Registration memory) {
        return INodeRegistry.Registration({
            node: node,
            operator: operator,
            endpoint: "https://node.example:8443",
            peerId: hex"00240801122031a9",
            hpkePublicKey: _hpke(),
            attestationHash: keccak256("attestation-1"),
            teeType: 1,
            epoch: reg.currentEpoch(),
            deadline: block.timestamp + 1 hours
        });
    }

    function _reatt(NodeRegistry reg, bytes32 attestationHash)
        internal
        view
        returns (INodeRegistry.Reattestation memory)
    {
        return INodeRegistry.Reattestation({
            node: node,
            endpoint: "https://node.example:8443",
            peerId: hex"00240801122031a9",
            attestationHash: attestationHash,
            epoch: reg.currentEpoch(),
            deadline: block.timestamp + 1 hours
        });
    }

    function _signReg(NodeRegistry reg, uint256 key, INodeRegistry.Registration memory r)
        internal
        view
        returns (bytes memory)
    {
        return _sign(key, reg.hashRegistration(r));
    }

    function _signReatt(NodeRegistry reg, uint256 key, INodeRegistry.Reattestation memory r)
        internal
        view
        returns (bytes memory)
    {
        return _sign(key, reg.hashReattestation(r));
    }

    function _register() internal returns (INodeRegistry.Registration memory r) {
        r = _reg(registry);
        bytes memory sig = _signReg(registry, NODE_KEY, r);
        vm.prank(operator);
        registry.register(r, MIN_STAKE, sig);
    }

    function _registerEth(uint256 stake) internal {
        INodeRegistry.Registration memory r = _reg(ethRegistry);
        bytes memory sig = _signReg(ethRegistry, NODE_KEY, r);
        vm.prank(operator);
        ethRegistry.register{value: stake}(r, stake, sig);
    }

    function _nextEpoch(NodeRegistry reg) internal {
        vm.warp(reg.nextEpochAt());
        reg.advanceEpoch();
    }

    function _setSlasher(NodeRegistry reg) internal {
        vm.prank(OWNER);
        reg.setSlasher(SLASHER);
    }
}

contract NodeRegistryTest is NodeRegistryFixture {
    // ------------------------------------------------------------ constructor

    function test_constructor_setsConfigAndFirstEpoch() public view {
        vm.assertEq(registry.stakeToken(), address(token));
        vm.assertEq(registry.minStake(), MIN_STAKE);
        vm.assertEq(uint256(registry.unbondingDelay()), UNBONDING);
        vm.assertEq(uint256(registry.epochLength()), EPOCH);
        vm.assertEq(registry.owner(), OWNER);
        vm.assertEq(uint256(registry.epochIndex()), 0);
        vm.assertNotEq(registry.currentEpoch(), bytes32(0));
        vm.assertEq(registry.previousEpoch(), bytes32(0));
        vm.assertEq(uint256(registry.nextEpochAt()), block.timestamp + EPOCH);
        vm.assertNotEq(registry.currentEpoch(), ethRegistry.currentEpoch()); // bound to the contract
    }

    function test_constructor_revertsOnBadConfig() public {
        vm.expectRevert(INodeRegistry.InvalidMinStake.selector);
        new NodeRegistry(address(token), 0, UNBONDING, EPOCH, OWNER);
        vm.expectRevert(INodeRegistry.InvalidMinStake.selector);
        new NodeRegistry(address(token), uint256(type(uint128).max) + 1, UNBONDING, EPOCH, OWNER);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.InvalidUnbondingDelay.selector, uint64(366 days)));
        new NodeRegistry(address(token), 1, 366 days, EPOCH, OWNER);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.InvalidEpochLength.selector, uint64(0)));
        new NodeRegistry(address(token), 1, UNBONDING, 0, OWNER);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.InvalidEpochLength.selector, uint64(31 days)));
        new NodeRegistry(address(token), 1, UNBONDING, 31 days, OWNER);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableInvalidOwner.selector, address(0)));
        new NodeRegistry(address(token), 1, UNBONDING, EPOCH, address(0));
    }

    // ------------------------------------------------------------ EIP-712

    function test_hashRegistration_matchesEip712Spec() public view {
        INodeRegistry.Registration memory r = _reg(registry);
        bytes32 domain = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256("NodeRegistry"),
                keccak256("1"),
                block.chainid,
                address(registry)
            )
        );
        bytes32 structHash = keccak256(
            abi.encode(
                keccak256(
                    "Registration(address node,address operator,string endpoint,bytes peerId,bytes hpkePublicKey,bytes32 attestationHash,uint8 teeType,bytes32 epoch,uint256 deadline)"
                ),
                r.node,
                r.operator,
                keccak256(bytes(r.endpoint)),
                keccak256(r.peerId),
                keccak256(r.hpkePublicKey),
                r.attestationHash,
                uint256(r.teeType),
                r.epoch,
                r.deadline
            )
        );
        vm.assertEq(registry.hashRegistration(r), keccak256(abi.encodePacked("\x19\x01", domain, structHash)));
    }

    function test_hashReattestation_matchesEip712Spec() public view {
        INodeRegistry.Reattestation memory r = _reatt(registry, keccak256("a"));
        bytes32 domain = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256("NodeRegistry"),
                keccak256("1"),
                block.chainid,
                address(registry)
            )
        );
        bytes32 structHash = keccak256(
            abi.encode(
                keccak256(
                    "Reattestation(address node,string endpoint,bytes peerId,bytes32 attestationHash,bytes32 epoch,uint256 deadline)"
                ),
                r.node,
                keccak256(bytes(r.endpoint)),
                keccak256(r.peerId),
                r.attestationHash,
                r.epoch,
                r.deadline
            )
        );
        vm.assertEq(registry.hashReattestation(r), keccak256(abi.encodePacked("\x19\x01", domain, structHash)));
    }

    // ------------------------------------------------------------ register

    function test_register_erc20_storesRecordPullsStakeAndEmits() public {
        INodeRegistry.Registration memory r = _reg(registry);
        bytes memory sig = _signReg(registry, NODE_KEY, r);
        vm.expectEmit(address(registry));
        emit INodeRegistry.NodeRegistered(
            node, operator, r.endpoint, r.peerId, r.hpkePublicKey, r.attestationHash, 1, 0, MIN_STAKE + 5
        );
        vm.prank(operator);
        registry.register(r, MIN_STAKE + 5, sig);

        INodeRegistry.Node memory n = registry.getNode(node);
        vm.assertEq(n.operator, operator);
        vm.assertEq(uint256(n.teeType), 1);
        vm.assertTrue(n.status == INodeRegistry.Status.Active);
        vm.assertEq(uint256(n.registeredAt), block.timestamp);
        vm.assertEq(uint256(n.attestedAt), block.timestamp);
        vm.assertEq(uint256(n.epochIndex), 0);
        vm.assertEq(n.epoch, r.epoch);
        vm.assertEq(n.attestationHash, r.attestationHash);
        vm.assertEq(uint256(n.stake), MIN_STAKE + 5);
        vm.assertEq(uint256(n.slashed), 0);
        vm.assertEq(n.hpkeKeyHash, keccak256(r.hpkePublicKey));
        vm.assertTrue(registry.isActive(node));
        vm.assertEq(token.balanceOf(address(registry)), MIN_STAKE + 5);
        vm.assertTrue(registry.digestUsed(registry.hashRegistration(r)));
    }

    function test_register_eth() public {
        uint256 before = operator.balance;
        _registerEth(2 ether);
        vm.assertEq(address(ethRegistry).balance, 2 ether);
        vm.assertEq(operator.balance, before - 2 ether);
        vm.assertTrue(ethRegistry.isActive(node));
    }

    function test_register_acceptsPreviousEpoch() public {
        INodeRegistry.Registration memory r = _reg(registry);
        bytes memory sig = _signReg(registry, NODE_KEY, r);
        _nextEpoch(registry); // signed just before the bump
        r.deadline = block.timestamp + 1; // (re-sign: the deadline moved with the warp)
        sig = _signReg(registry, NODE_KEY, r);
        vm.prank(operator);
        registry.register(r, MIN_STAKE, sig);
        vm.assertEq(uint256(registry.getNode(node).epochIndex), 0);
    }

    function test_register_acceptsErc1271Node() public {
        MockERC1271Wallet wallet = new MockERC1271Wallet(vm.addr(NODE_KEY));
        INodeRegistry.Registration memory r = _reg(registry);
        r.node = address(wallet);
        bytes memory sig = _signReg(registry, NODE_KEY, r);
        vm.prank(operator);
        registry.register(r, MIN_STAKE, sig);
        vm.assertTrue(registry.isActive(address(wallet)));
    }

    function test_register_revertsWhenSignedByAnotherKey() public {
        INodeRegistry.Registration memory r = _reg(registry);
        bytes memory sig = _signReg(registry, OTHER_KEY, r);
        vm.expectRevert(INodeRegistry.InvalidSignature.selector);
        vm.prank(operator);
        registry.register(r, MIN_STAKE, sig);
    }

    function test_register_revertsWhenSignedByTheOperatorItself() public {
        INodeRegistry.Registration memory r = _reg(registry);
        bytes memory sig = _signReg(registry, OPERATOR_KEY, r);
        vm.expectRevert(INodeRegistry.InvalidSignature.selector);
        vm.prank(operator);
        registry.register(r, MIN_STAKE, sig);
    }

    function test_register_revertsOnMalformedOrHighSSignature() public {
        INodeRegistry.Registration memory r = _reg(registry);
        bytes memory highS = _highS(NODE_KEY, registry.hashRegistration(r));
        vm.startPrank(operator);
        vm.expectRevert(INodeRegistry.InvalidSignature.selector);
        registry.register(r, MIN_STAKE, hex"1234");
        vm.expectRevert(INodeRegistry.InvalidSignature.selector);
        registry.register(r, MIN_STAKE, highS);
        vm.stopPrank();
    }

    function test_register_revertsOnAnyTamperedField() public {
        INodeRegistry.Registration memory r = _reg(registry);
        bytes memory sig = _signReg(registry, NODE_KEY, r);
        vm.startPrank(operator);
        r.endpoint = "https://evil.example";
        vm.expectRevert(INodeRegistry.InvalidSignature.selector);
        registry.register(r, MIN_STAKE, sig);
        r = _reg(registry);
        r.attestationHash = keccak256("other");
        vm.expectRevert(INodeRegistry.InvalidSignature.selector);
        registry.register(r, MIN_STAKE, sig);
        r = _reg(registry);
        r.teeType = 2;
        vm.expectRevert(INodeRegistry.InvalidSignature.selector);
        registry.register(r, MIN_STAKE, sig);
        r = _reg(registry);
        r.hpkePublicKey[0] = 0xff;
        vm.expectRevert(INodeRegistry.InvalidSignature.selector);
        registry.register(r, MIN_STAKE, sig);
        vm.stopPrank();
    }

    function test_register_revertsWhenCallerIsNotTheSignedOperator() public {
        INodeRegistry.Registration memory r = _reg(registry);
        bytes memory sig = _signReg(registry, NODE_KEY, r);
        vm.expectRevert(INodeRegistry.NotOperator.selector);
        vm.prank(STRANGER);
        registry.register(r, MIN_STAKE, sig);
        // Rewriting the operator to the caller breaks the node's signature.
        r.operator = STRANGER;
        vm.expectRevert(INodeRegistry.InvalidSignature.selector);
        vm.prank(STRANGER);
        registry.register(r, MIN_STAKE, sig);
    }

    function test_register_revertsOnStaleEpoch() public {
        INodeRegistry.Registration memory r = _reg(registry);
        _nextEpoch(registry);
        _nextEpoch(registry); // two bumps: r.epoch is neither current nor previous
        r.deadline = block.timestamp + 1;
        bytes memory sig = _signReg(registry, NODE_KEY, r);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.StaleEpoch.selector, r.epoch));
        vm.prank(operator);
        registry.register(r, MIN_STAKE, sig);
    }

    function test_register_revertsOnUnknownOrZeroEpoch() public {
        INodeRegistry.Registration memory r = _reg(registry);
        vm.startPrank(operator);
        r.epoch = keccak256("made up");
        bytes memory sig = _signReg(registry, NODE_KEY, r);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.StaleEpoch.selector, r.epoch));
        registry.register(r, MIN_STAKE, sig);
        r.epoch = bytes32(0); // the "previous" value of epoch 0
        sig = _signReg(registry, NODE_KEY, r);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.StaleEpoch.selector, bytes32(0)));
        registry.register(r, MIN_STAKE, sig);
        vm.stopPrank();
    }

    function test_register_revertsAfterDeadline() public {
        INodeRegistry.Registration memory r = _reg(registry);
        bytes memory sig = _signReg(registry, NODE_KEY, r);
        vm.warp(r.deadline + 1);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.SignatureExpired.selector, r.deadline));
        vm.prank(operator);
        registry.register(r, MIN_STAKE, sig);
    }

    function test_register_revertsBelowMinStake() public {
        INodeRegistry.Registration memory r = _reg(registry);
        bytes memory sig = _signReg(registry, NODE_KEY, r);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.StakeBelowMinimum.selector, MIN_STAKE - 1, MIN_STAKE));
        vm.prank(operator);
        registry.register(r, MIN_STAKE - 1, sig);
    }

    function test_register_revertsAboveUint128Stake() public {
        INodeRegistry.Registration memory r = _reg(registry);
        bytes memory sig = _signReg(registry, NODE_KEY, r);
        vm.expectRevert(INodeRegistry.StakeOverflow.selector);
        vm.prank(operator);
        registry.register(r, uint256(type(uint128).max) + 1, sig);
    }

    function test_register_revertsOnWrongMsgValue() public {
        INodeRegistry.Registration memory r = _reg(ethRegistry);
        bytes memory sig = _signReg(ethRegistry, NODE_KEY, r);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.InvalidMsgValue.selector, 1 ether, 2 ether));
        vm.prank(operator);
        ethRegistry.register{value: 1 ether}(r, 2 ether, sig);

        r = _reg(registry);
        sig = _signReg(registry, NODE_KEY, r);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.InvalidMsgValue.selector, 1, 0));
        vm.prank(operator);
        registry.register{value: 1}(r, MIN_STAKE, sig);
    }

    function test_register_revertsWithoutAllowance() public {
        INodeRegistry.Registration memory r = _reg(registry);
        bytes memory sig = _signReg(registry, NODE_KEY, r);
        vm.prank(operator);
        token.approve(address(registry), 0);
        vm.expectRevert();
        vm.prank(operator);
        registry.register(r, MIN_STAKE, sig);
    }

    function test_register_revertsOnFeeOnTransferToken() public {
        FeeOnTransferToken fee = new FeeOnTransferToken();
        NodeRegistry reg = new NodeRegistry(address(fee), MIN_STAKE, UNBONDING, EPOCH, OWNER);
        fee.mint(operator, MIN_STAKE * 2);
        vm.prank(operator);
        fee.approve(address(reg), type(uint256).max);
        INodeRegistry.Registration memory r = _reg(reg);
        bytes memory sig = _signReg(reg, NODE_KEY, r);
        vm.expectRevert(INodeRegistry.FeeOnTransferToken.selector);
        vm.prank(operator);
        reg.register(r, MIN_STAKE, sig);
    }

    function test_register_revertsWhenAlreadyRegistered() public {
        _register();
        INodeRegistry.Registration memory r = _reg(registry);
        r.attestationHash = keccak256("second");
        bytes memory sig = _signReg(registry, NODE_KEY, r);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.AlreadyRegistered.selector, node));
        vm.prank(operator);
        registry.register(r, MIN_STAKE, sig);
        // Still refused while exiting.
        vm.prank(operator);
        registry.requestExit(node);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.AlreadyRegistered.selector, node));
        vm.prank(operator);
        registry.register(r, MIN_STAKE, sig);
    }

    function test_register_revertsOnInvalidFields() public {
        INodeRegistry.Registration memory r;
        vm.startPrank(operator);

        r = _reg(registry);
        r.node = address(0);
        vm.expectRevert(INodeRegistry.InvalidNode.selector);
        registry.register(r, MIN_STAKE, "");

        r = _reg(registry);
        r.endpoint = "";
        vm.expectRevert(INodeRegistry.InvalidEndpoint.selector);
        registry.register(r, MIN_STAKE, "");

        r = _reg(registry);
        r.endpoint = string(new bytes(257));
        vm.expectRevert(INodeRegistry.InvalidEndpoint.selector);
        registry.register(r, MIN_STAKE, "");

        r = _reg(registry);
        r.peerId = "";
        vm.expectRevert(INodeRegistry.InvalidPeerId.selector);
        registry.register(r, MIN_STAKE, "");

        r = _reg(registry);
        r.peerId = new bytes(129);
        vm.expectRevert(INodeRegistry.InvalidPeerId.selector);
        registry.register(r, MIN_STAKE, "");

        r = _reg(registry);
        r.hpkePublicKey = new bytes(32);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.InvalidHpkeKey.selector, uint256(32)));
        registry.register(r, MIN_STAKE, "");

        r = _reg(registry);
        r.attestationHash = bytes32(0);
        vm.expectRevert(INodeRegistry.InvalidAttestationHash.selector);
        registry.register(r, MIN_STAKE, "");

        r = _reg(registry);
        r.teeType = 0;
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.InvalidTeeType.selector, uint8(0)));
        registry.register(r, MIN_STAKE, "");
        r.teeType = 4;
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.InvalidTeeType.selector, uint8(4)));
        registry.register(r, MIN_STAKE, "");
        vm.stopPrank();
    }

    function test_register_againAfterWithdrawal_withFreshSignatureOnly() public {
        INodeRegistry.Registration memory first = _register();
        bytes memory firstSig = _signReg(registry, NODE_KEY, first);
        vm.prank(operator);
        registry.requestExit(node);
        vm.warp(block.timestamp + UNBONDING);
        vm.prank(operator);
        registry.withdrawStake(node);
        _nextEpoch(registry);
        _nextEpoch(registry);

        // The old message is dead: its epoch is stale (and even within it the digest is consumed).
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.StaleEpoch.selector, first.epoch));
        vm.prank(operator);
        registry.register(first, MIN_STAKE, firstSig);

        INodeRegistry.Registration memory again = _reg(registry);
        bytes memory againSig = _signReg(registry, NODE_KEY, again);
        vm.prank(operator);
        registry.register(again, MIN_STAKE, againSig);
        INodeRegistry.Node memory n = registry.getNode(node);
        vm.assertTrue(n.status == INodeRegistry.Status.Active);
        vm.assertEq(uint256(n.unbondingEndsAt), 0);
        vm.assertEq(uint256(n.stake), MIN_STAKE);
    }

    function test_register_replayInSameEpochAfterWithdrawal_reverts() public {
        ethRegistry = new NodeRegistry(address(0), MIN_ETH_STAKE, 0, EPOCH, OWNER); // no unbonding delay
        INodeRegistry.Registration memory r = _reg(ethRegistry);
        bytes memory sig = _signReg(ethRegistry, NODE_KEY, r);
        vm.startPrank(operator);
        ethRegistry.register{value: 1 ether}(r, 1 ether, sig);
        ethRegistry.requestExit(node);
        ethRegistry.withdrawStake(node);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.SignatureReused.selector, ethRegistry.hashRegistration(r)));
        ethRegistry.register{value: 1 ether}(r, 1 ether, sig);
        vm.stopPrank();
    }

    // ------------------------------------------------------------ epochs

    function test_advanceEpoch_revertsBeforeEpochLength() public {
        vm.warp(block.timestamp + EPOCH - 1);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.EpochNotOver.selector, registry.nextEpochAt()));
        registry.advanceEpoch();
    }

    function test_advanceEpoch_rotatesValues() public {
        bytes32 first = registry.currentEpoch();
        vm.warp(registry.nextEpochAt());
        vm.recordLogs();
        vm.prank(STRANGER); // anyone
        registry.advanceEpoch();
        vm.assertEq(vm.getRecordedLogs().length, 1);
        vm.assertEq(uint256(registry.epochIndex()), 1);
        vm.assertEq(registry.previousEpoch(), first);
        vm.assertNotEq(registry.currentEpoch(), first);
        vm.assertEq(uint256(registry.epochStartedAt()), block.timestamp);
        vm.assertEq(uint256(registry.nextEpochAt()), block.timestamp + EPOCH);
    }

    // ------------------------------------------------------------ reattest

    function test_reattest_updatesAttestationEndpointAndPeer() public {
        _register();
        _nextEpoch(registry);
        INodeRegistry.Reattestation memory a = _reatt(registry, keccak256("attestation-2"));
        a.endpoint = "https://moved.example";
        a.peerId = hex"0024beef";
        bytes memory sig = _signReatt(registry, NODE_KEY, a);
        vm.expectEmit(address(registry));
        emit INodeRegistry.NodeReattested(node, a.attestationHash, 1, a.endpoint, a.peerId);
        vm.prank(STRANGER); // anyone may relay: the node's signature is the authority
        registry.reattest(a, sig);
        INodeRegistry.Node memory n = registry.getNode(node);
        vm.assertEq(n.attestationHash, a.attestationHash);
        vm.assertEq(n.epoch, a.epoch);
        vm.assertEq(uint256(n.epochIndex), 1);
        vm.assertEq(uint256(n.attestedAt), block.timestamp);
        vm.assertEq(n.hpkeKeyHash, keccak256(_hpke())); // unchanged
    }

    function test_reattest_sameEpochWithNewAttestation() public {
        _register();
        INodeRegistry.Reattestation memory a = _reatt(registry, keccak256("restart"));
        registry.reattest(a, _signReatt(registry, NODE_KEY, a));
        vm.assertEq(registry.getNode(node).attestationHash, keccak256("restart"));
    }

    function test_reattest_revertsOnReplay() public {
        _register();
        INodeRegistry.Reattestation memory a = _reatt(registry, keccak256("attestation-2"));
        bytes memory sig = _signReatt(registry, NODE_KEY, a);
        registry.reattest(a, sig);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.SignatureReused.selector, registry.hashReattestation(a)));
        registry.reattest(a, sig);
    }

    function test_reattest_revertsOnStaleEpoch() public {
        _register();
        INodeRegistry.Reattestation memory a = _reatt(registry, keccak256("late"));
        _nextEpoch(registry);
        _nextEpoch(registry);
        a.deadline = block.timestamp + 1;
        bytes memory sig = _signReatt(registry, NODE_KEY, a);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.StaleEpoch.selector, a.epoch));
        registry.reattest(a, sig);
    }

    function test_reattest_revertsWhenOlderThanLastAttestation() public {
        INodeRegistry.Reattestation memory old = _reatt(registry, keccak256("old"));
        bytes memory oldSig = _signReatt(registry, NODE_KEY, old);
        _register();
        _nextEpoch(registry);
        INodeRegistry.Reattestation memory fresh = _reatt(registry, keccak256("fresh"));
        registry.reattest(fresh, _signReatt(registry, NODE_KEY, fresh));
        // `old` names the previous epoch (still accepted in general) but the node moved past it.
        old.deadline = block.timestamp + 1;
        oldSig = _signReatt(registry, NODE_KEY, old);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.EpochNotNewer.selector, uint64(0), uint64(1)));
        registry.reattest(old, oldSig);
    }

    function test_reattest_revertsWhenSignedByAnotherKey() public {
        _register();
        INodeRegistry.Reattestation memory a = _reatt(registry, keccak256("x"));
        bytes memory sig = _signReatt(registry, OPERATOR_KEY, a);
        vm.expectRevert(INodeRegistry.InvalidSignature.selector);
        registry.reattest(a, sig);
    }

    function test_reattest_revertsAfterDeadline() public {
        _register();
        INodeRegistry.Reattestation memory a = _reatt(registry, keccak256("x"));
        bytes memory sig = _signReatt(registry, NODE_KEY, a);
        vm.warp(a.deadline + 1);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.SignatureExpired.selector, a.deadline));
        registry.reattest(a, sig);
    }

    function test_reattest_revertsWhenNotActive() public {
        INodeRegistry.Reattestation memory a = _reatt(registry, keccak256("x"));
        bytes memory sig = _signReatt(registry, NODE_KEY, a);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.NotActive.selector, node));
        registry.reattest(a, sig);
        _register();
        vm.prank(operator);
        registry.requestExit(node);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.NotActive.selector, node));
        registry.reattest(a, sig);
    }

    function test_reattest_revertsOnInvalidFields() public {
        _register();
        INodeRegistry.Reattestation memory a = _reatt(registry, bytes32(0));
        vm.expectRevert(INodeRegistry.InvalidAttestationHash.selector);
        registry.reattest(a, "");
        a = _reatt(registry, keccak256("x"));
        a.endpoint = "";
        vm.expectRevert(INodeRegistry.InvalidEndpoint.selector);
        registry.reattest(a, "");
        a = _reatt(registry, keccak256("x"));
        a.peerId = "";
        vm.expectRevert(INodeRegistry.InvalidPeerId.selector);
        registry.reattest(a, "");
    }

    // ------------------------------------------------------------ addStake

    function test_addStake_increasesStakeAndEmits() public {
        _register();
        vm.expectEmit(address(registry));
        emit INodeRegistry.StakeAdded(node, 7, MIN_STAKE + 7);
        vm.prank(operator);
        registry.addStake(node, 7);
        vm.assertEq(uint256(registry.getNode(node).stake), MIN_STAKE + 7);
        vm.assertEq(token.balanceOf(address(registry)), MIN_STAKE + 7);
    }

    function test_addStake_eth() public {
        _registerEth(1 ether);
        vm.prank(operator);
        ethRegistry.addStake{value: 3}(node, 3);
        vm.assertEq(uint256(ethRegistry.getNode(node).stake), 1 ether + 3);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.InvalidMsgValue.selector, 2, 3));
        vm.prank(operator);
        ethRegistry.addStake{value: 2}(node, 3);
    }

    function test_addStake_reverts() public {
        vm.expectRevert(INodeRegistry.NotOperator.selector);
        vm.prank(operator);
        registry.addStake(node, 1); // unknown node
        _register();
        vm.expectRevert(INodeRegistry.NotOperator.selector);
        vm.prank(STRANGER);
        registry.addStake(node, 1);
        vm.expectRevert(INodeRegistry.ZeroAmount.selector);
        vm.prank(operator);
        registry.addStake(node, 0);
        vm.expectRevert(INodeRegistry.StakeOverflow.selector);
        vm.prank(operator);
        registry.addStake(node, type(uint128).max);
        vm.prank(operator);
        registry.requestExit(node);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.NotActive.selector, node));
        vm.prank(operator);
        registry.addStake(node, 1);
    }

    // ------------------------------------------------------------ exit and withdrawal

    function test_requestExit_startsUnbonding() public {
        _register();
        uint64 endsAt = uint64(block.timestamp) + UNBONDING;
        vm.expectEmit(address(registry));
        emit INodeRegistry.ExitRequested(node, endsAt);
        vm.prank(operator);
        registry.requestExit(node);
        INodeRegistry.Node memory n = registry.getNode(node);
        vm.assertTrue(n.status == INodeRegistry.Status.Exiting);
        vm.assertEq(uint256(n.unbondingEndsAt), endsAt);
        vm.assertFalse(registry.isActive(node));
    }

    function test_requestExit_reverts() public {
        vm.expectRevert(INodeRegistry.NotOperator.selector);
        vm.prank(operator);
        registry.requestExit(node);
        _register();
        vm.expectRevert(INodeRegistry.NotOperator.selector);
        vm.prank(STRANGER);
        registry.requestExit(node);
        vm.prank(operator);
        registry.requestExit(node);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.NotActive.selector, node));
        vm.prank(operator);
        registry.requestExit(node);
    }

    function test_withdrawStake_onlyAfterUnbondingDelay() public {
        _register();
        vm.prank(operator);
        registry.requestExit(node);
        uint64 endsAt = uint64(block.timestamp) + UNBONDING;

        vm.warp(endsAt - 1);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.UnbondingActive.selector, endsAt));
        vm.prank(operator);
        registry.withdrawStake(node);

        vm.warp(endsAt);
        uint256 before = token.balanceOf(operator);
        vm.expectEmit(address(registry));
        emit INodeRegistry.StakeWithdrawn(node, operator, MIN_STAKE);
        vm.prank(operator);
        registry.withdrawStake(node);
        vm.assertEq(token.balanceOf(operator), before + MIN_STAKE);
        vm.assertEq(token.balanceOf(address(registry)), 0);
        INodeRegistry.Node memory n = registry.getNode(node);
        vm.assertTrue(n.status == INodeRegistry.Status.Withdrawn);
        vm.assertEq(uint256(n.stake), 0);
    }

    function test_withdrawStake_eth() public {
        _registerEth(2 ether);
        vm.prank(operator);
        ethRegistry.requestExit(node);
        vm.warp(block.timestamp + UNBONDING);
        uint256 before = operator.balance;
        vm.prank(operator);
        ethRegistry.withdrawStake(node);
        vm.assertEq(operator.balance, before + 2 ether);
        vm.assertEq(address(ethRegistry).balance, 0);
    }

    function test_withdrawStake_reverts() public {
        _register();
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.NotExiting.selector, node));
        vm.prank(operator);
        registry.withdrawStake(node); // still active
        vm.prank(operator);
        registry.requestExit(node);
        vm.warp(block.timestamp + UNBONDING);
        vm.expectRevert(INodeRegistry.NotOperator.selector);
        vm.prank(STRANGER);
        registry.withdrawStake(node);
        vm.prank(operator);
        registry.withdrawStake(node);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.NotExiting.selector, node));
        vm.prank(operator);
        registry.withdrawStake(node); // twice
    }

    // ------------------------------------------------------------ slashing

    function test_setSlasher_onceByOwner() public {
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, STRANGER));
        vm.prank(STRANGER);
        registry.setSlasher(SLASHER);
        vm.expectRevert(INodeRegistry.InvalidSlasher.selector);
        vm.prank(OWNER);
        registry.setSlasher(address(0));
        vm.expectEmit(address(registry));
        emit INodeRegistry.SlasherSet(SLASHER);
        _setSlasher(registry);
        vm.assertEq(registry.slasher(), SLASHER);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.SlasherAlreadySet.selector, SLASHER));
        vm.prank(OWNER);
        registry.setSlasher(STRANGER);
    }

    function test_slash_paysRecipientAndTracksTotal() public {
        _register();
        _setSlasher(registry);
        vm.expectEmit(address(registry));
        emit INodeRegistry.Slashed(node, VICTIM, 30e18, MIN_STAKE - 30e18);
        vm.prank(SLASHER);
        registry.slash(node, 30e18, VICTIM);
        INodeRegistry.Node memory n = registry.getNode(node);
        vm.assertEq(uint256(n.stake), MIN_STAKE - 30e18);
        vm.assertEq(uint256(n.slashed), 30e18);
        vm.assertEq(token.balanceOf(VICTIM), 30e18);
        vm.assertFalse(registry.isActive(node)); // below the minimum now
        vm.prank(operator);
        registry.addStake(node, 30e18);
        vm.assertTrue(registry.isActive(node));
    }

    function test_slash_duringUnbonding_thenWithdrawRest() public {
        _registerEth(2 ether);
        _setSlasher(ethRegistry);
        vm.prank(operator);
        ethRegistry.requestExit(node);
        vm.prank(SLASHER);
        ethRegistry.slash(node, 0.5 ether, VICTIM);
        vm.assertEq(VICTIM.balance, 0.5 ether);
        vm.warp(block.timestamp + UNBONDING);
        uint256 before = operator.balance;
        vm.prank(operator);
        ethRegistry.withdrawStake(node);
        vm.assertEq(operator.balance, before + 1.5 ether);
    }

    function test_slash_wholeStake() public {
        _register();
        _setSlasher(registry);
        vm.prank(SLASHER);
        registry.slash(node, MIN_STAKE, VICTIM);
        vm.assertEq(uint256(registry.getNode(node).stake), 0);
    }

    function test_slash_reverts() public {
        _register();
        vm.expectRevert(INodeRegistry.NotSlasher.selector);
        vm.prank(SLASHER); // not set yet
        registry.slash(node, 1, VICTIM);
        _setSlasher(registry);
        vm.expectRevert(INodeRegistry.NotSlasher.selector);
        vm.prank(OWNER);
        registry.slash(node, 1, VICTIM);
        vm.expectRevert(INodeRegistry.NotSlasher.selector);
        vm.prank(operator);
        registry.slash(node, 1, VICTIM);

        vm.startPrank(SLASHER);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.SlashExceedsStake.selector, MIN_STAKE + 1, MIN_STAKE));
        registry.slash(node, MIN_STAKE + 1, VICTIM);
        vm.expectRevert(INodeRegistry.ZeroAmount.selector);
        registry.slash(node, 0, VICTIM);
        vm.expectRevert(INodeRegistry.InvalidRecipient.selector);
        registry.slash(node, 1, address(0));
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.NotSlashable.selector, STRANGER));
        registry.slash(STRANGER, 1, VICTIM); // unknown node
        vm.stopPrank();

        vm.prank(operator);
        registry.requestExit(node);
        vm.warp(block.timestamp + UNBONDING);
        vm.prank(operator);
        registry.withdrawStake(node);
        vm.expectRevert(abi.encodeWithSelector(INodeRegistry.NotSlashable.selector, node));
        vm.prank(SLASHER);
        registry.slash(node, 1, VICTIM); // never after withdrawal
    }

    // ------------------------------------------------------------ views

    function test_views_unknownNode() public view {
        INodeRegistry.Node memory n = registry.getNode(STRANGER);
        vm.assertEq(n.operator, address(0));
        vm.assertTrue(n.status == INodeRegistry.Status.None);
        vm.assertFalse(registry.isActive(STRANGER));
    }
}

/// @dev Property tests over stakes, delays, keys and slash amounts.
contract NodeRegistryFuzzTest is NodeRegistryFixture {
    function testFuzz_register_anyStakeAtOrAboveMinimum(uint256 stake) public {
        stake = bound(stake, 0, 1e30);
        INodeRegistry.Registration memory r = _reg(registry);
        bytes memory sig = _signReg(registry, NODE_KEY, r);
        if (stake < MIN_STAKE) {
            vm.expectRevert(abi.encodeWithSelector(INodeRegistry.StakeBelowMinimum.selector, stake, MIN_STAKE));
        }
        vm.prank(operator);
        registry.register(r, stake, sig);
        if (stake >= MIN_STAKE) {
            vm.assertEq(uint256(registry.getNode(node).stake), stake);
            vm.assertEq(token.balanceOf(address(registry)), stake);
        }
    }

    function testFuzz_register_refusesEveryOtherSigner(uint256 key) public {
        key = bound(key, 1, SECP256K1_N - 1);
        vm.assume(key != NODE_KEY);
        INodeRegistry.Registration memory r = _reg(registry);
        bytes memory sig = _signReg(registry, key, r);
        vm.expectRevert(INodeRegistry.InvalidSignature.selector);
        vm.prank(operator);
        registry.register(r, MIN_STAKE, sig);
    }

    function testFuzz_withdraw_releasesOnlyAfterDelay(uint64 delay, uint64 wait, uint96 stake) public {
        delay = uint64(bound(delay, 0, 365 days));
        wait = uint64(bound(wait, 0, 400 days));
        uint256 amount = bound(stake, MIN_ETH_STAKE, 100 ether);
        ethRegistry = new NodeRegistry(address(0), MIN_ETH_STAKE, delay, EPOCH, OWNER);
        _registerEth(amount);
        vm.prank(operator);
        ethRegistry.requestExit(node);
        uint64 endsAt = uint64(block.timestamp) + delay;
        vm.warp(block.timestamp + wait);
        uint256 before = operator.balance;
        if (wait < delay) vm.expectRevert(abi.encodeWithSelector(INodeRegistry.UnbondingActive.selector, endsAt));
        vm.prank(operator);
        ethRegistry.withdrawStake(node);
        vm.assertEq(operator.balance, wait < delay ? before : before + amount);
    }

    function testFuzz_slash_neverBeyondStake(uint256 stake, uint256 first, uint256 second) public {
        stake = bound(stake, MIN_STAKE, 1e27);
        first = bound(first, 1, stake);
        second = bound(second, 1, 1e28);
        INodeRegistry.Registration memory r = _reg(registry);
        bytes memory sig = _signReg(registry, NODE_KEY, r);
        vm.prank(operator);
        registry.register(r, stake, sig);
        _setSlasher(registry);
        vm.prank(SLASHER);
        registry.slash(node, first, VICTIM);
        uint256 left = stake - first;
        if (second > left) {
            vm.expectRevert(abi.encodeWithSelector(INodeRegistry.SlashExceedsStake.selector, second, left));
        }
        vm.prank(SLASHER);
        registry.slash(node, second, VICTIM);
        uint256 taken = second > left ? first : first + second;
        vm.assertEq(token.balanceOf(VICTIM), taken);
        vm.assertEq(uint256(registry.getNode(node).slashed), taken);
        vm.assertEq(token.balanceOf(address(registry)), stake - taken);
    }

    function testFuzz_epoch_onlyCurrentOrPreviousAccepted(uint8 bumps) public {
        bumps = uint8(bound(bumps, 0, 4));
        INodeRegistry.Registration memory r = _reg(registry);
        for (uint256 i = 0; i < bumps; i++) {
            _nextEpoch(registry);
        }
        r.deadline = block.timestamp + 1;
        bytes memory sig = _signReg(registry, NODE_KEY, r);
        if (bumps >= 2) vm.expectRevert(abi.encodeWithSelector(INodeRegistry.StaleEpoch.selector, r.epoch));
        vm.prank(operator);
        registry.register(r, MIN_STAKE, sig);
    }
}
