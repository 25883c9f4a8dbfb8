#!/usr/bin/env python3
"""Writes data/candidates/demo.jsonl: a small candidates file for `pipelines/byo.yaml`.

Stdlib only, deterministic (rerun it and the file is byte-identical). Each prompt gets N
responses assembled from phrase pools, so some responses repeat and some are near-duplicates.
Three reward columns: `proxy` and `gold` both reward helpful phrases, but the proxy also
over-rewards length (the reward hacking RBoN guards against); `proxy2` is a second proxy on
another scale that over-rewards openers instead, so the two form a disagreeing ensemble for
`bon_unc`. `logprob` falls with length and
rare phrases, `num_tokens` counts whitespace tokens plus EOS, and `embedding` is a hashed
bag-of-words vector, so similar responses sit close together as a sentence embedder would
place them.

It also writes the same prompts to data/prompts/demo.jsonl (`id`, `instruction`) for the
sampling pipelines.

Usage: python3 scripts/make-demo-candidates.py [--out data/candidates/demo.jsonl] [--n 8]
"""

import argparse
import hashlib
import json
import math
import os
import random

PROMPTS = [
    "How do I keep basil alive indoors?",
    "Explain what a hash function is to a ten-year-old.",
    "Give me three tips for a first marathon.",
    "What is the difference between weather and climate?",
    "Write a haiku about autumn rain.",
    "How can I make my morning routine more productive?",
    "Why is the sky blue?",
    "Suggest a name for a friendly robot vacuum.",
    "How should I prepare for a job interview?",
    "What are good habits for learning a new language?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How do vaccines train the immune system?",
    "What should I pack for a weekend camping trip?",
    "Explain recursion with a simple example.",
    "How can I reduce food waste at home?",
    "What makes a good password?",
    "Describe the water cycle.",
    "How do I politely decline an invitation?",
    "What is compound interest?",
    "Give me a quick recipe for tomato soup.",
    "How do bees make honey?",
    "What is the best way to learn to touch type?",
    "Explain why leaves change colour in autumn.",
    "How can I sleep better?",
]

OPENERS = ["Sure!", "Good question.", "Here is a short answer.", "Happy to help.", ""]
HELPFUL = [
    "Start with the basics and build up step by step.",
    "Keep it simple and be consistent every day.",
    "Focus on the one thing that matters most first.",
    "A concrete example makes the idea easy to remember.",
    "Check the result and adjust as you go.",
    "Ask for feedback from someone you trust.",
]
FILLER = [
    "There are many things to consider here.",
    "It depends on a lot of different factors.",
    "People have different opinions about this.",
    "This is a very interesting and important topic.",
]
CLOSERS = ["Good luck!", "I hope this helps.", "Let me know if you have questions.", ""]

DIM = 32


def embed(text):
    v = [0.0] * DIM
    for word in text.lower().replace("!", " ").replace(".", " ").replace(",", " ").split():
        h = hashlib.sha256(word.encode()).digest()
        v[h[0] % DIM] += 1.0 if h[1] % 2 else -1.0
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [round(x / norm, 6) for x in v]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="data/candidates/demo.jsonl")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompts-out", default="data/prompts/demo.jsonl")
    args = ap.parse_args()
    rng = random.Random(0)
    lines = []
    for p, prompt in enumerate(PROMPTS):
        pid = f"demo-{p:03d}"
        for k in range(args.n):
            helpful = rng.sample(HELPFUL, rng.randint(0, 3))
            filler = rng.sample(FILLER, rng.randint(0, 3))
            parts = [rng.choice(OPENERS)] + helpful + filler + [rng.choice(CLOSERS)]
            response = " ".join(x for x in parts if x) or "I am not sure."
            tokens = len(response.split()) + 1
            quality = len(helpful) - 0.5 * len(filler) + rng.gauss(0, 0.3)
            gold = quality
            proxy = quality + 0.08 * tokens + rng.gauss(0, 0.5)
            proxy2 = 10.0 * (quality + (1.5 if parts[0] else 0.0) + rng.gauss(0, 0.5)) + 40.0
            logprob = -1.6 * tokens - 2.0 * len(filler) + rng.gauss(0, 1.0)
            lines.append(
                json.dumps(
                    {
                        "prompt_id": pid,
                        "prompt": prompt,
                        "sample_idx": k,
                        "response": response,
                        "reward_proxy": round(proxy, 6),
                        "reward_gold": round(gold, 6),
                        "reward_proxy2": round(proxy2, 6),
                        "logprob": round(logprob, 6),
                        "num_tokens": tokens,
                        "embedding": embed(response),
                    },
                    ensure_ascii=False,
                )
            )
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} candidates for {len(PROMPTS)} prompts to {args.out}")
    os.makedirs(os.path.dirname(args.prompts_out), exist_ok=True)
    with open(args.prompts_out, "w", encoding="utf-8") as f:
        for p, prompt in enumerate(PROMPTS):
            f.write(json.dumps({"id": f"demo-{p:03d}", "instruction": prompt}, ensure_ascii=False) + "\n")
    print(f"wrote {len(PROMPTS)} prompts to {args.prompts_out}")


if __name__ == "__main__":
    main()
