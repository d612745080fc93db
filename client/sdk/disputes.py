"""The payer's SLA remedies, driven from the spend store: claims for receipts that break a node's published
terms, and no-response disputes (Proof of Response) for accepted requests whose receipt never came.

    disputes = client.disputes            # or Disputes(w3, deployment, wallet, SpendStore(path))
    disputes.open_due()                   # claim every breach; dispute every overdue acceptance
    disputes.finalize_due()               # collect the disputes the node left unanswered
    for row in disputes.list(): ...

Everything is sent from the channel's payer wallet: the court pays only the payer and refuses anyone else
(`client.sla`). Before disputing an acceptance, the node is asked for the receipt
(``GET {node_url}/v1/receipts?request_hash=``, signed by the payer: `client.access`): a client whose stream
broke would otherwise open a dispute the node wins with that receipt, and lose its bond. A refusal by the
court is recorded on its item and never stops a batch.
"""

from __future__ import annotations

import builtins  # `Disputes.list` shadows the builtin in the class body
import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import httpx
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.logs import DISCARD
from web3.types import TxReceipt

from dcml.client.chain.channel import ChannelBook, ChannelParams
from dcml.client.chain.contracts import contract
from dcml.client.chain.deployment import Deployment
from dcml.client.chain.sla import Broken, DisputeStatus, SLACourtClient, SLAError, Terms, broken_terms
from dcml.client.sdk.sla_terms import BROKEN_NAMES, TERMS_TTL_S, TermsCache, broken_names
from dcml.client.sdk.spend_store import BreachClaim, SpendStore, StoredAcceptance
from dcml.client.wire.access import auth_header, receipts_resource
from dcml.client.wire.hexutil import from_hex as _b32
from dcml.client.wire.hexutil import to_hex as _hex
from dcml.client.wire.receipts import ReceiptDomain, ReceiptError, SignedReceipt, recover_receipt_signer

log = logging.getLogger("dcml.disputes")

# Court errors that mean "not yet", not "no": the item stays due.
_NOT_YET = {"DeadlineNotPassed", "WindowOpen"}


@dataclass(frozen=True)
class DisputeRow:
    """One SLA remedy as `Disputes.list` shows it.

    kind ``breach``: status pending | claimed | refused; ``id`` is the receipt id.
    kind ``no_response``: status due (deadline passed, no receipt, not yet disputed) | received (the node
    served the receipt when asked: no dispute) | open | answered (the node posted its receipt on-chain: the
    bond is lost) | finalized | refused; ``id`` is the dispute id once opened, else the request hash.
    ``due`` says there is something to send now (claim, open or finalize).
    """

    kind: str
    id: str
    status: str
    due: bool
    node: str
    node_url: str
    channel_id: str
    request_hash: str
    expected: int | None  # compensation the terms promise (before the cap by the node's stake)
    amount: int | None  # compensation received
    tx: str | None
    reason: str | None
    broken: tuple[str, ...] = ()
    deadline: int | None = None  # no_response: the acceptance's deadline
    answer_by: int | None = None  # no_response: the node's last moment to answer

    def as_json(self) -> dict:
        out = dict(self.__dict__)
        out["broken"] = list(self.broken)
        for k in ("expected", "amount", "deadline", "answer_by"):
            out[k] = None if out[k] is None else str(out[k])  # every uint a decimal string (JSON numbers round)
        return out


def _tx_hash(tx: TxReceipt) -> str:
    return _hex(tx["transactionHash"])


class Disputes:
    """SLA claims and disputes of one payer wallet against one deployment's court; thread-safe.

    `domain` is what receipts are verified under (the court's by default); `tx_lock` serializes this
    wallet's transactions with any other sender of the same wallet in the process (nonces).
    """

    def __init__(self, w3: Web3, deployment: Deployment, wallet: LocalAccount, store: SpendStore, *,
                 domain: ReceiptDomain | None = None, fetch_receipts: bool = True, http_timeout: float = 10.0,
                 tx_lock: AbstractContextManager | None = None, terms_ttl_s: float = TERMS_TTL_S,
                 answering: Callable[[str], bool] | None = None) -> None:
        if not deployment.sla_court:
            raise ValueError("the deployment names no sla_court: there is no court to claim from (use a deployment "
                             "file written by a devnet or deployer that includes SLACourt)")
        self.w3 = w3
        self.deployment = deployment
        self.wallet = wallet
        self.store = store
        self.court = SLACourtClient(w3, deployment.sla_court)
        self.domain = domain or ReceiptDomain(deployment.chain_id, deployment.sla_court)
        self.fetch_receipts = fetch_receipts
        self.http_timeout = http_timeout
        self.terms_ttl_s = terms_ttl_s
        self._book = ChannelBook(contract(w3, "PaymentChannels", deployment.payment_channels), deployment)
        self._tx_lock = tx_lock if tx_lock is not None else nullcontext()
        # Requests whose answer is still arriving in this process: past its deadline or not, the node will
        # answer a dispute with that receipt and take the bond, so they are not disputed while it streams.
        self._answering = answering or (lambda request_hash: False)
        self._batch = threading.Lock()  # one open/finalize pass at a time (the auto thread and a caller)
        self._terms = TermsCache(self.court, terms_ttl_s)

    def chain_now(self) -> int:
        """The latest block's timestamp: the court compares deadlines with block.timestamp, not our clock."""
        return int(self.w3.eth.get_block("latest")["timestamp"])

    # -- checking receipts against published terms -----------------------------------------------

    def terms_at(self, node: str, model_id: str, at: int) -> Terms | None:
        """The node's terms for `model_id` in force at `at` (None if it published none), from a short cache."""
        return self._terms.at(node, model_id, at)

    def check_receipt(self, signed: SignedReceipt, *, node_address: str, node_url: str) -> Broken:
        """Check a verified receipt of `node_address` against its terms in force at the receipt's acceptedAt.
        A breach is recorded once: a pending claim with the compensation the terms promise, and a violation
        per broken term (reason ``sla_ttft`` / ``sla_rate`` / ``sla_duration``, evidence the signed receipt)."""
        r = signed.receipt
        terms = self.terms_at(node_address, r.model_id, r.accepted_at)
        broken = Broken.NONE if terms is None else broken_terms(terms, r)
        if not broken:
            return broken
        assert terms is not None
        expected = terms.compensation(r)
        if self.store.record_breach_claim(signed, node_address=node_address, node_url=node_url, broken=int(broken),
                                          expected=expected):
            evidence = signed.model_dump_json(by_alias=True)
            limits = {Broken.TTFT: f"time to first token {r.ttft_ms} ms > {terms.max_ttft_ms} ms",
                      Broken.RATE: f"{r.output_tokens} tokens in {r.duration_ms} ms (first after {r.ttft_ms} ms) "
                                   f"< {terms.min_tokens_per_sec} tokens/s",
                      Broken.DURATION: f"duration {r.duration_ms} ms > {terms.max_duration_ms} ms"}
            for bit, name in BROKEN_NAMES.items():
                if broken & bit:
                    self.store.record_violation(
                        node_url=node_url, reason=f"sla_{name}", channel_id=r.channel_id, receipt_id=r.receipt_id,
                        evidence=evidence, message=f"the node's receipt breaks its published terms: {limits[bit]}; "
                        f"`dcml disputes open` claims {expected} (stake token units) from its stake")
            log.warning("receipt %s of node %s breaks its terms (%s): claim of %d recorded", r.receipt_id,
                        node_address, ", ".join(broken_names(broken)), expected)
        return broken

    # -- listing ------------------------------------------------------------------------------------

    def list(self, now: int | None = None) -> list[DisputeRow]:
        """Every breach claim, and every acceptance that is overdue or disputed; `due` marks what to send now."""
        now = self.chain_now() if now is None else now
        rows = [self._claim_row(c) for c in self.store.breach_claims()]
        disputed = self.store.disputed_acceptances()
        rows += [self._acceptance_row(a, now) for a in sorted([*self.store.overdue_acceptances(now), *disputed],
                                                               key=lambda a: a.id)]
        return rows

    def _claim_row(self, c: BreachClaim) -> DisputeRow:
        return DisputeRow("breach", c.receipt_id, c.status, c.status == "pending", c.node_address, c.node_url,
                          c.channel_id, c.request_hash, c.expected, c.amount, c.tx, c.reason,
                          tuple(broken_names(c.broken)))

    def _acceptance_row(self, a: StoredAcceptance, now: int) -> DisputeRow:
        status = a.dispute_status or ("received" if a.receipt_id else "due" if a.deadline < now else "waiting")
        due = status == "due" or (status == "open" and a.answer_by is not None and now > a.answer_by)
        return DisputeRow("no_response", a.dispute_id or a.request_hash, status, due, a.node_address, a.node_url,
                          a.channel_id, a.request_hash, a.expected, a.amount, a.tx, a.reason, (), a.deadline,
                          a.answer_by)

    # -- opening ------------------------------------------------------------------------------------

    def open_due(self, now: int | None = None, *, node: str | None = None, request_hash: str | None = None,
                 receipt_id: str | None = None) -> builtins.list[DisputeRow]:
        """Claim every pending breach and dispute every acceptance past its deadline without a receipt
        (unless the node serves the receipt now). `node` (address or URL), `request_hash` and `receipt_id`
        narrow the batch. Returns the items acted on, as they stand afterwards."""
        with self._batch:
            now = self.chain_now() if now is None else now
            done: builtins.list[DisputeRow] = []
            if receipt_id is None:
                for a in self.store.overdue_acceptances(now):
                    if (_matches(a.node_address, a.node_url, a.request_hash, node, request_hash)
                            and not self._answering(a.request_hash)):
                        done.append(self._open(a, now))
            for c in self.store.breach_claims("pending"):
                if (_matches(c.node_address, c.node_url, c.request_hash, node, request_hash)
                        and (receipt_id is None or c.receipt_id == receipt_id.lower())):
                    done.append(self.claim(c.receipt_id))
            return done

    def claim(self, receipt_id: str) -> DisputeRow:
        """Send the breach claim for one recorded receipt, whatever its status (`open_due` sends the pending
        ones). A refusal is recorded; a claim the court already paid to this wallet stays ``claimed``."""
        c = self.store.breach_claim(receipt_id)
        if c is None:
            raise KeyError(f"no breach claim for receipt {receipt_id} in {self.store.path}; `dcml disputes list`")
        try:
            params = self._payer_params(c.channel_id)
            with self._tx_lock:
                tx = self.court.claim_breach(self.wallet, c.node_address, params, c.signed)
        except SLAError as exc:
            self._claim_refused(c, exc)
        except Exception as exc:  # a failed read or send must not stop the batch: the claim stays as it was
            log.warning("breach claim for receipt %s not sent: %s", c.receipt_id, exc)
            self.store.update_breach_claim(c.receipt_id, reason=f"not sent: {exc}")
        else:
            events = self.court.contract.events.BreachCompensated().process_receipt(tx, errors=DISCARD)
            amount = sum(e["args"]["amount"] for e in events)
            self.store.update_breach_claim(c.receipt_id, status="claimed", amount=amount, tx=_tx_hash(tx),
                                           reason=None)
            log.info("breach claim for receipt %s paid %d", c.receipt_id, amount)
        return self._claim_row(self.store.breach_claim(c.receipt_id) or c)

    def _claim_refused(self, c: BreachClaim, exc: SLAError) -> None:
        if exc.reason == "AlreadyClaimed":
            # Paid once per (node, request): to this wallet earlier (then it is ours, e.g. a crash before we
            # recorded it), or to another payer of the same request.
            ours = [e for e in self._events("BreachCompensated", node=c.node_address, requestHash=c.request_hash)
                    if e["args"]["disputer"].lower() == self.wallet.address.lower()]
            if ours:
                fields = {} if c.status == "claimed" else {"amount": ours[0]["args"]["amount"],
                                                          "tx": _hex(ours[0]["transactionHash"])}
                self.store.update_breach_claim(c.receipt_id, status="claimed", reason="AlreadyClaimed", **fields)
                return
        final = exc.reason in self.court.error_names and exc.reason not in _NOT_YET
        status = "refused" if final and c.status != "claimed" else c.status
        self.store.update_breach_claim(c.receipt_id, status=status, reason=exc.reason)
        log.warning("breach claim for receipt %s refused: %s", c.receipt_id, exc.reason)

    def _open(self, a: StoredAcceptance, now: int) -> DisputeRow:
        fetched = self.fetch_receipt(a) if self.fetch_receipts else None
        if fetched is not None:
            self.store.record_receipt(fetched, node_url=a.node_url, request_body=None)
            self.store.mark_answered(a.node_address, a.request_hash, fetched.receipt.receipt_id)
            log.info("node %s served the receipt for %s: no dispute", a.node_address, a.request_hash)
            try:
                self.check_receipt(fetched, node_address=a.node_address, node_url=a.node_url)
            except Exception as exc:
                log.warning("could not check receipt %s against the terms: %s", fetched.receipt.receipt_id, exc)
            return self._acceptance_row(self.store.acceptance(a.id) or a, now)
        try:
            params = self._payer_params(a.channel_id)
            with self._tx_lock:
                dispute_id, tx = self.court.open_no_response_tx(self.wallet, a.node_address, a.model_id, params,
                                                                a.signed)
        except SLAError as exc:
            self._open_refused(a, exc)
        except Exception as exc:
            log.warning("no-response dispute for %s not opened: %s", a.request_hash, exc)
            self.store.update_acceptance(a.id, reason=f"not sent: {exc}")
        else:
            d = self.court.dispute(dispute_id)
            self.store.update_acceptance(a.id, dispute_id=_hex(dispute_id), dispute_status="open",
                                         answer_by=d.answer_by, expected=d.compensation, tx=_tx_hash(tx), reason=None)
            log.info("no-response dispute %s opened against %s (answer by %d)", _hex(dispute_id), a.node_address,
                     d.answer_by)
        return self._acceptance_row(self.store.acceptance(a.id) or a, now)

    def _open_refused(self, a: StoredAcceptance, exc: SLAError) -> None:
        if exc.reason == "DisputeExists":
            dispute_id = self.court.dispute_id(a.node_address, a.request_hash)
            d = self.court.dispute(dispute_id)
            if d.disputer.lower() == self.wallet.address.lower():  # ours: opened before we could record it
                self.store.update_acceptance(a.id, dispute_id=_hex(dispute_id), dispute_status=d.status.name.lower(),
                                             answer_by=d.answer_by, expected=d.compensation, reason="DisputeExists")
                return
        if exc.reason in self.court.error_names and exc.reason not in _NOT_YET:
            self.store.update_acceptance(a.id, dispute_status="refused", reason=exc.reason)
        else:
            self.store.update_acceptance(a.id, reason=exc.reason)
        log.warning("no-response dispute for %s refused: %s", a.request_hash, exc.reason)

    def fetch_receipt(self, a: StoredAcceptance) -> SignedReceipt | None:
        """The node's receipt for an accepted request, if it serves one that would answer a dispute: signed by
        the node under our domain, for the same request and channel."""
        url = f"{a.node_url.rstrip('/')}/v1/receipts"
        # Only the payer may look a receipt up by request hash (client.access): the query is signed.
        auth = auth_header(self.wallet, a.node_address, receipts_resource(a.request_hash, a.channel_id))
        try:
            response = httpx.get(url, params={"request_hash": a.request_hash, "channel_id": a.channel_id},
                                 headers=auth, timeout=self.http_timeout)
        except httpx.HTTPError as exc:
            log.info("node %s unreachable for the receipt of %s: %s", a.node_url, a.request_hash, exc)
            return None
        if response.status_code != 200:
            return None
        try:
            signed = SignedReceipt.from_json(response.content)
            r = signed.receipt
            signer = recover_receipt_signer(r, signed.signature, self.domain)
        except (ReceiptError, ValueError) as exc:
            self.store.record_violation(node_url=a.node_url, reason="malformed", channel_id=a.channel_id,
                                        message=f"/v1/receipts served no valid receipt for {a.request_hash}: {exc}")
            return None
        problem = (f"signed by {signer}, not by the node" if signer.lower() != a.node_address.lower()
                   else "for another request or channel" if (r.request_hash, r.channel_id) != (a.request_hash,
                                                                                               a.channel_id)
                   else None)
        if problem:
            self.store.record_violation(node_url=a.node_url, reason="wrong_receipt", channel_id=a.channel_id,
                                        receipt_id=r.receipt_id, evidence=signed.model_dump_json(by_alias=True),
                                        message=f"the receipt served for {a.request_hash} is {problem}")
            return None
        return signed

    # -- finalizing ---------------------------------------------------------------------------------

    def finalize_due(self, now: int | None = None, *, dispute_id: str | None = None) -> builtins.list[DisputeRow]:
        """For each open dispute (or only `dispute_id`): record an answer (the bond is lost) or a finalization
        by someone else, or finalize it once its window closed. Returns the items that changed."""
        with self._batch:
            now = self.chain_now() if now is None else now
            open_ = self.store.disputed_acceptances("open")
            if dispute_id is not None:
                open_ = [a for a in open_ if a.dispute_id == dispute_id.lower()]
                if not open_:
                    raise KeyError(f"no open dispute {dispute_id} in {self.store.path}; `dcml disputes list`")
            return [row for a in open_ if (row := self._finalize(a, now)) is not None]

    def _finalize(self, a: StoredAcceptance, now: int) -> DisputeRow | None:
        assert a.dispute_id is not None
        try:
            d = self.court.dispute(_b32(a.dispute_id))
            if d.status == DisputeStatus.OPEN:
                if now <= d.answer_by:
                    return None
                with self._tx_lock:
                    tx = self.court.finalize(self.wallet, _b32(a.dispute_id))
                events = self.court.contract.events.DisputeFinalized().process_receipt(tx, errors=DISCARD)
                self.store.update_acceptance(a.id, dispute_status="finalized", tx=_tx_hash(tx), reason=None,
                                             amount=sum(e["args"]["amount"] for e in events))
            elif d.status == DisputeStatus.ANSWERED:
                self.store.update_acceptance(a.id, dispute_status="answered",
                                             reason="the node posted its receipt in time: the bond went to it")
            elif d.status == DisputeStatus.FINALIZED:  # by someone else: anyone may
                logs = self._events("DisputeFinalized", disputeId=_b32(a.dispute_id))
                self.store.update_acceptance(a.id, dispute_status="finalized",
                                             amount=sum(e["args"]["amount"] for e in logs),
                                             tx=_hex(logs[0]["transactionHash"]) if logs else None)
        except SLAError as exc:
            if exc.reason in _NOT_YET:
                return None
            self.store.update_acceptance(a.id, reason=exc.reason)
            log.warning("finalizing dispute %s refused: %s", a.dispute_id, exc.reason)
        except Exception as exc:
            log.warning("dispute %s not finalized: %s", a.dispute_id, exc)
            self.store.update_acceptance(a.id, reason=f"not sent: {exc}")
        return self._acceptance_row(self.store.acceptance(a.id) or a, now)

    # -- chain helpers ------------------------------------------------------------------------------

    def _payer_params(self, channel_id: str) -> ChannelParams:
        """The channel's terms (from its ChannelOpened event); the court pays and accepts only their payer."""
        params = self._book.params(_b32(channel_id))
        if params.payer.lower() != self.wallet.address.lower():
            raise SLAError("claim", f"NotPayer: channel {channel_id} is paid by {params.payer}, not by this wallet "
                           f"{self.wallet.address}; run with the payer's key")
        return params

    def _events(self, name: str, **filters: object) -> builtins.list[Any]:
        event = getattr(self.court.contract.events, name)()
        return list(event.get_logs(from_block=self.deployment.start_block, argument_filters=filters))


def _matches(node_address: str, node_url: str, request_hash: str, node: str | None, wanted: str | None) -> bool:
    if node is not None and node.lower() not in (node_address.lower(), node_url.rstrip("/").lower()):
        return False
    return wanted is None or request_hash == wanted.lower()


class AutoDisputer:
    """A daemon thread that every `interval_s` opens due disputes and finalizes unanswered ones."""

    def __init__(self, disputes: Disputes, interval_s: float) -> None:
        self.disputes, self.interval_s = disputes, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dcml-disputes", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.disputes.open_due()
                self.disputes.finalize_due()
            except Exception:
                log.exception("automatic disputes failed; retrying in %s s", self.interval_s)
            self._stop.wait(self.interval_s)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout)
