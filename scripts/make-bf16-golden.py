#!/usr/bin/env python3
"""bf16 goldens of the tiny decoders: transformers' teacher-forced per-token log-probs of the
f32 goldens' cases (data/golden/tiny-<arch>.json) with the model loaded in bfloat16.

rbon's bf16 log-probs are held to these within a bound measured on the fixtures
(crates/models/tests/parity.rs); both sides round differently (where bf16 products are summed,
where norms and softmax go to f32), so the bound is not zero.

    python3 scripts/make-bf16-golden.py                       # CPU → data/golden/tiny-*-bf16.json
    python3 scripts/make-bf16-golden.py --device cuda --out DIR   # the same on a GPU

Needs: pip install torch transformers
"""

import argparse
import json
import os

import torch
import transformers
from transformers import AutoModelForCausalLM

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data")


@torch.no_grad()
def logprobs(model, prompt, response, device):
    ids = torch.tensor([prompt + response], device=device)
    logits = model(ids).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return [float(x) for x in lp.gather(1, torch.tensor(response, device=device)[:, None])[:, 0]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=os.path.join(DATA, "golden"))
    args = ap.parse_args()
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    for arch in ARCHS:
        name = f"tiny-{arch}"
        with open(os.path.join(DATA, "golden", f"{name}.json")) as f:
            f32 = json.load(f)
        model = AutoModelForCausalLM.from_pretrained(
            os.path.join(DATA, "models", name), attn_implementation="eager", dtype=torch.bfloat16
        ).to(args.device).eval()
        cases = [
            {"token_logprobs": logprobs(model, c["prompt_ids"], c["response_ids"], args.device)}
            for c in f32["cases"]
        ]
        out = {
            "dtype": "bfloat16",
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "cases": cases,
        }
        path = os.path.join(args.out, f"{name}-bf16.json")
        with open(path, "w") as f:
            json.dump(out, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
