// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Vm} from "./utils/TestBase.sol";
import {SLACourt} from "../src/SLACourt.sol";
import {NodeRegistry} from "../src/NodeRegistry.sol";
import {PaymentChannels} from "../src/PaymentChannels.sol";
import {TestToken} from "./TestToken.sol";
import {SLACourtFixture} from "./SLACourt.t.sol";
import {IPaymentChannels} from "../src/interfaces/IPaymentChannels.sol";
import {ISLACourt} from "../src/interfaces/ISLACourt.sol";

/// @dev Drives the court with a sloppy node (slow receipts, sometimes silent) and an honest node (fast
///      receipts, answers every dispute at once), on behalf of one client: the payer of the channel the
///      nodes sign for. Every valid action builds correctly signed inputs and calls the court directly
///      (no try/catch), so a revert on a valid action shows in forge's call table. Deliberately invalid
///      calls live in `invalid` only and are counted there (`invalidRejected` / `invalidAccepted`).
///
///      Ghost terms: the handler mirrors every version of terms it publishes (including the court's
///      "replace the pending version" rule) and predicts, from that mirror, the terms in force for each
///      request; any disagreement with the court is counted in `termsMismatch`.
contract SLACourtHandler {
    Vm internal constant vm = Vm(address(uint160(uint256(keccak256("hevm cheat code")))));

    bytes32 internal constant MODEL = keccak256("tiny-model");
    uint128 internal constant COST = 1e18;

    SLACourt internal immutable court;
    NodeRegistry internal immutable registry;
    TestToken internal immutable token;
    uint256 internal immutable sloppyKey;
    uint256 internal immutable honestKey;
    address public immutable sloppy;
    address public immutable honest;
    address public immutable client;
    address public immutable thief;
    address public immutable operator;
    uint256 public immutable bond;
    /// @notice validFrom of the first terms of both nodes: no request before it is judged.
    uint64 public immutable firstValidFrom;

    IPaymentChannels.ChannelParams internal params; // the client's channel
    IPaymentChannels.ChannelParams internal thiefParams;
    bytes32 internal channelId;

    // ---- ghosts
    mapping(address => ISLACourt.Terms[]) internal ghostTerms;
    uint256 public paidToClient; // everything the court ever paid out of stakes
    uint256 public bondsHeld; // bonds of disputes still open
    uint256 public bondsToAnswerers;
    mapping(bytes32 => uint256) public paidPerRequest;
    uint256 public doublePaid;
    uint256 public termsMismatch;
    uint256 public judgedByOlderTerms; // coverage: requests judged by a version that was later superseded
    uint256 public invalidRejected;
    uint256 public invalidAccepted;
    uint256 public skipped;
    uint256 internal nonce;

    bytes32[] public honestDisputes;
    bytes32[] public sloppyOpen; // open sloppy disputes (answered / finalized ones are swapped out)
    bytes32[] public claimedRequests; // sloppy requests already compensated
    mapping(bytes32 => bytes32) internal requestOf; // dispute id => request hash

    // ---- call counters (successful valid actions)
    uint256 public nPublish;
    uint256 public nClaim;
    uint256 public nOpen;
    uint256 public nAnswer;
    uint256 public nFinalize;

    constructor(
        SLACourt court_,
        NodeRegistry registry_,
        TestToken token_,
        uint256 sloppyKey_,
        uint256 honestKey_,
        address client_,
        address thief_,
        address operator_,
        IPaymentChannels.ChannelParams memory params_,
        IPaymentChannels.ChannelParams memory thiefParams_
    ) {
        court = court_;
        registry = registry_;
        token = token_;
        sloppyKey = sloppyKey_;
        honestKey = honestKey_;
        sloppy = vm.addr(sloppyKey_);
        honest = vm.addr(honestKey_);
        client = client_;
        thief = thief_;
        operator = operator_;
        bond = court_.disputeBond();
        params = params_;
        thiefParams = thiefParams_;
        channelId = court_.channelIdOf(params_);
        // both nodes' first terms, published by the fixture before the handler exists
        ISLACourt.Terms memory a = court_.termsVersion(sloppy, MODEL, 0);
        ISLACourt.Terms memory b = court_.termsVersion(honest, MODEL, 0);
        ghostTerms[sloppy].push(a);
        ghostTerms[honest].push(b);
        firstValidFrom = a.validFrom > b.validFrom ? a.validFrom : b.validFrom;
    }

    // ================================================================ valid actions

    /// @notice New terms (for either node); the honest node's TTFT bound always stays above its receipts'.
    function publish(uint32 ttft, uint128 comp, uint32 window, bool forHonest) external {
        address n = forHonest ? honest : sloppy;
        ISLACourt.Terms memory t;
        t.maxTtftMs = forHonest ? uint32(bound(ttft, 1_000, 5_000)) : uint32(bound(ttft, 1, 5_000));
        t.minTokensPerSec = 10;
        t.maxDurationMs = 60_000;
        t.responseWindow = uint32(bound(window, 1 minutes, 2 hours));
        t.breachCostBps = 20_000;
        t.breachFixed = uint128(bound(comp, 0, 10e18));
        t.noResponseCompensation = uint128(bound(comp >> 64, 0, 60e18));
        vm.prank(operator);
        court.publishTerms(n, MODEL, t);
        t.validFrom = uint64(block.timestamp) + 1;
        ISLACourt.Terms[] storage list = ghostTerms[n];
        if (list[list.length - 1].validFrom == t.validFrom) list[list.length - 1] = t;
        else list.push(t);
        nPublish++;
    }

    function warp(uint32 dt) external {
        vm.warp(block.timestamp + bound(dt, 1, 2 hours));
    }

    /// @notice The client claims a fresh receipt of the sloppy node that breaks the terms in force at its
    ///         `acceptedAt` (chosen anywhere since the first terms, often before a later version).
    function claim(uint64 acceptedSeed, uint32 overBy) external {
        if (registry.getNode(sloppy).stake == 0) {
            skipped++; // nothing left to compensate: the claim would (rightly) revert
            return;
        }
        bytes32 req = keccak256(abi.encode("claim", ++nonce));
        uint64 acceptedAt = uint64(bound(acceptedSeed, firstValidFrom, block.timestamp));
        (ISLACourt.Terms memory t, bool older) = _ghostAt(sloppy, acceptedAt);
        ISLACourt.Receipt memory r = _receipt(req, acceptedAt);
        r.ttftMs = uint32(t.maxTtftMs + 1 + bound(overBy, 0, 3_000)); // breaks TTFT, nothing else matters
        bytes memory sig = _sign(sloppyKey, court.hashReceipt(r));
        uint256 expected = _capped(sloppy, t.breachFixed + uint256(COST) * t.breachCostBps / 10_000);

        uint256 clientBefore = token.balanceOf(client);
        vm.prank(client);
        uint256 amount = court.claimBreach(sloppy, params, r, sig);

        if (amount != expected || token.balanceOf(client) - clientBefore != amount) termsMismatch++;
        if (older) judgedByOlderTerms++;
        paidToClient += amount;
        if (paidPerRequest[keccak256(abi.encode(sloppy, req))]++ != 0) doublePaid++;
        claimedRequests.push(req);
        nClaim++;
    }

    /// @notice The client opens a no-response dispute on a fresh, expired acceptance of either node; the
    ///         honest node answers at once (its operator posts the receipt and takes the bond).
    function open(uint64 deadlineSeed, bool toHonest) external {
        _open(deadlineSeed, toHonest);
    }

    function _open(uint256 deadlineSeed, bool toHonest) internal returns (bytes32 id, bytes32 req) {
        address n = toHonest ? honest : sloppy;
        req = keccak256(abi.encode("open", ++nonce));
        // judged at acceptedAt, which must be in some terms' reach; the deadline has already passed
        uint64 lo = firstValidFrom;
        if (block.timestamp <= lo + 1) vm.warp(lo + 2);
        uint64 deadline = uint64(bound(deadlineSeed, lo, block.timestamp - 1));
        uint64 acceptedAt = uint64(bound(uint256(keccak256(abi.encode(deadlineSeed, nonce))), lo, deadline));
        (ISLACourt.Terms memory t, bool older) = _ghostAt(n, acceptedAt);
        ISLACourt.Acceptance memory a =
            ISLACourt.Acceptance({requestHash: req, channelId: channelId, acceptedAt: acceptedAt, deadline: deadline});
        bytes memory sig = _sign(toHonest ? honestKey : sloppyKey, court.hashAcceptance(a));

        vm.deal(client, client.balance + bond);
        vm.prank(client);
        id = court.openNoResponse{value: bond}(n, MODEL, params, a, sig);
        bondsHeld += bond;
        requestOf[id] = req;

        ISLACourt.Dispute memory d = court.getDispute(id);
        if (d.compensation != t.noResponseCompensation || d.answerBy != block.timestamp + t.responseWindow) {
            termsMismatch++;
        }
        if (older) judgedByOlderTerms++;
        nOpen++;

        if (toHonest) {
            _answer(id, honestKey, req);
            honestDisputes.push(id);
        } else {
            sloppyOpen.push(id);
        }
    }

    /// @notice The sloppy node sometimes does answer, in time: one of its open disputes whose window is
    ///         still open, or else a fresh one (opened by the client first).
    function answerSloppy(uint256 idx, uint64 deadlineSeed) external {
        uint256 len = sloppyOpen.length;
        if (len != 0) {
            idx = idx % len;
            bytes32 id = sloppyOpen[idx];
            if (block.timestamp <= court.getDispute(id).answerBy) {
                _answer(id, sloppyKey, requestOf[id]);
                _dropOpen(idx);
                return;
            }
        }
        (bytes32 fresh, bytes32 req) = _open(deadlineSeed, false);
        _answer(fresh, sloppyKey, req);
        sloppyOpen.pop(); // `_open` pushed it last
    }

    /// @notice Anyone finalizes a silent sloppy dispute once its window closed (time is moved past it).
    function finalize(uint256 idx, uint64 deadlineSeed) external {
        if (sloppyOpen.length == 0) _open(deadlineSeed, false); // nothing silent yet: the client opens one
        idx = idx % sloppyOpen.length;
        bytes32 id = sloppyOpen[idx];
        ISLACourt.Dispute memory d = court.getDispute(id);
        if (block.timestamp <= d.answerBy) vm.warp(uint256(d.answerBy) + 1);
        uint256 expected = _capped(sloppy, d.compensation);
        uint256 clientTokens = token.balanceOf(client);
        uint256 clientEth = client.balance;

        uint256 amount = court.finalize(id);

        if (amount != expected || token.balanceOf(client) - clientTokens != amount) termsMismatch++;
        if (client.balance - clientEth != d.bond) termsMismatch++;
        bondsHeld -= d.bond;
        paidToClient += amount;
        if (amount != 0 && paidPerRequest[keccak256(abi.encode(sloppy, requestOf[id]))]++ != 0) doublePaid++;
        _dropOpen(idx);
        nFinalize++;
    }

    // ================================================================ invalid actions

    /// @notice One deliberately invalid call; the court must refuse every one of them.
    function invalid(uint8 kind, uint256 seed) external {
        kind = kind % 8;
        bool accepted;
        if (kind == 0) {
            // the client's exact claim, sent by someone else
            (ISLACourt.Receipt memory r, bytes memory sig) = _breakingReceipt(keccak256(abi.encode("thief", seed)));
            vm.prank(thief);
            try court.claimBreach(sloppy, params, r, sig) {
                accepted = true;
            } catch {}
        } else if (kind == 1) {
            // the thief names itself as payer: the channel id no longer matches the signed one
            (ISLACourt.Receipt memory r, bytes memory sig) = _breakingReceipt(keccak256(abi.encode("thief", seed)));
            vm.prank(thief);
            try court.claimBreach(sloppy, thiefParams, r, sig) {
                accepted = true;
            } catch {}
        } else if (kind == 2) {
            // a second claim for an already compensated request (new receipt id, freshly signed)
            // (before any claim was paid: a fresh request under another channel's terms, a channel mismatch)
            bool none = claimedRequests.length == 0;
            bytes32 req =
                none ? keccak256(abi.encode("unclaimed", seed)) : claimedRequests[seed % claimedRequests.length];
            (ISLACourt.Receipt memory r,) = _breakingReceipt(req);
            r.receiptId = keccak256(abi.encode("again", seed));
            bytes memory sig = _sign(sloppyKey, court.hashReceipt(r));
            vm.prank(client);
            try court.claimBreach(sloppy, none ? thiefParams : params, r, sig) {
                accepted = true;
            } catch {}
        } else if (kind == 3) {
            // the honest node's receipts break nothing
            ISLACourt.Receipt memory r = _receipt(keccak256(abi.encode("good", seed)), uint64(block.timestamp));
            bytes memory sig = _sign(honestKey, court.hashReceipt(r));
            vm.prank(client);
            try court.claimBreach(honest, params, r, sig) {
                accepted = true;
            } catch {}
        } else if (kind == 4) {
            // a breaking receipt signed by the wrong key
            (ISLACourt.Receipt memory r,) = _breakingReceipt(keccak256(abi.encode("forged", seed)));
            bytes memory sig = _sign(honestKey, court.hashReceipt(r));
            vm.prank(client);
            try court.claimBreach(sloppy, params, r, sig) {
                accepted = true;
            } catch {}
        } else if (kind == 5 || kind == 6) {
            // open with the wrong bond (5), or before the acceptance's deadline (6)
            ISLACourt.Acceptance memory a = ISLACourt.Acceptance({
                requestHash: keccak256(abi.encode("bad-open", seed)),
                channelId: channelId,
                acceptedAt: firstValidFrom,
                deadline: kind == 5 ? uint64(block.timestamp - 1) : uint64(block.timestamp + bound(seed, 0, 300))
            });
            bytes memory sig = _sign(sloppyKey, court.hashAcceptance(a));
            uint256 value = kind == 5 ? bond + 1 + bound(seed, 0, 1 ether) : bond;
            vm.deal(client, client.balance + value);
            vm.prank(client);
            try court.openNoResponse{value: value}(sloppy, MODEL, params, a, sig) {
                accepted = true;
            } catch {}
        } else {
            // finalize a sloppy dispute whose window is still open, an answered honest one, or an unknown id
            bytes32 id = keccak256(abi.encode("no-such-dispute", seed));
            if (
                sloppyOpen.length != 0
                    && block.timestamp <= court.getDispute(sloppyOpen[seed % sloppyOpen.length]).answerBy
            ) {
                id = sloppyOpen[seed % sloppyOpen.length];
            } else if (honestDisputes.length != 0) {
                id = honestDisputes[seed % honestDisputes.length];
            }
            try court.finalize(id) {
                accepted = true;
            } catch {}
        }
        if (accepted) invalidAccepted++;
        else invalidRejected++;
    }

    // ================================================================ views for the invariants

    function honestCount() external view returns (uint256) {
        return honestDisputes.length;
    }

    function ghostTermsCount(address n) external view returns (uint256) {
        return ghostTerms[n].length;
    }

    function ghostTermsVersion(address n, uint256 i) external view returns (ISLACourt.Terms memory) {
        return ghostTerms[n][i];
    }

    // ================================================================ internal

    function _answer(bytes32 id, uint256 key, bytes32 req) internal {
        ISLACourt.Receipt memory r = _receipt(req, uint64(block.timestamp));
        bytes memory sig = _sign(key, court.hashReceipt(r));
        uint256 before = operator.balance;
        uint128 b = court.getDispute(id).bond;
        vm.prank(operator);
        court.answer(id, r, sig);
        if (operator.balance - before != b) termsMismatch++;
        bondsHeld -= b;
        bondsToAnswerers += b;
        nAnswer++;
    }

    function _dropOpen(uint256 idx) internal {
        sloppyOpen[idx] = sloppyOpen[sloppyOpen.length - 1];
        sloppyOpen.pop();
    }

    /// @dev A good, fast receipt on the client's channel (breaks none of the terms the handler publishes).
    function _receipt(bytes32 req, uint64 acceptedAt) internal view returns (ISLACourt.Receipt memory r) {
        r.receiptId = keccak256(abi.encode("receipt", req));
        r.requestHash = req;
        r.responseHash = keccak256("response");
        r.channelId = channelId;
        r.modelId = MODEL;
        r.inputTokens = 10;
        r.outputTokens = 101;
        r.cost = COST;
        r.cumulativeSpent = COST;
        r.acceptedAt = acceptedAt;
        r.ttftMs = 100;
        r.durationMs = 5_100; // 100 tokens in 5 s = 20 tok/s
    }

    /// @dev A sloppy receipt that breaks every version of the sloppy node's terms (TTFT above 5 s).
    function _breakingReceipt(bytes32 req) internal view returns (ISLACourt.Receipt memory r, bytes memory sig) {
        r = _receipt(req, uint64(block.timestamp));
        r.ttftMs = 5_001;
        sig = _sign(sloppyKey, court.hashReceipt(r));
    }

    /// @dev The mirrored terms of `n` in force at `time`, and whether a later version exists.
    function _ghostAt(address n, uint64 time) internal view returns (ISLACourt.Terms memory, bool older) {
        ISLACourt.Terms[] storage list = ghostTerms[n];
        for (uint256 i = list.length; i != 0; --i) {
            if (list[i - 1].validFrom <= time) return (list[i - 1], i != list.length);
        }
        revert("ghost: no terms");
    }

    function _capped(address n, uint256 amount) internal view returns (uint256) {
        uint256 stake = registry.getNode(n).stake;
        return amount < stake ? amount : stake;
    }

    function _sign(uint256 key, bytes32 digest) internal pure returns (bytes memory) {
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(key, digest);
        return abi.encodePacked(r, s, v);
    }

    function bound(uint256 x, uint256 min, uint256 max) internal pure returns (uint256) {
        if (max <= min) return min;
        return min + x % (max - min + 1);
    }
}

contract SLACourtInvariants is SLACourtFixture {
    SLACourtHandler internal handler;

    function setUp() public override {
        super.setUp();
        _rewire();
        _publish(node, _terms());
        _publish(node2, _terms());
        vm.warp(block.timestamp + 2 hours);
        handler = new SLACourtHandler(
            court, registry, token, NODE_KEY, NODE2_KEY, CLIENT, THIEF, operator, _params(CLIENT), _params(THIEF)
        );
        targetContract(address(handler));
    }

    /// @dev The fixture's court is the registry's slasher; the invariant court replaces it on a fresh registry.
    function _rewire() internal {
        registry = new NodeRegistry(address(token), 100e18, 7 days, 1 hours, OWNER);
        court = new SLACourt(registry, address(escrow), BOND);
        vm.prank(OWNER);
        registry.setSlasher(address(court));
        vm.prank(operator);
        token.approve(address(registry), type(uint256).max);
        _register(NODE_KEY);
        _register(NODE2_KEY);
    }

    // ---- invariants

    /// forge-config: default.invariant.runs = 32
    /// forge-config: default.invariant.depth = 40
    function invariant_stakeAccountsForEveryPayment() public view {
        uint256 slashed = registry.getNode(node).slashed + registry.getNode(node2).slashed;
        vm.assertEq(slashed, handler.paidToClient(), "slashed == paid");
        vm.assertEq(token.balanceOf(CLIENT), handler.paidToClient(), "the payer got every payment");
        vm.assertEq(registry.getNode(node).stake + registry.getNode(node).slashed, STAKE, "stake never negative");
        vm.assertEq(token.balanceOf(address(registry)), 2 * STAKE - slashed);
        vm.assertEq(address(court).balance, handler.bondsHeld(), "court holds exactly the open bonds");
    }

    /// forge-config: default.invariant.runs = 32
    /// forge-config: default.invariant.depth = 40
    function invariant_noDoubleCompensation() public view {
        vm.assertEq(handler.doublePaid(), 0);
        vm.assertEq(handler.invalidAccepted(), 0, "an invalid call was accepted");
    }

    /// forge-config: default.invariant.runs = 32
    /// forge-config: default.invariant.depth = 40
    function invariant_answeringNodeNeverSlashed() public view {
        vm.assertEq(registry.getNode(node2).slashed, 0, "honest node slashed");
        vm.assertEq(registry.getNode(node2).stake, STAKE);
        uint256 n = handler.honestCount();
        for (uint256 i = 0; i < n; i++) {
            vm.assertEq(uint256(court.getDispute(handler.honestDisputes(i)).status), 2);
        }
    }

    /// @dev Every request is judged by the version in force when it was accepted (the handler predicts it
    ///      from its mirror of the published versions), and a version, once in force, is never rewritten.
    /// forge-config: default.invariant.runs = 32
    /// forge-config: default.invariant.depth = 40
    function invariant_termsChangesNeverApplyToEarlierRequests() public view {
        vm.assertEq(handler.termsMismatch(), 0, "a request was judged by other terms");
        address[2] memory nodes = [node, node2];
        for (uint256 k = 0; k < 2; k++) {
            uint256 count = handler.ghostTermsCount(nodes[k]);
            vm.assertEq(court.termsCount(nodes[k], MODEL), count, "versions");
            for (uint256 i = 0; i < count; i++) {
                ISLACourt.Terms memory g = handler.ghostTermsVersion(nodes[k], i);
                ISLACourt.Terms memory c = court.termsVersion(nodes[k], MODEL, i);
                vm.assertEq(keccak256(abi.encode(g)), keccak256(abi.encode(c)), "version rewritten");
                if (i != 0) vm.assertGt(c.validFrom, court.termsVersion(nodes[k], MODEL, i - 1).validFrom);
            }
        }
    }
}
