"""Added latency of end-to-end sealing (issue 19): the same daemon (real uvicorn, separate process, paced
SyntheticEngine) answering the same requests in clear and sealed, side by side in one run.

Sealed includes everything the SDK's transport does per request: HPKE seal (ML-KEM-768+X25519) of the body,
the node's open, replay check and per-response key, AES-GCM per SSE chunk on both sides, sealed receipt.

    .venv/bin/python bench/bench_sealing.py --streams 64 --tokens 64 --rate 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time

import httpx
from _common import MODEL, start_server

from dcml.client.attestation.verify import AttestationDocument, Policy, verify_attestation
from dcml.client.wire.e2e import StreamOpener, open_response, seal_request

PATH = "/v1/chat/completions"


def body(i: int, tokens: int, stream: bool) -> bytes:
    req = {"model": MODEL, "messages": [{"role": "user", "content": f"a private question number {i}"}],
           "max_tokens": tokens, "seed": i}
    if stream:
        req |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(req).encode()


async def one(http: httpx.AsyncClient, key: bytes | None, plain: bytes, stream: bool) -> tuple[float, float]:
    """(time to first content, time to the end), seconds, as the caller sees them (sealing included)."""
    t0 = time.perf_counter()
    sealed = seal_request(plain, key, path=PATH) if key else None
    content, headers = (sealed.body, sealed.headers) if sealed else (plain, {"Content-Type": "application/json"})
    if not stream:
        r = await http.post(PATH, content=content, headers=headers)
        data = open_response(sealed.key_for(r.headers), r.content) if sealed else r.content
        assert r.status_code == 200 and json.loads(data)["choices"]
        t = time.perf_counter() - t0
        return t, t
    first = None
    async with http.stream("POST", PATH, content=content, headers=headers) as r:
        assert r.status_code == 200
        opener = StreamOpener(sealed.key_for(r.headers)) if sealed else None
        event = None
        async for line in r.aiter_lines():
            if line.startswith("event:"):
                event = line
                continue
            if not line.startswith("data: "):
                event = None if not line else event
                continue
            if event is not None:  # the receipt (sealed or not): verified by the SDK, not timed here
                continue
            payload = line[6:].encode()
            if opener is not None:
                payload = opener.open(payload)
            if first is None and b'"content":"' in payload and b'"content":""' not in payload:
                first = time.perf_counter() - t0
    return first or 0.0, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return 1000 * xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def scenario(url: str, key: bytes | None, streams: int, tokens: int, repeat: int) -> dict[str, float]:
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(*(one(http, key, body(i, 4, True), True) for i in range(streams)))  # warm up
        singles = [await one(http, key, body(i, tokens, False), False) for i in range(repeat)]
        single_stream = [await one(http, key, body(i, tokens, True), True) for i in range(repeat)]
        t0 = time.perf_counter()
        many = await asyncio.gather(*(one(http, key, body(i, tokens, True), True) for i in range(streams)))
        wall = time.perf_counter() - t0
    return {
        "one request p50 ms": pct([t for t, _ in singles], 0.5),
        "one stream TTFT p50 ms": pct([f for f, _ in single_stream], 0.5),
        "one stream total p50 ms": pct([t for _, t in single_stream], 0.5),
        f"{streams} streams TTFT p50 ms": pct([f for f, _ in many], 0.5),
        f"{streams} streams TTFT p99 ms": pct([f for f, _ in many], 0.99),
        f"{streams} streams total p50 ms": pct([t for _, t in many], 0.5),
        f"{streams} streams tokens/s": streams * tokens / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rate", type=float, default=50.0, help="tokens/s per stream; 0 = as fast as possible")
    ap.add_argument("--repeat", type=int, default=10, help="sequential single requests per side and round")
    ap.add_argument("--rounds", type=int, default=3, help="clear/sealed rounds, interleaved; medians reported")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        proc, url = start_server(args.rate, data_dir)
        try:
            nonce = os.urandom(32)
            doc = AttestationDocument.model_validate(httpx.get(url + "/v1/attestation",
                                                               params={"nonce": nonce.hex()}).json())
            key = verify_attestation(doc, nonce=nonce, policy=Policy(), allow_simulated=True).hpke_public_key
            # interleaved rounds (a warm-up pair first), so load on a shared machine hits both sides alike
            runs: dict[str, list[dict[str, float]]] = {"clear": [], "sealed": []}
            for r in range(args.rounds + 1):
                for side, k in (("clear", None), ("sealed", key)) if r % 2 else (("sealed", key), ("clear", None)):
                    result = asyncio.run(scenario(url, k, args.streams, args.tokens, args.repeat))
                    if r:
                        runs[side].append(result)
        finally:
            proc.terminate()
            proc.wait(30)
    rate = f"{args.rate:g} tok/s/stream" if args.rate else "unpaced"
    print(f"\nsealing vs clear: {args.tokens} tokens per answer, engine {rate}, cpus={os.cpu_count()}")
    clear = {k: statistics.median(r[k] for r in runs["clear"]) for k in runs["clear"][0]}
    sealed = {k: statistics.median(r[k] for r in runs["sealed"]) for k in runs["sealed"][0]}
    print(f"{'':34}{'clear':>10}{'sealed':>10}{'added':>10}")
    for name in clear:
        print(f"{name:34}{clear[name]:10.2f}{sealed[name]:10.2f}{sealed[name] - clear[name]:10.2f}")
    print(f"(medians over {args.rounds} interleaved rounds; single-request rows: p50 of {args.repeat} sequential "
          "requests per round)")


if __name__ == "__main__":
    main()
