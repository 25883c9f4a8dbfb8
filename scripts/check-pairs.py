#!/usr/bin/env python3
"""Checks a run's exports the way trainers read them: every pair export loads with
pyarrow.parquet.read_table, has the columns of DESIGN §8 with TRL's conversational types, and
no pair has chosen == rejected, chosen_message/rejected_message are the same responses as single
messages, and pairs/dataset_info.json registers every export file for LLaMA-Factory (sharegpt
ranking, OpenAI tags); SFT exports (prompt-completion) and the vBoN table, when the run
has them, have their documented columns and the vBoN weights match their formula; and the
pairs folder loads as a Hugging Face dataset through its README.md's configurations, one per
export (and SFT half), each with exactly its export's rows.

Usage: python3 scripts/check-pairs.py RUN_DIR      (needs: pip install pyarrow datasets)
"""

import glob
import math
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

COLUMNS = [
    "prompt_id", "method", "beta", "prompt", "chosen", "rejected",
    "chosen_index", "rejected_index", "score_chosen", "score_rejected", "margin",
    "chosen_message", "rejected_message",
]

SFT_COLUMNS = ["prompt_id", "method", "beta", "prompt", "completion", "sample_idx"]
VBON_COLUMNS = [
    "prompt_id", "sample_idx", "prompt", "completion", "logprob", "reward", "reward_cdf", "log_weight",
]


def main(run):
    files = sorted(glob.glob(os.path.join(run, "pairs", "*", "beta=*", "train-*.parquet")))
    if not files:
        sys.exit(f"no exports under {run}/pairs")
    rows = 0
    for f in files:
        t = pq.read_table(f)
        # `margin` is left out with pair.margin: none.
        want = COLUMNS if "margin" in t.column_names else [c for c in COLUMNS if c != "margin"]
        assert t.column_names == want, (f, t.column_names)
        for col in ("prompt", "chosen", "rejected"):
            typ = t.schema.field(col).type
            assert pa.types.is_list(typ) and pa.types.is_struct(typ.value_type), (f, col, typ)
            assert [typ.value_type.field(i).name for i in range(2)] == ["role", "content"], (f, col, typ)
        for r in t.to_pylist():
            assert len(r["chosen"]) == 1 and r["chosen"][0]["role"] == "assistant", (f, r["prompt_id"])
            assert len(r["rejected"]) == 1 and r["rejected"][0]["role"] == "assistant", (f, r["prompt_id"])
            assert r["chosen"][0]["content"] != r["rejected"][0]["content"], (f, r["prompt_id"])
            assert r["chosen_index"] != r["rejected_index"], (f, r["prompt_id"])
            if "margin" in r:
                assert abs(r["margin"] - (r["score_chosen"] - r["score_rejected"])) < 1e-12, (f, r["prompt_id"])
            assert r["prompt"] and r["prompt"][-1]["role"] == "user", (f, r["prompt_id"])
            assert r["chosen_message"] == r["chosen"][0], (f, r["prompt_id"])
            assert r["rejected_message"] == r["rejected"][0], (f, r["prompt_id"])
        rows += t.num_rows
        card = os.path.join(os.path.dirname(f), "README.md")
        assert os.path.isfile(card), card
    print(f"pairs ok: {len(files)} files, {rows} rows load with pyarrow {pa.__version__}")
    check_dataset_info(run, files)
    check_sft(run)
    check_vbon(run)
    check_hub_configs(run)


def check_hub_configs(run):
    """load_dataset(<pairs folder>, "<method>-beta=<β>") for every configuration of the folder's
    dataset card: each reads exactly its export's files, and every export has one."""
    import tempfile

    import datasets
    import yaml

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    pairs = os.path.join(run, "pairs")
    with open(os.path.join(pairs, "README.md")) as fh:
        text = fh.read()
    assert text.startswith("---\n"), "README.md has no front matter"
    front = yaml.safe_load(text.split("---\n")[1])
    for key in ("license", "task_categories", "tags", "size_categories", "configs"):
        assert front.get(key), f"front matter lacks {key}"
    assert {"dpo", "preference", "rbon", "trl"} <= set(front["tags"]), front["tags"]
    configs = {c["config_name"]: c["data_files"] for c in front["configs"]}
    exports = sorted({os.path.dirname(f) for f in
                      glob.glob(os.path.join(pairs, "*", "beta=*", "train-*.*"))
                      + glob.glob(os.path.join(pairs, "*", "beta=*", "sft", "train-*.*"))})
    expected = {}
    for d in exports:
        # An export without pairs has an empty part and no configuration.
        if sum(pq.read_metadata(f).num_rows for f in glob.glob(os.path.join(d, "train-*.parquet"))) == 0:
            continue
        rel = os.path.relpath(d, pairs).split(os.sep)
        method, beta = rel[0], rel[1].removeprefix("beta=")
        expected[f"{method}-beta={beta}" + ("-sft" if rel[-1] == "sft" else "")] = d
    assert sorted(configs) == sorted(expected), (sorted(configs), sorted(expected))
    assert sorted(datasets.get_dataset_config_names(pairs)) == sorted(configs)
    rows = 0
    with tempfile.TemporaryDirectory() as cache:
        for name, d in expected.items():
            [files] = configs[name]
            assert files["split"] == "train", (name, files)
            ds = datasets.load_dataset(pairs, name, split="train", cache_dir=cache)
            parts = sorted(glob.glob(os.path.join(d, "train-*.parquet")))
            if not parts:
                assert ds.num_rows > 0, name
                continue
            want = pa.concat_tables(pq.read_table(f) for f in parts)
            assert ds.column_names == want.column_names, (name, ds.column_names, want.column_names)
            assert ds.to_list() == want.to_pylist(), name
            rows += ds.num_rows
    print(f"hub configurations ok: {len(configs)} load with datasets {datasets.__version__} "
          f"(license {front['license']}), {rows} rows")


def check_dataset_info(run, files):
    import json

    with open(os.path.join(run, "pairs", "dataset_info.json")) as fh:
        info = json.load(fh)
    named = sorted(os.path.join(run, "pairs", e["file_name"]) for e in info.values())
    assert named == files, (named, files)
    for name, e in info.items():
        assert e["formatting"] == "sharegpt" and e["ranking"] is True, name
        assert e["columns"] == {"messages": "prompt", "chosen": "chosen_message", "rejected": "rejected_message"}, name
        assert e["tags"] == {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                             "assistant_tag": "assistant", "system_tag": "system"}, name
    print(f"dataset_info.json ok: {len(info)} LLaMA-Factory entries")


def check_messages(t, f, col):
    typ = t.schema.field(col).type
    assert pa.types.is_list(typ) and pa.types.is_struct(typ.value_type), (f, col, typ)
    assert [typ.value_type.field(i).name for i in range(2)] == ["role", "content"], (f, col, typ)


def check_sft(run):
    files = sorted(glob.glob(os.path.join(run, "pairs", "*", "beta=*", "sft", "train-*.parquet")))
    if not files:
        return
    rows = 0
    for f in files:
        t = pq.read_table(f)
        assert t.column_names == SFT_COLUMNS, (f, t.column_names)
        check_messages(t, f, "prompt")
        check_messages(t, f, "completion")
        for r in t.to_pylist():
            assert len(r["completion"]) == 1 and r["completion"][0]["role"] == "assistant", (f, r["prompt_id"])
        assert len(set(t.column("prompt_id").to_pylist())) == t.num_rows, (f, "one row per prompt")
        rows += t.num_rows
    print(f"sft ok: {len(files)} files, {rows} rows")


def check_vbon(run):
    files = sorted(glob.glob(os.path.join(run, "vbon", "train-*.parquet")))
    if not files:
        return
    t = pa.concat_tables(pq.read_table(f) for f in files)
    assert t.column_names == VBON_COLUMNS, t.column_names
    check_messages(t, "vbon", "prompt")
    check_messages(t, "vbon", "completion")
    by_prompt = {}
    for r in t.to_pylist():
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    for pid, rs in by_prompt.items():
        n = len(rs)
        for r in rs:
            below = sum(x["reward"] < r["reward"] for x in rs)
            equal = sum(x["reward"] == r["reward"] for x in rs)
            cdf = (below + 0.5 * equal) / n
            assert abs(r["reward_cdf"] - cdf) < 1e-12, (pid, r["sample_idx"])
            assert abs(r["log_weight"] - (math.log(n) + (n - 1) * math.log(cdf))) < 1e-9, (pid, r["sample_idx"])
    print(f"vbon ok: {t.num_rows} rows over {len(by_prompt)} prompts")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/byo")
