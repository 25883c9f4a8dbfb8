#!/usr/bin/env python3
"""GPU throughput of rbon beside transformers on the same GPU, and beside the HBM roofline.

Random-weight models shaped like Qwen2.5-0.5B and Llama-3-8B are made here in bf16 (nothing is
downloaded). For each and N in (16, 64): N samples of exactly NEW tokens from one prompt of
PROMPT ids at temperature 1 without truncation, by transformers' `generate(
num_return_sequences=N)` and by rbon (`rbon bench sample`: one shared prefill, lock-step decode);
then reward-model scoring of ROWS (prompt + response) rows with the 8B shape as a
`LlamaForSequenceClassification`, by transformers (padded batches of 32) and rbon (`rbon bench
score reward`). The roofline of a decode step reads every weight once: N · bandwidth / weight bytes
tokens/s, with the bandwidth measured here by a device-to-device copy.

    python3 scripts/gpu-bench.py --rbon BIN --out OUT [--work /tmp/rbon-gpu-bench] [--small]

BIN is a CUDA build of rbon (scripts/build-cuda.sh); `--small --device cpu` swaps in tiny shapes
to check the script itself on a CPU.
Needs: torch, transformers (the GPU machine has both).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "data", "tokenizers", "tiny-bpe")

SHAPES = {
    # Qwen2.5-0.5B: hidden 896, 24 layers, 14 heads / 2 KV heads, tied embeddings, q/k/v bias.
    "qwen2.5-0.5b": dict(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         tie_word_embeddings=True),
    # Llama-3-8B: hidden 4096, 32 layers, 32 heads / 8 KV heads, vocabulary 128,256.
    "llama-3-8b": dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       tie_word_embeddings=False, rope_theta=500000.0),
}
SMALL = {
    "qwen2-small": dict(arch="qwen2", vocab_size=32000, hidden_size=256, intermediate_size=512,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        tie_word_embeddings=True),
    "llama-small": dict(arch="llama", vocab_size=32000, hidden_size=256, intermediate_size=512,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        tie_word_embeddings=False),
}


def config(spec, torch_dtype):
    from transformers import LlamaConfig, Qwen2Config

    spec = dict(spec)
    arch = spec.pop("arch")
    cls = Qwen2Config if arch == "qwen2" else LlamaConfig
    vocab = spec["vocab_size"]
    # An EOS id that random weights practically never draw: every sample runs to NEW tokens.
    return cls(max_position_embeddings=4096, eos_token_id=vocab - 1, bos_token_id=None, pad_token_id=0,
               dtype=torch_dtype, **spec)


def make(path, spec, kind, device):
    """A random-weight model folder (bf16 safetensors, a tokenizer rbon can load)."""
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification, Qwen2ForCausalLM

    if os.path.exists(os.path.join(path, "config.json")):
        return
    cfg = config(spec, torch.bfloat16)
    if kind == "rm":
        cfg.num_labels = 1
        cls = LlamaForSequenceClassification
    else:
        cls = Qwen2ForCausalLM if spec["arch"] == "qwen2" else LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER, f), os.path.join(path, f))
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bandwidth(device):
    """Device-to-device copy bandwidth, bytes read plus written per second."""
    import torch

    if not device.startswith("cuda"):
        return None
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(device)
    secs = (time.perf_counter() - t) / 10
    del x, y
    torch.cuda.empty_cache()
    return 2 * 2 * 1024**3 / secs


def weight_bytes(path):
    total = 0
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            total += os.path.getsize(os.path.join(path, f))
    return total


def prompt_ids(n, vocab):
    return [100 + (i * 7919) % (vocab - 200) for i in range(n)]


def hf_sample(path, n, prompt, new, device):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    vocab = model.config.vocab_size
    ids = torch.tensor([prompt_ids(prompt, vocab)], device=device)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
              num_return_sequences=n, pad_token_id=0)
    best = None
    with torch.no_grad():
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        for rep in range(2):
            torch.manual_seed(rep)
            sync(device)
            t = time.perf_counter()
            out = model.generate(ids, **kw)
            sync(device)
            secs = time.perf_counter() - t
            tokens = int(out[:, prompt:].numel())
            if best is None or tokens / secs > best:
                best = tokens / secs
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return best


def rbon_dev(device):
    return "cuda:0" if device.startswith("cuda") else "cpu"


def rbon_sample(rbon, path, n, prompt, new, device):
    out = subprocess.run([rbon, "bench", "sample", path, "--n", str(n), "--prompt-tokens", str(prompt),
                          "--new-tokens", str(new), "--repeats", "2", "--device", rbon_dev(device), "--dtype", "bf16"],
                         check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return r["per_s"], r["items"]


def texts(rows, words, path):
    lines = []
    for i in range(rows):
        lines.append(" ".join(f"w{(i * 31 + j * 7) % 97}" for j in range(words)))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def hf_score(path, lines, device):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    model.config.pad_token_id = 0
    batch = 32
    tokens = sum(len(tok("Please answer the question.\n\n" + s).input_ids) for s in lines) / len(lines)
    best = None
    with torch.no_grad():
        for rep in range(2):
            sync(device)
            t = time.perf_counter()
            for i in range(0, len(lines), batch):
                enc = tok(["Please answer the question.\n\n" + s for s in lines[i : i + batch]],
                          return_tensors="pt", padding=True).to(device)
                model(**enc).logits.float().cpu()
            sync(device)
            secs = time.perf_counter() - t
            if best is None or len(lines) / secs > best:
                best = len(lines) / secs
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return best, tokens


def rbon_score(rbon, path, text_file, device):
    out = subprocess.run([rbon, "bench", "score", "reward", path, text_file, "--batch-tokens", "32768", "--repeats", "2",
                          "--device", rbon_dev(device), "--dtype", "bf16"], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["per_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rbon", required=True, help="the rbon binary (a CUDA build on a GPU)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/rbon-gpu-bench")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--ns", default="16,64")
    ap.add_argument("--rows", type=int, default=512)
    args = ap.parse_args()
    import torch

    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    shapes = SMALL if args.small else SHAPES
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    bw = bandwidth(args.device)
    results = {"gpu": gpu, "bandwidth_bytes_per_s": bw, "prompt": args.prompt, "new": args.new, "sampling": [],
               "scoring": []}
    print(f"device {gpu}; copy bandwidth {bw / 1e12:.2f} TB/s" if bw else f"device {gpu}", flush=True)
    print(f"sampling: prompt {args.prompt} ids, {args.new} new tokens, temperature 1, bf16")
    print(f"{'model':>14} {'N':>4} | {'transformers tok/s':>18} | {'rbon tok/s':>10} | {'speed-up':>8} | "
          f"{'roofline tok/s':>14} | {'rbon/roof':>9}", flush=True)
    for name, spec in shapes.items():
        path = os.path.join(args.work, name)
        make(path, spec, "lm", args.device)
        wb = weight_bytes(path)
        for n in [int(x) for x in args.ns.split(",")]:
            hf = hf_sample(path, n, args.prompt, args.new, args.device)
            rb, generated = rbon_sample(args.rbon, path, n, args.prompt, args.new, args.device)
            roof = n * bw / wb if bw else None
            results["sampling"].append(dict(model=name, n=n, weight_bytes=wb, transformers=hf, rbon=rb,
                                            rbon_generated=generated, roofline=roof))
            roof_s = f"{roof:>14.0f} | {rb / roof:>8.0%}" if roof else f"{'-':>14} | {'-':>9}"
            print(f"{name:>14} {n:>4} | {hf:>18.1f} | {rb:>10.1f} | {rb / hf:>7.2f}x | {roof_s}", flush=True)
    rm_name = "llama-small" if args.small else "llama-3-8b"
    rm_path = os.path.join(args.work, rm_name + "-rm")
    make(rm_path, shapes[rm_name], "rm", args.device)
    text_file = os.path.join(args.work, "texts.txt")
    lines = texts(args.rows, 150, text_file)
    hf, tokens = hf_score(rm_path, lines, args.device)
    rb = rbon_score(args.rbon, rm_path, text_file, args.device)
    results["scoring"].append(dict(model=rm_name, rows=args.rows, mean_tokens=tokens, transformers=hf, rbon=rb))
    print(f"reward scoring, {rm_name} shape, {args.rows} rows of {tokens:.0f} tokens on average, bf16: "
          f"transformers {hf:.1f} rows/s, rbon {rb:.1f} rows/s ({rb / hf:.2f}x)", flush=True)
    with open(os.path.join(args.out, "gpu-bench.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
