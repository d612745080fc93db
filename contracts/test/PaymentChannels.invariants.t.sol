// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {TestBase} from "./utils/TestBase.sol";
import {PaymentChannels} from "../src/PaymentChannels.sol";
import {ModelRegistry} from "../src/ModelRegistry.sol";
import {TestToken} from "./TestToken.sol";
import {ReentrantToken} from "./mocks/ReentrantToken.sol";
import {ReentrantSigner} from "./mocks/ReentrantSigner.sol";
import {RevertingReceiver} from "./mocks/RevertingReceiver.sol";
import {IPaymentChannels} from "../src/interfaces/IPaymentChannels.sol";

/// @dev Drives PaymentChannels through bounded random interleavings of every action, legitimate
///      and hostile, and keeps ghost accounting the invariants compare the contract against.
///      Every expectation is checked right after the call; a breach increments a ghost counter
///      (never reverts, so `fail_on_revert = false` cannot hide it) and the invariants assert zero.
contract PaymentChannelsHandler is TestBase {
    struct Info {
        address payer;
        address payee;
        address token;
        address publisher; // the royalty recipient (zero when bps == 0)
        address signer;
        uint256 signerPk; // the key that signs (the owner key for the ERC-1271 signer)
        uint16 bps;
        bytes32 salt;
        bytes32 modelId;
    }

    uint64 public constant GRACE = 900;
    uint256 public constant MAX_CHANNELS = 24;
    address internal constant ETH = address(0);

    PaymentChannels public channels;
    PaymentChannels public otherChannels; // same registry, another verifying contract
    ModelRegistry public registry;
    TestToken public token;
    ReentrantToken public evilToken;
    ReentrantSigner public evilSigner;

    address[] public tokens;
    address[] public payers;
    address[] public payees;
    address[] public accounts; // everyone who can hold earnings, plus a stranger
    bytes32[] public models;
    uint256[] internal signerPks;
    address[] internal signerAddrs;

    bytes32[] public ids;
    mapping(bytes32 => Info) internal info;
    mapping(bytes32 => IPaymentChannels.ChannelParams) internal paramsOf; // what every call passes back
    uint256 internal saltNonce;

    // ---- ghosts (the handler's model of what the contract must hold)
    mapping(address token => uint256) public ghostIn; // deposits + top-ups received
    mapping(address token => uint256) public ghostOut; // claims paid out
    mapping(bytes32 => uint128) public ghostDeposit;
    mapping(bytes32 => uint128) public ghostSettled;
    mapping(bytes32 => uint64) public ghostCloseRequestedAt;
    mapping(bytes32 => bool) public ghostFinalized;
    mapping(bytes32 => uint256) public ghostPayeeCredit;
    mapping(bytes32 => uint256) public ghostPublisherCredit;
    mapping(bytes32 => uint256) public ghostRefund;
    mapping(bytes32 => bool) public ghostRefundClaimed;

    // ---- breaches, one counter per property
    uint256 public replayAccepted; // (6) voucher of another channel / chain / contract, or stale
    uint256 public malleatedAccepted; // (7) high-s or 64-byte signature accepted
    uint256 public unauthorizedAccepted; // (8) a call by the wrong party, or an early withdraw
    uint256 public finalizedMutated; // (5) a mutator succeeded on a finalized channel, or a reopen
    uint256 public wrongParamsAccepted; // (8) a call with one wrong term did other than ChannelNotFound
    uint256 public payeeLivenessFailures; // (9) a valid voucher or close was refused
    uint256 public payerLivenessFailures; // (10) a due withdraw, top-up, open or request failed
    uint256 public partialSettlements; // (11) a settle credited other than exactly its delta
    uint256 public refundMismatches; // (4) a finalization credited the payer other than deposit - settled
    uint256 public claimMismatches; // a claim paid other than the balance, or failed without cause
    string public lastBreach;

    // ---- call counters (coverage summary)
    uint256 public settles;
    uint256 public batchSettles;
    uint256 public closes;
    uint256 public withdrawals;
    uint256 public hostileCalls;

    constructor() {
        registry = new ModelRegistry();
        channels = new PaymentChannels(address(registry), GRACE);
        otherChannels = new PaymentChannels(address(registry), GRACE);
        token = new TestToken("Test", "TST");
        evilToken = new ReentrantToken();
        evilToken.arm(address(channels), abi.encodeCall(PaymentChannels.claimEarnings, (address(evilToken))));

        tokens.push(ETH);
        tokens.push(address(token));
        tokens.push(address(evilToken));

        payers.push(vm.addr(0xA1));
        payers.push(vm.addr(0xA2));
        payers.push(address(new RevertingReceiver()));
        payees.push(vm.addr(0xB1));
        payees.push(address(new RevertingReceiver()));
        payees.push(address(evilToken)); // lets the token's re-entering claim pass every check but the guard

        address pubEoa = vm.addr(0xC1);
        address pubReverting = address(new RevertingReceiver());
        models.push(keccak256("unregistered"));
        models.push(_register(pubEoa, "m250", 250));
        models.push(_register(pubReverting, "m3333", 3_333));
        models.push(_register(pubEoa, "m10000", 10_000));
        models.push(_register(pubReverting, "m0", 0));

        signerPks.push(0xD1);
        signerAddrs.push(vm.addr(0xD1));
        signerPks.push(0xD2);
        signerAddrs.push(vm.addr(0xD2));
        evilSigner = new ReentrantSigner(vm.addr(0xD3));
        signerPks.push(0xD3);
        signerAddrs.push(address(evilSigner));

        for (uint256 i; i < payers.length; i++) {
            accounts.push(payers[i]);
        }
        for (uint256 i; i < payees.length; i++) {
            accounts.push(payees[i]);
        }
        accounts.push(pubEoa);
        accounts.push(pubReverting);
        accounts.push(vm.addr(0xE1)); // a stranger

        for (uint256 i; i < payers.length; i++) {
            vm.startPrank(payers[i]);
            token.approve(address(channels), type(uint256).max);
            evilToken.approve(address(channels), type(uint256).max);
            vm.stopPrank();
        }
    }

    // ================================================================ actions

    function open(
        uint256 payerSeed,
        uint256 payeeSeed,
        uint256 tokenSeed,
        uint256 modelSeed,
        uint256 signerSeed,
        uint256 amountSeed
    ) external {
        if (ids.length >= MAX_CHANNELS) return;
        Info memory c;
        c.payer = payers[payerSeed % payers.length];
        c.payee = payees[payeeSeed % payees.length];
        c.token = tokens[tokenSeed % tokens.length];
        c.modelId = models[modelSeed % models.length];
        uint256 s = signerSeed % signerPks.length;
        c.signer = signerAddrs[s];
        c.signerPk = signerPks[s];
        (address publisher, uint16 bps) = registry.terms(c.modelId);
        c.bps = bps;
        c.publisher = bps == 0 ? address(0) : publisher; // the registry's publisher stays in the terms
        c.salt = bytes32(++saltNonce);
        uint128 deposit = _amount(amountSeed);

        _fund(c.payer, c.token, deposit);
        vm.prank(c.payer);
        try channels.open{value: c.token == ETH ? deposit : 0}(
            c.payee, c.token, deposit, c.salt, c.signer, c.modelId, bps
        ) returns (
            bytes32 id
        ) {
            ids.push(id);
            info[id] = c;
            paramsOf[id] =
                IPaymentChannels.ChannelParams(c.payer, c.payee, c.token, c.salt, c.signer, c.modelId, publisher, bps);
            ghostDeposit[id] = deposit;
            ghostIn[c.token] += deposit;
        } catch {
            _breach(payerLivenessFailures++, "open failed");
        }
    }

    function topUp(uint256 idSeed, uint256 amountSeed, bool fitting) external {
        (bytes32 id, bool ok) = _live(idSeed);
        if (!ok) return;
        Info memory c = info[id];
        uint128 room = type(uint120).max - ghostDeposit[id];
        uint128 amount = fitting && room != 0 ? uint128(bound(amountSeed, 1, room)) : _amount(amountSeed);
        bool fits = amount <= room;

        _fund(c.payer, c.token, amount);
        vm.prank(c.payer);
        try channels.topUp{value: c.token == ETH ? amount : 0}(paramsOf[id], amount) {
            if (!fits) return _breach(partialSettlements++, "top-up overflowed");
            ghostDeposit[id] += amount;
            ghostCloseRequestedAt[id] = 0;
            ghostIn[c.token] += amount;
        } catch {
            if (fits) _breach(payerLivenessFailures++, "top-up failed");
        }
    }

    /// @dev A valid voucher from the payee: must succeed (payee liveness), close pending or not,
    ///      grace elapsed or not, and credit exactly its delta.
    function settle(uint256 idSeed, uint256 amountSeed) external {
        (bytes32 id, bool ok) = _live(idSeed);
        if (!ok || ghostSettled[id] == ghostDeposit[id]) return;
        uint128 cum = _nextCumulative(id, amountSeed);
        bytes memory sig = _voucher(id, cum);
        _armReentry(id, cum, sig);

        (uint256 payeeBefore, uint256 pubBefore) = _credits(id);
        vm.prank(info[id].payee);
        try channels.settle(paramsOf[id], cum, sig) {
            settles++;
            _recordSettle(id, cum, payeeBefore, pubBefore);
        } catch {
            _breach(payeeLivenessFailures++, "valid settle refused");
        }
    }

    /// @dev The payee closes, with a fresh voucher or at the settled amount: must succeed and
    ///      refund exactly deposit - settled.
    function close(uint256 idSeed, uint256 amountSeed, bool withVoucher) external {
        (bytes32 id, bool ok) = _live(idSeed);
        if (!ok) return;
        Info memory c = info[id];
        uint128 cum = ghostSettled[id];
        bytes memory sig;
        if (withVoucher && cum < ghostDeposit[id]) {
            cum = _nextCumulative(id, amountSeed);
            sig = _voucher(id, cum);
            _armReentry(id, cum, sig);
        }
        (uint256 payeeBefore, uint256 pubBefore) = _credits(id);
        vm.prank(c.payee);
        try channels.close(paramsOf[id], cum, sig) {
            closes++;
            if (cum > ghostSettled[id]) _recordSettle(id, cum, payeeBefore, pubBefore);
            _recordFinal(id);
        } catch {
            _breach(payeeLivenessFailures++, "close refused");
        }
    }

    function requestClose(uint256 idSeed) external {
        (bytes32 id, bool ok) = _live(idSeed);
        if (!ok) return;
        bool pending = ghostCloseRequestedAt[id] != 0;
        vm.prank(info[id].payer);
        try channels.requestClose(paramsOf[id]) {
            if (pending) return _breach(unauthorizedAccepted++, "second requestClose accepted");
            ghostCloseRequestedAt[id] = uint64(block.timestamp);
        } catch {
            if (!pending) _breach(payerLivenessFailures++, "requestClose failed");
        }
    }

    /// @dev Due withdrawals must succeed whoever the payee and publisher are (some revert on
    ///      receipt); early ones must fail.
    function withdraw(uint256 idSeed) external {
        (bytes32 id, bool ok) = _live(idSeed);
        if (!ok) return;
        Info memory c = info[id];
        uint64 requestedAt = ghostCloseRequestedAt[id];
        // forge-lint: disable-next-line(block-timestamp)
        bool due = requestedAt != 0 && block.timestamp >= uint256(requestedAt) + GRACE;
        vm.prank(c.payer);
        try channels.withdraw(paramsOf[id]) {
            if (!due) return _breach(unauthorizedAccepted++, "early withdraw accepted");
            withdrawals++;
            _recordFinal(id);
        } catch {
            if (due) _breach(payerLivenessFailures++, "due withdraw failed");
        }
    }

    function claim(uint256 accountSeed, uint256 tokenSeed) external {
        address account = accounts[accountSeed % accounts.length];
        address t = tokens[tokenSeed % tokens.length];
        uint256 owed = channels.earnings(t, account);
        uint256 before = _balanceOf(t, account);
        vm.prank(account);
        try channels.claimEarnings(t) returns (uint256 paid) {
            if (paid != owed || owed == 0 || _balanceOf(t, account) - before != owed) {
                return _breach(claimMismatches++, "claim paid the wrong amount");
            }
            if (channels.earnings(t, account) != 0) return _breach(claimMismatches++, "claim left a balance");
            ghostOut[t] += owed;
        } catch {
            // Only an empty balance, or ETH to a recipient that rejects it, may fail.
            if (owed != 0 && (t != ETH || account.code.length == 0)) _breach(claimMismatches++, "claim failed");
        }
    }

    /// @dev The payer claims the refund of a finalized channel: exactly deposit - settled, once;
    ///      fails only before finalization, on a second claim, for a zero refund, or for ETH to a
    ///      payer that rejects it.
    function claimRefund(uint256 idSeed) external {
        if (ids.length == 0) return;
        bytes32 id = ids[idSeed % ids.length];
        Info memory c = info[id];
        uint256 owed = ghostFinalized[id] && !ghostRefundClaimed[id] ? ghostRefund[id] : 0;
        uint256 before = _balanceOf(c.token, c.payer);
        vm.prank(c.payer);
        try channels.claimRefund(paramsOf[id]) returns (uint128 paid) {
            if (owed == 0 || paid != owed || _balanceOf(c.token, c.payer) - before != owed) {
                return _breach(claimMismatches++, "refund claim paid the wrong amount");
            }
            ghostRefundClaimed[id] = true;
            ghostOut[c.token] += owed;
        } catch {
            if (owed != 0 && (c.token != ETH || c.payer.code.length == 0)) {
                _breach(claimMismatches++, "refund claim failed");
            }
        }
    }

    /// @dev A batch of up to four vouchers on channels sharing the payee, token and model of a
    ///      picked one (finalized ones, repeats, stale and oversized amounts included): the call never
    ///      reverts, each voucher settles exactly when {settle} would accept it (checked in order,
    ///      so a repeat is checked against the amount the first settled), and the payee and
    ///      publisher are credited exactly the sum of the single splits.
    function settleBatch(uint256 idSeed, uint256 amountSeed, uint256 pickSeed) external {
        if (ids.length == 0) return;
        bytes32 first = ids[idSeed % ids.length];
        Info memory c = info[first];
        (IPaymentChannels.BatchVoucher[] memory vs, bytes32[] memory picked) = _batchOf(first, amountSeed, pickSeed);
        (uint256 payeeBefore, uint256 pubBefore) = _credits(first);
        vm.prank(c.payee);
        try channels.settleBatch(c.token, c.modelId, paramsOf[first].publisher, c.bps, vs) returns (uint256 count) {
            (uint256 expectedCount, uint256 payeeGain, uint256 pubGain) = _expectBatch(picked, vs, c.bps);
            (uint256 payeeAfter, uint256 pubAfter) = _credits(first);
            if (count != expectedCount) return _breach(partialSettlements++, "batch settled other than settle would");
            if (payeeAfter - payeeBefore != payeeGain || pubAfter - pubBefore != pubGain) {
                _breach(partialSettlements++, "batch credited other than the single splits");
            }
        } catch {
            _breach(payeeLivenessFailures++, "settleBatch reverted");
        }
    }

    function _batchOf(bytes32 first, uint256 amountSeed, uint256 pickSeed)
        internal
        view
        returns (IPaymentChannels.BatchVoucher[] memory vs, bytes32[] memory picked)
    {
        Info memory c = info[first];
        uint256 n = 1 + pickSeed % 4;
        vs = new IPaymentChannels.BatchVoucher[](n);
        picked = new bytes32[](n);
        for (uint256 k; k < n; k++) {
            bytes32 id = first;
            // Another channel of the same payee, token and model when the seed finds one.
            bytes32 other = ids[uint256(keccak256(abi.encode(pickSeed, k))) % ids.length];
            Info memory o = info[other];
            if (o.payee == c.payee && o.token == c.token && o.modelId == c.modelId) id = other;
            picked[k] = id;
            uint256 seed = uint256(keccak256(abi.encode(amountSeed, k)));
            uint128 cum = seed % 7 == 0
                ? ghostDeposit[id] + 1  // above the deposit
                : (seed % 7 == 1 ? ghostSettled[id] : uint128(bound(seed >> 3, 1, ghostDeposit[id])));
            (uint8 v, bytes32 r, bytes32 s) = vm.sign(info[id].signerPk, channels.hashVoucher(id, cum));
            vs[k] = IPaymentChannels.BatchVoucher(
                info[id].payer, info[id].salt, info[id].signer, cum, r, bytes32(uint256(s) | (uint256(v - 27) << 255))
            );
        }
    }

    /// @dev Replays {settle}'s checks over the batch in order on the ghosts, records what settles.
    function _expectBatch(bytes32[] memory picked, IPaymentChannels.BatchVoucher[] memory vs, uint16 bps)
        internal
        returns (uint256 count, uint256 payeeGain, uint256 pubGain)
    {
        for (uint256 k; k < picked.length; k++) {
            bytes32 id = picked[k];
            uint128 cum = vs[k].cumulativeAmount;
            uint128 old = ghostSettled[id];
            // An ERC-1271 signer (a contract) is never valid in a batch: it settles through settle.
            bool valid = !ghostFinalized[id] && cum > old && cum <= ghostDeposit[id] && info[id].signer.code.length == 0;
            if (!valid) continue;
            count++;
            uint256 pub = uint256(cum) * bps / 10_000 - uint256(old) * bps / 10_000;
            pubGain += pub;
            payeeGain += cum - old - pub;
            ghostSettled[id] = cum;
            ghostPayeeCredit[id] += cum - old - pub;
            ghostPublisherCredit[id] += pub;
        }
        batchSettles += count;
    }

    function warp(uint256 secondsSeed) external {
        vm.warp(block.timestamp + bound(secondsSeed, 0, 2 * uint256(GRACE)));
    }

    /// @dev Forged, replayed and malleated vouchers, through settle or close: none may succeed.
    function settleForged(uint256 idSeed, uint256 amountSeed, uint256 kindSeed, bool viaClose) external {
        (bytes32 id, bool ok) = _live(idSeed);
        if (!ok) return;
        Info memory c = info[id];
        uint256 kind = kindSeed % 8;
        uint128 cum;
        bytes memory sig;
        bool chainSwitched;
        if (kind == 7) {
            // Stale: a voucher at or below what is settled (replay of a consumed voucher).
            cum = uint128(bound(amountSeed, 0, ghostSettled[id]));
            if (cum == 0) return; // close(0) is a legitimate close without voucher
            sig = _voucher(id, cum);
        } else {
            if (ghostSettled[id] == ghostDeposit[id]) return;
            cum = _nextCumulative(id, amountSeed);
            if (kind == 0) {
                // Another channel's voucher (same signer key) for the same amount.
                bytes32 other = ids[(uint256(keccak256(abi.encode(amountSeed))) % ids.length)];
                if (other == id) other = keccak256(abi.encode(id));
                sig = _sign(c.signerPk, channels.hashVoucher(other, cum));
            } else if (kind == 1) {
                sig = _sign(
                    c.signerPk, _voucherDigest(block.chainid + 1 + amountSeed % 1000, address(channels), id, cum)
                );
            } else if (kind == 2) {
                sig = _sign(c.signerPk, otherChannels.hashVoucher(id, cum));
            } else if (kind == 3) {
                sig = _highS(c.signerPk, channels.hashVoucher(id, cum));
            } else if (kind == 4) {
                sig = _compact(c.signerPk, channels.hashVoucher(id, cum));
            } else if (kind == 5) {
                sig = _sign(0xBAD, channels.hashVoucher(id, cum));
            } else {
                // Valid on this chain, submitted after a fork changed the chain id.
                sig = _voucher(id, cum);
                vm.chainId(block.chainid + 1);
                chainSwitched = true;
            }
        }
        // A stale amount through close is a legitimate close at the settled amount: settle only.
        if (kind == 7) viaClose = false;
        hostileCalls++;
        bool succeeded;
        vm.prank(c.payee);
        if (viaClose) {
            try channels.close(paramsOf[id], cum, sig) {
                succeeded = true;
            } catch {}
        } else {
            try channels.settle(paramsOf[id], cum, sig) {
                succeeded = true;
            } catch {}
        }
        if (chainSwitched) vm.chainId(block.chainid - 1);
        if (!succeeded) return;
        if (kind == 3 || kind == 4) _breach(malleatedAccepted++, "malleated signature accepted");
        else _breach(replayAccepted++, "replayed or forged voucher accepted");
    }

    /// @dev Every role-restricted call from someone else must fail.
    function unauthorized(uint256 idSeed, uint256 callerSeed, uint256 fnSeed) external {
        if (ids.length == 0) return;
        bytes32 id = ids[idSeed % ids.length];
        Info memory c = info[id];
        address caller = accounts[callerSeed % accounts.length];
        uint256 fn = fnSeed % 5;
        if (fn < 2 && caller == c.payee) return;
        if (fn >= 2 && caller == c.payer) return;
        hostileCalls++;
        uint128 cum = ghostSettled[id] < ghostDeposit[id] ? ghostSettled[id] + 1 : ghostSettled[id];
        bytes memory sig = _voucher(id, cum);
        bool succeeded;
        vm.deal(caller, caller.balance + 1);
        vm.prank(caller);
        if (fn == 0) {
            try channels.settle(paramsOf[id], cum, sig) {
                succeeded = true;
            } catch {}
        } else if (fn == 1) {
            try channels.close(paramsOf[id], cum, sig) {
                succeeded = true;
            } catch {}
        } else if (fn == 2) {
            try channels.topUp{value: c.token == ETH ? 1 : 0}(paramsOf[id], 1) {
                succeeded = true;
            } catch {}
        } else if (fn == 3) {
            try channels.requestClose(paramsOf[id]) {
                succeeded = true;
            } catch {}
        } else {
            try channels.withdraw(paramsOf[id]) {
                succeeded = true;
            } catch {}
        }
        if (succeeded) _breach(unauthorizedAccepted++, "call by the wrong party accepted");
    }

    /// @dev Every mutator on a finalized channel, by its rightful party, must fail; so must
    ///      reopening its id.
    function pokeFinalized(uint256 idSeed, uint256 fnSeed) external {
        if (ids.length == 0) return;
        bytes32 id = ids[idSeed % ids.length];
        if (!ghostFinalized[id]) return;
        Info memory c = info[id];
        hostileCalls++;
        uint256 fn = fnSeed % 6;
        bool succeeded;
        if (fn == 0) {
            _fund(c.payer, c.token, 1);
            vm.prank(c.payer);
            try channels.topUp{value: c.token == ETH ? 1 : 0}(paramsOf[id], 1) {
                succeeded = true;
            } catch {}
        } else if (fn == 1 || fn == 2) {
            uint128 cum = ghostSettled[id] < ghostDeposit[id] ? ghostSettled[id] + 1 : ghostSettled[id];
            bytes memory sig = _voucher(id, cum);
            vm.prank(c.payee);
            if (fn == 1) {
                try channels.settle(paramsOf[id], cum, sig) {
                    succeeded = true;
                } catch {}
            } else {
                try channels.close(paramsOf[id], cum, sig) {
                    succeeded = true;
                } catch {}
            }
        } else if (fn == 3) {
            vm.prank(c.payer);
            try channels.requestClose(paramsOf[id]) {
                succeeded = true;
            } catch {}
        } else if (fn == 4) {
            vm.prank(c.payer);
            try channels.withdraw(paramsOf[id]) {
                succeeded = true;
            } catch {}
        } else {
            _fund(c.payer, c.token, 1);
            vm.prank(c.payer);
            try channels.open{value: c.token == ETH ? 1 : 0}(c.payee, c.token, 1, c.salt, c.signer, c.modelId, c.bps) {
                succeeded = true;
            } catch {}
        }
        if (succeeded) _breach(finalizedMutated++, "finalized channel mutated or reopened");
    }

    /// @dev Terms with one field wrong, by the party they name (so only the re-derived id stands in
    ///      the way): every call must revert with exactly `ChannelNotFound(wrongId)`.
    function wrongParams(uint256 idSeed, uint256 fieldSeed, uint256 valueSeed, uint256 fnSeed) external {
        if (ids.length == 0) return;
        bytes32 id = ids[idSeed % ids.length];
        IPaymentChannels.ChannelParams memory q = paramsOf[id];
        uint256 field = fieldSeed % 8;
        address a = accounts[valueSeed % accounts.length];
        if (field == 0) q.payer = a;
        else if (field == 1) q.payee = a;
        else if (field == 2) q.token = tokens[valueSeed % tokens.length];
        else if (field == 3) q.salt = keccak256(abi.encode(valueSeed));
        else if (field == 4) q.authorizedSigner = signerAddrs[valueSeed % signerAddrs.length];
        else if (field == 5) q.modelId = models[valueSeed % models.length];
        else if (field == 6) q.publisher = a;
        // forge-lint: disable-next-line(unsafe-typecast)
        else q.publisherBps = uint16(valueSeed % 10_001); // < 2^16
        bytes32 wrongId = channels.channelIdOf(q);
        // The same value again, or (for a salt) another channel's terms: not a wrong term.
        if (wrongId == id || ghostDeposit[wrongId] != 0) return;
        hostileCalls++;

        uint256 fn = fnSeed % 5;
        uint128 cum = ghostSettled[id] < ghostDeposit[id] ? ghostSettled[id] + 1 : ghostSettled[id];
        bytes memory sig = _sign(info[id].signerPk, channels.hashVoucher(wrongId, cum));
        bytes memory call;
        if (fn == 0) call = abi.encodeCall(PaymentChannels.topUp, (q, 1));
        else if (fn == 1) call = abi.encodeCall(PaymentChannels.settle, (q, cum, sig));
        else if (fn == 2) call = abi.encodeCall(PaymentChannels.close, (q, cum, sig));
        else if (fn == 3) call = abi.encodeCall(PaymentChannels.requestClose, (q));
        else call = abi.encodeCall(PaymentChannels.withdraw, (q));
        address caller = fn == 1 || fn == 2 ? q.payee : q.payer;
        uint256 value = fn == 0 && q.token == ETH ? 1 : 0;
        vm.deal(caller, caller.balance + value);

        vm.prank(caller);
        (bool ok, bytes memory reason) = address(channels).call{value: value}(call);
        bytes memory expected = abi.encodeWithSelector(IPaymentChannels.ChannelNotFound.selector, wrongId);
        if (ok || keccak256(reason) != keccak256(expected)) {
            _breach(wrongParamsAccepted++, "wrong term did other than ChannelNotFound");
        }
    }

    // ================================================================ helpers

    function _register(address publisher, string memory name, uint16 bps) internal returns (bytes32 modelId) {
        modelId = keccak256(bytes(name));
        vm.prank(publisher);
        registry.register(modelId, bps);
    }

    /// @dev Amounts: mostly ordinary, one in four within 2^20 of the uint120 bound.
    function _amount(uint256 seed) internal pure returns (uint128) {
        if (seed % 4 == 0) return uint128(bound(seed >> 2, type(uint120).max - (1 << 20), type(uint120).max));
        return uint128(bound(seed >> 2, 1, 1e24));
    }

    function _fund(address payer, address t, uint256 amount) internal {
        if (t == ETH) vm.deal(payer, payer.balance + amount);
        else if (t == address(token)) token.mint(payer, amount);
        else evilToken.mint(payer, amount);
    }

    function _balanceOf(address t, address account) internal view returns (uint256) {
        if (t == ETH) return account.balance;
        return TestToken(t).balanceOf(account);
    }

    /// @dev A channel that is not finalized, picked by seed.
    function _live(uint256 seed) internal view returns (bytes32 id, bool ok) {
        if (ids.length == 0) return (bytes32(0), false);
        id = ids[seed % ids.length];
        ok = !ghostFinalized[id];
    }

    function _nextCumulative(bytes32 id, uint256 seed) internal view returns (uint128) {
        uint128 settled = ghostSettled[id];
        uint128 deposit = ghostDeposit[id];
        // Small steps mostly (exercises rounding), sometimes straight to the deposit.
        if (seed % 5 == 0) return deposit;
        uint256 maxStep = deposit - settled;
        if (seed % 5 != 1 && maxStep > 1e6) maxStep = 1e6;
        return settled + uint128(bound(seed >> 3, 1, maxStep));
    }

    function _voucher(bytes32 id, uint128 cum) internal view returns (bytes memory) {
        return _sign(info[id].signerPk, channels.hashVoucher(id, cum));
    }

    /// @dev Arms both malicious contracts for the coming call: the ERC-1271 signer re-enters the
    ///      same settle; the token (when it is this channel's payee) re-enters settle as the payee.
    function _armReentry(bytes32 id, uint128 cum, bytes memory sig) internal {
        bytes memory again = abi.encodeCall(PaymentChannels.settle, (paramsOf[id], cum, sig));
        if (info[id].signer == address(evilSigner)) evilSigner.arm(address(channels), again);
        if (info[id].payee == address(evilToken)) evilToken.arm(address(channels), again);
        else evilToken.arm(address(channels), abi.encodeCall(PaymentChannels.claimEarnings, (address(evilToken))));
    }

    function _credits(bytes32 id) internal view returns (uint256 payeeBal, uint256 pubBal) {
        Info storage c = info[id];
        payeeBal = channels.earnings(c.token, c.payee);
        pubBal = c.publisher == address(0) ? 0 : channels.earnings(c.token, c.publisher);
    }

    /// @dev All-or-nothing and exact split of one settlement, measured on the earnings balances.
    function _recordSettle(bytes32 id, uint128 cum, uint256 payeeBefore, uint256 pubBefore) internal {
        (uint256 payeeAfter, uint256 pubAfter) = _credits(id);
        uint128 old = ghostSettled[id];
        uint256 delta = cum - old;
        uint256 payeeGain = payeeAfter - payeeBefore;
        uint256 pubGain = pubAfter - pubBefore;
        uint16 bps = info[id].bps;
        uint256 expectedPub = uint256(cum) * bps / 10_000 - uint256(old) * bps / 10_000;
        if (payeeGain + pubGain != delta || pubGain != expectedPub) {
            _breach(partialSettlements++, "settlement credited other than its delta");
        }
        ghostSettled[id] = cum;
        ghostPayeeCredit[id] += payeeGain;
        ghostPublisherCredit[id] += pubGain;
    }

    function _recordFinal(bytes32 id) internal {
        uint256 refund = channels.refundOf(id);
        if (refund != ghostDeposit[id] - ghostSettled[id]) _breach(refundMismatches++, "refund inexact");
        ghostRefund[id] = refund;
        ghostFinalized[id] = true;
    }

    function _breach(uint256, string memory what) internal {
        lastBreach = what;
    }

    // ================================================================ views for the invariants

    function idsLength() external view returns (uint256) {
        return ids.length;
    }

    function tokensLength() external view returns (uint256) {
        return tokens.length;
    }

    function accountsLength() external view returns (uint256) {
        return accounts.length;
    }

    function bpsOf(bytes32 id) external view returns (uint16) {
        return info[id].bps;
    }

    function paramsOfId(bytes32 id) external view returns (IPaymentChannels.ChannelParams memory) {
        return paramsOf[id];
    }

    function selectors() external pure returns (bytes4[] memory s) {
        s = new bytes4[](14);
        s[0] = PaymentChannelsHandler.open.selector;
        s[1] = PaymentChannelsHandler.topUp.selector;
        s[2] = PaymentChannelsHandler.settle.selector;
        s[3] = PaymentChannelsHandler.close.selector;
        s[4] = PaymentChannelsHandler.requestClose.selector;
        s[5] = PaymentChannelsHandler.withdraw.selector;
        s[6] = PaymentChannelsHandler.claim.selector;
        s[7] = PaymentChannelsHandler.warp.selector;
        s[8] = PaymentChannelsHandler.settleForged.selector;
        s[9] = PaymentChannelsHandler.unauthorized.selector;
        s[10] = PaymentChannelsHandler.pokeFinalized.selector;
        s[11] = PaymentChannelsHandler.wrongParams.selector;
        s[12] = PaymentChannelsHandler.claimRefund.selector;
        s[13] = PaymentChannelsHandler.settleBatch.selector;
    }
}

/// @dev The twelve invariants of references/payments.md part (b).
contract PaymentChannelsInvariants is TestBase {
    PaymentChannelsHandler internal handler;
    PaymentChannels internal channels;

    function setUp() public {
        vm.warp(1_700_000_000);
        handler = new PaymentChannelsHandler();
        channels = handler.channels();
        targetContract(address(handler));
        targetSelector(FuzzSelector({addr: address(handler), selectors: handler.selectors()}));
    }

    /// (1) Conservation: per token, the escrow holds exactly the open channels' unsettled
    ///     deposits, the finalized channels' unclaimed refunds and every unclaimed balance, and
    ///     exactly what came in minus what went out (settleBatch included: settled = sum of vouchers).
    function invariant_escrowHoldsExactlyOutstandingPlusEarnings() public view {
        for (uint256 t; t < handler.tokensLength(); t++) {
            address tok = handler.tokens(t);
            uint256 outstanding;
            for (uint256 i; i < handler.idsLength(); i++) {
                bytes32 id = handler.ids(i);
                IPaymentChannels.ChannelState memory ch = channels.getChannel(id);
                if (handler.paramsOfId(id).token != tok) continue;
                // An open channel's unsettled deposit, or a finalized one's unclaimed refund.
                if (!ch.finalized) outstanding += ch.deposit - ch.settled;
                else if (!ch.refunded) outstanding += channels.refundOf(id);
            }
            uint256 owed;
            for (uint256 a; a < handler.accountsLength(); a++) {
                owed += channels.earnings(tok, handler.accounts(a));
            }
            uint256 held = tok == address(0) ? address(channels).balance : TestToken(tok).balanceOf(address(channels));
            vm.assertEq(held, outstanding + owed, "escrow != outstanding + earnings");
            vm.assertEq(held, handler.ghostIn(tok) - handler.ghostOut(tok), "escrow != in - out");
        }
    }

    /// (2) Monotonicity: settled only moves up through accepted vouchers and never passes the deposit.
    function invariant_settledIsMonotonicAndWithinDeposit() public view {
        for (uint256 i; i < handler.idsLength(); i++) {
            bytes32 id = handler.ids(i);
            IPaymentChannels.ChannelState memory ch = channels.getChannel(id);
            vm.assertLe(ch.settled, ch.deposit, "settled > deposit");
            vm.assertEq(ch.settled, handler.ghostSettled(id), "settled moved outside an accepted voucher");
            vm.assertEq(ch.deposit, handler.ghostDeposit(id), "deposit moved outside a top-up");
        }
    }

    /// (3) Exact split: per channel, payee + publisher credits == settled and the publisher got
    ///     exactly floor(settled * bps / 1e4).
    function invariant_splitIsExact() public view {
        for (uint256 i; i < handler.idsLength(); i++) {
            bytes32 id = handler.ids(i);
            uint256 settled = channels.getChannel(id).settled;
            vm.assertEq(handler.ghostPayeeCredit(id) + handler.ghostPublisherCredit(id), settled, "split != settled");
            vm.assertEq(handler.ghostPublisherCredit(id), settled * handler.bpsOf(id) / 10_000, "royalty inexact");
        }
    }

    /// (4) Exact refund: at finalization the payer was credited exactly deposit - settled.
    function invariant_refundIsExact() public view {
        vm.assertEq(handler.refundMismatches(), 0, "refund inexact");
        for (uint256 i; i < handler.idsLength(); i++) {
            bytes32 id = handler.ids(i);
            IPaymentChannels.ChannelState memory ch = channels.getChannel(id);
            if (ch.finalized) vm.assertEq(handler.ghostRefund(id), ch.deposit - ch.settled, "refund inexact");
        }
    }

    /// (5) Finality: finalized is sticky, matches the model, and nothing mutates or reopens it.
    function invariant_finalizedIsStickyAndFrozen() public view {
        vm.assertEq(handler.finalizedMutated(), 0, "finalized channel mutated or reopened");
        for (uint256 i; i < handler.idsLength(); i++) {
            bytes32 id = handler.ids(i);
            vm.assertEq(channels.getChannel(id).finalized, handler.ghostFinalized(id));
        }
    }

    /// (6) Replay: vouchers of another channel, chain id or contract, and stale vouchers, never pay.
    function invariant_replayedVouchersNeverPay() public view {
        vm.assertEq(handler.replayAccepted(), 0, "replayed voucher accepted");
    }

    /// (7) Malleability: high-s and 64-byte twins of valid signatures are refused.
    function invariant_malleatedSignaturesRejected() public view {
        vm.assertEq(handler.malleatedAccepted(), 0, "malleated signature accepted");
    }

    /// (8) Access control: only the payee settles/closes, only the payer tops up, requests close
    ///     or withdraws (and only when due); closeRequestedAt follows the payer's calls alone; terms
    ///     with any field wrong (naming the caller in any role) address no channel.
    function invariant_onlyTheRightPartyActs() public view {
        vm.assertEq(handler.unauthorizedAccepted(), 0, "unauthorized call accepted");
        vm.assertEq(handler.wrongParamsAccepted(), 0, "call with a wrong term did other than ChannelNotFound");
        for (uint256 i; i < handler.idsLength(); i++) {
            bytes32 id = handler.ids(i);
            vm.assertEq(channels.getChannel(id).closeRequestedAt, handler.ghostCloseRequestedAt(id));
        }
    }

    /// (9) Payee liveness: every valid voucher above settled is accepted while the channel is open.
    function invariant_payeeCanAlwaysSettleValidVouchers() public view {
        vm.assertEq(handler.payeeLivenessFailures(), 0, "valid settle or close refused");
    }

    /// (10) Payer liveness: a due withdraw succeeds even with reverting payees/publishers/payers;
    ///      claims fail only for ETH to a recipient that rejects it.
    function invariant_payerCanAlwaysWithdrawAfterGrace() public view {
        vm.assertEq(handler.payerLivenessFailures(), 0, "payer call failed");
        vm.assertEq(handler.claimMismatches(), 0, "claim misbehaved");
    }

    /// (11) All-or-nothing: every accepted voucher credited exactly its delta.
    function invariant_settlementIsAllOrNothing() public view {
        vm.assertEq(handler.partialSettlements(), 0, "partial settlement");
    }

    /// (12) Reentrancy: the malicious token never re-entered successfully (the malicious ERC-1271
    ///      signer's attempts are covered by (1)-(3): nothing settled twice).
    function invariant_reentrancyNeverSucceeds() public view {
        vm.assertEq(handler.evilToken().reentrySuccesses(), 0, "re-entry succeeded");
    }
}
