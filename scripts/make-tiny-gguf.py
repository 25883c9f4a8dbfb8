#!/usr/bin/env python3
"""Converts the tiny fixture decoders to GGUF and writes golden outputs for the quantized ones.

rbon loads quantized policies from GGUF files (llama.cpp's format) into the same decoder as
safetensors folders. This script converts the committed tiny models of `data/models/tiny-<arch>`
(written by scripts/make-tiny-models.py) the way llama.cpp's convert_hf_to_gguf.py does, with
llama.cpp's own writer (the `gguf` package, gguf-py):

    data/models/tiny-<arch>-gguf/tiny-<arch>-f32.gguf    every tensor in F32: exact, so the
                                                          safetensors goldens must still hold
    data/models/tiny-<arch>-gguf/tiny-<arch>-q8_0.gguf   2-D weights in Q8_0 (as llama.cpp's
                                                          `--outtype q8_0`), norms/biases in F32
    data/models/tiny-<arch>-gguf/tokenizer*.json, ...     the tokenizer files of the source folder
                                                          (no config.json: the GGUF metadata is
                                                          the model's configuration)
    data/golden/tiny-<arch>-q8_0.json                     goldens of the Q8_0 file (below)

What the conversion does, as llama.cpp's LlamaModel / Qwen2Model / Qwen3Model:
- metadata `<arch>.block_count`, `.embedding_length`, `.feed_forward_length`, `.context_length`,
  `.attention.head_count(_kv)`, `.attention.key_length`/`.value_length`, `.rope.freq_base`,
  `.attention.layer_norm_rms_epsilon`, `.rope.dimension_count` (llama), `.vocab_size`;
  `general.architecture` is `llama` for Llama and Mistral, `qwen2`, `qwen3`;
- tensor names token_embd, blk.N.attn_{q,k,v,output}, attn_{q,k}_norm, ffn_{gate,up,down},
  attn_norm, ffn_norm, output_norm, output (absent when the embeddings are tied);
- for the `llama` architecture, the rows of attn_q / attn_k are permuted (LlamaModel.permute) from
  Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved one;
- Llama 3 RoPE scaling becomes the `rope_freqs` tensor (per-frequency divisors), as
  LlamaModel.generate_extra_tensors writes it.
One addition: Mistral's sliding window is written as `llama.attention.sliding_window` (a standard
GGUF key that llama.cpp's converter writes for other architectures, not for Mistral) so that the
window of tiny-mistral survives conversion; rbon honours the key when present.

The script checks the conversion against transformers' own GGUF loader
(`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, which dequantizes and undoes the
permutation): every tensor it loads must equal ours. transformers ignores `rope_freqs` and the
Mistral window, so its logits are compared only for the Qwen models.

Goldens of the Q8_0 files (same prompts and responses as data/golden/tiny-<arch>.json):
- `token_logprobs`, `greedy_ids`: transformers with the dequantized Q8_0 weights, in f32;
- `token_logprobs_q8_act`, `greedy_ids_q8_act`: the same, with every linear layer's input also
  rounded to Q8_0 blocks (scale f16(amax/127), values round(x/scale)), which is what ggml's and
  candle's Q8_0 matmul does to activations before its integer dot products.
The Rust tests hold rbon's decoder with the weights dequantized to the first (1e-4, identical
greedy ids) and its quantized matmul near the second. Not to 1e-4: an activation that lands
within float rounding of a .5 step rounds one way in torch and the other in candle, and these
tiny random models amplify one such flip to about 0.1 nats (rounding every activation moves
their log-probs by up to 0.6).

Usage: pip install gguf numpy torch transformers && python3 scripts/make-tiny-models.py (once) &&
       python3 scripts/make-tiny-gguf.py     (written against gguf 0.19, transformers 5.x)
Rerunning gives byte-identical files.
"""

import json
import shutil
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "data" / "models"
GOLDEN_DIR = ROOT / "data" / "golden"
ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
MAX_NEW_TOKENS = 20
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
]


def gguf_arch(model_type):
    return {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[model_type]


def permute(w, n_head, n_head_kv):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_parameters(cfg):
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return dict(rp)


def llama3_rope_factors(cfg, head_dim):
    """LlamaModel.generate_extra_tensors: divisors of the base inverse frequencies."""
    rp = rope_parameters(cfg)
    if rp.get("rope_type") != "llama3":
        return None
    base = rp.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = rp.get("factor", 8.0)
    low = rp.get("low_freq_factor", 1.0)
    high = rp.get("high_freq_factor", 4.0)
    old = rp.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for f in freqs.tolist():
        wavelen = 2 * np.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def tensor_name(hf):
    """Hugging Face parameter name -> GGUF tensor name (gguf-py's tensor map for these archs)."""
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in fixed:
        return fixed[hf]
    parts = hf.split(".")
    assert parts[:2] == ["model", "layers"], hf
    n, rest = parts[2], ".".join(parts[3:])
    sub = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    module, kind = rest.rsplit(".", 1)
    return f"blk.{n}.{sub[module]}.{kind}"


def convert(src, out_path, qtype):
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    cfg = model.config
    arch = gguf_arch(cfg.model_type)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads

    w = gguf.GGUFWriter(str(out_path), arch)
    w.add_name(src.name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(float(rope_parameters(cfg).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None):
        w.add_sliding_window(cfg.sliding_window)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    w.add_file_type(ftype)

    factors = llama3_rope_factors(cfg, head_dim)
    if factors is not None:
        w.add_tensor("rope_freqs.weight", factors)
    tied = cfg.tie_word_embeddings
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        data = p.detach().numpy().astype(np.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute(data, n_head, n_head)
        if arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute(data, n_head, n_kv)
        gname = tensor_name(name)
        if qtype == "q8_0" and data.ndim == 2:
            q = gguf.quants.quantize(np.ascontiguousarray(data), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def dequantized_state_dict(path, model):
    """The HF state dict of a GGUF file we wrote: dequantized, q/k permutation undone."""
    cfg = model.config
    arch = gguf_arch(cfg.model_type)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    out = {}
    for name in model.state_dict():
        gname = tensor_name(name) if not (name == "lm_head.weight" and cfg.tie_word_embeddings) else "token_embd.weight"
        t = by_name[gname]
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
        data = np.array(data, dtype=np.float32)
        if arch == "llama" and "q_proj" in name:
            data = permute_back(data, n_head, n_head)
        if arch == "llama" and "k_proj" in name:
            data = permute_back(data, n_head, n_kv)
        out[name] = torch.from_numpy(data)
    return out


def permute_back(w, n_head, n_head_kv):
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def q8_round_trip(x):
    """Q8_0 quantize/dequantize of the last dimension in blocks of 32, as ggml's quantize_row_q8_0."""
    shape = x.shape
    b = x.reshape(-1, 32)
    d = b.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    v = b * inv
    q = torch.trunc(v + 0.5 * torch.sign(v))  # roundf: halves away from zero
    return (q * d.to(torch.float16).to(torch.float32)).reshape(shape)


@torch.no_grad()
def outputs(model, cases, eos, pad):
    res = []
    for c in cases:
        prompt, response = c["prompt_ids"], c["response_ids"]
        logits = model(torch.tensor([prompt + response])).logits[0]
        lp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        picked = [float(x) for x in lp.gather(1, torch.tensor(response)[:, None])[:, 0]]
        ids, margin = list(prompt), float("inf")
        greedy = []
        for _ in range(MAX_NEW_TOKENS):
            top = torch.topk(model(torch.tensor([ids])).logits[0, -1], 2)
            margin = min(margin, float(top.values[0] - top.values[1]))
            nxt = int(top.indices[0])
            greedy.append(nxt)
            ids.append(nxt)
            if nxt in eos:
                break
        res.append((picked, greedy, margin))
    return res


def check_against_transformers_loader(folder, file, ours, config):
    """transformers' GGUF loader (dequantizes, undoes the q/k permutation) must give exactly our
    tensors. It is given the source config: its own GGUF config mapping ignores `rope_freqs`, the
    Mistral window and, for qwen3, `attention.key_length` (so Qwen3 files whose head_dim is not
    hidden/heads, tiny-qwen3's and Qwen3-0.6B's alike, fail to load without it). A Mistral config
    it cannot map to gguf-py's names: that file loads as the Llama it is in GGUF (without the
    window, so its logits are not compared)."""
    given = None if config.model_type == "mistral" else config
    tf = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=file, config=given, dtype=torch.float32)
    sd = tf.eval().state_dict()
    for name, want in ours.items():
        got = sd[name]
        assert got.shape == want.shape and torch.equal(got, want), (file, name)
    return tf


def main():
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for arch in ARCHS:
        src = MODELS_DIR / f"tiny-{arch}"
        out = MODELS_DIR / f"tiny-{arch}-gguf"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for f in TOKENIZER_FILES:
            if (src / f).exists():
                shutil.copy(src / f, out / f)
        golden = json.loads((GOLDEN_DIR / f"tiny-{arch}.json").read_text())
        eos = golden["eos_token_ids"]
        report = []
        for qtype in ["f32", "q8_0"]:
            path = out / f"tiny-{arch}-{qtype}.gguf"
            model = convert(src, path, qtype)
            ours = dequantized_state_dict(path, model)
            if qtype == "f32":
                for name, p in model.state_dict().items():
                    assert torch.equal(ours[name], p), (arch, name)
            # transformers reads the config from the GGUF; it needs a folder with only that file.
            with tempfile.TemporaryDirectory() as scratch:
                shutil.copy(path, Path(scratch) / path.name)
                tf = check_against_transformers_loader(scratch, path.name, ours, model.config)
            model.load_state_dict(ours)
            model.config._attn_implementation = "eager"
            tf.config._attn_implementation = "eager"
            case = golden["cases"][0]
            ids = torch.tensor([case["prompt_ids"] + case["response_ids"]])
            with torch.no_grad():
                gap = float((tf(ids).logits - model(ids).logits).abs().max())
            if arch == "mistral":
                report.append(f"{qtype}: transformers' GGUF loader gives our tensors")
            else:
                assert gap < 1e-4, (arch, qtype, gap)
                report.append(f"{qtype}: transformers' GGUF loader gives our tensors, logits within {gap:.1e}")
            if qtype == "f32":
                continue
            plain = outputs(model, golden["cases"], eos, None)
            hooks = [
                m.register_forward_pre_hook(lambda _m, args: (q8_round_trip(args[0]),))
                for m in model.modules()
                if isinstance(m, torch.nn.Linear)
            ]
            act = outputs(model, golden["cases"], eos, None)
            for h in hooks:
                h.remove()
            cases = []
            for c, (lp, greedy, margin_plain), (lpa, greedya, margin) in zip(golden["cases"], plain, act):
                cases.append(
                    {
                        "prompt_ids": c["prompt_ids"],
                        "response_ids": c["response_ids"],
                        "token_logprobs": lp,
                        "greedy_ids": greedy,
                        "greedy_margin": margin_plain,
                        "token_logprobs_q8_act": lpa,
                        "greedy_ids_q8_act": greedya,
                        "greedy_margin_q8_act": margin,
                    }
                )
            err = max(abs(a - b) for (lp, _, _), c in zip(plain, golden["cases"]) for a, b in zip(lp, c["token_logprobs"]))
            act_err = max(abs(a - b) for (lp, _, _), (lpa, _, _) in zip(plain, act) for a, b in zip(lp, lpa))
            same = [g == c["greedy_ids"] for (_, g, _), c in zip(plain, golden["cases"])]
            data = {
                "file": f"tiny-{arch}-gguf/{path.name}",
                "eos_token_ids": eos,
                "transformers_version": transformers.__version__,
                "torch_version": torch.__version__,
                "max_abs_logprob_diff_vs_f32": err,
                "max_abs_logprob_diff_q8_act_vs_dequantized": act_err,
                "cases": cases,
            }
            (GOLDEN_DIR / f"tiny-{arch}-q8_0.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            report.append(
                f"q8_0 vs f32 max |Δlogprob| {err:.2e}, activation rounding {act_err:.2e}, "
                f"greedy same as f32 {same}, min greedy margin {min(m for _, _, m in plain):.4f} "
                f"(q8 act {min(m for _, _, m in act):.4f})"
            )
        sizes = {p.name: p.stat().st_size for p in sorted(out.glob("*.gguf"))}
        print(f"tiny-{arch}-gguf: {sizes}; " + "; ".join(report))


if __name__ == "__main__":
    main()
