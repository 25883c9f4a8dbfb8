//! Resource limits: inputs that would hang or exhaust the machine get a clear error (or a
//! bounded result) instead.

#![allow(clippy::unwrap_used, reason = "tests: unwraps are the assertions")]

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{rbon, repo, samples_rows, text};

fn policy_pipeline(prompts: &str, extra_policy: &str, max_new_tokens: u32) -> String {
    format!(
        "name: l\noutput: out\nseed: 1\ninput:\n  path: {prompts}\n  prompt_column: instruction\n  id_column: id\n\
         policy:\n  model: {}\n{extra_policy}sample:\n  n: 2\n  max_new_tokens: {max_new_tokens}\n",
        repo().join("data/models/tiny-qwen2").display()
    )
}

/// Runs `rbon` and fails the test if it takes longer than `limit`.
fn rbon_within(args: &[&str], dir: &std::path::Path, limit: Duration) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rbon"))
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            child.kill().unwrap();
            panic!("rbon {args:?} ran longer than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_chat_template_that_never_ends_is_stopped_and_a_broken_one_named_by_validate() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("p.jsonl"), "{\"id\": \"a\", \"instruction\": \"Hi\"}\n").unwrap();
    let looping = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x";
    fs::write(dir.path().join("loop.jinja"), looping).unwrap();
    fs::write(dir.path().join("broken.jinja"), "{% for m in messages %}{{ m.content }").unwrap();
    fs::write(dir.path().join("loop.yaml"), policy_pipeline("p.jsonl", "  chat_template: loop.jinja\n", 8)).unwrap();
    fs::write(dir.path().join("broken.yaml"), policy_pipeline("p.jsonl", "  chat_template: broken.jinja\n", 8))
        .unwrap();
    let o = rbon_within(&["validate", "loop.yaml"], dir.path(), Duration::from_secs(60));
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("loop.jinja") && text(&o).contains("steps for one conversation"), "{}", text(&o));
    let o = rbon_within(&["run", "loop.yaml"], dir.path(), Duration::from_secs(60));
    assert!(!o.status.success(), "{}", text(&o));
    let o = rbon(&["validate", "broken.yaml"], dir.path());
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(text(&o).contains("policy.chat_template") && text(&o).contains("broken.jinja"), "{}", text(&o));
}

#[test]
fn responses_end_at_the_policys_last_position_and_longer_prompts_are_named() {
    let dir = tempfile::tempdir().unwrap();
    // tiny-qwen2 has 512 positions; "word " is about three tokens of its tiny BPE.
    let long = "word ".repeat(140);
    let longer = "word ".repeat(240);
    fs::write(dir.path().join("long.jsonl"), format!("{{\"id\": \"long\", \"instruction\": \"{long}\"}}\n")).unwrap();
    fs::write(dir.path().join("longer.jsonl"), format!("{{\"id\": \"longer\", \"instruction\": \"{longer}\"}}\n"))
        .unwrap();
    fs::write(dir.path().join("a.yaml"), policy_pipeline("long.jsonl", "", 200)).unwrap();
    let o = rbon(&["run", "a.yaml"], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let policy = common::load_policy("tiny-qwen2");
    let conv = common::conversations(&dir.path().join("out"));
    let prompt = rbon_sample::prompt_ids(policy.tokenizer(), &conv["long"]).unwrap();
    assert!(prompt.len() > 312 && prompt.len() < 512, "{}", prompt.len());
    for (_, _, tokens, finish, _) in samples_rows(&dir.path().join("out")) {
        assert!(prompt.len() + tokens.len() <= 512, "{} + {}", prompt.len(), tokens.len());
        assert!(finish == "length" || tokens.last() == Some(&4));
    }
    fs::write(dir.path().join("b.yaml"), policy_pipeline("longer.jsonl", "", 8).replace("output: out", "output: b"))
        .unwrap();
    let o = rbon(&["run", "b.yaml"], dir.path());
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("prompt \"longer\"") && text(&o).contains("fill the policy's 512 positions"),
        "{}",
        text(&o)
    );
    // max_new_tokens beyond the positions, or beyond any context, fails validation.
    for (n, want) in [(100_000, "the policy has 512 positions"), (2_000_000, "at most 1048576")] {
        fs::write(dir.path().join("c.yaml"), policy_pipeline("long.jsonl", "", n)).unwrap();
        let o = rbon(&["validate", "c.yaml"], dir.path());
        assert_eq!(o.status.code(), Some(78), "{}", text(&o));
        assert!(text(&o).contains("sample.max_new_tokens") && text(&o).contains(want), "{}", text(&o));
    }
}

#[test]
fn oversized_inputs_are_refused_before_they_are_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let o = rbon_within(&["validate", "/dev/zero"], dir.path(), Duration::from_secs(30));
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(text(&o).contains("not a regular file"), "{}", text(&o));
    fs::write(dir.path().join("big.yaml"), "#".repeat(2 << 20)).unwrap();
    let o = rbon(&["validate", "big.yaml"], dir.path());
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(text(&o).contains("a pipeline file is at most"), "{}", text(&o));
    // A 5 MiB prompt: named by file and line, nothing written.
    let huge = "a".repeat(5 << 20);
    let rows =
        format!("{{\"id\": \"ok\", \"instruction\": \"Hi\"}}\n{{\"id\": \"huge\", \"instruction\": \"{huge}\"}}\n");
    fs::write(dir.path().join("p.jsonl"), rows).unwrap();
    fs::write(dir.path().join("p.yaml"), policy_pipeline("p.jsonl", "", 8)).unwrap();
    let o = rbon(&["run", "p.yaml"], dir.path());
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("p.jsonl:2") && text(&o).contains("bytes of text; a value is at most"), "{}", text(&o));
    assert!(!dir.path().join("out/prompts/shard-00000.parquet").exists());
}

#[test]
fn extreme_rewards_do_not_hang_the_plots() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows = String::new();
    for p in 0..3 {
        for k in 0..4 {
            let proxy = if k == 1 {
                1.7e308
            } else if k == 2 {
                -1.7e308
            } else {
                k as f64
            };
            rows.push_str(&format!(
                "{{\"prompt_id\": \"p{p}\", \"prompt\": \"Q{p}?\", \"sample_idx\": {k}, \"response\": \"r{k}\", \
                 \"reward_proxy\": {proxy:e}, \"reward_gold\": {:e}, \"logprob\": -{}.5, \"num_tokens\": 3}}\n",
                -proxy,
                k + 1
            ));
        }
    }
    fs::write(dir.path().join("c.jsonl"), rows).unwrap();
    let yaml = "name: x\noutput: out\ninput:\n  candidates: c.jsonl\nselect:\n  proxy: proxy\n  gold: [gold]\n  \
                methods: [bon, rbon_kl]\n  betas: [0.1, 1.0]\npair:\n  rejected: worst\n";
    fs::write(dir.path().join("x.yaml"), yaml).unwrap();
    let o = rbon_within(&["run", "x.yaml"], dir.path(), Duration::from_secs(120));
    assert!(o.status.success(), "{}", text(&o));
    assert!(dir.path().join("out/report/report.md").exists());
    let o = rbon_within(&["report", "out"], dir.path(), Duration::from_secs(120));
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn validate_names_a_truncated_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = repo().join("data/models/tiny-qwen2-gguf");
    let dst = dir.path().join("m");
    fs::create_dir(&dst).unwrap();
    for e in fs::read_dir(&src).unwrap().flatten() {
        fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let gguf =
        fs::read_dir(&dst).unwrap().flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "gguf"));
    let gguf = gguf.unwrap();
    let bytes = fs::read(&gguf).unwrap();
    fs::write(&gguf, &bytes[..bytes.len() * 2 / 3]).unwrap();
    fs::write(dir.path().join("p.jsonl"), "{\"id\": \"a\", \"instruction\": \"Hi\"}\n").unwrap();
    let yaml = policy_pipeline("p.jsonl", "", 8)
        .replace(&repo().join("data/models/tiny-qwen2").display().to_string(), &gguf.display().to_string());
    fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    let o = rbon(&["validate", "p.yaml"], dir.path());
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(text(&o).contains("policy.model") && text(&o).contains("truncated: tensor"), "{}", text(&o));
}

#[test]
fn validate_refuses_a_decoder_as_the_embedder() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("p.jsonl"), "{\"id\": \"a\", \"instruction\": \"Hi\"}\n").unwrap();
    let models = repo().join("data/models");
    let yaml = policy_pipeline("p.jsonl", "", 8)
        + &format!("score:\n  embedding: {{ model: {} }}\n", models.join("tiny-llama").display());
    fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    let o = rbon(&["validate", "p.yaml"], dir.path());
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(text(&o).contains("score.embedding.model") && text(&o).contains("is a `llama` model"), "{}", text(&o));
}

#[test]
fn a_chat_template_that_builds_an_enormous_string_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("p.jsonl"), "{\"id\": \"a\", \"instruction\": \"Hi\"}\n").unwrap();
    // 64 doublings: 2^64 bytes unless stopped; each step is a handful of instructions.
    let doubling = "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}\
                    {{ ns.s | length }}";
    fs::write(dir.path().join("grow.jinja"), doubling).unwrap();
    fs::write(dir.path().join("grow.yaml"), policy_pipeline("p.jsonl", "  chat_template: grow.jinja\n", 8)).unwrap();
    for cmd in ["validate", "run"] {
        let o = rbon_within(&[cmd, "grow.yaml"], dir.path(), Duration::from_secs(60));
        assert!(!o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("grow.jinja") && text(&o).contains("data it builds"), "{cmd}: {}", text(&o));
    }
    assert!(!dir.path().join("out").exists(), "nothing is written");
}

#[test]
fn tuning_ids_that_are_not_in_the_data_fail_validate_and_run_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let byo = fs::read_to_string(repo().join("pipelines/byo.yaml")).unwrap();
    let candidates = repo().join("data/candidates/demo.jsonl");
    let yaml = byo
        .replace("data/candidates/demo.jsonl", &candidates.display().to_string())
        .replace("output: runs/byo", "output: out")
        .replace("  gold: [gold]", "  gold: [gold]\n  tune: { gold: gold, prompts: [demo-001, demo-999, demo-003] }");
    fs::write(dir.path().join("byo.yaml"), &yaml).unwrap();
    for cmd in ["validate", "run"] {
        let o = rbon(&[cmd, "byo.yaml"], dir.path());
        assert_eq!(o.status.code(), Some(78), "{cmd}: {}", text(&o));
        let t = text(&o);
        assert!(t.contains("select.tune.prompts[1]") && t.contains("`demo-999` is not a prompt id of"), "{cmd}: {t}");
        assert!(!t.contains("demo-001") && !t.contains("demo-003"), "{cmd}: {t}");
    }
    assert!(!dir.path().join("out").exists(), "nothing is written");
    // Within `input.limit`: an id past the first prompts is named with the limit.
    let limited = yaml.replace("  shard_size: 8", "  shard_size: 8\n  limit: 2");
    fs::write(dir.path().join("limited.yaml"), limited).unwrap();
    let o = rbon(&["validate", "limited.yaml"], dir.path());
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(text(&o).contains("select.tune.prompts[2]") && text(&o).contains("the first 2 prompts"), "{}", text(&o));
    // Ids that are all there pass, and validate says how many prompts it read.
    fs::write(dir.path().join("ok.yaml"), yaml.replace("demo-999", "demo-002")).unwrap();
    let o = rbon(&["validate", "ok.yaml"], dir.path());
    assert!(o.status.success() && text(&o).contains("24 prompts"), "{}", text(&o));
}
