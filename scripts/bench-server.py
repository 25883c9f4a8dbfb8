#!/usr/bin/env python3
"""The server engine's overhead: the same requests through vLLM directly and through `rbon run`.

Both sides send the same completion requests (the prompts as token ids rendered with the
policy's chat template, one request per sample with the seed rbon records, logprobs 0, token ids
back) with the same number in flight, to one running server. The direct side is an asyncio
client (aiohttp), timed from its first request to its last answer; rbon's side is the wall time
of the whole `rbon run` process (start, prompts, the server checks, sampling, writing shards).
Equal token totals show that both drew the same samples. Prints tokens/s of each, best of
--repeats, and rbon's overhead.

Runs in the vLLM environment of scripts/vllm-env.sh; scripts/bench-server.sh starts a server
on a fixture policy and calls this.

Usage: python3 scripts/bench-server.py --url URL --model NAME --policy DIR --rbon BIN
           [--n 16] [--max-new-tokens 128] [--concurrency 64] [--prompts 48] [--repeats 3]
"""

import argparse
import asyncio
import glob
import json
import os
import subprocess
import tempfile
import time

import aiohttp
import pyarrow.parquet as pq
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pipeline(a, out, prompts_file):
    return f"""name: bench-server
output: {out}
seed: 0
input:
  path: {prompts_file}
  prompt_column: instruction
  id_column: id
  shard_size: 8
policy:
  model: {a.policy}
  engine: server
  server: {{ url: "{a.url}", model: {a.model}, concurrency: {a.concurrency} }}
sample:
  n: {a.n}
  max_new_tokens: {a.max_new_tokens}
"""


def prompts_file(a, work):
    """--prompts instructions: the demo's 24, repeated with a suffix to reach the count."""
    rows = [json.loads(l) for l in open(os.path.join(ROOT, "data/prompts/demo.jsonl"))]
    out = []
    for i in range(a.prompts):
        r = dict(rows[i % len(rows)])
        r["id"] = f"{r['id']}-{i}"
        if i >= len(rows):
            r["instruction"] = f"{r['instruction']} ({i // len(rows)})"
        out.append(r)
    path = os.path.join(work, "prompts.jsonl")
    with open(path, "w") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
    return path, out


def run_rbon(a, work, prompts, tag):
    out = os.path.join(work, f"run-{tag}")
    yaml = os.path.join(work, f"{tag}.yaml")
    with open(yaml, "w") as f:
        f.write(pipeline(a, out, prompts))
    t = time.perf_counter()
    subprocess.run([a.rbon, "run", "--quiet", yaml], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    rows = []
    for shard in sorted(glob.glob(os.path.join(out, "samples", "shard-*.parquet"))):
        rows += pq.read_table(shard, columns=["prompt_id", "sample_idx", "seed", "num_tokens"]).to_pylist()
    return wall, rows


async def direct(a, requests):
    tokens = 0
    sem = asyncio.Semaphore(a.concurrency)
    url = a.url.rstrip("/") + "/completions"

    async def one(session, body):
        nonlocal tokens
        async with sem:
            async with session.post(url, json=body) as r:
                if r.status != 200:
                    raise SystemExit(f"the server answered {r.status}: {(await r.text())[:500]}")
                v = await r.json()
                tokens += len(v["choices"][0]["token_ids"])

    conn = aiohttp.TCPConnector(limit=a.concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)) as s:
        t = time.perf_counter()
        await asyncio.gather(*(one(s, b) for b in requests))
        return time.perf_counter() - t, tokens


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--policy", required=True)
    p.add_argument("--rbon", required=True)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="rbon-bench-server-")
    path, prompt_rows = prompts_file(a, work)
    tok = AutoTokenizer.from_pretrained(a.policy)
    eos = tok.convert_tokens_to_ids([tok.eos_token]) if tok.eos_token else []
    gen = json.load(open(os.path.join(a.policy, "generation_config.json"))) if os.path.exists(
        os.path.join(a.policy, "generation_config.json")
    ) else {}
    g_eos = gen.get("eos_token_id", [])
    eos = sorted(set(eos) | set(g_eos if isinstance(g_eos, list) else [g_eos]))
    ids = {
        r["id"]: tok.apply_chat_template(
            [{"role": "user", "content": r["instruction"]}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for r in prompt_rows
    }

    # Warm-up (the server's first requests, the page cache), and the seeds rbon sends.
    _, rows = run_rbon(a, work, path, "warm")
    requests = [
        {
            "model": a.model, "prompt": ids[r["prompt_id"]], "n": 1, "max_tokens": a.max_new_tokens,
            "temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "seed": r["seed"], "stop": [],
            "stop_token_ids": eos, "ignore_eos": False, "logprobs": 0, "return_token_ids": True,
            "return_tokens_as_token_ids": True,
        }
        for r in rows
    ]
    dw, rw, dt, recorded = float("inf"), float("inf"), 0, 0
    for i in range(a.repeats):
        wall, dt = asyncio.run(direct(a, requests))
        dw = min(dw, wall)
        wall, rows = run_rbon(a, work, path, f"r{i}")
        rw = min(rw, wall)
        recorded = sum(r["num_tokens"] for r in rows)
    # Both sides made the server generate the same tokens (same prompts and seeds); rbon records
    # fewer when a cut at max_new_tokens drops the tokens of a partial character.
    print(f"{a.prompts} prompts x N = {a.n}, up to {a.max_new_tokens} new tokens, {a.concurrency} requests in flight,")
    print(f"{dt} tokens generated ({recorded} recorded by rbon); best of {a.repeats}")
    print(f"{'':28}{'seconds':>9}{'tok/s':>9}")
    print(f"{'vLLM directly (aiohttp)':28}{dw:9.2f}{dt / dw:9.0f}")
    print(f"{'rbon run, engine: server':28}{rw:9.2f}{dt / rw:9.0f}")
    print(f"rbon's overhead: {100 * (1 - dw / rw):.1f}% of vLLM's own throughput")


if __name__ == "__main__":
    main()
