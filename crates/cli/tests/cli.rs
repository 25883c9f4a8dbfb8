//! End-to-end tests that run the `rbon` binary on files in a temporary directory.

#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests: unwraps are the assertions; prints report skipped or measured cases"
)]

mod common;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use common::{conversations, load_policy, rbon, read, repo, samples_rows, strings, text};

/// A small candidates file: `prompts` prompts of `n` samples, deterministic.
fn candidates(prompts: usize, n: usize, with_logprob: bool, with_embedding: bool) -> String {
    let mut s = String::new();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f64 / (1u64 << 53) as f64
    };
    for p in 0..prompts {
        for k in 0..n {
            let words = 1 + (rnd() * 12.0) as usize;
            let response = (0..words).map(|w| format!("w{}", (w * 7 + k + p) % 13)).collect::<Vec<_>>().join(" ");
            let mut row = format!(
                r#"{{"prompt_id": "p{p:05}", "prompt": "Question number {p}?", "sample_idx": {k}, "response": "{response}", "reward_proxy": {:.6}, "reward_gold": {:.6}, "reward_alt": {:.6}, "num_tokens": {}"#,
                rnd() * 4.0 - 2.0,
                rnd() * 4.0 - 2.0,
                rnd() * 30.0 + 5.0,
                words + 1
            );
            if with_logprob {
                write!(row, r#", "logprob": {:.6}"#, -(words as f64) * (1.0 + rnd())).unwrap();
            }
            if with_embedding {
                let e: Vec<String> = (0..8).map(|_| format!("{:.5}", rnd() - 0.3)).collect();
                write!(row, r#", "embedding": [{}]"#, e.join(", ")).unwrap();
            }
            s.push_str(&row);
            s.push_str("}\n");
        }
    }
    s
}

const BETAS: &str = "[0.001, 0.01, 0.1, 1.0]";

fn pipeline(cands: &str, output: &str, shard_size: usize, betas: &str) -> String {
    format!(
        "name: t\noutput: {output}\nseed: 3\ninput:\n  candidates: {cands}\n  shard_size: {shard_size}\n\
         select:\n  proxy: proxy\n  gold: [gold]\n  methods: [bon, rbon_kl, rbon_wd, mbr, rbon_len]\n  betas: {betas}\n\
         pair:\n  rejected: worst\n"
    )
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(prompts: usize, n: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("c.jsonl"), candidates(prompts, n, true, true)).unwrap();
        Self { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        fs::write(&p, text).unwrap();
        p
    }
    /// Starts `rbon` in the fixture without waiting (stderr piped, stdout dropped).
    fn spawn(&self, args: &[&str]) -> std::process::Child {
        Command::new(env!("CARGO_BIN_EXE_rbon"))
            .args(args)
            .current_dir(self.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn run(&self, args: &[&str]) -> Output {
        rbon(args, self.path())
    }
}

/// Every export file under `pairs/`, relative path → bytes.
fn export_files(run: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let pairs = run.join("pairs");
    for m in fs::read_dir(&pairs).unwrap().flatten().filter(|e| e.path().is_dir()) {
        for b in fs::read_dir(m.path()).unwrap().flatten() {
            for f in fs::read_dir(b.path()).unwrap().flatten() {
                let p = f.path();
                out.push((p.strip_prefix(run).unwrap().to_owned(), fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Waits until a running `rbon` has written `path`; fails if it ends first or never gets there.
fn wait_for(path: &Path, child: &mut std::process::Child) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "the run never wrote {}", path.display());
        assert!(child.try_wait().unwrap().is_none(), "the run finished before it could be stopped");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs `rbon run <yaml>` and SIGKILLs it as soon as it has written `path` (relative to the fixture).
fn run_and_kill_when(f: &Fixture, yaml: &str, path: &str) {
    let mut child = f.spawn(&["run", yaml]);
    wait_for(&f.path().join(path), &mut child);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The two runs' exports are the same files with the same bytes.
fn assert_same_exports(a: &Path, b: &Path) {
    let (a, b) = (export_files(a), export_files(b));
    assert_eq!(a.len(), b.len());
    for ((pa, ba), (pb, bb)) in a.iter().zip(&b) {
        assert_eq!(pa, pb);
        if pa.extension().is_some_and(|e| e == "parquet") {
            assert!(ba == bb, "{} differs", pa.display());
        }
    }
}

#[test]
fn repository_pipelines_run() {
    let out = tempfile::tempdir().unwrap();
    for (name, check) in [
        ("demo", "demo/pairs/rbon_kl/beta=0.01/train-00000-of-00001.parquet"),
        ("byo", "byo/pairs/rbon_wd/beta=0.1/train-00000-of-00001.parquet"),
        ("byo-variants", "byo-variants/vbon/train-00000-of-00001.parquet"),
    ] {
        let yaml = fs::read_to_string(repo().join(format!("pipelines/{name}.yaml"))).unwrap();
        let from = format!("output: runs/{name}");
        assert!(yaml.contains(&from));
        let yaml = yaml.replace(&from, &format!("output: {}", out.path().join(name).display()));
        let cfg = out.path().join(format!("{name}.yaml"));
        fs::write(&cfg, yaml).unwrap();
        let o = rbon(&["run", cfg.to_str().unwrap()], &repo());
        assert!(o.status.success(), "{name}: {}", text(&o));
        assert!(out.path().join(check).is_file(), "{name}: {}", text(&o));
    }
    assert_export_hashes(out.path());
}

/// The sha256 of every export data file (not the pair shards, whose footers carry the
/// fingerprints) of the repository pipelines, against `data/golden/export-hashes.json`: a
/// refactoring must not change a byte. Regenerate with
/// `RBON_UPDATE_EXPORT_HASHES=1 cargo test -p rbon --test cli repository_pipelines_run` when
/// outputs change on purpose. The demo's numbers come from the CPU kernels (AVX-512 or not, AMX
/// or not), so its hashes are compared only on a CPU with the kernels of the one that took
/// them (recorded in the file); byo and byo-variants (no model arithmetic) always.
fn assert_export_hashes(runs: &Path) {
    use sha2::Digest;
    let mut got = std::collections::BTreeMap::new();
    for name in ["demo", "byo", "byo-variants"] {
        let mut stack = vec![runs.join(name).join("pairs"), runs.join(name).join("vbon")];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "parquet" || x == "jsonl")
                    && !rbon_core::stage::is_shard_file(&e.file_name().to_string_lossy())
                {
                    let rel = p.strip_prefix(runs).unwrap().display().to_string();
                    got.insert(rel, rbon_core::seed::hex(&sha2::Sha256::digest(fs::read(&p).unwrap())));
                }
            }
        }
    }
    let path = repo().join("data/golden/export-hashes.json");
    if std::env::var_os("RBON_UPDATE_EXPORT_HASHES").is_some() {
        let v = serde_json::json!({ "cpu_kernels": cpu_kernels(), "files": got });
        fs::write(&path, serde_json::to_string_pretty(&v).unwrap() + "\n").unwrap();
        return;
    }
    let recorded: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    let want: std::collections::BTreeMap<String, String> = serde_json::from_value(recorded["files"].clone()).unwrap();
    let same_kernels = recorded["cpu_kernels"].as_str() == Some(cpu_kernels().as_str());
    if !same_kernels {
        eprintln!(
            "this CPU's kernels ({}) are not those the hashes were taken with: the demo is not compared",
            cpu_kernels()
        );
    }
    let keep = |k: &String| same_kernels || !k.starts_with("demo/");
    let got: std::collections::BTreeMap<_, _> = got.into_iter().filter(|(k, _)| keep(k)).collect();
    let want: std::collections::BTreeMap<_, _> = want.into_iter().filter(|(k, _)| keep(k)).collect();
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "the set of export files changed");
    let changed: Vec<&String> = got.iter().filter(|(k, v)| want.get(*k) != Some(v)).map(|(k, _)| k).collect();
    assert!(changed.is_empty(), "{} export files changed, e.g. {:?}", changed.len(), &changed[..changed.len().min(5)]);
}

/// The CPU kernels the demo's numbers depend on.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn cpu_kernels() -> String {
    let avx512 = std::arch::is_x86_feature_detected!("avx512f");
    format!("x86_64 avx512={avx512} amx={}", rbon_models::amx::available())
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn cpu_kernels() -> String {
    std::env::consts::ARCH.to_owned()
}

#[test]
fn run_writes_pairs_then_rerun_skips_everything() {
    let f = Fixture::new(20, 6);
    f.write("p.yaml", &pipeline("c.jsonl", "out", 7, BETAS));
    let o = f.run(&["run", "p.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    let run = f.path().join("out");
    for d in [
        "pipeline.yaml",
        "manifest.json",
        "prompts/shard-00002.parquet",
        "samples/shard-00000.parquet",
        "scores/shard-00001.parquet",
        "selections/shard-00002.parquet",
        "pairs/shard-00002.parquet",
    ] {
        assert!(run.join(d).exists(), "{d} missing");
    }
    assert!(!run.join("prompts/shard-00003.parquet").exists());

    // Every export: the columns of DESIGN §8, no pair with chosen == rejected.
    let exports = export_files(&run);
    let parquet: Vec<_> = exports.iter().filter(|(p, _)| p.extension().is_some_and(|e| e == "parquet")).collect();
    assert_eq!(parquet.len(), 2 + 3 * 4, "{:?}", exports.iter().map(|e| &e.0).collect::<Vec<_>>());
    for (p, _) in &parquet {
        let b = read(&run.join(p));
        let schema = b.schema();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(
            names,
            [
                "prompt_id",
                "method",
                "beta",
                "prompt",
                "chosen",
                "rejected",
                "chosen_index",
                "rejected_index",
                "score_chosen",
                "score_rejected",
                "margin",
                "chosen_message",
                "rejected_message"
            ]
        );
        let content = |col: &str, r: usize| {
            let l = b.column_by_name(col).unwrap().as_list::<i32>().value(r);
            let s = l.as_struct().column_by_name("content").unwrap().as_string::<i32>().value(0).to_owned();
            let role = l.as_struct().column_by_name("role").unwrap().as_string::<i32>().value(0).to_owned();
            (role, s)
        };
        for r in 0..b.num_rows() {
            let (rc, c) = content("chosen", r);
            let (rr, j) = content("rejected", r);
            assert_eq!((rc.as_str(), rr.as_str()), ("assistant", "assistant"));
            assert_ne!(c, j, "{} row {r}", p.display());
        }
        assert!(run.join(p.parent().unwrap()).join("README.md").is_file(), "{} has no card", p.display());
    }
    let card = fs::read_to_string(run.join("pairs/rbon_kl/beta=0.01/README.md")).unwrap();
    assert!(card.contains("pairs written") && card.contains("rbon_kl"), "{card}");

    let before = export_files(&run);
    let o = f.run(&["run", "p.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    for stage in ["import", "selections", "pairs"] {
        assert!(t.contains(&format!("{stage}: all 3 shards already done, skipped")), "{t}");
    }
    assert!(t.contains("exports up to date"), "{t}");
    assert_eq!(before, export_files(&run));
}

#[test]
fn changing_betas_reruns_only_selection_and_pairs() {
    let f = Fixture::new(12, 5);
    f.write("p.yaml", &pipeline("c.jsonl", "out", 5, BETAS));
    assert!(f.run(&["run", "p.yaml"]).status.success());
    let run = f.path().join("out");
    let mtime = |p: &str| fs::metadata(run.join(p)).unwrap().modified().unwrap();
    let samples_before = mtime("samples/shard-00000.parquet");
    let selections_before = fs::read(run.join("selections/shard-00000.parquet")).unwrap();
    std::thread::sleep(Duration::from_millis(20));

    f.write("p.yaml", &pipeline("c.jsonl", "out", 5, "[0.01, 0.5]"));
    let o = f.run(&["run", "p.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("import: all 3 shards already done, skipped"), "{t}");
    assert!(t.contains("selections: earlier output discarded"), "{t}");
    assert!(t.contains("pairs: earlier output discarded"), "{t}");
    assert!(!t.contains("selections: all 3 shards already done"), "{t}");
    assert_eq!(samples_before, mtime("samples/shard-00000.parquet"));
    assert_ne!(selections_before, fs::read(run.join("selections/shard-00000.parquet")).unwrap());
    // Old β exports are gone with the old pairs; the new ones are there.
    assert!(!run.join("pairs/rbon_kl/beta=0.001").exists());
    assert!(run.join("pairs/rbon_kl/beta=0.5/train-00000-of-00001.parquet").is_file());

    // --force starts over.
    let o = f.run(&["run", "p.yaml", "--force"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains("already done"), "{}", text(&o));
}

#[test]
fn pair_rows_do_not_depend_on_shard_size() {
    let f = Fixture::new(15, 4);
    f.write("a.yaml", &pipeline("c.jsonl", "a", 4, BETAS));
    f.write("b.yaml", &pipeline("c.jsonl", "b", 15, BETAS));
    assert!(f.run(&["run", "a.yaml"]).status.success());
    assert!(f.run(&["run", "b.yaml"]).status.success());
    let a = export_files(&f.path().join("a"));
    let b = export_files(&f.path().join("b"));
    assert_eq!(a.len(), b.len());
    for ((pa, ba), (pb, bb)) in a.iter().zip(&b) {
        assert_eq!(pa, pb);
        if pa.extension().is_some_and(|e| e == "parquet") {
            assert_eq!(read(&f.path().join("a").join(pa)), read(&f.path().join("b").join(pb)), "{}", pa.display());
            // One file per export either way, written from the same rows: the same bytes.
            assert_eq!(ba, bb, "{}", pa.display());
        }
    }
}

#[test]
fn export_bytes_do_not_depend_on_shard_size_past_a_row_group() {
    // More than one row group (1,024 rows) per export, cut differently by the two shard sizes.
    let f = Fixture::new(4500, 2);
    let yaml = |out: &str, shard: usize| {
        pipeline("c.jsonl", out, shard, "[0.1]")
            .replace("methods: [bon, rbon_kl, rbon_wd, mbr, rbon_len]", "methods: [bon]")
    };
    f.write("a.yaml", &yaml("a", 7));
    f.write("b.yaml", &yaml("b", 1000));
    assert!(f.run(&["run", "a.yaml"]).status.success());
    assert!(f.run(&["run", "b.yaml"]).status.success());
    let p = "pairs/bon/beta=0/train-00000-of-00001.parquet";
    let (a, b) = (fs::read(f.path().join("a").join(p)).unwrap(), fs::read(f.path().join("b").join(p)).unwrap());
    assert!(read(&f.path().join("a").join(p)).num_rows() > 4096);
    assert!(a == b, "export bytes differ between shard sizes 7 and 1000");
}

/// (name, extra files, pipeline text, expected message fragments).
fn bad_configs() -> Vec<(&'static str, String, Vec<&'static str>)> {
    let good = pipeline("c.jsonl", "out", 4, BETAS);
    vec![
        ("unknown section", good.replace("pair:", "pairs:"), vec!["p.yaml:12:1: pairs: unknown section `pairs`"]),
        (
            "unknown key",
            good.replace("  proxy: proxy", "  proxi: proxy"),
            vec!["select.proxi: unknown field `proxi`, expected one of `proxy`, `gold`, `methods`, `betas`"],
        ),
        (
            "bad method",
            good.replace("mbr, rbon_len", "mbr, rbon_lenn"),
            vec!["select.methods[4]: unknown variant `rbon_lenn`, expected one of"],
        ),
        (
            "negative beta",
            good.replace(BETAS, "[0.1, -0.5]"),
            vec!["p.yaml:11:16: select.betas[1]: β = -0.5 is not allowed: β must be a finite number ≥ 0"],
        ),
        ("duplicate beta", good.replace(BETAS, "[0.1, 0.1]"), vec!["select.betas[1]: β = 0.1 is listed twice"]),
        (
            "unknown proxy",
            good.replace("proxy: proxy", "proxy: helpful"),
            vec![
                "select.proxy: no reward model `helpful` in the candidates file c.jsonl (available: alt, gold, proxy)",
            ],
        ),
        (
            "unknown gold",
            good.replace("gold: [gold]", "gold: [gold, harmless]"),
            vec!["select.gold[1]: no reward model `harmless`"],
        ),
        (
            "kl without logprob",
            good.replace("c.jsonl", "nolp.jsonl"),
            vec![
                "select.methods[1]: `rbon_kl` needs log-probs, but the candidates file nolp.jsonl has no `logprob` column",
            ],
        ),
        (
            "wd without embedding",
            good.replace("c.jsonl", "noemb.jsonl"),
            vec!["select.methods[2]: `rbon_wd` needs embeddings", "select.methods[3]: `mbr` needs embeddings"],
        ),
        ("zero shard size", good.replace("shard_size: 4", "shard_size: 0"), vec!["input.shard_size: 0 is not allowed"]),
        (
            "negative shard size",
            good.replace("shard_size: 4", "shard_size: -3"),
            vec!["input.shard_size: invalid value: integer `-3`, expected u64"],
        ),
        (
            "missing candidates",
            good.replace("c.jsonl", "nope.jsonl"),
            vec!["input.candidates: no such file: nope.jsonl"],
        ),
        ("syntax error", good.replace("betas: [", "betas: [[").to_owned(), vec!["p.yaml:", "invalid YAML"]),
        ("missing output", good.replace("output: out\n", ""), vec!["missing `output`"]),
        (
            "bad seed",
            good.replace("seed: 3", "seed: three"),
            vec!["p.yaml:3:7: seed: invalid type: string \"three\", expected u64"],
        ),
        (
            "bad rejected rule",
            good.replace("rejected: worst", "rejected: best"),
            vec!["pair.rejected: unknown variant `best`, expected one of `worst`, `random`, `second`"],
        ),
        (
            "nan margin",
            format!("{good}  min_margin: .nan\n"),
            vec!["p.yaml:14:15: invalid YAML: non-finite float `.nan`"],
        ),
        (
            "pair method not selected",
            good.replace("methods: [bon, rbon_kl, rbon_wd, mbr, rbon_len]", "methods: [bon]")
                + "  methods: [rbon_wd]\n",
            vec!["pair.methods[0]: `rbon_wd` is not in select.methods (bon)"],
        ),
        (
            "gpu device",
            format!("{good}runtime:\n  devices: [cuda:0, tpu]\n"),
            vec![
                "runtime.devices[0]: `cuda:0`: this build of rbon has no CUDA support",
                "runtime.devices[1]: unknown device `tpu`",
            ],
        ),
        (
            "both inputs",
            good.replace("  shard_size: 4", "  shard_size: 4\n  path: c.jsonl"),
            vec!["input.candidates: set either `input.path` or `input.candidates`, not both"],
        ),
        (
            "bon_unc without ensemble",
            good.replace("mbr, rbon_len]", "mbr, rbon_len, bon_unc]"),
            vec![
                "select.methods[5]: `bon_unc` needs an ensemble: set `select.proxy` to a list of two or more reward models",
            ],
        ),
        (
            "bad ensemble member",
            good.replace("proxy: proxy", "proxy: [proxy, nope]"),
            vec!["select.proxy[1]: no reward model `nope`"],
        ),
        (
            "negative lambda",
            good.replace("  betas:", "  lambdas: [1.0, -2.0]\n  betas:"),
            vec!["select.lambdas[1]: λ = -2 is not allowed"],
        ),
        (
            "bad candidates columns",
            good.replace("c.jsonl", "nocol.jsonl"),
            vec!["input.candidates: nocol.jsonl: missing column `response`"],
        ),
    ]
}

#[test]
fn malformed_configs_each_give_their_message() {
    let f = Fixture::new(3, 3);
    f.write("nolp.jsonl", &candidates(3, 3, false, true));
    f.write("noemb.jsonl", &candidates(3, 3, true, false));
    f.write("nocol.jsonl", &candidates(3, 3, true, true).replace("\"response\"", "\"text\""));
    for (name, yaml, expected) in bad_configs() {
        f.write("p.yaml", &yaml);
        for cmd in ["validate", "run"] {
            let o = f.run(&[cmd, "p.yaml"]);
            let t = text(&o);
            assert_eq!(o.status.code(), Some(78), "{name} ({cmd}): {t}");
            for e in &expected {
                assert!(t.contains(e), "{name} ({cmd}): expected {e:?} in:\n{t}");
            }
            assert!(!f.path().join("out").exists(), "{name}: {cmd} wrote output");
        }
    }
}

#[test]
fn validate_reports_every_problem_at_once() {
    let f = Fixture::new(3, 3);
    let yaml = pipeline("c.jsonl", "out", 4, "[0.1, -1.0]")
        .replace("proxy: proxy", "proxy: nope")
        .replace("rejected: worst", "rejected: best\n  colour: red")
        .replace("seed: 3", "seed: x");
    f.write("p.yaml", &yaml);
    let o = f.run(&["validate", "p.yaml"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(78), "{t}");
    for e in ["seed:", "select.proxy:", "select.betas[1]:", "pair.rejected:", "pair.colour:", "5 problems found"] {
        assert!(t.contains(e), "expected {e:?} in:\n{t}");
    }
    // Each with a line and column.
    assert!(
        t.lines()
            .filter(|l| l.starts_with("error: p.yaml:"))
            .all(|l| l.split(':').nth(2).is_some_and(|n| n.parse::<u32>().is_ok())),
        "{t}"
    );

    f.write("ok.yaml", &pipeline("c.jsonl", "out", 4, BETAS));
    let o = f.run(&["validate", "ok.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!f.path().join("out").exists(), "validate wrote output");
}

#[test]
fn a_gold_reward_that_is_the_proxy_fails_validation() {
    let f = Fixture::new(3, 3);
    f.write("p.yaml", &pipeline("c.jsonl", "out", 4, BETAS).replace("gold: [gold]", "gold: [gold, proxy]"));
    let o = f.run(&["validate", "p.yaml"]);
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(text(&o).contains("select.gold[1]: `proxy` is the proxy"), "{}", text(&o));
}

#[test]
fn bad_rows_name_file_and_line_and_write_nothing() {
    let f = Fixture::new(3, 3);
    let good = candidates(3, 3, true, true);
    let lines: Vec<&str> = good.lines().collect();
    let cases = [
        (
            "reward",
            lines[4].replace(r#""reward_proxy": "#, r#""reward_proxy": "high", "x": "#),
            "bad.jsonl:5: `reward_proxy` is null or not a number",
        ),
        (
            "duplicate",
            lines[4].replace(r#""sample_idx": 1"#, r#""sample_idx": 0"#),
            "bad.jsonl:5: duplicate sample_idx 0 for prompt_id \"p00001\": also at",
        ),
        (
            "prompt",
            lines[4].replace("Question number 1?", "Another question?"),
            "bad.jsonl:5: prompt differs from the one at",
        ),
        (
            "embedding",
            lines[4].replace(r#""embedding": ["#, r#""embedding": [1.0, "#),
            "bad.jsonl:5: embedding has 9 values, earlier rows have 8",
        ),
        ("json", "{not json".to_owned(), "bad.jsonl:5: invalid JSON"),
    ];
    for (name, bad_line, expected) in cases {
        let mut rows = lines.clone();
        rows[4] = &bad_line;
        f.write("bad.jsonl", &(rows.join("\n") + "\n"));
        f.write("p.yaml", &pipeline("bad.jsonl", "out", 2, BETAS));
        let o = f.run(&["run", "p.yaml"]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(65), "{name}: {t}");
        assert!(t.contains(expected), "{name}: expected {expected:?} in:\n{t}");
        assert!(!f.path().join("out").exists(), "{name}: a run with bad data wrote output");
    }
}

#[test]
fn sigkill_mid_run_then_resume_gives_identical_pairs() {
    let f = Fixture::new(1500, 6);
    f.write("a.yaml", &pipeline("c.jsonl", "killed", 5, BETAS));
    f.write("b.yaml", &pipeline("c.jsonl", "clean", 5, BETAS));
    assert!(f.run(&["run", "b.yaml"]).status.success());

    // Kill once selection is under way: some shards written, most not.
    run_and_kill_when(&f, "a.yaml", "killed/selections/shard-00010.parquet");
    let killed = f.path().join("killed");
    assert!(!killed.join("selections/shard-00299.parquet").exists(), "the run was not interrupted");
    assert!(!killed.join("pairs/bon").exists());

    let o = f.run(&["run", "a.yaml"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    // Stages stream: the import ran ahead of selection, which ran ahead of pairing.
    assert!(t.contains("import: ") && t.contains("of 300 shards already done, skipped"), "{t}");
    assert!(t.contains("selections: ") && t.contains("pairs: "), "{t}");
    assert_same_exports(&killed, &f.path().join("clean"));
    // No temporary files survive the resume.
    for stage in ["prompts", "samples", "scores", "selections", "pairs"] {
        for e in fs::read_dir(killed.join(stage)).unwrap().flatten() {
            assert!(!e.file_name().to_string_lossy().contains(".tmp-"), "{}", e.path().display());
        }
    }
}

fn selections(run: &Path) -> Vec<(String, String, f64, Option<u32>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while run.join(format!("selections/shard-{i:05}.parquet")).exists() {
        let b = read(&run.join(format!("selections/shard-{i:05}.parquet")));
        let ids = b.column_by_name("prompt_id").unwrap().as_string::<i32>();
        let m = b.column_by_name("method").unwrap().as_string::<i32>();
        let beta = b.column_by_name("beta").unwrap().as_primitive::<arrow_array::types::Float64Type>();
        let idx = b.column_by_name("index").unwrap().as_primitive::<arrow_array::types::UInt32Type>();
        for r in 0..b.num_rows() {
            out.push((
                ids.value(r).to_owned(),
                m.value(r).to_owned(),
                beta.value(r),
                idx.is_valid(r).then(|| idx.value(r)),
            ));
        }
        i += 1;
    }
    out
}

/// Rewards standardised over the prompt's samples with the population std.
fn zscores(v: &[f64]) -> Vec<f64> {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    v.iter().map(|x| if sd > 0.0 { (x - mean) / sd } else { 0.0 }).collect()
}

#[test]
fn ensemble_bon_unc_srbon_and_bonbon_vbon_exports() {
    let f = Fixture::new(20, 6);
    let yaml = |seed: u64, out: &str| {
        format!(
            "name: v\noutput: {out}\nseed: {seed}\ninput:\n  candidates: c.jsonl\n  shard_size: 6\n\
             select:\n  proxy: [proxy, alt]\n  gold: [gold]\n  methods: [bon, bon_unc, srbon_kl]\n  betas: [0.5, 2.0]\n  lambdas: [0.5, 1.0]\n\
             pair:\n  sft: true\n  vbon: true\n"
        )
    };
    f.write("v.yaml", &yaml(1, "v"));
    let o = f.run(&["run", "v.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    let run = f.path().join("v");
    let got = selections(&run);

    // Independent computation from the candidates file.
    let mut prompts: Vec<(String, Vec<serde_json::Value>)> = Vec::new();
    for line in fs::read_to_string(f.path().join("c.jsonl")).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let id = v["prompt_id"].as_str().unwrap().to_owned();
        match prompts.last_mut() {
            Some((p, rows)) if *p == id => rows.push(v),
            _ => prompts.push((id, vec![v])),
        }
    }
    let mut checked = 0;
    let mut not_argmax = 0;
    for (id, rows) in &prompts {
        let col = |k: &str| rows.iter().map(|r| r[k].as_f64().unwrap()).collect::<Vec<_>>();
        let (za, zb) = (zscores(&col("reward_proxy")), zscores(&col("reward_alt")));
        let mean: Vec<f64> = za.iter().zip(&zb).map(|(a, b)| (a + b) / 2.0).collect();
        let sd: Vec<f64> = za.iter().zip(&zb).map(|(a, b)| ((a - b) / 2.0).abs()).collect();
        let argmax = |v: &[f64]| (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best }) as u32;
        let find = |m: &str, b: f64| got.iter().find(|r| &r.0 == id && r.1 == m && r.2 == b).unwrap().3;
        assert_eq!(find("bon", 0.0), Some(argmax(&mean)), "bon {id}");
        for lambda in [0.5, 1.0] {
            let obj: Vec<f64> = mean.iter().zip(&sd).map(|(m, s)| m - lambda * s).collect();
            assert_eq!(find("bon_unc", lambda), Some(argmax(&obj)), "bon_unc λ={lambda} {id}");
            checked += 1;
        }
        let lp = col("logprob");
        for beta in [0.5, 2.0] {
            let logits: Vec<f64> = lp.iter().zip(&mean).map(|(l, r)| l + beta * r).collect();
            not_argmax += usize::from(find("srbon_kl", beta) != Some(argmax(&logits)));
        }
    }
    assert_eq!(checked, 40);
    assert!(not_argmax > 0, "srbon_kl always took the argmax: it is not sampling");

    // srbon_kl: the same seed gives the same picks after --force; another seed other picks.
    let srbon = |rows: &[(String, String, f64, Option<u32>)]| -> Vec<_> {
        rows.iter().filter(|r| r.1 == "srbon_kl").cloned().collect()
    };
    let o = f.run(&["run", "v.yaml", "--force"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(srbon(&got), srbon(&selections(&run)));
    f.write("w.yaml", &yaml(2, "w"));
    assert!(f.run(&["run", "w.yaml"]).status.success());
    let other = selections(&f.path().join("w"));
    assert_ne!(srbon(&got), srbon(&other));
    // Deterministic rules do not depend on the seed.
    let det = |rows: &[(String, String, f64, Option<u32>)]| -> Vec<_> {
        rows.iter().filter(|r| r.1 != "srbon_kl").cloned().collect()
    };
    assert_eq!(det(&got), det(&other));

    // BoNBoN SFT half and vBoN weights, with their documented columns.
    let sft = read(&run.join("pairs/bon_unc/beta=1/sft/train-00000-of-00001.parquet"));
    let names = |b: &RecordBatch| b.schema().fields().iter().map(|f| f.name().clone()).collect::<Vec<_>>();
    assert_eq!(names(&sft), ["prompt_id", "method", "beta", "prompt", "completion", "sample_idx"]);
    assert_eq!(sft.num_rows(), 20);
    assert!(run.join("pairs/bon_unc/beta=1/sft/README.md").is_file());
    let vbon = read(&run.join("vbon/train-00000-of-00001.parquet"));
    assert_eq!(
        names(&vbon),
        ["prompt_id", "sample_idx", "prompt", "completion", "logprob", "reward", "reward_cdf", "log_weight"]
    );
    assert_eq!(vbon.num_rows(), 120);
    let cdf = vbon.column_by_name("reward_cdf").unwrap().as_primitive::<arrow_array::types::Float64Type>();
    let lw = vbon.column_by_name("log_weight").unwrap().as_primitive::<arrow_array::types::Float64Type>();
    for r in 0..vbon.num_rows() {
        assert!((lw.value(r) - (6f64.ln() + 5.0 * cdf.value(r).ln())).abs() < 1e-12);
    }
    assert!(text(&o).contains("vBoN weights: 1 files"), "{}", text(&o));
}

fn sample_pipeline(output: &str, shard_size: usize) -> String {
    let model = repo().join("data/models/tiny-qwen2");
    let prompts = repo().join("data/prompts/demo.jsonl");
    format!(
        "name: s\noutput: {output}\nseed: 5\ninput:\n  path: {}\n  prompt_column: instruction\n  id_column: id\n  limit: 6\n  shard_size: {shard_size}\n\
         policy:\n  model: {}\nsample:\n  n: 4\n  max_new_tokens: 12\n  top_k: 40\n",
        prompts.display(),
        model.display()
    )
}

#[test]
fn sampling_pipeline_runs_resumes_and_does_not_depend_on_shard_size() {
    let f = Fixture::new(1, 1);
    f.write("a.yaml", &sample_pipeline("a", 2));
    f.write("b.yaml", &sample_pipeline("b", 6));
    let o = f.run(&["run", "a.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("stopped after sampling"), "{}", text(&o));
    let o = f.run(&["run", "a.yaml"]);
    assert!(text(&o).contains("samples: all 3 shards already done, skipped"), "{}", text(&o));
    assert!(f.run(&["run", "b.yaml"]).status.success());
    let (a, b) = (samples_rows(&f.path().join("a")), samples_rows(&f.path().join("b")));
    assert_eq!(a.len(), 24);
    assert_eq!(
        a.iter().map(|r| (&r.0, r.1, &r.2, &r.3)).collect::<Vec<_>>(),
        b.iter().map(|r| (&r.0, r.1, &r.2, &r.3)).collect::<Vec<_>>()
    );
    assert!(a.iter().all(|r| r.4 < 0.0 && !r.2.is_empty() && r.2.len() <= 12));
    // tiny-qwen2 ends on <|im_end|> (id 4): "stop" rows end with it, "length" rows hit the limit.
    for r in &a {
        match r.3.as_str() {
            "stop" => assert_eq!(r.2.last(), Some(&4), "{r:?}"),
            // At the limit, less trailing tokens that held only part of a character.
            "length" => assert!((9..=12).contains(&r.2.len()), "{r:?}"),
            other => panic!("finish_reason {other}"),
        }
    }
    // Changing the sampling redoes the samples, not the prompts.
    f.write("a.yaml", &sample_pipeline("a", 2).replace("top_k: 40", "top_k: 5"));
    let o = f.run(&["run", "a.yaml"]);
    let t = text(&o);
    assert!(t.contains("prompts: all 3 shards already done") && t.contains("samples: earlier output discarded"), "{t}");
}

#[test]
fn sampling_config_errors() {
    let f = Fixture::new(1, 1);
    let good = sample_pipeline("out", 2);
    let cases = [
        (good.replace("policy:\n  model:", "policy:\n  modle:"), "policy.modle: unknown field `modle`"),
        (good.replace("tiny-qwen2", "tiny-nope"), "policy.model: model `"),
        (good.replace("top_k: 40", "top_p: 1.5"), "sample.top_p: 1.5 is not allowed: must be in (0, 1]"),
        (good.replace("n: 4", "n: 0"), "sample.n: 0 is not allowed"),
        (good.replace("n: 4", "n: 4000000000"), "sample.n: 4000000000 is not allowed: at most 65536"),
        (
            good.replace("policy:\n", "policy:\n  chat_template: missing.jinja\n"),
            "policy.chat_template: no such file: missing.jinja",
        ),
        (
            good.replace("policy:\n  model:", "policy:\n  dtype: f64\n  model:"),
            "policy.dtype: unknown variant `f64`, expected one of `f32`, `bf16`, `f16`",
        ),
        (good.replace("sample:\n  n: 4\n  max_new_tokens: 12\n  top_k: 40\n", ""), "missing `sample`"),
        (
            format!("{good}select:\n  proxy: rm\n"),
            "select: selecting sampled responses needs reward scores: add a `score` section",
        ),
    ];
    for (yaml, expected) in cases {
        f.write("p.yaml", &yaml);
        let o = f.run(&["validate", "p.yaml"]);
        assert_eq!(o.status.code(), Some(78), "{expected}: {}", text(&o));
        assert!(text(&o).contains(expected), "expected {expected:?} in:\n{}", text(&o));
    }
}

/// The whole pipeline (sample, score, select, pair) on the tiny models.
fn full_pipeline(out: &str, shard: usize) -> String {
    let models = repo().join("data/models");
    sample_pipeline(out, shard)
        + &format!(
            "score:\n  rewards:\n    - {{ name: proxy, model: {} }}\n    - {{ name: gold, model: {} }}\n  embedding: {{ model: {} }}\n\
             select:\n  proxy: proxy\n  gold: [gold]\n  betas: [0.01, 1.0]\n",
            models.join("tiny-rm-llama").display(),
            models.join("tiny-deberta-rm").display(),
            models.join("tiny-minilm").display()
        )
}

#[test]
fn full_pipeline_pairs_do_not_depend_on_shard_size() {
    let f = Fixture::new(1, 1);
    let full = full_pipeline;
    f.write("a.yaml", &full("a", 1));
    f.write("b.yaml", &full("b", 4));
    for y in ["a.yaml", "b.yaml"] {
        let o = f.run(&["run", y]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let (a, b) = (export_files(&f.path().join("a")), export_files(&f.path().join("b")));
    assert_eq!(a.len(), b.len());
    let mut rows = 0;
    for ((pa, _), (pb, _)) in a.iter().zip(&b) {
        assert_eq!(pa, pb);
        if pa.extension().is_some_and(|e| e == "parquet") {
            let (ra, rb) = (read(&f.path().join("a").join(pa)), read(&f.path().join("b").join(pa)));
            assert_eq!(ra, rb, "{}", pa.display());
            rows += ra.num_rows();
        }
    }
    assert!(rows > 0);
}

#[test]
fn candidates_get_exactly_what_they_lack() {
    let f = Fixture::new(1, 1);
    let models = repo().join("data/models");
    // Only a proxy reward: log-probs, the gold reward and embeddings come from the config.
    let mut lines = String::new();
    for p in 0..4 {
        for k in 0..3 {
            writeln!(
                lines,
                r#"{{"prompt_id": "p{p}", "prompt": "Question {p}?", "sample_idx": {k}, "response": "Answer number {k} to {p}.", "reward_proxy": {}, "num_tokens": {}}}"#,
                (p * 3 + k) as f64 * 0.5 - 2.0,
                5 + k
            )
            .unwrap();
        }
    }
    f.write("bare.jsonl", &lines);
    let yaml = format!(
        "output: out\ninput:\n  candidates: bare.jsonl\npolicy:\n  model: {}\nscore:\n  rewards:\n    - {{ name: gold, model: {} }}\n  embedding: {{ model: {} }}\n\
         select:\n  proxy: proxy\n  gold: [gold]\n  betas: [0.1]\n",
        models.join("tiny-qwen2").display(),
        models.join("tiny-rm-llama").display(),
        models.join("tiny-minilm").display()
    );
    f.write("p.yaml", &yaml);
    let o = f.run(&["run", "p.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    let scores = read(&f.path().join("out/scores/shard-00000.parquet"));
    let names: Vec<String> = scores.schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(names, ["prompt_id", "sample_idx", "reward_proxy", "reward_gold", "embedding"]);
    let gold = scores.column_by_name("reward_gold").unwrap().as_primitive::<arrow_array::types::Float64Type>();
    assert!(gold.values().windows(2).any(|w| w[0] != w[1]), "gold rewards are all equal");
    let samples = read(&f.path().join("out/samples/shard-00000.parquet"));
    let lp = samples.column_by_name("logprob").unwrap().as_primitive::<arrow_array::types::Float64Type>();
    assert_eq!(lp.null_count(), 0);
    assert!(lp.values().iter().all(|&x| x < 0.0));
    // Teacher forcing under the policy's template, the response closed as ChatML closes a turn
    // (<|im_end|>, which is also tiny-qwen2's first EOS id).
    let policy = load_policy("tiny-qwen2");
    let prompt = policy.prompt_ids(&[rbon_core::Message::user("Question 0?")]).unwrap();
    let mut ids = policy.tokenizer().encode_text("Answer number 0 to 0.").unwrap();
    ids.push(policy.tokenizer().eos_ids()[0]);
    let want: f64 = policy.score(&prompt, &ids).unwrap().iter().sum();
    assert!((lp.value(0) - want).abs() < 1e-9, "{} vs {want}", lp.value(0));
    // The file's own token counts are kept.
    let nt = samples.column_by_name("num_tokens").unwrap().as_primitive::<arrow_array::types::UInt32Type>();
    assert_eq!(&nt.values()[..3], &[5, 6, 7]);
    assert!(f.path().join("out/pairs/rbon_wd/beta=0.1/train-00000-of-00001.parquet").is_file());

    // Asking to compute what the file already has is an error.
    let dup = yaml.replace("name: gold", "name: proxy").replace("gold: [gold]", "gold: []");
    f.write("q.yaml", &dup);
    let o = f.run(&["validate", "q.yaml"]);
    assert_eq!(o.status.code(), Some(78));
    assert!(
        text(&o).contains("score.rewards[0].name: the candidates file bare.jsonl already has `reward_proxy`"),
        "{}",
        text(&o)
    );
}

#[test]
fn ctrl_c_finishes_shards_in_flight_and_says_how_to_resume() {
    let f = Fixture::new(1500, 6);
    f.write("b.yaml", &pipeline("c.jsonl", "clean", 5, BETAS));
    assert!(f.run(&["run", "b.yaml"]).status.success());
    // Ctrl-C, and SIGTERM and SIGHUP as Slurm and Kubernetes stop jobs: the same.
    for signal in ["INT", "TERM", "HUP"] {
        let out = format!("stopped-{signal}");
        f.write("a.yaml", &pipeline("c.jsonl", &out, 5, BETAS));
        let mut child = f.spawn(&["run", "a.yaml"]);
        wait_for(&f.path().join(format!("{out}/selections/shard-00010.parquet")), &mut child);
        let kill = Command::new("kill").args([format!("-{signal}"), child.id().to_string()]).status().unwrap();
        assert!(kill.success());
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(130), "{signal}: {err}");
        assert!(err.contains("interrupted: ") && err.contains("shards went through every stage"), "{signal}: {err}");
        assert!(err.contains("resume with: rbon run a.yaml"), "{signal}: {err}");
        let stopped = f.path().join(&out);
        assert!(!stopped.join("selections/shard-00299.parquet").exists(), "{signal}: the run was not interrupted");
        for e in fs::read_dir(stopped.join("selections")).unwrap().flatten() {
            assert!(!e.file_name().to_string_lossy().contains(".tmp-"), "{}", e.path().display());
        }
        let o = f.run(&["run", "a.yaml"]);
        assert!(o.status.success(), "{signal}: {}", text(&o));
        assert_same_exports(&stopped, &f.path().join("clean"));
    }
}

#[test]
fn a_bad_command_line_is_a_usage_error() {
    let f = Fixture::new(1, 1);
    f.write("p.yaml", &pipeline("c.jsonl", "out", 2, BETAS));
    for args in [&["run", "p.yaml", "--rank", "abc"][..], &["run", "p.yaml", "--colour"], &["frobnicate"]] {
        let o = f.run(args);
        assert_eq!(o.status.code(), Some(78), "{args:?}: {}", text(&o));
        assert!(text(&o).contains("error:"), "{args:?}: {}", text(&o));
    }
    assert_eq!(f.run(&["--help"]).status.code(), Some(0));
    assert!(!f.path().join("out").exists());
}

#[test]
fn two_ranks_then_finalize_equal_one_rank_and_status_shows_each_rank() {
    let f = Fixture::new(1, 1);
    f.write("one.yaml", &full_pipeline("one", 1));
    f.write("two.yaml", &full_pipeline("two", 1));
    // Two workers on the same device: the same shards, whatever the worker count.
    f.write("workers.yaml", &format!("{}runtime:\n  devices: [cpu, cpu]\n", full_pipeline("workers", 1)));
    for y in ["one.yaml", "workers.yaml"] {
        let o = f.run(&["run", y]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let o = f.run(&["status", "one"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("6 shards, 1 rank") && t.contains("pairs") && t.contains("6/6 100%"), "{t}");
    assert!(t.contains("exports: written"), "{t}");

    // --force cannot be given to one rank of several.
    let o = f.run(&["run", "two.yaml", "--force", "--rank", "0", "--world-size", "2"]);
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(!f.path().join("two").exists());

    // Rank 0 from the command line, then finalize too early.
    let o = f.run(&["run", "two.yaml", "--rank", "0", "--world-size", "2"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("rank 0 of 2: 3 of 6 shards") && t.contains("rbon finalize two"), "{t}");
    assert!(!f.path().join("two/pairs/bon").exists(), "a rank of several wrote exports");
    let o = f.run(&["finalize", "two"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("rank 1 of 2 has not run here yet"), "{}", text(&o));
    // A report of half the run says it is half.
    let o = f.run(&["report", "two"]);
    let t = text(&o);
    assert!(t.contains("warning: the report covers 3 of 6 selection shards: rank 1 not finished"), "{t}");
    let o = f.run(&["status", "two"]);
    let t = text(&o);
    assert!(t.contains("rank 0") && t.contains("rank 1") && t.contains("not started: rank 1"), "{t}");
    assert!(t.contains("3/6  50%") && t.contains("3/3") && t.contains("0/3"), "{t}");

    // Rank 1 as a Slurm array task, on a machine that mounts the run directory elsewhere.
    std::os::unix::fs::symlink(f.path().join("two"), f.path().join("mounted")).unwrap();
    f.write("two-mounted.yaml", &full_pipeline("mounted", 1));
    let o = Command::new(env!("CARGO_BIN_EXE_rbon"))
        .args(["run", "two-mounted.yaml"])
        .current_dir(f.path())
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("SLURM_ARRAY_TASK_COUNT", "2")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("rank 1 of 2: 3 of 6 shards"), "{}", text(&o));
    let o = f.run(&["status", "two"]);
    assert!(text(&o).contains("every shard is done: run `rbon finalize two`"), "{}", text(&o));
    let o = f.run(&["finalize", "two"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("exports written"), "{}", text(&o));
    assert!(text(&f.run(&["status", "two"])).contains("exports: written"));
    assert_same_exports(&f.path().join("one"), &f.path().join("two"));
    assert_same_exports(&f.path().join("one"), &f.path().join("workers"));
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(f.path().join("two/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["stages"]["samples"]["counters"]["samples"], 24);
    assert_eq!(manifest["stages"]["pairs"]["done"], 6);
}

#[test]
fn two_rank_processes_at_once_equal_one_rank() {
    let f = Fixture::new(1, 1);
    f.write("one.yaml", &full_pipeline("one", 2));
    f.write("two.yaml", &full_pipeline("two", 2));
    assert!(f.run(&["run", "one.yaml"]).status.success());
    let spawn = |rank: &str| {
        Command::new(env!("CARGO_BIN_EXE_rbon"))
            .args(["run", "two.yaml", "--world-size", "2"])
            .current_dir(f.path())
            .env("JOB_COMPLETION_INDEX", rank)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("0"), spawn("1"));
    for c in [a, b] {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
    }
    let o = f.run(&["finalize", "two"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_same_exports(&f.path().join("one"), &f.path().join("two"));
}

#[test]
fn sigkill_mid_sampling_then_resume_gives_identical_pairs() {
    let f = Fixture::new(1, 1);
    // Every demo prompt, one per shard, with enough tokens that sampling takes a while.
    let slow = |out: &str| {
        full_pipeline(out, 1)
            .replace("limit: 6", "limit: 24")
            .replace("n: 4", "n: 8")
            .replace("max_new_tokens: 12", "max_new_tokens: 40")
    };
    f.write("a.yaml", &slow("killed"));
    f.write("b.yaml", &slow("clean"));
    assert!(f.run(&["run", "b.yaml"]).status.success());
    run_and_kill_when(&f, "a.yaml", "killed/samples/shard-00002.parquet");
    let killed = f.path().join("killed");
    assert!(!killed.join("samples/shard-00023.parquet").exists(), "the run was not interrupted");
    let o = f.run(&["run", "a.yaml"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("of 24 shards already done, skipped"), "{t}");
    assert_same_exports(&killed, &f.path().join("clean"));
}

#[test]
fn a_failing_stage_stops_the_pipeline_without_hanging() {
    let f = Fixture::new(40, 4);
    f.write("a.yaml", &pipeline("c.jsonl", "out", 1, BETAS));
    assert!(f.run(&["run", "a.yaml"]).status.success());
    // Selection cannot write: the upstream stages must stop too, and the process must end.
    let sel = f.path().join("out/selections");
    fs::remove_dir_all(&sel).unwrap();
    fs::write(&sel, "in the way").unwrap();
    fs::remove_dir_all(f.path().join("out/samples")).unwrap();
    let mut child = f.spawn(&["run", "a.yaml"]);
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("the run hung after a stage failed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("selections"), "{err}");
    // The import did not run ahead through all 40 shards after the failure.
    let imported = fs::read_dir(f.path().join("out/samples")).unwrap().count();
    assert!(imported < 40, "{imported} samples shards written after the failure");
}

#[test]
fn gguf_policies_run_end_to_end() {
    let f = Fixture::new(1, 1);
    f.write("st.yaml", &sample_pipeline("st", 2));
    let gguf =
        |out: &str, file: &str| sample_pipeline(out, 2).replace("tiny-qwen2", &format!("tiny-qwen2-gguf/{file}"));
    f.write("f32.yaml", &gguf("f32", "tiny-qwen2-f32.gguf"));
    f.write("q8.yaml", &gguf("q8", "tiny-qwen2-q8_0.gguf"));
    for y in ["st.yaml", "f32.yaml", "q8.yaml"] {
        let o = f.run(&["run", y]);
        assert!(o.status.success(), "{y}: {}", text(&o));
    }
    // The F32 GGUF is the same model as the safetensors folder: the same samples.
    let (st, f32) = (samples_rows(&f.path().join("st")), samples_rows(&f.path().join("f32")));
    assert_eq!(st.len(), 24);
    for (a, b) in st.iter().zip(&f32) {
        assert_eq!((&a.0, a.1, &a.2), (&b.0, b.1, &b.2));
        assert!((a.4 - b.4).abs() < 1e-3, "{a:?} {b:?}");
    }
    let q8 = samples_rows(&f.path().join("q8"));
    assert_eq!(q8.len(), 24);
    assert!(q8.iter().all(|r| r.4 < 0.0 && !r.2.is_empty()));
    let o = f.run(&["run", "q8.yaml"]);
    assert!(text(&o).contains("samples: all 3 shards already done, skipped"), "{}", text(&o));
}

#[test]
fn tuned_beta_standard_jsonl_exports_and_report_across_ranks() {
    let f = Fixture::new(1, 1);
    let yaml = |out: &str| {
        full_pipeline(out, 2)
            + "  tune: { gold: gold, fraction: 0.5, seed: 1 }\n\
               pair:\n  betas: [best]\n  format: standard\n  file_format: jsonl\n"
    };
    f.write("one.yaml", &yaml("one"));
    f.write("two.yaml", &yaml("two"));
    let o = f.run(&["run", "one.yaml"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("tuned β: ") && t.contains("report: "), "{t}");
    let one = f.path().join("one");
    // One export per β-free method, and per tuned method only its tuned β.
    for m in ["rbon_kl", "rbon_wd", "rbon_len"] {
        let betas: Vec<_> = fs::read_dir(one.join("pairs").join(m)).unwrap().flatten().collect();
        assert_eq!(betas.len(), 1, "{m}: {betas:?}");
    }
    let rows = fs::read_to_string(one.join("pairs/bon/beta=0/train-00000-of-00001.jsonl")).unwrap();
    let mut n = 0;
    for line in rows.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let (p, c, r) = (v["prompt"].as_str().unwrap(), v["chosen"].as_str().unwrap(), v["rejected"].as_str().unwrap());
        // tiny-qwen2's ChatML template: the prompt ends by opening the assistant turn, and the
        // responses carry no EOS (trainers append it).
        assert!(p.starts_with("<|im_start|>") && p.ends_with("<|im_start|>assistant\n"), "{p:?}");
        assert!(!c.trim_end().ends_with("<|im_end|>") && !r.trim_end().ends_with("<|im_end|>"), "{c:?} {r:?}");
        n += 1;
    }
    assert!(n > 0);
    assert!(one.join("report/tuning.parquet").is_file() && one.join("report/summary.parquet").is_file());
    let o = f.run(&["report", "one", "--no-plots"]);
    assert!(o.status.success() && text(&o).contains("rbon_kl") && text(&o).contains("oracle"), "{}", text(&o));

    // The same through two ranks and finalize: the tuning reads every rank's selections.
    for r in ["0", "1"] {
        let o = f.run(&["run", "two.yaml", "--rank", r, "--world-size", "2"]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let o = f.run(&["finalize", "two"]);
    assert!(o.status.success() && text(&o).contains("tuned β: "), "{}", text(&o));
    let files = |run: &Path| {
        let mut v = Vec::new();
        for m in fs::read_dir(run.join("pairs")).unwrap().flatten().filter(|e| e.path().is_dir()) {
            for b in fs::read_dir(m.path()).unwrap().flatten() {
                for f in fs::read_dir(b.path()).unwrap().flatten() {
                    if f.path().extension().is_some_and(|e| e == "jsonl") {
                        v.push((f.path().strip_prefix(run).unwrap().to_owned(), fs::read(f.path()).unwrap()));
                    }
                }
            }
        }
        v.sort();
        v
    };
    let (a, b) = (files(&one), files(&f.path().join("two")));
    assert!(!a.is_empty());
    assert!(a == b, "the two-rank exports differ from the single-rank ones");
}

fn f64s(b: &RecordBatch, col: &str) -> Vec<f64> {
    b.column_by_name(col).unwrap().as_primitive::<arrow_array::types::Float64Type>().values().to_vec()
}

fn embeddings(b: &RecordBatch) -> Vec<Vec<f32>> {
    let a = b.column_by_name("embedding").unwrap().as_fixed_size_list();
    (0..a.len()).map(|r| a.value(r).as_primitive::<arrow_array::types::Float32Type>().values().to_vec()).collect()
}

fn load_reward_model(name: &str) -> rbon_score::RewardModel {
    let spec = repo().join("data/models").join(name).display().to_string();
    let auto = rbon_models::chat::TemplateChoice::Auto;
    rbon_score::RewardModel::load(&spec, &auto, rbon_models::DType::F32, &rbon_models::Device::Cpu).unwrap()
}

/// A sampled pipeline on tiny-llama whose proxy reward model renders its own default system
/// turn when a conversation has none (so a lost system prompt changes its scores).
fn llama_pipeline(out: &str, extra_policy: &str, pair: &str) -> String {
    let models = repo().join("data/models");
    format!(
        "name: l\noutput: {out}\nseed: 11\ninput:\n  path: {}\n  prompt_column: instruction\n  id_column: id\n  limit: 4\n  shard_size: 2\n\
         policy:\n  model: {}\n{extra_policy}sample:\n  n: 6\n  max_new_tokens: 16\n\
         score:\n  rewards:\n    - {{ name: proxy, model: {} }}\n    - {{ name: gold, model: {} }}\n  embedding: {{ model: {} }}\n\
         select:\n  proxy: proxy\n  gold: [gold]\n  methods: [bon, rbon_kl, rbon_wd, mbr]\n  betas: [0.1]\n{pair}",
        repo().join("data/prompts/demo.jsonl").display(),
        models.join("tiny-llama").display(),
        models.join("tiny-rm-qwen2").display(),
        models.join("tiny-deberta-rm").display(),
        models.join("tiny-minilm").display()
    )
}

#[test]
fn the_system_prompt_is_the_context_of_every_stage_and_export() {
    let f = Fixture::new(1, 1);
    let sys = "You answer in one short sentence.";
    let policy_line = format!("  system_prompt: {sys}\n");
    f.write("p.yaml", &llama_pipeline("out", &policy_line, ""));
    f.write("s.yaml", &llama_pipeline("std", &policy_line, "pair:\n  format: standard\n"));
    for y in ["p.yaml", "s.yaml"] {
        let o = f.run(&["run", y]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let run = f.path().join("out");
    let convs = conversations(&run);
    assert_eq!(convs.len(), 4);
    for c in convs.values() {
        assert_eq!(c[0], rbon_core::Message::new("system", sys), "{c:?}");
        assert_eq!(c[1].role, "user");
    }
    // Sampling, the reward models and the exports all saw that conversation: recomputed here.
    let policy = load_policy("tiny-llama");
    let proxy = load_reward_model("tiny-rm-qwen2");
    let mut checked = 0;
    for i in 0..2 {
        let samples = read(&run.join(format!("samples/shard-{i:05}.parquet")));
        let scores = read(&run.join(format!("scores/shard-{i:05}.parquet")));
        let (ids, responses, lps) =
            (strings(&samples, "prompt_id"), strings(&samples, "response"), f64s(&samples, "logprob"));
        let toks = samples.column_by_name("token_ids").unwrap().as_list::<i32>();
        let rewards = f64s(&scores, "reward_proxy");
        for r in 0..samples.num_rows() {
            let conv = &convs[&ids[r]];
            let t: Vec<u32> = toks.value(r).as_primitive::<arrow_array::types::UInt32Type>().values().to_vec();
            let forced: f64 = policy.score(&policy.prompt_ids(conv).unwrap(), &t).unwrap().iter().sum();
            assert!((forced - lps[r]).abs() < 1e-4, "logprob {} vs forcing with the system turn {forced}", lps[r]);
            let want = proxy.score(&[proxy.encode(conv, &responses[r]).unwrap()], 8192).unwrap()[0];
            assert!((want - rewards[r]).abs() <= 1e-4 * want.abs().max(1.0), "reward {} vs {want}", rewards[r]);
            checked += 1;
        }
    }
    assert_eq!(checked, 24);
    let export = read(&run.join("pairs/bon/beta=0/train-00000-of-00001.parquet"));
    let prompts = export.column_by_name("prompt").unwrap().as_list::<i32>();
    for r in 0..export.num_rows() {
        let turns = prompts.value(r);
        let content = turns.as_struct().column_by_name("content").unwrap().as_string::<i32>().value(0).to_owned();
        assert_eq!(content, sys);
    }
    // Plain-string exports carry the rendered system turn too.
    let std_export = read(&f.path().join("std/pairs/bon/beta=0/train-00000-of-00001.parquet"));
    for p in strings(&std_export, "prompt") {
        assert!(p.contains(&format!("<|start_header_id|>system<|end_header_id|>\n\n{sys}<|eot_id|>")), "{p}");
    }
    // Responses end without the EOS trainers append (the tokenizer's `<|eot_id|>`, which closes
    // Llama 3 turns), so it is not doubled.
    for c in strings(&std_export, "chosen").iter().chain(&strings(&std_export, "rejected")) {
        assert!(!c.ends_with("<|eot_id|>") && !c.ends_with("</s>"), "{c:?}");
    }
}

/// Candidates of a sampled run, as another tool would write them: one JSON line per sample.
fn candidates_of(run: &Path, with: &[&str]) -> String {
    let convs = conversations(run);
    let mut out = String::new();
    let mut i = 0;
    while run.join(format!("samples/shard-{i:05}.parquet")).exists() {
        let samples = read(&run.join(format!("samples/shard-{i:05}.parquet")));
        let scores = read(&run.join(format!("scores/shard-{i:05}.parquet")));
        let k = samples.column_by_name("sample_idx").unwrap().as_primitive::<arrow_array::types::UInt32Type>();
        let (ids, responses) = (strings(&samples, "prompt_id"), strings(&samples, "response"));
        for r in 0..samples.num_rows() {
            let mut row = serde_json::json!({
                "prompt_id": ids[r], "prompt": convs[&ids[r]], "sample_idx": k.value(r), "response": responses[r],
            });
            for col in with {
                let b = if *col == "logprob" { &samples } else { &scores };
                row[*col] = serde_json::json!(f64s(b, col)[r]);
            }
            out.push_str(&row.to_string());
            out.push('\n');
        }
        i += 1;
    }
    out
}

fn candidates_pipeline(out: &str, file: &str, policy: bool, rewards: bool) -> String {
    let models = repo().join("data/models");
    let mut y = format!("name: c\noutput: {out}\nseed: 11\ninput:\n  candidates: {file}\n  shard_size: 2\n");
    if policy {
        writeln!(y, "policy:\n  model: {}", models.join("tiny-llama").display()).unwrap();
    }
    y.push_str("score:\n");
    if rewards {
        write!(
            y,
            "  rewards:\n    - {{ name: proxy, model: {} }}\n    - {{ name: gold, model: {} }}\n",
            models.join("tiny-rm-qwen2").display(),
            models.join("tiny-deberta-rm").display()
        )
        .unwrap();
    }
    writeln!(y, "  embedding: {{ model: {} }}", models.join("tiny-minilm").display()).unwrap();
    y + "select:\n  proxy: proxy\n  gold: [gold]\n  methods: [bon, rbon_kl, rbon_wd, mbr]\n  betas: [0.1]\n"
}

#[test]
fn bare_candidates_are_forced_and_scored_as_the_run_that_sampled_them() {
    let f = Fixture::new(1, 1);
    f.write("s.yaml", &llama_pipeline("sampled", "", ""));
    let o = f.run(&["run", "s.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    let sampled = f.path().join("sampled");
    // Only prompt_id, prompt, sample_idx and response: rbon computes everything else.
    f.write("bare.jsonl", &candidates_of(&sampled, &[]));
    f.write("c.yaml", &candidates_pipeline("c", "bare.jsonl", true, true));
    let o = f.run(&["run", "c.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("time per stage: import (log-probs, rewards, embeddings) "), "{}", text(&o));
    let policy = load_policy("tiny-llama");
    let eot = policy.tokenizer().tokenizer().token_to_id("<|eot_id|>").unwrap();
    let convs = conversations(&sampled);
    for i in 0..2 {
        let shard = format!("shard-{i:05}.parquet");
        let (want_sc, got_sc) =
            (read(&sampled.join("scores").join(&shard)), read(&f.path().join("c/scores").join(&shard)));
        for col in ["reward_proxy", "reward_gold"] {
            for (a, b) in f64s(&want_sc, col).iter().zip(f64s(&got_sc, col)) {
                assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "{col}: sampled run {a}, imported {b}");
            }
        }
        for (a, b) in embeddings(&want_sc).iter().zip(embeddings(&got_sc)) {
            assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-6));
        }
        // Each response is closed as Llama 3's template closes a turn: <|eot_id|>, not the first
        // EOS id of generation_config.json (</s>).
        let got = read(&f.path().join("c/samples").join(&shard));
        let (ids, responses, lps) = (strings(&got, "prompt_id"), strings(&got, "response"), f64s(&got, "logprob"));
        for r in 0..got.num_rows() {
            let mut t = policy.tokenizer().encode_text(&responses[r]).unwrap();
            t.push(eot);
            let want: f64 = policy.score(&policy.prompt_ids(&convs[&ids[r]]).unwrap(), &t).unwrap().iter().sum();
            assert!((want - lps[r]).abs() < 1e-4, "{:?}: {} vs {want}", responses[r], lps[r]);
        }
    }
    // Neither rewards in the file nor reward models to compute them: nothing to select with.
    f.write("n.yaml", &candidates_pipeline("n", "bare.jsonl", true, false));
    let o = f.run(&["validate", "n.yaml"]);
    assert_eq!(o.status.code(), Some(78));
    assert!(
        text(&o).contains("input.candidates: bare.jsonl has no `reward_<name>` column (found ")
            && text(&o).contains("no `score.rewards` computes one"),
        "{}",
        text(&o)
    );
}

#[test]
fn candidates_with_rewards_need_only_an_embedder() {
    let f = Fixture::new(1, 1);
    f.write("s.yaml", &llama_pipeline("sampled", "", ""));
    assert!(f.run(&["run", "s.yaml"]).status.success());
    let sampled = f.path().join("sampled");
    f.write("r.jsonl", &candidates_of(&sampled, &["reward_proxy", "reward_gold", "logprob"]));
    f.write("c.yaml", &candidates_pipeline("c", "r.jsonl", false, false));
    let o = f.run(&["run", "c.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("time per stage: import (embeddings) "), "{}", text(&o));
    // The same rewards, log-probs and embeddings as the sampled run: the same selections.
    assert_eq!(selections(&sampled), selections(&f.path().join("c")));
    assert!(selections(&sampled).iter().any(|s| s.1 == "rbon_wd"));
}

#[test]
fn bench_prints_one_json_line_per_measurement() {
    let f = Fixture::new(1, 1);
    let models = repo().join("data/models");
    let o = f.run(&["bench", "sample", models.join("tiny-qwen2").to_str().unwrap(), "--n", "4", "--new-tokens", "8"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!((v["kind"].as_str(), v["device"].as_str(), v["n"].as_u64()), (Some("sample"), Some("cpu"), Some(4)));
    let tokens = v["items"].as_u64().unwrap();
    assert!((4..=32).contains(&tokens) && v["per_s"].as_f64().unwrap() > 0.0, "{v}");
    f.write("t.txt", "a short text\nanother one, a little longer\n");
    let o =
        f.run(&["bench", "score", "embed", models.join("tiny-minilm").to_str().unwrap(), "t.txt", "--repeats", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!((v["kind"].as_str(), v["items"].as_u64()), (Some("embed"), Some(2)));
    // A device this build does not have is a usage error.
    let o = f.run(&["bench", "sample", models.join("tiny-qwen2").to_str().unwrap(), "--device", "tpu:0"]);
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
}

#[test]
fn an_unknown_kernel_path_is_a_usage_error_before_anything_is_written() {
    let f = Fixture::new(2, 2);
    f.write("p.yaml", &pipeline("c.jsonl", "out", 5, BETAS));
    let o = Command::new(env!("CARGO_BIN_EXE_rbon"))
        .args(["run", "p.yaml"])
        .env("RBON_KERNELS", "fast")
        .current_dir(f.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(text(&o).contains("RBON_KERNELS=\"fast\" is not one of packed, candle"), "{}", text(&o));
    assert!(!f.path().join("out").exists());
}

/// Flips one bit of a weight in a safetensors file in place, keeping its size and modification
/// time: what a careless in-place edit (or a bad copy) leaves behind.
fn flip_weight_bit(file: &Path) {
    let mtime = fs::metadata(file).unwrap().modified().unwrap();
    let mut bytes = fs::read(file).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header + 100] ^= 1;
    fs::write(file, bytes).unwrap();
    fs::File::options().write(true).open(file).unwrap().set_modified(mtime).unwrap();
}

#[test]
fn model_files_edited_in_place_redo_what_read_them() {
    let f = Fixture::new(1, 1);
    let model = f.path().join("policy");
    fs::create_dir(&model).unwrap();
    for e in fs::read_dir(repo().join("data/models/tiny-qwen2")).unwrap().flatten() {
        fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    let template = f.write(
        "chat.jinja",
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n",
    );
    let pipeline = |out: &str| {
        sample_pipeline(out, 2)
            .replace(&repo().join("data/models/tiny-qwen2").display().to_string(), &model.display().to_string())
            .replace("policy:\n", &format!("policy:\n  chat_template: {}\n", template.display()))
    };
    f.write("a.yaml", &pipeline("a"));
    assert!(f.run(&["run", "a.yaml"]).status.success());
    let o = f.run(&["run", "a.yaml"]);
    assert!(text(&o).contains("samples: all 3 shards already done, skipped"), "{}", text(&o));
    type Edit<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let edits: [Edit; 3] = [
        ("weights", Box::new(|| flip_weight_bit(&model.join("model.safetensors")))),
        (
            "generation_config.json",
            Box::new(|| {
                let g = fs::read_to_string(model.join("generation_config.json")).unwrap();
                fs::write(
                    model.join("generation_config.json"),
                    g.replace("\"eos_token_id\": 4", "\"eos_token_id\": [4, 9]"),
                )
                .unwrap();
            }),
        ),
        (
            "chat template",
            Box::new(|| {
                let t = fs::read_to_string(&template).unwrap();
                fs::write(&template, t.replace("{{ m.content }}", "{{ m.content | trim }}")).unwrap();
            }),
        ),
    ];
    for (i, (what, edit)) in edits.iter().enumerate() {
        edit();
        let o = f.run(&["run", "a.yaml"]);
        let t = text(&o);
        assert!(o.status.success(), "{what}: {t}");
        assert!(t.contains("samples: earlier output discarded"), "{what}: {t}");
        assert!(!t.contains("samples: all 3 shards already done"), "{what}: {t}");
        // What the resumed run holds is what a fresh run with the edited files makes.
        let fresh = format!("fresh-{i}");
        f.write("fresh.yaml", &pipeline(&fresh));
        assert!(f.run(&["run", "fresh.yaml"]).status.success());
        assert_eq!(samples_rows(&f.path().join("a")), samples_rows(&f.path().join(&fresh)), "{what}");
    }
    // The digests are cached in the run directory; with nothing changed, everything is skipped.
    let cache = fs::read_to_string(f.path().join("a/digests.json")).unwrap();
    assert!(cache.contains("model.safetensors") && cache.contains("chat.jinja"), "{cache}");
    let o = f.run(&["run", "a.yaml"]);
    assert!(text(&o).contains("samples: all 3 shards already done, skipped"), "{}", text(&o));
}

#[test]
fn a_reward_models_template_file_edited_in_place_redoes_the_scores() {
    let f = Fixture::new(1, 1);
    let template =
        f.write("rm.jinja", "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}");
    let rm = repo().join("data/models/tiny-rm-qwen2");
    let yaml = sample_pipeline("a", 2)
        + &format!(
            "score:\n  rewards:\n    - {{ name: r, model: {}, chat_template: {} }}\n",
            rm.display(),
            template.display()
        );
    f.write("a.yaml", &yaml);
    assert!(f.run(&["run", "a.yaml"]).status.success());
    let o = f.run(&["run", "a.yaml"]);
    assert!(text(&o).contains("scores: all 3 shards already done, skipped"), "{}", text(&o));
    let t = fs::read_to_string(&template).unwrap();
    fs::write(&template, t.replace("{{ m.content }}", "{{ m.content | upper }}")).unwrap();
    let o = f.run(&["run", "a.yaml"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("scores: earlier output discarded") && t.contains("samples: all 3 shards already done"), "{t}");
}

#[test]
fn damaged_or_swapped_shards_are_made_again() {
    let f = Fixture::new(30, 4);
    f.write("a.yaml", &pipeline("c.jsonl", "a", 5, BETAS));
    assert!(f.run(&["run", "a.yaml"]).status.success());
    let run = f.path().join("a");
    // 40 bytes flipped in the middle of a finished scores shard: still a readable Parquet file
    // whose values would be wrong.
    let scores = run.join("scores/shard-00002.parquet");
    let mut bytes = fs::read(&scores).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid - 20..mid + 20] {
        *b ^= 0x55;
    }
    fs::write(&scores, bytes).unwrap();
    // A selections shard copied over another, whole and valid on its own.
    fs::copy(run.join("selections/shard-00000.parquet"), run.join("selections/shard-00004.parquet")).unwrap();
    // Then a β change, so that pairing reads both.
    let betas = "[0.001, 0.01, 0.1, 1.0, 2.0]";
    f.write("a.yaml", &pipeline("c.jsonl", "a", 5, betas));
    let o = f.run(&["run", "a.yaml"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("import: a finished shard is damaged") && t.contains("scores/shard-00002.parquet"), "{t}");
    // The β change redoes selection anyway; a copied shard is named when its stage is kept.
    f.write("fresh.yaml", &pipeline("c.jsonl", "fresh", 5, betas));
    assert!(f.run(&["run", "fresh.yaml"]).status.success());
    assert_same_exports(&run, &f.path().join("fresh"));

    fs::copy(run.join("pairs/shard-00000.parquet"), run.join("pairs/shard-00004.parquet")).unwrap();
    let o = f.run(&["run", "a.yaml"]);
    let t = text(&o);
    assert!(t.contains("pairs: a finished shard is damaged") && t.contains("(copied over this one)"), "{t}");
    assert_same_exports(&run, &f.path().join("fresh"));
    // Rewritten intact: the next rerun trusts every shard again.
    let o = f.run(&["run", "a.yaml"]);
    assert!(!text(&o).contains("damaged"), "{}", text(&o));
}

#[test]
fn a_lost_or_garbled_manifest_is_rebuilt_from_the_shards() {
    let f = Fixture::new(30, 4);
    f.write("a.yaml", &pipeline("c.jsonl", "a", 5, BETAS));
    f.write("fresh.yaml", &pipeline("c.jsonl", "fresh", 5, BETAS));
    assert!(f.run(&["run", "a.yaml"]).status.success());
    assert!(f.run(&["run", "fresh.yaml"]).status.success());
    let manifest = f.path().join("a/manifest.json");
    for (what, damage) in [("missing", None), ("garbled", Some("{\"stages\": [tru"))] {
        match damage {
            None => fs::remove_file(&manifest).unwrap(),
            Some(text) => fs::write(&manifest, text).unwrap(),
        }
        let o = f.run(&["run", "a.yaml"]);
        let t = text(&o);
        assert!(o.status.success(), "{what}: {t}");
        assert!(t.contains("rebuilding it from the shards"), "{what}: {t}");
        for stage in ["import", "selections", "pairs"] {
            assert!(t.contains(&format!("{stage}: all 6 shards already done, skipped")), "{what}: {t}");
        }
        assert_same_exports(&f.path().join("a"), &f.path().join("fresh"));
        let o = f.run(&["status", "a"]);
        assert!(o.status.success() && text(&o).contains("pairs"), "{what}: {}", text(&o));
    }
}

/// Fault injection: a sampling-and-scoring run killed with SIGKILL at 20 random moments, with a
/// random finished shard damaged and manifest.json deleted along the way, ends with the exports
/// of an undisturbed run, byte for byte.
#[test]
fn random_kills_a_damaged_shard_and_a_lost_manifest_change_no_export_byte() {
    let f = Fixture::new(1, 1);
    let yaml = |out: &str| full_pipeline(out, 1).replace("limit: 6", "limit: 10");
    f.write("clean.yaml", &yaml("clean"));
    f.write("hurt.yaml", &yaml("hurt"));
    let start = Instant::now();
    let o = f.run(&["run", "clean.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    let whole = start.elapsed();
    // xorshift: the same kill points on every run of the test.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let run = f.path().join("hurt");
    let mut killed = 0;
    for i in 0..20 {
        let mut child = f.spawn(&["run", "hurt.yaml"]);
        // 5% to 35% of the time a whole run takes: each resumed run gets a little further.
        let wait = whole.mul_f64(0.05 + 0.3 * (rnd() % 1000) as f64 / 1000.0);
        std::thread::sleep(wait);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            killed += 1;
        }
        child.wait().unwrap();
        if i == 7 {
            // Flip bytes in the middle of a random finished shard of any stage.
            let shards: Vec<PathBuf> = ["prompts", "samples", "scores", "selections", "pairs"]
                .iter()
                .flat_map(|s| fs::read_dir(run.join(s)).into_iter().flatten().flatten().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
                .collect();
            if !shards.is_empty() {
                let victim = &shards[(rnd() as usize) % shards.len()];
                let mut bytes = fs::read(victim).unwrap();
                let (mid, len) = (bytes.len() / 2, bytes.len());
                for b in &mut bytes[mid.saturating_sub(8)..(mid + 8).min(len)] {
                    *b ^= 0xA5;
                }
                fs::write(victim, bytes).unwrap();
            }
        }
        if i == 13 {
            let _ = fs::remove_file(run.join("manifest.json"));
        }
    }
    assert!(killed >= 10, "only {killed} of 20 runs were still going when killed");
    let o = f.run(&["run", "hurt.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_same_exports(&run, &f.path().join("clean"));
}
