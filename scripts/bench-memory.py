#!/usr/bin/env python3
"""Peak memory of a run against the number of prompts: rbon streams shards, so a 10k-prompt run
should stay within 2x of a 100-prompt run. Runs the whole pipeline (sample, score, select, pair)
with the tiny models on generated prompts, and a candidates-only pipeline (select, pair) on a
generated candidates file with 16 responses per prompt, and prints the peak RSS of each run.

    python3 scripts/bench-memory.py [--prompts 100 10000] [--rbon target/release/rbon]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def default_binary() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    for profile in ("release", "debug"):
        if (target / profile / "rbon").exists():
            return target / profile / "rbon"
    sys.exit("no rbon binary: cargo build --release (or pass --rbon PATH)")


PIPELINE = """name: memory-{n}
output: {out}
seed: 0
input:
  path: {prompts}
  prompt_column: instruction
  id_column: id
  shard_size: 50
policy:
  model: {models}/tiny-llama
sample:
  n: 4
  max_new_tokens: 8
score:
  rewards:
    - {{ name: proxy, model: {models}/tiny-rm-llama }}
    - {{ name: gold, model: {models}/tiny-deberta-rm }}
  embedding: {{ model: {models}/tiny-minilm }}
select:
  proxy: proxy
  gold: [gold]
  methods: [bon, rbon_kl, rbon_wd]
  betas: [0.01, 0.1, 1.0]
pair:
  rejected: worst
"""


CANDIDATES = """name: memory-candidates-{n}
output: {out}
seed: 0
input:
  candidates: {candidates}
  shard_size: 50
select:
  proxy: proxy
  gold: [gold]
  methods: [bon, rbon_kl, rbon_wd]
  betas: [0.01, 0.1, 1.0]
"""


def question(i: int) -> str:
    return f"Question {i}: explain item {i * 7919 % 1000} in a few words, please."


def write_config(kind: str, n: int, work: Path) -> Path:
    cfg = work / f"memory-{kind}-{n}.yaml"
    out = work / f"run-{kind}-{n}"
    if kind == "pipeline":
        prompts = work / f"prompts-{n}.jsonl"
        with prompts.open("w") as f:
            for i in range(n):
                f.write(json.dumps({"id": f"p{i:06d}", "instruction": question(i)}) + "\n")
        cfg.write_text(PIPELINE.format(n=n, out=out, prompts=prompts, models=REPO / "data/models"))
    else:
        cands = work / f"candidates-{n}.jsonl"
        with cands.open("w") as f:
            for i in range(n):
                for k in range(16):
                    x = (i * 31 + k * 17) % 97
                    e = [((x * (j + 3)) % 13) / 13.0 + 0.1 for j in range(32)]
                    row = {
                        "prompt_id": f"p{i:06d}", "prompt": question(i), "sample_idx": k,
                        "response": f"Answer {k} to question {i}: " + "words " * (x % 40),
                        "reward_proxy": x / 97.0, "reward_gold": ((x * 7) % 97) / 97.0,
                        "logprob": -1.0 - x / 10.0, "num_tokens": 5 + x % 40, "embedding": e,
                    }
                    f.write(json.dumps(row) + "\n")
        cfg.write_text(CANDIDATES.format(n=n, out=out, candidates=cands))
    return cfg


def run(binary: Path, kind: str, n: int, work: Path) -> tuple[float, float]:
    cfg = write_config(kind, n, work)
    # Peak RSS of the child alone: each run is measured in a fresh Python child.
    probe = (
        "import resource, subprocess, sys\n"
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    start = time.time()
    out = subprocess.run(
        [sys.executable, "-c", probe, str(binary), "run", "--quiet", str(cfg)],
        check=True, capture_output=True, text=True, cwd=REPO,
    )
    return int(out.stdout.strip()) / 1024.0, time.time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, nargs="+", default=[100, 10000])
    ap.add_argument("--rbon", type=Path, default=None)
    args = ap.parse_args()
    binary = args.rbon or default_binary()
    print(f"binary: {binary}")
    print(f"{'run':>10} {'prompts':>8} {'samples':>8} {'peak RSS (MiB)':>15} {'time (s)':>9}")
    for kind, per_prompt in (("candidates", 16), ("pipeline", 4)):
        results = []
        with tempfile.TemporaryDirectory() as tmp:
            for n in args.prompts:
                rss, secs = run(binary, kind, n, Path(tmp))
                results.append((n, rss))
                print(f"{kind:>10} {n:>8} {n * per_prompt:>8} {rss:>15.1f} {secs:>9.1f}", flush=True)
        if len(results) > 1:
            (n0, r0), (n1, r1) = results[0], results[-1]
            print(f"{kind}: {n1} prompts use {r1 / r0:.2f}x the peak memory of {n0} (target: at most 2x)")


if __name__ == "__main__":
    main()
