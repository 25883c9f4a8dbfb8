#!/usr/bin/env python3
"""Writes tiny random-weight causal LMs and golden outputs for rbon's parity tests.

rbon's decoder (candle) must agree with Hugging Face transformers (DESIGN.md §4: log-probs within
1e-4 per token in f32). This script builds, with transformers itself, one tiny model per supported
architecture flavour, plus the outputs the Rust tests compare against, so that CI needs no Python:

    data/tokenizers/tiny-bpe/        the shared byte-level BPE tokenizer (vocab 384, no template)
    data/models/tiny-llama/          LlamaForCausalLM: GQA 4/2, llama3 rope scaling, untied head,
                                     two safetensors shards + model.safetensors.index.json,
                                     eos_token_id a list, Llama-3 chat template, BOS auto-added
    data/models/tiny-mistral/        MistralForCausalLM: MQA 4/1, explicit head_dim, sliding
                                     window 16, untied head, Mistral v0.3 [INST] template
    data/models/tiny-qwen2/          Qwen2ForCausalLM: q/k/v biases, tied embeddings, ChatML with
                                     default system prompt, template inside tokenizer_config.json;
                                     config carries `sliding_window` with `use_sliding_window: false`
                                     (as real Qwen2.5 configs do): the window must NOT be applied
    data/models/tiny-qwen3/          Qwen3ForCausalLM: q_norm/k_norm, head_dim 32 != hidden/heads,
                                     tied embeddings, Qwen3 template (Python string methods,
                                     namespace, reverse slicing) in chat_template.jinja
    data/golden/tiny-<arch>.json     per model: 3 conversations with rendered prompt, prompt ids,
                                     a fixed response with teacher-forced per-token log-probs,
                                     their sum, the greedy continuation and the first last-position
                                     logits

All models share one vocabulary (the special tokens of every family are in it); each model folder
gets its own tokenizer_config.json (family-specific bos/eos and template) and tokenizer.json
(Llama and Mistral prepend BOS when special tokens are added, Qwen does not).

Weights are drawn from a fixed seed with large std (0.2 in the layers, 0.5 for embeddings and
head) so that next-token distributions are far from uniform (entropy about 2 nats of 5.95).
The seed is searched deterministically: the first seed is kept whose greedy continuations never
start with EOS, at least one of which stops on EOS before MAX_NEW_TOKENS, and which never have a
top-1/top-2 logit gap below MIN_GREEDY_MARGIN, so that the goldens exercise the EOS stop and a Rust
implementation that is right to 1e-4 reproduces the greedy ids exactly.

Everything runs on CPU in float32 with attn_implementation="eager", one thread, deterministic
algorithms; JSON is written with sorted keys and no timestamps. Rerunning gives byte-identical
files (check with `sha256sum $(find data/models/tiny-* data/tokenizers data/golden -type f)`).

Usage: pip install torch transformers tokenizers && python3 scripts/make-tiny-models.py
       (written against torch 2.x, transformers 5.x, tokenizers 0.23; run from anywhere)
"""

import json
import random
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
TOKENIZER_DIR = DATA / "tokenizers" / "tiny-bpe"
MODELS_DIR = DATA / "models"
GOLDEN_DIR = DATA / "golden"

VOCAB_SIZE = 384
HIDDEN = 64
LAYERS = 2
INTERMEDIATE = 128
WEIGHT_STD = 0.2  # linear weights inside the layers
EMBED_STD = 0.5  # embed_tokens and lm_head (tied or not): peaked next-token distributions
BIAS_STD = 0.1  # attention biases (Qwen2): large enough to matter
NORM_NOISE_STD = 0.1  # RMSNorm weights are 1 + noise
MAX_NEW_TOKENS = 20
RESPONSE_LEN = 24  # ordinary tokens, EOS appended
MIN_GREEDY_MARGIN = 1e-3  # top-1 minus top-2 logit at every greedy step
BASE_SEED = 20240402  # arXiv 2404.01054

# Order fixes the ids: <s>=0, </s>=1, <pad>=2, ... (the BPE trainer puts specials first).
SPECIAL_TOKENS = [
    "<s>",
    "</s>",
    "<pad>",
    "<|im_start|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "[INST]",
    "[/INST]",
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Why is the sky blue? Sunlight is scattered by the air, and blue light scatters the most.",
    "She sells sea shells by the sea shore.",
    "Reading a good book on a rainy afternoon is one of life's small pleasures.",
    "Practice every day, keep it simple, and ask for feedback.",
    "The meeting has been moved to Thursday at three o'clock.",
    "Numbers like 42, 3.14 and 2024 appear in text as well.",
    "Bees make honey from the nectar of flowers.",
    "Leaves change colour in autumn because the green chlorophyll breaks down.",
    "A hash function maps data of any size to a fixed-size value.",
    "Recursion is when a function calls itself on a smaller problem.",
    "Compound interest is interest earned on interest.",
    "To sleep better, keep a regular schedule and avoid screens before bed.",
    "system",
    "user",
    "assistant",
    "You are a helpful assistant.",
    "You are a terse assistant. Answer in one sentence.",
    "Hello! How can I help you today?",
    "Hi there, can you help me plan a trip?",
    "Of course. Where would you like to go, and for how long?",
    "Sure! Here is a short answer to your question.",
    "Thank you, that was very helpful.",
    "I'm sorry, I don't know the answer to that.",
    "Let me think about this step by step.",
    "First, we need to understand the problem. Then we can solve it.",
    "Could you give me three tips for a first marathon?",
    "Start slowly, drink water, and rest the day before the race.",
    "What is the difference between weather and climate?",
    "Weather is what happens today; climate is the pattern over many years.",
    "Write a haiku about autumn rain.",
    "Soft rain on red leaves, the garden hums a quiet song, autumn says goodbye.",
    "How do I keep basil alive indoors? Give it sun and water it when the soil is dry.",
    "user: hello\nassistant: hi\n\nuser: thanks\nassistant: you're welcome",
    "Question: what is two plus two?\nAnswer: four.",
    "Café, naïve, résumé: accents are bytes too. 日本語 and emoji 🙂 as well.",
    "def add(a, b):\n    return a + b\n",
    "    Indented text, tabs\tand trailing spaces   \n",
]

# Llama 3 (3.0) instruct template: BOS first, `| trim` on contents, generation prompt.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Mistral v0.3 instruct template: BOS, system message folded into the LAST user turn,
# raise_exception on bad role order; it ignores add_generation_prompt.
MISTRAL_TEMPLATE = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"] + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# Qwen2 / Qwen2.5 instruct template: ChatML with a default system prompt, no BOS.
QWEN2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen3 template (tools branch removed): namespace, messages[::-1], `is string`, and the Python
# string methods startswith / endswith / split / strip / lstrip / rstrip.
QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content.strip() + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""


def tid(token):
    """Id of a special token in the shared vocabulary."""
    return SPECIAL_TOKENS.index(token)


def common_config(**extra):
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        pad_token_id=tid("<pad>"),
        **extra,
    )


# Per architecture: config, model class, tokenizer special tokens, template and where it is
# stored, generation_config, and the token that closes an assistant turn (ends response_ids).
ARCHS = {
    "llama": dict(
        model_cls=LlamaForCausalLM,
        config=lambda: LlamaConfig(
            **common_config(
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
                tie_word_embeddings=False,
                bos_token_id=tid("<s>"),
                eos_token_id=[tid("</s>"), tid("<|eot_id|>")],
            )
        ),
        tokenizer=dict(bos_token="<s>", eos_token="<|eot_id|>", pad_token="<pad>", add_bos_token=True),
        template=LLAMA3_TEMPLATE,
        template_in_jinja_file=False,
        generation=dict(
            bos_token_id=tid("<s>"),
            eos_token_id=[tid("</s>"), tid("<|eot_id|>")],
            do_sample=True,
            temperature=0.6,
            top_p=0.9,
        ),
        turn_end="<|eot_id|>",
        max_shard_size="300KB",  # ~490 KB of weights: two shards + index
    ),
    "mistral": dict(
        model_cls=MistralForCausalLM,
        config=lambda: MistralConfig(
            **common_config(
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=16,
                sliding_window=16,
                rope_theta=1000000.0,
                tie_word_embeddings=False,
                bos_token_id=tid("<s>"),
                eos_token_id=tid("</s>"),
            )
        ),
        tokenizer=dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", add_bos_token=True),
        template=MISTRAL_TEMPLATE,
        template_in_jinja_file=False,
        generation=dict(bos_token_id=tid("<s>"), eos_token_id=tid("</s>")),
        turn_end="</s>",
        max_shard_size=None,
    ),
    "qwen2": dict(
        model_cls=Qwen2ForCausalLM,
        config=lambda: Qwen2Config(
            **common_config(
                num_attention_heads=4,
                num_key_value_heads=2,
                rope_theta=1000000.0,
                tie_word_embeddings=True,
                use_sliding_window=False,
                max_window_layers=LAYERS,
                bos_token_id=None,
                eos_token_id=tid("<|im_end|>"),
            )
        ),
        tokenizer=dict(bos_token=None, eos_token="<|im_end|>", pad_token="<pad>"),
        template=QWEN2_TEMPLATE,
        template_in_jinja_file=False,
        generation=dict(eos_token_id=tid("<|im_end|>"), pad_token_id=tid("<pad>")),
        turn_end="<|im_end|>",
        max_shard_size=None,
        # Written to config.json but inert because use_sliding_window is false (a trap that real
        # Qwen2.5 configs set with 32768/131072); transformers re-reads it as None.
        inert_sliding_window=16,
    ),
    "qwen3": dict(
        model_cls=Qwen3ForCausalLM,
        config=lambda: Qwen3Config(
            **common_config(
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=32,
                rope_theta=1000000.0,
                tie_word_embeddings=True,
                use_sliding_window=False,
                max_window_layers=LAYERS,
                bos_token_id=None,
                eos_token_id=tid("<|im_end|>"),
            )
        ),
        tokenizer=dict(bos_token=None, eos_token="<|im_end|>", pad_token="<pad>"),
        template=QWEN3_TEMPLATE,
        template_in_jinja_file=True,
        generation=dict(
            eos_token_id=[tid("<|im_end|>"), tid("</s>")],
            pad_token_id=tid("<pad>"),
            do_sample=True,
            temperature=0.6,
            top_k=20,
            top_p=0.95,
        ),
        turn_end="<|im_end|>",
        max_shard_size=None,
    ),
}


def conversations(arch):
    """The three golden conversations. The last user turn carries surrounding whitespace (Llama's
    `| trim` removes it); for Qwen3 the earlier assistant turn holds a <think> block that its
    template strips with Python string methods."""
    earlier_answer = "Of course. Where would you like to go, and for how long?"
    if arch == "qwen3":
        earlier_answer = "<think>\nThe user wants help with a trip.\n</think>\n\n" + earlier_answer
    return [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
        [
            {"role": "user", "content": "Hi there, can you help me plan a trip?"},
            {"role": "assistant", "content": earlier_answer},
            {"role": "user", "content": "  Somewhere warm in winter, please.  "},
        ],
    ]


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def fresh_dir(path):
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def save_tokenizer(base, out_dir, special, template=None, template_in_jinja_file=False):
    """Wraps the trained tokenizer with transformers and saves it. transformers 5 no longer writes
    special_tokens_map.json; we add it (older layout, still read by both transformers and tools)."""
    extra = [t for t in SPECIAL_TOKENS if t not in special.values()]
    hf = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(base.to_str()),
        additional_special_tokens=extra,
        **special,
    )
    if template is not None:
        hf.chat_template = template
    hf.save_pretrained(str(out_dir), save_jinja_files=template_in_jinja_file)
    smap = {k: v for k, v in special.items() if k.endswith("_token") and not k.startswith("add_") and v is not None}
    smap["additional_special_tokens"] = extra
    write_json(out_dir / "special_tokens_map.json", smap)
    config = json.loads((out_dir / "tokenizer_config.json").read_text())
    if template_in_jinja_file:
        assert "chat_template" not in config and (out_dir / "chat_template.jinja").exists()
    elif template is not None:
        assert config.get("chat_template") == template and not (out_dir / "chat_template.jinja").exists()


# ---------------------------------------------------------------------------------------------
# Models


@torch.no_grad()
def init_weights(model, seed):
    """Large-std normal weights (larger for the embeddings and head), RMSNorm weights 1 + noise,
    non-zero biases; drawn in sorted name order so the draw does not depend on module registration
    order. Tied weights are drawn once."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if "norm" in name:
            p.copy_(1.0 + NORM_NOISE_STD * noise)
        elif name.endswith(".bias"):
            p.copy_(BIAS_STD * noise)
        elif "embed_tokens" in name or "lm_head" in name:
            p.copy_(EMBED_STD * noise)
        else:
            p.copy_(WEIGHT_STD * noise)


@torch.no_grad()
def greedy_by_recompute(model, prompt_ids, eos_ids):
    """Greedy decoding with a full forward pass per step (no KV cache). Returns the ids and the
    smallest top-1/top-2 logit gap seen."""
    ids = list(prompt_ids)
    out, margin = [], float("inf")
    for _ in range(MAX_NEW_TOKENS):
        logits = model(torch.tensor([ids])).logits[0, -1]
        top = torch.topk(logits, 2)
        margin = min(margin, float(top.values[0] - top.values[1]))
        nxt = int(top.indices[0])
        out.append(nxt)
        ids.append(nxt)
        if nxt in eos_ids:
            break
    return out, margin


def eos_list(spec):
    eos = spec["generation"]["eos_token_id"]
    return eos if isinstance(eos, list) else [eos]


def build_model(arch, spec, prompts):
    """First seed (from a deterministic sequence) whose greedy runs are usable; see module doc."""
    eos = eos_list(spec)
    for attempt in range(1000):
        seed = BASE_SEED + 1000 * list(ARCHS).index(arch) + attempt
        config = spec["config"]()
        config._attn_implementation = "eager"
        model = spec["model_cls"](config).to(torch.float32).eval()
        init_weights(model, seed)
        runs = [greedy_by_recompute(model, p, eos) for p in prompts]
        no_eos_first = all(ids[0] not in eos for ids, _ in runs)
        some_stop = any(len(ids) < MAX_NEW_TOKENS and ids[-1] in eos for ids, _ in runs)
        if no_eos_first and some_stop and min(m for _, m in runs) >= MIN_GREEDY_MARGIN:
            return model, seed, runs
    raise SystemExit(f"{arch}: no usable seed found")


def save_model(arch, spec, model, base_tokenizer):
    out = MODELS_DIR / f"tiny-{arch}"
    fresh_dir(out)
    model.generation_config = GenerationConfig(**spec["generation"])
    if "inert_sliding_window" in spec:
        model.config.sliding_window = spec["inert_sliding_window"]
    kwargs = {"safe_serialization": True}
    if spec["max_shard_size"]:
        kwargs["max_shard_size"] = spec["max_shard_size"]
    model.save_pretrained(str(out), **kwargs)
    if "inert_sliding_window" in spec:
        model.config.sliding_window = None
    save_tokenizer(base_tokenizer, out, spec["tokenizer"], spec["template"], spec["template_in_jinja_file"])
    return out


# ---------------------------------------------------------------------------------------------
# Golden outputs


def response_ids(arch, case_index, turn_end_id):
    rng = random.Random(BASE_SEED * 10 + 100 * list(ARCHS).index(arch) + case_index)
    ordinary = range(len(SPECIAL_TOKENS), VOCAB_SIZE)
    return [rng.choice(ordinary) for _ in range(RESPONSE_LEN)] + [turn_end_id]


@torch.no_grad()
def teacher_forced_logprobs(model, prompt, response):
    ids = torch.tensor([prompt + response])
    logits = model(ids).logits[0]
    logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    picked = logprobs.gather(1, torch.tensor(response)[:, None])[:, 0]
    return [float(x) for x in picked], logits


@torch.no_grad()
def check_sliding_window(model, ids, window, off=None):
    """Shows that the window changes the logits exactly at positions >= window (eager path).
    `off` is the setting without a window (Gemma-2's cache wants a number there, not None)."""
    x = torch.tensor([ids])
    with_window = model(x).logits[0]
    saved = model.config.sliding_window
    model.config.sliding_window = off
    try:
        full = model(x).logits[0]
    finally:
        model.config.sliding_window = saved
    diff = (with_window - full).abs().amax(dim=-1)
    assert float(diff[:window].max()) == 0.0, "window changed positions inside it"
    assert float(diff[window:].min()) > 1e-4, "sliding window not applied"
    return float(diff[window:].min())


@torch.no_grad()
def golden(arch, spec, model_dir, expected_greedy):
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager", dtype=torch.float32).eval()
    eos = eos_list(spec)
    assert list(eos_list(dict(generation=model.generation_config.to_dict()))) == eos
    turn_end_id = tok.convert_tokens_to_ids(spec["turn_end"])
    cases, notes = [], {}
    for i, messages in enumerate(conversations(arch)):
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = tok(rendered, add_special_tokens=False).input_ids
        if tok.bos_token is not None:
            assert prompt[0] == tok.bos_token_id and prompt[1] != tok.bos_token_id
        response = response_ids(arch, i, turn_end_id)
        logprobs, logits = teacher_forced_logprobs(model, prompt, response)
        gen = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            generation_config=GenerationConfig(
                do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos, pad_token_id=tok.pad_token_id
            ),
        )
        greedy = [int(t) for t in gen[0, len(prompt) :]]
        assert greedy == expected_greedy[i], (arch, i, greedy, expected_greedy[i])
        if getattr(model.config, "sliding_window", None):
            notes[f"case{i}_min_logit_change_from_window"] = check_sliding_window(
                model, prompt + response, model.config.sliding_window
            )
        cases.append(
            {
                "messages": messages,
                "rendered": rendered,
                "prompt_ids": prompt,
                "response_ids": response,
                "token_logprobs": logprobs,
                "logprob_sum": sum(logprobs),
                "greedy_ids": greedy,
                "last_logits_head": [float(x) for x in logits[len(prompt) - 1, :8]],
            }
        )
    return {
        "model_type": model.config.model_type,
        "eos_token_ids": eos,
        "bos_token_id": tok.bos_token_id,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "cases": cases,
    }, notes


def main():
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    base = train_tokenizer()
    fresh_dir(TOKENIZER_DIR)
    save_tokenizer(base, TOKENIZER_DIR, dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>"))
    print(f"tokenizer: {TOKENIZER_DIR.relative_to(ROOT)} vocab {base.get_vocab_size()}")
    print("special ids: " + ", ".join(f"{t}={i}" for i, t in enumerate(SPECIAL_TOKENS)))

    for arch, spec in ARCHS.items():
        # Prompts come from the template alone, so render them with a throwaway tokenizer first.
        with tempfile.TemporaryDirectory() as scratch:
            save_tokenizer(base, Path(scratch), spec["tokenizer"], spec["template"], spec["template_in_jinja_file"])
            tok = AutoTokenizer.from_pretrained(scratch)
        prompts = [
            tok(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True), add_special_tokens=False).input_ids
            for m in conversations(arch)
        ]

        model, seed, runs = build_model(arch, spec, prompts)
        model_dir = save_model(arch, spec, model, base)
        data, notes = golden(arch, spec, model_dir, [ids for ids, _ in runs])
        write_json(GOLDEN_DIR / f"tiny-{arch}.json", data)
        lens = [len(c["prompt_ids"]) for c in data["cases"]]
        print(
            f"tiny-{arch}: seed {seed}, prompt lengths {lens}, greedy lengths "
            f"{[len(c['greedy_ids']) for c in data['cases']]}, min greedy margin "
            f"{min(m for _, m in runs):.4f}, logprob sums "
            f"{[round(c['logprob_sum'], 3) for c in data['cases']]} {notes or ''}"
        )


if __name__ == "__main__":
    main()
