// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title ISLACourt
/// @notice The types, events and errors of {SLACourt} (the SLA court): what a client, a test
///         or another contract needs to build its calls and read its logs and reverts.
interface ISLACourt {
    // ---------------------------------------------------------------- types

    /// @notice The EIP-712 `Receipt` a node signs for each answer.
    struct Receipt {
        bytes32 receiptId;
        bytes32 requestHash;
        bytes32 responseHash;
        bytes32 channelId;
        bytes32 modelId;
        uint32 inputTokens;
        uint32 outputTokens;
        uint128 cost;
        uint128 cumulativeSpent;
        uint64 acceptedAt;
        uint32 ttftMs;
        uint32 durationMs;
    }

    /// @notice The EIP-712 `Acceptance` a node signs when it admits a paid request.
    struct Acceptance {
        bytes32 requestHash;
        bytes32 channelId;
        uint64 acceptedAt; // unix seconds; selects the terms in force
        uint64 deadline; // the node promises the receipt by then
    }

    /// @notice One version of a node's terms for one model. Zero bounds are no bounds.
    struct Terms {
        uint32 maxTtftMs; // time to first token
        uint32 minTokensPerSec; // decode rate after the first token
        uint32 maxDurationMs; // response deadline: the whole answer within this many ms
        uint32 responseWindow; // seconds the node has to answer a no-response dispute (> 0)
        uint32 breachCostBps; // compensation for broken terms: breachFixed + cost * bps / 10000
        uint64 validFrom; // set by the court: applies to requests accepted at or after it
        uint128 breachFixed;
        uint128 noResponseCompensation; // paid when the node never posts the receipt
    }

    enum DisputeStatus {
        None,
        Open,
        Answered,
        Finalized
    }

    /// @notice A no-response dispute (slot 0: disputer|status|deadline; slot 1: compensation; slot 2: bond).
    struct Dispute {
        address disputer;
        DisputeStatus status;
        uint64 answerBy; // the node must post the receipt at or before this time
        address node;
        uint128 compensation;
        uint128 bond;
        bytes32 requestHash;
        bytes32 channelId;
        bytes32 modelId;
    }

    // ---------------------------------------------------------------- events

    /// @notice `node` published version `version` of its terms for `modelId` (in force after the notice period).
    /// @param node The node.
    /// @param modelId The model.
    /// @param version The terms' version.
    /// @param terms The terms.
    event TermsPublished(address indexed node, bytes32 indexed modelId, uint256 version, Terms terms);
    /// @notice A receipt proved broken terms: `amount` of the node's stake went to `disputer`.
    /// @param node The node.
    /// @param requestHash The request.
    /// @param disputer Who claimed.
    /// @param receiptId The receipt.
    /// @param brokenTerms Bit set of the terms broken.
    /// @param amount The compensation.
    event BreachCompensated(
        address indexed node,
        bytes32 indexed requestHash,
        address indexed disputer,
        bytes32 receiptId,
        uint8 brokenTerms,
        uint256 amount
    );
    /// @notice A payer holding an acceptance but no answer opened a dispute; the node may answer until `answerBy`.
    /// @param disputeId The dispute.
    /// @param node The node.
    /// @param requestHash The request.
    /// @param disputer Who disputes.
    /// @param modelId The model.
    /// @param answerBy End of the node's answer window.
    /// @param compensation What finalizing pays if it does not answer.
    event NoResponseDisputeOpened(
        bytes32 indexed disputeId,
        address indexed node,
        bytes32 indexed requestHash,
        address disputer,
        bytes32 modelId,
        uint64 answerBy,
        uint256 compensation
    );
    /// @notice The node answered the dispute with a receipt for the request; the bond stays with the court.
    /// @param disputeId The dispute.
    /// @param node The node.
    /// @param receiptId The receipt.
    /// @param answeredBy Who submitted it.
    event DisputeAnswered(bytes32 indexed disputeId, address indexed node, bytes32 receiptId, address answeredBy);
    /// @notice The node did not answer in time: `amount` of its stake and the bond went to `disputer`.
    /// @param disputeId The dispute.
    /// @param node The node.
    /// @param disputer Who disputed.
    /// @param amount The compensation paid.
    event DisputeFinalized(bytes32 indexed disputeId, address indexed node, address indexed disputer, uint256 amount);

    // ---------------------------------------------------------------- errors

    /// @notice Only the node or its operator publishes the node's terms.
    error NotNodeOrOperator();
    /// @notice The node is not active in the NodeRegistry.
    /// @param node The node.
    error NodeNotActive(address node);
    /// @notice Terms with a zero bound or compensation, or a window out of range.
    error InvalidTerms();
    /// @notice The node had no terms for the model in force at that time.
    /// @param node The node.
    /// @param modelId The model.
    /// @param time The time asked about.
    error NoTerms(address node, bytes32 modelId, uint64 time);
    /// @notice A receipt or acceptance signature that does not recover (65-byte low-s only).
    error InvalidSignature();
    /// @notice An acceptance accepted after its own deadline.
    error InvalidAcceptance();
    /// @notice The receipt or acceptance is not signed by the node.
    /// @param signer Who signed it.
    /// @param node The node.
    error WrongSigner(address signer, address node);
    /// @notice The receipt meets every term: nothing to compensate.
    error TermsNotBroken();
    /// @notice This breach was compensated already.
    /// @param claimKey The claim's key.
    error AlreadyClaimed(bytes32 claimKey);
    /// @notice The node's stake is empty.
    /// @param node The node.
    error NothingToCompensate(address node);
    /// @notice The acceptance's answer deadline has not passed.
    /// @param deadline The deadline.
    error DeadlineNotPassed(uint64 deadline);
    /// @notice The ETH sent is not the dispute bond.
    /// @param sent What was sent.
    /// @param expected The bond.
    error InvalidBond(uint256 sent, uint256 expected);
    /// @notice A dispute for this request is already open or settled.
    /// @param disputeId The dispute.
    error DisputeExists(bytes32 disputeId);
    /// @notice The dispute is answered, finalized or unknown.
    /// @param disputeId The dispute.
    error DisputeNotOpen(bytes32 disputeId);
    /// @notice The receipt is for another request or channel than the dispute.
    error ReceiptMismatch();
    /// @notice The node's answer window has closed.
    /// @param answerBy Its end.
    error WindowClosed(uint64 answerBy);
    /// @notice The node may still answer: finalize after the window.
    /// @param answerBy Its end.
    error WindowOpen(uint64 answerBy);
    /// @notice The signed channel id is not the one the terms derive.
    /// @param signed The id signed.
    /// @param derived The id derived.
    error ChannelMismatch(bytes32 signed, bytes32 derived);
    /// @notice Only the channel's payer disputes for it.
    /// @param caller The caller.
    /// @param payer The payer.
    error NotPayer(address caller, address payer);
}
