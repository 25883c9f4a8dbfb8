#!/usr/bin/env python3
"""Writes tiny random-weight scorers (reward models, a sentence embedder) and golden outputs for
rbon's parity tests.

rbon scores samples with `*ForSequenceClassification` reward models, a DeBERTa-v2 text-pair reward
model and a mean-pooled sentence embedder (DESIGN.md §1, §4). This script builds, with transformers
and sentence-transformers themselves, one tiny model per kind plus the numbers the Rust tests
compare against, so that CI needs no Python:

    data/models/tiny-rm-llama/     LlamaForSequenceClassification: GQA 4/2, llama3 rope scaling,
                                   Llama-3 template (BOS inside the template)
    data/models/tiny-rm-qwen2/     Qwen2ForSequenceClassification: q/k/v biases, ChatML with
                                   default system prompt
    data/models/tiny-rm-qwen3/     Qwen3ForSequenceClassification: q_norm/k_norm, head_dim 32,
                                   Qwen3 template (empty <think> block before the last answer)
    data/models/tiny-rm-mistral/   MistralForSequenceClassification: MQA 4/1, head_dim 16,
                                   sliding_window null, Mistral v0.3 [INST] template
    data/models/tiny-deberta-rm/   DebertaV2ForSequenceClassification shaped like
                                   OpenAssistant/reward-model-deberta-v3-large-v2 (relative
                                   attention, 256 log buckets, p2c+c2p, shared keys, no absolute
                                   positions, type_vocab_size 0), tiny Unigram tokenizer
    data/models/tiny-minilm/       sentence-transformers folder laid out like all-MiniLM-L6-v2
                                   (BertModel → mean Pooling → Normalize), tiny WordPiece tokenizer,
                                   max_seq_length 32
    data/golden/tiny-rm-<arch>.json, tiny-deberta-rm.json, tiny-minilm.json

The decoder reward models reuse the shared byte-level BPE vocabulary and the chat templates of
scripts/make-tiny-models.py (imported, not copied); all num_labels=1 with pad_token_id = <pad> (2).

Tokenizer training in `tokenizers` 0.23 is deterministic for BPE but NOT for WordPiece or Unigram
(hash-map iteration order breaks ties differently on every run), so the WordPiece and Unigram
vocabularies here are built directly from counts over the corpus, in sorted order.

Everything runs on CPU in float32 with attn_implementation="eager", one thread, deterministic
algorithms; weights are drawn from fixed seeds in sorted parameter-name order; JSON is written with
sorted keys and no timestamps. Rerunning gives byte-identical files (check with
`sha256sum $(find data/models/tiny-rm-* data/models/tiny-deberta-rm data/models/tiny-minilm
data/golden -type f)`).

Usage: pip install torch transformers tokenizers sentence-transformers
       python3 scripts/make-tiny-scorers.py   (torch 2.x, transformers 5.x, sentence-transformers 6.x)
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import itertools
import json
import math
from collections import Counter
from pathlib import Path

import sentence_transformers
import torch
import transformers
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertModel,
    BertTokenizer,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DebertaV2Tokenizer,
    LlamaConfig,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForSequenceClassification,
    Qwen2Config,
    Qwen2ForSequenceClassification,
    Qwen3Config,
    Qwen3ForSequenceClassification,
)

_spec = importlib.util.spec_from_file_location("make_tiny_models", Path(__file__).with_name("make-tiny-models.py"))
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)

ROOT = tiny.ROOT
MODELS_DIR = tiny.MODELS_DIR
GOLDEN_DIR = tiny.GOLDEN_DIR
CORPUS = tiny.CORPUS
tid = tiny.tid
write_json = tiny.write_json
fresh_dir = tiny.fresh_dir

WEIGHT_STD = 0.2  # linear weights inside the layers
EMBED_STD = 0.5  # token/position embeddings and the score/classifier head: real spread in scores
BIAS_STD = 0.1
NORM_NOISE_STD = 0.1  # norm weights are 1 + noise, LayerNorm biases are noise
BASE_SEED = 20240402  # arXiv 2404.01054
MIN_SCORE_GAP = 0.1  # between any two golden scores of one model
BATCH_TOLERANCE = 1e-5  # padded batch vs one sequence at a time


def seq_cls_config(cls, **extra):
    return cls(
        vocab_size=tiny.VOCAB_SIZE,
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        num_labels=1,
        pad_token_id=tid("<pad>"),
        tie_word_embeddings=False,
        **extra,
    )


# Per architecture: model class, config, tokenizer special tokens, chat template.
RM_ARCHS = {
    "llama": dict(
        model_cls=LlamaForSequenceClassification,
        config=lambda: seq_cls_config(
            LlamaConfig,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=500000.0,
            bos_token_id=tid("<s>"),
            eos_token_id=tid("<|eot_id|>"),
        ),
        tokenizer=dict(bos_token="<s>", eos_token="<|eot_id|>", pad_token="<pad>", add_bos_token=True),
        template=tiny.LLAMA3_TEMPLATE,
    ),
    "qwen2": dict(
        model_cls=Qwen2ForSequenceClassification,
        config=lambda: seq_cls_config(
            Qwen2Config,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=1000000.0,
            use_sliding_window=False,
            max_window_layers=2,
            bos_token_id=None,
            eos_token_id=tid("<|im_end|>"),
        ),
        tokenizer=dict(bos_token=None, eos_token="<|im_end|>", pad_token="<pad>"),
        template=tiny.QWEN2_TEMPLATE,
    ),
    "qwen3": dict(
        model_cls=Qwen3ForSequenceClassification,
        config=lambda: seq_cls_config(
            Qwen3Config,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            rope_theta=1000000.0,
            use_sliding_window=False,
            max_window_layers=2,
            bos_token_id=None,
            eos_token_id=tid("<|im_end|>"),
        ),
        tokenizer=dict(bos_token=None, eos_token="<|im_end|>", pad_token="<pad>"),
        template=tiny.QWEN3_TEMPLATE,
    ),
    "mistral": dict(
        model_cls=MistralForSequenceClassification,
        config=lambda: seq_cls_config(
            MistralConfig,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=None,
            rope_theta=1000000.0,
            bos_token_id=tid("<s>"),
            eos_token_id=tid("</s>"),
        ),
        tokenizer=dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", add_bos_token=True),
        template=tiny.MISTRAL_TEMPLATE,
    ),
}

LONG_ANSWER = (
    "Start slowly, drink water, and rest the day before the race. Practice every day, keep it "
    "simple, and ask for feedback. First, we need to understand the problem. Then we can solve it. "
    "To sleep better, keep a regular schedule and avoid screens before bed. Let me think about "
    "this step by step: a journey of a thousand miles begins with a single step, so run a little "
    "further each week, eat well, and listen to your body. Thank you, that was very helpful."
)


def rm_conversations():
    """Four scored conversations, each ending with the assistant response being scored: one turn;
    system + one turn (Mistral v0.3's template drops the system text here, because it folds it into
    the LAST message only when that message is a user turn); two turns; and one with a long answer
    so that padded batches carry a lot of padding."""
    return [
        [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
        ],
        [
            {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
            {"role": "user", "content": "Why is the sky blue?"},
            {"role": "assistant", "content": "Sunlight is scattered by the air, and blue light scatters the most."},
        ],
        [
            {"role": "user", "content": "Hi there, can you help me plan a trip?"},
            {"role": "assistant", "content": "Of course. Where would you like to go, and for how long?"},
            {"role": "user", "content": "  Somewhere warm in winter, please.  "},
            {"role": "assistant", "content": "Sure! Here is a short answer to your question."},
        ],
        [
            {"role": "user", "content": "Could you give me three tips for a first marathon?"},
            {"role": "assistant", "content": LONG_ANSWER},
        ],
    ]


# (question, answer) pairs for the DeBERTa reward model, as OpenAssistant's model card feeds it:
# tokenizer(question, answer). The last one is long enough (> 128 tokens) that relative distances
# reach the logarithmic buckets (position_buckets 256: exact up to ±128, log-spaced beyond).
DEBERTA_CASES = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Why is the sky blue?", "I'm sorry, I don't know the answer to that."),
    ("Write a haiku about autumn rain.", "Café, naïve, résumé: soft rain on red leaves 🙂 日本語 ✓"),
    ("Could you give me three tips for a first marathon?", LONG_ANSWER),
]

MINILM_MAX_SEQ_LENGTH = 32
MINILM_TEXTS = [
    "",
    "ok",
    "The quick brown fox jumps over the lazy dog.",
    "Café, NAÏVE résumé — 日本語 and emoji 🙂 🚀 ∑",
    "  Indented text,\ttabs and\nnew lines   ",
    # > 32 wordpieces: ST truncates to max_seq_length (CLS and SEP included).
    "Why is the sky blue? Sunlight is scattered by the air, and blue light scatters the most. "
    "Leaves change colour in autumn because the green chlorophyll breaks down.",
]


# ---------------------------------------------------------------------------------------------
# Shared helpers


@torch.no_grad()
def init_weights(model, seed):
    """Normal weights drawn in sorted parameter-name order (independent of module registration
    order): std 0.5 for embeddings and the score/classifier head, 0.2 for other matrices, biases
    N(0, 0.1²), norm weights 1 + N(0, 0.1²)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        lowered = name.lower()
        if "norm" in lowered and name.endswith(".weight"):
            p.copy_(1.0 + NORM_NOISE_STD * noise)
        elif name.endswith(".bias"):
            p.copy_(BIAS_STD * noise)
        elif "embed" in lowered or name.startswith(("score.", "classifier.")):
            p.copy_(EMBED_STD * noise)
        else:
            p.copy_(WEIGHT_STD * noise)


def f32_list(t):
    return [float(x) for x in t.detach().to(torch.float32).reshape(-1)]


def min_gap(values):
    return min(abs(a - b) for a, b in itertools.combinations(values, 2))


def tensor_names(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sorted(f.keys())


def folder_size(folder):
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def check_raw_tokenizer(folder, texts_or_pairs, expected, add_special_tokens, truncation=None):
    """The Rust side uses tokenizer.json directly, not transformers' tokenizer classes (which may
    rebuild the pipeline from their own code): the ids must agree."""
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    if truncation is None:
        raw.no_truncation()
    else:
        raw.enable_truncation(truncation)
    raw.no_padding()
    for item, ids in zip(texts_or_pairs, expected):
        enc = raw.encode(*item, add_special_tokens=add_special_tokens) if isinstance(item, tuple) else raw.encode(
            item, add_special_tokens=add_special_tokens
        )
        assert enc.ids == ids, (folder.name, item, enc.ids, ids)


# ---------------------------------------------------------------------------------------------
# Decoder reward models


def build_rm(arch, spec, inputs):
    """First seed (deterministic sequence) whose golden scores are pairwise MIN_SCORE_GAP apart."""
    for attempt in range(1000):
        seed = BASE_SEED + 7000 + 1000 * list(RM_ARCHS).index(arch) + attempt
        config = spec["config"]()
        config._attn_implementation = "eager"
        model = spec["model_cls"](config).to(torch.float32).eval()
        init_weights(model, seed)
        with torch.no_grad():
            scores = [float(model(torch.tensor([ids])).logits[0, 0]) for ids in inputs]
        if min_gap(scores) >= MIN_SCORE_GAP:
            return model, seed
    raise SystemExit(f"tiny-rm-{arch}: no usable seed found")


@torch.no_grad()
def rm_golden(arch, folder):
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(
        str(folder), attn_implementation="eager", dtype=torch.float32
    ).eval()
    assert model.config.pad_token_id == tid("<pad>") == tok.pad_token_id
    cases, rendered_all = [], []
    for messages in rm_conversations():
        rendered = tok.apply_chat_template(messages, tokenize=False)
        ids = tok(rendered, add_special_tokens=False).input_ids
        if tok.bos_token is not None:
            assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
        assert tid("<pad>") not in ids
        score = model(torch.tensor([ids])).logits[0, 0]
        cases.append({"messages": messages, "rendered": rendered, "input_ids": ids, "score": float(score)})
        rendered_all.append(rendered)
    check_raw_tokenizer(folder, rendered_all, [c["input_ids"] for c in cases], add_special_tokens=False)

    batch = tok(rendered_all, add_special_tokens=False, padding=True, return_tensors="pt")
    assert all(int(batch.input_ids[i, len(c["input_ids"]) - 1]) != tok.pad_token_id for i, c in enumerate(cases))
    batch_scores = f32_list(model(**batch).logits[:, 0])
    diff = max(abs(a - c["score"]) for a, c in zip(batch_scores, cases))
    assert diff <= BATCH_TOLERANCE, (arch, diff)
    return {
        "model_type": model.config.model_type,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "padding_side": "right",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "cases": cases,
        "batch_scores": batch_scores,
        "batch_max_abs_diff": diff,
    }


def make_rm(arch, spec, base):
    folder = MODELS_DIR / f"tiny-rm-{arch}"
    fresh_dir(folder)
    tiny.save_tokenizer(base, folder, spec["tokenizer"], spec["template"], False)
    tok = AutoTokenizer.from_pretrained(str(folder))
    inputs = [
        tok(tok.apply_chat_template(m, tokenize=False), add_special_tokens=False).input_ids for m in rm_conversations()
    ]
    model, seed = build_rm(arch, spec, inputs)
    model.save_pretrained(str(folder), safe_serialization=True)
    data = rm_golden(arch, folder)
    write_json(GOLDEN_DIR / f"tiny-rm-{arch}.json", data)
    return folder, seed, data


# ---------------------------------------------------------------------------------------------
# DeBERTa-v2 reward model


def deberta_normalizer():
    # What transformers 5's DebertaV2Tokenizer builds (do_lower_case=False): it rebuilds the
    # pipeline from its own code, so tokenizer.json is written from that same pipeline.
    return normalizers.Sequence(
        [normalizers.Replace(Regex(r"\s{2,}|[\n\r\t]"), " "), normalizers.NFC(), normalizers.Strip(left=False, right=True)]
    )


def unigram_vocab(max_pieces=320):
    """A Unigram vocabulary from substring counts over the corpus (deterministic, unlike
    UnigramTrainer): [PAD] [CLS] [SEP] [UNK] as in deberta-v3, then every character, then whole
    words and 2–4 character substrings by count; score = log relative frequency."""
    norm, pre = deberta_normalizer(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    words = Counter()
    for line in CORPUS + [q for q, _ in DEBERTA_CASES[:2]]:
        for piece, _ in pre.pre_tokenize_str(norm.normalize_str(line)):
            words[piece] += 1
    chars, subs = Counter(), Counter()
    for w, c in words.items():
        for ch in w:
            chars[ch] += c
        subs[w] += c
        for n in (2, 3, 4):
            for i in range(len(w) - n + 1):
                subs[w[i : i + n]] += c
    total = sum(chars.values()) + sum(subs.values())
    ranked = sorted(((c, p) for p, c in subs.items() if p not in chars and c >= 2), key=lambda x: (-x[0], x[1]))
    pieces = sorted(chars.items(), key=lambda x: (-x[1], x[0])) + [(p, c) for c, p in ranked[: max_pieces - len(chars)]]
    vocab = [("[PAD]", 0.0), ("[CLS]", 0.0), ("[SEP]", 0.0), ("[UNK]", 0.0)]
    vocab += [(p, round(math.log(c / total), 6)) for p, c in pieces]
    return vocab


def deberta_config(vocab_size):
    return DebertaV2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=512,
        type_vocab_size=0,
        initializer_range=0.02,
        layer_norm_eps=1e-7,
        relative_attention=True,
        max_relative_positions=-1,
        position_buckets=256,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pad_token_id=0,
        pooler_dropout=0,
        pooler_hidden_act="gelu",
        pooler_hidden_size=32,
        num_labels=1,
    )


@torch.no_grad()
def deberta_scores(model, tok):
    return [float(model(**tok(q, a, return_tensors="pt")).logits[0, 0]) for q, a in DEBERTA_CASES]


@torch.no_grad()
def make_deberta():
    folder = MODELS_DIR / "tiny-deberta-rm"
    fresh_dir(folder)
    tok = DebertaV2Tokenizer(vocab=unigram_vocab(), unk_id=3, do_lower_case=False, split_by_punct=False)
    tok.save_pretrained(str(folder))
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert type(tok).__name__ == "DebertaV2Tokenizer"
    for seed in itertools.count(BASE_SEED + 20000):
        config = deberta_config(len(tok))
        config._attn_implementation = "eager"
        model = DebertaV2ForSequenceClassification(config).to(torch.float32).eval()
        init_weights(model, seed)
        if min_gap(deberta_scores(model, tok)) >= MIN_SCORE_GAP:
            break
        assert seed < BASE_SEED + 21000, "tiny-deberta-rm: no usable seed found"
    model.save_pretrained(str(folder), safe_serialization=True)

    model = AutoModelForSequenceClassification.from_pretrained(
        str(folder), attn_implementation="eager", dtype=torch.float32
    ).eval()
    cases = []
    for (q, a), score in zip(DEBERTA_CASES, deberta_scores(model, tok)):
        enc = tok(q, a)
        cases.append(
            {
                "question": q,
                "answer": a,
                "input_ids": enc.input_ids,
                "token_type_ids": enc.token_type_ids,
                "score": score,
            }
        )
    check_raw_tokenizer(folder, DEBERTA_CASES, [c["input_ids"] for c in cases], add_special_tokens=True)
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for (q, a), c in zip(DEBERTA_CASES, cases):
        assert raw.encode(q, a).type_ids == c["token_type_ids"]
    tok.padding_side = "right"
    batch = tok([q for q, _ in DEBERTA_CASES], [a for _, a in DEBERTA_CASES], padding=True, return_tensors="pt")
    batch_scores = f32_list(model(**batch).logits[:, 0])
    diff = max(abs(b - c["score"]) for b, c in zip(batch_scores, cases))
    assert diff <= BATCH_TOLERANCE, ("deberta", diff)
    data = {
        "model_type": model.config.model_type,
        "pad_token_id": tok.pad_token_id,
        "cls_token_id": tok.cls_token_id,
        "sep_token_id": tok.sep_token_id,
        "unk_token_id": tok.unk_token_id,
        "mask_token_id": tok.mask_token_id,
        "padding_side": "right",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "cases": cases,
        "batch_scores": batch_scores,
        "batch_max_abs_diff": diff,
    }
    write_json(GOLDEN_DIR / "tiny-deberta-rm.json", data)
    return folder, seed, data


# ---------------------------------------------------------------------------------------------
# Sentence embedder (all-MiniLM-L6-v2 layout)

MINILM_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MINILM_SUFFIXES = ["##s", "##es", "##ed", "##er", "##ing", "##ly", "##est", "##ion"]
# Like the real all-MiniLM-L6-v2 folder, tokenizer.json carries truncation and fixed padding that
# are SMALLER than sentence_bert_config's max_seq_length (there: 128 vs 256). sentence-transformers
# overrides them; a loader that uses tokenizer.json as it is truncates too early.
MINILM_JSON_TRUNCATION = 16


def wordpiece_vocab(max_words=200):
    """A WordPiece vocabulary from counts (deterministic, unlike WordPieceTrainer): specials, every
    character alone and as ##continuation, a few suffixes, then the most frequent whole words."""
    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter()
    for line in CORPUS:
        for w, _ in pre.pre_tokenize_str(norm.normalize_str(line)):
            words[w] += 1
    chars = sorted({ch for w in words for ch in w})
    vocab = list(MINILM_SPECIALS) + chars + ["##" + ch for ch in chars]
    vocab += [s for s in MINILM_SUFFIXES if s not in vocab]
    ranked = sorted(((c, w) for w, c in words.items() if len(w) > 1 and w not in vocab), key=lambda x: (-x[0], x[1]))
    vocab += [w for _, w in ranked[:max_words]]
    assert len(vocab) == len(set(vocab))
    return {t: i for i, t in enumerate(vocab)}


def save_minilm_tokenizer(folder, vocab):
    hf = BertTokenizer(vocab=vocab, do_lower_case=True, tokenize_chinese_chars=True, strip_accents=None)
    backend = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    backend.enable_truncation(MINILM_JSON_TRUNCATION)
    backend.enable_padding(pad_id=0, pad_token="[PAD]", length=MINILM_JSON_TRUNCATION)
    (folder / "tokenizer.json").write_text(backend.to_str(pretty=True) + "\n", encoding="utf-8")
    # The remaining files as the real all-MiniLM-L6-v2 folder has them (transformers 4 layout).
    specials = dict(unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    write_json(
        folder / "tokenizer_config.json",
        dict(
            do_lower_case=True,
            tokenize_chinese_chars=True,
            strip_accents=None,
            do_basic_tokenize=True,
            never_split=None,
            tokenizer_class="BertTokenizer",
            model_max_length=512,
            **specials,
        ),
    )
    write_json(folder / "special_tokens_map.json", specials)
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")


def minilm_texts_ok(model, texts):
    """The embeddings of distinct texts must not collapse together (random BERTs can be very
    anisotropic): every pairwise cosine below 0.98."""
    e = model.encode(texts, convert_to_tensor=True)
    sims = e @ e.T
    return max(float(sims[i, j]) for i, j in itertools.combinations(range(len(texts)), 2)) < 0.98


@torch.no_grad()
def make_minilm():
    folder = MODELS_DIR / "tiny-minilm"
    fresh_dir(folder)
    vocab = wordpiece_vocab()
    save_minilm_tokenizer(folder, vocab)
    write_json(
        folder / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
    )
    write_json(folder / "sentence_bert_config.json", {"max_seq_length": MINILM_MAX_SEQ_LENGTH, "do_lower_case": False})
    write_json(
        folder / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": 32,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
    )
    write_json(
        folder / "config_sentence_transformers.json",
        {
            "__version__": {
                "sentence_transformers": sentence_transformers.__version__,
                "transformers": transformers.__version__,
                "pytorch": torch.__version__,
            }
        },
    )
    # No 2_Normalize/ folder: git cannot hold an empty one, and the real folder has none either.
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        max_position_embeddings=512,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )
    config._attn_implementation = "eager"
    texts = MINILM_TEXTS
    for seed in itertools.count(BASE_SEED + 30000):
        model = BertModel(config).to(torch.float32).eval()
        init_weights(model, seed)
        model.save_pretrained(str(folder), safe_serialization=True)
        st = load_minilm(folder)
        if minilm_texts_ok(st, texts):
            break
        assert seed < BASE_SEED + 31000, "tiny-minilm: no usable seed found"

    st = load_minilm(folder)
    assert st.max_seq_length == MINILM_MAX_SEQ_LENGTH
    features = st.preprocess(texts)
    input_ids = [
        [int(t) for t, m in zip(row, mask) if m] for row, mask in zip(features["input_ids"], features["attention_mask"])
    ]
    assert max(len(ids) for ids in input_ids) == MINILM_MAX_SEQ_LENGTH, "no text hits truncation"
    check_raw_tokenizer(folder, texts, input_ids, add_special_tokens=True, truncation=MINILM_MAX_SEQ_LENGTH)
    embeddings = torch.from_numpy(st.encode(texts, normalize_embeddings=False, convert_to_numpy=True))
    assert embeddings.dtype == torch.float32

    # Independent check of what the pipeline is: BertModel → mean over the mask → L2 normalise,
    # one text at a time (so padding cannot matter).
    bert = AutoModel.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32).eval()
    for ids, emb in zip(input_ids, embeddings):
        hidden = bert(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).last_hidden_state[0]
        pooled = hidden.mean(dim=0)
        manual = pooled / pooled.norm().clamp_min(1e-12)
        assert float((manual - emb).abs().max()) < 1e-6, float((manual - emb).abs().max())

    sims = embeddings @ embeddings.T
    data = {
        "max_seq_length": MINILM_MAX_SEQ_LENGTH,
        "pooling": "mean",
        "normalize": True,
        "pad_token_id": 0,
        "cls_token_id": vocab["[CLS]"],
        "sep_token_id": vocab["[SEP]"],
        "unk_token_id": vocab["[UNK]"],
        "transformers_version": transformers.__version__,
        "sentence_transformers_version": sentence_transformers.__version__,
        "torch_version": torch.__version__,
        "cases": [
            {"text": t, "input_ids": ids, "embedding": f32_list(e)} for t, ids, e in zip(texts, input_ids, embeddings)
        ],
    }
    write_json(GOLDEN_DIR / "tiny-minilm.json", data)
    return folder, seed, data, sims


def load_minilm(folder):
    return sentence_transformers.SentenceTransformer(
        str(folder), device="cpu", model_kwargs={"attn_implementation": "eager", "dtype": torch.float32}
    )


# ---------------------------------------------------------------------------------------------


def report(folder, seed, extra):
    names = tensor_names(folder)
    heads = [n for n in names if not n.startswith(("model.layers.", "deberta.encoder.layer.", "encoder.layer."))]
    print(f"{folder.relative_to(ROOT)}: seed {seed}, {folder_size(folder)} bytes, {extra}")
    print(f"    tensors outside the layers: {heads}")


def main():
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    base = tiny.train_tokenizer()
    committed = json.loads((tiny.TOKENIZER_DIR / "tokenizer.json").read_text())
    assert json.loads(base.to_str())["model"] == committed["model"], "shared tokenizer differs from the committed one"

    for arch, spec in RM_ARCHS.items():
        folder, seed, data = make_rm(arch, spec, base)
        lens = [len(c["input_ids"]) for c in data["cases"]]
        scores = [round(c["score"], 4) for c in data["cases"]]
        report(folder, seed, f"lengths {lens}, scores {scores}, batch diff {data['batch_max_abs_diff']:.2e}")

    folder, seed, data = make_deberta()
    lens = [len(c["input_ids"]) for c in data["cases"]]
    scores = [round(c["score"], 4) for c in data["cases"]]
    report(folder, seed, f"lengths {lens}, scores {scores}, batch diff {data['batch_max_abs_diff']:.2e}")

    folder, seed, data, sims = make_minilm()
    lens = [len(c["input_ids"]) for c in data["cases"]]
    off = [float(sims[i, j]) for i, j in itertools.combinations(range(len(lens)), 2)]
    report(folder, seed, f"lengths {lens}, pairwise cosine {min(off):.3f}..{max(off):.3f}")


if __name__ == "__main__":
    main()
