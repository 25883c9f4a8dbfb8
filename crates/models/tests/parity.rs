//! Parity with Hugging Face transformers on the tiny fixtures of `data/models`, against the
//! golden outputs `scripts/make-tiny-models.py` wrote: rendered prompts, token ids, per-token
//! log-probs (1e-4 absolute, f32) and greedy continuations (identical).

#![allow(clippy::unwrap_used)]

mod common;

use common::{data, greedy, u32s};
use rbon_models::{ChatTokenizer, DType, Decoder, Device, ModelDir, TemplateChoice};
use serde_json::Value;

const MODELS: [&str; 4] = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"];

fn golden(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(data().join(format!("golden/{name}.json"))).unwrap()).unwrap()
}

fn load(name: &str) -> (Decoder, ChatTokenizer) {
    let dir = ModelDir::resolve(data().join("models").join(name).to_str().unwrap()).unwrap();
    (Decoder::load(&dir, DType::F32, &Device::Cpu).unwrap(), ChatTokenizer::load(&dir, &TemplateChoice::Auto).unwrap())
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
            for (t, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() < 1e-4, "{name} case {i} token {t}: {g} vs {w}");
            }
        }
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
