//! The server engine end to end: `rbon run` against a local OpenAI-compatible stub whose
//! sampler is rbon's own (so its samples are known exactly), with injected faults; and, when
//! `RBON_VLLM_URL` is set (scripts/check-server.sh), against a real vLLM server.

#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests: unwraps are the assertions; prints report skipped cases"
)]

mod common;

use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{conversations, load_policy, rbon, repo, samples_rows, text};
use rbon_sample::{Policy, SampleConfig, prompt_ids, server_seed};
use serde_json::{Value, json};

/// What the stub does with one completion request instead of answering it.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Answers as usual.
    Pass,
    Status(u16),
    /// Closes the connection without an answer.
    Close,
    /// Waits, then closes without an answer.
    Hang(Duration),
}

struct StubState {
    policy: Policy,
    model: String,
    max_model_len: usize,
    faults: Mutex<VecDeque<Fault>>,
    /// Every completion request fails with this status.
    always: Option<u16>,
    /// Samples with a fresh seed per request, as a server that ignores `seed` would.
    ignore_seed: bool,
    delay: Duration,
    /// Takes text prompts and answers with text only (no token ids, no log-probs), as TGI does.
    bare: bool,
    completions: AtomicUsize,
}

/// An OpenAI-compatible completions server on 127.0.0.1 that samples with rbon's embedded
/// sampler (tiny-qwen2) from the request's token ids and seed, and answers like vLLM.
struct Stub {
    url: String,
    state: Arc<StubState>,
}

#[derive(Default)]
struct StubOptions {
    faults: Vec<Fault>,
    always: Option<u16>,
    ignore_seed: bool,
    delay_ms: u64,
    max_model_len: Option<usize>,
    bare: bool,
}

impl Stub {
    fn start(o: StubOptions) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let state = Arc::new(StubState {
            policy: load_policy("tiny-qwen2"),
            model: "tiny".into(),
            max_model_len: o.max_model_len.unwrap_or(512),
            faults: Mutex::new(o.faults.into()),
            always: o.always,
            ignore_seed: o.ignore_seed,
            delay: Duration::from_millis(o.delay_ms),
            bare: o.bare,
            completions: AtomicUsize::new(0),
        });
        let st = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = serve(&st, stream);
                });
            }
        });
        Self { url, state }
    }
}

fn serve(st: &StubState, mut stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut len = 0;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        if h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    let (status, answer) = if line.starts_with("GET /v1/models") {
        (
            200,
            json!({"object": "list", "data": [{"id": st.model, "object": "model", "max_model_len": st.max_model_len}]}),
        )
    } else if line.starts_with("POST /v1/completions") {
        st.completions.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(st.delay);
        let fault = st.faults.lock().unwrap().pop_front();
        match fault {
            Some(Fault::Close) => return Ok(()),
            Some(Fault::Hang(d)) => {
                std::thread::sleep(d);
                return Ok(());
            }
            Some(Fault::Status(s)) => (s, json!({"error": {"message": format!("injected {s}"), "code": s}})),
            Some(Fault::Pass) | None => match st.always {
                Some(s) => (s, json!({"error": {"message": format!("always {s}"), "code": s}})),
                None => complete(st, &serde_json::from_slice(&body).unwrap()),
            },
        }
    } else {
        (404, json!({"error": {"message": "no such route"}}))
    };
    let text = answer.to_string();
    write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )?;
    stream.flush()
}

/// One sample drawn by rbon's sampler with the request's parameters and seed (no stop strings:
/// the client cuts them, as vLLM's token ids run past them).
fn complete(st: &StubState, req: &Value) -> (u16, Value) {
    if req["model"] != json!(st.model) {
        return (404, json!({"error": {"message": format!("The model `{}` does not exist.", req["model"])}}));
    }
    let prompt: Vec<u32> = match req["prompt"].as_str() {
        Some(text) => st.policy.tokenizer().encode_prompt(text).unwrap(),
        None => req["prompt"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect(),
    };
    let max_tokens = req["max_tokens"].as_u64().unwrap() as u32;
    if prompt.len() + max_tokens as usize > st.max_model_len {
        return (
            400,
            json!({"error": {"message": format!("This model's maximum context length is {} tokens.", st.max_model_len)}}),
        );
    }
    let seed = if st.ignore_seed {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    } else {
        req["seed"].as_u64().unwrap()
    };
    let top_k = req["top_k"].as_i64().unwrap();
    let cfg = SampleConfig {
        n: 1,
        temperature: req["temperature"].as_f64().unwrap() as f32,
        top_p: req["top_p"].as_f64().unwrap() as f32,
        top_k: if top_k < 0 { 0 } else { top_k as u32 },
        min_p: req["min_p"].as_f64().unwrap() as f32,
        max_new_tokens: max_tokens,
        stop: vec![],
    };
    let g = st.policy.sample(&prompt, &cfg, &[(0, seed)], 1).unwrap().remove(0);
    let lps = st.policy.score(&prompt, &g.token_ids).unwrap();
    if st.bare {
        let choice = json!({"index": 0, "text": g.text, "finish_reason": g.finish_reason.as_str(), "logprobs": null});
        return (200, json!({ "choices": [choice] }));
    }
    let tokens: Vec<String> = g.token_ids.iter().map(|t| format!("token_id:{t}")).collect();
    (
        200,
        json!({"choices": [{"index": 0, "text": g.text, "finish_reason": g.finish_reason.as_str(), "stop_reason": null,
            "token_ids": g.token_ids, "logprobs": {"tokens": tokens, "token_logprobs": lps}}]}),
    )
}

fn pipeline(out: &str, url: &str, server_extra: &str, sample_extra: &str, limit: usize) -> String {
    let model = repo().join("data/models/tiny-qwen2");
    let prompts = repo().join("data/prompts/demo.jsonl");
    format!(
        "name: s\noutput: {out}\nseed: 5\ninput:\n  path: {}\n  prompt_column: instruction\n  id_column: id\n  limit: {limit}\n  shard_size: 2\n\
         policy:\n  model: {}\n  engine: server\n  server:\n    url: {url}\n    model: tiny\n    concurrency: 4\n{server_extra}\
         sample:\n  n: 4\n  max_new_tokens: 16\n  top_k: 40\n{sample_extra}",
        prompts.display(),
        model.display()
    )
}

fn samples_bytes(run: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Ok(b) = fs::read(run.join(format!("samples/shard-{:05}.parquet", out.len()))) {
        out.push(b);
    }
    out
}

/// Starts `rbon run <yaml>` in `dir` and SIGKILLs it once it has written `path`.
fn kill_when_written(dir: &Path, yaml: &str, path: &str) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rbon"))
        .args(["run", yaml])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !dir.join(path).exists() {
        assert!(start.elapsed() < Duration::from_secs(300), "{path} was never written");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before {path} was written");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn the_server_engine_records_what_the_embedded_sampler_draws_with_the_same_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let stub = Stub::start(StubOptions::default());
    // A stop string that cuts many samples, as the embedded engine would.
    fs::write(dir.path().join("a.yaml"), pipeline("a", &stub.url, "", "  stop: [\"e\"]\n", 6)).unwrap();
    let o = rbon(&["run", "a.yaml"], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let rows = samples_rows(&dir.path().join("a"));
    assert_eq!(rows.len(), 24);
    let policy = load_policy("tiny-qwen2");
    let conv = conversations(&dir.path().join("a"));
    let cfg = SampleConfig { n: 4, max_new_tokens: 16, top_k: 40, stop: vec!["e".into()], ..SampleConfig::default() };
    let mut cut = 0;
    for (id, k, tokens, finish, logprob) in &rows {
        let ids = prompt_ids(policy.tokenizer(), &conv[id]).unwrap();
        let want = policy.sample(&ids, &cfg, &[(*k, server_seed(5, id, *k))], 1).unwrap().remove(0);
        assert_eq!((tokens, finish.as_str()), (&want.token_ids, want.finish_reason.as_str()), "{id} {k}");
        assert!((logprob - want.logprob).abs() < 1e-4, "{id} {k}: {logprob} vs {}", want.logprob);
        cut += usize::from(finish == "stop" && tokens.last() != Some(&4));
    }
    assert!(cut > 0, "no sample was cut at the stop string");
    assert_eq!(stub.state.completions.load(Ordering::SeqCst), 2 + 24, "the seed probe, then one request per sample");
    // A rerun reuses every shard without asking the server; a fresh run writes the same bytes.
    let o = rbon(&["run", "a.yaml"], dir.path());
    assert!(text(&o).contains("samples: all 3 shards already done, skipped"), "{}", text(&o));
    assert_eq!(stub.state.completions.load(Ordering::SeqCst), 26);
    fs::write(dir.path().join("b.yaml"), pipeline("b", &stub.url, "", "  stop: [\"e\"]\n", 6)).unwrap();
    assert!(rbon(&["run", "b.yaml"], dir.path()).status.success());
    assert_eq!(samples_bytes(&dir.path().join("a")), samples_bytes(&dir.path().join("b")));
    // The address, concurrency, timeout and retries are not part of the samples' identity.
    let moved = pipeline("a", &stub.url, "    timeout_s: 30\n    retries: 2\n", "  stop: [\"e\"]\n", 6)
        .replace("concurrency: 4", "concurrency: 9");
    fs::write(dir.path().join("a.yaml"), moved).unwrap();
    let o = rbon(&["run", "a.yaml"], dir.path());
    assert!(text(&o).contains("samples: all 3 shards already done, skipped"), "{}", text(&o));
}

#[test]
fn retried_faults_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clean = Stub::start(StubOptions::default());
    fs::write(dir.path().join("clean.yaml"), pipeline("clean", &clean.url, "", "", 6)).unwrap();
    assert!(rbon(&["run", "clean.yaml"], dir.path()).status.success());
    // The seed probe's two requests pass; the faults hit the sampling requests in flight.
    let faults = vec![
        Fault::Pass,
        Fault::Pass,
        Fault::Status(429),
        Fault::Status(500),
        Fault::Close,
        Fault::Status(503),
        Fault::Hang(Duration::from_secs(3)),
        Fault::Status(502),
    ];
    let flaky = Stub::start(StubOptions { faults, ..Default::default() });
    let yaml = pipeline("flaky", &flaky.url, "    timeout_s: 1\n    retries: 3\n", "", 6);
    fs::write(dir.path().join("flaky.yaml"), yaml).unwrap();
    let o = rbon(&["run", "flaky.yaml"], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(flaky.state.completions.load(Ordering::SeqCst), 2 + 24 + 6, "each fault was retried once");
    assert_eq!(samples_bytes(&dir.path().join("clean")), samples_bytes(&dir.path().join("flaky")));
}

/// `rbon run` fails with `want` in its output and writes no samples shard.
fn fails_with(stub_url: &str, server_extra: &str, want: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("p.yaml"), pipeline("out", stub_url, server_extra, "", 6)).unwrap();
    let o = rbon(&["run", "p.yaml"], dir.path());
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    for w in want {
        assert!(t.contains(w), "wanted {w:?} in:\n{t}");
    }
    assert!(!dir.path().join("out/samples/shard-00000.parquet").exists(), "{t}");
}

#[test]
fn server_failures_are_named() {
    // Nothing listens: the port of a listener just closed.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/v1", l.local_addr().unwrap())
    };
    fails_with(&closed, "    retries: 0\n", &["policy's server at", "cannot list the served models", "cannot connect"]);
    let stub = Stub::start(StubOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let yaml = pipeline("out", &stub.url, "", "", 6).replace("    model: tiny\n", "    model: other\n");
    fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    let o = rbon(&["run", "p.yaml"], dir.path());
    assert!(!o.status.success());
    assert!(
        text(&o).contains("does not serve a model named \"other\" (policy.server.model); it serves: tiny"),
        "{}",
        text(&o)
    );
    let ignores = Stub::start(StubOptions { ignore_seed: true, ..Default::default() });
    fails_with(&ignores.url, "", &["ignores the seed", "check_seed: false"]);
    let down = Stub::start(StubOptions { always: Some(500), ..Default::default() });
    fails_with(&down.url, "    retries: 1\n    check_seed: false\n", &["answered 500", "always 500 (after 1 retries)"]);
    // The failing shard's 4 requests were each tried twice; the other worker's shard in flight
    // adds at most its own (the run stops taking shards once one fails).
    let tried = down.state.completions.load(Ordering::SeqCst);
    assert!((8..=24).contains(&tried), "{tried} requests");
    // A prompt longer than the server's context: named with its length.
    let short = Stub::start(StubOptions { max_model_len: Some(20), ..Default::default() });
    fails_with(
        &short.url,
        "    check_seed: false\n",
        &["prompt \"", "prompt tokens fill the server's context of 20 tokens"],
    );
}

#[test]
fn servers_without_token_ids_or_logprobs_are_named_or_teacher_forced() {
    let bare = Stub::start(StubOptions { bare: true, ..Default::default() });
    fails_with(&bare.url, "    prompt: text\n", &["returned no token ids", "logprobs: teacher_forcing"]);
    let dir = tempfile::tempdir().unwrap();
    let yaml = pipeline("out", &bare.url, "    prompt: text\n    logprobs: teacher_forcing\n", "", 6);
    fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    let o = rbon(&["run", "p.yaml"], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let run = dir.path().join("out");
    let (rows, conv, policy) = (samples_rows(&run), conversations(&run), load_policy("tiny-qwen2"));
    let responses = common::strings(&common::read(&run.join("samples/shard-00000.parquet")), "response");
    let cfg = SampleConfig { n: 4, max_new_tokens: 16, top_k: 40, ..SampleConfig::default() };
    for (i, (id, k, tokens, finish, logprob)) in rows.iter().enumerate() {
        let ids = prompt_ids(policy.tokenizer(), &conv[id]).unwrap();
        // The stored tokens are rbon's encoding of the text (closed by <|im_end|> when the
        // model ended its turn), and the log-prob is their teacher forcing.
        let forced: f64 = policy.score(&ids, tokens).unwrap().iter().sum();
        assert!((forced - logprob).abs() < 1e-4, "{id} {k}: {logprob} vs {forced}");
        let drawn = policy.sample(&ids, &cfg, &[(*k, server_seed(5, id, *k))], 1).unwrap().remove(0);
        assert_eq!(policy.tokenizer().decode(tokens).unwrap(), drawn.text, "{id} {k}");
        assert_eq!(finish, drawn.finish_reason.as_str());
        assert_eq!(tokens.last() == Some(&4), finish == "stop", "{id} {k}");
        if i < responses.len() {
            assert_eq!(responses[i], drawn.text);
        }
    }
}

#[test]
fn sigkill_mid_server_sampling_then_resume_gives_identical_shards() {
    let dir = tempfile::tempdir().unwrap();
    let stub = Stub::start(StubOptions { delay_ms: 15, ..Default::default() });
    fs::write(dir.path().join("clean.yaml"), pipeline("clean", &stub.url, "", "", 24)).unwrap();
    fs::write(dir.path().join("killed.yaml"), pipeline("killed", &stub.url, "", "", 24)).unwrap();
    assert!(rbon(&["run", "clean.yaml"], dir.path()).status.success());
    kill_when_written(dir.path(), "killed.yaml", "killed/samples/shard-00002.parquet");
    assert!(!dir.path().join("killed/samples/shard-00011.parquet").exists(), "the run was not interrupted");
    let o = rbon(&["run", "killed.yaml"], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("of 12 shards already done, skipped"), "{}", text(&o));
    assert_eq!(samples_bytes(&dir.path().join("clean")), samples_bytes(&dir.path().join("killed")));
}

#[test]
fn validate_checks_the_server_section_without_contacting_it() {
    let dir = tempfile::tempdir().unwrap();
    let closed = "http://127.0.0.1:9/v1";
    let good = pipeline("out", closed, "", "", 6);
    fs::write(dir.path().join("good.yaml"), &good).unwrap();
    let o = rbon(&["validate", "good.yaml"], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let cases: Vec<(String, Vec<&str>)> = vec![
        (good.replace(closed, "127.0.0.1:8000"), vec!["policy.server.url", "is not an http(s) URL"]),
        (good.replace("concurrency: 4", "concurrency: 0"), vec!["policy.server.concurrency", "between 1 and 4096"]),
        (good.replace("    model: tiny\n", "    model: tiny\n    timeout_s: -1\n"), vec!["policy.server.timeout_s"]),
        (
            good.replace("    model: tiny\n", "    model: tiny\n    api_key_env: RBON_TEST_UNSET_KEY\n"),
            vec!["policy.server.api_key_env", "RBON_TEST_UNSET_KEY is not set"],
        ),
        (good.replace("    model: tiny\n", "    model: tiny\n    colour: red\n"), vec!["colour"]),
        (good.replace("  engine: server\n", ""), vec!["policy.server", "only with `policy.engine: server`"]),
        (
            good.split("  server:\n").next().unwrap().to_owned() + "sample:\n  n: 4\n",
            vec!["policy.engine", "needs a `policy.server` section"],
        ),
    ];
    for (yaml, want) in cases {
        fs::write(dir.path().join("bad.yaml"), &yaml).unwrap();
        let o = rbon(&["validate", "bad.yaml"], dir.path());
        let t = text(&o);
        assert!(!o.status.success(), "{yaml}\n{t}");
        for w in want {
            assert!(t.contains(w), "wanted {w:?} in:\n{t}");
        }
    }
}

/// Against a real vLLM server (scripts/check-server.sh sets the variables): every recorded
/// log-prob equals rbon's teacher forcing of the same tokens within 1e-3, a second run gives the
/// same samples, and a run killed mid-way resumes to identical shards.
#[test]
fn a_real_vllm_server_samples_with_exact_logprobs() {
    let (Ok(url), Ok(served), Ok(model)) =
        (std::env::var("RBON_VLLM_URL"), std::env::var("RBON_VLLM_MODEL"), std::env::var("RBON_VLLM_POLICY"))
    else {
        eprintln!(
            "skipped: RBON_VLLM_URL, RBON_VLLM_MODEL and RBON_VLLM_POLICY are not set (scripts/check-server.sh sets them)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let yaml = |out: &str| {
        pipeline(out, &url, "", "", 24)
            .replace("concurrency: 4", "concurrency: 32")
            .replace("model: tiny", &format!("model: {served}"))
            .replace(&repo().join("data/models/tiny-qwen2").display().to_string(), &model)
            .replace("max_new_tokens: 16", "max_new_tokens: 48")
            .replace("n: 4", "n: 8")
    };
    for name in ["a", "b", "killed"] {
        fs::write(dir.path().join(format!("{name}.yaml")), yaml(name)).unwrap();
    }
    let o = rbon(&["run", "a.yaml"], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let rows = samples_rows(&dir.path().join("a"));
    assert_eq!(rows.len(), 24 * 8);
    let cfg = rbon_sample::PolicyConfig::new(model.clone());
    let policy = Policy::load(&cfg, &rbon_models::Device::Cpu).unwrap();
    let conv = conversations(&dir.path().join("a"));
    let mut worst = 0f64;
    for (id, k, tokens, _, logprob) in &rows {
        let ids = prompt_ids(policy.tokenizer(), &conv[id]).unwrap();
        let forced: f64 = policy.score(&ids, tokens).unwrap().iter().sum();
        worst = worst.max((forced - logprob).abs());
        assert!((forced - logprob).abs() < 1e-3, "{id} {k}: server {logprob}, teacher forcing {forced}");
    }
    let stopped = rows.iter().filter(|r| r.3 == "stop").count();
    println!("{} samples, {stopped} ended by EOS; largest |server − teacher forcing| = {worst:.2e}", rows.len());
    // With a stop string the server runs past: rbon cuts the tokens, and the log-prob follows.
    fs::write(dir.path().join("cut.yaml"), yaml("cut") + "  stop: [\"e\"]\n").unwrap();
    let o = rbon(&["run", "cut.yaml"], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let cut = samples_rows(&dir.path().join("cut"));
    let mut cuts = 0;
    for (i, (id, k, tokens, _, logprob)) in cut.iter().enumerate() {
        let ids = prompt_ids(policy.tokenizer(), &conv[id]).unwrap();
        let forced: f64 = policy.score(&ids, tokens).unwrap().iter().sum();
        assert!((forced - logprob).abs() < 1e-3, "{id} {k}: server {logprob}, teacher forcing {forced}");
        let response = policy.tokenizer().decode(tokens).unwrap();
        assert!(!response.contains('e'), "{id} {k}: {response:?}");
        cuts += usize::from(tokens.len() < rows[i].2.len());
    }
    assert!(cuts > 0, "no sample was cut at the stop string");
    let o = rbon(&["run", "b.yaml"], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(samples_rows(&dir.path().join("b")), rows, "the same seeds gave other samples");
    kill_when_written(dir.path(), "killed.yaml", "killed/samples/shard-00001.parquet");
    let o = rbon(&["run", "killed.yaml"], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(samples_bytes(&dir.path().join("a")), samples_bytes(&dir.path().join("killed")));
}
