// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {SLACourt} from "../src/SLACourt.sol";
import {NodeRegistry} from "../src/NodeRegistry.sol";
import {PaymentChannels} from "../src/PaymentChannels.sol";
import {SLACourtFixture} from "./SLACourt.t.sol";

/// @dev Drives the court with a sloppy node (NODE_KEY: slow receipts, sometimes silent) and an honest node
///      (NODE2_KEY: fast receipts, always answers its disputes), and a client that replays everything.
contract SLACourtHandler {
    SLACourtFixtureView internal immutable f;
    SLACourt internal immutable court;
    bytes32[] public honestDisputes;
    uint256 public paidToClient; // ghost: everything the court ever paid out of stakes
    uint256 public breachPaidCount;
    mapping(bytes32 => uint256) public paidPerRequest;
    uint256 public doublePaid;

    constructor(SLACourtFixtureView f_, SLACourt court_) {
        f = f_;
        court = court_;
    }

    function publish(uint32 ttft, uint128 comp) external {
        f.publishFor(f.node(), ttft % 5_000 + 1, comp % 100e18);
    }

    function warp(uint32 dt) external {
        f.warpBy(dt % 2 hours);
    }

    function claim(uint8 reqSeed, uint32 ttft, bool honest) external {
        bytes32 req = keccak256(abi.encode("req", reqSeed));
        address n = honest ? f.node2() : f.node();
        (SLACourt.Receipt memory r, bytes memory sig) = f.signedReceipt(honest, req, honest ? 100 : ttft % 10_000);
        try court.claimBreach(n, f.paramsOf(address(this)), r, sig) returns (uint256 amount) {
            paidToClient += amount;
            if (paidPerRequest[keccak256(abi.encode(n, req))]++ != 0) doublePaid++;
        } catch {}
    }

    function open(uint8 reqSeed, bool honest) external {
        bytes32 req = keccak256(abi.encode("open", reqSeed));
        (SLACourt.Acceptance memory a, bytes memory sig) = f.signedAcceptance(honest, req);
        f.warpTo(a.deadline + 1);
        address n = honest ? f.node2() : f.node();
        try court.openNoResponse{value: 0}(n, f.model(), f.paramsOf(address(this)), a, sig) returns (bytes32 id) {
            if (honest) {
                (SLACourt.Receipt memory r, bytes memory rs) = f.signedReceipt(true, req, 100);
                court.answer(id, r, rs); // the honest node answers at once
                honestDisputes.push(id);
            }
        } catch {}
    }

    function finalize(uint8 reqSeed, bool honest) external {
        bytes32 req = keccak256(abi.encode("open", reqSeed));
        address n = honest ? f.node2() : f.node();
        try court.finalize(court.disputeId(n, req)) returns (uint256 amount) {
            paidToClient += amount;
        } catch {}
    }

    function honestCount() external view returns (uint256) {
        return honestDisputes.length;
    }
}

interface SLACourtFixtureView {
    function node() external view returns (address);
    function node2() external view returns (address);
    function model() external view returns (bytes32);
    function paramsOf(address payer) external view returns (PaymentChannels.ChannelParams memory);
    function publishFor(address n, uint32 ttft, uint128 comp) external;
    function warpBy(uint256 dt) external;
    function warpTo(uint256 t) external;
    function signedReceipt(bool honest, bytes32 req, uint32 ttft)
        external
        returns (SLACourt.Receipt memory, bytes memory);
    function signedAcceptance(bool honest, bytes32 req) external returns (SLACourt.Acceptance memory, bytes memory);
}

contract SLACourtInvariants is SLACourtFixture {
    SLACourtHandler internal handler;

    function setUp() public override {
        super.setUp();
        _rewire(); // zero bond for the fuzzer; the bond's flow is covered by the unit tests
        _publish(node, _terms());
        _publish(node2, _terms());
        vm.warp(block.timestamp + 2 hours);
        handler = new SLACourtHandler(SLACourtFixtureView(address(this)), court);
        targetContract(address(handler));
    }

    /// @dev The fixture's court is the registry's slasher; the invariant court replaces it on a fresh registry.
    function _rewire() internal {
        registry = new NodeRegistry(address(token), 100e18, 7 days, 1 hours, OWNER);
        court = new SLACourt(registry, address(escrow), 0);
        vm.prank(OWNER);
        registry.setSlasher(address(court));
        vm.prank(operator);
        token.approve(address(registry), type(uint256).max);
        _register(NODE_KEY);
        _register(NODE2_KEY);
    }

    // ---- hooks for the handler (the fixture owns the keys and cheatcodes)
    function model() external pure returns (bytes32) {
        return MODEL;
    }

    function paramsOf(address payer) external view returns (PaymentChannels.ChannelParams memory) {
        return _params(payer);
    }

    function publishFor(address n, uint32 ttft, uint128 comp) external {
        SLACourt.Terms memory t = _terms();
        t.maxTtftMs = ttft;
        t.breachFixed = comp;
        t.noResponseCompensation = comp;
        vm.prank(operator);
        court.publishTerms(n, MODEL, t);
    }

    function warpBy(uint256 dt) external {
        vm.warp(block.timestamp + dt);
    }

    function warpTo(uint256 t) external {
        if (t > block.timestamp) vm.warp(t);
    }

    function signedReceipt(bool honest, bytes32 req, uint32 ttft)
        external
        view
        returns (SLACourt.Receipt memory r, bytes memory sig)
    {
        r = _receipt(req);
        r.channelId = _channel(msg.sender);
        r.acceptedAt = uint64(block.timestamp - 1);
        r.ttftMs = ttft;
        sig = _sign(honest ? NODE2_KEY : NODE_KEY, this.digestR(r));
    }

    function signedAcceptance(bool honest, bytes32 req)
        external
        view
        returns (SLACourt.Acceptance memory a, bytes memory sig)
    {
        a = _acceptance(req);
        a.channelId = _channel(msg.sender);
        a.deadline = uint64(block.timestamp - 1);
        sig = _sign(honest ? NODE2_KEY : NODE_KEY, this.digestA(a));
    }

    // ---- invariants

    /// forge-config: default.invariant.runs = 24
    /// forge-config: default.invariant.depth = 30
    function invariant_stakeAccountsForEveryPayment() public view {
        uint256 slashed = registry.getNode(node).slashed + registry.getNode(node2).slashed;
        vm.assertEq(slashed, handler.paidToClient(), "slashed == paid");
        vm.assertEq(registry.getNode(node).stake + registry.getNode(node).slashed, STAKE, "stake never negative");
        vm.assertEq(token.balanceOf(address(registry)), 2 * STAKE - slashed);
    }

    /// forge-config: default.invariant.runs = 24
    /// forge-config: default.invariant.depth = 30
    function invariant_noDoubleCompensation() public view {
        vm.assertEq(handler.doublePaid(), 0);
    }

    /// forge-config: default.invariant.runs = 24
    /// forge-config: default.invariant.depth = 30
    function invariant_answeringNodeNeverSlashed() public view {
        vm.assertEq(registry.getNode(node2).slashed, 0, "honest node slashed");
        vm.assertEq(registry.getNode(node2).stake, STAKE);
        uint256 n = handler.honestCount();
        for (uint256 i = 0; i < n; i++) {
            vm.assertEq(uint256(court.getDispute(handler.honestDisputes(i)).status), 2);
        }
    }
}
