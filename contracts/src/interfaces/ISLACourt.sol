// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title ISLACourt
/// @notice The types, events and errors of {SLACourt}, the SLA court: what a client, a test or another
///         contract needs to build its calls and read its logs and reverts, without the implementation.
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

    event TermsPublished(address indexed node, bytes32 indexed modelId, uint256 version, Terms terms);
    event BreachCompensated(
        address indexed node,
        bytes32 indexed requestHash,
        address indexed disputer,
        bytes32 receiptId,
        uint8 brokenTerms,
        uint256 amount
    );
    event NoResponseDisputeOpened(
        bytes32 indexed disputeId,
        address indexed node,
        bytes32 indexed requestHash,
        address disputer,
        bytes32 modelId,
        uint64 answerBy,
        uint256 compensation
    );
    event DisputeAnswered(bytes32 indexed disputeId, address indexed node, bytes32 receiptId, address answeredBy);
    event DisputeFinalized(bytes32 indexed disputeId, address indexed node, address indexed disputer, uint256 amount);

    // ---------------------------------------------------------------- errors

    error NotNodeOrOperator();
    error NodeNotActive(address node);
    error InvalidTerms();
    error NoTerms(address node, bytes32 modelId, uint64 time);
    error InvalidSignature();
    error InvalidAcceptance();
    error WrongSigner(address signer, address node);
    error TermsNotBroken();
    error AlreadyClaimed(bytes32 claimKey);
    error NothingToCompensate(address node);
    error DeadlineNotPassed(uint64 deadline);
    error InvalidBond(uint256 sent, uint256 expected);
    error DisputeExists(bytes32 disputeId);
    error DisputeNotOpen(bytes32 disputeId);
    error ReceiptMismatch();
    error WindowClosed(uint64 answerBy);
    error WindowOpen(uint64 answerBy);
    error ChannelMismatch(bytes32 signed, bytes32 derived);
    error NotPayer(address caller, address payer);
}
