#!/usr/bin/env python3
"""Sampling throughput, rbon beside transformers, on the same model folder and prompts.

For N in (1, 16, 64) and a short and a long prompt, both draw N samples of up to NEW tokens
from one prompt at temperature 1 (no truncation): transformers with
`generate(num_return_sequences=N)`, rbon with its shared-prefill lock-step sampler
(`rbon bench sample`). Generated tokens count up to and
including EOS. Prints a table of tokens/s.

The model is a random-weight Qwen2-shaped decoder made here (no download); pass --model to use
another folder. Needs: pip install torch transformers.

Usage: python3 scripts/bench-sample.py [--model DIR] [--new-tokens 64] [--threads 2]
"""

import argparse
import json
import os
import subprocess
import sys
import time


def make_model(path):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if os.path.exists(os.path.join(path, "config.json")):
        return
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        eos_token_id=31999,
        bos_token_id=None,
        pad_token_id=0,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    model.save_pretrained(path)
    # A tokenizer is not needed to sample from ids, but the folder must load: reuse the tiny one.
    here = os.path.dirname(os.path.abspath(__file__))
    tok_dir = os.path.join(here, "..", "data", "tokenizers", "tiny-bpe")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(tok_dir, f), "rb") as src, open(os.path.join(path, f), "wb") as dst:
            dst.write(src.read())


# Each side runs every setting this many times and reports its best: run-to-run noise on a
# shared 2-core machine is about ±20% for either side.
REPEATS = 3


def prompt_ids(n, vocab):
    return [100 + (i * 7919) % (vocab - 200) for i in range(n)]


def bench_hf(path, n, prompt_tokens, new_tokens, threads):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    eos = model.config.eos_token_id
    ids = torch.tensor([prompt_ids(prompt_tokens, vocab)])
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
              num_return_sequences=n, eos_token_id=eos, pad_token_id=0)
    best = None
    with torch.no_grad():
        model.generate(ids, **{**kw, "num_return_sequences": 1, "max_new_tokens": 2})
        for rep in range(REPEATS):
            torch.manual_seed(rep)
            t = time.perf_counter()
            out = model.generate(ids, **kw)
            secs = time.perf_counter() - t
            gen = out[:, prompt_tokens:].tolist()
            tokens = sum(row.index(eos) + 1 if eos in row else len(row) for row in gen)
            if best is None or tokens / secs > best[0] / best[1]:
                best = (tokens, secs)
    return best


def bench_rbon(path, n, prompt_tokens, new_tokens, threads):
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run(
        ["cargo", "run", "--quiet", "--release", "-p", "rbon", "--", "bench", "sample", path, "--n", str(n),
         "--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens), "--repeats", str(REPEATS)],
        cwd=root, env=env, check=True, capture_output=True, text=True,
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return r["items"], r["seconds"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/rbon-bench-qwen2-57m")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--ns", default="1,16,64")
    ap.add_argument("--prompts", default="16,512")
    args = ap.parse_args()
    make_model(args.model)
    print(f"model {args.model}, {args.new_tokens} new tokens, {args.threads} threads")
    print(f"{'N':>4} {'prompt':>7} | {'transformers tok/s':>18} | {'rbon tok/s':>10} | {'speed-up':>8}")
    for p in [int(x) for x in args.prompts.split(",")]:
        for n in [int(x) for x in args.ns.split(",")]:
            ht, hs = bench_hf(args.model, n, p, args.new_tokens, args.threads)
            rt, rs = bench_rbon(args.model, n, p, args.new_tokens, args.threads)
            print(f"{n:>4} {p:>7} | {ht / hs:>18.1f} | {rt / rs:>10.1f} | {(rt / rs) / (ht / hs):>7.2f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())
