// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {Address} from "@openzeppelin/contracts/utils/Address.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {INodeRegistry} from "./interfaces/INodeRegistry.sol";

/// @title NodeRegistry
/// @notice The authoritative list of inference nodes. A node is identified by its enclave signing
///         key (an address whose private key never leaves the confidential VM). An operator
///         registers a node with a stake; the registration is an EIP-712 message signed by the
///         node's key that binds the operator, the endpoint, the libp2p peer id, the HPKE key, the
///         attestation hash and the TEE type, so no operator can register a key it does not
///         control. Re-attestation refreshes the attestation hash against a fresh registry epoch;
///         exit releases the stake after an unbonding delay; a `slasher` (the future SLA court) can
///         slash the stake until it is withdrawn.
/// @dev Epochs: a counter bumped by anyone (`advanceEpoch`) once `epochLength` seconds have passed
///      since the last bump. Each epoch has a 32-byte value mixed from the previous value and the
///      previous block hash, so it cannot be predicted before the bump: an attestation quoted over
///      it (report_data[32:64] = epoch value) was produced after the epoch started. A
///      registration or re-attestation must name the current epoch or the previous one (so a
///      message signed just before a bump still lands), never an epoch older than the node's last
///      attestation, and every signed message is usable once (its digest is consumed).
///
///      Signed types (domain `{name: "NodeRegistry", version: "1", chainId, verifyingContract}`):
///        Registration(address node,address operator,string endpoint,bytes peerId,bytes hpkePublicKey,
///                     bytes32 attestationHash,uint8 teeType,bytes32 epoch,uint256 deadline)
///        Reattestation(address node,string endpoint,bytes peerId,bytes32 attestationHash,
///                      bytes32 epoch,uint256 deadline)
///      A re-attestation also carries the endpoint and peer id, so a node that moved re-attests
///      with its new address; the HPKE key and TEE type are fixed for a node key.
///
///      Node lifecycle: None -> Active (register) -> Exiting (requestExit) -> Withdrawn
///      (withdrawStake, after the unbonding delay) -> Active (register again, with a fresh
///      signature). Records are never deleted, so the epoch index only moves forward per node. The
///      registered nodes are listed by the `NodeRegistered` events (no on-chain list: 25k gas a node).
///      The stake is in one asset per deployment (`stakeToken`, address(0) = native ETH).
///      Fee-on-transfer tokens are rejected; rebasing tokens are not supported.
contract NodeRegistry is INodeRegistry, EIP712, Ownable, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    // ---------------------------------------------------------------- constants

    bytes32 public constant REGISTRATION_TYPEHASH = keccak256(
        "Registration(address node,address operator,string endpoint,bytes peerId,bytes hpkePublicKey,"
        "bytes32 attestationHash,uint8 teeType,bytes32 epoch,uint256 deadline)"
    );
    bytes32 public constant REATTESTATION_TYPEHASH = keccak256(
        "Reattestation(address node,string endpoint,bytes peerId,bytes32 attestationHash,bytes32 epoch,uint256 deadline)"
    );

    /// @notice TEE type labels (a registration with any other value reverts).
    uint8 public constant TEE_TDX = 1;
    uint8 public constant TEE_DSTACK = 2;
    uint8 public constant TEE_SIMULATED = 3;

    /// @notice Serialized ML-KEM-768 encapsulation key (1184) || X25519 public key (32).
    uint256 public constant HPKE_PUBLIC_KEY_LENGTH = 1216;
    uint256 public constant MAX_ENDPOINT_LENGTH = 256;
    uint256 public constant MAX_PEER_ID_LENGTH = 128;
    /// @notice Upper bounds on the constructor's durations (a stake must not be locked for good).
    uint64 public constant MAX_UNBONDING_DELAY = 365 days;
    uint64 public constant MAX_EPOCH_LENGTH = 30 days;

    // ---------------------------------------------------------------- immutables

    /// @notice The stake asset: an ERC-20, or address(0) for native ETH.
    address public immutable stakeToken;
    /// @notice The least stake a node registers with (and keeps to stay active).
    uint256 public immutable minStake;
    /// @notice Seconds between `requestExit` and the earliest `withdrawStake`.
    uint64 public immutable unbondingDelay;
    /// @notice Least seconds between two epoch bumps.
    uint64 public immutable epochLength;

    // ---------------------------------------------------------------- state

    /// @notice The only address allowed to slash; set once by the owner.
    address public slasher;

    /// @notice Index of the current epoch (0 at deployment).
    uint64 public epochIndex;
    /// @notice When the current epoch started.
    uint64 public epochStartedAt;
    bytes32 private _currentEpoch;
    bytes32 private _previousEpoch;

    mapping(address node => Node) private _nodes;
    /// @notice EIP-712 digests already consumed by a registration or re-attestation.
    mapping(bytes32 digest => bool) public digestUsed;
    /// @notice Disputes against `node` the slasher holds open: the stake cannot be withdrawn meanwhile.
    mapping(address node => uint256) public openDisputes;

    // ---------------------------------------------------------------- constructor

    /// @param stakeToken_ ERC-20 staked by nodes, or address(0) for native ETH.
    /// @param minStake_ Least stake per node (> 0), in the stake asset's smallest unit.
    /// @param unbondingDelay_ Seconds from `requestExit` to `withdrawStake` (at most 365 days; it
    ///        must outlast the SLA court's dispute window on a live chain).
    /// @param epochLength_ Least seconds between epoch bumps (0 < length <= 30 days).
    /// @param owner_ May set the slasher, once.
    constructor(address stakeToken_, uint256 minStake_, uint64 unbondingDelay_, uint64 epochLength_, address owner_)
        EIP712("NodeRegistry", "1")
        Ownable(owner_)
    {
        if (minStake_ == 0 || minStake_ > type(uint128).max) revert InvalidMinStake();
        if (unbondingDelay_ > MAX_UNBONDING_DELAY) revert InvalidUnbondingDelay(unbondingDelay_);
        if (epochLength_ == 0 || epochLength_ > MAX_EPOCH_LENGTH) revert InvalidEpochLength(epochLength_);
        stakeToken = stakeToken_;
        minStake = minStake_;
        unbondingDelay = unbondingDelay_;
        epochLength = epochLength_;
        _startEpoch(0);
    }

    // ---------------------------------------------------------------- owner

    /// @notice Names the slasher (the SLA court). Callable once, by the owner.
    function setSlasher(address slasher_) external onlyOwner {
        if (slasher_ == address(0)) revert InvalidSlasher();
        if (slasher != address(0)) revert SlasherAlreadySet(slasher);
        slasher = slasher_;
        emit SlasherSet(slasher_);
    }

    // ---------------------------------------------------------------- epochs

    /// @notice Starts the next epoch. Anyone may call it once `epochLength` seconds have passed.
    function advanceEpoch() external {
        uint64 nextAt = nextEpochAt();
        // forge-lint: disable-next-line(block-timestamp)
        if (block.timestamp < nextAt) revert EpochNotOver(nextAt);
        _startEpoch(epochIndex + 1);
    }

    // ---------------------------------------------------------------- nodes

    /// @notice Registers `r.node` with the caller as operator and `stake` escrowed.
    /// @dev For ETH send exactly `stake` as value; for an ERC-20 send no value and approve first.
    ///      `r` must be signed by `r.node` (65-byte low-s ECDSA, or ERC-1271 for a contract),
    ///      name the caller as operator and the current or previous epoch, and not be expired.
    ///      A node can register again only after it withdrew its previous stake.
    /// @param r The registration the node signed.
    /// @param stake The stake to escrow (>= minStake).
    /// @param signature The node's signature over `hashRegistration(r)`.
    function register(Registration calldata r, uint256 stake, bytes calldata signature) external payable nonReentrant {
        if (r.operator != msg.sender) revert NotOperator();
        if (r.node == address(0)) revert InvalidNode();
        _checkService(r.endpoint, r.peerId);
        if (r.hpkePublicKey.length != HPKE_PUBLIC_KEY_LENGTH) revert InvalidHpkeKey(r.hpkePublicKey.length);
        if (r.attestationHash == bytes32(0)) revert InvalidAttestationHash();
        if (r.teeType == 0 || r.teeType > TEE_SIMULATED) revert InvalidTeeType(r.teeType);
        if (stake < minStake) revert StakeBelowMinimum(stake, minStake);
        if (stake > type(uint128).max) revert StakeOverflow();

        Node storage n = _nodes[r.node];
        Status status = n.status;
        if (status == Status.Active || status == Status.Exiting) revert AlreadyRegistered(r.node);
        uint64 index = _epochIndexOf(r.epoch, n.epochIndex, status != Status.None);
        _consume(hashRegistration(r), r.node, r.deadline, signature);

        n.operator = msg.sender;
        n.teeType = r.teeType;
        n.status = Status.Active;
        n.registeredAt = uint64(block.timestamp);
        n.attestedAt = uint64(block.timestamp);
        n.epochIndex = index;
        // casting to 'uint128' is safe because stake <= type(uint128).max was checked above
        // forge-lint: disable-next-line(unsafe-typecast)
        n.stake = uint128(stake);
        if (status != Status.None) n.unbondingEndsAt = 0; // a fresh record's is 0 already
        n.attestationHash = r.attestationHash;
        n.epoch = r.epoch;
        n.hpkeKeyHash = keccak256(r.hpkePublicKey);
        _emitRegistered(r, index, stake);

        _pullStake(stake);
    }

    /// @notice Refreshes the attestation of an active node (and its endpoint and peer id).
    /// @dev Anyone may submit it: the node's signature is the authority. The epoch must be the
    ///      current or the previous one and not older than the node's last attestation; each
    ///      signed message is accepted once.
    /// @param r The re-attestation the node signed.
    /// @param signature The node's signature over `hashReattestation(r)`.
    function reattest(Reattestation calldata r, bytes calldata signature) external {
        Node storage n = _nodes[r.node];
        if (n.status != Status.Active) revert NotActive(r.node);
        _checkService(r.endpoint, r.peerId);
        if (r.attestationHash == bytes32(0)) revert InvalidAttestationHash();
        uint64 index = _epochIndexOf(r.epoch, n.epochIndex, true);
        _consume(hashReattestation(r), r.node, r.deadline, signature);

        n.attestedAt = uint64(block.timestamp);
        n.epochIndex = index;
        n.attestationHash = r.attestationHash;
        n.epoch = r.epoch;
        emit NodeReattested(r.node, r.attestationHash, index, r.endpoint, r.peerId);
    }

    /// @notice Adds `amount` to the stake of an active node (e.g. back above the minimum after a slash).
    /// @dev Operator only. ETH: send exactly `amount`; ERC-20: approve first and send no value.
    function addStake(address node, uint256 amount) external payable nonReentrant {
        Node storage n = _nodes[node];
        if (n.operator != msg.sender) revert NotOperator();
        if (n.status != Status.Active) revert NotActive(node);
        if (amount == 0) revert ZeroAmount();
        uint256 newStake = uint256(n.stake) + amount;
        if (newStake > type(uint128).max) revert StakeOverflow();
        // casting to 'uint128' is safe because newStake <= type(uint128).max was checked above
        // forge-lint: disable-next-line(unsafe-typecast)
        n.stake = uint128(newStake);
        emit StakeAdded(node, amount, newStake);
        _pullStake(amount);
    }

    /// @notice Starts the exit of an active node: it stops being active now and its stake unlocks
    ///         after the unbonding delay (it can still be slashed until then).
    function requestExit(address node) external {
        Node storage n = _nodes[node];
        if (n.operator != msg.sender) revert NotOperator();
        if (n.status != Status.Active) revert NotActive(node);
        uint64 endsAt = uint64(block.timestamp) + unbondingDelay;
        n.status = Status.Exiting;
        n.unbondingEndsAt = endsAt;
        emit ExitRequested(node, endsAt);
    }

    /// @notice Pays the remaining stake of an exiting node back to its operator, after the delay.
    function withdrawStake(address node) external nonReentrant {
        Node storage n = _nodes[node];
        if (n.operator != msg.sender) revert NotOperator();
        if (n.status != Status.Exiting) revert NotExiting(node);
        // forge-lint: disable-next-line(block-timestamp)
        if (block.timestamp < n.unbondingEndsAt) revert UnbondingActive(n.unbondingEndsAt);
        // A node must not leave with the stake a pending dispute may take (it would pay the client 0).
        uint256 pending = openDisputes[node];
        if (pending != 0) revert DisputesPending(node, pending);
        uint256 amount = n.stake;
        n.stake = 0;
        n.status = Status.Withdrawn;
        emit StakeWithdrawn(node, msg.sender, amount);
        _pay(msg.sender, amount);
    }

    /// @notice Takes `amount` of the stake of `node` and sends it to `recipient`. Slasher only;
    ///         allowed while the node is active or unbonding, never beyond its stake.
    function slash(address node, uint256 amount, address recipient) external nonReentrant {
        if (msg.sender != slasher || msg.sender == address(0)) revert NotSlasher();
        if (recipient == address(0)) revert InvalidRecipient();
        if (amount == 0) revert ZeroAmount();
        Node storage n = _nodes[node];
        Status status = n.status;
        if (status != Status.Active && status != Status.Exiting) revert NotSlashable(node);
        uint256 stake = n.stake;
        if (amount > stake) revert SlashExceedsStake(amount, stake);
        uint256 remaining = stake - amount;
        // casting to 'uint128' is safe because amount <= stake, which is a uint128
        // forge-lint: disable-next-line(unsafe-typecast)
        n.stake = uint128(remaining);
        // forge-lint: disable-next-line(unsafe-typecast)
        n.slashed += uint128(amount);
        emit Slashed(node, recipient, amount, remaining);
        _pay(recipient, amount);
    }

    /// @notice Holds the stake of `node` in place while a dispute against it is open. Slasher only.
    function lockStake(address node) external {
        if (msg.sender != slasher || msg.sender == address(0)) revert NotSlasher();
        uint256 count = ++openDisputes[node];
        emit DisputeLock(node, true, count);
    }

    /// @notice Releases one {lockStake} once its dispute was answered or finalized. Slasher only.
    function unlockStake(address node) external {
        if (msg.sender != slasher || msg.sender == address(0)) revert NotSlasher();
        uint256 count = openDisputes[node];
        if (count == 0) revert NoOpenDispute(node);
        openDisputes[node] = --count;
        emit DisputeLock(node, false, count);
    }

    // ---------------------------------------------------------------- views

    /// @notice The record of `node` (all zero for an unknown node).
    function getNode(address node) external view returns (Node memory) {
        return _nodes[node];
    }

    /// @notice True when `node` is registered, not exiting, and holds at least the minimum stake.
    function isActive(address node) external view returns (bool) {
        Node storage n = _nodes[node];
        return n.status == Status.Active && n.stake >= minStake;
    }

    /// @notice The value of the current epoch: the nonce half of report_data for published attestations.
    function currentEpoch() external view returns (bytes32) {
        return _currentEpoch;
    }

    /// @notice The value of the previous epoch (zero during epoch 0); still accepted in signatures.
    function previousEpoch() external view returns (bytes32) {
        return _previousEpoch;
    }

    /// @notice When `advanceEpoch` may next be called.
    function nextEpochAt() public view returns (uint64) {
        return epochStartedAt + epochLength;
    }

    /// @notice The EIP-712 digest the node signs to register.
    function hashRegistration(Registration calldata r) public view returns (bytes32) {
        return _hashTypedDataV4(
            keccak256(
                abi.encode(
                    REGISTRATION_TYPEHASH,
                    r.node,
                    r.operator,
                    keccak256(bytes(r.endpoint)),
                    keccak256(r.peerId),
                    keccak256(r.hpkePublicKey),
                    r.attestationHash,
                    r.teeType,
                    r.epoch,
                    r.deadline
                )
            )
        );
    }

    /// @notice The EIP-712 digest the node signs to re-attest.
    function hashReattestation(Reattestation calldata r) public view returns (bytes32) {
        return _hashTypedDataV4(
            keccak256(
                abi.encode(
                    REATTESTATION_TYPEHASH,
                    r.node,
                    keccak256(bytes(r.endpoint)),
                    keccak256(r.peerId),
                    r.attestationHash,
                    r.epoch,
                    r.deadline
                )
            )
        );
    }

    // ---------------------------------------------------------------- internal

    /// @dev Separate frame: the event's ten fields do not fit `register`'s stack.
    function _emitRegistered(Registration calldata r, uint64 index, uint256 stake) private {
        emit NodeRegistered(
            r.node, r.operator, r.endpoint, r.peerId, r.hpkePublicKey, r.attestationHash, r.teeType, index, stake
        );
    }

    function _startEpoch(uint64 index) private {
        bytes32 value = keccak256(
            abi.encode(block.chainid, address(this), index, _currentEpoch, blockhash(block.number - 1), block.timestamp)
        );
        _previousEpoch = _currentEpoch;
        _currentEpoch = value;
        epochIndex = index;
        epochStartedAt = uint64(block.timestamp);
        emit EpochAdvanced(index, value);
    }

    /// @dev The index of `epoch` if it is the current or previous epoch and, when `hasLast`, not
    ///      older than `lastIndex`.
    function _epochIndexOf(bytes32 epoch, uint64 lastIndex, bool hasLast) private view returns (uint64 index) {
        if (epoch == bytes32(0)) revert StaleEpoch(epoch);
        if (epoch == _currentEpoch) index = epochIndex;
        else if (epoch == _previousEpoch) index = epochIndex - 1;
        else revert StaleEpoch(epoch);
        if (hasLast && index < lastIndex) revert EpochNotNewer(index, lastIndex);
    }

    function _consume(bytes32 digest, address node, uint256 deadline, bytes calldata signature) private {
        // forge-lint: disable-next-line(block-timestamp)
        if (block.timestamp > deadline) revert SignatureExpired(deadline);
        if (digestUsed[digest]) revert SignatureReused(digest);
        if (!SignatureChecker.isValidSignatureNow(node, digest, signature)) revert InvalidSignature();
        digestUsed[digest] = true;
    }

    function _checkService(string calldata endpoint, bytes calldata peerId) private pure {
        uint256 e = bytes(endpoint).length;
        if (e == 0 || e > MAX_ENDPOINT_LENGTH) revert InvalidEndpoint();
        if (peerId.length == 0 || peerId.length > MAX_PEER_ID_LENGTH) revert InvalidPeerId();
    }

    /// @dev Takes `amount` from the caller: ETH as msg.value, or an ERC-20 by transferFrom.
    function _pullStake(uint256 amount) private {
        if (stakeToken == address(0)) {
            if (msg.value != amount) revert InvalidMsgValue(msg.value, amount);
            return;
        }
        if (msg.value != 0) revert InvalidMsgValue(msg.value, 0);
        IERC20 token = IERC20(stakeToken);
        uint256 before = token.balanceOf(address(this));
        token.safeTransferFrom(msg.sender, address(this), amount);
        if (token.balanceOf(address(this)) - before != amount) revert FeeOnTransferToken();
    }

    function _pay(address to, uint256 amount) private {
        if (amount == 0) return;
        if (stakeToken == address(0)) Address.sendValue(payable(to), amount);
        else IERC20(stakeToken).safeTransfer(to, amount);
    }
}
