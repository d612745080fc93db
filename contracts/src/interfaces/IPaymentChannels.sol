// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title IPaymentChannels
/// @notice The types, events and errors of {PaymentChannels}, the payment-channel escrow: what a client, a test or another
///         contract needs to build its calls and read its logs and reverts, without the implementation.
interface IPaymentChannels {
    // ---------------------------------------------------------------- types

    /// @notice A channel's fixed terms, never stored: callers pass them back and the contract
    ///         re-derives the id from them. Fields are in the order of the id preimage, so
    ///         `keccak256(abi.encode(params, address(this), block.chainid))` is the channel id.
    /// @dev `publisher` and `publisherBps` are the registry's terms snapshotted at open
    ///      (`publisher` is address(0) for an unregistered model; it is kept even when the royalty
    ///      is 0, since it is part of the id).
    struct ChannelParams {
        address payer;
        address payee;
        address token; // address(0) = native ETH
        bytes32 salt;
        address authorizedSigner;
        bytes32 modelId;
        address publisher;
        uint16 publisherBps;
    }

    /// @notice The mutable state of a channel, the only per-channel storage. Layout (2 slots):
    ///   slot 0: deposit (120) | settled (120) | finalized (8) | refunded (8) -- read and written by every call
    ///   slot 1: closeRequestedAt (64)                    -- written only by requestClose and topUp
    /// @dev A channel exists iff `deposit != 0` (open requires a deposit and nothing lowers it);
    ///      the record of a finalized channel is never deleted, so its id cannot be opened again.
    ///      A finalized channel owes its payer `deposit - settled` until `refunded`.
    struct ChannelState {
        uint120 deposit;
        uint120 settled;
        bool finalized;
        bool refunded;
        uint64 closeRequestedAt;
    }

    /// @notice One voucher of a {settleBatch}: the terms that differ between channels of one payee,
    ///         token and model, the cumulative amount and the signer's 65-byte ECDSA signature in its
    ///         EIP-2098 compact form (`vs = (v - 27) << 255 | s`).
    /// @dev The compact form and the shared terms halve the calldata of a voucher. A channel whose
    ///      signer is an ERC-1271 contract cannot be batched: settle it with {settle}.
    struct BatchVoucher {
        address payer;
        bytes32 salt;
        address authorizedSigner;
        uint128 cumulativeAmount;
        bytes32 r;
        bytes32 vs;
    }

    // ---------------------------------------------------------------- events

    /// @notice A channel opened. Carries every {ChannelParams} field (`payer` is the opener), so a
    ///         payee or client learns the terms to pass back from this event.
    event ChannelOpened(
        bytes32 indexed channelId,
        address indexed payer,
        address indexed payee,
        address token,
        address authorizedSigner,
        bytes32 modelId,
        address publisher,
        uint16 publisherBps,
        uint128 deposit,
        bytes32 salt
    );
    /// @notice The payer added `amount`; the deposit is now `newDeposit`.
    event ToppedUp(bytes32 indexed channelId, uint128 amount, uint128 newDeposit);
    /// @notice The payer asked to close; it may withdraw from `closableAt` unless the payee closes first.
    event CloseRequested(bytes32 indexed channelId, uint64 closableAt);
    /// @notice A top-up cancelled the pending close request.
    event CloseCancelled(bytes32 indexed channelId);
    /// @notice A voucher for `cumulativeAmount` was settled. Of the increase over the previous
    ///         `Settled` amount of the channel (0 before the first), the publisher got
    ///         `floor(new * bps / 1e4) - floor(old * bps / 1e4)` (`bps` from `ChannelOpened`) and the payee the rest.
    /// @dev The increase and the shares follow from the amounts and are not logged: one data word per
    ///      settlement (a batch's gas per channel is the goal).
    event Settled(bytes32 indexed channelId, uint128 cumulativeAmount);
    /// @notice The payee closed the channel at `settled`; the payer may claim `refund` ({claimRefund}).
    event ChannelClosed(bytes32 indexed channelId, uint128 settled, uint128 refund);
    /// @notice The payer finalized the channel after the grace period; it may claim `refund`.
    event Withdrawn(bytes32 indexed channelId, uint128 refund);
    /// @notice The payer of `channelId` was paid its `refund`.
    event RefundClaimed(bytes32 indexed channelId, address indexed payer, uint128 refund);
    /// @notice {settleBatch} skipped the voucher of `channelId`: `reason` is the selector of the
    ///         error {settle} would have reverted with (e.g. `InvalidSignature.selector`).
    event SettlementSkipped(bytes32 indexed channelId, bytes4 reason);
    /// @notice `account` was paid its whole `token` balance.
    event EarningsClaimed(address indexed token, address indexed account, uint256 amount);

    // ---------------------------------------------------------------- errors

    // Configuration.
    error InvalidModelRegistry();
    error InvalidGracePeriod(uint64 closeGracePeriod);
    // Arguments.
    error InvalidPayee();
    error InvalidSigner();
    error ZeroAmount();
    error RoyaltyMismatch(uint16 expected, uint16 actual);
    /// @dev The registry returned a royalty above 10_000 bps (settle's arithmetic relies on the bound).
    error InvalidRoyalty(uint16 bps);
    // Channel state and roles.
    error ChannelExists(bytes32 channelId);
    error ChannelNotFound(bytes32 channelId);
    error ChannelFinalized(bytes32 channelId);
    error NotPayer();
    error NotPayee();
    // Funds.
    error InvalidMsgValue(uint256 sent, uint256 expected);
    error FeeOnTransferToken();
    /// @dev A deposit, or a deposit after a top-up, above type(uint120).max.
    error DepositOverflow();
    // Vouchers: `settled < cumulativeAmount <= deposit` and a valid signature.
    error AmountNotIncreasing(uint128 cumulativeAmount, uint128 settled);
    error AmountExceedsDeposit(uint128 cumulativeAmount, uint128 deposit);
    error InvalidSignature();
    // Closing.
    error CloseAlreadyRequested(bytes32 channelId);
    error CloseNotRequested(bytes32 channelId);
    error GracePeriodActive(uint64 closableAt);
    // Claims.
    error NothingToClaim();
    /// @dev A refund is claimed once the channel is finalized (`close` or `withdraw`).
    error ChannelNotFinalized(bytes32 channelId);
    error RefundAlreadyClaimed(bytes32 channelId);
    error EthTransferFailed();
}
