// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IModelRegistry} from "./interfaces/IModelRegistry.sol";

/// @title ModelRegistry
/// @notice Publishers register a model id and the royalty (in basis points) they take on every
///         payment for that model. {PaymentChannels} snapshots these terms when a channel opens.
///         A published model also carries its encrypted release: the hash of the signed bundle
///         manifest, the hash of the clear weights, a price floor, the URL of the publisher's key
///         broker and the measurement ids of the enclave builds allowed to receive the model key.
/// @dev A measurement id is 32 bytes: the dstack compose hash, or for plain TDX
///      sha256("dcml-measurement-v1" || MRTD || RTMR0..3) (see client/key_broker.py).
contract ModelRegistry is IModelRegistry {
    // ---------------------------------------------------------------- constants

    /// @notice Basis-point denominator: a royalty of 10_000 is the whole payment.
    uint16 public constant MAX_BPS = 10_000;
    /// @notice Longest key broker URL, in bytes (keeps reads and storage bounded).
    uint256 public constant MAX_URL_LENGTH = 256;
    /// @notice Most measurement ids a model may allow at once.
    uint256 public constant MAX_MEASUREMENTS = 32;

    // ---------------------------------------------------------------- state

    mapping(bytes32 modelId => Terms) private _terms;
    mapping(bytes32 modelId => Listing) private _listings;

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

    /// @notice Publishes `modelId`'s encrypted release; the caller becomes (or must already be) its publisher.
    /// @dev Works on a fresh id (registers it) or on an id the caller `register`ed but never published.
    ///      Later changes go through the setters below, so a listing is never silently overwritten.
    /// @param modelId Non-zero model identifier.
    /// @param royaltyBps Publisher share of every payment, in basis points (at most 10_000).
    /// @param manifestHash sha256 of the bundle's canonical manifest (what the publisher signed).
    /// @param weightsHash Hash of the clear weight files, as the manifest states it.
    /// @param priceFloor Least price per output token nodes should charge (token's smallest unit).
    /// @param keyBrokerUrl Where attested nodes fetch the model key (non-empty, at most 256 bytes).
    /// @param measurements Measurement ids allowed to receive the key (non-zero, at most 32).
    function publish(
        bytes32 modelId,
        uint16 royaltyBps,
        bytes32 manifestHash,
        bytes32 weightsHash,
        uint256 priceFloor,
        string calldata keyBrokerUrl,
        bytes32[] calldata measurements
    ) external {
        if (modelId == bytes32(0)) revert ZeroModelId();
        if (royaltyBps > MAX_BPS) revert InvalidRoyalty(royaltyBps);
        Terms storage t = _terms[modelId];
        if (t.publisher == address(0)) {
            _terms[modelId] = Terms({publisher: msg.sender, royaltyBps: royaltyBps});
            emit ModelRegistered(modelId, msg.sender, royaltyBps);
        } else {
            if (t.publisher != msg.sender) revert ModelExists(modelId);
            if (_listings[modelId].manifestHash != bytes32(0)) revert AlreadyPublished(modelId);
            if (t.royaltyBps != royaltyBps) {
                emit RoyaltyChanged(modelId, t.royaltyBps, royaltyBps);
                t.royaltyBps = royaltyBps;
            }
        }
        Listing storage l = _listings[modelId];
        _setRelease(l, manifestHash, weightsHash);
        _setKeyBroker(l, keyBrokerUrl);
        l.priceFloor = priceFloor;
        _setMeasurements(l, measurements);
        emit ModelPublished(modelId, msg.sender, manifestHash, weightsHash, priceFloor, keyBrokerUrl);
        emit MeasurementsChanged(modelId, measurements);
    }

    /// @notice Points `modelId` at a new bundle (new manifest and weights). Publisher only.
    function updateRelease(bytes32 modelId, bytes32 manifestHash, bytes32 weightsHash) external {
        Listing storage l = _publishedBy(modelId);
        _setRelease(l, manifestHash, weightsHash);
        emit ReleaseUpdated(modelId, manifestHash, weightsHash);
    }

    /// @notice Changes the least price per output token. Publisher only.
    function setPriceFloor(bytes32 modelId, uint256 priceFloor) external {
        Listing storage l = _publishedBy(modelId);
        uint256 oldFloor = l.priceFloor;
        l.priceFloor = priceFloor;
        emit PriceFloorChanged(modelId, oldFloor, priceFloor);
    }

    /// @notice Moves the key broker. Publisher only.
    function setKeyBroker(bytes32 modelId, string calldata keyBrokerUrl) external {
        Listing storage l = _publishedBy(modelId);
        _setKeyBroker(l, keyBrokerUrl);
        emit KeyBrokerChanged(modelId, keyBrokerUrl);
    }

    /// @notice Replaces the allowed measurement ids (drop one to revoke that build). Publisher only.
    /// @dev Brokers read this list on every key request, so a revocation applies to the next request;
    ///      it cannot take back a key already released.
    function setAllowedMeasurements(bytes32 modelId, bytes32[] calldata measurements) external {
        Listing storage l = _publishedBy(modelId);
        _setMeasurements(l, measurements);
        emit MeasurementsChanged(modelId, measurements);
    }

    // ---------------------------------------------------------------- views

    /// @notice The current terms of `modelId`; an unregistered id returns `(address(0), 0)`.
    function terms(bytes32 modelId) external view returns (address publisher, uint16 royaltyBps) {
        Terms storage t = _terms[modelId];
        return (t.publisher, t.royaltyBps);
    }

    /// @notice The encrypted release of `modelId` (all zero / empty when it was never published).
    function listing(bytes32 modelId)
        external
        view
        returns (bytes32 manifestHash, bytes32 weightsHash, uint256 priceFloor, string memory keyBrokerUrl)
    {
        Listing storage l = _listings[modelId];
        return (l.manifestHash, l.weightsHash, l.priceFloor, l.keyBrokerUrl);
    }

    /// @notice The measurement ids allowed to receive `modelId`'s key.
    function allowedMeasurements(bytes32 modelId) external view returns (bytes32[] memory) {
        return _listings[modelId].allowedMeasurements;
    }

    /// @notice Whether `measurement` may receive `modelId`'s key.
    function isMeasurementAllowed(bytes32 modelId, bytes32 measurement) external view returns (bool) {
        bytes32[] storage list = _listings[modelId].allowedMeasurements;
        for (uint256 i; i < list.length; ++i) {
            if (list[i] == measurement) return true;
        }
        return false;
    }

    /// @notice Whether `modelId` has an encrypted release.
    function isPublished(bytes32 modelId) external view returns (bool) {
        return _listings[modelId].manifestHash != bytes32(0);
    }

    // ---------------------------------------------------------------- internal functions

    function _publishedBy(bytes32 modelId) private view returns (Listing storage l) {
        if (_terms[modelId].publisher != msg.sender || msg.sender == address(0)) revert NotPublisher();
        l = _listings[modelId];
        if (l.manifestHash == bytes32(0)) revert NotPublished(modelId);
    }

    function _setRelease(Listing storage l, bytes32 manifestHash, bytes32 weightsHash) private {
        if (manifestHash == bytes32(0) || weightsHash == bytes32(0)) revert ZeroHash();
        l.manifestHash = manifestHash;
        l.weightsHash = weightsHash;
    }

    function _setKeyBroker(Listing storage l, string calldata keyBrokerUrl) private {
        uint256 n = bytes(keyBrokerUrl).length;
        if (n == 0 || n > MAX_URL_LENGTH) revert InvalidKeyBrokerUrl();
        l.keyBrokerUrl = keyBrokerUrl;
    }

    function _setMeasurements(Listing storage l, bytes32[] calldata measurements) private {
        // An empty list is allowed: it stops every key release (the broker fails closed).
        if (measurements.length > MAX_MEASUREMENTS) revert TooManyMeasurements(measurements.length);
        for (uint256 i; i < measurements.length; ++i) {
            if (measurements[i] == bytes32(0)) revert ZeroMeasurement();
        }
        l.allowedMeasurements = measurements;
    }
}
