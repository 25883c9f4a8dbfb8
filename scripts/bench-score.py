#!/usr/bin/env python3
"""Scoring throughput, rbon beside sentence-transformers and transformers, on the same folders
and texts: embeddings/s with all-MiniLM-L6-v2 (scripts/fetch-minilm.sh), and reward scores/s
with a random-weight Qwen2-shaped sequence-classification model made here (57 M parameters).

The texts are 512 synthetic responses of 20 to 200 words. MiniLM runs in f32, then with bf16
matrix products (rbon's `dtype: bf16`; sentence-transformers with the model in bf16). Both sides
batch: sentence-transformers with batch_size 32, transformers with right-padded batches of 16
sorted by length, rbon with its token budget (16 384 padded tokens).

The two sides take turns, a timed run each per round, so that both see the same minutes of a
shared machine (on a cloud VM, AMX and memory throughput drift by 2x from one minute to the
next); each side's best round is reported.

Needs: pip install torch transformers sentence-transformers.
Usage: python3 scripts/bench-score.py [--threads 2] [--texts 512] [--embeddings-only]
"""

import argparse
import json
import os
import random
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
# Rounds per comparison (each side's best counts): more for the quick embedding rows, where
# the machine's drift matters most.
EMBED_ROUNDS = 5
REWARD_ROUNDS = 3
WORDS = ("the quick brown fox jumps over a lazy dog while models learn to rank answers by how "
         "helpful honest and harmless they are in every case we test").split()


def texts(n):
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200))) for _ in range(n)]


def grouped(prompts, n):
    """`prompts` prompts of 100-300 words, each with `n` responses of 20-200 words."""
    rng = random.Random(1)
    out = []
    for _ in range(prompts):
        out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(100, 300))))
        out.extend(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200))) for _ in range(n))
    return out


def make_rm(path):
    import torch
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    if os.path.exists(os.path.join(path, "config.json")):
        return
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=2, num_labels=1, pad_token_id=2,
                      tie_word_embeddings=False)
    m = Qwen2ForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.05)
    m.save_pretrained(path)
    tok = os.path.join(ROOT, "data", "tokenizers", "tiny-bpe")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(tok, f), "rb") as a, open(os.path.join(path, f), "wb") as b:
            b.write(a.read())


def rbon(kind, model, path, threads):
    """One timed rbon run (the model loads first, untimed); texts per second."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    dtype = ["--dtype", "bf16"] if kind.endswith("-bf16") else []
    out = subprocess.run(["cargo", "run", "--quiet", "--release", "-p", "rbon", "--", "bench", "score",
                          kind.removesuffix("-bf16"), model, path, "--batch-tokens", "16384", *dtype],
                         cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["per_s"]


def st_embed(model, ts, threads, bf16=False):
    """sentence-transformers, loaded and warmed up; returns one timed run (texts per second)."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    # bf16 weights and activations: torch's CPU matmuls then run in bf16 (oneDNN, on AMX where
    # the CPU has it).
    kwargs = {"model_kwargs": {"dtype": torch.bfloat16}} if bf16 else {}
    m = SentenceTransformer(model, device="cpu", **kwargs)
    m.encode(ts[:8])

    def run():
        t = time.perf_counter()
        m.encode(ts, batch_size=32)
        return len(ts) / (time.perf_counter() - t)
    return run


def hf_reward(model, ts, threads, prompts=None):
    """transformers, loaded; returns one timed run (scores per second)."""
    import torch
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

    torch.set_num_threads(threads)
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(model, "tokenizer.json"), pad_token="<pad>")
    tok.padding_side = "right"
    m = AutoModelForSequenceClassification.from_pretrained(model, dtype=torch.float32).eval()
    if prompts is None:
        texts_ = ["Please answer the question.\n\n" + t for t in ts]
    else:
        texts_ = [p + "\n\n" + t for p, t in zip(prompts, ts)]
    order = sorted(range(len(texts_)), key=lambda i: len(texts_[i]))

    def run():
        t0 = time.perf_counter()
        with torch.no_grad():
            for s in range(0, len(order), 16):
                batch = [texts_[i] for i in order[s:s + 16]]
                enc = tok(batch, return_tensors="pt", padding=True)
                m(**enc)
        return len(ts) / (time.perf_counter() - t0)
    return run


def side_by_side(what, reference, ours, rounds):
    """Alternates a reference run and an rbon run `rounds` times; prints both bests."""
    ref = mine = 0.0
    for _ in range(rounds):
        ref = max(ref, reference())
        mine = max(mine, ours())
    print(f"{what:>28} | {ref:>12.1f} | {mine:>8.1f} | {mine / ref:.2f}x", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--minilm", default=os.path.join(ROOT, "data", "models", "all-minilm-l6-v2"))
    ap.add_argument("--rm", default="/tmp/rbon-bench-qwen2-rm-57m")
    ap.add_argument("--embeddings-only", action="store_true", help="skip the reward-model rows (minutes each)")
    args = ap.parse_args()
    ts = texts(args.texts)
    path = "/tmp/rbon-bench-texts.txt"
    with open(path, "w") as f:
        f.write("\n".join(ts) + "\n")
    make_rm(args.rm)
    print(f"{args.texts} texts of 20-200 words, {args.threads} threads")
    print(f"{'what':>28} | {'reference /s':>12} | {'rbon /s':>8} | speed-up")
    side_by_side("MiniLM embeddings", st_embed(args.minilm, ts, args.threads),
                 lambda: rbon("embed", args.minilm, path, args.threads), EMBED_ROUNDS)
    # `dtype: bf16`: rbon multiplies in bf16 on AMX (f32 elsewhere), sentence-transformers runs
    # the whole model in bf16.
    side_by_side("  ... bf16", st_embed(args.minilm, ts, args.threads, bf16=True),
                 lambda: rbon("embed-bf16", args.minilm, path, args.threads), EMBED_ROUNDS)
    if args.embeddings_only:
        return
    side_by_side("Qwen2-57M reward scores", hf_reward(args.rm, ts, args.threads),
                 lambda: rbon("reward", args.rm, path, args.threads), REWARD_ROUNDS)
    # The score stage's shape: N responses per prompt. transformers scores each (prompt,
    # response) text; rbon computes the shared prompt once per prompt.
    n = 16
    g = grouped(max(1, args.texts // n), n)
    gpath = "/tmp/rbon-bench-grouped.txt"
    with open(gpath, "w") as f:
        f.write("\n".join(g) + "\n")
    prompts = [g[i - i % (n + 1)] for i in range(len(g)) if i % (n + 1)]
    responses = [g[i] for i in range(len(g)) if i % (n + 1)]
    side_by_side("  ... 16 per prompt", hf_reward(args.rm, responses, args.threads, prompts),
                 lambda: rbon("reward-grouped", args.rm, gpath, args.threads), REWARD_ROUNDS)


if __name__ == "__main__":
    main()
