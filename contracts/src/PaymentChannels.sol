// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

import {ModelRegistry} from "./ModelRegistry.sol";

/// @title PaymentChannels
/// @notice Unidirectional payer -> payee escrow paid by cumulative EIP-712 vouchers (the MPP/Tempo
///         "payee settles" design), in native ETH (`token == address(0)`) or an ERC-20 token.
///         A model publisher's royalty, read from {ModelRegistry} and snapshotted at open, is split
///         off every settlement. Every payout (payee, publisher and the payer's refund) is credited
///         to a pull balance and claimed with {claimEarnings}, so no recipient can block a close.
/// @dev Lifecycle: `open` -> (`topUp` | `settle`)* -> `close` by the payee, or `requestClose` by the
///      payer -> grace period -> `withdraw` by the payer. The payee can still settle while a close
///      is pending, even after the grace period, until the payer withdraws; `topUp` cancels a
///      pending close. A finalized channel keeps its record forever (its id can never be reopened,
///      which would make old vouchers valid again).
///
///      Vouchers are `Voucher(bytes32 channelId,uint128 cumulativeAmount)` under the domain
///      `{name: "PaymentChannels", version: "1", chainId, verifyingContract}`, signed by the
///      channel's `authorizedSigner`: 65-byte low-s ECDSA for an EOA, ERC-1271 for a contract
///      (OpenZeppelin `SignatureChecker`). The channel id commits to chain id and contract too.
///
///      A channel's payer cannot be its payee: a self-channel has no use and would let one account
///      hold both roles. Fee-on-transfer tokens are rejected at deposit; rebasing tokens are not
///      supported (the escrow would hold more or less than it accounts for).
contract PaymentChannels is EIP712, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    // ---------------------------------------------------------------- types

    /// @notice A channel record. Storage layout (6 slots, packed on purpose):
    ///   slot 0: payee (160) | publisherBps (16) | finalized (8)   -- everything settle/close check first
    ///   slot 1: deposit (128) | settled (128)
    ///   slot 2: payer (160) | closeRequestedAt (64)              -- everything the payer's calls check
    ///   slot 3: token (160)                                       -- zero for ETH (never written)
    ///   slot 4: authorizedSigner (160)
    ///   slot 5: publisher (160)                                   -- written only when publisherBps > 0
    /// @dev `modelId` and `salt` are not stored: they are only needed to derive the id, and they are
    ///      in the `ChannelOpened` event. `publisher` is zero when the royalty is zero (no one to pay).
    struct Channel {
        address payee;
        uint16 publisherBps;
        bool finalized;
        uint128 deposit;
        uint128 settled;
        address payer;
        uint64 closeRequestedAt;
        address token;
        address authorizedSigner;
        address publisher;
    }

    // ---------------------------------------------------------------- constants

    /// @notice EIP-712 type hash of a voucher.
    bytes32 public constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint128 cumulativeAmount)");

    /// @notice Upper bound on the grace period, so a payer's refund cannot be locked for good.
    uint64 public constant MAX_CLOSE_GRACE_PERIOD = 30 days;

    uint256 private constant BPS = 10_000;

    // ---------------------------------------------------------------- state

    /// @notice The registry whose `terms(modelId)` give the publisher and its royalty at open.
    address public immutable modelRegistry;

    /// @notice Seconds between a payer's `requestClose` and the earliest `withdraw`.
    uint64 public immutable closeGracePeriod;

    mapping(bytes32 channelId => Channel) private _channels;

    /// @notice Claimable balance of `account` in `token` (address(0) = ETH).
    mapping(address token => mapping(address account => uint256)) public earnings;

    // ---------------------------------------------------------------- events

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
    event ToppedUp(bytes32 indexed channelId, uint128 amount, uint128 newDeposit);
    event CloseRequested(bytes32 indexed channelId, uint64 closableAt);
    event CloseCancelled(bytes32 indexed channelId);
    event Settled(
        bytes32 indexed channelId, uint128 cumulativeAmount, uint128 delta, uint128 payeeShare, uint128 publisherShare
    );
    event ChannelClosed(bytes32 indexed channelId, uint128 settled, uint128 refund);
    event Withdrawn(bytes32 indexed channelId, uint128 refund);
    event EarningsClaimed(address indexed token, address indexed account, uint256 amount);

    // ---------------------------------------------------------------- errors

    error InvalidModelRegistry();
    error InvalidGracePeriod(uint64 closeGracePeriod);
    error InvalidPayee();
    error InvalidSigner();
    error ZeroAmount();
    error RoyaltyMismatch(uint16 expected, uint16 actual);
    error ChannelExists(bytes32 channelId);
    error ChannelNotFound(bytes32 channelId);
    error ChannelFinalized(bytes32 channelId);
    error NotPayer();
    error NotPayee();
    error InvalidMsgValue(uint256 sent, uint256 expected);
    error FeeOnTransferToken();
    error DepositOverflow();
    error AmountNotIncreasing(uint128 cumulativeAmount, uint128 settled);
    error AmountExceedsDeposit(uint128 cumulativeAmount, uint128 deposit);
    error InvalidSignature();
    error CloseAlreadyRequested(bytes32 channelId);
    error CloseNotRequested(bytes32 channelId);
    error GracePeriodActive(uint64 closableAt);
    error NothingToClaim();
    error EthTransferFailed();

    // ---------------------------------------------------------------- constructor

    /// @param modelRegistry_ The {ModelRegistry} consulted at open.
    /// @param closeGracePeriod_ Seconds the payee has to settle after a `requestClose`
    ///        (0 < grace <= 30 days; use at least 15 minutes on a live chain).
    constructor(address modelRegistry_, uint64 closeGracePeriod_) EIP712("PaymentChannels", "1") {
        if (modelRegistry_.code.length == 0) revert InvalidModelRegistry();
        if (closeGracePeriod_ == 0 || closeGracePeriod_ > MAX_CLOSE_GRACE_PERIOD) {
            revert InvalidGracePeriod(closeGracePeriod_);
        }
        modelRegistry = modelRegistry_;
        closeGracePeriod = closeGracePeriod_;
    }

    // ---------------------------------------------------------------- external functions

    /// @notice Opens a channel from the caller to `payee` and escrows `deposit`.
    /// @dev For ETH send exactly `deposit` as value; for an ERC-20 send no value and approve this
    ///      contract first. The publisher's terms are read from the registry now and snapshotted;
    ///      `expectedPublisherBps` protects the payer from a royalty change front-running the open.
    ///      A model id the registry does not know opens a channel without royalty (expect 0).
    /// @param payee Who may settle vouchers and close (not the caller, not zero).
    /// @param token ERC-20 token, or address(0) for native ETH.
    /// @param deposit Amount escrowed (> 0).
    /// @param salt Any value that makes the id unique among channels with the same parameters.
    /// @param authorizedSigner Key (EOA, or ERC-1271 contract) that signs this channel's vouchers.
    /// @param modelId Model whose publisher receives the royalty.
    /// @param expectedPublisherBps The royalty the caller agreed to; open reverts if it differs.
    /// @return channelId The id, see {computeChannelId}.
    function open(
        address payee,
        address token,
        uint128 deposit,
        bytes32 salt,
        address authorizedSigner,
        bytes32 modelId,
        uint16 expectedPublisherBps
    ) external payable nonReentrant returns (bytes32 channelId) {
        // Checks (the rest are in _createChannel).
        if (payee == address(0) || payee == msg.sender) revert InvalidPayee();
        if (authorizedSigner == address(0)) revert InvalidSigner();
        if (deposit == 0) revert ZeroAmount();
        _checkValue(token, deposit);

        // Effects.
        channelId = _createChannel(payee, token, deposit, salt, authorizedSigner, modelId, expectedPublisherBps);

        // Interaction last: pull the ERC-20 deposit (the guard blocks a re-entering token).
        _pullToken(token, deposit);
    }

    /// @notice Adds `amount` to the deposit of a channel; cancels a pending close request.
    /// @dev Payer only. For ETH send exactly `amount` as value; for an ERC-20 send no value.
    /// @param channelId The channel.
    /// @param amount Amount added (> 0); the new deposit must fit in uint128.
    function topUp(bytes32 channelId, uint128 amount) external payable nonReentrant {
        // Checks.
        Channel storage ch = _channels[channelId];
        _checkPayer(ch, channelId);
        if (amount == 0) revert ZeroAmount();
        address token = ch.token;
        _checkValue(token, amount);
        uint128 deposit = ch.deposit;
        if (amount > type(uint128).max - deposit) revert DepositOverflow();

        // Effects.
        uint128 newDeposit = deposit + amount;
        ch.deposit = newDeposit;
        if (ch.closeRequestedAt != 0) {
            ch.closeRequestedAt = 0;
            emit CloseCancelled(channelId);
        }
        emit ToppedUp(channelId, amount, newDeposit);

        // Interaction last.
        _pullToken(token, amount);
    }

    /// @notice Settles a voucher: pays the channel's payee and publisher the increase of the
    ///         cumulative amount over what was already settled.
    /// @dev Payee only. Allowed while a close is pending, even after the grace period, until the
    ///      payer withdraws. Requires `settled < cumulativeAmount <= deposit`. The publisher is
    ///      credited `floor(new * bps / 1e4) - floor(old * bps / 1e4)` and the payee the rest, so
    ///      rounding never drifts. No external call other than an ERC-1271 `staticcall`.
    /// @param channelId The channel.
    /// @param cumulativeAmount Total the payer has authorized so far.
    /// @param signature The authorized signer's EIP-712 signature of the voucher ({hashVoucher}).
    function settle(bytes32 channelId, uint128 cumulativeAmount, bytes calldata signature) external nonReentrant {
        Channel storage ch = _channels[channelId];
        (address payee, uint16 bps) = _checkPayee(ch, channelId);
        _settle(ch, channelId, payee, bps, cumulativeAmount, signature);
    }

    /// @notice Closes a channel: settles `cumulativeAmount` if it is above what is settled, then
    ///         refunds the rest of the deposit to the payer and finalizes the channel.
    /// @dev Payee only. With `cumulativeAmount <= settled` the channel closes at the settled amount
    ///      and `signature` is ignored (a payee may close without a new voucher).
    /// @param channelId The channel.
    /// @param cumulativeAmount Total the payer has authorized so far (or anything <= settled).
    /// @param signature The voucher signature when `cumulativeAmount > settled`.
    function close(bytes32 channelId, uint128 cumulativeAmount, bytes calldata signature) external nonReentrant {
        Channel storage ch = _channels[channelId];
        (address payee, uint16 bps) = _checkPayee(ch, channelId);
        if (cumulativeAmount > ch.settled) _settle(ch, channelId, payee, bps, cumulativeAmount, signature);
        (uint128 settled, uint128 refund) = _finalize(ch);
        emit ChannelClosed(channelId, settled, refund);
    }

    /// @notice Starts the grace period after which the payer may withdraw the unsettled deposit.
    /// @dev Payer only; once per pending request (`topUp` cancels it).
    /// @param channelId The channel.
    function requestClose(bytes32 channelId) external nonReentrant {
        Channel storage ch = _channels[channelId];
        _checkPayer(ch, channelId);
        if (ch.closeRequestedAt != 0) revert CloseAlreadyRequested(channelId);

        ch.closeRequestedAt = uint64(block.timestamp);
        emit CloseRequested(channelId, uint64(block.timestamp) + closeGracePeriod);
    }

    /// @notice Refunds the unsettled deposit to the payer and finalizes the channel, once the grace
    ///         period after `requestClose` has passed.
    /// @dev Payer only. The refund is credited to the payer's pull balance ({claimEarnings}).
    /// @param channelId The channel.
    function withdraw(bytes32 channelId) external nonReentrant {
        Channel storage ch = _channels[channelId];
        _checkPayer(ch, channelId);
        uint64 requestedAt = ch.closeRequestedAt;
        if (requestedAt == 0) revert CloseNotRequested(channelId);
        uint64 closableAt = requestedAt + closeGracePeriod;
        if (block.timestamp < closableAt) revert GracePeriodActive(closableAt);

        (, uint128 refund) = _finalize(ch);
        emit Withdrawn(channelId, refund);
    }

    /// @notice Sends the caller its whole balance in `token` (address(0) = ETH).
    /// @dev Effects before the transfer; a recipient that rejects ETH only blocks its own claim.
    /// @param token The token to claim.
    /// @return amount The amount sent.
    function claimEarnings(address token) external nonReentrant returns (uint256 amount) {
        amount = earnings[token][msg.sender];
        if (amount == 0) revert NothingToClaim();

        earnings[token][msg.sender] = 0;
        emit EarningsClaimed(token, msg.sender, amount);

        if (token == address(0)) {
            (bool ok,) = msg.sender.call{value: amount}("");
            if (!ok) revert EthTransferFailed();
        } else {
            IERC20(token).safeTransfer(msg.sender, amount);
        }
    }

    // ---------------------------------------------------------------- internal functions

    /// @dev Reverts unless the channel exists, is open and the caller is its payee.
    function _checkPayee(Channel storage ch, bytes32 channelId) private view returns (address payee, uint16 bps) {
        payee = ch.payee;
        bps = ch.publisherBps;
        if (payee == address(0)) revert ChannelNotFound(channelId);
        if (msg.sender != payee) revert NotPayee();
        if (ch.finalized) revert ChannelFinalized(channelId);
    }

    /// @dev Reverts unless the channel exists, is open and the caller is its payer.
    function _checkPayer(Channel storage ch, bytes32 channelId) private view {
        address payer = ch.payer;
        if (payer == address(0)) revert ChannelNotFound(channelId);
        if (msg.sender != payer) revert NotPayer();
        if (ch.finalized) revert ChannelFinalized(channelId);
    }

    /// @dev Snapshots the publisher terms, derives the id and writes the record.
    function _createChannel(
        address payee,
        address token,
        uint128 deposit,
        bytes32 salt,
        address authorizedSigner,
        bytes32 modelId,
        uint16 expectedPublisherBps
    ) private returns (bytes32 channelId) {
        (address publisher, uint16 bps) = ModelRegistry(modelRegistry).terms(modelId);
        if (bps != expectedPublisherBps) revert RoyaltyMismatch(expectedPublisherBps, bps);
        channelId = _channelId(msg.sender, payee, token, salt, authorizedSigner, modelId, publisher, bps);
        Channel storage ch = _channels[channelId];
        // A finalized record keeps its payee, so an id can never be opened twice.
        if (ch.payee != address(0)) revert ChannelExists(channelId);

        // Zero fields are left unwritten (the ETH token, the publisher of a zero royalty).
        ch.payee = payee;
        ch.publisherBps = bps;
        ch.deposit = deposit;
        ch.payer = msg.sender;
        if (token != address(0)) ch.token = token;
        ch.authorizedSigner = authorizedSigner;
        if (bps != 0) ch.publisher = publisher;
        _emitOpened(channelId, ch, token, modelId, publisher, salt);
    }

    /// @dev Split out of _createChannel to keep the stack shallow; reads back warm slots.
    function _emitOpened(
        bytes32 channelId,
        Channel storage ch,
        address token,
        bytes32 modelId,
        address publisher,
        bytes32 salt
    ) private {
        emit ChannelOpened(
            channelId,
            msg.sender,
            ch.payee,
            token,
            ch.authorizedSigner,
            modelId,
            publisher,
            ch.publisherBps,
            ch.deposit,
            salt
        );
    }

    /// @dev Verifies a voucher and credits the delta. The caller has checked payee and finality.
    function _settle(
        Channel storage ch,
        bytes32 channelId,
        address payee,
        uint16 bps,
        uint128 cumulativeAmount,
        bytes calldata signature
    ) private {
        // Checks.
        uint128 settled = ch.settled;
        uint128 deposit = ch.deposit;
        if (cumulativeAmount <= settled) revert AmountNotIncreasing(cumulativeAmount, settled);
        if (cumulativeAmount > deposit) revert AmountExceedsDeposit(cumulativeAmount, deposit);
        if (!SignatureChecker.isValidSignatureNowCalldata(
                ch.authorizedSigner, hashVoucher(channelId, cumulativeAmount), signature
            )) revert InvalidSignature();

        // Effects (all of the delta is credited, or the call reverts).
        ch.settled = cumulativeAmount;
        uint128 delta = cumulativeAmount - settled;
        address token = ch.token;
        uint128 publisherShare;
        if (bps != 0) {
            // Both royalties are <= their amounts < 2^128 and the difference is <= delta.
            publisherShare = uint128(_royalty(cumulativeAmount, bps) - _royalty(settled, bps));
            if (publisherShare != 0) earnings[token][ch.publisher] += publisherShare;
        }
        uint128 payeeShare = delta - publisherShare;
        if (payeeShare != 0) earnings[token][payee] += payeeShare;
        emit Settled(channelId, cumulativeAmount, delta, payeeShare, publisherShare);
    }

    /// @dev Marks the channel finalized and credits the payer with `deposit - settled`.
    function _finalize(Channel storage ch) private returns (uint128 settled, uint128 refund) {
        ch.finalized = true;
        settled = ch.settled;
        refund = ch.deposit - settled;
        if (refund != 0) earnings[ch.token][ch.payer] += refund;
    }

    /// @dev The value sent must be the ETH amount, or zero for an ERC-20 channel.
    function _checkValue(address token, uint128 amount) private view {
        uint256 expected = token == address(0) ? amount : 0;
        if (msg.value != expected) revert InvalidMsgValue(msg.value, expected);
    }

    /// @dev Pulls `amount` of an ERC-20 from the caller and rejects fee-on-transfer tokens.
    function _pullToken(address token, uint128 amount) private {
        if (token == address(0)) return;
        uint256 balanceBefore = IERC20(token).balanceOf(address(this));
        IERC20(token).safeTransferFrom(msg.sender, address(this), amount);
        if (IERC20(token).balanceOf(address(this)) != balanceBefore + amount) revert FeeOnTransferToken();
    }

    function _channelId(
        address payer,
        address payee,
        address token,
        bytes32 salt,
        address authorizedSigner,
        bytes32 modelId,
        address publisher,
        uint16 publisherBps
    ) private view returns (bytes32) {
        return keccak256(
            abi.encode(
                payer, payee, token, salt, authorizedSigner, modelId, publisher, publisherBps, address(this), block.chainid
            )
        );
    }

    function _royalty(uint128 amount, uint16 bps) private pure returns (uint256) {
        return uint256(amount) * bps / BPS;
    }

    // ---------------------------------------------------------------- views

    /// @notice The record of `channelId` (all zero if it was never opened).
    function getChannel(bytes32 channelId) external view returns (Channel memory) {
        return _channels[channelId];
    }

    /// @notice The EIP-712 digest the authorized signer signs for a voucher.
    function hashVoucher(bytes32 channelId, uint128 cumulativeAmount) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, cumulativeAmount)));
    }

    /// @notice The id `open` would give these parameters now (the publisher terms are read from
    ///         the registry at call time, as `open` does).
    function computeChannelId(
        address payer,
        address payee,
        address token,
        bytes32 salt,
        address authorizedSigner,
        bytes32 modelId
    ) external view returns (bytes32) {
        (address publisher, uint16 bps) = ModelRegistry(modelRegistry).terms(modelId);
        return _channelId(payer, payee, token, salt, authorizedSigner, modelId, publisher, bps);
    }
}
