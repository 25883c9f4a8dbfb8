#!/usr/bin/env python3
"""Writes tiny random-weight fixtures of the RBoN paper's other reward models, with golden outputs
from their reference implementations, for rbon's parity tests:

    data/models/tiny-shp/          T5ForConditionalGeneration shaped like
                                   stanfordnlp/SteamSHP-flan-t5-large (gated-gelu, untied lm_head,
                                   relative attention buckets), tiny Unigram tokenizer with T5's
                                   specials (<pad>=0, </s>=1, <unk>=2) and `▁A` as one piece
    data/models/tiny-eurus-rm/     openbmb/Eurus-RM-7b's layout: a Mistral body under `model.` and a
                                   bias-free `regression_head`, read at the last token
                                   (architectures ["EurusRewardModel"])
    data/models/tiny-starling-rm/  the same weights as Starling-RM-7B-alpha names them: the body
                                   under `transformer.` and the head as `v_head`
    data/models/tiny-gemma2/       Gemma2ForCausalLM: soft-capped attention scores and final logits
                                   (caps 8 and 15, small enough that tanh bends these random
                                   logits), sliding-window layers alternating with global ones
                                   (window 16, shorter than the golden inputs), pre- and post-
                                   norms, (1 + w) RMSNorm, embeddings scaled by √hidden,
                                   query_pre_attn_scalar 24 ≠ head_dim, GeGLU (tanh)
    data/models/tiny-rm-gemma2/    Gemma2ForSequenceClassification, the same shape
    data/golden/tiny-shp.json, tiny-eurus-rm.json, tiny-gemma2.json, tiny-rm-gemma2.json

SHP's golden follows the RBoN paper's reward_model.py: the input string
"POST: {prompt} \\n\\n RESPONSE A: {response}\\n\\n RESPONSE B: .\\n\\n Which response is better?
RESPONSE" (newlines of prompt and response replaced by spaces), tokenized with special tokens,
`model.generate(max_new_tokens=1, output_scores=True)`, and softmax(scores[0][0])[id of "A"].
Eurus-RM's follows its modeling_eurus_rm.py: regression_head(hidden) gathered at
attention_mask.cumsum(1).argmax(1), the last real token.

Float32, eager attention, one thread, fixed seeds in sorted parameter-name order, sorted JSON: a
rerun writes the same bytes. Shares its corpus, tokenizer and conversations with
scripts/make-tiny-models.py and scripts/make-tiny-scorers.py (imported).

Usage: pip install torch transformers tokenizers sentencepiece
       python3 scripts/make-paper-scorers.py
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import functools
import importlib.util
import itertools
import json
import math
import tempfile
from collections import Counter
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from torch import nn
from transformers import (
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma2ForSequenceClassification,
    MistralConfig,
    MistralModel,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
    T5TokenizerFast,
)


def _load(name, file):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(file))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tiny = _load("make_tiny_models", "make-tiny-models.py")
scorers = _load("make_tiny_scorers", "make-tiny-scorers.py")

MODELS_DIR = tiny.MODELS_DIR
GOLDEN_DIR = tiny.GOLDEN_DIR
write_json = tiny.write_json
fresh_dir = tiny.fresh_dir
tid = tiny.tid
init_weights = scorers.init_weights
BASE_SEED = scorers.BASE_SEED

SHP_TEMPLATE = "POST: {prompt} \n\n RESPONSE A: {response}\n\n RESPONSE B: .\n\n Which response is better? RESPONSE"
MIN_PROB_GAP = 1e-3  # between any two golden SHP probabilities
MIN_SCORE_GAP = scorers.MIN_SCORE_GAP


def shp_cases():
    """(prompt turns, response): one turn, a prompt and a response with newlines (flattened), two
    turns (joined by blank lines, then flattened), and a long answer."""
    out = []
    for conv in scorers.rm_conversations():
        *prompt, answer = conv
        out.append(([m for m in prompt if m["role"] != "system"] or prompt, answer["content"]))
    out[1] = ([{"role": "user", "content": "Why is the sky blue?\nAnswer briefly."}],
              "Sunlight is scattered by the air.\n\nBlue light scatters the most.")
    return out


def question_text(prompt):
    return "\n\n".join(m["content"] for m in prompt)


def shp_input(prompt, response):
    return SHP_TEMPLATE.replace("{prompt}", question_text(prompt).replace("\n", " ")).replace(
        "{response}", response.replace("\n", " "))


# ---------------------------------------------------------------------------------------------
# SteamSHP (Flan-T5)


def t5_normalizer():
    return normalizers.Sequence([normalizers.Replace(Regex(r"\s{2,}|[\n\r\t]"), " "), normalizers.NFKC(),
                                 normalizers.Strip()])


def t5_vocab(max_pieces=360):
    """Unigram pieces from counts over the corpus and the SHP inputs (deterministic): T5's
    specials first, then every character, `▁A` (Flan-T5 has it as one piece, id 71), whole words
    and 2–4 character substrings by count."""
    norm, pre = t5_normalizer(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    words = Counter()
    texts = tiny.CORPUS + [shp_input(p, r) for p, r in shp_cases()]
    for line in texts:
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
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, round(math.log(c / total), 6)) for p, c in pieces]
    assert "▁A" in dict(vocab), "▁A must be one piece"
    return vocab


def save_t5_tokenizer(folder):
    tok = Tokenizer(models.Unigram(t5_vocab(), unk_id=2, byte_fallback=False))
    tok.normalizer = t5_normalizer()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    hf = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)
    hf.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def t5_config(vocab_size):
    return T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.1,
        layer_norm_epsilon=1e-6,
        initializer_factor=1.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        is_encoder_decoder=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


@torch.no_grad()
def shp_probs(model, tok, a_id):
    """The paper's way: generate one token with scores, softmax, the probability of "A"."""
    out = []
    for prompt, response in shp_cases():
        x = tok([shp_input(prompt, response)], return_tensors="pt").input_ids
        gen = model.generate(x, return_dict_in_generate=True, output_scores=True, max_new_tokens=1, do_sample=False)
        p = float(torch.softmax(gen.scores[0][0], dim=0)[a_id])
        # The same number from one forward pass (what rbon computes).
        logits = model(input_ids=x, decoder_input_ids=torch.tensor([[0]])).logits[0, -1]
        assert abs(float(torch.softmax(logits, dim=0)[a_id]) - p) < 1e-7
        out.append(p)
    return out


@torch.no_grad()
def untie_lm_head(model, seed):
    """Flan-T5 (T5 v1.1) has an lm_head of its own and does not rescale the decoder output.
    transformers 5 always builds T5 with the head tied; a head of its own, present in the
    checkpoint, is kept on load (and `tie_word_embeddings: false` turns the rescaling off)."""
    gen = torch.Generator().manual_seed(seed + 1)
    w = scorers.EMBED_STD * torch.randn(model.lm_head.weight.shape, generator=gen, dtype=torch.float32)
    model.lm_head.weight = nn.Parameter(w)


def save_untied(model, folder):
    """The layout of stanfordnlp/SteamSHP-flan-t5-large: config with tie_word_embeddings false,
    weights with `shared.weight` and a separate `lm_head.weight`."""
    model.generation_config.max_new_tokens = 1
    model.save_pretrained(str(folder), safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = False
    config.pop("scale_decoder_outputs", None)
    write_json(folder / "config.json", config)
    tensors = {k: v.detach().clone().contiguous() for k, v in sorted(model.state_dict().items())
               if not k.endswith("embed_tokens.weight")}
    assert "lm_head.weight" in tensors and "shared.weight" in tensors
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


@torch.no_grad()
def make_shp():
    folder = MODELS_DIR / "tiny-shp"
    fresh_dir(folder)
    tok = save_t5_tokenizer(folder)
    [a_id] = tok("A", add_special_tokens=False).input_ids
    for seed in itertools.count(BASE_SEED + 30000):
        config = t5_config(len(tok))
        config._attn_implementation = "eager"
        model = T5ForConditionalGeneration(config).to(torch.float32).eval()
        init_weights(model, seed)
        untie_lm_head(model, seed)
        probs = shp_probs(model, tok, a_id)
        if min(abs(a - b) for a, b in itertools.combinations(probs, 2)) >= MIN_PROB_GAP and min(probs) > 1e-3:
            break
        assert seed < BASE_SEED + 31000, "tiny-shp: no usable seed found"
    save_untied(model, folder)
    model = T5ForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert not model.config.scale_decoder_outputs
    cases = []
    for (prompt, response), p in zip(shp_cases(), shp_probs(model, tok, a_id)):
        text = shp_input(prompt, response)
        cases.append({"prompt": prompt, "response": response, "input": text,
                      "input_ids": tok(text).input_ids, "prob_a": p})
    scorers.check_raw_tokenizer(folder, [c["input"] for c in cases], [c["input_ids"] for c in cases],
                                add_special_tokens=True)
    data = {
        "model_type": model.config.model_type,
        "a_token_id": a_id,
        "decoder_start_token_id": model.config.decoder_start_token_id,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "cases": cases,
    }
    write_json(GOLDEN_DIR / "tiny-shp.json", data)
    return folder, seed, data


# ---------------------------------------------------------------------------------------------
# Eurus-RM (and Starling-RM's names for the same layout)


class EurusRewardModel(PreTrainedModel):
    """openbmb/Eurus-RM-7b's modeling_eurus_rm.py: a Mistral body and a linear head read at the
    last real token."""

    config_class = MistralConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = MistralModel(config)
        self.regression_head = nn.Linear(config.hidden_size, 1, bias=False)
        self.post_init()

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids, attention_mask=attention_mask).last_hidden_state
        rewards = self.regression_head(hidden).squeeze(-1)
        ends = attention_mask.cumsum(dim=1).argmax(dim=1).view(-1, 1)
        return torch.gather(rewards, 1, ends), rewards


def eurus_config():
    cfg = MistralConfig(
        vocab_size=tiny.VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        max_position_embeddings=512, rms_norm_eps=1e-6, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=None, rope_theta=10000.0, bos_token_id=tid("<s>"),
        eos_token_id=tid("</s>"), pad_token_id=tid("<pad>"), tie_word_embeddings=False,
    )
    cfg.architectures = ["EurusRewardModel"]
    cfg._attn_implementation = "eager"
    return cfg


@torch.no_grad()
def eurus_scores(model, inputs, mark):
    """Per input: the reward at the last token, and at the last `mark` token."""
    out = []
    for ids in inputs:
        last, per_token = model(torch.tensor([ids]))
        at = max(i for i, t in enumerate(ids) if t == mark)
        out.append((float(last[0, 0]), float(per_token[0, at])))
    return out


@torch.no_grad()
def make_eurus(base):
    folder = MODELS_DIR / "tiny-eurus-rm"
    fresh_dir(folder)
    special = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", add_bos_token=True)
    tiny.save_tokenizer(base, folder, special, tiny.MISTRAL_TEMPLATE, False)
    tok = AutoTokenizer.from_pretrained(str(folder))
    convs = scorers.rm_conversations()
    rendered = [tok.apply_chat_template(m, tokenize=False) for m in convs]
    inputs = [tok(r, add_special_tokens=False).input_ids for r in rendered]
    mark = tid("[/INST]")
    for seed in itertools.count(BASE_SEED + 40000):
        model = EurusRewardModel(eurus_config()).to(torch.float32).eval()
        init_weights(model, seed)
        with torch.no_grad():
            model.regression_head.weight.mul_(scorers.EMBED_STD / scorers.WEIGHT_STD)
        scores = eurus_scores(model, inputs, mark)
        if scorers.min_gap([s for pair in scores for s in pair]) >= MIN_SCORE_GAP:
            break
        assert seed < BASE_SEED + 41000, "tiny-eurus-rm: no usable seed found"
    model.save_pretrained(str(folder), safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["EurusRewardModel"] and config["model_type"] == "mistral", config
    names = scorers.tensor_names(folder)
    assert "regression_head.weight" in names and "model.embed_tokens.weight" in names, names
    # Padded batch (right padding), as Eurus' own gather reads it.
    pad = tok.pad_token_id
    width = max(map(len, inputs))
    ids = torch.tensor([x + [pad] * (width - len(x)) for x in inputs])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in inputs])
    batch = [float(v) for v in model(ids, attention_mask=mask)[0][:, 0]]
    diff = max(abs(b - s[0]) for b, s in zip(batch, scores))
    assert diff <= scorers.BATCH_TOLERANCE, diff
    cases = [{"messages": m, "rendered": r, "input_ids": i, "score": s, "score_at_mark": sm}
             for m, r, i, (s, sm) in zip(convs, rendered, inputs, scores)]
    data = {
        "model_type": "mistral",
        "head": "regression_head",
        "mark_token": "[/INST]",
        "mark_token_id": mark,
        "batch_max_abs_diff": diff,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "cases": cases,
    }
    write_json(GOLDEN_DIR / "tiny-eurus-rm.json", data)

    # Starling-RM-7B-alpha's names: `transformer.` body, `v_head`.
    starling = MODELS_DIR / "tiny-starling-rm"
    fresh_dir(starling)
    for f in sorted(folder.iterdir()):
        if f.name != "model.safetensors":
            (starling / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(folder / "model.safetensors"))
    renamed = {("transformer." + k[len("model."):] if k.startswith("model.") else
                "v_head.weight" if k == "regression_head.weight" else k): v for k, v in sorted(tensors.items())}
    save_file(renamed, str(starling / "model.safetensors"), metadata={"format": "pt"})
    config["architectures"] = ["LlamaForCausalLM"]
    write_json(starling / "config.json", config)
    return folder, seed, data


# ---------------------------------------------------------------------------------------------
# Gemma-2 (as a policy and as a reward model)

# Gemma's turn format on the shared vocabulary (</s> stands in for <end_of_turn>).
GEMMA2_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}
    {{- '<start_of_turn>' + role + '\n' + message['content'] | trim + '</s>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\n' }}
{%- endif %}"""


def gemma2_config(cls=Gemma2Config, **extra):
    return cls(
        vocab_size=tiny.VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        max_position_embeddings=512, rms_norm_eps=1e-6, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, query_pre_attn_scalar=24, sliding_window=16, attn_logit_softcapping=8.0,
        final_logit_softcapping=15.0, hidden_activation="gelu_pytorch_tanh", rope_theta=10000.0,
        bos_token_id=tid("<s>"), eos_token_id=tid("</s>"), pad_token_id=tid("<pad>"), **extra,
    )


GEMMA2_SPEC = dict(
    model_cls=Gemma2ForCausalLM,
    config=lambda: gemma2_config(tie_word_embeddings=True),
    tokenizer=dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", add_bos_token=True),
    template=GEMMA2_TEMPLATE,
    template_in_jinja_file=False,
    generation=dict(bos_token_id=tid("<s>"), eos_token_id=tid("</s>"), pad_token_id=tid("<pad>")),
    turn_end="</s>",
    max_shard_size=None,
)


@torch.no_grad()
def check_gemma2_features(model, ids):
    """Each Gemma-2 feature moves the logits of the golden input, so the parity test covers it."""
    x = torch.tensor([ids])
    base = model(x).logits[0]
    cfg = model.config
    moved = {}
    for key, off in (("final_logit_softcapping", None), ("attn_logit_softcapping", None), ("sliding_window", 10**6)):
        saved = getattr(cfg, key)
        setattr(cfg, key, off)
        for layer in model.model.layers:
            layer.self_attn.config = cfg
            layer.self_attn.attn_logit_softcapping = cfg.attn_logit_softcapping
        try:
            moved[key] = float((model(x).logits[0] - base).abs().max())
        finally:
            setattr(cfg, key, saved)
            for layer in model.model.layers:
                layer.self_attn.attn_logit_softcapping = cfg.attn_logit_softcapping
        assert moved[key] > 1e-3, (key, moved[key])
    return moved


def make_gemma2(base):
    tiny.ARCHS["gemma2"] = GEMMA2_SPEC
    spec = GEMMA2_SPEC
    with tempfile.TemporaryDirectory() as scratch:
        tiny.save_tokenizer(base, Path(scratch), spec["tokenizer"], spec["template"], False)
        tok = AutoTokenizer.from_pretrained(scratch)
    prompts = [tok(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False).input_ids for m in tiny.conversations("gemma2")]
    assert max(map(len, prompts)) + tiny.RESPONSE_LEN > 16
    # tiny.build_model also wants a greedy run that stops; these random Gemma-2 weights (scaled
    # embeddings tied to the head) never pick EOS greedily, and stopping is covered by the others.
    eos = tiny.eos_list(spec)
    for attempt in itertools.count():
        seed = BASE_SEED + 1000 * list(tiny.ARCHS).index("gemma2") + attempt
        config = spec["config"]()
        config._attn_implementation = "eager"
        model = spec["model_cls"](config).to(torch.float32).eval()
        tiny.init_weights(model, seed)
        runs = [tiny.greedy_by_recompute(model, p, eos) for p in prompts]
        if all(ids[0] not in eos for ids, _ in runs) and min(m for _, m in runs) >= tiny.MIN_GREEDY_MARGIN:
            break
        assert attempt < 1000, "tiny-gemma2: no usable seed found"
    folder = tiny.save_model("gemma2", spec, model, base)
    # tiny.golden's window check turns the window off with None, which Gemma-2's cache refuses.
    saved_check = tiny.check_sliding_window
    tiny.check_sliding_window = functools.partial(saved_check, off=10**6)
    try:
        data, notes = tiny.golden("gemma2", spec, folder, [ids for ids, _ in runs])
    finally:
        tiny.check_sliding_window = saved_check
    data.update(notes)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager",
                                                                 dtype=torch.float32).eval()
    case = data["cases"][-1]
    data["feature_effects"] = check_gemma2_features(reloaded, case["prompt_ids"] + case["response_ids"])
    write_json(GOLDEN_DIR / "tiny-gemma2.json", data)

    scorers.RM_ARCHS["gemma2"] = dict(
        model_cls=Gemma2ForSequenceClassification,
        config=lambda: gemma2_config(num_labels=1, tie_word_embeddings=False),
        tokenizer=spec["tokenizer"],
        template=GEMMA2_TEMPLATE,
    )
    rm_folder, rm_seed, rm_data = scorers.make_rm("gemma2", scorers.RM_ARCHS["gemma2"], base)
    return (folder, seed, data), (rm_folder, rm_seed, rm_data)


def main():
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    folder, seed, data = make_shp()
    probs = [round(c["prob_a"], 5) for c in data["cases"]]
    scorers.report(folder, seed, f"lengths {[len(c['input_ids']) for c in data['cases']]}, P(A) {probs}")

    base = tiny.train_tokenizer()
    (folder, seed, data), (rm_folder, rm_seed, rm_data) = make_gemma2(base)
    print(f"{folder.relative_to(tiny.ROOT)}: seed {seed}, greedy lengths "
          f"{[len(c['greedy_ids']) for c in data['cases']]}, logprob sums "
          f"{[round(c['logprob_sum'], 3) for c in data['cases']]}, feature effects {data['feature_effects']}")
    scorers.report(rm_folder, rm_seed, f"scores {[round(c['score'], 4) for c in rm_data['cases']]}")
    folder, seed, data = make_eurus(base)
    scores = [(round(c["score"], 4), round(c["score_at_mark"], 4)) for c in data["cases"]]
    scorers.report(folder, seed, f"scores (last, at [/INST]) {scores}")


if __name__ == "__main__":
    main()
