//! Parity with transformers and sentence-transformers on the fixtures of `data/models`, against
//! the goldens `scripts/make-tiny-scorers.py` and `scripts/make-minilm-golden.py` wrote: reward
//! scores within 1e-4 relative, embeddings with cosine ≥ 0.9999.

#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests: unwraps are the assertions; prints report skipped or measured cases"
)]

use std::path::{Path, PathBuf};

use rbon_core::Message;
use rbon_models::{DType, Device, TemplateChoice};
use rbon_score::{Embedder, RewardModel};
use serde_json::Value;

fn data() -> PathBuf {
    std::env::var_os("RBON_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data"))
}

fn golden(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(data().join(format!("golden/{name}.json"))).unwrap()).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// Where the models run: `RBON_TEST_DEVICE` (default cpu).
fn device() -> Device {
    rbon_models::path::test_device().unwrap()
}

/// 1e-4 relative on the CPU; 1e-3 on a GPU, whose kernels sum in other orders.
fn tolerance() -> f64 {
    if device().is_cpu() { 1e-4 } else { 1e-3 }
}

fn close(got: f64, want: f64, what: &str) {
    let tol = tolerance();
    assert!((got - want).abs() <= tol * want.abs().max(1.0), "{what}: {got} vs {want}");
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn messages(v: &Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

fn load_rm(name: &str) -> RewardModel {
    RewardModel::load(data().join("models").join(name).to_str().unwrap(), &TemplateChoice::Auto, DType::F32, &device())
        .unwrap()
}

#[test]
fn decoder_reward_models_match_transformers() {
    for arch in ["llama", "mistral", "qwen2", "qwen3", "gemma2"] {
        let name = format!("tiny-rm-{arch}");
        let m = load_rm(&name);
        let g = golden(&name);
        let cases = g["cases"].as_array().unwrap();
        let mut inputs = Vec::new();
        for c in cases {
            let mut msgs = messages(&c["messages"]);
            let response = msgs.pop().unwrap();
            assert_eq!(response.role, "assistant");
            let (ids, _) = m.encode(&msgs, &response.content).unwrap();
            assert_eq!(ids, u32s(&c["input_ids"]), "{name}");
            inputs.push((ids, Vec::new()));
        }
        // One at a time, then all in one padded batch.
        for budget in [1, 1 << 20] {
            let scores = m.score(&inputs, budget).unwrap();
            for (s, c) in scores.iter().zip(cases) {
                close(*s, c["score"].as_f64().unwrap(), &format!("{name} (batch budget {budget})"));
            }
        }
    }
}

/// The score stage passes the N responses of one prompt together; on the CPU the decoder reward
/// models then compute the shared prompt once. Scores must not depend on that: the same inputs
/// scored together (one batch, or several under a small budget) and one at a time agree.
#[test]
fn decoder_reward_models_share_the_prompt_prefix() {
    for arch in ["llama", "mistral", "qwen2", "qwen3", "gemma2"] {
        let name = format!("tiny-rm-{arch}");
        let m = load_rm(&name);
        let g = golden(&name);
        let cases = g["cases"].as_array().unwrap();
        let mut prompt = messages(&cases[0]["messages"]);
        prompt.pop();
        let mut responses: Vec<String> =
            cases.iter().map(|c| messages(&c["messages"]).pop().unwrap().content).collect();
        responses.push(responses[0].clone());
        responses.push(responses.iter().map(String::as_str).collect::<Vec<_>>().join(" and then "));
        responses.push(String::new());
        let inputs: Vec<_> = responses.iter().map(|r| m.encode(&prompt, r).unwrap()).collect();
        let alone: Vec<f64> = inputs.iter().map(|i| m.score(std::slice::from_ref(i), 1 << 20).unwrap()[0]).collect();
        for budget in [1 << 20, 48] {
            let together = m.score(&inputs, budget).unwrap();
            for (i, (a, b)) in together.iter().zip(&alone).enumerate() {
                close(*a, *b, &format!("{name} response {i} (budget {budget})"));
            }
        }
        assert_eq!(alone[0], alone[cases.len()], "{name}: the same input scored twice");
    }
}

#[test]
fn deberta_reward_model_matches_transformers() {
    let m = RewardModel::load(
        data().join("models/tiny-deberta-rm").to_str().unwrap(),
        &TemplateChoice::None,
        DType::F32,
        &device(),
    )
    .unwrap();
    let g = golden("tiny-deberta-rm");
    let cases = g["cases"].as_array().unwrap();
    let mut inputs = Vec::new();
    for c in cases {
        let prompt = vec![Message::user(c["question"].as_str().unwrap())];
        let (ids, types) = m.encode(&prompt, c["answer"].as_str().unwrap()).unwrap();
        assert_eq!(ids, u32s(&c["input_ids"]));
        assert_eq!(types, u32s(&c["token_type_ids"]));
        inputs.push((ids, types));
    }
    for budget in [1, 1 << 20] {
        for (s, c) in m.score(&inputs, budget).unwrap().iter().zip(cases) {
            close(*s, c["score"].as_f64().unwrap(), &format!("deberta (batch budget {budget})"));
        }
    }
}

fn check_embedder(folder: &Path, golden: &Value, dtype: DType, min_cosine: f64) {
    // On the CPU this is the packed encoder (candle's BERT serves other devices and
    // RBON_KERNELS=candle).
    let e = Embedder::load(folder.to_str().unwrap(), dtype, &device()).unwrap();
    let cases = golden["cases"].as_array().unwrap();
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    for (t, c) in texts.iter().zip(cases) {
        assert_eq!(e.encode(t).unwrap(), u32s(&c["input_ids"]), "{t:?}");
    }
    assert!(e.embed(&[], 1 << 20).unwrap().is_empty(), "no texts, no vectors");
    // Each text by itself, then all of them at once (one padded batch, or one group of rows on
    // the packed encoder) and in batches of one (on candle's BERT).
    let alone: Vec<Vec<f32>> = texts.iter().map(|t| e.embed(&[t], 1 << 20).unwrap().remove(0)).collect();
    for budget in [1, 1 << 20] {
        let got = e.embed(&texts, budget).unwrap();
        for ((g, c), t) in got.iter().zip(cases).zip(&texts) {
            let c = cosine(g, &f32s(&c["embedding"]));
            assert!(c >= min_cosine, "{t:?} ({dtype:?}): cosine {c}");
            let norm: f32 = g.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "not normalised: {norm}");
        }
        for ((g, want), t) in got.iter().zip(&alone).zip(&texts) {
            let diff = g.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(f64::from(diff) <= tolerance() / 100.0, "{t:?} ({dtype:?}) with budget {budget} moved by {diff}");
        }
    }
    // Thousands of tokens in one call: the packed encoder then runs groups of rows on separate
    // threads, each through every layer, the costliest groups first. A text's vector does not
    // depend on the rows beside it.
    let many: Vec<&str> = texts.iter().cycle().take(texts.len() * 40).copied().collect();
    for (i, g) in e.embed(&many, 1 << 20).unwrap().iter().enumerate() {
        let want = &alone[i % texts.len()];
        let diff = g.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(f64::from(diff) <= tolerance() / 100.0, "{:?} ({dtype:?}) in a large batch moved by {diff}", many[i]);
    }
}

#[test]
fn tiny_sentence_embedder_matches_sentence_transformers() {
    check_embedder(&data().join("models/tiny-minilm"), &golden("tiny-minilm"), DType::F32, 0.9999);
    // Half precision asked: f32 activations (candle's BERT gives NaN in half precision), with
    // bf16 matrix products where the CPU has AMX or AVX-512-BF16.
    check_embedder(&data().join("models/tiny-minilm"), &golden("tiny-minilm"), DType::BF16, 0.9999);
}

/// The paper's embedder, fetched by `scripts/fetch-minilm.sh` (CI runs it); skipped when absent.
#[test]
fn all_minilm_l6_v2_matches_sentence_transformers() {
    let folder = data().join("models/all-minilm-l6-v2");
    if !folder.join("config.json").is_file() {
        eprintln!("skipping: {} is absent (run scripts/fetch-minilm.sh)", folder.display());
        return;
    }
    check_embedder(&folder, &golden("all-minilm-l6-v2"), DType::F32, 0.9999);
    // bf16 products (on AMX or AVX-512-BF16; f32 elsewhere) stay within the same bound.
    check_embedder(&folder, &golden("all-minilm-l6-v2"), DType::BF16, 0.9999);
}

fn spec(name: &str, f: impl FnOnce(&mut rbon_score::RewardSpec)) -> rbon_score::RewardSpec {
    let mut s = rbon_score::RewardSpec::classifier(name, data().join("models").join(name).to_str().unwrap());
    f(&mut s);
    s
}

fn load_spec(s: &rbon_score::RewardSpec) -> Result<RewardModel, rbon_score::ScoreError> {
    RewardModel::load_spec(s, &TemplateChoice::Auto, DType::F32, &device())
}

/// SteamSHP (the RBoN paper's proxy): P("A") at the first decoding step, as the paper's
/// reward_model.py computes it with transformers' generate, within 1e-5.
#[test]
fn shp_judge_matches_transformers() {
    let s = spec("tiny-shp", |s| s.kind = rbon_score::RewardKind::Shp);
    let m = load_spec(&s).unwrap();
    let g = golden("tiny-shp");
    let mut inputs = Vec::new();
    for c in g["cases"].as_array().unwrap() {
        let (ids, types) = m.encode(&messages(&c["prompt"]), c["response"].as_str().unwrap()).unwrap();
        assert_eq!(ids, u32s(&c["input_ids"]), "{}", c["input"]);
        assert!(types.is_empty());
        inputs.push((ids, types));
    }
    let cases = g["cases"].as_array().unwrap();
    let tol = if device().is_cpu() { 1e-5 } else { 1e-4 };
    for budget in [1, 1 << 20] {
        for (p, c) in m.score(&inputs, budget).unwrap().iter().zip(cases) {
            let want = c["prob_a"].as_f64().unwrap();
            assert!((p - want).abs() <= tol, "P(A) {p} vs {want} (budget {budget})");
        }
    }
    // The same judge spelled out as a generic seq2seq judge, newlines kept: the flattened
    // golden inputs read as they are give the same numbers.
    let generic = spec("tiny-shp", |s| {
        s.kind = rbon_score::RewardKind::Seq2seq;
        s.template = Some("{response}".into());
        s.token = Some("A".into());
    });
    let m = load_spec(&generic).unwrap();
    for c in cases {
        let (ids, _) = m.encode(&[], c["input"].as_str().unwrap()).unwrap();
        assert_eq!(ids, u32s(&c["input_ids"]));
        let p = m.score(&[(ids, Vec::new())], 1).unwrap()[0];
        assert!((p - c["prob_a"].as_f64().unwrap()).abs() <= tol);
    }
    // A judged token that is several tokens, and a T5 folder read as a classifier, are refused.
    let bad = spec("tiny-shp", |s| {
        s.kind = rbon_score::RewardKind::Seq2seq;
        s.template = Some("{response}".into());
        s.token = Some("RESPONSE B".into());
    });
    assert!(load_spec(&bad).unwrap_err().to_string().contains("the judged token must be one"));
    let err = load_spec(&spec("tiny-shp", |_| ())).unwrap_err().to_string();
    assert!(err.contains("T5 (seq2seq)") && err.contains("kind: shp"), "{err}");
}

/// Eurus-RM's layout (a Mistral body, `regression_head` read at the last token) and
/// Starling-RM's names for it (`transformer.` body, `v_head`); the head read at a marked token.
#[test]
fn decoder_with_a_custom_head_matches_its_reference() {
    let g = golden("tiny-eurus-rm");
    let cases = g["cases"].as_array().unwrap();
    for (name, head) in [("tiny-eurus-rm", "regression_head"), ("tiny-starling-rm", "v_head")] {
        for pooling in [None, Some(rbon_score::HeadPooling::Token { token: "[/INST]".into() })] {
            let marked = pooling.is_some();
            let s = spec(name, |s| {
                s.head = Some(head.into());
                s.pooling = pooling;
            });
            let m = load_spec(&s).unwrap();
            let mut inputs = Vec::new();
            for c in cases {
                let mut msgs = messages(&c["messages"]);
                let response = msgs.pop().unwrap();
                let (ids, _) = m.encode(&msgs, &response.content).unwrap();
                let full = u32s(&c["input_ids"]);
                if marked {
                    let mark = g["mark_token_id"].as_u64().unwrap() as u32;
                    let at = full.iter().rposition(|&t| t == mark).unwrap();
                    assert_eq!(ids, full[..=at], "{name}");
                } else {
                    assert_eq!(ids, full, "{name}");
                }
                inputs.push((ids, Vec::new()));
            }
            let key = if marked { "score_at_mark" } else { "score" };
            for budget in [1, 1 << 20] {
                for (s, c) in m.score(&inputs, budget).unwrap().iter().zip(cases) {
                    close(*s, c[key].as_f64().unwrap(), &format!("{name} {key} (budget {budget})"));
                }
            }
        }
    }
    // Without `head`, a folder that is not *ForSequenceClassification says what to set; a head
    // that is not there is named.
    let err = load_spec(&spec("tiny-eurus-rm", |_| ())).unwrap_err().to_string();
    assert!(err.contains("EurusRewardModel") && err.contains("head: regression_head"), "{err}");
    let err = load_spec(&spec("tiny-eurus-rm", |s| s.head = Some("v_head".into()))).unwrap_err().to_string();
    assert!(err.contains("no `v_head.weight` tensor"), "{err}");
}

/// PairRM (llm-blender/PairRM-hf layout) against llm-blender's own Blender.compare and rank:
/// the encoder inputs exactly, logits of both orders within 1e-4, and the rewards built from the
/// full comparison matrix.
#[test]
fn pairrm_matches_llm_blender() {
    use rbon_score::PairAggregate;
    let g = golden("tiny-pairrm");
    let load = |aggregate| {
        let s = spec("tiny-pairrm", |s| {
            s.kind = rbon_score::RewardKind::Pairrm;
            s.aggregate = Some(aggregate);
        });
        load_spec(&s).unwrap()
    };
    let m = load(PairAggregate::MeanLogit);
    let RewardModel::PairRm(p) = &m else { panic!("not PairRM") };
    let tol = tolerance();
    for c in g["pairs"].as_array().unwrap() {
        let prompt = vec![Message::user(c["source"].as_str().unwrap())];
        let a = m.encode(&prompt, c["cand1"].as_str().unwrap()).unwrap();
        let b = m.encode(&prompt, c["cand2"].as_str().unwrap()).unwrap();
        assert_eq!(p.pair_ids(&a, &b), u32s(&c["input_ids_ab"]), "{}", c["source"]);
        assert_eq!(p.pair_ids(&b, &a), u32s(&c["input_ids_ba"]), "{}", c["source"]);
        for (got, key) in [(p.compare(&a, &b).unwrap(), "logit_ab"), (p.compare(&b, &a).unwrap(), "logit_ba")] {
            let want = c[key].as_f64().unwrap();
            assert!((got - want).abs() <= tol, "{key}: {got} vs {want} ({})", c["source"]);
        }
    }
    let conv = &g["conversation"];
    let (conv_a, conv_b) = (conv["conv_a"].as_array().unwrap(), conv["conv_b"].as_array().unwrap());
    let msg = |v: &Value| {
        let role = v["role"].as_str().unwrap().to_lowercase();
        let content = v["content"].as_str().unwrap();
        if role == "user" { Message::user(content) } else { Message::assistant(content) }
    };
    let prompt: Vec<Message> = conv_a[..conv_a.len() - 1].iter().map(msg).collect();
    assert_eq!(
        prompt,
        conv_b[..conv_b.len() - 1].iter().map(msg).collect::<Vec<_>>(),
        "the conversations share a prompt"
    );
    let a = m.encode(&prompt, conv_a.last().unwrap()["content"].as_str().unwrap()).unwrap();
    let b = m.encode(&prompt, conv_b.last().unwrap()["content"].as_str().unwrap()).unwrap();
    assert_eq!(p.pair_ids(&a, &b), u32s(&conv["input_ids_ab"]));
    assert!((p.compare(&a, &b).unwrap() - conv["logit_ab"].as_f64().unwrap()).abs() <= tol);

    for case in g["ranks"].as_array().unwrap() {
        let prompt = vec![Message::user(case["source"].as_str().unwrap())];
        let cands: Vec<&str> = case["candidates"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
        let n = cands.len();
        let matrix: Vec<Vec<f64>> = case["cmp_matrix"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
            .collect();
        let ranks: Vec<f64> = case["ranks"].as_array().unwrap().iter().map(|r| r.as_f64().unwrap()).collect();
        let win: Vec<f64> = (0..n)
            .map(|i| {
                let beats = (0..n).filter(|&j| j != i).filter(|&j| matrix[i][j] - matrix[j][i] > 0.0).count();
                beats as f64 / (n - 1) as f64
            })
            .collect();
        let expected = [
            (
                PairAggregate::MeanLogit,
                f32s(&case["scores_max_logits"]).iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
            ),
            (PairAggregate::Rank, ranks.iter().map(|r| 1.0 - (r - 1.0) / (n - 1) as f64).collect()),
            (PairAggregate::WinRate, win),
        ];
        for (aggregate, want) in expected {
            let m = load(aggregate);
            let inputs: Vec<_> = cands.iter().map(|c| m.encode(&prompt, c).unwrap()).collect();
            for budget in [1, 1 << 20] {
                let got = m.score(&inputs, budget).unwrap();
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!((g - w).abs() <= tol, "{aggregate:?} sample {i}: {g} vs {w} (budget {budget})");
                }
            }
        }
    }
}
