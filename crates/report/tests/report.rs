//! The report against values computed independently from the run's shards: selections, samples
//! and scores read with arrow, every statistic recomputed with plain loops, never with polars or
//! rbon-report's code.

#![allow(clippy::unwrap_used)]
// `..Default::default()` keeps the tests compiling as RunOptions gains fields.
#![allow(clippy::needless_update)]

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, UInt32Type};
use arrow_array::{Array, RecordBatch};
use rbon_core::shard::read_parquet;
use rbon_regularize::TuneConfig;
use rbon_report::{ReportOptions, build_report, tune};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `pipelines/<name>.yaml` into `out`, with `edit` applied to its text.
fn run_pipeline(name: &str, out: &Path, edit: impl Fn(String) -> String) {
    let text = fs::read_to_string(repo().join("pipelines").join(format!("{name}.yaml"))).unwrap();
    let text = text.replace("data/", &format!("{}/data/", repo().display()));
    let mut lines: Vec<String> = text
        .lines()
        .map(|l| if l.starts_with("output:") { format!("output: {}", out.display()) } else { l.to_owned() })
        .collect();
    lines.push(String::new());
    let text = edit(lines.join("\n"));
    let cfg = out.with_extension("yaml");
    fs::write(&cfg, text).unwrap();
    let p = rbon_runtime::load(&cfg).unwrap_or_else(|d| panic!("{d}"));
    rbon_runtime::run(&p, rbon_runtime::RunOptions { force: true, ..Default::default() }, &rbon_core::NoProgress)
        .unwrap();
}

fn shards(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("shard-"))
        .collect();
    v.sort();
    v
}

fn batches(dir: &Path) -> Vec<RecordBatch> {
    shards(dir).iter().flat_map(|p| read_parquet(p).unwrap()).collect()
}

/// One selections row.
#[derive(Debug, Clone)]
struct Sel {
    prompt: String,
    method: String,
    beta: f64,
    index: Option<u32>,
    rewards: BTreeMap<String, f64>,
}

fn selections(run: &Path) -> Vec<Sel> {
    let mut out = Vec::new();
    for b in batches(&run.join("selections")) {
        let s = |n: &str| b.column_by_name(n).unwrap().clone();
        let (ids, methods, betas, index) = (s("prompt_id"), s("method"), s("beta"), s("index"));
        let reward_cols: Vec<(String, _)> = b
            .schema()
            .fields()
            .iter()
            .filter_map(|f| f.name().strip_prefix("reward_").map(|n| (n.to_owned(), s(f.name()))))
            .collect();
        for r in 0..b.num_rows() {
            out.push(Sel {
                prompt: ids.as_string::<i32>().value(r).to_owned(),
                method: methods.as_string::<i32>().value(r).to_owned(),
                beta: betas.as_primitive::<Float64Type>().value(r),
                index: (!index.is_null(r)).then(|| index.as_primitive::<UInt32Type>().value(r)),
                rewards: reward_cols
                    .iter()
                    .map(|(n, c)| (n.clone(), c.as_primitive::<Float64Type>().value(r)))
                    .collect(),
            });
        }
    }
    out
}

/// Per (prompt, sample): num_tokens, proxy, gold and the embedding.
struct Sample {
    tokens: Option<u32>,
    rewards: BTreeMap<String, f64>,
    embedding: Vec<f32>,
}

fn samples(run: &Path) -> BTreeMap<(String, u32), Sample> {
    let mut out = BTreeMap::new();
    for (sa, sc) in batches(&run.join("samples")).iter().zip(batches(&run.join("scores"))) {
        let ids = sa.column_by_name("prompt_id").unwrap().as_string::<i32>();
        let idx = sa.column_by_name("sample_idx").unwrap().as_primitive::<UInt32Type>();
        let tok = sa.column_by_name("num_tokens").unwrap().as_primitive::<UInt32Type>();
        let emb = sc.column_by_name("embedding").map(|e| e.as_fixed_size_list().clone());
        for r in 0..sa.num_rows() {
            let rewards = sc
                .schema()
                .fields()
                .iter()
                .filter_map(|f| {
                    let n = f.name().strip_prefix("reward_")?;
                    Some((n.to_owned(), sc.column_by_name(f.name())?.as_primitive::<Float64Type>().value(r)))
                })
                .collect();
            let embedding =
                emb.as_ref().map(|e| e.value(r).as_primitive::<Float32Type>().values().to_vec()).unwrap_or_default();
            out.insert(
                (ids.value(r).to_owned(), idx.value(r)),
                Sample { tokens: (!tok.is_null(r)).then(|| tok.value(r)), rewards, embedding },
            );
        }
    }
    out
}

/// WD_i = (1/N) Σ_j (1 − cos(e_i, e_j)), plain loops in f64.
fn wd(prompt: &str, idx: u32, all: &BTreeMap<(String, u32), Sample>) -> f64 {
    let norm = |v: &[f32]| v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
    let e = &all[&(prompt.to_owned(), idx)].embedding;
    let group: Vec<&Sample> = all.iter().filter(|((p, _), _)| p == prompt).map(|(_, s)| s).collect();
    let mut sum = 0.0;
    for o in &group {
        let dot: f64 = e.iter().zip(&o.embedding).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
        sum += 1.0 - dot / (norm(e) * norm(&o.embedding));
    }
    sum / group.len() as f64
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn se(v: &[f64]) -> f64 {
    let m = mean(v);
    (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len() as f64 - 1.0)).sqrt() / (v.len() as f64).sqrt()
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let (mx, my) = (mean(x), mean(y));
    let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = x.iter().map(|a| (a - mx) * (a - mx)).sum();
    let vy: f64 = y.iter().map(|b| (b - my) * (b - my)).sum();
    cov / (vx * vy).sqrt()
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= 1e-9 * (1.0 + b.abs()), "{what}: report {a}, independent {b}");
}

#[test]
fn candidates_run_summary_matches_an_independent_computation() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("byo");
    run_pipeline("byo", &run, |t| {
        t.replace("  gold: [gold]", "  gold: [gold]\n  tune: { gold: gold, fraction: 0.5, seed: 3 }")
    });
    let report = build_report(&run, ReportOptions::default()).unwrap();
    let s = &report.summary;

    let sel = selections(&run);
    let smp = samples(&run);
    let prompts: Vec<String> = {
        let mut p: Vec<String> = sel.iter().map(|r| r.prompt.clone()).collect();
        p.sort();
        p.dedup();
        p
    };
    assert_eq!(s.prompts, prompts.len() as u64);
    assert_eq!(s.samples, smp.len() as u64);
    assert_eq!(s.proxy, ["proxy"]);
    assert_eq!(s.gold, ["gold"]);

    // Every (method, β) of the selections has exactly one row, in config order.
    let mut keys: Vec<(String, u64)> = sel.iter().map(|r| (r.method.clone(), r.beta.to_bits())).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(s.rows.len(), keys.len());
    let order: Vec<&str> = s.rows.iter().map(|r| r.method.as_str()).collect();
    let first = |m: &str| order.iter().position(|x| *x == m).unwrap();
    assert!(first("bon") < first("rbon_kl") && first("rbon_len") < first("oracle:gold"));
    assert!(first("oracle:gold") < first("random"));

    let bon_gold: HashMap<&str, f64> =
        sel.iter().filter(|r| r.method == "bon").map(|r| (r.prompt.as_str(), r.rewards["gold"])).collect();
    let kg = s.reward_index("gold").unwrap();
    let kp = s.reward_index("proxy").unwrap();
    let mut checked_wd = 0;
    let mut paired_checked = 0;
    for row in &s.rows {
        let rows: Vec<&Sel> = sel.iter().filter(|r| r.method == row.method && r.beta == row.beta).collect();
        let what = format!("{} β={}", row.method, row.beta);
        assert_eq!(row.prompts, rows.len() as u64, "{what}");
        let gold: Vec<f64> = rows.iter().map(|r| r.rewards["gold"]).collect();
        let proxy: Vec<f64> = rows.iter().map(|r| r.rewards["proxy"]).collect();
        close(row.rewards[kg].0, mean(&gold), &format!("{what} gold mean"));
        close(row.rewards[kg].1.unwrap(), se(&gold), &format!("{what} gold se"));
        close(row.rewards[kp].0, mean(&proxy), &format!("{what} proxy mean"));
        let wins: Vec<f64> = rows
            .iter()
            .map(|r| {
                let (a, b) = (r.rewards["gold"], bon_gold[r.prompt.as_str()]);
                if a > b {
                    1.0
                } else if a == b {
                    0.5
                } else {
                    0.0
                }
            })
            .collect();
        close(row.win_vs_bon[0].unwrap(), mean(&wins), &format!("{what} win rate"));
        // The paired test against BoN: Student's t on the per-prompt gold differences.
        let diffs: Vec<f64> = rows.iter().map(|r| r.rewards["gold"] - bon_gold[r.prompt.as_str()]).collect();
        let t = row.vs_bon[0].unwrap();
        close(t.mean, mean(&diffs), &format!("{what} mean difference"));
        let sd = se(&diffs) * (diffs.len() as f64).sqrt();
        if sd > 0.0 {
            close(t.std, sd, &format!("{what} difference spread"));
            let stat = mean(&diffs) / se(&diffs);
            let p = rbon_report::stats::two_sided_p(stat.abs(), diffs.len() as f64 - 1.0);
            close(t.p_value.unwrap(), p, &format!("{what} p-value"));
            paired_checked += 1;
        } else {
            assert!(t.p_value.is_none() && t.prompts_needed.is_none(), "{what}: {t:?}");
        }
        // Features of the pick; random averages them over the prompt's N samples.
        let tokens: Vec<f64> = rows
            .iter()
            .map(|r| match r.index {
                Some(i) => f64::from(smp[&(r.prompt.clone(), i)].tokens.unwrap()),
                None => {
                    let t: Vec<f64> = smp
                        .iter()
                        .filter(|((p, _), _)| *p == r.prompt)
                        .map(|(_, x)| f64::from(x.tokens.unwrap()))
                        .collect();
                    mean(&t)
                }
            })
            .collect();
        close(row.num_tokens.unwrap(), mean(&tokens), &format!("{what} tokens"));
        if row.method == "mbr" || (row.method == "rbon_wd" && row.beta == 1.0) {
            let w: Vec<f64> = rows.iter().map(|r| wd(&r.prompt, r.index.unwrap(), &smp)).collect();
            assert!((row.wd.unwrap() - mean(&w)).abs() < 1e-6, "{what} WD: {} vs {}", row.wd.unwrap(), mean(&w));
            checked_wd += 1;
        }
        // Pair counts per export come from the pair shards; baselines have none.
        assert_eq!(row.pairs.is_some(), !row.is_baseline(), "{what}");
    }
    assert_eq!(checked_wd, 2);
    assert!(paired_checked >= 10, "{paired_checked}");
    // Reward hacking shows in this data: the oracle beats BoN on gold, random is below.
    let g = |m: &str| s.row(m, 0.0).unwrap().rewards[kg].0;
    assert!(g("oracle:gold") > g("bon") && g("random") < g("oracle:gold"));

    // Proxy–gold correlation over every sample.
    let (px, gx): (Vec<f64>, Vec<f64>) = smp.values().map(|x| (x.rewards["proxy"], x.rewards["gold"])).unzip();
    let c = &s.correlations[0];
    close(c.pooled.unwrap(), pearson(&px, &gx), "pooled correlation");
    let per_prompt: Vec<f64> = prompts
        .iter()
        .map(|p| {
            let (x, y): (Vec<f64>, Vec<f64>) =
                smp.iter().filter(|((q, _), _)| q == p).map(|(_, x)| (x.rewards["proxy"], x.rewards["gold"])).unzip();
            pearson(&x, &y)
        })
        .filter(|v| v.is_finite())
        .collect();
    close(c.within_prompt.unwrap(), mean(&per_prompt), "within-prompt correlation");

    // β tuning: best β per method on the tuning prompts, evaluated on the others.
    let t = report.tuning.as_ref().unwrap();
    let tc = TuneConfig { gold: "gold".into(), fraction: Some(0.5), prompts: None, seed: 3 };
    let inside: Vec<&String> = prompts.iter().filter(|p| tc.contains(p)).collect();
    assert_eq!(t.tune_prompts as usize, inside.len());
    assert!(t.tune_prompts > 0 && t.heldout_prompts > 0);
    for m in ["rbon_kl", "rbon_wd", "rbon_len"] {
        let betas: Vec<f64> = {
            let mut b: Vec<f64> = sel.iter().filter(|r| r.method == m).map(|r| r.beta).collect();
            b.sort_by(f64::total_cmp);
            b.dedup();
            b
        };
        let subset_mean = |beta: f64, tune: bool| {
            let v: Vec<f64> = sel
                .iter()
                .filter(|r| r.method == m && r.beta == beta && tc.contains(&r.prompt) == tune)
                .map(|r| r.rewards["gold"])
                .collect();
            mean(&v)
        };
        // Ascending β, strictly greater: ties keep the smaller β.
        let mut best = (betas[0], subset_mean(betas[0], true));
        for &b in &betas[1..] {
            let v = subset_mean(b, true);
            if v > best.1 {
                best = (b, v);
            }
        }
        let got = t.methods.iter().find(|x| x.method.as_str() == m).unwrap();
        assert_eq!(got.beta, best.0, "{m}");
        close(got.tune_mean, best.1, &format!("{m} tuning mean"));
        close(got.heldout_mean.unwrap(), subset_mean(best.0, false), &format!("{m} held-out mean"));
    }

    // Files, and the terminal table names every row.
    for f in ["summary.parquet", "tuning.parquet", "report.md", "gold_vs_beta_gold.png", "gold_vs_beta_gold.svg"] {
        assert!(run.join("report").join(f).is_file(), "{f}");
    }
    for f in ["proxy_vs_gold_gold.png", "length_vs_beta.png", "proxy_vs_beta_proxy.svg"] {
        assert!(run.join("report").join(f).is_file(), "{f}");
    }
    let summary = read_parquet(&run.join("report/summary.parquet")).unwrap();
    assert_eq!(summary.iter().map(RecordBatch::num_rows).sum::<usize>(), s.rows.len());
    let table = report.terminal_table();
    for row in &s.rows {
        assert!(table.contains(&row.method), "{table}");
    }
    let md = fs::read_to_string(run.join("report/report.md")).unwrap();
    assert!(md.contains("## Proxy–gold correlation") && md.contains("## Pairs") && md.contains("## β tuned"));
    // The paired test, one line per method and β other than BoN itself.
    assert!(md.contains("## Against BoN: paired test on gold `gold`"), "{md}");
    let oracle = s.row("oracle:gold", 0.0).unwrap().vs_bon[0].unwrap();
    let section = &md[md.find("## Against BoN").unwrap()..];
    let line = section.lines().find(|l| l.starts_with("| oracle:gold |")).unwrap();
    assert!(line.ends_with(&format!("| {} |", oracle.prompts_needed.unwrap())), "{line}");
    // The β plot carries each mean's standard error as a band: one per β-method curve and one per
    // reference line (bon, mbr, oracle, random).
    let svg = fs::read_to_string(run.join("report/gold_vs_beta_gold.svg")).unwrap();
    assert_eq!(svg.matches("<polygon").count(), 3 + 4, "bands in gold_vs_beta_gold.svg");

    // The tuning the runtime calls before exports gives the same answer.
    let again = tune(&run, &frozen_select(&run)).unwrap().unwrap();
    assert_eq!(&again, t);
}

fn frozen_select(run: &Path) -> rbon_regularize::SelectConfig {
    let doc = rbon_core::ConfigDoc::load(&run.join("pipeline.yaml")).unwrap();
    let mut d = rbon_core::Diagnostics::default();
    doc.section("select", &mut d).unwrap()
}

#[test]
fn tuning_and_summary_do_not_depend_on_shard_size() {
    let tmp = tempfile::tempdir().unwrap();
    let tune_yaml = "  gold: [gold]\n  tune: { gold: gold, fraction: 0.4, seed: 1 }";
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    run_pipeline("byo", &a, |t| t.replace("  gold: [gold]", tune_yaml));
    run_pipeline("byo", &b, |t| t.replace("  gold: [gold]", tune_yaml).replace("shard_size: 8", "shard_size: 5"));
    let (ra, rb) = (
        build_report(&a, ReportOptions { plots: false }).unwrap(),
        build_report(&b, ReportOptions { plots: false }).unwrap(),
    );
    assert_eq!(ra.tuning, rb.tuning);
    assert_eq!(ra.summary.rows.len(), rb.summary.rows.len());
    for (x, y) in ra.summary.rows.iter().zip(&rb.summary.rows) {
        assert_eq!((&x.method, x.beta, x.prompts), (&y.method, y.beta, y.prompts));
        for (p, q) in x.rewards.iter().zip(&y.rewards) {
            assert!((p.0 - q.0).abs() < 1e-12, "{} {}", x.method, x.beta);
        }
    }
}

#[test]
fn a_directory_without_a_run_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let err = build_report(tmp.path(), ReportOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("pipeline.yaml") && msg.contains("not found"), "{msg}");
}

#[test]
fn demo_run_with_sampling_reports_and_plots() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("demo");
    run_pipeline("demo", &run, |t| t);
    let report = build_report(&run, ReportOptions::default()).unwrap();
    let s = &report.summary;
    assert_eq!(s.prompts, 24);
    assert_eq!(s.samples, 24 * 8);
    assert!(s.rows.iter().all(|r| r.logprob.is_some() && r.wd.is_some() && r.num_tokens.is_some()));
    assert!(!s.exports.is_empty());
    for f in ["gold_vs_beta_gold.png", "proxy_vs_gold_gold.png", "length_vs_beta.png", "report.md"] {
        assert!(run.join("report").join(f).is_file(), "{f}");
    }
    let sel = selections(&run);
    let kg = s.reward_index("gold").unwrap();
    let bon: Vec<f64> = sel.iter().filter(|r| r.method == "bon").map(|r| r.rewards["gold"]).collect();
    close(s.row("bon", 0.0).unwrap().rewards[kg].0, mean(&bon), "demo bon gold mean");
}
