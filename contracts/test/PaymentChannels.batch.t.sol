// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {PaymentChannelsFixture} from "./PaymentChannels.t.sol";
import {PaymentChannels} from "../src/PaymentChannels.sol";
import {IPaymentChannels} from "../src/interfaces/IPaymentChannels.sol";

/// @dev `settleBatch` (one transaction, many channels, a bad voucher skipped and reported) and
///      `claimRefund` (the payer's refund kept in the finalized channel's record).
contract PaymentChannelsBatchTest is PaymentChannelsFixture {
    receive() external payable {}

    function _bv(bytes32 id, uint128 amount) internal view returns (IPaymentChannels.BatchVoucher memory) {
        return _bvSigned(id, amount, channels.hashVoucher(id, amount));
    }

    function _bvSigned(bytes32 id, uint128 amount, bytes32 digest)
        internal
        view
        returns (IPaymentChannels.BatchVoucher memory v)
    {
        (uint8 recoveryId, bytes32 r, bytes32 s) = vm.sign(SIGNER_PK, digest);
        IPaymentChannels.ChannelParams memory p = _p(id);
        v = IPaymentChannels.BatchVoucher(
            p.payer, p.salt, p.authorizedSigner, amount, r, bytes32(uint256(s) | (uint256(recoveryId - 27) << 255))
        );
    }

    function _batch(address t, IPaymentChannels.BatchVoucher[] memory vs) internal returns (uint256) {
        vm.prank(payee);
        return channels.settleBatch(t, MODEL, publisher, BPS, vs);
    }

    function _openN(address t, uint256 n, uint128 deposit) internal returns (bytes32[] memory ids) {
        ids = new bytes32[](n);
        for (uint256 i; i < n; i++) {
            ids[i] = _openWith(t, deposit, keccak256(abi.encode("batch", i)), signer, MODEL, BPS);
        }
    }

    function test_settleBatch_settlesEveryChannelWithTheSingleSplit() public {
        bytes32[] memory ids = _openN(address(token), 3, 1 ether);
        uint128[3] memory amounts = [uint128(1_001), 333_333, 0.5 ether];
        IPaymentChannels.BatchVoucher[] memory vs = new IPaymentChannels.BatchVoucher[](3);
        uint256 royalties;
        for (uint256 i; i < 3; i++) {
            vs[i] = _bv(ids[i], amounts[i]);
            royalties += _royalty(amounts[i], BPS);
            vm.expectEmit(address(channels));
            emit IPaymentChannels.Settled(ids[i], amounts[i]);
        }
        vm.assertEq(_batch(address(token), vs), 3);
        uint256 total = uint256(amounts[0]) + amounts[1] + amounts[2];
        for (uint256 i; i < 3; i++) {
            vm.assertEq(channels.getChannel(ids[i]).settled, amounts[i]);
        }
        vm.assertEq(channels.earnings(address(token), publisher), royalties);
        vm.assertEq(channels.earnings(address(token), payee), total - royalties);
    }

    /// @dev The same vouchers settled one by one and in a batch credit the same shares, to the wei.
    function testFuzz_settleBatch_equalsSingleSettles(uint128 a, uint128 b, uint128 c) public {
        a = uint128(bound(a, 1, 1e30));
        b = uint128(bound(b, a + 1, 2e30));
        c = uint128(bound(c, 1, 1e30));
        bytes32[] memory ids = _openN(ETH, 4, 2e30);
        // Channels 0 and 1 one at a time to a then b; channels 2 and 3 in a batch of the same.
        _settle(ids[0], a);
        _settle(ids[0], b);
        _settle(ids[1], c);
        uint256 singlePub = channels.earnings(ETH, publisher);
        uint256 singlePayee = channels.earnings(ETH, payee);
        IPaymentChannels.BatchVoucher[] memory vs = new IPaymentChannels.BatchVoucher[](3);
        vs[0] = _bv(ids[2], a);
        vs[1] = _bv(ids[2], b); // the same channel again: checked against a, credits b - a
        vs[2] = _bv(ids[3], c);
        vm.assertEq(_batch(ETH, vs), 3);
        vm.assertEq(channels.earnings(ETH, publisher), 2 * singlePub);
        vm.assertEq(channels.earnings(ETH, payee), 2 * singlePayee);
        vm.assertEq(channels.getChannel(ids[2]).settled, b);
    }

    function test_settleBatch_skipsEveryBadVoucherWithSettlesReason() public {
        bytes32[] memory ids = _openN(ETH, 8, 1_000);
        _settle(ids[1], 500);
        bytes32 closed = ids[3];
        vm.prank(payee);
        channels.close(_p(closed), 0, "");
        IPaymentChannels.BatchVoucher[] memory vs = new IPaymentChannels.BatchVoucher[](8);
        vs[0] = _bv(ids[0], 100); // good
        vs[1] = _bv(ids[1], 500); // replay of the settled amount
        vs[2] = _bv(ids[2], 1_001); // above the deposit
        vs[3] = _bv(closed, 100); // finalized
        vs[4] = _bvSigned(ids[4], 100, channels.hashVoucher(ids[5], 100)); // another channel's voucher
        vs[5] = _bv(ids[5], 100);
        vs[5].vs = bytes32(uint256(vs[5].vs) ^ (1 << 255)); // wrong recovery bit: another signer
        vs[6] = _bv(ids[6], 100);
        vs[6].salt = keccak256("wrong"); // a wrong term: no such channel
        vs[7] = _bv(ids[7], 100); // good
        bytes32 wrongId = keccak256(
            abi.encode(payer, payee, ETH, vs[6].salt, signer, MODEL, publisher, BPS, address(channels), block.chainid)
        );

        bytes4[8] memory reasons = [
            bytes4(0),
            IPaymentChannels.AmountNotIncreasing.selector,
            IPaymentChannels.AmountExceedsDeposit.selector,
            IPaymentChannels.ChannelFinalized.selector,
            IPaymentChannels.InvalidSignature.selector,
            IPaymentChannels.InvalidSignature.selector,
            IPaymentChannels.ChannelNotFound.selector,
            bytes4(0)
        ];
        for (uint256 i; i < 8; i++) {
            vm.expectEmit(address(channels));
            if (reasons[i] == bytes4(0)) emit IPaymentChannels.Settled(ids[i], 100);
            else emit IPaymentChannels.SettlementSkipped(i == 6 ? wrongId : ids[i], reasons[i]);
        }
        vm.assertEq(_batch(ETH, vs), 2);
        vm.assertEq(channels.getChannel(ids[1]).settled, 500);
        for (uint256 i = 2; i < 7; i++) {
            vm.assertEq(channels.getChannel(ids[i]).settled, 0);
        }
        // 500 earlier + 2 * 100 now, split 2.5%.
        vm.assertEq(channels.earnings(ETH, publisher), 12 + 2 * 2);
        vm.assertEq(channels.earnings(ETH, payee), 488 + 2 * 98);
    }

    function test_settleBatch_highSIsSkipped() public {
        bytes32[] memory ids = _openN(ETH, 1, 1_000);
        IPaymentChannels.BatchVoucher[] memory vs = new IPaymentChannels.BatchVoucher[](1);
        vs[0] = _bv(ids[0], 100);
        // The high-s twin: s' = n - s, recovery bit flipped; the same signer under raw ecrecover.
        uint256 s = uint256(vs[0].vs) & (type(uint256).max >> 1);
        uint256 bit = uint256(vs[0].vs) >> 255;
        vs[0].vs = bytes32((SECP256K1_N - s) | ((1 - bit) << 255));
        vm.expectEmit(address(channels));
        emit IPaymentChannels.SettlementSkipped(ids[0], IPaymentChannels.InvalidSignature.selector);
        vm.assertEq(_batch(ETH, vs), 0);
    }

    function test_settleBatch_byAnotherCallerSettlesNothing() public {
        bytes32[] memory ids = _openN(ETH, 2, 1_000);
        IPaymentChannels.BatchVoucher[] memory vs = new IPaymentChannels.BatchVoucher[](2);
        vs[0] = _bv(ids[0], 100);
        vs[1] = _bv(ids[1], 100);
        vm.prank(stranger); // the id is derived with the caller as payee: no such channel
        vm.assertEq(channels.settleBatch(ETH, MODEL, publisher, BPS, vs), 0);
        vm.assertEq(channels.getChannel(ids[0]).settled, 0);
        vm.assertEq(channels.earnings(ETH, stranger), 0);
    }

    function test_settleBatch_revertsOnRoyaltyAboveAllBps() public {
        IPaymentChannels.BatchVoucher[] memory vs = new IPaymentChannels.BatchVoucher[](0);
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.InvalidRoyalty.selector, uint16(10_001)));
        vm.prank(payee);
        channels.settleBatch(ETH, MODEL, publisher, 10_001, vs);
    }

    // ------------------------------------------------------------------ claimRefund

    function test_claimRefund_paysThePayerOnceAfterClose() public {
        bytes32 id = _open(address(token), 1_000);
        bytes memory sig = _voucher(id, 300);
        vm.prank(payee);
        channels.close(_p(id), 300, sig);
        vm.assertEq(channels.refundOf(id), 700);
        uint256 before = token.balanceOf(payer);
        vm.expectEmit(address(channels));
        emit IPaymentChannels.RefundClaimed(id, payer, 700);
        vm.prank(payer);
        vm.assertEq(channels.claimRefund(_p(id)), 700);
        vm.assertEq(token.balanceOf(payer), before + 700);
        vm.assertEq(channels.refundOf(id), 0);
        vm.assertTrue(channels.getChannel(id).refunded);
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.RefundAlreadyClaimed.selector, id));
        vm.prank(payer);
        channels.claimRefund(_p(id));
    }

    function test_claimRefund_ethAfterWithdraw() public {
        bytes32 id = _open(ETH, 1_000);
        _settle(id, 250);
        vm.prank(payer);
        channels.requestClose(_p(id));
        vm.warp(block.timestamp + GRACE);
        vm.prank(payer);
        channels.withdraw(_p(id));
        uint256 before = payer.balance;
        vm.prank(payer);
        channels.claimRefund(_p(id));
        vm.assertEq(payer.balance, before + 750);
    }

    function test_claimRefund_reverts() public {
        bytes32 id = _open(ETH, 1_000);
        vm.expectRevert(abi.encodeWithSelector(IPaymentChannels.ChannelNotFinalized.selector, id));
        vm.prank(payer);
        channels.claimRefund(_p(id));
        vm.prank(payee);
        channels.close(_p(id), 0, "");
        vm.expectRevert(IPaymentChannels.NotPayer.selector);
        vm.prank(payee);
        channels.claimRefund(_p(id));
        IPaymentChannels.ChannelParams memory unknown = _unknown();
        vm.expectRevert(
            abi.encodeWithSelector(IPaymentChannels.ChannelNotFound.selector, channels.channelIdOf(unknown))
        );
        vm.prank(payer);
        channels.claimRefund(unknown);

        bytes32 full = _openWith(ETH, 10, keccak256("full"), signer, MODEL, BPS);
        bytes memory sig = _voucher(full, 10);
        vm.prank(payee);
        channels.close(_p(full), 10, sig);
        vm.expectRevert(IPaymentChannels.NothingToClaim.selector);
        vm.prank(payer);
        channels.claimRefund(_p(full));
    }
}
