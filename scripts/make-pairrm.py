#!/usr/bin/env python3
"""Writes a tiny random-weight PairRM (llm-blender's pairwise DeBERTa-v3 ranker) in the layout of
`llm-blender/PairRM-hf`, and golden outputs from llm-blender's own code, for rbon's parity tests:

    data/models/tiny-pairrm/     config.json (DebertaV2Config + PairRM's fields: prefix token ids,
                                 n_tasks; plus source_maxlength/candidate_maxlength shrunk to
                                 20/12 so truncation is exercised: the published checkpoints use
                                 1224/412, rbon's default), model.safetensors (pretrained_model.*,
                                 head_layer.1, head_layer.4), tokenizer.json with the four prefix
                                 tokens <|source|> <|candidate1|> <|candidate2|> <|candidate|>
    data/golden/tiny-pairrm.json pairwise logits of both orders through Blender.compare (batch 1,
                                 llm-blender's own truncation and [SEP] handling), the N x N
                                 comparison matrix and ranks of Blender.rank, and
                                 compare_conversations on a two-turn conversation

The model is built through llm-blender's own path (its tokenizer builder, the collator that adds
the prefix tokens, AutoModel + resize, CrossCompareReranker) from a stand-in for
microsoft/deberta-v3-large (a 400-piece sentencepiece model with DeBERTa-v3's special ids, 2
layers, hidden 32, position_buckets 8, max_position_embeddings 32 < the 44-token inputs, as 512 <
2048 for the real model), reloaded with Blender.loadranker (strict), converted to PairRM-hf's
DebertaV2PairRM as llm-blender's pairrm_to_hf notebook does.

transformers 4.x is the reference: llm-blender 0.0.2 does not import under transformers 5, whose
DeBERTa tokenizer conversion also drops sentencepiece's NFKC normalizer. Deterministic: a rerun
writes the same bytes.

Usage: python3 -m venv venv && venv/bin/pip install torch "transformers<5" sentencepiece protobuf \
           dataclasses-json safetensors numpy && venv/bin/pip install --no-deps llm-blender==0.0.2
       venv/bin/python scripts/make-pairrm.py
"""
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
import json
import os
import random
import shutil
import sys

# --- transformers 5.x compat shim: llm_blender imports TRANSFORMERS_CACHE -------------
import transformers
import transformers.utils.hub as _hub

if not hasattr(_hub, "TRANSFORMERS_CACHE"):
    _hub.TRANSFORMERS_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")
from transformers.tokenization_utils_base import PreTrainedTokenizerBase as _PTB

if not hasattr(_PTB, "batch_encode_plus"):  # removed in transformers 5.x; collator.py uses it
    _PTB.batch_encode_plus = lambda self, texts, **kw: self(texts, **kw)

import numpy as np
import torch
import safetensors.torch
import sentencepiece as spm

import llm_blender
from llm_blender.blender.blender_utils import load_ranker
from llm_blender.pair_ranker.config import RankerConfig
from llm_blender.pair_ranker.pairrm import DebertaV2PairRM
from llm_blender.pair_ranker.collator import CrossCompareCollator
from transformers import AutoTokenizer, DebertaV2Config, DebertaV2Model

OUT = tempfile.mkdtemp(prefix="rbon-pairrm-")
BASE = os.path.join(OUT, "base")
RM = os.path.join(OUT, "PairRM")
RMHF = str(ROOT / "data" / "models" / "tiny-pairrm")
GOLDEN = ROOT / "data" / "golden" / "tiny-pairrm.json"
SEED = 1234

# tiny sizes (real PairRM: source 1224, candidate 412, total 2048, max_position_embeddings 512)
SOURCE_MAXLEN = 20
CANDIDATE_MAXLEN = 12


def seed_all(s):
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


# ----------------------------------------------------------------------------- tokenizer
WORDS = (
    "the a an of to and in is it you that he was for on are with as I his they be at one "
    "have this from or had by hot word but what some we can out other were all there when "
    "up use your how said each she which do their time if will way about many then them "
    "write would like so these her long make thing see him two has look more day could go "
    "come did number sound no most people my over know water than call first who may down "
    "side been now find any new work part take get place made live where after back little "
    "only round man year came show every good me give our under name very through just form "
    "sentence great think say help low line differ turn cause much mean before move right "
    "boy old too same tell does set three want air well also play small end put home read "
    "hand port large spell add even land here must big high such follow act why ask men "
    "change went light kind off need house picture try us again animal point mother world "
    "near build self earth father hello hi love hate answer question python code function "
    "return value error please thanks sorry yes okay capital France Paris London number"
).split()
PUNCT = [".", ",", "!", "?", ":", ";", "(", ")", "'", '"', "-", "*", "#", "1", "2", "3", "42", "2024"]


def corpus(n=3000):
    rng = random.Random(SEED)
    for _ in range(n):
        k = rng.randint(3, 14)
        toks = []
        for _ in range(k):
            toks.append(rng.choice(WORDS) if rng.random() < 0.85 else rng.choice(PUNCT))
        s = " ".join(toks)
        if rng.random() < 0.3:
            s = s.capitalize()
        yield s


def build_spm(path_prefix):
    spm.SentencePieceTrainer.train(
        sentence_iterator=corpus(),
        model_prefix=path_prefix,
        model_type="unigram",
        vocab_size=400,
        hard_vocab_limit=False,
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",
        # DeBERTa-v3 spm layout: [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3
        pad_id=0, pad_piece="[PAD]",
        bos_id=1, bos_piece="[CLS]",
        eos_id=2, eos_piece="[SEP]",
        unk_id=3, unk_piece="[UNK]",
        num_threads=1,
        seed_sentencepiece_size=100000,
        minloglevel=2,
    )


# ----------------------------------------------------------------------------- weights
def randomize_(module, seed, std=0.2):
    """Larger-than-default random weights so that logits are O(0.1..1) and every tensor
    (incl. LayerNorm affine params) matters for the golden values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda x: x[0]):
            if "LayerNorm" in name or "layer_norm" in name:
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def main():
    seed_all(SEED)
    if os.path.exists(RMHF):
        shutil.rmtree(RMHF)
    os.makedirs(BASE)
    os.makedirs(RM)
    os.makedirs(RMHF)

    # 1. base "microsoft/deberta-v3-large" stand-in: spm.model + tokenizer_config.json
    build_spm(os.path.join(OUT, "spm"))
    shutil.copy(os.path.join(OUT, "spm.model"), os.path.join(BASE, "spm.model"))
    os.remove(os.path.join(OUT, "spm.model"))
    os.remove(os.path.join(OUT, "spm.vocab"))
    with open(os.path.join(BASE, "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": False, "vocab_type": "spm"}, f)  # same as deberta-v3-large

    # base config.json, same fields/values as microsoft/deberta-v3-large except sizes
    base_cfg = {
        "model_type": "deberta-v2",
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "max_position_embeddings": 32,   # real: 512 (< real max input 2048); tiny: 32 (< 44)
        "relative_attention": True,
        "position_buckets": 8,           # real: 256
        "norm_rel_ebd": "layer_norm",
        "share_att_key": True,
        "pos_att_type": "p2c|c2p",
        "layer_norm_eps": 1e-7,
        "max_relative_positions": -1,
        "position_biased_input": False,
        "num_attention_heads": 2,        # real: 16
        "num_hidden_layers": 2,          # real: 24
        "type_vocab_size": 0,
        "vocab_size": None,              # filled below (real: 128100)
    }
    with open(os.path.join(BASE, "config.json"), "w") as f:
        json.dump({"model_type": "deberta-v2"}, f)
    base_tok = AutoTokenizer.from_pretrained(BASE)  # like AutoTokenizer('microsoft/deberta-v3-large')
    base_cfg["vocab_size"] = len(base_tok) + 3  # real: 128100 > len(tok)=128001, resized later
    with open(os.path.join(BASE, "config.json"), "w") as f:
        json.dump(base_cfg, f, indent=2)
    config = DebertaV2Config.from_pretrained(BASE)
    base_model = DebertaV2Model(config)
    randomize_(base_model, SEED + 1)
    base_model.save_pretrained(BASE, safe_serialization=True)
    # save_pretrained rewrites config.json in its own format; keep ours (hub-like) instead
    with open(os.path.join(BASE, "config.json"), "w") as f:
        json.dump(base_cfg, f, indent=2)

    # 2. PairRM ranker config.json (RankerConfig fields as on the Hub, sizes shrunk)
    ranker_cfg = {
        "ranker_type": "pairranker",
        "model_type": "deberta",
        "model_name": BASE,                 # real: "microsoft/deberta-v3-large"
        "cache_dir": None,
        "load_checkpoint": None,
        "source_maxlength": SOURCE_MAXLEN,  # real: 1224
        "candidate_maxlength": CANDIDATE_MAXLEN,  # real: 412
        "n_tasks": 1,
        "num_pos": 5,
        "num_neg": 5,
        "sub_sampling_mode": "all_pair",
        "sub_sampling_ratio": 0.4,
        "loss_type": "instructgpt",
        "reduce_type": "linear",
        "inference_mode": "bubble",
        "drop_out": 0.05,
        "fp16": True,
    }
    rc = RankerConfig.from_dict(dict(ranker_cfg))
    rc.device = "cpu"
    # llm-blender's own construction path: tokenizer -> collator (adds the 4 prefix
    # tokens) -> AutoModel.from_pretrained(base) -> resize_token_embeddings(len(tok))
    # -> CrossCompareReranker
    ranker, tok, collator = load_ranker(rc)
    randomize_(ranker.head_layer, SEED + 2, std=0.3)
    with torch.no_grad():  # rows of the 4 added tokens (+ any resized rows): random too
        g = torch.Generator().manual_seed(SEED + 3)
        emb = ranker.pretrained_model.embeddings.word_embeddings.weight
        emb[len(base_tok):] = 0.2 * torch.randn(emb[len(base_tok):].shape, generator=g)
    sd = {k: v.detach().contiguous().clone() for k, v in ranker.state_dict().items()}
    safetensors.torch.save_file(sd, os.path.join(RM, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(RM, "config.json"), "w") as f:
        json.dump(ranker_cfg, f, indent=2)
    tok.save_pretrained(RM)  # convenience: tokenizer incl. <|source|> etc. (not on the real Hub repo)

    # 3. PairRM-hf layout (DebertaV2PairRM), as in pairrm_to_hf.ipynb
    hf_config = DebertaV2Config.from_pretrained(BASE)
    hf_config.vocab_size = len(tok)
    hf_config.n_tasks = 1
    hf_config.source_prefix_id = tok.convert_tokens_to_ids("<|source|>")
    hf_config.cand1_prefix_id = tok.convert_tokens_to_ids("<|candidate1|>")
    hf_config.cand2_prefix_id = tok.convert_tokens_to_ids("<|candidate2|>")
    hf_config.cand_prefix_id = tok.convert_tokens_to_ids("<|candidate|>")
    hf_config.drop_out = 0.05
    hf_config.sep_token_id = tok.sep_token_id  # PairRM-hf's config has it (transformers 5 has no default attr)
    pairrm_hf = DebertaV2PairRM(hf_config)
    safetensors.torch.load_model(pairrm_hf, os.path.join(RM, "model.safetensors"))  # strict: same names
    pairrm_hf.save_pretrained(RMHF, safe_serialization=True)
    tok.save_pretrained(RMHF)

    # ------------------------------------------------------------------ golden outputs
    golden = {
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "llm_blender": "0.0.2",
        },
        "source_maxlength": SOURCE_MAXLEN,
        "candidate_maxlength": CANDIDATE_MAXLEN,
        "special_ids": {
            "pad": tok.pad_token_id, "cls": tok.cls_token_id, "sep": tok.sep_token_id,
            "unk": tok.unk_token_id, "mask": tok.mask_token_id,
            "<|source|>": tok.convert_tokens_to_ids("<|source|>"),
            "<|candidate1|>": tok.convert_tokens_to_ids("<|candidate1|>"),
            "<|candidate2|>": tok.convert_tokens_to_ids("<|candidate2|>"),
            "<|candidate|>": tok.convert_tokens_to_ids("<|candidate|>"),
        },
        "len_tokenizer": len(tok),
        "base_vocab_size_before_resize": base_cfg["vocab_size"],
        "tensors": {k: list(v.shape) for k, v in sd.items()},
    }

    blender = llm_blender.Blender()
    blender.loadranker(RM, device="cpu")  # the real loading path (strict safetensors load)
    r = blender.ranker
    assert r.training is False

    # capture every encoder call (input ids) and head outputs
    calls = []

    def pre_hook(mod, args, kwargs):
        calls.append({"input_ids": kwargs["input_ids"].tolist(),
                      "attention_mask": kwargs["attention_mask"].tolist()})

    def post_hook(mod, args, kwargs, out):
        calls[-1]["last_hidden"] = out.hidden_states[-1]

    h1 = r.pretrained_model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    h2 = r.pretrained_model.register_forward_hook(post_hook, with_kwargs=True)

    triples = [
        ("hello!", "hi!", "go away!"),
        ("What is the capital of France?", "The capital of France is Paris.", "London"),
        ("Write a python function that will return the number 42, please.",
         "def f():\n    return 42", "I  can  not help  with that  [SEP] sorry"),
        ("Tell me a long story about the old man and the water near the house where he will live after the year",
         "One day the old man came back to his little house near the water and he said hello to his mother and father",
         "No."),
    ]
    pair_records = []
    for src, a, b in triples:
        rec = {"source": src, "cand1": a, "cand2": b}
        for mode, key in (("[A,B]", "logit_ab"), ("[B,A]", "logit_ba")):
            calls.clear()
            v = blender.compare([src], [a], [b], batch_size=1, return_logits=True, mode=mode, disable_tqdm=True)
            rec[key] = float(v[0])
            c = calls[0]
            ids = c["input_ids"][0]
            rec[key.replace("logit", "input_ids")] = ids
            hid = c["last_hidden"][0]
            sidx = ids.index(golden["special_ids"]["<|source|>"])
            c1 = ids.index(golden["special_ids"]["<|candidate1|>"])
            c2 = ids.index(golden["special_ids"]["<|candidate2|>"])
            with torch.no_grad():
                s1 = r.head_layer(torch.cat([hid[sidx], hid[c1]])).item()
                s2 = r.head_layer(torch.cat([hid[sidx], hid[c2]])).item()
            rec[key.replace("logit", "head")] = [s1, s2]
            rec[key.replace("logit", "prefix_positions")] = [sidx, c1, c2]
            assert abs((s1 - s2) - rec[key]) < 1e-5, (s1 - s2, rec[key])
        calls.clear()
        v = blender.compare([src], [a], [b], batch_size=1, return_logits=True, disable_tqdm=True)
        rec["compare_default"] = float(v[0])  # mode "[A,B]+[B,A]"
        rec["compare_default_expected"] = rec["logit_ab"] - rec["logit_ba"]
        pair_records.append(rec)
    golden["pairs"] = pair_records
    # ranks of N candidates
    rank_cases = [
        ("What is the capital of France?",
         ["Paris.", "The capital of France is Paris.", "London is a big city.", "I do not know, sorry."]),
        ("Write a python function that will return the number 42, please.",
         ["def f():\n    return 42", "return 42", "No!"]),
    ]
    rank_records = []
    for src, cands in rank_cases:
        calls.clear()
        with torch.no_grad():
            batch = collator([{"source": src, "candidates": cands}])
            batch = {k: v for k, v in batch.items() if v is not None}
            M = r._full_predict(**batch)["logits"][0].numpy()
        scores = blender.rank([src], [cands], return_scores=True, batch_size=1, disable_tqdm=True)[0]
        ranks = blender.rank([src], [cands], return_scores=False, batch_size=1, disable_tqdm=True)[0]
        n = len(cands)
        rank_records.append({
            "source": src,
            "candidates": cands,
            "cmp_matrix": M.tolist(),  # M[i][j] = logit(cand_i as candidate1, cand_j as candidate2); diag 0
            "scores_max_logits": [float(x) for x in scores],  # mean_j (M[i,j] - M[j,i])
            "scores_expected": [float(x) for x in (M - M.T).mean(axis=-1)],
            "ranks": [int(x) for x in ranks],  # 1 = best
        })
        # llm-blender's compare() of two candidates equals the pair entries of M
    golden["ranks"] = rank_records

    # compare_conversations (multi-turn formatting)
    conv_a = [{"role": "USER", "content": "hello"}, {"role": "ASSISTANT", "content": "hi there!"},
              {"role": "USER", "content": "what is 2 + 2?"}, {"role": "ASSISTANT", "content": "4"}]
    # rbon's samples of one prompt share every earlier turn; only the last answer differs.
    conv_b = [{"role": "USER", "content": "hello"}, {"role": "ASSISTANT", "content": "hi there!"},
              {"role": "USER", "content": "what is 2 + 2?"}, {"role": "ASSISTANT", "content": "5"}]
    calls.clear()
    v = blender.compare_conversations([conv_a], [conv_b], return_logits=True, mode="[A,B]")
    golden["conversation"] = {"conv_a": conv_a, "conv_b": conv_b, "logit_ab": float(v[0]),
                              "input_ids_ab": calls[0]["input_ids"][0]}
    h1.remove()
    h2.remove()

    # PairRM-hf path (DebertaV2PairRM.from_pretrained + README's tokenize_pair)
    hf = DebertaV2PairRM.from_pretrained(RMHF).eval()
    hf_tok = AutoTokenizer.from_pretrained(RMHF)

    def tokenize_pair(sources, c1s, c2s, source_max_length=SOURCE_MAXLEN, candidate_max_length=CANDIDATE_MAXLEN):
        ids = []
        max_length = source_max_length + 2 * candidate_max_length
        for i in range(len(sources)):
            source_ids = hf_tok.encode("<|source|>" + sources[i], max_length=source_max_length, truncation=True)
            cml = (max_length - len(source_ids)) // 2
            c1 = hf_tok.encode("<|candidate1|>" + c1s[i], max_length=cml, truncation=True)
            c2 = hf_tok.encode("<|candidate2|>" + c2s[i], max_length=cml, truncation=True)
            ids.append(source_ids + c1 + c2)
        return hf_tok.pad({"input_ids": ids}, return_tensors="pt", padding="max_length", max_length=max_length), ids

    enc, raw_ids = tokenize_pair([t[0] for t in triples], [t[1] for t in triples], [t[2] for t in triples])
    with torch.no_grad():
        out = hf(**enc).logits.tolist()
    golden["pairrm_hf"] = {"logits_ab_batched": out, "input_ids": raw_ids}

    # rbon reads the truncation lengths from config.json (defaults: the published 1224/412).
    cfg = json.loads(Path(RMHF, "config.json").read_text())
    cfg["source_maxlength"], cfg["candidate_maxlength"] = SOURCE_MAXLEN, CANDIDATE_MAXLEN
    Path(RMHF, "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for extra in ("spm.model", "added_tokens.json"):
        if os.path.exists(os.path.join(RMHF, extra)):
            os.remove(os.path.join(RMHF, extra))
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(OUT)

    # summary
    print("transformers", transformers.__version__, "torch", torch.__version__)
    print("special ids", golden["special_ids"], "len(tok)", len(tok))
    for p, hfl in zip(golden["pairs"], out):
        print(f"AB={p['logit_ab']:+.6f} BA={p['logit_ba']:+.6f} default={p['compare_default']:+.6f} "
              f"(expected {p['compare_default_expected']:+.6f}) hf_AB={hfl:+.6f} len={len(p['input_ids_ab'])}")
    for rr in golden["ranks"]:
        print("scores", np.round(rr["scores_max_logits"], 6), "expected", np.round(rr["scores_expected"], 6),
              "ranks", rr["ranks"])
    print("conversation logit_ab", golden["conversation"]["logit_ab"])
    print("wrote", RMHF, GOLDEN)


if __name__ == "__main__":
    main()
