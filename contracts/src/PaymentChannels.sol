// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

import {IModelRegistry} from "./interfaces/IModelRegistry.sol";
import {IPaymentChannels} from "./interfaces/IPaymentChannels.sol";

/// @title PaymentChannels
/// @notice Unidirectional payer -> payee escrow paid by cumulative EIP-712 vouchers (the MPP/Tempo
///         "payee settles" design), in native ETH (`token == address(0)`) or an ERC-20 token.
///         A model publisher's royalty, read from {ModelRegistry} and snapshotted at open, is split
///         off every settlement. Every payout is pulled, so no recipient can block a close: the payee's
///         and publisher's shares are credited to a pull balance ({claimEarnings}); the payer's refund
///         stays in the finalized channel's record until the payer claims it ({claimRefund}).
/// @dev Lifecycle: `open` -> (`topUp` | `settle` | `settleBatch`)* -> `close` by the payee, or
///      `requestClose` by the payer -> grace period -> `withdraw` by the payer; then `claimRefund`. The payee can still settle while a close
///      is pending, even after the grace period, until the payer withdraws; `topUp` cancels a
///      pending close. A finalized channel keeps its record forever (its id can never be reopened,
///      which would make old vouchers valid again).
///
///      Only the mutable state of a channel is stored (two slots; a refund is kept in slot 0, which
///      the finalization writes anyway, instead of a fresh pull-balance slot: 20k gas less a close). Its fixed terms
///      ({ChannelParams}) are passed back as calldata by every call and re-derived into the channel
///      id (TempoStreamChannel's pattern): a call with any wrong field addresses an id that was
///      never opened and reverts with `ChannelNotFound`. The terms are in the `ChannelOpened` event.
///
///      Vouchers are `Voucher(bytes32 channelId,uint128 cumulativeAmount)` under the domain
///      `{name: "PaymentChannels", version: "1", chainId, verifyingContract}`, signed by the
///      channel's `authorizedSigner`: 65-byte low-s ECDSA for a key, else ERC-1271 for a contract
///      (`ecrecover` with the low-s rule, then `SignatureChecker`). The channel id commits to chain id and
///      contract too.
///
///      Reentrancy: the full guard on the calls that make a state-changing external call (`open`,
///      `topUp`, `claimEarnings`); the read-only check on those whose only external call is an
///      ERC-1271 STATICCALL or none (`settle`, `close`, `requestClose`, `withdraw`): none of them
///      can be entered from a token or ETH callback, and nothing can re-enter them.
///
///      A channel's payer cannot be its payee: a self-channel has no use and would let one account
///      hold both roles. Amounts are uint128 in the ABI and at most type(uint120).max per channel
///      (storage packs deposit and settled into one slot). Fee-on-transfer tokens are rejected at
///      deposit; rebasing tokens are not supported (the escrow would hold more or less than it
///      accounts for).
contract PaymentChannels is IPaymentChannels, EIP712, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    // ---------------------------------------------------------------- constants

    /// @notice EIP-712 type hash of a voucher.
    bytes32 public constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint128 cumulativeAmount)");

    /// @notice Upper bound on the grace period, so a payer's refund cannot be locked for good.
    uint64 public constant MAX_CLOSE_GRACE_PERIOD = 30 days;

    uint256 private constant BPS = 10_000;
    /// @dev secp256k1n / 2: the largest low-s value.
    uint256 private constant _HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    // ---------------------------------------------------------------- state

    /// @notice The registry whose `terms(modelId)` give the publisher and its royalty at open.
    address public immutable modelRegistry;

    /// @notice Seconds between a payer's `requestClose` and the earliest `withdraw`.
    uint64 public immutable closeGracePeriod;

    mapping(bytes32 channelId => ChannelState) private _channels;

    /// @notice Claimable balance of `account` in `token` (address(0) = ETH).
    mapping(address token => mapping(address account => uint256)) public earnings;

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
    ///      contract first. The publisher's terms are read from the registry now and snapshotted
    ///      into the id; `expectedPublisherBps` protects the payer from a royalty change
    ///      front-running the open. A model id the registry does not know opens a channel without
    ///      royalty (expect 0). Only the deposit is written; the terms are in `ChannelOpened`.
    /// @param payee Who may settle vouchers and close (not the caller, not zero).
    /// @param token ERC-20 token, or address(0) for native ETH.
    /// @param deposit Amount escrowed (> 0, <= type(uint120).max).
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
        // Checks.
        if (payee == address(0) || payee == msg.sender) revert InvalidPayee();
        if (authorizedSigner == address(0)) revert InvalidSigner();
        if (deposit == 0) revert ZeroAmount();
        if (deposit > type(uint120).max) revert DepositOverflow();
        _checkValue(token, deposit);

        // Effects (the rest of the checks are in _createChannel).
        channelId = _createChannel(
            ChannelParams({
                payer: msg.sender,
                payee: payee,
                token: token,
                salt: salt,
                authorizedSigner: authorizedSigner,
                modelId: modelId,
                publisher: address(0), // set from the registry
                publisherBps: expectedPublisherBps
            }),
            deposit
        );

        // Interaction last: pull the ERC-20 deposit (the guard blocks a re-entering token).
        _pullToken(token, deposit);
    }

    /// @notice Adds `amount` to the deposit of a channel; cancels a pending close request.
    /// @dev Payer only. For ETH send exactly `amount` as value; for an ERC-20 send no value.
    /// @param params The channel's terms (see {ChannelParams}); any wrong field -> `ChannelNotFound`.
    /// @param amount Amount added (> 0); the new deposit must not exceed type(uint120).max.
    function topUp(ChannelParams calldata params, uint128 amount) external payable nonReentrant {
        // Checks.
        (bytes32 channelId, ChannelState storage ch, uint120 deposit,) = _payerChannel(params);
        if (amount == 0) revert ZeroAmount();
        address token = params.token;
        _checkValue(token, amount);
        if (amount > type(uint120).max - deposit) revert DepositOverflow();

        // Effects.
        // amount <= type(uint120).max - deposit, checked above.
        // forge-lint: disable-next-line(unsafe-typecast)
        uint120 newDeposit = deposit + uint120(amount);
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
    /// @param params The channel's terms (see {ChannelParams}); any wrong field -> `ChannelNotFound`.
    /// @param cumulativeAmount Total the payer has authorized so far.
    /// @param signature The authorized signer's EIP-712 signature of the voucher ({hashVoucher}).
    function settle(ChannelParams calldata params, uint128 cumulativeAmount, bytes calldata signature)
        external
        nonReentrantView
    {
        (bytes32 channelId, ChannelState storage ch, uint120 deposit, uint120 settled) = _payeeChannel(params);
        _settle(params, channelId, ch, deposit, settled, cumulativeAmount, signature);
    }

    /// @notice Closes a channel: settles `cumulativeAmount` if it is above what is settled, then
    ///         refunds the rest of the deposit to the payer and finalizes the channel.
    /// @dev Payee only. With `cumulativeAmount <= settled` the channel closes at the settled amount
    ///      and `signature` is ignored (a payee may close without a new voucher).
    /// @param params The channel's terms (see {ChannelParams}); any wrong field -> `ChannelNotFound`.
    /// @param cumulativeAmount Total the payer has authorized so far (or anything <= settled).
    /// @param signature The voucher signature when `cumulativeAmount > settled`.
    function close(ChannelParams calldata params, uint128 cumulativeAmount, bytes calldata signature)
        external
        nonReentrantView
    {
        (bytes32 channelId, ChannelState storage ch, uint120 deposit, uint120 settled) = _payeeChannel(params);
        if (cumulativeAmount > settled) {
            _settle(params, channelId, ch, deposit, settled, cumulativeAmount, signature);
            // forge-lint: disable-next-line(unsafe-typecast)
            settled = uint120(cumulativeAmount); // _settle checked cumulativeAmount <= deposit
        }
        uint128 refund = _finalize(ch, deposit, settled);
        emit ChannelClosed(channelId, settled, refund);
    }

    /// @notice Settles many vouchers of the caller's channels in one token and for one model, each
    ///         with exactly {settle}'s checks and royalty split; a voucher that fails a check is
    ///         skipped and reported, the rest settle.
    /// @dev Skipping, not reverting, is what a payee wants: one channel closed under it must not
    ///      cost the round. A skipped voucher emits `SettlementSkipped(channelId, reason)` with the
    ///      selector of the error {settle} would revert with and changes nothing; a settled one
    ///      emits `Settled` as {settle} does. The channel id is derived from the shared terms, the
    ///      caller as payee and the voucher's own terms, so a wrong term (or a caller who is not the
    ///      payee) addresses no channel: `ChannelNotFound`. A channel named twice is checked against
    ///      the amount the first voucher settled (no double count). The shares are summed and
    ///      credited once, to the caller and to `publisher`.
    /// @param token The channels' token (address(0) = ETH).
    /// @param modelId The channels' model.
    /// @param publisher The channels' publisher (as in their terms; address(0) without royalty).
    /// @param publisherBps The channels' royalty.
    /// @param vouchers The vouchers, see {BatchVoucher}.
    /// @return settledCount How many vouchers settled.
    function settleBatch(
        address token,
        bytes32 modelId,
        address publisher,
        uint16 publisherBps,
        BatchVoucher[] calldata vouchers
    ) external nonReentrantView returns (uint256 settledCount) {
        // No channel has a royalty above 100% (open refuses it); _split relies on the bound.
        if (publisherBps > BPS) revert InvalidRoyalty(publisherBps);
        // The id preimage (see _channelId) with the shared words written once, then 0x80 bytes of scratch.
        uint256 buf;
        assembly ("memory-safe") {
            buf := mload(0x40)
            mstore(0x40, add(buf, 0x1e0))
            mstore(add(buf, 0x20), caller())
            mstore(add(buf, 0x40), token)
            mstore(add(buf, 0xa0), modelId)
            mstore(add(buf, 0xc0), publisher)
            mstore(add(buf, 0xe0), publisherBps)
            mstore(add(buf, 0x100), address())
            mstore(add(buf, 0x120), chainid())
        }
        bytes32 domain = _domainSeparatorV4();
        assembly ("memory-safe") {
            mstore(add(buf, 0x1c0), domain)
        }
        uint256 increase;
        uint256 royalty;
        for (uint256 i; i < vouchers.length; ++i) {
            (bool ok, uint256 delta, uint256 share) = _batchItem(buf, vouchers[i], publisherBps);
            if (!ok) continue;
            // Sums of uint120 amounts, bounded by what the escrow holds: no overflow.
            unchecked {
                ++settledCount;
                increase += delta;
                royalty += share;
            }
        }
        unchecked {
            _credit(token, msg.sender, increase - royalty); // each share <= its increase
        }
        _credit(token, publisher, royalty);
    }

    /// @notice Pays the payer of a finalized channel its refund, `deposit - settled`.
    /// @dev Payer only, once. Sent to the caller (ETH or the channel's ERC-20).
    /// @param params The channel's terms (see {ChannelParams}); any wrong field -> `ChannelNotFound`.
    /// @return refund The amount paid.
    function claimRefund(ChannelParams calldata params) external nonReentrant returns (uint128 refund) {
        bytes32 channelId = _channelIdOf(params);
        ChannelState storage ch = _channels[channelId];
        uint120 deposit = ch.deposit;
        if (deposit == 0) revert ChannelNotFound(channelId);
        if (msg.sender != params.payer) revert NotPayer();
        if (!ch.finalized) revert ChannelNotFinalized(channelId);
        if (ch.refunded) revert RefundAlreadyClaimed(channelId);
        refund = deposit - ch.settled;
        if (refund == 0) revert NothingToClaim();

        ch.refunded = true;
        emit RefundClaimed(channelId, msg.sender, refund);

        _pay(params.token, refund);
    }

    /// @notice Starts the grace period after which the payer may withdraw the unsettled deposit.
    /// @dev Payer only; once per pending request (`topUp` cancels it).
    /// @param params The channel's terms (see {ChannelParams}); any wrong field -> `ChannelNotFound`.
    function requestClose(ChannelParams calldata params) external nonReentrantView {
        (bytes32 channelId, ChannelState storage ch,,) = _payerChannel(params);
        if (ch.closeRequestedAt != 0) revert CloseAlreadyRequested(channelId);

        ch.closeRequestedAt = uint64(block.timestamp);
        emit CloseRequested(channelId, uint64(block.timestamp) + closeGracePeriod);
    }

    /// @notice Finalizes the channel once the grace period after `requestClose` has passed; the
    ///         unsettled deposit is then the payer's refund ({claimRefund}).
    /// @dev Payer only.
    /// @param params The channel's terms (see {ChannelParams}); any wrong field -> `ChannelNotFound`.
    function withdraw(ChannelParams calldata params) external nonReentrantView {
        (bytes32 channelId, ChannelState storage ch, uint120 deposit, uint120 settled) = _payerChannel(params);
        uint64 requestedAt = ch.closeRequestedAt;
        if (requestedAt == 0) revert CloseNotRequested(channelId);
        uint64 closableAt = requestedAt + closeGracePeriod;
        // Validators can skew timestamps by seconds; the grace period is minutes.
        // forge-lint: disable-next-line(block-timestamp)
        if (block.timestamp < closableAt) revert GracePeriodActive(closableAt);

        uint128 refund = _finalize(ch, deposit, settled);
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

        _pay(token, amount);
    }

    // ---------------------------------------------------------------- internal functions

    /// @dev The channel `params` address and its slot-0 amounts; reverts unless it exists, is open
    ///      and the caller is its payee.
    function _payeeChannel(ChannelParams calldata params)
        private
        view
        returns (bytes32 channelId, ChannelState storage ch, uint120 deposit, uint120 settled)
    {
        (channelId, ch, deposit, settled) = _loadChannel(params);
        if (msg.sender != params.payee) revert NotPayee();
    }

    /// @dev The channel `params` address and its slot-0 amounts; reverts unless it exists, is open
    ///      and the caller is its payer.
    function _payerChannel(ChannelParams calldata params)
        private
        view
        returns (bytes32 channelId, ChannelState storage ch, uint120 deposit, uint120 settled)
    {
        (channelId, ch, deposit, settled) = _loadChannel(params);
        if (msg.sender != params.payer) revert NotPayer();
    }

    /// @dev Re-derives the id from `params` and reads slot 0 once. Existence is checked first: any
    ///      wrong term addresses an id that was never opened, whoever calls.
    function _loadChannel(ChannelParams calldata params)
        private
        view
        returns (bytes32 channelId, ChannelState storage ch, uint120 deposit, uint120 settled)
    {
        channelId = _channelIdOf(params);
        ch = _channels[channelId];
        deposit = ch.deposit;
        settled = ch.settled;
        bool finalized = ch.finalized;
        if (deposit == 0) revert ChannelNotFound(channelId);
        if (finalized) revert ChannelFinalized(channelId);
    }

    /// @dev Snapshots the publisher terms into `p` (checked against the expected royalty in
    ///      `p.publisherBps`), derives the id and writes the deposit, the channel's only word.
    function _createChannel(ChannelParams memory p, uint128 deposit) private returns (bytes32 channelId) {
        // The registry is trusted (fixed at deployment) and only read.
        (address publisher, uint16 bps) = IModelRegistry(modelRegistry).terms(p.modelId);
        if (bps != p.publisherBps) revert RoyaltyMismatch(p.publisherBps, bps);
        if (bps > BPS) revert InvalidRoyalty(bps);
        p.publisher = publisher;
        channelId = _channelId(p.payer, p.payee, p.token, p.salt, p.authorizedSigner, p.modelId, publisher, bps);
        ChannelState storage ch = _channels[channelId];
        // A finalized record keeps its deposit, so an id can never be opened twice.
        if (ch.deposit != 0) revert ChannelExists(channelId);

        // open checked deposit <= type(uint120).max.
        // forge-lint: disable-next-line(unsafe-typecast)
        ch.deposit = uint120(deposit);
        emit ChannelOpened(
            channelId, p.payer, p.payee, p.token, p.authorizedSigner, p.modelId, publisher, bps, deposit, p.salt
        );
    }

    /// @dev {settle}'s checks and effects for one voucher of a batch, without reverting: returns the
    ///      `SettlementSkipped` with the selector of the error {settle} would revert with (nothing
    ///      changed), or true with the increase of the settled amount and the publisher's share of it
    ///      (the caller credits them). The payee check is in the id (the caller's). `buf` holds the id
    ///      preimage's shared words, 0x80 bytes of scratch after it, then the EIP-712 domain separator.
    function _batchItem(uint256 buf, BatchVoucher calldata v, uint16 bps)
        private
        returns (bool ok, uint256 delta, uint256 share)
    {
        bytes32 channelId;
        uint256 word;
        uint256 cumulativeAmount;
        assembly ("memory-safe") {
            // The voucher's own terms into the preimage. A dirty high bit in a field makes an id
            // that was never opened (open hashes clean values): ChannelNotFound, as a wrong term.
            mstore(buf, calldataload(v))
            mstore(add(buf, 0x60), calldataload(add(v, 0x20)))
            mstore(add(buf, 0x80), calldataload(add(v, 0x40)))
            channelId := keccak256(buf, 0x140)
            cumulativeAmount := calldataload(add(v, 0x60))
            // _channels[channelId]'s first slot.
            mstore(0x00, channelId)
            mstore(0x20, _channels.slot)
            word := sload(keccak256(0x00, 0x40))
        }
        // Slot 0's packing (see ChannelState): deposit | settled << 120 | finalized << 240 | refunded << 248.
        uint256 deposit = word & type(uint120).max;
        uint256 settled = (word >> 120) & type(uint120).max;
        if (deposit == 0) return _skip(channelId, ChannelNotFound.selector);
        if ((word >> 240) & 0xff != 0) return _skip(channelId, ChannelFinalized.selector);
        if (cumulativeAmount <= settled) return _skip(channelId, AmountNotIncreasing.selector);
        if (cumulativeAmount > deposit) return _skip(channelId, AmountExceedsDeposit.selector);
        if (!_batchSignatureValid(buf + 0x140, channelId, v)) return _skip(channelId, InvalidSignature.selector);
        // The new settled amount in place, one SSTORE (cumulativeAmount <= deposit < 2^120).
        word = (word & ~(uint256(type(uint120).max) << 120)) | (cumulativeAmount << 120);
        assembly ("memory-safe") {
            mstore(0x00, channelId)
            mstore(0x20, _channels.slot)
            sstore(keccak256(0x00, 0x40), word)
        }
        // forge-lint: disable-next-line(unsafe-typecast)
        emit Settled(channelId, uint128(cumulativeAmount)); // < 2^120
        // No overflow: settled < cumulativeAmount < 2^120 and bps <= 10_000 (checked by the caller).
        ok = true;
        unchecked {
            delta = cumulativeAmount - settled;
            if (bps != 0) share = (cumulativeAmount * bps) / BPS - (settled * bps) / BPS;
        }
    }

    /// @dev Reports a skipped batch voucher.
    function _skip(bytes32 channelId, bytes4 reason) private returns (bool, uint256, uint256) {
        emit SettlementSkipped(channelId, reason);
        return (false, 0, 0);
    }

    /// @dev The voucher's compact (EIP-2098) signature is its signer's on {hashVoucher}'s digest,
    ///      under {settle}'s low-s rule. `scratch` is 0x80 bytes of free memory followed by the
    ///      EIP-712 domain separator.
    function _batchSignatureValid(uint256 scratch, bytes32 channelId, BatchVoucher calldata v)
        private
        view
        returns (bool valid)
    {
        bytes32 typeHash = VOUCHER_TYPEHASH;
        assembly ("memory-safe") {
            let domain := mload(add(scratch, 0x80))
            let vs := calldataload(add(v, 0xa0))
            let s := and(vs, 0x7fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff)
            // The digest, as hashVoucher computes it.
            mstore(scratch, typeHash)
            mstore(add(scratch, 0x20), channelId)
            mstore(add(scratch, 0x40), calldataload(add(v, 0x60)))
            let structHash := keccak256(scratch, 0x60)
            mstore(scratch, hex"1901")
            mstore(add(scratch, 0x02), domain)
            mstore(add(scratch, 0x22), structHash)
            let digest := keccak256(scratch, 0x42)
            // ecrecover(digest, 27 + (vs >> 255), r, s), the low-s rule first.
            if iszero(gt(s, _HALF_N)) {
                mstore(scratch, digest)
                mstore(add(scratch, 0x20), add(27, shr(255, vs)))
                mstore(add(scratch, 0x40), calldataload(add(v, 0x80)))
                mstore(add(scratch, 0x60), s)
                mstore(0x00, 0)
                // The precompile returns nothing on failure: 0x00 stays 0, never a signer (open refuses 0).
                if staticcall(gas(), 0x01, scratch, 0x80, 0x00, 0x20) {
                    valid := eq(mload(0x00), calldataload(add(v, 0x40)))
                }
            }
        }
    }

    /// @dev The shares of a settlement from `settled` to `cumulativeAmount`: the publisher gets
    ///      `floor(new * bps / 1e4) - floor(old * bps / 1e4)`, the payee the rest.
    function _split(uint128 settled, uint128 cumulativeAmount, uint16 bps)
        private
        pure
        returns (uint128 payeeShare, uint128 publisherShare)
    {
        // No overflow: settled < cumulativeAmount < 2^120, bps <= 10_000 (the registry's bound,
        // committed in the id), so each royalty is <= its amount and their difference <= the increase.
        unchecked {
            if (bps != 0) publisherShare = uint128(_royalty(cumulativeAmount, bps) - _royalty(settled, bps));
            payeeShare = cumulativeAmount - settled - publisherShare;
        }
    }

    /// @dev Adds `amount` to a pull balance (skips zero amounts and the zero address of a channel
    ///      without publisher, whose share is always 0).
    function _credit(address token, address account, uint256 amount) private {
        // Unchecked: all balances together never exceed what the escrow holds of the token.
        if (amount != 0) {
            unchecked {
                earnings[token][account] += amount;
            }
        }
    }

    /// @dev Sends `amount` of `token` (address(0) = ETH) to the caller.
    function _pay(address token, uint256 amount) private {
        if (token == address(0)) {
            (bool ok,) = msg.sender.call{value: amount}("");
            if (!ok) revert EthTransferFailed();
        } else {
            IERC20(token).safeTransfer(msg.sender, amount);
        }
    }

    /// @dev Verifies a voucher and credits the delta. The caller has checked payee and finality.
    function _settle(
        ChannelParams calldata params,
        bytes32 channelId,
        ChannelState storage ch,
        uint128 deposit,
        uint128 settled,
        uint128 cumulativeAmount,
        bytes calldata signature
    ) private {
        // Checks.
        if (cumulativeAmount <= settled) revert AmountNotIncreasing(cumulativeAmount, settled);
        if (cumulativeAmount > deposit) revert AmountExceedsDeposit(cumulativeAmount, deposit);
        if (!_isValidSignature(params.authorizedSigner, hashVoucher(channelId, cumulativeAmount), signature)) {
            revert InvalidSignature();
        }

        // Effects (all of the delta is credited, or the call reverts).
        // cumulativeAmount <= deposit <= type(uint120).max, checked above.
        // forge-lint: disable-next-line(unsafe-typecast)
        ch.settled = uint120(cumulativeAmount);
        address token = params.token;
        (uint128 payeeShare, uint128 publisherShare) = _split(settled, cumulativeAmount, params.publisherBps);
        _credit(token, params.publisher, publisherShare);
        _credit(token, msg.sender, payeeShare); // the caller is the payee (checked)
        emit Settled(channelId, cumulativeAmount);
    }

    /// @dev Marks the channel finalized; its payer is then owed `deposit - settled` ({claimRefund}).
    function _finalize(ChannelState storage ch, uint120 deposit, uint120 settled) private returns (uint128 refund) {
        ch.finalized = true;
        refund = deposit - settled;
    }

    /// @dev 65-byte low-s ECDSA first (no EXTCODESIZE on the common EOA-key path), then ERC-1271
    ///      when that does not yield the signer (a contract cannot be an ECDSA recovery result; an
    ///      account without code answers an ERC-1271 call with no data, which fails).
    function _isValidSignature(address signer, bytes32 digest, bytes calldata signature) private view returns (bool) {
        if (signature.length == 65) {
            bytes32 r;
            bytes32 s;
            uint8 v;
            assembly ("memory-safe") {
                r := calldataload(signature.offset)
                s := calldataload(add(signature.offset, 0x20))
                v := byte(0, calldataload(add(signature.offset, 0x40)))
            }
            // Low-s only (EIP-2): the high-s twin of a signature is refused, as OpenZeppelin's ECDSA does.
            if (uint256(s) <= _HALF_N) {
                address recovered = ecrecover(digest, v, r, s);
                if (recovered != address(0) && recovered == signer) return true;
            }
        }
        return SignatureChecker.isValidERC1271SignatureNowCalldata(signer, digest, signature);
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

    /// @dev The channel id (the preimage is fixed by ARCHITECTURE.md).
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
                payer,
                payee,
                token,
                salt,
                authorizedSigner,
                modelId,
                publisher,
                publisherBps,
                address(this),
                block.chainid
            )
        );
    }

    /// @dev The same id from calldata terms: the struct's static fields encode in place, in the
    ///      preimage's order, so `abi.encode(params, address(this), block.chainid)` is byte for byte
    ///      the preimage of {_channelId}; copied from calldata directly (saves ~900 gas a call).
    function _channelIdOf(ChannelParams calldata params) private view returns (bytes32) {
        bytes32 id;
        // Hashes the eight words as sent. Dirty high bits in a field would hash to an id that was
        // never opened (open hashes clean values), so they fail as any wrong term does.
        assembly ("memory-safe") {
            let ptr := mload(0x40)
            calldatacopy(ptr, params, 0x100)
            mstore(add(ptr, 0x100), address())
            mstore(add(ptr, 0x120), chainid())
            id := keccak256(ptr, 0x140)
        }
        return id;
    }

    function _royalty(uint128 amount, uint16 bps) private pure returns (uint256) {
        unchecked {
            return uint256(amount) * bps / BPS; // < 2^128 * 2^16: no overflow
        }
    }

    // ---------------------------------------------------------------- views

    /// @notice The refund the payer of `channelId` may claim now (0 unless finalized and unclaimed).
    /// @param channelId The channel.
    /// @return The refund owed.
    function refundOf(bytes32 channelId) external view returns (uint128) {
        ChannelState storage ch = _channels[channelId];
        return ch.finalized && !ch.refunded ? ch.deposit - ch.settled : 0;
    }

    /// @notice The state of `channelId` (all zero if it was never opened).
    /// @param channelId The channel.
    /// @return The channel's deposit, settled amount, finalized and refunded flags and pending close request.
    function getChannel(bytes32 channelId) external view returns (ChannelState memory) {
        return _channels[channelId];
    }

    /// @notice The id of the channel with these terms (whether or not it was opened).
    /// @param params The channel's terms.
    /// @return The channel id.
    function channelIdOf(ChannelParams calldata params) external view returns (bytes32) {
        return _channelIdOf(params);
    }

    /// @notice The EIP-712 digest the authorized signer signs for a voucher.
    /// @param channelId The channel.
    /// @param cumulativeAmount The voucher's cumulative amount.
    /// @return digest The digest.
    function hashVoucher(bytes32 channelId, uint128 cumulativeAmount) public view returns (bytes32 digest) {
        bytes32 domain = _domainSeparatorV4();
        bytes32 typeHash = VOUCHER_TYPEHASH;
        // keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, cumulativeAmount)), then the EIP-712
        // digest, in scratch memory (no allocation per voucher of a batch); the free pointer is restored.
        assembly ("memory-safe") {
            let ptr := mload(0x40)
            mstore(ptr, typeHash)
            mstore(add(ptr, 0x20), channelId)
            mstore(add(ptr, 0x40), cumulativeAmount)
            let structHash := keccak256(ptr, 0x60)
            mstore(ptr, hex"1901")
            mstore(add(ptr, 0x02), domain)
            mstore(add(ptr, 0x22), structHash)
            digest := keccak256(ptr, 0x42)
        }
    }

    /// @notice The id `open` would give these parameters now (the publisher terms are read from
    ///         the registry at call time, as `open` does).
    /// @param payer The channel's payer (the caller of `open`).
    /// @param payee The channel's payee.
    /// @param token ERC-20 token, or address(0) for native ETH.
    /// @param salt The salt.
    /// @param authorizedSigner The voucher signer.
    /// @param modelId The model.
    /// @return The channel id.
    function computeChannelId(
        address payer,
        address payee,
        address token,
        bytes32 salt,
        address authorizedSigner,
        bytes32 modelId
    ) external view returns (bytes32) {
        (address publisher, uint16 bps) = IModelRegistry(modelRegistry).terms(modelId);
        return _channelId(payer, payee, token, salt, authorizedSigner, modelId, publisher, bps);
    }
}
