// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {TestBase} from "./utils/TestBase.sol";
import {PaymentChannels} from "../src/PaymentChannels.sol";
import {ModelRegistry} from "../src/ModelRegistry.sol";
import {TestToken} from "./TestToken.sol";
import {MockERC1271Wallet} from "./mocks/MockERC1271Wallet.sol";
import {FeeOnTransferToken} from "./mocks/FeeOnTransferToken.sol";
import {ReentrantToken} from "./mocks/ReentrantToken.sol";
import {ReentrantSigner} from "./mocks/ReentrantSigner.sol";
import {RevertingReceiver} from "./mocks/RevertingReceiver.sol";
import {BogusRegistry} from "./mocks/BogusRegistry.sol";
import {IPaymentChannels} from "../src/interfaces/IPaymentChannels.sol";

/// @dev Shared fixture: a registry with a 2.5% model and a royalty-free model, the channel contract
///      (15 min grace), an ERC-20 and funded parties.
abstract contract PaymentChannelsFixture is TestBase {
    uint64 internal constant GRACE = 900;
    uint16 internal constant BPS = 250;
    bytes32 internal constant MODEL = keccak256("model/royalty");
    bytes32 internal constant FREE_MODEL = keccak256("model/free");
    bytes32 internal constant SALT = keccak256("salt");
    address internal constant ETH = address(0);

    uint256 internal constant SIGNER_PK = 0x5151;
    uint256 internal constant OTHER_PK = 0x0BAD;

    ModelRegistry internal registry;
    PaymentChannels internal channels;
    TestToken internal token;

    address internal payer = address(0xA11CE);
    address internal payee = address(0xB0B);
    address internal publisher = address(0x9B);
    address internal stranger = address(0x5757);
    address internal signer;

    mapping(bytes32 channelId => IPaymentChannels.ChannelParams) internal _params;

    function setUp() public virtual {
        vm.warp(1_700_000_000);
        registry = new ModelRegistry();
        channels = new PaymentChannels(address(registry), GRACE);
        token = new TestToken("Test", "TST");
        signer = vm.addr(SIGNER_PK);
        vm.startPrank(publisher);
        registry.register(MODEL, BPS);
        registry.register(FREE_MODEL, 0);
        vm.stopPrank();
        vm.deal(payer, type(uint128).max);
        token.mint(payer, type(uint128).max);
        vm.prank(payer);
        token.approve(address(channels), type(uint256).max);
    }

    function _open(address token_, uint128 deposit) internal returns (bytes32) {
        return _openWith(token_, deposit, SALT, signer, MODEL, BPS);
    }

    function _openWith(address token_, uint128 deposit, bytes32 salt, address signer_, bytes32 modelId, uint16 bps)
        internal
        returns (bytes32)
    {
        return _openTo(payee, token_, deposit, salt, signer_, modelId, bps);
    }

    /// @dev Opens from `payer` and records the channel's terms for `_p`.
    function _openTo(
        address payee_,
        address token_,
        uint128 deposit,
        bytes32 salt,
        address signer_,
        bytes32 modelId,
        uint16 bps
    ) internal returns (bytes32 id) {
        vm.prank(payer);
        id = channels.open{value: token_ == ETH ? deposit : 0}(payee_, token_, deposit, salt, signer_, modelId, bps);
        (address publisher_, uint16 bps_) = registry.terms(modelId); // unchanged since the open
        _params[id] = IPaymentChannels.ChannelParams(payer, payee_, token_, salt, signer_, modelId, publisher_, bps_);
    }

    /// @dev The terms of a channel this fixture opened (all zero for an unknown id).
    function _p(bytes32 channelId) internal view returns (IPaymentChannels.ChannelParams memory) {
        return _params[channelId];
    }

    /// @dev Terms of a channel that was never opened.
    function _unknown() internal view returns (IPaymentChannels.ChannelParams memory) {
        return IPaymentChannels.ChannelParams(payer, payee, ETH, keccak256("never"), signer, MODEL, publisher, BPS);
    }

    function _voucher(bytes32 channelId, uint128 amount) internal view returns (bytes memory) {
        return _sign(SIGNER_PK, channels.hashVoucher(channelId, amount));
    }

    function _settle(bytes32 channelId, uint128 amount) internal {
        bytes memory sig = _voucher(channelId, amount);
        vm.prank(_params[channelId].payee);
        channels.settle(_p(channelId), amount, sig);
    }

    function _royalty(uint256 amount, uint256 bps) internal pure returns (uint256) {
        return amount * bps / 10_000;
    }
}

contract PaymentChannelsTest is PaymentChannelsFixture {
    receive() external payable {}

    // ------------------------------------------------------------------ constructor and domain

    function test_constructor_setsRegistryAndGrace() public view {
        vm.assertEq(channels.modelRegistry(), address(registry));
        vm.assertEq(uint256(channels.closeGracePeriod()), GRACE);
    }

    function test_constructor_revertsOnZeroGrace() public {
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.InvalidGracePeriod.selector, uint64(0)));
        new PaymentChannels(address(registry), 0);
    }

    function test_constructor_revertsOnGraceAboveMax() public {
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.InvalidGracePeriod.selector, uint64(30 days + 1)));
        new PaymentChannels(address(registry), 30 days + 1);
    }

    function test_constructor_revertsOnRegistryWithoutCode() public {
        vm.expectRevert(IPaymentChannels.InvalidModelRegistry.selector);
        new PaymentChannels(address(0x1234), GRACE);
    }

    function test_eip712Domain_isPaymentChannelsV1OnThisChainAndContract() public view {
        (, string memory name, string memory version, uint256 chainId, address verifyingContract,,) =
            channels.eip712Domain();
        vm.assertEq(keccak256(bytes(name)), keccak256("PaymentChannels"));
        vm.assertEq(keccak256(bytes(version)), keccak256("1"));
        vm.assertEq(chainId, block.chainid);
        vm.assertEq(verifyingContract, address(channels));
    }

    function test_hashVoucher_matchesEip712Spec() public view {
        vm.assertEq(channels.VOUCHER_TYPEHASH(), keccak256("Voucher(bytes32 channelId,uint128 cumulativeAmount)"));
        bytes32 id = keccak256("id");
        vm.assertEq(channels.hashVoucher(id, 42), _voucherDigest(block.chainid, address(channels), id, 42));
    }

    // ------------------------------------------------------------------ open

    function test_open_eth_storesChannelAndEmits() public {
        bytes32 expectedId = channels.computeChannelId(payer, payee, ETH, SALT, signer, MODEL);
        vm.expectEmit(address(channels));
        emit IPaymentChannels.ChannelOpened(expectedId, payer, payee, ETH, signer, MODEL, publisher, BPS, 1 ether, SALT);
        bytes32 id = _open(ETH, 1 ether);

        vm.assertEq(id, expectedId);
        IPaymentChannels.ChannelState memory ch = channels.getChannel(id);
        vm.assertFalse(ch.finalized);
        vm.assertEq(uint256(ch.deposit), 1 ether);
        vm.assertEq(uint256(ch.settled), 0);
        vm.assertEq(uint256(ch.closeRequestedAt), 0);
        vm.assertEq(address(channels).balance, 1 ether);
        // The terms are not stored: they are the emitted params, and they address the channel.
        vm.assertEq(
            channels.channelIdOf(
                IPaymentChannels.ChannelParams(payer, payee, ETH, SALT, signer, MODEL, publisher, BPS)
            ),
            id
        );
    }

    function test_open_erc20_pullsDeposit() public {
        uint256 before = token.balanceOf(payer);
        bytes32 id = _open(address(token), 500);
        vm.assertEq(token.balanceOf(address(channels)), 500);
        vm.assertEq(token.balanceOf(payer), before - 500);
        vm.assertEq(uint256(channels.getChannel(id).deposit), 500);
        vm.assertEq(id, channels.computeChannelId(payer, payee, address(token), SALT, signer, MODEL));
    }

    function test_open_idIsTheSpecifiedHash() public {
        bytes32 id = _open(ETH, 1);
        bytes32 expected = keccak256(
            abi.encode(payer, payee, ETH, SALT, signer, MODEL, publisher, BPS, address(channels), block.chainid)
        );
        vm.assertEq(id, expected);
    }

    function test_open_snapshotsRoyaltyAgainstLaterChanges() public {
        bytes32 id = _open(ETH, 10_000);
        vm.prank(publisher);
        registry.setRoyalty(MODEL, 5_000);
        _settle(id, 10_000);
        vm.assertEq(channels.earnings(ETH, publisher), 250);
        vm.assertEq(channels.earnings(ETH, payee), 9_750);
    }

    function test_open_unregisteredModelHasNoRoyalty() public {
        bytes32 id = _openWith(ETH, 100, SALT, signer, keccak256("unknown"), 0);
        vm.assertEq(_p(id).publisher, address(0));
        vm.assertEq(
            channels.channelIdOf(
                IPaymentChannels.ChannelParams(payer, payee, ETH, SALT, signer, keccak256("unknown"), address(0), 0)
            ),
            id
        );
        _settle(id, 100);
        vm.assertEq(channels.earnings(ETH, payee), 100);
    }

    function test_open_zeroRoyaltyModelKeepsPublisherInIdButPaysNoRoyalty() public {
        bytes32 id = _openWith(ETH, 100, SALT, signer, FREE_MODEL, 0);
        vm.assertEq(id, channels.computeChannelId(payer, payee, ETH, SALT, signer, FREE_MODEL));
        // The registered publisher is part of the id even at 0 bps ...
        vm.assertEq(_p(id).publisher, publisher);
        vm.assertEq(
            channels.channelIdOf(
                IPaymentChannels.ChannelParams(payer, payee, ETH, SALT, signer, FREE_MODEL, publisher, 0)
            ),
            id
        );
        // ... and is never credited.
        _settle(id, 100);
        vm.assertEq(channels.earnings(ETH, publisher), 0);
        vm.assertEq(channels.earnings(ETH, payee), 100);
    }

    function test_open_revertsOnZeroPayee() public {
        vm.expectRevert(IPaymentChannels.InvalidPayee.selector);
        vm.prank(payer);
        channels.open{value: 1}(address(0), ETH, 1, SALT, signer, MODEL, BPS);
    }

    function test_open_revertsWhenPayeeIsPayer() public {
        vm.expectRevert(IPaymentChannels.InvalidPayee.selector);
        vm.prank(payer);
        channels.open{value: 1}(payer, ETH, 1, SALT, signer, MODEL, BPS);
    }

    function test_open_revertsOnZeroSigner() public {
        vm.expectRevert(IPaymentChannels.InvalidSigner.selector);
        vm.prank(payer);
        channels.open{value: 1}(payee, ETH, 1, SALT, address(0), MODEL, BPS);
    }

    function test_open_revertsOnZeroDeposit() public {
        vm.expectRevert(IPaymentChannels.ZeroAmount.selector);
        vm.prank(payer);
        channels.open(payee, ETH, 0, SALT, signer, MODEL, BPS);
    }

    function test_open_revertsOnRoyaltyMismatch() public {
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.RoyaltyMismatch.selector, uint16(100), BPS));
        vm.prank(payer);
        channels.open{value: 1}(payee, ETH, 1, SALT, signer, MODEL, 100);
    }

    function test_open_revertsWhenRoyaltyFrontRun() public {
        vm.prank(publisher);
        registry.setRoyalty(MODEL, 9_000);
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.RoyaltyMismatch.selector, BPS, uint16(9_000)));
        _open(ETH, 1);
    }

    function test_open_revertsOnRoyaltyAboveWholeFromRegistry() public {
        PaymentChannels bogus = new PaymentChannels(address(new BogusRegistry()), GRACE);
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.InvalidRoyalty.selector, uint16(10_001)));
        vm.prank(payer);
        bogus.open{value: 1}(payee, ETH, 1, SALT, signer, MODEL, 10_001);
    }

    function test_open_revertsWhenChannelExists() public {
        bytes32 id = _open(ETH, 1);
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.ChannelExists.selector, id));
        _open(ETH, 1);
    }

    function test_open_revertsWhenReopeningFinalizedChannel() public {
        bytes32 id = _open(ETH, 10);
        vm.prank(payee);
        channels.close(_p(id), 0, "");
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.ChannelExists.selector, id));
        _open(ETH, 10);
    }

    function test_open_revertsWhenEthValueDiffers() public {
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.InvalidMsgValue.selector, 9, 10));
        vm.prank(payer);
        channels.open{value: 9}(payee, ETH, 10, SALT, signer, MODEL, BPS);
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.InvalidMsgValue.selector, 11, 10));
        vm.prank(payer);
        channels.open{value: 11}(payee, ETH, 10, SALT, signer, MODEL, BPS);
    }

    function test_open_revertsWhenErc20SentWithValue() public {
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.InvalidMsgValue.selector, 1, 0));
        vm.prank(payer);
        channels.open{value: 1}(payee, address(token), 10, SALT, signer, MODEL, BPS);
    }

    function test_open_revertsOnFeeOnTransferToken() public {
        FeeOnTransferToken fot = new FeeOnTransferToken();
        fot.mint(payer, 1_000);
        vm.startPrank(payer);
        fot.approve(address(channels), 1_000);
        vm.expectRevert(IPaymentChannels.FeeOnTransferToken.selector);
        channels.open(payee, address(fot), 1_000, SALT, signer, MODEL, BPS);
        vm.stopPrank();
    }

    function test_open_revertsWhenDepositExceedsUint120() public {
        uint128 tooMuch = uint128(type(uint120).max) + 1;
        vm.expectRevert(IPaymentChannels.DepositOverflow.selector);
        _open(address(token), tooMuch);
        vm.expectRevert(IPaymentChannels.DepositOverflow.selector);
        _open(ETH, type(uint128).max);
        vm.assertEq(token.balanceOf(address(channels)), 0);
        vm.assertEq(address(channels).balance, 0);
        // The bound itself opens.
        bytes32 id = _open(address(token), type(uint120).max);
        vm.assertEq(uint256(channels.getChannel(id).deposit), type(uint120).max);
    }

    function test_open_revertsWithoutAllowance() public {
        vm.prank(payer);
        token.approve(address(channels), 0);
        vm.expectRevert();
        _open(address(token), 1);
    }

    function test_open_revertsOnTokenWithoutCode() public {
        vm.expectRevert();
        _open(address(0xDEAD), 1);
    }

    // ------------------------------------------------------------------ channel terms (params)

    function test_channelIdOf_structEncodingEqualsComputeChannelId() public view {
        IPaymentChannels.ChannelParams memory p =
            IPaymentChannels.ChannelParams(payer, payee, address(token), SALT, signer, MODEL, publisher, BPS);
        bytes32 id = channels.channelIdOf(p);
        vm.assertEq(id, channels.computeChannelId(payer, payee, address(token), SALT, signer, MODEL));
        vm.assertEq(id, keccak256(abi.encode(p, address(channels), block.chainid)));
    }

    /// @dev The struct's ABI encoding is the id preimage's, field for field, for any terms.
    function testFuzz_channelIdOf_equalsSpecifiedHash(
        address payer_,
        address payee_,
        address token_,
        bytes32 salt,
        address signer_,
        bytes32 modelId,
        address publisher_,
        uint16 bps
    ) public view {
        bytes32 expected = keccak256(
            abi.encode(
                payer_, payee_, token_, salt, signer_, modelId, publisher_, bps, address(channels), block.chainid
            )
        );
        vm.assertEq(
            channels.channelIdOf(
                IPaymentChannels.ChannelParams(payer_, payee_, token_, salt, signer_, modelId, publisher_, bps)
            ),
            expected
        );
    }

    /// @dev A registered model: the id `open` returns, `computeChannelId` and `channelIdOf` of the
    ///      emitted terms agree.
    function testFuzz_open_idEqualsChannelIdOfEmittedTerms(bytes32 salt, bytes32 modelId, uint16 bps, bool eth) public {
        vm.assume(modelId != bytes32(0) && modelId != MODEL && modelId != FREE_MODEL); // unregistered
        bps = uint16(bound(bps, 0, 10_000));
        vm.prank(publisher);
        registry.register(modelId, bps);
        address t = eth ? ETH : address(token);
        bytes32 predicted = channels.computeChannelId(payer, payee, t, salt, signer, modelId);
        bytes32 id = _openWith(t, 1, salt, signer, modelId, bps);
        vm.assertEq(id, predicted);
        vm.assertEq(
            channels.channelIdOf(
                IPaymentChannels.ChannelParams(payer, payee, t, salt, signer, modelId, publisher, bps)
            ),
            id
        );
    }

    /// @dev Every function that takes terms, with each of the eight fields wrong in turn (called by
    ///      the account the wrong terms name), addresses no channel: `ChannelNotFound`, nothing moves.
    ///      The channel is set up so that the right terms would make every call succeed.
    function test_wrongParam_anyFieldAnyFunction_revertsChannelNotFound() public {
        bytes32 id = _readyChannel();
        for (uint256 field; field < 8; field++) {
            for (uint256 fn; fn < 5; fn++) {
                _assertWrongParamReverts(id, _mutate(_p(id), field, address(0xBEEF), keccak256("x"), 1), fn);
            }
        }
        _assertRightParamsStillWork(id);
    }

    function testFuzz_wrongParam_revertsChannelNotFound(
        uint256 field,
        uint256 fn,
        address newAddress,
        bytes32 newWord,
        uint16 newBps
    ) public {
        field = bound(field, 0, 7);
        fn = bound(fn, 0, 4);
        bytes32 id = _readyChannel();
        IPaymentChannels.ChannelParams memory q = _mutate(_p(id), field, newAddress, newWord, newBps);
        vm.assume(channels.channelIdOf(q) != id); // the fuzzer chose the right value for that field
        _assertWrongParamReverts(id, q, fn);
        _assertRightParamsStillWork(id);
    }

    /// @dev An ERC-20 channel with a royalty, partly settled, close requested and the grace over.
    function _readyChannel() internal returns (bytes32 id) {
        id = _open(address(token), 1_000);
        _settle(id, 100);
        vm.prank(payer);
        channels.requestClose(_p(id));
        vm.warp(block.timestamp + GRACE);
    }

    function _mutate(
        IPaymentChannels.ChannelParams memory p,
        uint256 field,
        address newAddress,
        bytes32 newWord,
        uint16 newBps
    ) internal pure returns (IPaymentChannels.ChannelParams memory q) {
        q = IPaymentChannels.ChannelParams(
            p.payer, p.payee, p.token, p.salt, p.authorizedSigner, p.modelId, p.publisher, p.publisherBps
        );
        if (field == 0) q.payer = newAddress;
        else if (field == 1) q.payee = newAddress;
        else if (field == 2) q.token = newAddress;
        else if (field == 3) q.salt = newWord;
        else if (field == 4) q.authorizedSigner = newAddress;
        else if (field == 5) q.modelId = newWord;
        else if (field == 6) q.publisher = newAddress;
        else q.publisherBps = newBps;
    }

    /// @dev Calls function `fn` (0 topUp, 1 settle, 2 close, 3 requestClose, 4 withdraw) with the
    ///      wrong terms `q` as the party they name, with a voucher signed for the id they address.
    function _assertWrongParamReverts(bytes32 id, IPaymentChannels.ChannelParams memory q, uint256 fn) internal {
        bytes32 wrongId = channels.channelIdOf(q);
        IPaymentChannels.ChannelState memory before = channels.getChannel(id);
        uint256 ethHeld = address(channels).balance;
        uint256 tokenHeld = token.balanceOf(address(channels));
        uint256 owed = channels.earnings(address(token), payer) + channels.earnings(address(token), payee)
            + channels.earnings(address(token), publisher);
        bytes memory sig = _sign(SIGNER_PK, channels.hashVoucher(wrongId, 500));

        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.ChannelNotFound.selector, wrongId));
        if (fn == 0) {
            vm.deal(q.payer, 1);
            vm.prank(q.payer);
            channels.topUp{value: q.token == ETH ? 1 : 0}(q, 1);
        } else if (fn == 1) {
            vm.prank(q.payee);
            channels.settle(q, 500, sig);
        } else if (fn == 2) {
            vm.prank(q.payee);
            channels.close(q, 500, sig);
        } else if (fn == 3) {
            vm.prank(q.payer);
            channels.requestClose(q);
        } else {
            vm.prank(q.payer);
            channels.withdraw(q);
        }

        IPaymentChannels.ChannelState memory afterCall = channels.getChannel(id);
        vm.assertEq(keccak256(abi.encode(afterCall)), keccak256(abi.encode(before)), "channel state moved");
        vm.assertEq(uint256(channels.getChannel(wrongId).deposit), 0, "a wrong id came to exist");
        vm.assertEq(address(channels).balance, ethHeld, "ETH moved");
        vm.assertEq(token.balanceOf(address(channels)), tokenHeld, "tokens moved");
        vm.assertEq(
            channels.earnings(address(token), payer) + channels.earnings(address(token), payee)
                + channels.earnings(address(token), publisher),
            owed,
            "earnings moved"
        );
    }

    /// @dev Control: the right terms still settle and withdraw.
    function _assertRightParamsStillWork(bytes32 id) internal {
        _settle(id, 500);
        vm.prank(payer);
        channels.withdraw(_p(id));
        vm.assertEq(channels.refundOf(id), 500);
        vm.assertEq(channels.earnings(address(token), publisher), 12);
        vm.assertEq(channels.earnings(address(token), payee), 488);
    }

    // ------------------------------------------------------------------ topUp

    function test_topUp_eth_increasesDepositAndEmits() public {
        bytes32 id = _open(ETH, 100);
        vm.expectEmit(address(channels));
        emit IPaymentChannels.ToppedUp(id, 50, 150);
        vm.prank(payer);
        channels.topUp{value: 50}(_p(id), 50);
        vm.assertEq(uint256(channels.getChannel(id).deposit), 150);
        vm.assertEq(address(channels).balance, 150);
    }

    function test_topUp_erc20_pullsAmount() public {
        bytes32 id = _open(address(token), 100);
        vm.prank(payer);
        channels.topUp(_p(id), 25);
        vm.assertEq(uint256(channels.getChannel(id).deposit), 125);
        vm.assertEq(token.balanceOf(address(channels)), 125);
    }

    function test_topUp_cancelsPendingClose() public {
        bytes32 id = _open(ETH, 100);
        vm.prank(payer);
        channels.requestClose(_p(id));
        vm.expectEmit(address(channels));
        emit IPaymentChannels.CloseCancelled(id);
        vm.expectEmit(address(channels));
        emit IPaymentChannels.ToppedUp(id, 1, 101);
        vm.prank(payer);
        channels.topUp{value: 1}(_p(id), 1);
        vm.assertEq(uint256(channels.getChannel(id).closeRequestedAt), 0);
        vm.warp(block.timestamp + GRACE);
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.CloseNotRequested.selector, id));
        vm.prank(payer);
        channels.withdraw(_p(id));
    }

    function test_topUp_revertsWhenNotPayer() public {
        bytes32 id = _open(ETH, 100);
        vm.deal(payee, 1);
        vm.expectRevert(IPaymentChannels.NotPayer.selector);
        vm.prank(payee);
        channels.topUp{value: 1}(_p(id), 1);
    }

    function test_topUp_revertsOnZeroAmount() public {
        bytes32 id = _open(ETH, 100);
        vm.expectRevert(IPaymentChannels.ZeroAmount.selector);
        vm.prank(payer);
        channels.topUp(_p(id), 0);
    }

    function test_topUp_revertsWhenFinalized() public {
        bytes32 id = _open(ETH, 100);
        vm.prank(payee);
        channels.close(_p(id), 0, "");
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.ChannelFinalized.selector, id));
        vm.prank(payer);
        channels.topUp{value: 1}(_p(id), 1);
    }

    function test_topUp_revertsWhenChannelNotFound() public {
        IPaymentChannels.ChannelParams memory p = _unknown();
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.ChannelNotFound.selector, channels.channelIdOf(p)));
        vm.prank(payer);
        channels.topUp{value: 1}(p, 1);
    }

    function test_topUp_revertsOnDepositOverflow() public {
        bytes32 id = _open(address(token), type(uint120).max - 1);
        vm.expectRevert(IPaymentChannels.DepositOverflow.selector);
        vm.prank(payer);
        channels.topUp(_p(id), 2);
        vm.prank(payer);
        channels.topUp(_p(id), 1);
        vm.assertEq(uint256(channels.getChannel(id).deposit), type(uint120).max);
        vm.assertEq(token.balanceOf(address(channels)), type(uint120).max);
    }

    function test_topUp_revertsWhenAmountAloneExceedsUint120() public {
        bytes32 id = _open(address(token), 1);
        vm.expectRevert(IPaymentChannels.DepositOverflow.selector);
        vm.prank(payer);
        channels.topUp(_p(id), uint128(type(uint120).max) + 1);
        vm.expectRevert(IPaymentChannels.DepositOverflow.selector);
        vm.prank(payer);
        channels.topUp(_p(id), type(uint128).max);
        vm.assertEq(uint256(channels.getChannel(id).deposit), 1);
        vm.assertEq(token.balanceOf(address(channels)), 1);
    }

    function test_topUp_revertsWhenEthValueDiffers() public {
        bytes32 id = _open(ETH, 100);
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.InvalidMsgValue.selector, 1, 2));
        vm.prank(payer);
        channels.topUp{value: 1}(_p(id), 2);
        bytes32 tid = _open(address(token), 100);
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.InvalidMsgValue.selector, 1, 0));
        vm.prank(payer);
        channels.topUp{value: 1}(_p(tid), 1);
    }

    // ------------------------------------------------------------------ settle

    function test_settle_creditsDeltaSplitAndEmits() public {
        bytes32 id = _open(ETH, 1 ether);
        bytes memory sig = _voucher(id, 0.4 ether);
        vm.expectEmit(address(channels));
        emit IPaymentChannels.Settled(id, 0.4 ether);
        vm.prank(payee);
        channels.settle(_p(id), 0.4 ether, sig);
        vm.assertEq(uint256(channels.getChannel(id).settled), 0.4 ether);
        vm.assertEq(channels.earnings(ETH, payee), 0.39 ether);
        vm.assertEq(channels.earnings(ETH, publisher), 0.01 ether);
        vm.assertEq(address(channels).balance, 1 ether);
    }

    function test_settle_creditsOnlyTheIncrease() public {
        bytes32 id = _open(address(token), 1_000);
        _settle(id, 100);
        _settle(id, 1_000);
        vm.assertEq(uint256(channels.getChannel(id).settled), 1_000);
        vm.assertEq(channels.earnings(address(token), publisher), 25);
        vm.assertEq(channels.earnings(address(token), payee), 975);
    }

    function test_settle_royaltyRoundsOnCumulativeAmount() public {
        // 2.5% of 1..40 step by step: per-step floors would pay 0; cumulative floors pay exactly 1.
        bytes32 id = _open(ETH, 40);
        for (uint128 i = 1; i <= 40; i++) {
            _settle(id, i);
            vm.assertEq(channels.earnings(ETH, publisher), _royalty(i, BPS));
            vm.assertEq(channels.earnings(ETH, payee), i - _royalty(i, BPS));
        }
        vm.assertEq(channels.earnings(ETH, publisher), 1);
    }

    function test_settle_fullRoyaltyPaysOnlyPublisher() public {
        bytes32 m = keccak256("all");
        vm.prank(publisher);
        registry.register(m, 10_000);
        bytes32 id = _openWith(ETH, 77, SALT, signer, m, 10_000);
        _settle(id, 77);
        vm.assertEq(channels.earnings(ETH, publisher), 77);
        vm.assertEq(channels.earnings(ETH, payee), 0);
    }

    function test_settle_allowedWhileClosePending() public {
        bytes32 id = _open(ETH, 100);
        vm.prank(payer);
        channels.requestClose(_p(id));
        _settle(id, 60);
        vm.assertEq(uint256(channels.getChannel(id).settled), 60);
    }

    function test_settle_allowedAfterGraceUntilPayerWithdraws() public {
        bytes32 id = _open(ETH, 100);
        vm.prank(payer);
        channels.requestClose(_p(id));
        vm.warp(block.timestamp + GRACE * 10);
        _settle(id, 60);
        vm.prank(payer);
        channels.withdraw(_p(id));
        vm.assertEq(channels.refundOf(id), 40);
        bytes memory sig = _voucher(id, 70);
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.ChannelFinalized.selector, id));
        vm.prank(payee);
        channels.settle(_p(id), 70, sig);
    }

    function test_settle_revertsWhenNotPayee() public {
        bytes32 id = _open(ETH, 100);
        bytes memory sig = _voucher(id, 10);
        vm.expectRevert(IPaymentChannels.NotPayee.selector);
        vm.prank(payer);
        channels.settle(_p(id), 10, sig);
        vm.expectRevert(IPaymentChannels.NotPayee.selector);
        vm.prank(stranger);
        channels.settle(_p(id), 10, sig);
    }

    function test_settle_revertsWhenAmountNotIncreasing() public {
        bytes32 id = _open(ETH, 100);
        _settle(id, 50);
        bytes memory same = _voucher(id, 50);
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.AmountNotIncreasing.selector, uint128(50), uint128(50)));
        vm.prank(payee);
        channels.settle(_p(id), 50, same);
        bytes memory lower = _voucher(id, 49);
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.AmountNotIncreasing.selector, uint128(49), uint128(50)));
        vm.prank(payee);
        channels.settle(_p(id), 49, lower);
    }

    function test_settle_revertsOnZeroAmount() public {
        bytes32 id = _open(ETH, 100);
        bytes memory sig = _voucher(id, 0);
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.AmountNotIncreasing.selector, uint128(0), uint128(0)));
        vm.prank(payee);
        channels.settle(_p(id), 0, sig);
    }

    function test_settle_revertsWhenAmountExceedsDeposit() public {
        bytes32 id = _open(ETH, 100);
        bytes memory sig = _voucher(id, 101);
        vm.expectRevert(
            abi.encodeWithSelector(IPaymentChannels.AmountExceedsDeposit.selector, uint128(101), uint128(100))
        );
        vm.prank(payee);
        channels.settle(_p(id), 101, sig);
    }

    function test_settle_revertsOnWrongSigner() public {
        bytes32 id = _open(ETH, 100);
        bytes memory sig = _sign(OTHER_PK, channels.hashVoucher(id, 10));
        vm.expectRevert(IPaymentChannels.InvalidSignature.selector);
        vm.prank(payee);
        channels.settle(_p(id), 10, sig);
    }

    function test_settle_revertsWhenAmountDiffersFromSigned() public {
        bytes32 id = _open(ETH, 100);
        bytes memory sig = _voucher(id, 10);
        vm.expectRevert(IPaymentChannels.InvalidSignature.selector);
        vm.prank(payee);
        channels.settle(_p(id), 11, sig);
    }

    function test_settle_revertsOnHighSSignature() public {
        bytes32 id = _open(ETH, 100);
        bytes32 digest = channels.hashVoucher(id, 10);
        // Sanity: the high-s twin recovers the signer under raw ecrecover.
        bytes memory high = _highS(SIGNER_PK, digest);
        (bytes32 r, bytes32 s, uint8 v) = _split(high);
        vm.assertEq(ecrecover(digest, v, r, s), signer);
        vm.expectRevert(IPaymentChannels.InvalidSignature.selector);
        vm.prank(payee);
        channels.settle(_p(id), 10, high);
    }

    function test_settle_revertsOn64ByteSignature() public {
        bytes32 id = _open(ETH, 100);
        bytes memory compact = _compact(SIGNER_PK, channels.hashVoucher(id, 10));
        vm.assertEq(compact.length, 64);
        vm.expectRevert(IPaymentChannels.InvalidSignature.selector);
        vm.prank(payee);
        channels.settle(_p(id), 10, compact);
    }

    function test_settle_revertsOnEmptySignature() public {
        bytes32 id = _open(ETH, 100);
        vm.expectRevert(IPaymentChannels.InvalidSignature.selector);
        vm.prank(payee);
        channels.settle(_p(id), 10, "");
    }

    function test_settle_revertsWhenChannelNotFound() public {
        IPaymentChannels.ChannelParams memory p = _unknown();
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.ChannelNotFound.selector, channels.channelIdOf(p)));
        vm.prank(payee);
        channels.settle(p, 1, "");
    }

    function test_settle_revertsWhenFinalized() public {
        bytes32 id = _open(ETH, 100);
        vm.prank(payee);
        channels.close(_p(id), 0, "");
        bytes memory sig = _voucher(id, 10);
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.ChannelFinalized.selector, id));
        vm.prank(payee);
        channels.settle(_p(id), 10, sig);
    }

    function test_settle_rejectsVoucherOfAnotherChannel() public {
        bytes32 a = _open(ETH, 100);
        bytes32 b = _openWith(ETH, 100, keccak256("b"), signer, MODEL, BPS);
        bytes memory sigForA = _voucher(a, 10);
        vm.expectRevert(IPaymentChannels.InvalidSignature.selector);
        vm.prank(payee);
        channels.settle(_p(b), 10, sigForA);
    }

    function test_settle_rejectsVoucherFromAnotherChainId() public {
        bytes32 id = _open(ETH, 100);
        bytes memory otherChain = _sign(SIGNER_PK, _voucherDigest(block.chainid + 1, address(channels), id, 10));
        vm.expectRevert(IPaymentChannels.InvalidSignature.selector);
        vm.prank(payee);
        channels.settle(_p(id), 10, otherChain);
    }

    function test_settle_rejectsVoucherAfterChainIdChanges() public {
        bytes32 id = _open(ETH, 100);
        bytes memory sig = _voucher(id, 10);
        uint256 original = block.chainid;
        vm.chainId(original + 1); // a fork: the id and the domain separator follow the chain id
        // The terms re-derive another id on the new chain id: the channel is not addressable there.
        bytes32 forkedId = channels.channelIdOf(_p(id));
        vm.assertNotEq(forkedId, id);
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.ChannelNotFound.selector, forkedId));
        vm.prank(payee);
        channels.settle(_p(id), 10, sig);
        vm.chainId(original);
        vm.prank(payee);
        channels.settle(_p(id), 10, sig);
        vm.assertEq(uint256(channels.getChannel(id).settled), 10);
    }

    function test_settle_rejectsVoucherForAnotherContract() public {
        PaymentChannels other = new PaymentChannels(address(registry), GRACE);
        bytes32 id = _open(ETH, 100);
        bytes memory sig = _sign(SIGNER_PK, other.hashVoucher(id, 10));
        vm.expectRevert(IPaymentChannels.InvalidSignature.selector);
        vm.prank(payee);
        channels.settle(_p(id), 10, sig);
    }

    function test_settle_acceptsErc1271Signer() public {
        MockERC1271Wallet wallet = new MockERC1271Wallet(signer);
        bytes32 id = _openWith(ETH, 100, SALT, address(wallet), MODEL, BPS);
        _settle(id, 40); // signed by the wallet's owner key
        vm.assertEq(uint256(channels.getChannel(id).settled), 40);
    }

    function test_settle_revertsWhenErc1271SignerRefuses() public {
        MockERC1271Wallet wallet = new MockERC1271Wallet(signer);
        bytes32 id = _openWith(ETH, 100, SALT, address(wallet), MODEL, BPS);
        bytes memory wrongKey = _sign(OTHER_PK, channels.hashVoucher(id, 40));
        vm.expectRevert(IPaymentChannels.InvalidSignature.selector);
        vm.prank(payee);
        channels.settle(_p(id), 40, wrongKey);
        wallet.revoke();
        bytes memory sig = _voucher(id, 40);
        vm.expectRevert(IPaymentChannels.InvalidSignature.selector);
        vm.prank(payee);
        channels.settle(_p(id), 40, sig);
    }

    // ------------------------------------------------------------------ close

    function test_close_settlesRefundsAndFinalizes() public {
        bytes32 id = _open(ETH, 1_000);
        _settle(id, 100);
        bytes memory sig = _voucher(id, 600);
        vm.expectEmit(address(channels));
        emit IPaymentChannels.Settled(id, 600); // floor(15) - floor(2.5) = 13
        vm.expectEmit(address(channels));
        emit IPaymentChannels.ChannelClosed(id, 600, 400);
        vm.prank(payee);
        channels.close(_p(id), 600, sig);
        IPaymentChannels.ChannelState memory ch = channels.getChannel(id);
        vm.assertTrue(ch.finalized);
        vm.assertEq(uint256(ch.settled), 600);
        vm.assertEq(uint256(ch.deposit), 1_000); // the record is kept
        vm.assertEq(channels.refundOf(id), 400);
        vm.assertEq(channels.earnings(ETH, publisher), 15);
        vm.assertEq(channels.earnings(ETH, payee), 585);
    }

    function test_close_atSettledAmountIgnoresSignature() public {
        bytes32 id = _open(address(token), 1_000);
        _settle(id, 300);
        vm.expectEmit(address(channels));
        emit IPaymentChannels.ChannelClosed(id, 300, 700);
        vm.prank(payee);
        channels.close(_p(id), 300, hex"deadbeef");
        vm.assertEq(channels.refundOf(id), 700);
    }

    function test_close_belowSettledClosesAtSettled() public {
        bytes32 id = _open(ETH, 1_000);
        _settle(id, 300);
        vm.prank(payee);
        channels.close(_p(id), 1, "");
        vm.assertEq(uint256(channels.getChannel(id).settled), 300);
        vm.assertEq(channels.refundOf(id), 700);
    }

    function test_close_fullDepositRefundsNothing() public {
        bytes32 id = _open(ETH, 1_000);
        bytes memory sig = _voucher(id, 1_000);
        vm.prank(payee);
        channels.close(_p(id), 1_000, sig);
        vm.assertEq(channels.refundOf(id), 0);
    }

    function test_close_revertsWhenNotPayee() public {
        bytes32 id = _open(ETH, 100);
        vm.expectRevert(IPaymentChannels.NotPayee.selector);
        vm.prank(payer);
        channels.close(_p(id), 0, "");
    }

    function test_close_revertsWhenFinalized() public {
        bytes32 id = _open(ETH, 100);
        vm.startPrank(payee);
        channels.close(_p(id), 0, "");
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.ChannelFinalized.selector, id));
        channels.close(_p(id), 0, "");
        vm.stopPrank();
    }

    function test_close_revertsOnInvalidSignatureAboveSettled() public {
        bytes32 id = _open(ETH, 100);
        bytes memory sig = _sign(OTHER_PK, channels.hashVoucher(id, 50));
        vm.expectRevert(IPaymentChannels.InvalidSignature.selector);
        vm.prank(payee);
        channels.close(_p(id), 50, sig);
    }

    function test_close_revertsWhenAmountExceedsDeposit() public {
        bytes32 id = _open(ETH, 100);
        bytes memory sig = _voucher(id, 101);
        vm.expectRevert(
            abi.encodeWithSelector(IPaymentChannels.AmountExceedsDeposit.selector, uint128(101), uint128(100))
        );
        vm.prank(payee);
        channels.close(_p(id), 101, sig);
    }

    function test_close_revertsWhenChannelNotFound() public {
        IPaymentChannels.ChannelParams memory p = _unknown();
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.ChannelNotFound.selector, channels.channelIdOf(p)));
        vm.prank(payee);
        channels.close(p, 0, "");
    }

    // ------------------------------------------------------------------ requestClose

    function test_requestClose_recordsTimeAndEmitsClosableAt() public {
        bytes32 id = _open(ETH, 100);
        vm.expectEmit(address(channels));
        emit IPaymentChannels.CloseRequested(id, uint64(block.timestamp) + GRACE);
        vm.prank(payer);
        channels.requestClose(_p(id));
        vm.assertEq(uint256(channels.getChannel(id).closeRequestedAt), block.timestamp);
    }

    function test_requestClose_revertsWhenNotPayer() public {
        bytes32 id = _open(ETH, 100);
        vm.expectRevert(IPaymentChannels.NotPayer.selector);
        vm.prank(payee);
        channels.requestClose(_p(id));
        vm.expectRevert(IPaymentChannels.NotPayer.selector);
        vm.prank(stranger);
        channels.requestClose(_p(id));
    }

    function test_requestClose_revertsWhenAlreadyRequested() public {
        bytes32 id = _open(ETH, 100);
        vm.startPrank(payer);
        channels.requestClose(_p(id));
        vm.warp(block.timestamp + 1);
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.CloseAlreadyRequested.selector, id));
        channels.requestClose(_p(id));
        vm.stopPrank();
    }

    function test_requestClose_revertsWhenFinalized() public {
        bytes32 id = _open(ETH, 100);
        vm.prank(payee);
        channels.close(_p(id), 0, "");
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.ChannelFinalized.selector, id));
        vm.prank(payer);
        channels.requestClose(_p(id));
    }

    function test_requestClose_revertsWhenChannelNotFound() public {
        IPaymentChannels.ChannelParams memory p = _unknown();
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.ChannelNotFound.selector, channels.channelIdOf(p)));
        vm.prank(payer);
        channels.requestClose(p);
    }

    // ------------------------------------------------------------------ withdraw

    function test_withdraw_refundsUnsettledAfterGrace() public {
        bytes32 id = _open(address(token), 1_000);
        _settle(id, 250);
        vm.prank(payer);
        channels.requestClose(_p(id));
        vm.warp(block.timestamp + GRACE);
        vm.expectEmit(address(channels));
        emit IPaymentChannels.Withdrawn(id, 750);
        vm.prank(payer);
        channels.withdraw(_p(id));
        vm.assertTrue(channels.getChannel(id).finalized);
        vm.assertEq(channels.refundOf(id), 750);
    }

    function test_withdraw_revertsWhenCloseNotRequested() public {
        bytes32 id = _open(ETH, 100);
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.CloseNotRequested.selector, id));
        vm.prank(payer);
        channels.withdraw(_p(id));
    }

    function test_withdraw_revertsDuringGracePeriod() public {
        bytes32 id = _open(ETH, 100);
        vm.prank(payer);
        channels.requestClose(_p(id));
        uint64 closableAt = uint64(block.timestamp) + GRACE;
        vm.warp(closableAt - 1);
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.GracePeriodActive.selector, closableAt));
        vm.prank(payer);
        channels.withdraw(_p(id));
    }

    function test_withdraw_revertsWhenNotPayer() public {
        bytes32 id = _open(ETH, 100);
        vm.prank(payer);
        channels.requestClose(_p(id));
        vm.warp(block.timestamp + GRACE);
        vm.expectRevert(IPaymentChannels.NotPayer.selector);
        vm.prank(payee);
        channels.withdraw(_p(id));
    }

    function test_withdraw_revertsWhenFinalized() public {
        bytes32 id = _open(ETH, 100);
        vm.prank(payer);
        channels.requestClose(_p(id));
        vm.warp(block.timestamp + GRACE);
        vm.prank(payer);
        channels.withdraw(_p(id));
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.ChannelFinalized.selector, id));
        vm.prank(payer);
        channels.withdraw(_p(id));
    }

    function test_withdraw_revertsAfterPayeeClosed() public {
        bytes32 id = _open(ETH, 100);
        vm.prank(payer);
        channels.requestClose(_p(id));
        vm.prank(payee);
        channels.close(_p(id), 0, "");
        vm.warp(block.timestamp + GRACE);
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.ChannelFinalized.selector, id));
        vm.prank(payer);
        channels.withdraw(_p(id));
    }

    function test_withdraw_revertsWhenChannelNotFound() public {
        IPaymentChannels.ChannelParams memory p = _unknown();
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.ChannelNotFound.selector, channels.channelIdOf(p)));
        vm.prank(payer);
        channels.withdraw(p);
    }

    function test_withdraw_succeedsWithRevertingPayeeAndPublisher() public {
        RevertingReceiver badPayee = new RevertingReceiver();
        RevertingReceiver badPublisher = new RevertingReceiver();
        bytes32 m = keccak256("bad");
        vm.prank(address(badPublisher));
        registry.register(m, 1_000);
        bytes32 id = _openTo(address(badPayee), ETH, 100, SALT, signer, m, 1_000);
        bytes memory sig = _voucher(id, 30);
        vm.prank(address(badPayee));
        channels.settle(_p(id), 30, sig);
        vm.prank(payer);
        channels.requestClose(_p(id));
        vm.warp(block.timestamp + GRACE);
        vm.prank(payer);
        channels.withdraw(_p(id));
        vm.assertEq(channels.refundOf(id), 70);
        vm.prank(payer);
        channels.claimRefund(_p(id));
        // The payee's own claim fails, and only the payee's.
        vm.expectRevert(IPaymentChannels.EthTransferFailed.selector);
        vm.prank(address(badPayee));
        channels.claimEarnings(ETH);
        vm.assertEq(channels.earnings(ETH, address(badPayee)), 27);
        vm.assertEq(channels.earnings(ETH, address(badPublisher)), 3);
    }

    // ------------------------------------------------------------------ claimEarnings

    function test_claimEarnings_eth_paysAndEmits() public {
        bytes32 id = _open(ETH, 1_000);
        _settle(id, 1_000);
        uint256 before = payee.balance;
        vm.expectEmit(address(channels));
        emit IPaymentChannels.EarningsClaimed(ETH, payee, 975);
        vm.prank(payee);
        uint256 amount = channels.claimEarnings(ETH);
        vm.assertEq(amount, 975);
        vm.assertEq(payee.balance - before, 975);
        vm.assertEq(channels.earnings(ETH, payee), 0);
        vm.assertEq(address(channels).balance, 25);
    }

    function test_claims_erc20_payPublisherPayeeAndPayerRefund() public {
        bytes32 id = _open(address(token), 1_000);
        bytes memory sig = _voucher(id, 400);
        vm.prank(payee);
        channels.close(_p(id), 400, sig);
        vm.prank(publisher);
        channels.claimEarnings(address(token));
        vm.prank(payer);
        channels.claimRefund(_p(id));
        vm.prank(payee);
        channels.claimEarnings(address(token));
        vm.assertEq(token.balanceOf(publisher), 10);
        vm.assertEq(token.balanceOf(payee), 390);
        vm.assertEq(token.balanceOf(address(channels)), 0);
    }

    function test_claimEarnings_revertsWhenNothingToClaim() public {
        vm.expectRevert(IPaymentChannels.NothingToClaim.selector);
        vm.prank(payee);
        channels.claimEarnings(ETH);
    }

    function test_claimEarnings_revertsOnSecondClaim() public {
        bytes32 id = _open(ETH, 10);
        _settle(id, 10);
        vm.startPrank(payee);
        channels.claimEarnings(ETH);
        vm.expectRevert(IPaymentChannels.NothingToClaim.selector);
        channels.claimEarnings(ETH);
        vm.stopPrank();
    }

    // ------------------------------------------------------------------ reentrancy

    function test_reentrancy_tokenCannotReenterSettleDuringOpen() public {
        ReentrantToken evil = new ReentrantToken();
        // Channel X pays the evil token itself, so only the guard stops a re-entering settle.
        bytes32 x = _openTo(address(evil), ETH, 100, SALT, signer, MODEL, BPS);
        evil.arm(address(channels), abi.encodeCall(PaymentChannels.settle, (_p(x), 50, _voucher(x, 50))));
        evil.mint(payer, 1_000);
        vm.prank(payer);
        evil.approve(address(channels), 1_000);
        bytes32 y = _open(address(evil), 1_000);
        vm.assertEq(evil.reentryAttempts(), 1);
        vm.assertEq(evil.reentrySuccesses(), 0);
        vm.assertEq(uint256(channels.getChannel(x).settled), 0);
        vm.assertEq(uint256(channels.getChannel(y).deposit), 1_000);
    }

    function test_reentrancy_tokenCannotClaimTwice() public {
        ReentrantToken evil = new ReentrantToken();
        evil.mint(payer, 1_000);
        vm.prank(payer);
        evil.approve(address(channels), 1_000);
        bytes32 id = _openTo(address(evil), address(evil), 1_000, SALT, signer, FREE_MODEL, 0);
        bytes memory sig = _voucher(id, 1_000);
        vm.prank(address(evil));
        channels.settle(_p(id), 1_000, sig);
        evil.arm(address(channels), abi.encodeCall(PaymentChannels.claimEarnings, (address(evil))));
        vm.prank(address(evil));
        channels.claimEarnings(address(evil));
        vm.assertEq(evil.reentrySuccesses(), 0);
        vm.assertEq(evil.balanceOf(address(evil)), 1_000);
        vm.assertEq(evil.balanceOf(address(channels)), 0);
    }

    function test_reentrancy_erc1271SignerCannotSettleTwice() public {
        // The malicious wallet is both payee and signer, so a re-entering close passes every
        // check but the guard (and the STATICCALL context of isValidSignature).
        ReentrantSigner evil = new ReentrantSigner(signer);
        bytes32 id = _openTo(address(evil), ETH, 100, SALT, address(evil), MODEL, BPS);
        bytes memory sig = _voucher(id, 80);
        evil.arm(address(channels), abi.encodeCall(PaymentChannels.close, (_p(id), 80, sig)));
        vm.prank(address(evil));
        channels.settle(_p(id), 80, sig);
        IPaymentChannels.ChannelState memory ch = channels.getChannel(id);
        vm.assertEq(uint256(ch.settled), 80);
        vm.assertFalse(ch.finalized);
        vm.assertEq(channels.earnings(ETH, address(evil)) + channels.earnings(ETH, publisher), 80);
        vm.assertEq(channels.refundOf(id), 0);
    }

    // ------------------------------------------------------------------ fuzz

    function testFuzz_settle_splitIsExact(uint128 deposit, uint128 first, uint128 second, uint16 bps) public {
        deposit = uint128(bound(deposit, 2, type(uint120).max));
        bps = uint16(bound(bps, 0, 10_000));
        first = uint128(bound(first, 1, deposit - 1));
        second = uint128(bound(second, first + 1, deposit));
        bytes32 m = keccak256(abi.encode("fuzz", bps));
        vm.prank(publisher);
        registry.register(m, bps);
        bytes32 id = _openWith(address(token), deposit, SALT, signer, m, bps);

        _settle(id, first);
        uint256 pub1 = channels.earnings(address(token), publisher);
        vm.assertEq(pub1, _royalty(first, bps));
        vm.assertEq(channels.earnings(address(token), payee) + pub1, first);

        _settle(id, second);
        uint256 pub2 = channels.earnings(address(token), publisher);
        uint256 payee2 = channels.earnings(address(token), payee);
        vm.assertEq(pub2, _royalty(second, bps));
        vm.assertEq(payee2 + pub2, second);
        vm.assertLe(pub2 - pub1, second - first);

        vm.prank(payee);
        channels.close(_p(id), 0, "");
        vm.assertEq(channels.refundOf(id), deposit - second);
        vm.assertEq(token.balanceOf(address(channels)), deposit);
    }

    function testFuzz_settle_amountsNearUint120Max(uint128 below, uint16 bps) public {
        bps = uint16(bound(bps, 0, 10_000));
        below = uint128(bound(below, 0, 1_000));
        uint128 deposit = type(uint120).max;
        bytes32 m = keccak256(abi.encode("max", bps));
        vm.prank(publisher);
        registry.register(m, bps);
        bytes32 id = _openWith(address(token), deposit, SALT, signer, m, bps);
        _settle(id, deposit - below);
        if (below != 0) _settle(id, deposit);
        vm.assertEq(channels.earnings(address(token), publisher), _royalty(deposit, bps));
        vm.assertEq(channels.earnings(address(token), payee), deposit - _royalty(deposit, bps));
        vm.prank(payer);
        vm.expectRevert(IPaymentChannels.DepositOverflow.selector);
        channels.topUp(_p(id), 1);
    }

    function testFuzz_close_refundIsExact(uint128 deposit, uint128 cumulative, bool eth) public {
        deposit = uint128(bound(deposit, 1, type(uint120).max));
        cumulative = uint128(bound(cumulative, 0, deposit));
        address t = eth ? ETH : address(token);
        bytes32 id = _open(t, deposit);
        bytes memory sig = _voucher(id, cumulative);
        vm.prank(payee);
        channels.close(_p(id), cumulative, sig);
        vm.assertEq(channels.refundOf(id), deposit - cumulative);
        vm.assertEq(channels.refundOf(id) + channels.earnings(t, payee) + channels.earnings(t, publisher), deposit);
    }

    function testFuzz_settle_rejectsMalleatedSignatures(uint256 pk, uint128 amount) public {
        pk = bound(pk, 1, SECP256K1_N - 1);
        amount = uint128(bound(amount, 1, 1_000));
        address key = vm.addr(pk);
        bytes32 id = _openWith(ETH, 1_000, SALT, key, MODEL, BPS);
        bytes32 digest = channels.hashVoucher(id, amount);
        vm.startPrank(payee);
        vm.expectRevert(IPaymentChannels.InvalidSignature.selector);
        channels.settle(_p(id), amount, _highS(pk, digest));
        vm.expectRevert(IPaymentChannels.InvalidSignature.selector);
        channels.settle(_p(id), amount, _compact(pk, digest));
        channels.settle(_p(id), amount, _sign(pk, digest));
        vm.stopPrank();
        vm.assertEq(uint256(channels.getChannel(id).settled), amount);
    }

    function testFuzz_settle_rejectsReplayAcrossChainsAndContracts(uint256 otherChain, address otherContract) public {
        vm.assume(otherContract != address(channels));
        otherChain = bound(otherChain, 1, type(uint64).max);
        vm.assume(otherChain != block.chainid);
        bytes32 id = _open(ETH, 100);
        vm.startPrank(payee);
        vm.expectRevert(IPaymentChannels.InvalidSignature.selector);
        channels.settle(_p(id), 10, _sign(SIGNER_PK, _voucherDigest(otherChain, address(channels), id, 10)));
        vm.expectRevert(IPaymentChannels.InvalidSignature.selector);
        channels.settle(_p(id), 10, _sign(SIGNER_PK, _voucherDigest(block.chainid, otherContract, id, 10)));
        vm.stopPrank();
    }

    function _split(bytes memory sig) internal pure returns (bytes32 r, bytes32 s, uint8 v) {
        assembly {
            r := mload(add(sig, 0x20))
            s := mload(add(sig, 0x40))
            v := byte(0, mload(add(sig, 0x60)))
        }
    }
}
