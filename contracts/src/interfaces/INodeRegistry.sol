// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title INodeRegistry
/// @notice The types, events and errors of {NodeRegistry}, the registry of inference nodes: what a client, a test or another
///         contract needs to build its calls and read its logs and reverts, without the implementation.
interface INodeRegistry {
    // ---------------------------------------------------------------- types

    /// @notice Where a node is in its lifecycle.
    enum Status {
        None,
        Active,
        Exiting,
        Withdrawn
    }

    /// @notice What the node's enclave key signs to register (the EIP-712 `Registration` type).
    struct Registration {
        address node;
        address operator;
        string endpoint;
        bytes peerId;
        bytes hpkePublicKey;
        bytes32 attestationHash;
        uint8 teeType;
        bytes32 epoch;
        uint256 deadline;
    }

    /// @notice What the node's enclave key signs to re-attest (the EIP-712 `Reattestation` type).
    struct Reattestation {
        address node;
        string endpoint;
        bytes peerId;
        bytes32 attestationHash;
        bytes32 epoch;
        uint256 deadline;
    }

    /// @notice A node's record: six words, of which a first registration writes five (slot 2 stays
    ///         zero until an exit or a slash). Layout: slot 0 operator|teeType|status|registeredAt;
    ///         slot 1 attestedAt|epochIndex|stake; slot 2 unbondingEndsAt|slashed; then the hashes.
    /// @dev The endpoint, peer id and HPKE key are not stored: they are in the latest
    ///      `NodeRegistered`/`NodeReattested` event of the node (and the key in its attestation
    ///      document), as a channel's terms are in its opening event. Only the key's hash is kept, so
    ///      a key from any source (an advert, a document) is checked against the chain. Storing the
    ///      1,216-byte key cost 39 words (about 860k gas a registration).
    struct Node {
        address operator;
        uint8 teeType;
        Status status;
        uint64 registeredAt;
        uint64 attestedAt;
        uint64 epochIndex; // index of the epoch of the last (re-)attestation
        uint128 stake; // current stake, in `stakeToken`
        uint64 unbondingEndsAt; // 0 unless Exiting or Withdrawn
        uint128 slashed; // total ever slashed from this node
        bytes32 attestationHash;
        bytes32 epoch; // value of the epoch of the last (re-)attestation
        bytes32 hpkeKeyHash; // keccak256 of the HPKE public key
    }

    // ---------------------------------------------------------------- events

    /// @notice `node` was registered by `operator` with `stake`.
    event NodeRegistered(
        address indexed node,
        address indexed operator,
        string endpoint,
        bytes peerId,
        bytes hpkePublicKey,
        bytes32 attestationHash,
        uint8 teeType,
        uint64 epochIndex,
        uint256 stake
    );
    /// @notice `node` re-attested in epoch `epochIndex` (its endpoint and peer id may have changed).
    event NodeReattested(
        address indexed node, bytes32 attestationHash, uint64 epochIndex, string endpoint, bytes peerId
    );
    /// @notice The operator added `amount`; the stake is now `newStake`.
    event StakeAdded(address indexed node, uint256 amount, uint256 newStake);
    /// @notice The operator started the exit; the stake unlocks at `unbondingEndsAt`.
    event ExitRequested(address indexed node, uint64 unbondingEndsAt);
    /// @notice The stake of `node` (`amount`) went back to its operator.
    event StakeWithdrawn(address indexed node, address indexed operator, uint256 amount);
    /// @notice The slasher took `amount` of the stake of `node` and sent it to `recipient`.
    event Slashed(address indexed node, address indexed recipient, uint256 amount, uint256 remainingStake);
    /// @notice The slasher opened (`open` true) or closed a dispute against `node`; `count` are open now.
    event DisputeLock(address indexed node, bool open, uint256 count);
    /// @notice The slasher was set (once).
    event SlasherSet(address indexed slasher);
    /// @notice Epoch `epochIndex` started with value `epoch`.
    event EpochAdvanced(uint64 indexed epochIndex, bytes32 epoch);

    // ---------------------------------------------------------------- errors

    // Configuration.
    error InvalidMinStake();
    error InvalidUnbondingDelay(uint64 unbondingDelay);
    error InvalidEpochLength(uint64 epochLength);
    error InvalidSlasher();
    error SlasherAlreadySet(address slasher);
    // Arguments.
    error NotOperator();
    error NotSlasher();
    error InvalidNode();
    error InvalidEndpoint();
    error InvalidPeerId();
    error InvalidHpkeKey(uint256 length);
    error InvalidAttestationHash();
    error InvalidTeeType(uint8 teeType);
    error InvalidRecipient();
    error ZeroAmount();
    // Signatures and epochs.
    error InvalidSignature();
    error SignatureExpired(uint256 deadline);
    error StaleEpoch(bytes32 epoch);
    error EpochNotNewer(uint64 epochIndex, uint64 lastEpochIndex);
    error SignatureReused(bytes32 digest);
    error EpochNotOver(uint64 nextEpochAt);
    // Node state.
    error AlreadyRegistered(address node);
    error NotActive(address node);
    error NotExiting(address node);
    error UnbondingActive(uint64 unbondingEndsAt);
    error NotSlashable(address node);
    error SlashExceedsStake(uint256 amount, uint256 stake);
    error DisputesPending(address node, uint256 open);
    error NoOpenDispute(address node);
    // Funds.
    error StakeBelowMinimum(uint256 stake, uint256 minStake);
    error StakeOverflow();
    error InvalidMsgValue(uint256 sent, uint256 expected);
    error FeeOnTransferToken();

    // ---------------------------------------------------------------- functions other contracts call

    /// @notice The record of `node` (all zero for an unknown node).
    /// @param node The node's enclave signing address.
    /// @return The record.
    function getNode(address node) external view returns (Node memory);

    /// @notice True when `node` is registered, not exiting, and holds at least the minimum stake.
    /// @param node The node.
    /// @return Whether the node is active.
    function isActive(address node) external view returns (bool);

    /// @notice Takes `amount` of the stake of `node` and sends it to `recipient` (the slasher only).
    /// @param node The node.
    /// @param amount The amount taken.
    /// @param recipient Who receives it.
    function slash(address node, uint256 amount, address recipient) external;

    /// @notice Holds the stake of `node` while a dispute against it is open (the slasher only).
    /// @param node The node.
    function lockStake(address node) external;

    /// @notice Releases one {lockStake} (the slasher only).
    /// @param node The node.
    function unlockStake(address node) external;
}
