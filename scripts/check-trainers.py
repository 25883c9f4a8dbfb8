#!/usr/bin/env python3
"""Feeds a run's pairs to the trainers people use and reports what each keeps.

- datasets: every conversational export loads with load_dataset("parquet").
- TRL: the rows TRL's DPOTrainer rules keep (the prompt rendered with the generation prompt is a
  prefix of prompt + chosen and of prompt + rejected; the prompt fits in max_length), then one
  real DPOTrainer step on a tiny policy from data/models.
- OpenRLHF (its rules, emulated; OpenRLHF needs a GPU stack to import): rows whose templated
  prompt is >= max_len - 2 tokens are dropped.
- LLaMA-Factory: the entries of pairs/dataset_info.json, the files they name, and each row
  through LLaMA-Factory's own sharegpt converter when the package imports here, else through
  its documented rules.

Usage: scripts/check-trainers.sh [RUN_DIR]   (sets up the Python environment, then runs this)
"""

import glob
import json
import os
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MAX_LENGTH = 512  # TRL DPOConfig.max_length and OpenRLHF --max_len used for the counts


def line(name, kept, dropped, note=""):
    print(f"  {name:<44} kept {kept:>5}  dropped {dropped:>5}{'  ' + note if note else ''}")


def trl_rules(rows, tok):
    """TRL DPOTrainer on conversational rows: prompt_ids = template(prompt, gen=True); chosen_ids =
    template(prompt + chosen)[len(prompt_ids):] (a warning and wrong tokens when the prompt is not
    a prefix); rows whose prompt alone fills max_length are dropped."""
    not_prefix = too_long = 0
    for r in rows:
        p = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        ok = True
        for key in ("chosen", "rejected"):
            full = tok.apply_chat_template(r["prompt"] + r[key], tokenize=False)
            ok &= full.startswith(p)
        if not ok:
            not_prefix += 1
        elif len(tok(p, add_special_tokens=False)["input_ids"]) >= MAX_LENGTH:
            too_long += 1
    return not_prefix, too_long


def openrlhf_rules(rows, tok):
    dropped = 0
    for r in rows:
        p = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        if len(tok(p, add_special_tokens=False)["input_ids"]) >= MAX_LENGTH - 2:
            dropped += 1
    return dropped


def llamafactory_rows(rows, info):
    """LLaMA-Factory's sharegpt ranking rules: messages alternate user/assistant (optional leading
    system turn) and end on a user turn (odd length); chosen and rejected are single assistant
    message dicts. Uses LLaMA-Factory's converter when it imports."""
    tags = info["tags"]
    cols = info["columns"]
    try:
        from llamafactory.data.converter import SharegptDatasetConverter
        from llamafactory.data.parser import DatasetAttr
        from llamafactory.hparams import DataArguments

        attr = DatasetAttr("file", dataset_name=info["file_name"], formatting="sharegpt", ranking=True)
        attr.set_attr("messages", cols, default="conversations")
        attr.set_attr("chosen", cols)
        attr.set_attr("rejected", cols)
        for k in ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag"):
            attr.set_attr(k, tags)
        conv = SharegptDatasetConverter(attr, DataArguments())
        kept = 0
        for r in rows:
            out = conv(r)
            if out["_prompt"] and out["_response"]:
                kept += 1
        return kept, "LLaMA-Factory's SharegptDatasetConverter"
    except ImportError as e:
        how = f"its rules (llamafactory does not import here: {e})"
    kept = 0
    for r in rows:
        msgs = r[cols["messages"]]
        roles = [m[tags["role_tag"]] for m in msgs]
        if roles and roles[0] == tags["system_tag"]:
            roles = roles[1:]
        alternate = all(x == (tags["user_tag"] if i % 2 == 0 else tags["assistant_tag"]) for i, x in enumerate(roles))
        single = all(isinstance(r[cols[k]], dict) and r[cols[k]][tags["role_tag"]] == tags["assistant_tag"]
                     for k in ("chosen", "rejected"))
        if len(roles) % 2 == 1 and alternate and single:
            kept += 1
    return kept, how


def main(run, model_dir):
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    print(f"trl {trl.__version__}, transformers {transformers.__version__}, datasets {datasets.__version__}, "
          f"torch {torch.__version__}")
    files = sorted(glob.glob(os.path.join(run, "pairs", "*", "beta=*", "train-*.parquet")))
    if not files:
        sys.exit(f"no Parquet exports under {run}/pairs")
    exports = sorted({os.path.dirname(f) for f in files})
    tok = AutoTokenizer.from_pretrained(model_dir)
    print(f"run {run}: {len(exports)} exports; policy tokenizer {model_dir}; max length {MAX_LENGTH}")

    total = not_prefix = too_long = o_dropped = 0
    print("datasets.load_dataset('parquet') and the trainers' row rules over every export "
          "(exports with drops listed):")
    for d in exports:
        ds = datasets.load_dataset("parquet", data_files=os.path.join(d, "train-*.parquet"), split="train")
        rows = ds.to_list()
        total += len(rows)
        name = os.path.relpath(d, os.path.join(run, "pairs"))
        np_, tl = trl_rules(rows, tok)
        od = openrlhf_rules(rows, tok)
        not_prefix, too_long, o_dropped = not_prefix + np_, too_long + tl, o_dropped + od
        if np_ + tl + od:
            line(f"{name}", len(rows) - np_ - tl, np_ + tl, f"(TRL; OpenRLHF drops {od})")
    print(f"  {total} rows load")
    line("TRL DPOTrainer rules", total - not_prefix - too_long, not_prefix + too_long,
         f"(prompt not a prefix of prompt+response: {not_prefix}, prompt >= max_length: {too_long})")
    line("OpenRLHF rules", total - o_dropped, o_dropped, "(prompt >= max_len - 2)")

    info_path = os.path.join(run, "pairs", "dataset_info.json")
    with open(info_path) as f:
        info = json.load(f)
    kept = dropped = 0
    how = ""
    for name, entry in info.items():
        path = os.path.join(run, "pairs", entry["file_name"])
        assert os.path.isfile(path), (name, path)
        rows = datasets.load_dataset("parquet", data_files=path, split="train").to_list()
        k, how = llamafactory_rows(rows, entry)
        kept += k
        dropped += len(rows) - k
    print(f"LLaMA-Factory via {info_path} ({len(info)} entries), checked with {how}:")
    line("sharegpt ranking rows", kept, dropped)

    # One real DPOTrainer step on the BoN export.
    bon = os.path.join(run, "pairs", "bon", "beta=0")
    ds = datasets.load_dataset("parquet", data_files=os.path.join(bon, "train-*.parquet"), split="train")
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    with tempfile.TemporaryDirectory() as out:
        cfg = trl.DPOConfig(
            output_dir=out, max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=1,
            learning_rate=1e-5, logging_steps=1, save_strategy="no", report_to=[], max_length=MAX_LENGTH,
            use_cpu=True, seed=0,
        )
        trainer = trl.DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
        kept = len(trainer.train_dataset)
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.remove_callback(transformers.ProgressCallback)
        result = trainer.train()
    print(f"TRL DPOTrainer on {os.path.relpath(bon, run)} ({len(ds)} rows, {kept} after its preprocessing): "
          f"1 step, loss {result.training_loss:.4f}")
    print("trainers ok")


if __name__ == "__main__":
    run_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/demo"
    policy = sys.argv[2] if len(sys.argv) > 2 else "data/models/tiny-qwen3"
    main(run_dir, policy)
