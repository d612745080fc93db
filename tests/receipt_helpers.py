"""A receipt with every field set, signed by a throwaway node key: for the receipt and receipt-store tests."""

from __future__ import annotations

import os

from eth_account import Account

from dcml.client.wire.receipts import Receipt, hex32, model_id_for, request_hash, response_hash

NODE_KEY = Account.create()
REQUEST = b'{"model":"m","messages":[]}'
RESPONSE = b'{"id":"x","choices":[]}'


def make_receipt(**overrides) -> Receipt:
    fields = dict(receiptId=hex32(os.urandom(32)), requestHash=request_hash(REQUEST),
                  responseHash=response_hash(RESPONSE), modelId=model_id_for("m"), inputTokens=5,
                  outputTokens=7, cost=5 * 3 + 7 * 11, cumulativeSpent=1000, acceptedAt=1_700_000_000,
                  ttftMs=12, durationMs=340)
    return Receipt(**{**fields, **overrides})
