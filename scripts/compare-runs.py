#!/usr/bin/env python3
"""Compares two runs of one pipeline (e.g. on `cpu` and on `cuda:0`) stage by stage: which
samples drew the same tokens, how far log-probs, rewards and embeddings of the same text are
apart, which selections and pair rows are the same.

    python3 scripts/compare-runs.py RUN_A RUN_B

Needs: pip install pyarrow
"""

import glob
import math
import os
import sys

import pyarrow.parquet as pq


def rows(run, stage, key):
    out = {}
    for f in sorted(glob.glob(os.path.join(run, stage, "shard-*.parquet"))):
        for r in pq.read_table(f).to_pylist():
            out[tuple(r[k] for k in key)] = r
    return out


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else float("nan")


def main():
    a, b = sys.argv[1], sys.argv[2]
    print(f"A = {a}\nB = {b}")
    sa, sb = rows(a, "samples", ["prompt_id", "sample_idx"]), rows(b, "samples", ["prompt_id", "sample_idx"])
    same = [k for k in sa if k in sb and sa[k]["token_ids"] == sb[k]["token_ids"]]
    lp = max((abs(sa[k]["logprob"] - sb[k]["logprob"]) for k in same), default=0.0)
    print(f"samples: {len(same)} of {len(sa)} drew the same tokens; max |Δ logprob| over those {lp:.2e}")
    # The first token where two differing samples part.
    for k in sa:
        if k in sb and k not in same:
            ta, tb = sa[k]["token_ids"], sb[k]["token_ids"]
            at = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
            print(f"  first differing sample {k}: parts at token {at} of {len(ta)}/{len(tb)}")
            break
    ca, cb = rows(a, "scores", ["prompt_id", "sample_idx"]), rows(b, "scores", ["prompt_id", "sample_idx"])
    names = [c for c in next(iter(ca.values())) if c.startswith("reward_")] if ca else []
    for n in names:
        d = max((abs(ca[k][n] - cb[k][n]) / max(1.0, abs(ca[k][n])) for k in same), default=0.0)
        print(f"scores: {n}: max relative |Δ| over the same texts {d:.2e}")
    if ca and "embedding" in next(iter(ca.values())):
        c = min((cosine(ca[k]["embedding"], cb[k]["embedding"]) for k in same), default=1.0)
        print(f"scores: embedding: min cosine over the same texts {c:.6f}")
    key = ["prompt_id", "method", "beta"]
    la, lb = rows(a, "selections", key), rows(b, "selections", key)
    eq = sum(1 for k in la if k in lb and la[k]["index"] == lb[k]["index"])
    print(f"selections: {eq} of {len(la)} picked the same sample")
    pa, pb = rows(a, "pairs", key), rows(b, "pairs", key)
    eq = sum(1 for k in pa if k in pb and pa[k] == pb[k])
    print(f"pairs: {eq} of {len(pa)} rows identical ({len(pb)} in B)")


if __name__ == "__main__":
    main()
