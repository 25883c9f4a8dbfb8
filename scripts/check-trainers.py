#!/usr/bin/env python3
"""Feeds a run's exports to the trainers' own data loaders and reports the rows each keeps.

Each trainer runs in its own virtual environment (scripts/check-trainers.sh makes them), so each
gets the versions it pins:

  trl           TRL's DPOTrainer builds its training set from every export (its own tokenization
                and filtering), then takes one real training step on the BoN export.
  llamafactory  LLaMA-Factory's get_dataset(stage="rm") on every entry of pairs/dataset_info.json,
                with the run's pairs folder as dataset_dir and the qwen template.
  openrlhf      OpenRLHF's blending_datasets + RewardDataset on every export file, in DPO mode and
                in reward-model mode (where the `margin` column becomes the margin-loss offset).

Usage: python3 scripts/check-trainers.py {trl|llamafactory|openrlhf} RUN_DIR POLICY_DIR
"""

import contextlib
import glob
import io
import json
import os
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MAX_LENGTH = 512  # TRL max_length, LLaMA-Factory cutoff_len, OpenRLHF max_len


def exports(run):
    """(name, [files]) of every pair export: name `<method>/beta=<β>`."""
    pairs = os.path.join(run, "pairs")
    files = sorted(glob.glob(os.path.join(pairs, "*", "beta=*", "train-*.parquet")))
    if not files:
        sys.exit(f"no Parquet exports under {pairs}")
    out = {}
    for f in files:
        out.setdefault(os.path.relpath(os.path.dirname(f), pairs), []).append(f)
    return sorted(out.items())


class Table:
    """Rows kept and dropped per export, then the total."""

    def __init__(self, title):
        print(title)
        print(f"  {'export':<34} {'rows':>6} {'kept':>6} {'dropped':>8}")
        self.rows = self.kept = self.n = 0

    def add(self, name, rows, kept, note=""):
        print(f"  {name:<34} {rows:>6} {kept:>6} {rows - kept:>8}{'  ' + note if note else ''}")
        self.rows, self.kept, self.n = self.rows + rows, self.kept + kept, self.n + 1

    def total(self, what="exports"):
        print(f"  {f'all {self.n} {what}':<34} {self.rows:>6} {self.kept:>6} {self.rows - self.kept:>8}")


@contextlib.contextmanager
def quiet():
    """Trainers print examples, configs and progress (some through logging handlers that hold
    the original streams); keep the table readable by silencing file descriptors 1 and 2."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def check_trl(run, policy):
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(policy)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    title = (f"TRL {trl.__version__} (transformers {transformers.__version__}, datasets {datasets.__version__}, "
             f"torch {torch.__version__}): DPOTrainer's own preprocessing, max_length {MAX_LENGTH}, {policy}")
    table = Table(title)
    with tempfile.TemporaryDirectory() as out:
        cfg = trl.DPOConfig(
            output_dir=out, max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=1,
            learning_rate=1e-5, logging_steps=1, save_strategy="no", report_to=[], max_length=MAX_LENGTH,
            use_cpu=True, seed=0,
        )
        step = None
        for name, files in exports(run):
            ds = datasets.load_dataset("parquet", data_files=files, split="train")
            with quiet():
                trainer = trl.DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
            table.add(name, len(ds), len(trainer.train_dataset))
            if name == "bon/beta=0":
                trainer.remove_callback(transformers.PrinterCallback)
                trainer.remove_callback(transformers.ProgressCallback)
                with quiet():
                    step = trainer.train()
        table.total()
    if step is None:
        sys.exit("no bon/beta=0 export to train on")
    print(f"  one DPOTrainer step on bon/beta=0: loss {step.training_loss:.4f}")


def check_llamafactory(run, policy):
    import llamafactory
    import transformers
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.extras import logging as lf_logging
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    transformers.logging.set_verbosity_error()
    lf_logging.get_logger("llamafactory").setLevel("ERROR")
    import datasets

    datasets.disable_progress_bars()
    pairs = os.path.join(run, "pairs")
    with open(os.path.join(pairs, "dataset_info.json")) as fh:
        info = json.load(fh)
    title = (f"LLaMA-Factory {llamafactory.__version__} (transformers {transformers.__version__}): "
             f"get_dataset(stage=\"rm\") per entry of {pairs}/dataset_info.json, template qwen, "
             f"cutoff_len {MAX_LENGTH}")
    table = Table(title)
    for name, entry in sorted(info.items()):
        import pyarrow.parquet as pq

        rows = pq.read_metadata(os.path.join(pairs, entry["file_name"])).num_rows
        with tempfile.TemporaryDirectory() as out, quiet():
            model_args, data_args, training_args, _, _ = get_train_args(dict(
                stage="rm", do_train=True, model_name_or_path=policy, dataset=name, dataset_dir=pairs,
                template="qwen", cutoff_len=MAX_LENGTH, output_dir=out, overwrite_output_dir=True,
                report_to="none", finetuning_type="full", use_cpu=True, overwrite_cache=True,
            ))
            tok = load_tokenizer(model_args)
            template = get_template_and_fix_tokenizer(tok["tokenizer"], data_args)
            module = get_dataset(template, model_args, data_args, training_args, stage="rm", **tok)
        table.add(name, rows, len(module["train_dataset"]))
    table.total("entries")


def check_openrlhf(run, policy):
    from types import SimpleNamespace

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import transformers
    from openrlhf.datasets import RewardDataset
    from openrlhf.datasets.utils import blending_datasets
    from openrlhf.utils import get_tokenizer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    import importlib.metadata as md

    version = md.version("openrlhf")
    tok = get_tokenizer(policy, None, "left", None)
    # What train_dpo/train_rm hand RewardDataset: the strategy's parsed arguments (the data keys
    # of `--data.prompt_key prompt --data.chosen_key chosen --data.rejected_key rejected
    # --data.apply_chat_template`) and its print; DeepspeedStrategy itself needs a GPU stack.
    data_args = SimpleNamespace(prompt_key="prompt", chosen_key="chosen", rejected_key="rejected",
                                apply_chat_template=True, tokenizer_chat_template=None)
    strategy = SimpleNamespace(
        args=SimpleNamespace(data=data_args, use_ms=False), print=lambda *a, **k: None, is_rank_0=lambda: True
    )
    for mode, is_dpo in (("DPO (train_dpo)", True), ("reward model (train_rm)", False)):
        title = (f"OpenRLHF {version} (transformers {transformers.__version__}): blending_datasets + "
                 f"RewardDataset, {mode}, max_len {MAX_LENGTH}")
        table = Table(title)
        margins = {True: 0, False: 0}
        for name, files in exports(run):
            with quiet():
                data = blending_datasets(",".join(files), None, strategy, dataset_split="train")
                ds = RewardDataset(data, tok, MAX_LENGTH, strategy, is_dpo=is_dpo, num_processors=1)
                batch = ds.collate_fn([ds[i] for i in range(min(4, len(ds)))]) if len(ds) else None
            assert batch is None or batch[0].shape[0] == min(4, len(ds)), name
            table.add(name, len(data), len(ds))
            if not is_dpo:
                # The margin-loss offset of each row is the export's `margin` (0 without one).
                t = pa.concat_tables(pq.read_table(f) for f in files)
                has = "margin" in t.column_names
                want = t.column("margin").to_pylist() if has else [0] * t.num_rows
                assert list(ds.extras) == want, (name, "margin")
                margins[has] += len(want)
        table.total()
        if not is_dpo:
            print(f"  margin-loss offsets (--model.margin_loss_enable): the exports' margin column "
                  f"(score_chosen − score_rejected) on {margins[True]} rows, 0 on {margins[False]} rows "
                  f"exported without it (pair.margin: none)")


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in ("trl", "llamafactory", "openrlhf"):
        sys.exit(__doc__)
    which, run, policy = sys.argv[1:]
    {"trl": check_trl, "llamafactory": check_llamafactory, "openrlhf": check_openrlhf}[which](run, policy)


if __name__ == "__main__":
    main()
