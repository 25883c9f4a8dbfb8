"""A tiny random-weight Qwen2 policy that vLLM's CPU build can serve, for scripts/check-server.sh.

vLLM's CPU attention needs head_dim 64 (the committed tiny-qwen2 has 16), so this writes a
Qwen2ForCausalLM with 2 heads of 64 (hidden 128, 2 layers, 1 KV head) and the tokenizer, chat
template and generation_config of data/models/tiny-qwen2. The weights come from a fixed seed, so
reruns write the same files; they are not committed (the check makes them where it runs).

    python3 scripts/make-server-fixture.py OUT_DIR
"""

import shutil
import sys
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "data" / "models" / "tiny-qwen2"


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(20241201)
    config = Qwen2Config(
        vocab_size=384,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=4,
        pad_token_id=2,
    )
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    # Large weights, as in make-tiny-models.py, so the distribution is far from uniform and
    # samples differ from seed to seed.
    gen = torch.Generator().manual_seed(20241201)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                continue
            std = 0.5 if "embed" in name else 0.2
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.save_pretrained(str(out), safe_serialization=True)
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]:
        if (BASE / name).exists():
            shutil.copy(BASE / name, out / name)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
