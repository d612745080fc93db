// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";

/// @notice Pulls a deposit into the settlement contract (ERC-3009 or Permit2 collectors).
interface IDepositCollector {
    /// @dev Must transfer exactly `amount` of `token` from `payer` to `msg.sender` or revert.
    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata collectorData)
        external;
}

/// @title x402BatchSettlement
/// @notice Our implementation of x402's `batch-settlement` EVM scheme contract, written from the x402 Python SDK's
///         ABI and EIP-712 types (x402 2.25, `x402.mechanisms.evm.batch_settlement`): unidirectional channels keyed
///         by the EIP-712 hash of a `ChannelConfig`, cumulative payer `Voucher`s, claims by the receiver's
///         authorizer (directly or with a `ClaimBatch` signature), settlement to the receiver, cooperative refunds
///         and a payer withdrawal after the channel's `withdrawDelay`.
/// @dev Placed at the scheme's CREATE2 address with `anvil_setCode`, so it has no constructor, no immutables and
///      no storage besides the channel books: the EIP-712 domain separator is computed from `address(this)`.
contract x402BatchSettlement {
    using SafeERC20 for IERC20;

    struct ChannelConfig {
        address payer;
        address payerAuthorizer; // voucher signer; zero: the payer signs (ERC-1271 for contract wallets)
        address receiver;
        address receiverAuthorizer; // claims and refunds
        address token;
        uint40 withdrawDelay;
        bytes32 salt;
    }

    struct Voucher {
        ChannelConfig channel;
        uint128 maxClaimableAmount;
    }

    struct VoucherClaim {
        Voucher voucher;
        bytes signature;
        uint128 totalClaimed; // the channel's new cumulative claimed total, <= maxClaimableAmount
    }

    struct Channel {
        uint128 balance; // deposited less refunded and withdrawn; claims count against it, never reduce it
        uint128 totalClaimed;
    }

    struct PendingWithdrawal {
        uint128 amount;
        uint40 initiatedAt;
    }

    struct ReceiverBook {
        uint128 totalClaimed;
        uint128 totalSettled;
    }

    uint40 public constant MIN_WITHDRAW_DELAY = 900;
    uint40 public constant MAX_WITHDRAW_DELAY = 2_592_000;

    bytes32 private constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 private constant NAME_HASH = keccak256("x402 Batch Settlement");
    bytes32 private constant VERSION_HASH = keccak256("1");
    bytes32 public constant CHANNEL_CONFIG_TYPEHASH = keccak256(
        "ChannelConfig(address payer,address payerAuthorizer,address receiver,address receiverAuthorizer,"
        "address token,uint40 withdrawDelay,bytes32 salt)"
    );
    bytes32 public constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint128 maxClaimableAmount)");
    bytes32 public constant REFUND_TYPEHASH = keccak256("Refund(bytes32 channelId,uint256 nonce,uint128 amount)");
    bytes32 public constant CLAIM_ENTRY_TYPEHASH =
        keccak256("ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)");
    bytes32 public constant CLAIM_BATCH_TYPEHASH = keccak256(
        "ClaimBatch(ClaimEntry[] claims)ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)"
    );

    mapping(bytes32 channelId => Channel) public channels;
    mapping(bytes32 channelId => PendingWithdrawal) public pendingWithdrawals;
    mapping(address receiver => mapping(address token => ReceiverBook)) public receivers;
    mapping(bytes32 channelId => uint256) public refundNonce;

    event Deposited(bytes32 indexed channelId, address indexed payer, address collector, uint128 amount);
    event Claimed(bytes32 indexed channelId, address indexed receiver, uint128 amount, uint128 totalClaimed);
    event Settled(address indexed receiver, address indexed token, address indexed sender, uint128 amount);
    event WithdrawInitiated(bytes32 indexed channelId, uint128 amount, uint40 initiatedAt);
    event Withdrawn(bytes32 indexed channelId, address indexed payer, uint128 amount);
    event Refunded(bytes32 indexed channelId, address indexed payer, uint128 amount, uint256 nonce);

    error InvalidWithdrawDelay();
    error ZeroAmount();
    error DepositNotReceived();
    error Unauthorized();
    error InvalidVoucherSignature();
    error InvalidAuthorizerSignature();
    error ClaimExceedsVoucher();
    error ClaimExceedsBalance();
    error NoPendingWithdrawal();
    error WithdrawDelayNotElapsed();
    error InvalidRefundNonce();
    error AmountOverflow();
    error MixedAuthorizers();

    // ------------------------------------------------------------------ deposits

    /// @notice Adds `amount` to the channel, pulled from the payer by `collector` (which checks the payer's
    ///         authorization, bound to the channel id). Anyone (the facilitator) may submit it.
    function deposit(ChannelConfig calldata config, uint128 amount, address collector, bytes calldata collectorData)
        external
    {
        if (config.withdrawDelay < MIN_WITHDRAW_DELAY || config.withdrawDelay > MAX_WITHDRAW_DELAY) {
            revert InvalidWithdrawDelay();
        }
        if (amount == 0) revert ZeroAmount();
        bytes32 id = getChannelId(config);
        IERC20 token = IERC20(config.token);
        uint256 before = token.balanceOf(address(this));
        IDepositCollector(collector).collect(config.payer, config.token, amount, id, collectorData);
        if (token.balanceOf(address(this)) - before != amount) revert DepositNotReceived();
        Channel storage ch = channels[id];
        uint256 next = uint256(ch.balance) + amount;
        if (next > type(uint128).max) revert AmountOverflow();
        // forge-lint: disable-next-line(unsafe-typecast)
        ch.balance = uint128(next);
        emit Deposited(id, config.payer, collector, amount);
    }

    // ------------------------------------------------------------------ claims

    /// @notice Claims vouchers; the caller must be each channel's `receiverAuthorizer`.
    function claim(VoucherClaim[] calldata voucherClaims) external {
        for (uint256 i; i < voucherClaims.length; ++i) {
            if (msg.sender != voucherClaims[i].voucher.channel.receiverAuthorizer) revert Unauthorized();
            _claim(voucherClaims[i]);
        }
    }

    /// @notice Claims vouchers under one `ClaimBatch` signature of their common `receiverAuthorizer`; anyone may
    ///         submit it (a facilitator paying the gas).
    function claimWithSignature(VoucherClaim[] calldata voucherClaims, bytes calldata authorizerSignature) external {
        if (voucherClaims.length == 0) return;
        address authorizer = voucherClaims[0].voucher.channel.receiverAuthorizer;
        for (uint256 i = 1; i < voucherClaims.length; ++i) {
            if (voucherClaims[i].voucher.channel.receiverAuthorizer != authorizer) revert MixedAuthorizers();
        }
        if (!SignatureChecker.isValidSignatureNow(authorizer, getClaimBatchDigest(voucherClaims), authorizerSignature))
        {
            revert InvalidAuthorizerSignature();
        }
        for (uint256 i; i < voucherClaims.length; ++i) {
            _claim(voucherClaims[i]);
        }
    }

    /// @notice Pays out everything claimed for `receiver` in `token` and not yet settled. Anyone may call it.
    function settle(address receiver, address token) external {
        ReceiverBook storage book = receivers[receiver][token];
        uint128 amount = book.totalClaimed - book.totalSettled;
        if (amount == 0) return;
        book.totalSettled = book.totalClaimed;
        IERC20(token).safeTransfer(receiver, amount);
        emit Settled(receiver, token, msg.sender, amount);
    }

    // ------------------------------------------------------------------ payer exit

    /// @notice The payer announces a withdrawal of up to `amount`; it can be finalized after `withdrawDelay`,
    ///         which leaves the receiver that long to claim its last vouchers.
    function initiateWithdraw(ChannelConfig calldata config, uint128 amount) external {
        if (msg.sender != config.payer && msg.sender != config.payerAuthorizer) revert Unauthorized();
        if (amount == 0) revert ZeroAmount();
        bytes32 id = getChannelId(config);
        pendingWithdrawals[id] = PendingWithdrawal(amount, uint40(block.timestamp));
        emit WithdrawInitiated(id, amount, uint40(block.timestamp));
    }

    /// @notice Pays the payer the announced amount (capped at what is unclaimed) once the delay has elapsed.
    function finalizeWithdraw(ChannelConfig calldata config) external {
        bytes32 id = getChannelId(config);
        PendingWithdrawal memory pending = pendingWithdrawals[id];
        if (pending.initiatedAt == 0) revert NoPendingWithdrawal();
        // forge-lint: disable-next-line(block-timestamp)
        if (block.timestamp < uint256(pending.initiatedAt) + config.withdrawDelay) revert WithdrawDelayNotElapsed();
        delete pendingWithdrawals[id];
        Channel storage ch = channels[id];
        uint128 available = ch.balance - ch.totalClaimed;
        uint128 amount = pending.amount < available ? pending.amount : available;
        ch.balance -= amount;
        if (amount > 0) IERC20(config.token).safeTransfer(config.payer, amount);
        emit Withdrawn(id, config.payer, amount);
    }

    /// @notice Cooperative refund of up to `amount` of the unclaimed balance, by the receiver's authorizer.
    function refund(ChannelConfig calldata config, uint128 amount) external {
        if (msg.sender != config.receiverAuthorizer && msg.sender != config.receiver) revert Unauthorized();
        _refund(config, getChannelId(config), amount);
    }

    /// @notice Cooperative refund under a `Refund` signature of the receiver's authorizer; anyone may submit it.
    function refundWithSignature(
        ChannelConfig calldata config,
        uint128 amount,
        uint256 nonce,
        bytes calldata receiverAuthorizerSignature
    ) external {
        bytes32 id = getChannelId(config);
        if (nonce != refundNonce[id]) revert InvalidRefundNonce();
        if (!SignatureChecker.isValidSignatureNow(
                config.receiverAuthorizer, getRefundDigest(id, nonce, amount), receiverAuthorizerSignature
            )) revert InvalidAuthorizerSignature();
        _refund(config, id, amount);
    }

    /// @notice Runs several calls on this contract in one transaction (claims + refund atomically).
    function multicall(bytes[] calldata data) external returns (bytes[] memory results) {
        results = new bytes[](data.length);
        for (uint256 i; i < data.length; ++i) {
            (bool ok, bytes memory ret) = address(this).delegatecall(data[i]);
            if (!ok) {
                assembly ("memory-safe") {
                    revert(add(ret, 0x20), mload(ret))
                }
            }
            results[i] = ret;
        }
    }

    // ------------------------------------------------------------------ views

    function domainSeparator() public view returns (bytes32) {
        return keccak256(abi.encode(DOMAIN_TYPEHASH, NAME_HASH, VERSION_HASH, block.chainid, address(this)));
    }

    /// @notice The channel id: the EIP-712 digest of the config in this contract's domain (chain-bound).
    function getChannelId(ChannelConfig calldata config) public view returns (bytes32) {
        return _digest(keccak256(abi.encode(CHANNEL_CONFIG_TYPEHASH, config)));
    }

    function getVoucherDigest(bytes32 channelId, uint128 maxClaimableAmount) public view returns (bytes32) {
        return _digest(keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, maxClaimableAmount)));
    }

    function getRefundDigest(bytes32 channelId, uint256 nonce, uint128 amount) public view returns (bytes32) {
        return _digest(keccak256(abi.encode(REFUND_TYPEHASH, channelId, nonce, amount)));
    }

    function getClaimBatchDigest(VoucherClaim[] calldata voucherClaims) public view returns (bytes32) {
        bytes32[] memory entries = new bytes32[](voucherClaims.length);
        for (uint256 i; i < voucherClaims.length; ++i) {
            VoucherClaim calldata c = voucherClaims[i];
            entries[i] = keccak256(
                abi.encode(
                    CLAIM_ENTRY_TYPEHASH, getChannelId(c.voucher.channel), c.voucher.maxClaimableAmount, c.totalClaimed
                )
            );
        }
        return _digest(keccak256(abi.encode(CLAIM_BATCH_TYPEHASH, keccak256(abi.encodePacked(entries)))));
    }

    // ------------------------------------------------------------------ internals

    function _digest(bytes32 structHash) private view returns (bytes32) {
        return keccak256(abi.encodePacked("\x19\x01", domainSeparator(), structHash));
    }

    /// @dev Raises the channel's claimed total to `totalClaimed`; a claim at or below it is a no-op, so a batch
    ///      resubmitted after a partial success cannot pay twice.
    function _claim(VoucherClaim calldata c) private {
        ChannelConfig calldata config = c.voucher.channel;
        bytes32 id = getChannelId(config);
        if (c.totalClaimed > c.voucher.maxClaimableAmount) revert ClaimExceedsVoucher();
        Channel storage ch = channels[id];
        if (c.totalClaimed <= ch.totalClaimed) return;
        if (c.totalClaimed > ch.balance) revert ClaimExceedsBalance();
        bytes32 digest = getVoucherDigest(id, c.voucher.maxClaimableAmount);
        bool ok = config.payerAuthorizer != address(0)
            ? _recovers(digest, c.signature, config.payerAuthorizer)
            : SignatureChecker.isValidSignatureNow(config.payer, digest, c.signature);
        if (!ok) revert InvalidVoucherSignature();
        uint128 delta = c.totalClaimed - ch.totalClaimed;
        ch.totalClaimed = c.totalClaimed;
        receivers[config.receiver][config.token].totalClaimed += delta;
        emit Claimed(id, config.receiver, delta, c.totalClaimed);
    }

    function _recovers(bytes32 digest, bytes calldata signature, address expected) private pure returns (bool) {
        (address recovered, ECDSA.RecoverError err,) = ECDSA.tryRecover(digest, signature);
        return err == ECDSA.RecoverError.NoError && recovered == expected;
    }

    function _refund(ChannelConfig calldata config, bytes32 id, uint128 amount) private {
        Channel storage ch = channels[id];
        uint128 available = ch.balance - ch.totalClaimed;
        uint128 paid = amount < available ? amount : available;
        ch.balance -= paid;
        uint256 nonce = refundNonce[id]++;
        delete pendingWithdrawals[id]; // a cooperative refund supersedes a pending unilateral exit
        if (paid > 0) IERC20(config.token).safeTransfer(config.payer, paid);
        emit Refunded(id, config.payer, paid, nonce);
    }
}
