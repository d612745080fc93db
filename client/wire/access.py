"""Who may read what a node keeps about a payer: receipts by request hash and a channel's balances.

A receipt's ``requestHash`` is sha256 of the request body, so a node that answered "which receipt has this
hash?" to anyone would let a stranger test a guess of a (even sealed) prompt; a channel's accepted and spent
amounts are the payer's business too. So these reads carry ``X-DCML-Auth: <unix time>:<0x signature>``, an
EIP-191 signature by the channel's payer or its session key (the `authorizedSigner` named at `open`) over::

    dcml-auth-v1
    node: <the node's signing address, lowercase>
    resource: <what is read, see `receipts_resource` / `channel_resource`>
    time: <unix time>

The node accepts it within `MAX_SKEW_S` of its clock and only for that node and resource, and answers
"not found" alike whether nothing exists or the signer is not the channel's: a refusal reveals nothing. A
receipt is also readable by its id (`GET /v1/receipts/{id}`): a 256-bit random capability handed only to the
requester (inside the sealed receipt when the request was sealed).
"""

from __future__ import annotations

import time

from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from dcml.client.wire import eip712
from dcml.client.wire.hexutil import to_hex
from dcml.client.wire.keccak import keccak

AUTH_HEADER = "X-DCML-Auth"
MAX_SKEW_S = 300


def receipts_resource(request_hash: str, channel_id: str) -> str:
    return f"receipts?request_hash={request_hash.lower()}&channel_id={channel_id.lower()}"


def channel_resource(channel_id: str) -> str:
    return f"channel {channel_id.lower()}"


def _digest(node_address: str, resource: str, ts: int) -> bytes:
    """The EIP-191 (personal_sign) digest of the auth message."""
    m = encode_defunct(f"dcml-auth-v1\nnode: {node_address.lower()}\nresource: {resource}\ntime: {ts}".encode())
    return keccak(b"\x19" + m.version + m.header + m.body)


def auth_header(signer: LocalAccount, node_address: str, resource: str, *, now: float | None = None
                ) -> dict[str, str]:
    """The header that lets `signer` (a channel's payer or session key) read `resource` on that node."""
    ts = int(time.time() if now is None else now)
    return {AUTH_HEADER: f"{ts}:{to_hex(eip712.sign(_digest(node_address, resource, ts), signer))}"}


def recover_auth(value: str | None, node_address: str, resource: str, *, now: float | None = None,
                 max_skew_s: float = MAX_SKEW_S) -> str | None:
    """The address that signed `value` for this node and resource, or None (absent, malformed, stale, or a
    signature the one rule of `eip712.recover` refuses: wrong length, high s, bad v)."""
    if not value or len(value) > 200:
        return None
    ts_text, _, sig = value.partition(":")
    try:
        ts = int(ts_text)
        now = time.time() if now is None else now
        if abs(now - ts) > max_skew_s:
            return None
        return to_checksum_address(eip712.recover(_digest(node_address, resource, ts), sig))
    except ValueError:  # not a number, not hex, or eip712.SignatureError
        return None
