//! Parity with Hugging Face transformers on the tiny fixtures of `data/models`, against the
//! golden outputs `scripts/make-tiny-models.py` wrote: rendered prompts, token ids, per-token
//! log-probs (1e-4 absolute, f32) and greedy continuations (identical).

#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests: unwraps are the assertions; prints report skipped or measured cases"
)]

mod common;

use common::{bf16_bound, data, device, greedy, logprob_tolerance, u32s};
use rbon_models::{ChatTokenizer, DType, Decoder, ModelDir, TemplateChoice};
use serde_json::Value;

const MODELS: [&str; 5] = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2"];
/// The models with a bf16 golden (`scripts/make-bf16-golden.py`).
const BF16_MODELS: [&str; 4] = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"];

fn golden(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(data().join(format!("golden/{name}.json"))).unwrap()).unwrap()
}

fn load_in(name: &str, dtype: DType) -> (Decoder, ChatTokenizer) {
    let dir = ModelDir::resolve(data().join("models").join(name).to_str().unwrap()).unwrap();
    (Decoder::load(&dir, dtype, &device()).unwrap(), ChatTokenizer::load(&dir, &TemplateChoice::Auto).unwrap())
}

fn load(name: &str) -> (Decoder, ChatTokenizer) {
    load_in(name, DType::F32)
}

#[test]
fn templates_and_token_ids_match_transformers() {
    for name in MODELS {
        let (_, tok) = load(name);
        for case in golden(name)["cases"].as_array().unwrap() {
            let msgs = case["messages"].as_array().unwrap();
            let rendered = tok.render(msgs, true).unwrap();
            assert_eq!(rendered, case["rendered"].as_str().unwrap(), "{name}");
            assert_eq!(tok.encode_prompt(&rendered).unwrap(), u32s(&case["prompt_ids"]), "{name}");
        }
    }
}

#[test]
fn log_probs_match_transformers() {
    for name in MODELS {
        let (m, _) = load(name);
        for (i, case) in golden(name)["cases"].as_array().unwrap().iter().enumerate() {
            let want: Vec<f64> =
                case["token_logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            let got = m.score(&u32s(&case["prompt_ids"]), &u32s(&case["response_ids"])).unwrap();
            assert_eq!(got.len(), want.len());
            let tol = logprob_tolerance(m.device());
            for (t, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() < tol, "{name} case {i} token {t}: {g} vs {w}");
            }
        }
    }
}

/// bf16 weights and activations against transformers in bf16 (`scripts/make-bf16-golden.py`):
/// the two round in different places, so the bound is measured, not zero (README, "Models").
/// The largest per-token deviation per model is printed (`--nocapture`).
#[test]
fn bf16_log_probs_match_transformers_bf16() {
    for name in BF16_MODELS {
        let (m, _) = load_in(name, DType::BF16);
        let bound = bf16_bound(&m);
        // rbon's host decoder on its CPU path; candle's layers elsewhere (RBON_KERNELS=candle).
        assert_eq!(m.on_host(), rbon_models::path::host_kernels(m.device()), "{name}");
        let want = golden(&format!("{name}-bf16"));
        let mut worst = 0f64;
        for (case, w) in golden(name)["cases"].as_array().unwrap().iter().zip(want["cases"].as_array().unwrap()) {
            let want: Vec<f64> = w["token_logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            let got = m.score(&u32s(&case["prompt_ids"]), &u32s(&case["response_ids"])).unwrap();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                worst = worst.max((g - w).abs());
            }
        }
        println!("bf16 {name} on {:?}: max per-token |Δ| to transformers bf16 {worst:.4}", m.device());
        assert!(worst < bound, "{name}: bf16 per-token deviation {worst} (bound {bound})");
    }
}

#[test]
fn greedy_continuations_match_transformers_in_every_row() {
    for name in MODELS {
        let (m, tok) = load(name);
        let g = golden(name);
        assert_eq!(tok.eos_ids(), u32s(&g["eos_token_ids"]).as_slice(), "{name}");
        for (i, case) in g["cases"].as_array().unwrap().iter().enumerate() {
            let want = u32s(&case["greedy_ids"]);
            // One shared prefill, three rows decoded together: each must match alone.
            for row in greedy(&m, tok.eos_ids(), &u32s(&case["prompt_ids"]), 20, 3) {
                assert_eq!(row, want, "{name} case {i}");
            }
        }
    }
}
