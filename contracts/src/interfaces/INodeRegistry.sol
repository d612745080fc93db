// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title INodeRegistry
/// @notice The types, events and errors of {NodeRegistry} (the registry of inference nodes): what a client, a test
///         or another contract needs to build its calls and read its logs and reverts.
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
    /// @notice The minimum stake is zero or above type(uint128).max.
    error InvalidMinStake();
    /// @notice The unbonding delay is above 365 days.
    /// @param unbondingDelay The delay asked for.
    error InvalidUnbondingDelay(uint64 unbondingDelay);
    /// @notice The epoch length is zero or above 30 days.
    /// @param epochLength The length asked for.
    error InvalidEpochLength(uint64 epochLength);
    /// @notice The slasher is the zero address.
    error InvalidSlasher();
    /// @notice The slasher can be set once.
    /// @param slasher The slasher already set.
    error SlasherAlreadySet(address slasher);
    // Arguments.
    /// @notice The caller is not the node's operator (or not the operator the registration names).
    error NotOperator();
    /// @notice The caller is not the slasher.
    error NotSlasher();
    /// @notice The node address is zero.
    error InvalidNode();
    /// @notice The endpoint is empty or longer than 256 bytes.
    error InvalidEndpoint();
    /// @notice The peer id is empty or longer than 128 bytes.
    error InvalidPeerId();
    /// @notice The HPKE public key is not 1,216 bytes (ML-KEM-768 then X25519).
    /// @param length Its length.
    error InvalidHpkeKey(uint256 length);
    /// @notice The attestation hash is zero.
    error InvalidAttestationHash();
    /// @notice An unknown TEE type (1 TDX, 2 dstack, 3 simulated).
    /// @param teeType The type given.
    error InvalidTeeType(uint8 teeType);
    /// @notice The slash recipient is the zero address.
    error InvalidRecipient();
    /// @notice An amount of zero.
    error ZeroAmount();
    // Signatures and epochs.
    /// @notice The node's key did not sign this message (65-byte low-s ECDSA or ERC-1271).
    error InvalidSignature();
    /// @notice The signed message's deadline has passed.
    /// @param deadline Its deadline.
    error SignatureExpired(uint256 deadline);
    /// @notice The message names neither the current nor the previous epoch.
    /// @param epoch The epoch value it names.
    error StaleEpoch(bytes32 epoch);
    /// @notice The message's epoch is older than the node's last attestation.
    /// @param epochIndex The message's epoch index.
    /// @param lastEpochIndex The node's last one.
    error EpochNotNewer(uint64 epochIndex, uint64 lastEpochIndex);
    /// @notice This signed message was already used (each is accepted once).
    /// @param digest Its EIP-712 digest.
    error SignatureReused(bytes32 digest);
    /// @notice The current epoch is younger than `epochLength`.
    /// @param nextEpochAt When the next may start.
    error EpochNotOver(uint64 nextEpochAt);
    // Node state.
    /// @notice The node is active or exiting; it registers again only after withdrawing.
    /// @param node The node.
    error AlreadyRegistered(address node);
    /// @notice The node is not active.
    /// @param node The node.
    error NotActive(address node);
    /// @notice The node has not requested its exit.
    /// @param node The node.
    error NotExiting(address node);
    /// @notice The unbonding delay has not passed.
    /// @param unbondingEndsAt When it ends.
    error UnbondingActive(uint64 unbondingEndsAt);
    /// @notice The node is neither active nor exiting (nothing left to slash).
    /// @param node The node.
    error NotSlashable(address node);
    /// @notice The slash is above the node's stake.
    /// @param amount The amount asked.
    /// @param stake The stake.
    error SlashExceedsStake(uint256 amount, uint256 stake);
    /// @notice Open disputes hold the stake in place.
    /// @param node The node.
    /// @param open How many are open.
    error DisputesPending(address node, uint256 open);
    /// @notice No dispute against the node is open.
    /// @param node The node.
    error NoOpenDispute(address node);
    // Funds.
    /// @notice The stake is below the registry's minimum.
    /// @param stake The stake given.
    /// @param minStake The minimum.
    error StakeBelowMinimum(uint256 stake, uint256 minStake);
    /// @notice The stake would exceed type(uint128).max.
    error StakeOverflow();
    /// @notice The ETH sent is not the stake (ETH registry) or not zero (ERC-20 registry).
    /// @param sent What was sent.
    /// @param expected What was expected.
    error InvalidMsgValue(uint256 sent, uint256 expected);
    /// @notice The registry received less than the stake (a fee-on-transfer token).
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
