// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {TestBase} from "./utils/TestBase.sol";
import {NodeRegistry} from "../src/NodeRegistry.sol";
import {ModelRegistry} from "../src/ModelRegistry.sol";
import {PaymentChannels} from "../src/PaymentChannels.sol";
import {SLACourt} from "../src/SLACourt.sol";
import {TestToken} from "./TestToken.sol";
import {INodeRegistry} from "../src/interfaces/INodeRegistry.sol";
import {IPaymentChannels} from "../src/interfaces/IPaymentChannels.sol";
import {ISLACourt} from "../src/interfaces/ISLACourt.sol";

abstract contract SLACourtFixture is TestBase {
    uint256 internal constant STAKE = 1_000e18;
    uint256 internal constant BOND = 0.01 ether;
    uint256 internal constant NODE_KEY = 0xA11CE;
    uint256 internal constant NODE2_KEY = 0xB0B;
    uint256 internal constant OPERATOR_KEY = 0x0FE2;
    address internal constant OWNER = address(0x0A11);
    address internal constant CLIENT = address(0xC11E);
    address internal constant THIEF = address(0x7E1F);
    bytes32 internal constant MODEL = keccak256("tiny-model");

    NodeRegistry internal registry;
    SLACourt internal court;
    TestToken internal token;
    PaymentChannels internal escrow;
    address internal node;
    address internal node2;
    address internal operator;

    function setUp() public virtual {
        vm.warp(1_700_000_000);
        node = vm.addr(NODE_KEY);
        node2 = vm.addr(NODE2_KEY);
        operator = vm.addr(OPERATOR_KEY);
        token = new TestToken("Stake", "STK");
        registry = new NodeRegistry(address(token), 100e18, 7 days, 1 hours, OWNER);
        escrow = new PaymentChannels(address(new ModelRegistry()), 1 hours);
        court = new SLACourt(registry, address(escrow), BOND);
        vm.prank(OWNER);
        registry.setSlasher(address(court));
        token.mint(operator, 1e30);
        vm.prank(operator);
        token.approve(address(registry), type(uint256).max);
        _register(NODE_KEY);
        _register(NODE2_KEY);
        vm.deal(CLIENT, 100 ether);
        vm.deal(THIEF, 100 ether);
        vm.deal(operator, 100 ether);
    }

    function _register(uint256 key) internal {
        bytes memory hpke = new bytes(1216);
        INodeRegistry.Registration memory r = INodeRegistry.Registration({
            node: vm.addr(key),
            operator: operator,
            endpoint: "https://node.example:8443",
            peerId: hex"00240801122031a9",
            hpkePublicKey: hpke,
            attestationHash: keccak256("attestation"),
            teeType: 3,
            epoch: registry.currentEpoch(),
            deadline: block.timestamp + 1 hours
        });
        bytes memory sig = _sign(key, registry.hashRegistration(r));
        vm.prank(operator);
        registry.register(r, STAKE, sig);
    }

    function _terms() internal pure returns (ISLACourt.Terms memory t) {
        t.maxTtftMs = 2_000;
        t.minTokensPerSec = 10;
        t.maxDurationMs = 60_000;
        t.responseWindow = 1 hours;
        t.breachCostBps = 20_000; // 2x the cost
        t.breachFixed = 5e18;
        t.noResponseCompensation = 50e18;
    }

    function _publish(address n, ISLACourt.Terms memory t) internal {
        vm.prank(operator);
        court.publishTerms(n, MODEL, t);
        vm.warp(block.timestamp + 1);
    }

    function _receipt(bytes32 requestHash) internal view returns (ISLACourt.Receipt memory r) {
        r.receiptId = keccak256(abi.encode("receipt", requestHash));
        r.requestHash = requestHash;
        r.responseHash = keccak256("response");
        r.channelId = _channel(CLIENT);
        r.modelId = MODEL;
        r.inputTokens = 10;
        r.outputTokens = 101;
        r.cost = 1e18;
        r.cumulativeSpent = 1e18;
        r.acceptedAt = uint64(block.timestamp);
        r.ttftMs = 500;
        r.durationMs = 5_500; // 100 tokens in 5 s = 20 tok/s
    }

    function _acceptance(bytes32 requestHash) internal view returns (ISLACourt.Acceptance memory a) {
        a.requestHash = requestHash;
        a.channelId = _channel(CLIENT);
        a.acceptedAt = uint64(block.timestamp);
        a.deadline = uint64(block.timestamp + 300);
    }

    /// @dev The terms of `payer`'s channel to the operator (the channel need not be opened).
    function _params(address payer) internal view returns (IPaymentChannels.ChannelParams memory p) {
        p.payer = payer;
        p.payee = operator;
        p.token = address(token);
        p.salt = keccak256("salt");
        p.authorizedSigner = address(0x5E55);
        p.modelId = MODEL;
    }

    /// @dev The escrow's id for `_params(payer)`, recomputed here as PaymentChannels documents it.
    function _channel(address payer) internal view returns (bytes32) {
        return keccak256(abi.encode(_params(payer), address(escrow), block.chainid));
    }

    /// @dev claimBreach as CLIENT with CLIENT's channel.
    function _claim(address n, ISLACourt.Receipt memory r, bytes memory sig) internal returns (uint256) {
        IPaymentChannels.ChannelParams memory p = _params(CLIENT);
        vm.prank(CLIENT);
        return court.claimBreach(n, p, r, sig);
    }

    /// @dev openNoResponse as CLIENT with CLIENT's channel, sending `value`.
    function _openNR(uint256 value, ISLACourt.Acceptance memory a, bytes memory sig) internal returns (bytes32) {
        IPaymentChannels.ChannelParams memory p = _params(CLIENT);
        vm.prank(CLIENT);
        return court.openNoResponse{value: value}(node, MODEL, p, a, sig);
    }

    function _signR(uint256 key, ISLACourt.Receipt memory r) internal view returns (bytes memory) {
        return _sign(key, this.digestR(r));
    }

    function _signA(uint256 key, ISLACourt.Acceptance memory a) internal view returns (bytes memory) {
        return _sign(key, this.digestA(a));
    }

    function digestR(ISLACourt.Receipt calldata r) external view returns (bytes32) {
        return court.hashReceipt(r);
    }

    function digestA(ISLACourt.Acceptance calldata a) external view returns (bytes32) {
        return court.hashAcceptance(a);
    }

    function _stake(address n) internal view returns (uint256) {
        return registry.getNode(n).stake;
    }
}

contract SLACourtTest is SLACourtFixture {
    function setUp() public override {
        super.setUp();
        _publish(node, _terms());
        vm.warp(block.timestamp + 2 hours);
    }

    function test_hashes_matchEip712Spec() public view {
        bytes32 domain = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256("dcml-receipts"),
                keccak256("1"),
                block.chainid,
                address(court)
            )
        );
        vm.assertEq(court.domainSeparator(), domain);
        ISLACourt.Acceptance memory a = _acceptance(bytes32(uint256(7)));
        bytes32 structHash = keccak256(
            abi.encode(
                keccak256("Acceptance(bytes32 requestHash,bytes32 channelId,uint64 acceptedAt,uint64 deadline)"),
                a.requestHash,
                a.channelId,
                a.acceptedAt,
                a.deadline
            )
        );
        vm.assertEq(this.digestA(a), keccak256(abi.encodePacked("\x19\x01", domain, structHash)));
    }

    function test_publishTerms_versionsAndAuth() public {
        vm.assertEq(court.termsCount(node, MODEL), 1);
        ISLACourt.Terms memory t = court.termsVersion(node, MODEL, 0);
        vm.assertEq(t.validFrom, 1_700_000_001);
        vm.prank(CLIENT);
        vm.expectRevert(ISLACourt.NotNodeOrOperator.selector);
        court.publishTerms(node, MODEL, _terms());
        ISLACourt.Terms memory bad = _terms();
        bad.responseWindow = 0;
        vm.prank(operator);
        vm.expectRevert(ISLACourt.InvalidTerms.selector);
        court.publishTerms(node, MODEL, bad);
        // the node key itself may publish; two versions in one second replace the pending one
        vm.prank(node);
        court.publishTerms(node, MODEL, _terms());
        vm.prank(node);
        court.publishTerms(node, MODEL, _terms());
        vm.assertEq(court.termsCount(node, MODEL), 2);
    }

    function test_claimBreach_ttft_compensatesOnce() public {
        ISLACourt.Receipt memory r = _receipt(keccak256("req-1"));
        r.ttftMs = 2_001;
        bytes memory sig = _signR(NODE_KEY, r);
        uint256 before = token.balanceOf(CLIENT);
        uint256 paid = _claim(node, r, sig);
        vm.assertEq(paid, 5e18 + 2e18);
        vm.assertEq(token.balanceOf(CLIENT) - before, paid);
        vm.assertEq(_stake(node), STAKE - paid);
        vm.expectRevert(abi.encodeWithSelector(ISLACourt.AlreadyClaimed.selector, court.claimKey(node, r.requestHash)));
        _claim(node, r, sig);
        // another receipt (new id) for the same request cannot be claimed either
        r.receiptId = bytes32(uint256(1));
        bytes memory sig2 = _signR(NODE_KEY, r);
        vm.expectRevert(abi.encodeWithSelector(ISLACourt.AlreadyClaimed.selector, court.claimKey(node, r.requestHash)));
        _claim(node, r, sig2);
    }

    function test_channelId_matchesEscrow() public view {
        IPaymentChannels.ChannelParams memory p = _params(CLIENT);
        vm.assertEq(court.channelIdOf(p), escrow.channelIdOf(p));
        vm.assertEq(court.channelIdOf(p), _channel(CLIENT));
        vm.assertEq(court.escrow(), address(escrow));
    }

    /// forge-config: default.fuzz.runs = 256
    function testFuzz_channelId_matchesEscrow(IPaymentChannels.ChannelParams calldata p) public view {
        vm.assertEq(court.channelIdOf(p), escrow.channelIdOf(p));
    }

    function test_claimBreach_copiedByThirdPartyRefused() public {
        ISLACourt.Receipt memory r = _receipt(keccak256("copied"));
        r.ttftMs = 2_001;
        bytes memory sig = _signR(NODE_KEY, r);
        IPaymentChannels.ChannelParams memory p = _params(CLIENT);
        // the exact calldata of the client's claim, sent by a mempool watcher
        vm.prank(THIEF);
        vm.expectRevert(abi.encodeWithSelector(ISLACourt.NotPayer.selector, THIEF, CLIENT));
        court.claimBreach(node, p, r, sig);
        // naming itself as payer changes the channel id: no longer the one the node signed
        IPaymentChannels.ChannelParams memory own = _params(THIEF);
        vm.prank(THIEF);
        vm.expectRevert(abi.encodeWithSelector(ISLACourt.ChannelMismatch.selector, r.channelId, _channel(THIEF)));
        court.claimBreach(node, own, r, sig);
        // any other changed term (here the escrow's payee) fails the same way
        p.payee = THIEF;
        vm.prank(CLIENT);
        vm.expectRevert();
        court.claimBreach(node, p, r, sig);
        uint256 before = token.balanceOf(CLIENT);
        uint256 paid = _claim(node, r, sig);
        vm.assertEq(token.balanceOf(CLIENT) - before, paid);
        vm.assertEq(token.balanceOf(THIEF), 0);
    }

    function test_openNoResponse_copiedByThirdPartyRefused() public {
        ISLACourt.Acceptance memory a = _acceptance(keccak256("copied-open"));
        bytes memory sig = _signA(NODE_KEY, a);
        vm.warp(a.deadline + 1);
        IPaymentChannels.ChannelParams memory p = _params(CLIENT);
        vm.prank(THIEF);
        vm.expectRevert(abi.encodeWithSelector(ISLACourt.NotPayer.selector, THIEF, CLIENT));
        court.openNoResponse{value: BOND}(node, MODEL, p, a, sig);
        IPaymentChannels.ChannelParams memory own = _params(THIEF);
        vm.prank(THIEF);
        vm.expectRevert(abi.encodeWithSelector(ISLACourt.ChannelMismatch.selector, a.channelId, _channel(THIEF)));
        court.openNoResponse{value: BOND}(node, MODEL, own, a, sig);
        bytes32 id = _openNR(BOND, a, sig);
        vm.assertEq(court.getDispute(id).disputer, CLIENT);
        // whoever finalizes, the payer is paid and gets the bond back
        vm.warp(block.timestamp + 1 hours + 1);
        uint256 ethBefore = CLIENT.balance;
        vm.prank(THIEF);
        court.finalize(id);
        vm.assertEq(token.balanceOf(CLIENT), 50e18);
        vm.assertEq(CLIENT.balance - ethBefore, BOND);
        vm.assertEq(token.balanceOf(THIEF), 0);
    }

    function test_claimBreach_rateAndDuration() public {
        ISLACourt.Receipt memory r = _receipt(keccak256("slow"));
        r.durationMs = 10_501; // 100 tokens in 10.001 s < 10 tok/s
        bytes memory rs = _signR(NODE_KEY, r);
        _claim(node, r, rs);
        ISLACourt.Receipt memory r2 = _receipt(keccak256("long"));
        r2.outputTokens = 10_000;
        r2.durationMs = 60_001;
        ISLACourt.Terms memory t = court.termsAt(node, MODEL, r2.acceptedAt);
        vm.assertEq(court.brokenTerms(t, r2), 4);
        bytes memory rs2 = _signR(NODE_KEY, r2);
        _claim(node, r2, rs2);
    }

    function test_claimBreach_refusesGoodReceiptForgedAndWrongKey() public {
        ISLACourt.Receipt memory r = _receipt(keccak256("ok"));
        bytes memory sig = _signR(NODE_KEY, r);
        vm.expectRevert(ISLACourt.TermsNotBroken.selector);
        _claim(node, r, sig);
        // altering any figure after signing: the signature recovers another key
        r.ttftMs = 9_999;
        vm.expectRevert();
        _claim(node, r, sig);
        // signed by another registered node, claimed against this one
        bytes memory sig2 = _signR(NODE2_KEY, r);
        vm.expectRevert(abi.encodeWithSelector(ISLACourt.WrongSigner.selector, node2, node));
        _claim(node, r, sig2);
        // high-s and short signatures
        bytes32 digest = this.digestR(r);
        vm.expectRevert(ISLACourt.InvalidSignature.selector);
        _claim(node, r, _highS(NODE_KEY, digest));
        vm.expectRevert(ISLACourt.InvalidSignature.selector);
        _claim(node, r, hex"1234");
    }

    function test_receiptSigner_recoversOrZero() public view {
        ISLACourt.Receipt memory r = _receipt(keccak256("who"));
        bytes memory sig = _signR(NODE_KEY, r);
        vm.assertEq(court.receiptSigner(r, sig), node);
        vm.assertEq(court.receiptSigner(r, _highS(NODE_KEY, this.digestR(r))), address(0));
        vm.assertEq(court.receiptSigner(r, hex"1234"), address(0));
        r.cost += 1; // altered after signing: some other address
        address other = court.receiptSigner(r, sig);
        vm.assertTrue(other != node && other != address(0));
    }

    function test_claimBreach_refusesOtherChain() public {
        ISLACourt.Receipt memory r = _receipt(keccak256("chain"));
        r.ttftMs = 5_000;
        bytes memory sig = _signR(NODE_KEY, r);
        vm.chainId(999);
        vm.expectRevert();
        _claim(node, r, sig);
    }

    function test_claimBreach_usesTermsAtAcceptedAt() public {
        ISLACourt.Receipt memory r = _receipt(keccak256("old"));
        r.ttftMs = 2_500; // fine under the new terms, broken under the old ones
        ISLACourt.Terms memory loose = _terms();
        loose.maxTtftMs = 3_000;
        vm.prank(operator);
        court.publishTerms(node, MODEL, loose); // same second as acceptedAt: not yet in force
        vm.warp(block.timestamp + 10);
        bytes memory rs = _signR(NODE_KEY, r);
        _claim(node, r, rs);
        ISLACourt.Receipt memory r2 = _receipt(keccak256("new"));
        r2.ttftMs = 2_500;
        bytes memory sig2 = _signR(NODE_KEY, r2);
        vm.expectRevert(ISLACourt.TermsNotBroken.selector);
        _claim(node, r2, sig2);
    }

    function test_claimBreach_noTermsBeforePublication() public {
        ISLACourt.Receipt memory r = _receipt(keccak256("early"));
        r.acceptedAt = 1_699_999_000;
        r.ttftMs = 9_000;
        bytes memory sig = _signR(NODE_KEY, r);
        vm.expectRevert(abi.encodeWithSelector(ISLACourt.NoTerms.selector, node, MODEL, r.acceptedAt));
        _claim(node, r, sig);
    }

    function _open(bytes32 req) internal returns (bytes32 id, ISLACourt.Acceptance memory a) {
        a = _acceptance(req);
        bytes memory sig = _signA(NODE_KEY, a);
        vm.warp(a.deadline + 1);
        id = _openNR(BOND, a, sig);
    }

    function test_noResponse_answeredClosesWithoutSlash() public {
        bytes32 req = keccak256("answered");
        ISLACourt.Receipt memory r = _receipt(req);
        (bytes32 id,) = _open(req);
        vm.assertEq(uint256(court.getDispute(id).status), uint256(ISLACourt.DisputeStatus.Open));
        uint256 opBefore = operator.balance;
        bytes memory rs = _signR(NODE_KEY, r);
        vm.prank(operator);
        court.answer(id, r, rs);
        vm.assertEq(operator.balance - opBefore, BOND);
        vm.assertEq(uint256(court.getDispute(id).status), uint256(ISLACourt.DisputeStatus.Answered));
        vm.warp(block.timestamp + 2 hours);
        vm.expectRevert(abi.encodeWithSelector(ISLACourt.DisputeNotOpen.selector, id));
        court.finalize(id);
        vm.assertEq(_stake(node), STAKE);
    }

    function test_noResponse_unansweredFinalizesAndSlashes() public {
        (bytes32 id,) = _open(keccak256("silent"));
        vm.expectRevert();
        court.finalize(id);
        vm.warp(block.timestamp + 1 hours + 1);
        uint256 before = token.balanceOf(CLIENT);
        uint256 ethBefore = CLIENT.balance;
        vm.prank(address(0xD00D));
        vm.assertEq(court.finalize(id), 50e18);
        vm.assertEq(token.balanceOf(CLIENT) - before, 50e18);
        vm.assertEq(CLIENT.balance - ethBefore, BOND);
        vm.assertEq(_stake(node), STAKE - 50e18);
        // a late receipt cannot reopen it
        ISLACourt.Receipt memory r = _receipt(keccak256("silent"));
        bytes memory sig = _signR(NODE_KEY, r);
        vm.expectRevert(abi.encodeWithSelector(ISLACourt.DisputeNotOpen.selector, id));
        court.answer(id, r, sig);
    }

    function test_noResponse_refusals() public {
        ISLACourt.Acceptance memory a = _acceptance(keccak256("x"));
        bytes memory sig = _signA(NODE_KEY, a);
        vm.expectRevert(abi.encodeWithSelector(ISLACourt.DeadlineNotPassed.selector, a.deadline));
        _openNR(BOND, a, sig);
        vm.warp(a.deadline + 1);
        vm.expectRevert(abi.encodeWithSelector(ISLACourt.InvalidBond.selector, 0, BOND));
        _openNR(0, a, sig);
        bytes memory sigOther = _signA(NODE2_KEY, a);
        vm.expectRevert(abi.encodeWithSelector(ISLACourt.WrongSigner.selector, node2, node));
        _openNR(BOND, a, sigOther);
        a.deadline += 1; // altered after signing
        vm.expectRevert();
        _openNR(BOND, a, sig);
        a.deadline -= 1;
        bytes32 id = _openNR(BOND, a, sig);
        vm.expectRevert(abi.encodeWithSelector(ISLACourt.DisputeExists.selector, id));
        _openNR(BOND, a, sig);
        // answers for another request, another channel, or signed by another key are refused
        ISLACourt.Receipt memory r = _receipt(keccak256("other"));
        bytes memory rs = _signR(NODE_KEY, r);
        vm.expectRevert(ISLACourt.ReceiptMismatch.selector);
        court.answer(id, r, rs);
        r = _receipt(a.requestHash);
        r.channelId = bytes32(0);
        rs = _signR(NODE_KEY, r);
        vm.expectRevert(ISLACourt.ReceiptMismatch.selector);
        court.answer(id, r, rs);
        r = _receipt(a.requestHash);
        rs = _signR(NODE2_KEY, r);
        vm.expectRevert(abi.encodeWithSelector(ISLACourt.WrongSigner.selector, node2, node));
        court.answer(id, r, rs);
        vm.warp(block.timestamp + 1 hours + 1);
        bytes memory late = _signR(NODE_KEY, r);
        vm.expectRevert();
        court.answer(id, r, late);
    }

    function test_noResponse_termsAtAcceptedAt() public {
        ISLACourt.Acceptance memory a = _acceptance(keccak256("span"));
        bytes memory sig = _signA(NODE_KEY, a);
        ISLACourt.Terms memory harsh = _terms();
        harsh.noResponseCompensation = 500e18;
        vm.prank(operator);
        court.publishTerms(node, MODEL, harsh); // after acceptance: must not apply
        vm.warp(a.deadline + 1);
        bytes32 id = _openNR(BOND, a, sig);
        vm.assertEq(court.getDispute(id).compensation, 50e18);
        // accepted after the new version took effect: the new terms apply
        ISLACourt.Acceptance memory b = _acceptance(keccak256("later"));
        b.acceptedAt = uint64(block.timestamp);
        b.deadline = uint64(block.timestamp + 10);
        bytes memory sigB = _signA(NODE_KEY, b);
        vm.warp(b.deadline + 1);
        vm.assertEq(court.getDispute(_openNR(BOND, b, sigB)).compensation, 500e18);
    }

    function test_noResponse_freshTermsDisputableAtOnce() public {
        // terms published a second ago already bind a request accepted now, whatever its deadline
        ISLACourt.Terms memory t = _terms();
        t.noResponseCompensation = 7e18;
        _publish(node2, t);
        vm.warp(block.timestamp + 1);
        ISLACourt.Acceptance memory a = _acceptance(keccak256("fresh"));
        a.deadline = uint64(block.timestamp + 5);
        bytes memory sig = _signA(NODE2_KEY, a);
        vm.warp(a.deadline + 1);
        vm.prank(CLIENT);
        bytes32 id = court.openNoResponse{value: BOND}(node2, MODEL, _params(CLIENT), a, sig);
        vm.assertEq(court.getDispute(id).compensation, 7e18);
    }

    function test_noResponse_acceptedAfterDeadlineRefused() public {
        ISLACourt.Acceptance memory a = _acceptance(keccak256("backwards"));
        a.acceptedAt = a.deadline + 1;
        bytes memory sig = _signA(NODE_KEY, a);
        vm.warp(a.acceptedAt + 1);
        vm.expectRevert(ISLACourt.InvalidAcceptance.selector);
        _openNR(BOND, a, sig);
    }

    function test_compensationCappedByStake() public {
        ISLACourt.Terms memory t = _terms();
        t.noResponseCompensation = uint128(STAKE * 2);
        _publish(node, t);
        vm.warp(block.timestamp + 1 hours);
        (bytes32 id,) = _open(keccak256("cap"));
        vm.warp(block.timestamp + 1 hours + 1);
        vm.assertEq(court.finalize(id), STAKE);
        vm.assertEq(_stake(node), 0);
        ISLACourt.Receipt memory r = _receipt(keccak256("after"));
        r.ttftMs = 9_000;
        bytes memory sig = _signR(NODE_KEY, r);
        vm.expectRevert(abi.encodeWithSelector(ISLACourt.NothingToCompensate.selector, node));
        _claim(node, r, sig);
    }

    /// forge-config: default.fuzz.runs = 128
    function testFuzz_breachDecisionMatchesRule(uint32 ttft, uint32 duration, uint32 outTokens) public {
        ISLACourt.Receipt memory r = _receipt(keccak256(abi.encode(ttft, duration, outTokens)));
        r.ttftMs = ttft;
        r.durationMs = duration;
        r.outputTokens = outTokens;
        ISLACourt.Terms memory t = _terms();
        bool ttftBroken = ttft > t.maxTtftMs;
        bool rateBroken = outTokens > 1 && duration > ttft
            && uint256(outTokens - 1) * 1000 < uint256(t.minTokensPerSec) * (duration - ttft);
        bool durBroken = duration > t.maxDurationMs;
        bytes memory sig = _signR(NODE_KEY, r);
        if (!(ttftBroken || rateBroken || durBroken)) {
            vm.expectRevert(ISLACourt.TermsNotBroken.selector);
            _claim(node, r, sig);
            vm.assertEq(_stake(node), STAKE);
        } else {
            uint256 paid = _claim(node, r, sig);
            vm.assertEq(paid, 7e18);
            vm.assertEq(_stake(node), STAKE - paid);
        }
    }

    /// forge-config: default.fuzz.runs = 128
    function testFuzz_answeringNodeNeverSlashed(bytes32 req, uint32 wait) public {
        (bytes32 id,) = _open(req);
        vm.warp(block.timestamp + bound(wait, 0, 1 hours));
        ISLACourt.Receipt memory r = _receipt(req);
        bytes memory rs = _signR(NODE_KEY, r);
        vm.prank(operator);
        court.answer(id, r, rs);
        vm.warp(block.timestamp + 30 days);
        vm.expectRevert(abi.encodeWithSelector(ISLACourt.DisputeNotOpen.selector, id));
        court.finalize(id);
        vm.assertEq(_stake(node), STAKE);
    }
}
