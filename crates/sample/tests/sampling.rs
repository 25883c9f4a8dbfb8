//! Sampling on the tiny fixtures: determinism across batch sizes and N, and the recorded
//! log-probabilities against teacher forcing.

#![allow(clippy::unwrap_used, clippy::print_stdout, reason = "tests unwrap, and print the gaps they measure")]

use std::path::Path;

use rbon_core::Message;
use rbon_models::Device;
use rbon_sample::{FinishReason, Policy, PolicyConfig, SampleConfig, sample_seed};

/// The repository's `data/` folder, or `RBON_DATA` (for test binaries run elsewhere).
fn data() -> std::path::PathBuf {
    std::env::var_os("RBON_DATA")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data"))
}

/// Where the policies run: `RBON_TEST_DEVICE` (default cpu).
fn device() -> Device {
    rbon_models::path::test_device().unwrap()
}

/// Recorded log-probs against teacher forcing: 1e-4 on the CPU; 1e-3 on a GPU, where the
/// decode step and the forced pass run different kernels.
fn tol() -> f64 {
    if device().is_cpu() { 1e-4 } else { 1e-3 }
}

fn policy(name: &str) -> Policy {
    policy_in(name, Default::default())
}

fn policy_in(name: &str, dtype: rbon_models::DTypeName) -> Policy {
    let dir = data().join("models").join(name);
    let cfg = PolicyConfig {
        model: dir.display().to_string(),
        dtype,
        chat_template: "auto".into(),
        system_prompt: None,
        engine: Default::default(),
        server: None,
    };
    Policy::load(&cfg, &device()).unwrap()
}

fn golden(name: &str) -> serde_json::Value {
    let path = data().join("golden").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
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
            assert!((a.logprob - b.logprob).abs() < tol(), "batch size {rows}");
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
    for name in ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2"] {
        let p = policy(name);
        let prompt = p.prompt_ids(&[Message::user("Write a haiku about autumn rain.")]).unwrap();
        let cfg =
            SampleConfig { n: 6, max_new_tokens: 30, temperature: 1.0, top_k: 50, top_p: 0.95, ..Default::default() };
        let out = p.sample(&prompt, &cfg, &seeds(6), 3).unwrap();
        for g in &out {
            let forced: f64 = p.score(&prompt, &g.token_ids).unwrap().iter().sum();
            assert!((forced - g.logprob).abs() < tol(), "{name}: {forced} vs {}", g.logprob);
            assert!(g.logprob < 0.0);
            match g.finish_reason {
                FinishReason::Stop => {
                    eos += 1;
                    assert!(p.tokenizer().eos_ids().contains(g.token_ids.last().unwrap()));
                }
                // At the limit, less any trailing tokens that held only part of a character.
                FinishReason::Length => assert!((27..=30).contains(&g.token_ids.len()), "{}", g.token_ids.len()),
            }
        }
    }
    assert!(eos > 0, "no sample ended on EOS: the EOS path went untested");
}

/// In bf16 and f16 on the CPU (rbon's host decoder) every linear layer sums each output in one
/// fixed order whatever the rows beside it (`rbon_models::lowp`) and attention reads one row at
/// a time, so a sample does not depend on its batch at all; and the forced pass runs the same
/// code, its products and attention summing in the same orders, so a recorded log-prob is the
/// teacher-forced one up to how each computes log-softmax from the same logits (measured 3.4e-8
/// nats per token, held to 1e-6; candle's layers, attending in other shapes, gave 0.0023). The
/// largest gap is printed.
#[test]
fn half_precision_samples_do_not_depend_on_their_batch_and_match_teacher_forcing() {
    if !rbon_models::path::host_kernels(&device()) {
        return;
    }
    for dtype in [rbon_models::DTypeName::Bf16, rbon_models::DTypeName::F16] {
        let mut worst = 0f64;
        for name in ["tiny-llama", "tiny-qwen2", "tiny-qwen3"] {
            let p = policy_in(name, dtype);
            assert!(p.decoder().on_host(), "{name} {dtype}: not on the host decoder");
            let prompt = p.prompt_ids(&[Message::user("Write a haiku about autumn rain.")]).unwrap();
            let cfg = SampleConfig { n: 8, max_new_tokens: 24, ..Default::default() };
            let all = p.sample(&prompt, &cfg, &seeds(8), 8).unwrap();
            for rows in [1, 3] {
                let other = p.sample(&prompt, &cfg, &seeds(8), rows).unwrap();
                for (a, b) in all.iter().zip(&other) {
                    assert_eq!(a.token_ids, b.token_ids, "{name} {dtype}: batch size {rows}");
                    assert_eq!(a.logprob, b.logprob, "{name} {dtype}: batch size {rows}");
                }
            }
            for g in &all {
                let forced: f64 = p.score(&prompt, &g.token_ids).unwrap().iter().sum();
                let per_token = (forced - g.logprob).abs() / g.token_ids.len().max(1) as f64;
                worst = worst.max(per_token);
            }
        }
        println!("{dtype}: largest per-token gap between sampled and teacher-forced log-probs {worst:.2e}");
        assert!(worst < 1e-6, "{dtype}: sampled vs teacher-forced log-probs differ by {worst} per token");
    }
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

/// Text, tokens and log-prob of every sample describe the same thing: the text is the tokens'
/// decoding and the log-prob their teacher-forced sum.
fn assert_consistent(p: &Policy, prompt: &[u32], g: &rbon_sample::Generated, what: &str) {
    assert_eq!(p.tokenizer().decode(&g.token_ids).unwrap(), g.text, "{what}: text is not its tokens' decoding");
    let forced: f64 = p.score(prompt, &g.token_ids).unwrap().iter().sum();
    assert!((forced - g.logprob).abs() < tol(), "{what}: logprob {} vs teacher forcing {forced}", g.logprob);
}

#[test]
fn stop_strings_cut_tokens_and_logprobs_with_the_text() {
    // Frequent stop strings, so that many samples stop on one.
    let mut stopped = 0;
    for name in ["tiny-llama", "tiny-qwen3"] {
        let p = policy(name);
        let prompt = p.prompt_ids(&[Message::user("Write a haiku about autumn rain.")]).unwrap();
        let stop = vec!["e".to_owned(), " t".to_owned(), "an".to_owned()];
        let cfg = SampleConfig { n: 24, max_new_tokens: 24, stop: stop.clone(), ..Default::default() };
        for g in p.sample(&prompt, &cfg, &seeds(24), 8).unwrap() {
            assert_consistent(&p, &prompt, &g, name);
            assert!(stop.iter().all(|s| !g.text.contains(s.as_str())), "{name}: {:?} holds a stop string", g.text);
            let eos_end = g.token_ids.last().is_some_and(|t| p.tokenizer().eos_ids().contains(t));
            if g.finish_reason == FinishReason::Stop && !eos_end {
                stopped += 1;
                // The next token would have completed a stop string: the full decoding with the
                // dropped tokens holds one.
                assert!(g.token_ids.len() < 24);
            }
        }
    }
    assert!(stopped >= 10, "only {stopped} samples ended on a stop string");

    // A stop string that starts inside a token ends the response before that token: find a
    // greedy token whose text is two characters or more and take its last character.
    let p = policy("tiny-llama");
    let prompt = p.prompt_ids(&[Message::user("What is the capital of France?")]).unwrap();
    let greedy = SampleConfig { temperature: 0.0, max_new_tokens: 20, ..Default::default() };
    let full = &p.sample(&prompt, &greedy, &seeds(1), 1).unwrap()[0];
    let text = |ids: &[u32]| p.tokenizer().decode(ids).unwrap();
    let (j, stop) = (0..full.token_ids.len())
        .find_map(|j| {
            let piece: Vec<char> = text(&full.token_ids[j..=j]).chars().collect();
            let last = piece.last()?.to_string();
            let before = text(&full.token_ids[..j]);
            (piece.len() >= 2 && !before.contains(&last) && !piece[..piece.len() - 1].contains(&piece[piece.len() - 1]))
                .then_some((j, last))
        })
        .expect("no greedy token with two characters or more");
    let cfg = SampleConfig { stop: vec![stop.clone()], ..greedy };
    let cut = &p.sample(&prompt, &cfg, &seeds(1), 1).unwrap()[0];
    assert_eq!(cut.finish_reason, FinishReason::Stop);
    assert_eq!(cut.token_ids, full.token_ids[..j], "stop {stop:?} inside token {j}");
    assert_eq!(cut.text, text(&full.token_ids[..j]));
    assert_consistent(&p, &prompt, cut, "stop inside a token");
}

#[test]
fn a_cut_at_max_new_tokens_keeps_whole_characters() {
    // Byte-level tokens split multi-byte characters: a response cut between a character's bytes
    // would end in U+FFFD. The same seeds with a larger limit give the uncut tokens.
    let mut trimmed = 0;
    for name in ["tiny-llama", "tiny-qwen2", "tiny-mistral"] {
        let p = policy(name);
        for q in ["Écris un poème sur la pluie d'été, s'il te plaît.", "日本語で秋の雨について書いてください。"]
        {
            let prompt = p.prompt_ids(&[Message::user(q)]).unwrap();
            for max in [4usize, 6, 9] {
                let cfg = |m: usize| SampleConfig { n: 32, max_new_tokens: m as u32, ..Default::default() };
                let cut = p.sample(&prompt, &cfg(max), &seeds(32), 32).unwrap();
                let long = p.sample(&prompt, &cfg(max + 4), &seeds(32), 32).unwrap();
                for (g, l) in cut.iter().zip(&long) {
                    assert_consistent(&p, &prompt, g, name);
                    assert!(l.token_ids.starts_with(&g.token_ids), "{name}: the cut is not a prefix");
                    if g.finish_reason != FinishReason::Length || g.token_ids.len() == max {
                        continue;
                    }
                    // Tokens were dropped: the text at the limit ended inside a character, and
                    // what is kept does not (at most three tokens go).
                    let at_limit = p.tokenizer().decode(&l.token_ids[..max]).unwrap();
                    assert!(at_limit.ends_with(char::REPLACEMENT_CHARACTER), "{name}: {at_limit:?}");
                    assert!(!g.text.ends_with(char::REPLACEMENT_CHARACTER) && max - g.token_ids.len() <= 3);
                    trimmed += 1;
                }
            }
        }
    }
    assert!(trimmed > 0, "no response ended inside a character: the trimming went untested");
}

#[test]
fn turn_end_is_what_the_template_writes_after_a_response() {
    // The goldens' responses end with the token each architecture closes a turn with, chosen in
    // scripts/make-tiny-models.py (Llama 3's <|eot_id|> is not the first EOS id, 1).
    for name in ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"] {
        let p = policy(name);
        let golden = golden(name);
        for case in golden["cases"].as_array().unwrap() {
            let msgs: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let response = u32s(&case["response_ids"]);
            assert_eq!(p.turn_end(&msgs).unwrap(), [*response.last().unwrap()], "{name}");
            // Forcing the response without its last token closes it the same way: transformers'
            // log-prob sum of the whole response.
            let body = response[..response.len() - 1].to_vec();
            let (lp, n) = p.teacher_force_ids(&msgs, &[body]).unwrap()[0];
            let want = case["logprob_sum"].as_f64().unwrap();
            assert!((lp - want).abs() < 10.0 * tol(), "{name}: {lp} vs transformers {want}");
            assert_eq!(n as usize, response.len());
        }
    }
    // Without a template a response is closed with the first EOS id.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/models/tiny-llama");
    let cfg = PolicyConfig {
        model: dir.display().to_string(),
        dtype: Default::default(),
        chat_template: "none".into(),
        system_prompt: None,
        engine: Default::default(),
        server: None,
    };
    let p = Policy::load(&cfg, &device()).unwrap();
    assert_eq!(p.turn_end(&[Message::user("Hi")]).unwrap(), [1]);
}

#[test]
fn teacher_forcing_closes_like_the_samples_that_ended_their_turn() {
    // Every sample that ended with the token the template closes a turn with: forcing its tokens
    // before that token, closed as imported responses are, gives what sampling recorded.
    let mut checked = 0;
    for name in ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"] {
        let p = policy(name);
        let msgs = [Message::user("Tell me about the sea.")];
        let prompt = p.prompt_ids(&msgs).unwrap();
        let close = p.turn_end(&msgs).unwrap();
        let cfg = SampleConfig { n: 128, max_new_tokens: 48, ..Default::default() };
        let out = p.sample(&prompt, &cfg, &seeds(128), 64).unwrap();
        let ended: Vec<_> = out.iter().filter(|g| g.token_ids.ends_with(&close)).collect();
        // tiny-llama's closing token is not its first EOS id: the case that matters.
        assert!(!ended.is_empty(), "{name}: no sample ended its turn");
        let bodies: Vec<Vec<u32>> =
            ended.iter().map(|g| g.token_ids[..g.token_ids.len() - close.len()].to_vec()).collect();
        for (g, (lp, n)) in ended.iter().zip(p.teacher_force_ids(&msgs, &bodies).unwrap()) {
            assert!((lp - g.logprob).abs() < tol(), "{name}: forced {lp} vs sampled {}", g.logprob);
            assert_eq!(n as usize, g.token_ids.len());
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} samples ended their turn");
}

fn gguf_policy(file: &str) -> Policy {
    let path = data().join("models").join(file);
    let cfg = PolicyConfig {
        model: path.display().to_string(),
        dtype: Default::default(),
        chat_template: "auto".into(),
        system_prompt: None,
        engine: Default::default(),
        server: None,
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
    let models = data().join("models");
    let check = |model: &Path| {
        let yaml = format!("policy:\n  model: {}\n", model.display());
        let doc = ConfigDoc::parse(Path::new("p.yaml"), &yaml).unwrap();
        let mut d = Diagnostics::default();
        let cfg = PolicyConfig {
            model: model.display().to_string(),
            dtype: Default::default(),
            chat_template: "auto".into(),
            system_prompt: None,
            engine: Default::default(),
            server: None,
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
