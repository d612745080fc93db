"""Build the tiny demo model shipped in models/demo: a real Llama-architecture checkpoint, trained on CPU.

    python -m dcml.node.engine.demo_model --out models/demo [--train-seconds 300]

It exists so the node, its tests and its benchmarks run the same loading and inference code a real
checkpoint uses (AutoModelForCausalLM / AutoTokenizer from a directory) without any download.
The text is in node/engine/corpus/ (public domain, see its README). The run is seeded; with a time
budget the exact step count depends on the machine, so the committed model records what it did in
models/demo/training.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS_DIR = Path(__file__).parent / "corpus"
EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS]
# Mirrors the corpus's own "SPEAKER:\nspeech\n\n" layout so chat prompts look like the training text.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}:\n{{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}"
)
EOS_EVERY = 16  # an end-of-text marker after every 16th speech: the model learns to stop now and then,
# but rarely enough that greedy decoding runs on past a speech boundary


def load_corpus() -> str:
    # The corpus files are consecutive slices of one text: join them without separators.
    return "".join(p.read_text(encoding="utf-8") for p in sorted(CORPUS_DIR.glob("*.txt")))


def with_eos_markers(text: str) -> str:
    speeches = text.split("\n\n")
    out = []
    for i, s in enumerate(speeches):
        out.append(s + ("\n\n" + EOS if (i + 1) % EOS_EVERY == 0 else ""))
    return "\n\n".join(out)


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def build_config(vocab_size: int, eos_id: int) -> LlamaConfig:
    return LlamaConfig(  # type: ignore[call-arg]  # rope_theta is a documented field the stubs lack
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=640,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def train(model: LlamaForCausalLM, ids: torch.Tensor, *, seconds: float, max_steps: int, seq_len: int,
          batch_size: int, lr: float, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = 30
    est_steps = max_steps  # cosine horizon; the time budget may stop earlier
    model.train()
    start = time.monotonic()
    step, loss_ema = 0, None
    while step < max_steps and time.monotonic() - start < seconds:
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=gen)
        batch = torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])
        frac = min(1.0, (time.monotonic() - start) / seconds)
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        out = model(input_ids=batch, labels=batch)  # the model shifts labels itself
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss = out.loss.item()
        loss_ema = loss if loss_ema is None else 0.95 * loss_ema + 0.05 * loss
        step += 1
        if step % 25 == 0:
            print(f"step {step:5d}  loss {loss_ema:.3f}  {time.monotonic() - start:6.1f}s", flush=True)
    model.eval()
    return {"steps": step, "seconds": round(time.monotonic() - start, 1),
            "final_loss_ema": round(float(loss_ema or 0.0), 4), "tokens_seen": step * batch_size * seq_len,
            "horizon_steps": est_steps}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/demo")
    ap.add_argument("--train-seconds", type=float, default=300.0)
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    raw = load_corpus()
    text = with_eos_markers(raw)
    tok = train_tokenizer(raw, args.vocab_size)
    eos_id = tok.token_to_id(EOS)
    assert eos_id is not None, "the trained tokenizer has no EOS token"
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    print(f"corpus {len(raw)} chars -> {len(ids)} tokens, vocab {tok.get_vocab_size()}", flush=True)

    config = build_config(tok.get_vocab_size(), eos_id)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model params {n_params / 1e6:.2f}M", flush=True)
    stats = train(model, ids, seconds=args.train_seconds, max_steps=args.max_steps, seq_len=args.seq_len,
                  batch_size=args.batch_size, lr=args.lr, seed=args.seed)

    model.generation_config = GenerationConfig(
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, do_sample=True, temperature=0.8, top_p=0.95
    )
    model.save_pretrained(out, safe_serialization=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=None,
        chat_template=CHAT_TEMPLATE, model_max_length=config.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    # Keep the template inside tokenizer_config.json (one file a reader can inspect) rather than a .jinja beside it.
    fast.save_pretrained(out, save_jinja_files=False)
    stats.update(params=n_params, corpus_chars=len(raw), corpus_tokens=len(ids), seed=args.seed,
                 threads=args.threads, train_seconds_budget=args.train_seconds)
    (out / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
