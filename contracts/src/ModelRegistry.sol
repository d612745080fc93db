// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title ModelRegistry
/// @notice Publishers register a model id and the royalty (in basis points) they take on every
///         payment for that model. {PaymentChannels} snapshots these terms when a channel opens.
/// @dev Minimal for now: later issues add the manifest hash, price floor, key broker and measurements.
contract ModelRegistry {
    // ---------------------------------------------------------------- types

    /// @dev One slot: publisher (160 bits) | royaltyBps (16 bits).
    struct Terms {
        address publisher;
        uint16 royaltyBps;
    }

    // ---------------------------------------------------------------- constants

    /// @notice Basis-point denominator: a royalty of 10_000 is the whole payment.
    uint16 public constant MAX_BPS = 10_000;

    // ---------------------------------------------------------------- state

    mapping(bytes32 modelId => Terms) private _terms;

    // ---------------------------------------------------------------- events

    /// @notice `publisher` registered `modelId` with a royalty of `royaltyBps`.
    event ModelRegistered(bytes32 indexed modelId, address indexed publisher, uint16 royaltyBps);

    /// @notice The publisher of `modelId` changed its royalty; channels opened before keep `oldBps`.
    event RoyaltyChanged(bytes32 indexed modelId, uint16 oldBps, uint16 newBps);

    // ---------------------------------------------------------------- errors

    error ZeroModelId();
    error ModelExists(bytes32 modelId);
    error InvalidRoyalty(uint16 royaltyBps);
    error NotPublisher();

    // ---------------------------------------------------------------- external functions

    /// @notice Registers `modelId` with the caller as its publisher.
    /// @param modelId Non-zero model identifier (the client and node agree on how it is derived).
    /// @param royaltyBps Publisher share of every payment, in basis points (at most 10_000).
    function register(bytes32 modelId, uint16 royaltyBps) external {
        if (modelId == bytes32(0)) revert ZeroModelId();
        if (royaltyBps > MAX_BPS) revert InvalidRoyalty(royaltyBps);
        if (_terms[modelId].publisher != address(0)) revert ModelExists(modelId);

        _terms[modelId] = Terms({publisher: msg.sender, royaltyBps: royaltyBps});
        emit ModelRegistered(modelId, msg.sender, royaltyBps);
    }

    /// @notice Changes the royalty of a model. Only its publisher may call it.
    /// @dev Open channels are unaffected: they snapshot the royalty into their id at open, and
    ///      `open` reverts when the caller's expected royalty no longer matches (anti front-run).
    /// @param modelId A registered model id.
    /// @param royaltyBps The new royalty, in basis points (at most 10_000).
    function setRoyalty(bytes32 modelId, uint16 royaltyBps) external {
        Terms storage t = _terms[modelId];
        if (t.publisher != msg.sender || msg.sender == address(0)) revert NotPublisher();
        if (royaltyBps > MAX_BPS) revert InvalidRoyalty(royaltyBps);

        uint16 oldBps = t.royaltyBps;
        t.royaltyBps = royaltyBps;
        emit RoyaltyChanged(modelId, oldBps, royaltyBps);
    }

    // ---------------------------------------------------------------- views

    /// @notice The current terms of `modelId`; an unregistered id returns `(address(0), 0)`.
    function terms(bytes32 modelId) external view returns (address publisher, uint16 royaltyBps) {
        Terms storage t = _terms[modelId];
        return (t.publisher, t.royaltyBps);
    }
}
