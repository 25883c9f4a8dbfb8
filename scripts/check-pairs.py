#!/usr/bin/env python3
"""Checks a run's pair exports the way trainers read them: every export loads with
pyarrow.parquet.read_table, has the columns of DESIGN §8 with TRL's conversational types, and
no pair has chosen == rejected.

Usage: python3 scripts/check-pairs.py RUN_DIR      (needs: pip install pyarrow)
"""

import glob
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

COLUMNS = [
    "prompt_id", "method", "beta", "prompt", "chosen", "rejected",
    "chosen_index", "rejected_index", "score_chosen", "score_rejected", "margin",
]


def main(run):
    files = sorted(glob.glob(os.path.join(run, "pairs", "*", "beta=*", "train-*.parquet")))
    if not files:
        sys.exit(f"no exports under {run}/pairs")
    rows = 0
    for f in files:
        t = pq.read_table(f)
        assert t.column_names == COLUMNS, (f, t.column_names)
        for col in ("prompt", "chosen", "rejected"):
            typ = t.schema.field(col).type
            assert pa.types.is_list(typ) and pa.types.is_struct(typ.value_type), (f, col, typ)
            assert [typ.value_type.field(i).name for i in range(2)] == ["role", "content"], (f, col, typ)
        for r in t.to_pylist():
            assert len(r["chosen"]) == 1 and r["chosen"][0]["role"] == "assistant", (f, r["prompt_id"])
            assert len(r["rejected"]) == 1 and r["rejected"][0]["role"] == "assistant", (f, r["prompt_id"])
            assert r["chosen"][0]["content"] != r["rejected"][0]["content"], (f, r["prompt_id"])
            assert r["chosen_index"] != r["rejected_index"], (f, r["prompt_id"])
            assert abs(r["margin"] - (r["score_chosen"] - r["score_rejected"])) < 1e-12, (f, r["prompt_id"])
            assert r["prompt"] and r["prompt"][-1]["role"] == "user", (f, r["prompt_id"])
        rows += t.num_rows
        card = os.path.join(os.path.dirname(f), "README.md")
        assert os.path.isfile(card), card
    print(f"pairs ok: {len(files)} files, {rows} rows load with pyarrow {pa.__version__}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/byo")
