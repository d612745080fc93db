// A second language reads dcml's wire with nothing but fetch().json() and ethers:
// pays a request with an x402 v2 PaymentPayload (a voucher above 2**53 signed here), fetches the receipt,
// verifies its EIP-712 signature against the node's attested address, recomputes its hashes, and posts a
// further voucher the node accepts. Run by tests/test_js_wire.py with the channel it opened:
//   NODE_URL CHAIN_ID ESCROW SLA_COURT SESSION_KEY CHANNEL_ID EXPECTED_SIGNER MODEL
import { createHash, randomBytes } from "node:crypto";
import { Wallet, verifyTypedData, getAddress } from "ethers";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const node = env("NODE_URL");
const chainId = BigInt(env("CHAIN_ID"));
const session = new Wallet(env("SESSION_KEY"));
const channelId = env("CHANNEL_ID");
const expected = getAddress(env("EXPECTED_SIGNER"));
const check = (ok, what) => {
  if (!ok) throw new Error(`check failed: ${what}`);
};
const sha256 = (bytes) => "0x" + createHash("sha256").update(bytes).digest("hex");
const b64json = (value) => Buffer.from(JSON.stringify(value)).toString("base64");

// The EIP-712 definitions, as README "Signed objects" gives them.
const voucherDomain = { name: "PaymentChannels", version: "1", chainId, verifyingContract: env("ESCROW") };
const voucherTypes = { Voucher: [{ name: "channelId", type: "bytes32" }, { name: "cumulativeAmount", type: "uint128" }] };
const receiptDomain = { name: "dcml-receipts", version: "1", chainId, verifyingContract: env("SLA_COURT") };
const receiptTypes = {
  Receipt: [
    { name: "receiptId", type: "bytes32" }, { name: "requestHash", type: "bytes32" },
    { name: "responseHash", type: "bytes32" }, { name: "channelId", type: "bytes32" },
    { name: "modelId", type: "bytes32" }, { name: "inputTokens", type: "uint32" },
    { name: "outputTokens", type: "uint32" }, { name: "cost", type: "uint128" },
    { name: "cumulativeSpent", type: "uint128" }, { name: "acceptedAt", type: "uint64" },
    { name: "ttftMs", type: "uint32" }, { name: "durationMs", type: "uint32" },
  ],
};

async function voucher(cumulativeAmount) {
  const signature = await session.signTypedData(voucherDomain, voucherTypes, { channelId, cumulativeAmount });
  return { channelId, cumulativeAmount: cumulativeAmount.toString(), signature };
}

// 1. The attested signing address (the Python side verified the quote; here we check it is the same key).
const nonce = randomBytes(32).toString("hex");
const doc = await (await fetch(`${node}/v1/attestation?nonce=${nonce}`)).json();
check(getAddress(doc.signing_address) === expected, "attestation names the expected signing address");

// 2. The offer, then a paid request with a voucher above 2**53.
const body = Buffer.from(JSON.stringify({ model: env("MODEL"), prompt: "from javascript", max_tokens: 4 }));
const unpaid = await fetch(`${node}/v1/completions`, { method: "POST", body, headers: { "content-type": "application/json" } });
check(unpaid.status === 402, `unpaid request is 402 (got ${unpaid.status})`);
const required = JSON.parse(Buffer.from(unpaid.headers.get("payment-required"), "base64").toString());
check(required.x402Version === 2 && typeof required.accepts[0].amount === "string", "PaymentRequired v2 with amount");
const offer = required.accepts.find((a) => a.scheme === "channel");
const first = 2n ** 53n + 12345n;
const payment = { x402Version: 2, accepted: offer, payload: await voucher(first) };
const paid = await fetch(`${node}/v1/completions`, {
  method: "POST", body, headers: { "content-type": "application/json", "payment-signature": b64json(payment) },
});
const answer = Buffer.from(await paid.arrayBuffer());
check(paid.status === 200, `paid request is 200 (got ${paid.status}: ${answer})`);
const settlement = JSON.parse(Buffer.from(paid.headers.get("payment-response"), "base64").toString());
check(settlement.success === true && BigInt(settlement.extensions.channel.accepted) === first,
  "PAYMENT-RESPONSE holds the voucher's exact amount");

// 3. The receipt, with plain fetch().json(): every uint a decimal string, so nothing is rounded.
const signed = await (await fetch(`${node}/v1/receipts/${paid.headers.get("x-dcml-receipt-id")}`)).json();
const r = signed.receipt;
for (const k of ["inputTokens", "outputTokens", "cost", "cumulativeSpent", "acceptedAt", "ttftMs", "durationMs"]) {
  check(typeof r[k] === "string" && /^\d+$/.test(r[k]), `receipt.${k} is a decimal string`);
}
const recovered = verifyTypedData(receiptDomain, receiptTypes, r, signed.signature);
check(recovered === expected, `receipt signed by the attested key (recovered ${recovered})`);
check(r.requestHash === sha256(body), "requestHash = sha256 of the exact body sent");
check(r.responseHash === sha256(answer), "responseHash = sha256 of the exact body received");
check(r.channelId === channelId.toLowerCase(), "receipt names our channel");

// 4. A further voucher, far above 2**53, accepted by the vouchers endpoint.
const more = first + 10n ** 16n + 7n;
const posted = await fetch(`${node}/v1/payments/vouchers`, {
  method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(await voucher(more)),
});
const postedBody = await posted.json();
check(posted.status === 200, `voucher accepted (got ${posted.status}: ${JSON.stringify(postedBody)})`);
console.log(JSON.stringify({ ok: true, cost: r.cost, cumulativeSpent: r.cumulativeSpent, accepted: more.toString() }));
