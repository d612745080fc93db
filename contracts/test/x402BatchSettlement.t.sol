// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {TestBase} from "./utils/TestBase.sol";
import {x402BatchSettlement} from "../src/x402/x402BatchSettlement.sol";
import {ERC3009DepositCollector} from "../src/x402/ERC3009DepositCollector.sol";
import {TestToken} from "./TestToken.sol";
import {ERC3009} from "../src/ERC3009.sol";

/// @dev The settlement contract and collector at x402's canonical addresses (code copied with vm.etch, as the devnet
///      does with anvil_setCode), a TestToken with ERC-3009, a payer, a receiver and its authorizer.
/// @dev The one cheatcode TestBase lacks.
interface VmEtch {
    function etch(address target, bytes calldata code) external;
}

contract x402BatchSettlementTest is TestBase {
    x402BatchSettlement internal constant BS = x402BatchSettlement(0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003);
    address internal constant COLLECTOR = 0x4020806089470a89826cB9fB1f4059150b550004;
    uint40 internal constant DELAY = 900;

    TestToken internal token;
    uint256 internal payerKey = 0xA11CE;
    uint256 internal authKey = 0xB0B;
    address internal payer;
    address internal receiverAuthorizer;
    address internal receiver = address(0xFEE);

    function setUp() public {
        VmEtch(address(vm)).etch(address(BS), address(new x402BatchSettlement()).code);
        VmEtch(address(vm)).etch(COLLECTOR, address(new ERC3009DepositCollector()).code);
        token = new TestToken("Devnet USD", "dUSD");
        payer = vm.addr(payerKey);
        receiverAuthorizer = vm.addr(authKey);
        token.mint(payer, 1_000 ether);
        vm.warp(1_700_000_000);
    }

    function _config() internal view returns (x402BatchSettlement.ChannelConfig memory) {
        return x402BatchSettlement.ChannelConfig(payer, payer, receiver, receiverAuthorizer, address(token), DELAY, 0);
    }

    function _collectorData(bytes32 id, uint256 amount, uint256 salt) internal view returns (bytes memory) {
        bytes32 nonce = keccak256(abi.encode(id, salt));
        uint256 validBefore = block.timestamp + 300;
        bytes32 structHash = keccak256(
            abi.encode(token.RECEIVE_WITH_AUTHORIZATION_TYPEHASH(), payer, COLLECTOR, amount, 0, validBefore, nonce)
        );
        bytes32 digest = keccak256(abi.encodePacked("\x19\x01", token.DOMAIN_SEPARATOR(), structHash));
        return abi.encode(uint256(0), validBefore, salt, _sign(payerKey, digest));
    }

    function _deposit(uint128 amount, uint256 salt) internal returns (bytes32 id) {
        x402BatchSettlement.ChannelConfig memory c = _config();
        id = BS.getChannelId(c);
        BS.deposit(c, amount, COLLECTOR, _collectorData(id, amount, salt));
    }

    function _claim(uint128 max, uint128 total) internal view returns (x402BatchSettlement.VoucherClaim[] memory cs) {
        cs = new x402BatchSettlement.VoucherClaim[](1);
        bytes32 id = BS.getChannelId(_config());
        cs[0] = x402BatchSettlement.VoucherClaim(
            x402BatchSettlement.Voucher(_config(), max), _sign(payerKey, BS.getVoucherDigest(id, max)), total
        );
    }

    function _balances(bytes32 id) internal view returns (uint128 balance, uint128 claimed) {
        (balance, claimed) = BS.channels(id);
    }

    function test_depositThroughErc3009Collector() public {
        bytes32 id = _deposit(10 ether, 1);
        (uint128 balance, uint128 claimed) = _balances(id);
        vm.assertEq(balance, 10 ether);
        vm.assertEq(claimed, 0);
        vm.assertEq(token.balanceOf(address(BS)), 10 ether);
        vm.assertEq(token.balanceOf(payer), 990 ether);
    }

    function test_depositAuthorizationIsBoundToChannelAndSingleUse() public {
        x402BatchSettlement.ChannelConfig memory c = _config();
        bytes32 id = BS.getChannelId(c);
        bytes memory data = _collectorData(id, 5 ether, 7);
        BS.deposit(c, 5 ether, COLLECTOR, data);
        vm.expectRevert(ERC3009.AuthorizationUsedAlready.selector);
        BS.deposit(c, 5 ether, COLLECTOR, data); // replay
        c.salt = bytes32(uint256(1)); // another channel: the nonce no longer matches the signature
        vm.expectRevert(ERC3009.InvalidAuthorizationSignature.selector);
        BS.deposit(c, 5 ether, COLLECTOR, data);
    }

    function test_collectorOnlyServesSettlement() public {
        vm.expectRevert(ERC3009DepositCollector.OnlySettlement.selector);
        ERC3009DepositCollector(COLLECTOR).collect(payer, address(token), 1, bytes32(0), "");
    }

    function test_claimThenSettlePaysReceiverOnce() public {
        bytes32 id = _deposit(10 ether, 1);
        x402BatchSettlement.VoucherClaim[] memory cs = _claim(3 ether, 2 ether);
        vm.prank(receiverAuthorizer);
        BS.claim(cs);
        (, uint128 claimed) = _balances(id);
        vm.assertEq(claimed, 2 ether);
        vm.prank(receiverAuthorizer);
        BS.claim(cs); // resubmitted: no-op
        BS.settle(receiver, address(token));
        BS.settle(receiver, address(token));
        vm.assertEq(token.balanceOf(receiver), 2 ether);
        (uint128 totalClaimed, uint128 totalSettled) = BS.receivers(receiver, address(token));
        vm.assertEq(totalClaimed, 2 ether);
        vm.assertEq(totalSettled, 2 ether);
    }

    function test_claimRejectsStrangersForgeriesAndOverclaims() public {
        _deposit(10 ether, 1);
        x402BatchSettlement.VoucherClaim[] memory ok = _claim(3 ether, 3 ether);
        vm.expectRevert(x402BatchSettlement.Unauthorized.selector);
        BS.claim(ok);
        x402BatchSettlement.VoucherClaim[] memory forged = _claim(3 ether, 3 ether);
        forged[0].signature = _sign(authKey, BS.getVoucherDigest(BS.getChannelId(_config()), 3 ether));
        x402BatchSettlement.VoucherClaim[] memory over = _claim(3 ether, 4 ether);
        x402BatchSettlement.VoucherClaim[] memory beyond = _claim(11 ether, 11 ether);
        vm.startPrank(receiverAuthorizer);
        vm.expectRevert(x402BatchSettlement.InvalidVoucherSignature.selector);
        BS.claim(forged);
        vm.expectRevert(x402BatchSettlement.ClaimExceedsVoucher.selector);
        BS.claim(over);
        vm.expectRevert(x402BatchSettlement.ClaimExceedsBalance.selector);
        BS.claim(beyond);
        vm.stopPrank();
    }

    function test_claimWithSignatureByAnySubmitter() public {
        bytes32 id = _deposit(10 ether, 1);
        x402BatchSettlement.VoucherClaim[] memory cs = _claim(4 ether, 4 ether);
        bytes memory sig = _sign(authKey, BS.getClaimBatchDigest(cs));
        bytes memory wrong = _sign(payerKey, BS.getClaimBatchDigest(cs));
        vm.expectRevert(x402BatchSettlement.InvalidAuthorizerSignature.selector);
        BS.claimWithSignature(cs, wrong);
        BS.claimWithSignature(cs, sig);
        (, uint128 claimed) = _balances(id);
        vm.assertEq(claimed, 4 ether);
    }

    function test_withdrawWaitsForDelayAndLeavesClaimedFunds() public {
        bytes32 id = _deposit(10 ether, 1);
        x402BatchSettlement.VoucherClaim[] memory cs = _claim(3 ether, 3 ether);
        vm.prank(receiverAuthorizer);
        BS.claim(cs);
        x402BatchSettlement.ChannelConfig memory c = _config();
        vm.expectRevert(x402BatchSettlement.Unauthorized.selector);
        BS.initiateWithdraw(c, 10 ether);
        vm.prank(payer);
        BS.initiateWithdraw(c, 10 ether);
        vm.expectRevert(x402BatchSettlement.WithdrawDelayNotElapsed.selector);
        BS.finalizeWithdraw(c);
        vm.warp(block.timestamp + DELAY);
        BS.finalizeWithdraw(c);
        vm.assertEq(token.balanceOf(payer), 997 ether);
        (uint128 balance, uint128 claimed) = _balances(id);
        vm.assertEq(balance, 3 ether);
        vm.assertEq(claimed, 3 ether);
        BS.settle(receiver, address(token));
        vm.assertEq(token.balanceOf(receiver), 3 ether);
        vm.assertEq(token.balanceOf(address(BS)), 0);
    }

    function test_refundWithSignatureUsesNonceOnce() public {
        bytes32 id = _deposit(10 ether, 1);
        bytes memory sig = _sign(authKey, BS.getRefundDigest(id, 0, 4 ether));
        BS.refundWithSignature(_config(), 4 ether, 0, sig);
        vm.assertEq(token.balanceOf(payer), 994 ether);
        vm.assertEq(BS.refundNonce(id), 1);
        vm.expectRevert(x402BatchSettlement.InvalidRefundNonce.selector);
        BS.refundWithSignature(_config(), 4 ether, 0, sig);
        x402BatchSettlement.ChannelConfig memory c = _config();
        vm.prank(receiverAuthorizer);
        BS.refund(c, 100 ether); // capped at the unclaimed balance
        (uint128 balance,) = _balances(id);
        vm.assertEq(balance, 0);
        vm.assertEq(token.balanceOf(payer), 1_000 ether);
    }

    function test_multicallClaimsAndSettlesAtomically() public {
        _deposit(10 ether, 1);
        x402BatchSettlement.VoucherClaim[] memory cs = _claim(5 ether, 5 ether);
        bytes[] memory calls = new bytes[](2);
        calls[0] = abi.encodeCall(BS.claimWithSignature, (cs, _sign(authKey, BS.getClaimBatchDigest(cs))));
        calls[1] = abi.encodeCall(BS.settle, (receiver, address(token)));
        BS.multicall(calls);
        vm.assertEq(token.balanceOf(receiver), 5 ether);
    }

    function testFuzz_neverPaysMoreThanDeposited(uint128 deposit, uint128 claimAmt, uint128 refundAmt) public {
        deposit = uint128(bound(deposit, 1, 1_000 ether));
        claimAmt = uint128(bound(claimAmt, 1, deposit));
        _deposit(deposit, 3);
        x402BatchSettlement.VoucherClaim[] memory cs = _claim(claimAmt, claimAmt);
        x402BatchSettlement.ChannelConfig memory c = _config();
        vm.startPrank(receiverAuthorizer);
        BS.claim(cs);
        BS.refund(c, refundAmt);
        vm.stopPrank();
        BS.settle(receiver, address(token));
        vm.assertEq(token.balanceOf(receiver), claimAmt);
        vm.assertEq(token.balanceOf(payer) + token.balanceOf(receiver) + token.balanceOf(address(BS)), 1_000 ether);
        vm.assertLe(
            token.balanceOf(receiver) + (1_000 ether - token.balanceOf(payer) - token.balanceOf(receiver)), deposit
        );
    }

    function test_erc3009ReceiveOnlyByPayeeAndExpires() public {
        bytes32 id = BS.getChannelId(_config());
        (uint256 validAfter, uint256 validBefore, uint256 salt, bytes memory sig) =
            abi.decode(_collectorData(id, 1 ether, 9), (uint256, uint256, uint256, bytes));
        bytes32 nonce = keccak256(abi.encode(id, salt));
        vm.expectRevert(ERC3009.CallerMustBePayee.selector); // nobody front-runs the collector's pull
        token.receiveWithAuthorization(payer, COLLECTOR, 1 ether, validAfter, validBefore, nonce, sig);
        vm.warp(validBefore);
        vm.prank(COLLECTOR);
        vm.expectRevert(ERC3009.AuthorizationExpired.selector);
        token.receiveWithAuthorization(payer, COLLECTOR, 1 ether, validAfter, validBefore, nonce, sig);
    }

    function test_erc3009TransferWithAuthorization() public {
        bytes32 nonce = keccak256("n");
        bytes32 structHash = keccak256(
            abi.encode(
                token.TRANSFER_WITH_AUTHORIZATION_TYPEHASH(), payer, receiver, 2 ether, 0, block.timestamp + 60, nonce
            )
        );
        bytes memory sig =
            _sign(payerKey, keccak256(abi.encodePacked("\x19\x01", token.DOMAIN_SEPARATOR(), structHash)));
        token.transferWithAuthorization(payer, receiver, 2 ether, 0, block.timestamp + 60, nonce, sig);
        vm.assertEq(token.balanceOf(receiver), 2 ether);
        vm.assertTrue(token.authorizationState(payer, nonce));
        vm.expectRevert(ERC3009.AuthorizationUsedAlready.selector);
        token.transferWithAuthorization(payer, receiver, 2 ether, 0, block.timestamp + 60, nonce, sig);
    }
}
