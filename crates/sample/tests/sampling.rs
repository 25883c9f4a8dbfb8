//! Sampling on the tiny fixtures: determinism across batch sizes and N, and the recorded
//! log-probabilities against teacher forcing.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use rbon_core::Message;
use rbon_models::Device;
use rbon_sample::{FinishReason, Policy, PolicyConfig, SampleConfig, sample_seed};

fn policy(name: &str) -> Policy {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/models").join(name);
    let cfg = PolicyConfig {
        model: dir.display().to_string(),
        dtype: Default::default(),
        chat_template: "auto".into(),
        system_prompt: None,
    };
    Policy::load(&cfg, &Device::Cpu).unwrap()
}

fn seeds(n: u32) -> Vec<(u32, u64)> {
    (0..n).map(|k| (k, sample_seed(7, "p", k))).collect()
}

#[test]
fn samples_do_not_depend_on_batch_size_or_n() {
    let p = policy("tiny-qwen2");
    let prompt = p.prompt_ids(&[Message::user("Tell me about the sea.")]).unwrap();
    let cfg = SampleConfig { n: 8, max_new_tokens: 24, ..Default::default() };
    let all = p.sample(&prompt, &cfg, &seeds(8), 8).unwrap();
    for rows in [1, 4] {
        let other = p.sample(&prompt, &cfg, &seeds(8), rows).unwrap();
        for (a, b) in all.iter().zip(&other) {
            assert_eq!(a.token_ids, b.token_ids, "batch size {rows}");
            assert!((a.logprob - b.logprob).abs() < 1e-4, "batch size {rows}");
        }
    }
    let sixteen = p.sample(&prompt, &cfg, &seeds(16), 16).unwrap();
    for (a, b) in all.iter().zip(&sixteen[..8]) {
        assert_eq!(a.token_ids, b.token_ids, "N=8 vs the first 8 of N=16");
    }
    // Different seeds give different samples, and some stop on EOS while others hit the limit.
    let distinct: std::collections::HashSet<_> = sixteen.iter().map(|g| g.token_ids.clone()).collect();
    assert!(distinct.len() > 8, "{distinct:?}");
}

#[test]
fn recorded_logprobs_match_teacher_forcing() {
    let mut eos = 0;
    for name in ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"] {
        let p = policy(name);
        let prompt = p.prompt_ids(&[Message::user("Write a haiku about autumn rain.")]).unwrap();
        let cfg =
            SampleConfig { n: 6, max_new_tokens: 30, temperature: 1.0, top_k: 50, top_p: 0.95, ..Default::default() };
        let out = p.sample(&prompt, &cfg, &seeds(6), 3).unwrap();
        for g in &out {
            let forced: f64 = p.score(&prompt, &g.token_ids).unwrap().iter().sum();
            assert!((forced - g.logprob).abs() < 1e-4, "{name}: {forced} vs {}", g.logprob);
            assert!(g.logprob < 0.0);
            match g.finish_reason {
                FinishReason::Stop => {
                    eos += 1;
                    assert!(p.tokenizer().eos_ids().contains(g.token_ids.last().unwrap()));
                }
                FinishReason::Length => assert_eq!(g.token_ids.len(), 30),
            }
        }
    }
    assert!(eos > 0, "no sample ended on EOS: the EOS path went untested");
}

#[test]
fn stop_strings_and_greedy() {
    let p = policy("tiny-llama");
    let prompt = p.prompt_ids(&[Message::user("What is the capital of France?")]).unwrap();
    let greedy = SampleConfig { temperature: 0.0, max_new_tokens: 20, ..Default::default() };
    let a = p.sample(&prompt, &greedy, &seeds(3), 3).unwrap();
    assert!(a.iter().all(|g| g.token_ids == a[0].token_ids), "greedy rows differ");
    // Cut the greedy text at a stop string taken from its middle.
    let text = &a[0].text;
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 6, "greedy text too short for the test: {text:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cfg = SampleConfig { stop: vec![stop.clone()], ..greedy };
    let b = p.sample(&prompt, &cfg, &seeds(1), 1).unwrap();
    assert_eq!(b[0].finish_reason, FinishReason::Stop);
    assert!(!b[0].text.contains(&stop));
    assert!(text.starts_with(&b[0].text) && b[0].text.len() < text.len());
}

fn gguf_policy(file: &str) -> Policy {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/models").join(file);
    let cfg = PolicyConfig {
        model: path.display().to_string(),
        dtype: Default::default(),
        chat_template: "auto".into(),
        system_prompt: None,
    };
    Policy::load(&cfg, &Device::Cpu).unwrap()
}

#[test]
fn gguf_policies_sample_deterministically_and_record_teacher_forced_logprobs() {
    // The F32 file is the safetensors model: same prompt ids, same samples, same log-probs.
    let st = policy("tiny-qwen2");
    let msgs = [Message::user("Tell me about the sea.")];
    let prompt = st.prompt_ids(&msgs).unwrap();
    let cfg = SampleConfig { n: 6, max_new_tokens: 24, top_k: 50, ..Default::default() };
    let want = st.sample(&prompt, &cfg, &seeds(6), 6).unwrap();
    let f32 = gguf_policy("tiny-qwen2-gguf/tiny-qwen2-f32.gguf");
    assert_eq!(f32.prompt_ids(&msgs).unwrap(), prompt);
    let got = f32.sample(&prompt, &cfg, &seeds(6), 6).unwrap();
    for (a, b) in want.iter().zip(&got) {
        assert_eq!(a.token_ids, b.token_ids);
        assert!((a.logprob - b.logprob).abs() < 1e-4);
    }
    // Quantized: deterministic across batch sizes, and the recorded log-prob is the teacher-forced
    // one under the same (quantized) model.
    for file in ["tiny-llama-gguf/tiny-llama-q8_0.gguf", "tiny-qwen2-gguf/tiny-qwen2-q8_0.gguf"] {
        let p = gguf_policy(file);
        let prompt = p.prompt_ids(&[Message::user("Write a haiku about autumn rain.")]).unwrap();
        let all = p.sample(&prompt, &cfg, &seeds(6), 6).unwrap();
        let one = p.sample(&prompt, &cfg, &seeds(6), 1).unwrap();
        for (a, b) in all.iter().zip(&one) {
            assert_eq!(a.token_ids, b.token_ids, "{file}");
            let forced: f64 = p.score(&prompt, &a.token_ids).unwrap().iter().sum();
            assert!((forced - a.logprob).abs() < 1e-4, "{file}: {forced} vs {}", a.logprob);
            assert!((a.logprob - b.logprob).abs() < 1e-4, "{file}");
        }
    }
}

#[test]
fn policy_check_reports_gguf_problems_at_policy_model() {
    use rbon_core::{ConfigDoc, Diagnostics};
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/models");
    let check = |model: &Path| {
        let yaml = format!("policy:\n  model: {}\n", model.display());
        let doc = ConfigDoc::parse(Path::new("p.yaml"), &yaml).unwrap();
        let mut d = Diagnostics::default();
        let cfg = PolicyConfig {
            model: model.display().to_string(),
            dtype: Default::default(),
            chat_template: "auto".into(),
            system_prompt: None,
        };
        cfg.check(&doc, &mut d);
        d.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    assert!(check(&models.join("tiny-qwen2-gguf/tiny-qwen2-q8_0.gguf")).is_empty());
    let two = check(&models.join("tiny-qwen2-gguf"));
    assert!(
        two.len() == 1 && two[0].starts_with("p.yaml:2:10: policy.model:") && two[0].contains("holds 2 .gguf files"),
        "{two:?}"
    );
    let missing = check(&models.join("tiny-qwen2-gguf/nope.gguf"));
    assert!(
        missing.len() == 1 && missing[0].contains("policy.model") && missing[0].contains("nope.gguf"),
        "{missing:?}"
    );
    // A GGUF without tokenizer files beside it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(models.join("tiny-qwen2-gguf/tiny-qwen2-q8_0.gguf"), dir.path().join("m.gguf")).unwrap();
    let no_tok = check(dir.path());
    assert!(no_tok.len() == 1 && no_tok[0].contains("has no tokenizer.json"), "{no_tok:?}");
}
