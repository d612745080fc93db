// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title IPaymentChannels
/// @notice The types, events and errors of {PaymentChannels} (the payment-channel escrow): what a client, a test
///         or another contract needs to build its calls and read its logs and reverts.
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
    /// @notice The model registry has no code.
    error InvalidModelRegistry();
    /// @notice The grace period is zero or above 30 days.
    /// @param closeGracePeriod The period asked for.
    error InvalidGracePeriod(uint64 closeGracePeriod);
    // Arguments.
    /// @notice The payee is zero or the payer itself.
    error InvalidPayee();
    /// @notice The authorized signer is the zero address.
    error InvalidSigner();
    /// @notice A deposit or top-up of zero.
    error ZeroAmount();
    /// @notice The registry's royalty is not the one the payer agreed to (a change front-ran the open).
    /// @param expected The royalty the payer expected.
    /// @param actual The registry's.
    error RoyaltyMismatch(uint16 expected, uint16 actual);
    /// @notice A royalty above 10,000 bps.
    /// @param bps The royalty.
    /// @dev The registry returned a royalty above 10_000 bps (settle's arithmetic relies on the bound).
    error InvalidRoyalty(uint16 bps);
    // Channel state and roles.
    /// @notice A channel with this id was opened before (ids are never reused).
    /// @param channelId The id.
    error ChannelExists(bytes32 channelId);
    /// @notice No channel has these terms: the id they derive was never opened.
    /// @param channelId The id derived from the terms.
    error ChannelNotFound(bytes32 channelId);
    /// @notice The channel is closed or withdrawn.
    /// @param channelId The channel.
    error ChannelFinalized(bytes32 channelId);
    /// @notice The caller is not the channel's payer.
    error NotPayer();
    /// @notice The caller is not the channel's payee.
    error NotPayee();
    // Funds.
    /// @notice The ETH sent is not the amount (ETH channel) or not zero (ERC-20 channel).
    /// @param sent What was sent.
    /// @param expected What was expected.
    error InvalidMsgValue(uint256 sent, uint256 expected);
    /// @notice The escrow received less than the deposit (a fee-on-transfer token).
    error FeeOnTransferToken();
    /// @dev A deposit, or a deposit after a top-up, above type(uint120).max.
    error DepositOverflow();
    // Vouchers: `settled < cumulativeAmount <= deposit` and a valid signature.
    /// @notice The voucher's cumulative amount is not above what is settled (a replay or an old voucher).
    /// @param cumulativeAmount The voucher's amount.
    /// @param settled The settled amount.
    error AmountNotIncreasing(uint128 cumulativeAmount, uint128 settled);
    /// @notice The voucher's cumulative amount is above the deposit.
    /// @param cumulativeAmount The voucher's amount.
    /// @param deposit The deposit.
    error AmountExceedsDeposit(uint128 cumulativeAmount, uint128 deposit);
    /// @notice The channel's authorized signer did not sign this voucher (65-byte low-s ECDSA, or ERC-1271).
    error InvalidSignature();
    // Closing.
    /// @notice A close request is already pending.
    /// @param channelId The channel.
    error CloseAlreadyRequested(bytes32 channelId);
    /// @notice The payer has not requested a close.
    /// @param channelId The channel.
    error CloseNotRequested(bytes32 channelId);
    /// @notice The grace period after the close request has not passed.
    /// @param closableAt When the payer may withdraw.
    error GracePeriodActive(uint64 closableAt);
    // Claims.
    /// @notice The balance (or refund) is zero.
    error NothingToClaim();
    /// @notice The channel is still open: its refund is not due yet.
    /// @param channelId The channel.
    /// @dev A refund is claimed once the channel is finalized (`close` or `withdraw`).
    error ChannelNotFinalized(bytes32 channelId);
    /// @notice The payer already claimed this channel's refund.
    /// @param channelId The channel.
    error RefundAlreadyClaimed(bytes32 channelId);
    /// @notice The recipient rejected the ETH (its own claim fails; nobody else's).
    error EthTransferFailed();
}
