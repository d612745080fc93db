// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title IModelRegistry
/// @notice The types, events and errors of {ModelRegistry} (the registry of models and their
///         publishers): what a client, a test or another contract needs to build its calls and read
///         its logs and reverts.
interface IModelRegistry {
    // ---------------------------------------------------------------- types

    /// @dev One slot: publisher (160 bits) | royaltyBps (16 bits).
    struct Terms {
        address publisher;
        uint16 royaltyBps;
    }

    /// @dev The encrypted release of a published model (empty for a model only `register`ed).
    struct Listing {
        bytes32 manifestHash;
        bytes32 weightsHash;
        uint256 priceFloor;
        string keyBrokerUrl;
        bytes32[] allowedMeasurements;
    }

    // ---------------------------------------------------------------- events

    /// @notice `publisher` registered `modelId` with a royalty of `royaltyBps`.
    event ModelRegistered(bytes32 indexed modelId, address indexed publisher, uint16 royaltyBps);

    /// @notice The publisher of `modelId` changed its royalty; channels opened before keep `oldBps`.
    event RoyaltyChanged(bytes32 indexed modelId, uint16 oldBps, uint16 newBps);

    /// @notice `publisher` published (or re-published) `modelId`'s encrypted release.
    event ModelPublished(
        bytes32 indexed modelId,
        address indexed publisher,
        bytes32 manifestHash,
        bytes32 weightsHash,
        uint256 priceFloor,
        string keyBrokerUrl
    );

    /// @notice A new bundle (manifest and weights) replaces the previous release of `modelId`.
    event ReleaseUpdated(bytes32 indexed modelId, bytes32 manifestHash, bytes32 weightsHash);

    /// @notice The minimum price per output token of `modelId` changed.
    event PriceFloorChanged(bytes32 indexed modelId, uint256 oldFloor, uint256 newFloor);

    /// @notice Nodes must now fetch `modelId`'s key from `keyBrokerUrl`.
    event KeyBrokerChanged(bytes32 indexed modelId, string keyBrokerUrl);

    /// @notice The enclave builds allowed to receive `modelId`'s key are now exactly `measurements`.
    event MeasurementsChanged(bytes32 indexed modelId, bytes32[] measurements);

    // ---------------------------------------------------------------- errors

    /// @notice The model id is zero (reserved for "no model").
    error ZeroModelId();
    /// @notice `modelId` is already registered.
    /// @param modelId The model.
    error ModelExists(bytes32 modelId);
    /// @notice A royalty above 10,000 bps (100%).
    /// @param royaltyBps The royalty asked for.
    error InvalidRoyalty(uint16 royaltyBps);
    /// @notice The caller is not the model's publisher.
    error NotPublisher();
    /// @notice `modelId` already has a release; use the update calls.
    /// @param modelId The model.
    error AlreadyPublished(bytes32 modelId);
    /// @notice `modelId` has no release yet.
    /// @param modelId The model.
    error NotPublished(bytes32 modelId);
    /// @notice A manifest or weights hash is zero.
    error ZeroHash();
    /// @notice The key broker URL is empty or longer than 256 bytes.
    error InvalidKeyBrokerUrl();
    /// @notice More than 32 allowed measurement ids.
    /// @param count How many were given.
    error TooManyMeasurements(uint256 count);
    /// @notice An allowed measurement id is zero.
    error ZeroMeasurement();

    // ---------------------------------------------------------------- functions other contracts call

    /// @notice The publisher and royalty of `modelId` (zero for an unregistered model).
    /// @param modelId The model.
    /// @return publisher The royalty's recipient.
    /// @return royaltyBps The royalty, in basis points.
    function terms(bytes32 modelId) external view returns (address publisher, uint16 royaltyBps);
}
