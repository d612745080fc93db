// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Address} from "@openzeppelin/contracts/utils/Address.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {INodeRegistry} from "./interfaces/INodeRegistry.sol";
import {IPaymentChannels} from "./interfaces/IPaymentChannels.sol";
import {ISLACourt} from "./interfaces/ISLACourt.sol";

/// @title SLACourt
/// @notice Judges a node's service-level terms and its Proof of Response against its registry stake.
///         A node publishes terms per model; a client proves a broken term with a receipt the node
///         signed, or claims a missing answer with an acceptance the node signed, which the node
///         refutes by posting the matching receipt within the response window.
/// @dev Signed types (domain `{name: "dcml-receipts", version: "1", chainId, verifyingContract: this}`),
///      exactly those of `client/receipts.py`:
///        Receipt(bytes32 receiptId,bytes32 requestHash,bytes32 responseHash,bytes32 channelId,bytes32 modelId,
///                uint32 inputTokens,uint32 outputTokens,uint128 cost,uint128 cumulativeSpent,uint64 acceptedAt,
///                uint32 ttftMs,uint32 durationMs)
///        Acceptance(bytes32 requestHash,bytes32 channelId,uint64 acceptedAt,uint64 deadline)
///      The signer must be the node's address in the NodeRegistry (the enclave key); 65-byte low-s only.
///
///      Who is compensated: the channel's payer, and only the payer may claim. Both disputes carry the
///      channel's {IPaymentChannels.ChannelParams}; the court re-derives the channel id exactly as the escrow
///      does (`keccak256(abi.encode(params, escrow, block.chainid))`), requires it to be the id the node
///      signed, and requires `msg.sender == params.payer`. So a claim copied from the mempool by anyone else
///      reverts (`NotPayer`). The channel need not still be open: its id alone binds the payer.
///      A no-response dispute costs a bond (`disputeBond`, native ETH) that the payer gets back only if the
///      node does not answer, and that goes to whoever posts the answer otherwise, so challenging an
///      answering node costs the challenger.
///
///      Terms are versioned: a version published at time T is valid from T + 1, so requests accepted at or
///      before T (receipt and acceptance `acceptedAt`) keep the older terms. `acceptedAt` is the node's
///      signed word; clients refuse an acceptance or receipt whose `acceptedAt` is far from their own
///      clock, so a node cannot move a request under older terms. An acceptance carries no model id: the
///      disputer names the model whose terms apply (the node is bound by every set of terms it published).
///
///      What the node signs (node/api/openai.py): ttftMs and durationMs are counted from the moment the whole
///      request was read and admitted, and durationMs leaves out the time the stream waited for the payer's
///      vouchers, so neither a trickled body nor a withheld voucher is the node's time.
///      Rate: tokens after the first, over the time after the first token: a receipt breaks
///      `minTokensPerSec` iff outputTokens > 1, durationMs > ttftMs and
///      (outputTokens - 1) * 1000 < minTokensPerSec * (durationMs - ttftMs). A zero bound is no bound.
///      Compensation is capped by the node's remaining stake; nothing is owed by a withdrawn node.
///      An open no-response dispute locks the node's stake in the registry (`lockStake`) until it is
///      answered or finalized, so a node cannot exit and withdraw before the court judges it.
contract SLACourt is ISLACourt, EIP712, ReentrancyGuardTransient {
    // ---------------------------------------------------------------- constants

    bytes32 public constant RECEIPT_TYPEHASH = keccak256(
        "Receipt(bytes32 receiptId,bytes32 requestHash,bytes32 responseHash,bytes32 channelId,bytes32 modelId,"
        "uint32 inputTokens,uint32 outputTokens,uint128 cost,uint128 cumulativeSpent,uint64 acceptedAt,"
        "uint32 ttftMs,uint32 durationMs)"
    );
    bytes32 public constant ACCEPTANCE_TYPEHASH =
        keccak256("Acceptance(bytes32 requestHash,bytes32 channelId,uint64 acceptedAt,uint64 deadline)");
    uint32 public constant MAX_RESPONSE_WINDOW = 7 days;
    uint32 public constant MAX_BPS = 10_000 * 100; // at most 100x the cost

    // ---------------------------------------------------------------- storage

    INodeRegistry public immutable registry;
    /// @notice The PaymentChannels escrow whose channel ids receipts and acceptances name.
    address public immutable escrow;
    /// @notice Native-ETH bond for opening a no-response dispute.
    uint256 public immutable disputeBond;

    mapping(address node => mapping(bytes32 modelId => Terms[])) private _terms;
    /// @notice keccak256(node, requestHash) => true once a broken-terms claim for that request was paid.
    mapping(bytes32 claimKey => bool) public breachClaimed;
    mapping(bytes32 disputeId => Dispute) private _disputes;

    // ---------------------------------------------------------------- constructor

    /// @param registry_ The NodeRegistry whose slasher this court must be.
    /// @param escrow_ The PaymentChannels escrow (its address is part of every channel id).
    /// @param disputeBond_ Native-ETH bond for a no-response dispute (0 allowed).
    constructor(INodeRegistry registry_, address escrow_, uint256 disputeBond_) EIP712("dcml-receipts", "1") {
        registry = registry_;
        escrow = escrow_;
        disputeBond = disputeBond_;
    }

    // ---------------------------------------------------------------- terms

    /// @notice Publishes new terms for `node` and `modelId`, valid from the next second on. Callable by
    ///         the node's operator or the node key itself, while the node is active.
    function publishTerms(address node, bytes32 modelId, Terms calldata t) external returns (uint256 version) {
        INodeRegistry.Node memory n = registry.getNode(node);
        if (msg.sender != n.operator && msg.sender != node) revert NotNodeOrOperator();
        if (n.status != INodeRegistry.Status.Active) revert NodeNotActive(node);
        if (t.responseWindow == 0 || t.responseWindow > MAX_RESPONSE_WINDOW || t.breachCostBps > MAX_BPS) {
            revert InvalidTerms();
        }
        Terms memory stored = t;
        stored.validFrom = uint64(block.timestamp) + 1;
        Terms[] storage list = _terms[node][modelId];
        uint256 len = list.length;
        if (len != 0 && list[len - 1].validFrom == stored.validFrom) {
            // Not yet in force for any request: replace the pending version.
            version = len - 1;
            list[version] = stored;
        } else {
            version = len;
            list.push(stored);
        }
        emit TermsPublished(node, modelId, version, stored);
    }

    // ---------------------------------------------------------------- disputes

    /// @notice Claims compensation for a receipt whose own figures break the node's terms in force at
    ///         its `acceptedAt`. Each (node, request) is compensated at most once. `params` are the terms
    ///         of the receipt's channel; only their payer may claim, and is paid.
    function claimBreach(
        address node,
        IPaymentChannels.ChannelParams calldata params,
        Receipt calldata r,
        bytes calldata signature
    ) external nonReentrant returns (uint256 amount) {
        _checkPayer(params, r.channelId);
        _checkSigner(hashReceipt(r), signature, node);
        bytes32 key = claimKey(node, r.requestHash);
        if (breachClaimed[key]) revert AlreadyClaimed(key);
        Terms memory t = termsAt(node, r.modelId, r.acceptedAt);
        uint8 broken = brokenTerms(t, r);
        if (broken == 0) revert TermsNotBroken();
        breachClaimed[key] = true;
        amount = _capped(node, uint256(t.breachFixed) + uint256(r.cost) * t.breachCostBps / 10_000);
        if (amount == 0) revert NothingToCompensate(node);
        emit BreachCompensated(node, r.requestHash, params.payer, r.receiptId, broken, amount);
        registry.slash(node, amount, params.payer);
    }

    /// @notice Opens a no-response dispute on an acceptance whose deadline has passed; send
    ///         `disputeBond` as value. `modelId` names the terms to apply (see the contract doc). `params`
    ///         are the terms of the acceptance's channel; only their payer may open it, and is paid.
    function openNoResponse(
        address node,
        bytes32 modelId,
        IPaymentChannels.ChannelParams calldata params,
        Acceptance calldata a,
        bytes calldata signature
    ) external payable returns (bytes32 id) {
        if (msg.value != disputeBond) revert InvalidBond(msg.value, disputeBond);
        _checkPayer(params, a.channelId);
        _checkSigner(hashAcceptance(a), signature, node);
        // forge-lint: disable-next-line(block-timestamp)
        if (block.timestamp <= a.deadline) revert DeadlineNotPassed(a.deadline);
        id = disputeId(node, a.requestHash);
        if (_disputes[id].status != DisputeStatus.None) revert DisputeExists(id);
        if (a.acceptedAt > a.deadline) revert InvalidAcceptance();
        Terms memory t = termsAt(node, modelId, a.acceptedAt);
        uint64 answerBy = uint64(block.timestamp) + t.responseWindow;
        _disputes[id] = Dispute({
            disputer: params.payer,
            status: DisputeStatus.Open,
            answerBy: answerBy,
            node: node,
            compensation: t.noResponseCompensation,
            // casting to 'uint128' is safe: a bond above 2^128 wei cannot be sent
            // forge-lint: disable-next-line(unsafe-typecast)
            bond: uint128(msg.value),
            requestHash: a.requestHash,
            channelId: a.channelId,
            modelId: modelId
        });
        emit NoResponseDisputeOpened(id, node, a.requestHash, params.payer, modelId, answerBy, t.noResponseCompensation);
        registry.lockStake(node); // released by answer or finalize: no withdrawal in between
    }

    /// @notice Closes an open no-response dispute with the node's receipt for the same request and channel,
    ///         at or before `answerBy`. Anyone may post it; the bond goes to the caller.
    function answer(bytes32 id, Receipt calldata r, bytes calldata signature) external nonReentrant {
        Dispute storage d = _disputes[id];
        if (d.status != DisputeStatus.Open) revert DisputeNotOpen(id);
        // forge-lint: disable-next-line(block-timestamp)
        if (block.timestamp > d.answerBy) revert WindowClosed(d.answerBy);
        if (r.requestHash != d.requestHash || r.channelId != d.channelId) revert ReceiptMismatch();
        _checkSigner(hashReceipt(r), signature, d.node);
        d.status = DisputeStatus.Answered;
        uint256 bond = d.bond;
        emit DisputeAnswered(id, d.node, r.receiptId, msg.sender);
        registry.unlockStake(d.node);
        if (bond != 0) Address.sendValue(payable(msg.sender), bond);
    }

    /// @notice After `answerBy` with no answer: slashes the node (capped by its stake) to the disputer
    ///         and returns the bond. Anyone may call it.
    function finalize(bytes32 id) external nonReentrant returns (uint256 amount) {
        Dispute storage d = _disputes[id];
        if (d.status != DisputeStatus.Open) revert DisputeNotOpen(id);
        // forge-lint: disable-next-line(block-timestamp)
        if (block.timestamp <= d.answerBy) revert WindowOpen(d.answerBy);
        d.status = DisputeStatus.Finalized;
        address node = d.node;
        address disputer = d.disputer;
        uint256 bond = d.bond;
        amount = _capped(node, d.compensation);
        emit DisputeFinalized(id, node, disputer, amount);
        if (amount != 0) registry.slash(node, amount, disputer);
        registry.unlockStake(node);
        if (bond != 0) Address.sendValue(payable(disputer), bond);
    }

    // ---------------------------------------------------------------- views

    /// @notice The terms of `node` for `modelId` in force at `time` (reverts when there are none).
    function termsAt(address node, bytes32 modelId, uint64 time) public view returns (Terms memory) {
        Terms[] storage list = _terms[node][modelId];
        for (uint256 i = list.length; i != 0; --i) {
            if (list[i - 1].validFrom <= time) return list[i - 1];
        }
        revert NoTerms(node, modelId, time);
    }

    /// @notice How many versions of terms `node` published for `modelId`.
    function termsCount(address node, bytes32 modelId) external view returns (uint256) {
        return _terms[node][modelId].length;
    }

    /// @notice Version `i` of the terms of `node` for `modelId`.
    function termsVersion(address node, bytes32 modelId, uint256 i) external view returns (Terms memory) {
        return _terms[node][modelId][i];
    }

    /// @notice Bit set of the terms `r` breaks: 1 = TTFT, 2 = tokens per second, 4 = duration.
    function brokenTerms(Terms memory t, Receipt calldata r) public pure returns (uint8 broken) {
        if (t.maxTtftMs != 0 && r.ttftMs > t.maxTtftMs) broken |= 1;
        if (t.minTokensPerSec != 0 && r.outputTokens > 1 && r.durationMs > r.ttftMs) {
            if (uint256(r.outputTokens - 1) * 1000 < uint256(t.minTokensPerSec) * (r.durationMs - r.ttftMs)) {
                broken |= 2;
            }
        }
        if (t.maxDurationMs != 0 && r.durationMs > t.maxDurationMs) broken |= 4;
    }

    function getDispute(bytes32 id) external view returns (Dispute memory) {
        return _disputes[id];
    }

    function disputeId(address node, bytes32 requestHash) public pure returns (bytes32) {
        return keccak256(abi.encode(node, requestHash));
    }

    function claimKey(address node, bytes32 requestHash) public pure returns (bytes32) {
        return keccak256(abi.encode(node, requestHash));
    }

    /// @notice The EIP-712 digest of a receipt under this court's domain.
    function hashReceipt(Receipt calldata r) public view returns (bytes32) {
        bytes memory enc = abi.encode(
            RECEIPT_TYPEHASH,
            r.receiptId,
            r.requestHash,
            r.responseHash,
            r.channelId,
            r.modelId,
            r.inputTokens,
            r.outputTokens,
            r.cost,
            r.cumulativeSpent,
            r.acceptedAt,
            r.ttftMs,
            r.durationMs
        );
        return _hashTypedDataV4(keccak256(enc));
    }

    /// @notice Who signed `r` under this court's domain (the zero address for a malformed or high-s
    ///         signature): lets anyone check a receipt against a node's registered key in one call.
    function receiptSigner(Receipt calldata r, bytes calldata signature) external view returns (address signer) {
        ECDSA.RecoverError err;
        (signer, err,) = ECDSA.tryRecover(hashReceipt(r), signature);
        if (err != ECDSA.RecoverError.NoError) signer = address(0);
    }

    /// @notice The EIP-712 digest of an acceptance under this court's domain.
    function hashAcceptance(Acceptance calldata a) public view returns (bytes32) {
        return _hashTypedDataV4(
            keccak256(abi.encode(ACCEPTANCE_TYPEHASH, a.requestHash, a.channelId, a.acceptedAt, a.deadline))
        );
    }

    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    /// @notice The id PaymentChannels gives the channel with these terms on this chain.
    function channelIdOf(IPaymentChannels.ChannelParams calldata params) public view returns (bytes32) {
        return keccak256(abi.encode(params, escrow, block.chainid));
    }

    // ---------------------------------------------------------------- internal

    /// @dev `params` must hash to the signed `channelId` and the caller must be their payer.
    function _checkPayer(IPaymentChannels.ChannelParams calldata params, bytes32 channelId) private view {
        bytes32 derived = channelIdOf(params);
        if (derived != channelId) revert ChannelMismatch(channelId, derived);
        if (msg.sender != params.payer) revert NotPayer(msg.sender, params.payer);
    }

    function _checkSigner(bytes32 digest, bytes calldata signature, address node) private pure {
        (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecover(digest, signature);
        if (err != ECDSA.RecoverError.NoError) revert InvalidSignature();
        if (signer != node) revert WrongSigner(signer, node);
    }

    /// @dev `amount` capped by what the registry can still slash from `node` (0 once it is withdrawn).
    function _capped(address node, uint256 amount) private view returns (uint256) {
        INodeRegistry.Node memory n = registry.getNode(node);
        if (n.status != INodeRegistry.Status.Active && n.status != INodeRegistry.Status.Exiting) return 0;
        return amount < n.stake ? amount : n.stake;
    }
}
