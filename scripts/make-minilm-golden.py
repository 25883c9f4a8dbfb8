#!/usr/bin/env python3
"""Writes data/golden/all-minilm-l6-v2.json: reference embeddings of the real all-MiniLM-L6-v2.

The model itself (~91 MB) is not committed; fetch it with scripts/fetch-minilm.sh into
data/models/all-minilm-l6-v2/ (git-ignored). This golden is committed, so Rust tests can check the
real model whenever the folder is present and skip otherwise.

Per text: `input_ids` as sentence-transformers tokenizes it (padding removed; truncated at the
folder's max_seq_length 256, [CLS] and [SEP] included; NOT at the 128 that the folder's
tokenizer.json declares) and `embedding` = SentenceTransformer(folder).encode(texts) in float32
(Transformer → mean Pooling → Normalize, so unit length). CPU, float32, eager attention, one
thread; rerunning gives a byte-identical file.

Usage: pip install torch transformers sentence-transformers && scripts/fetch-minilm.sh
       python3 scripts/make-minilm-golden.py
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib
import json
import sys
from pathlib import Path

import sentence_transformers
import torch
import transformers
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "data" / "models" / "all-minilm-l6-v2"
OUT = ROOT / "data" / "golden" / "all-minilm-l6-v2.json"

LONG = (
    "Regularized Best-of-N sampling draws several responses from a reference policy, scores each "
    "of them with a proxy reward model, and picks the one that maximises the reward minus a "
    "penalty for straying from the reference distribution. The penalty can be a KL term or a "
    "Wasserstein distance between sentence embeddings, which is why the embedder matters. "
)
TEXTS = [
    "Hello world",
    "",
    "The capital of France is Paris.",
    "Café, naïve résumé — 日本語のテキスト and emoji 🙂🚀, plus math ∑ x² ≥ 0.",
    "  Leading and trailing spaces,\ttabs and\nnew lines  ",
    (LONG * 5).strip(),  # well over 256 wordpieces: hits truncation
]


def main():
    if not (FOLDER / "modules.json").exists():
        sys.exit(f"{FOLDER.relative_to(ROOT)} missing: run scripts/fetch-minilm.sh first")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    model = sentence_transformers.SentenceTransformer(
        str(FOLDER), device="cpu", model_kwargs={"attn_implementation": "eager", "dtype": torch.float32}
    )
    max_len = model.max_seq_length
    assert max_len == 256, max_len
    features = model.preprocess(TEXTS)
    input_ids = [
        [int(t) for t, m in zip(row, mask) if m] for row, mask in zip(features["input_ids"], features["attention_mask"])
    ]
    assert len(input_ids[-1]) == max_len, "long text does not reach max_seq_length"

    # tokenizer.json as it is truncates (and pads) at 128; with truncation at max_seq_length and no
    # padding it must give exactly the ids above (the Rust side uses tokenizer.json).
    raw = Tokenizer.from_file(str(FOLDER / "tokenizer.json"))
    assert raw.truncation["max_length"] == 128 and len(raw.encode("Hello").ids) == 128
    raw.no_truncation()
    raw.no_padding()
    untruncated_long = len(raw.encode(TEXTS[-1]).ids)
    raw.enable_truncation(max_len)
    for text, ids in zip(TEXTS, input_ids):
        assert raw.encode(text).ids == ids, text

    embeddings = model.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=False)
    assert str(embeddings.dtype) == "float32"
    norms = (embeddings.astype("float64") ** 2).sum(axis=1) ** 0.5
    assert all(abs(n - 1.0) < 1e-5 for n in norms), norms

    weights = FOLDER / "model.safetensors"
    data = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "model_safetensors_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "max_seq_length": max_len,
        "tokenizer_json_truncation": 128,
        "pooling": "mean",
        "normalize": True,
        "transformers_version": transformers.__version__,
        "sentence_transformers_version": sentence_transformers.__version__,
        "torch_version": torch.__version__,
        "cases": [
            {"text": t, "input_ids": ids, "embedding": [float(x) for x in e]}
            for t, ids, e in zip(TEXTS, input_ids, embeddings)
        ],
    }
    OUT.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    sims = embeddings @ embeddings.T
    print(
        f"{OUT.relative_to(ROOT)}: {len(TEXTS)} texts, token lengths {[len(i) for i in input_ids]} "
        f"(long text {untruncated_long} wordpieces untruncated), cos(0,2) {sims[0, 2]:.4f}, "
        f"{OUT.stat().st_size} bytes"
    )


if __name__ == "__main__":
    main()
