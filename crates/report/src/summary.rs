//! The summary table: per (method, β) means and standard errors over prompts, computed with
//! polars over lazy scans of the selections and score shards.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use polars::prelude::*;

use rbon_core::StageName;
use rbon_core::schema::{BETA, INDEX, METHOD, PROMPT_ID, SAMPLE_IDX, reward_column};
use rbon_core::shard::{self, ShardMeta};
use rbon_regularize::{Label, Method};

use crate::ReportError;
use crate::data::{F_CHARS, F_LOGPROB, F_TOKENS, F_WD, RunData, scan};
use crate::stats::Paired;

/// The pair counters of one export, summed over the pair shards.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportCounts {
    pub method: String,
    pub beta: f64,
    /// `pairs`, `dropped_same_index`, `dropped_identical_text`, `dropped_below_margin`.
    pub counts: BTreeMap<String, u64>,
}

impl ExportCounts {
    pub fn get(&self, key: &str) -> u64 {
        self.counts.get(key).copied().unwrap_or(0)
    }
}

/// The counters a pair shard records per export, in the order the report shows them.
pub use rbon_core::stage::counter::PAIR_COUNTERS;

/// The summary's column of prompts per (method, β).
pub const PROMPTS: &str = "prompts";

/// One (method, β) of the summary.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryRow {
    /// `bon`, `rbon_kl`, …, `oracle:<gold>`, `random`.
    pub method: String,
    pub beta: f64,
    /// Prompts averaged over.
    pub prompts: u64,
    /// Per reward of [`Summary::rewards`]: the mean over prompts of the pick's reward, and its
    /// standard error (sample standard deviation / √prompts; `None` with one prompt).
    pub rewards: Vec<(f64, Option<f64>)>,
    /// Per gold reward of [`Summary::gold`]: the fraction of prompts where the pick's gold
    /// reward beats BoN's pick (ties count ½); `None` when the run has no `bon`.
    pub win_vs_bon: Vec<Option<f64>>,
    /// Per gold reward: the paired t-test of the per-prompt gold difference to BoN's pick (`None`
    /// when the run has no `bon`).
    pub vs_bon: Vec<Option<Paired>>,
    /// Mean log π_ref of the pick (`None` without log-probs).
    pub logprob: Option<f64>,
    /// Mean WD of the pick (`None` without embeddings).
    pub wd: Option<f64>,
    /// Mean length of the pick in tokens (`None` without token counts) and in characters.
    pub num_tokens: Option<f64>,
    pub num_chars: Option<f64>,
    /// The export's pair counters, when (method, β) was exported.
    pub pairs: Option<ExportCounts>,
}

impl SummaryRow {
    /// Whether this row is the `random` or an `oracle:<gold>` baseline.
    pub fn is_baseline(&self) -> bool {
        self.method.parse::<Label>().is_ok_and(|l| l.is_baseline())
    }
}

/// Proxy–gold agreement over the run's samples: when the proxy tracks the gold reward only
/// loosely, optimising it hard (BoN at large N) is where reward hacking shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Correlation {
    pub proxy: String,
    pub gold: String,
    /// Pearson correlation over every sample of every prompt.
    pub pooled: Option<f64>,
    /// Mean over prompts of the Pearson correlation among a prompt's N samples: what selection
    /// sees (prompts whose rewards are constant are left out).
    pub within_prompt: Option<f64>,
}

/// Everything the report says, as data.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub run_name: String,
    pub prompts: u64,
    pub samples: u64,
    /// Every reward model of the run, in the selections table's order.
    pub rewards: Vec<String>,
    /// The proxy reward model(s) and the gold ones.
    pub proxy: Vec<String>,
    pub gold: Vec<String>,
    pub rows: Vec<SummaryRow>,
    pub correlations: Vec<Correlation>,
    pub exports: Vec<ExportCounts>,
}

impl Summary {
    pub fn reward_index(&self, name: &str) -> Option<usize> {
        self.rewards.iter().position(|r| r == name)
    }

    /// The row of (method, β).
    pub fn row(&self, method: &str, beta: f64) -> Option<&SummaryRow> {
        self.rows.iter().find(|r| r.method == method && r.beta == beta)
    }
}

fn win_col(g: &str) -> String {
    format!("win_vs_bon_{g}")
}
fn diff_col(g: &str) -> String {
    format!("diff_vs_bon_{g}")
}
fn diff_std_col(g: &str) -> String {
    format!("diff_std_vs_bon_{g}")
}
fn mean_col(r: &str) -> String {
    format!("{}_mean", rbon_core::schema::reward_column(r))
}
fn std_col(r: &str) -> String {
    format!("{}_std", rbon_core::schema::reward_column(r))
}

/// Sort key: methods in config order, then the oracles in gold order, then random; β ascending.
fn order(select_methods: &[Method], gold: &[String], method: &str) -> usize {
    if let Some(i) = select_methods.iter().position(|m| m.as_str() == method) {
        return i;
    }
    let base = select_methods.len();
    match method.parse::<Label>() {
        Ok(Label::Oracle(g)) => base + gold.iter().position(|x| *x == g).unwrap_or(gold.len()),
        Ok(Label::Random) => base + gold.len() + 1,
        _ => base + gold.len() + 2,
    }
}

fn f64_at(df: &DataFrame, name: &str, i: usize, at: &Path) -> Result<Option<f64>, ReportError> {
    let c = df.column(name).map_err(ReportError::polars(at))?;
    let c = c.cast(&DataType_::Float64).map_err(ReportError::polars(at))?;
    Ok(c.f64().map_err(ReportError::polars(at))?.get(i))
}

use polars::prelude::DataType as DataType_;

/// Computes the summary of a run.
pub fn summarize(run: &RunData) -> Result<Summary, ReportError> {
    let at = run.root.join(StageName::Selections.as_str());
    let rewards = run.reward_names()?;
    let gold: Vec<String> = run.select.gold.iter().filter(|g| rewards.contains(g)).cloned().collect();
    let features = run.features()?;
    let samples = features.height() as u64;
    let feats = features.lazy();
    let sel = scan(&run.selections)?;

    // The pick's features; `random` (no pick) gets the prompt's mean over its N samples.
    let means = feats.clone().group_by([col(PROMPT_ID)]).agg([
        col(F_TOKENS).mean(),
        col(F_CHARS).mean(),
        col(F_LOGPROB).mean(),
        col(F_WD).mean(),
    ]);
    let feature_cols = || [col(F_TOKENS), col(F_CHARS), col(F_LOGPROB), col(F_WD)];
    let base_cols = || {
        let mut c = vec![col(PROMPT_ID), col(METHOD), col(BETA)];
        c.extend(rewards.iter().map(|r| col(reward_column(r))));
        c
    };
    let picked = sel
        .clone()
        .filter(col(INDEX).is_not_null())
        .join(feats, [col(PROMPT_ID), col(INDEX)], [col(PROMPT_ID), col(SAMPLE_IDX)], JoinArgs::new(JoinType::Left))
        .select(base_cols().into_iter().chain(feature_cols()).collect::<Vec<_>>());
    let random = sel
        .clone()
        .filter(col(INDEX).is_null())
        .join(means, [col(PROMPT_ID)], [col(PROMPT_ID)], JoinArgs::new(JoinType::Left))
        .select(base_cols().into_iter().chain(feature_cols()).collect::<Vec<_>>());
    let mut all = concat([picked, random], UnionArgs::default()).map_err(ReportError::polars(&at))?;

    let has_bon = run.select.methods.contains(&Method::Bon);
    if has_bon && !gold.is_empty() {
        let bon_cols: Vec<Expr> = std::iter::once(col(PROMPT_ID))
            .chain(gold.iter().map(|g| col(reward_column(g)).alias(format!("bon_{g}"))))
            .collect();
        let bon = sel.clone().filter(col(METHOD).eq(lit("bon"))).select(bon_cols);
        all = all.join(bon, [col(PROMPT_ID)], [col(PROMPT_ID)], JoinArgs::new(JoinType::Left)).with_columns(
            gold.iter()
                .map(|g| {
                    let (mine, theirs) = (col(reward_column(g)), col(format!("bon_{g}")));
                    when(mine.clone().gt(theirs.clone()))
                        .then(lit(1.0))
                        .when(mine.eq(theirs))
                        .then(lit(0.5))
                        .otherwise(lit(0.0))
                        .alias(win_col(g))
                })
                .chain(gold.iter().map(|g| (col(reward_column(g)) - col(format!("bon_{g}"))).alias(diff_col(g))))
                .collect::<Vec<_>>(),
        );
    }
    let mut aggs = vec![len().alias(PROMPTS)];
    for r in &rewards {
        aggs.push(col(reward_column(r)).mean().alias(mean_col(r)));
        aggs.push(col(reward_column(r)).std(1).alias(std_col(r)));
    }
    if has_bon {
        aggs.extend(gold.iter().map(|g| col(win_col(g)).mean().alias(win_col(g))));
        aggs.extend(gold.iter().map(|g| col(diff_col(g)).mean().alias(diff_col(g))));
        aggs.extend(gold.iter().map(|g| col(diff_col(g)).std(1).alias(diff_std_col(g))));
    }
    aggs.extend([col(F_LOGPROB).mean(), col(F_WD).mean(), col(F_TOKENS).mean(), col(F_CHARS).mean()]);
    let df = all.group_by([col(METHOD), col(BETA)]).agg(aggs).collect().map_err(ReportError::polars(&at))?;

    let exports = export_counts(run)?;
    let methods = df.column(METHOD).map_err(ReportError::polars(&at))?.str().map_err(ReportError::polars(&at))?;
    let mut rows = Vec::with_capacity(df.height());
    for i in 0..df.height() {
        let method = methods.get(i).unwrap_or_default().to_owned();
        let beta = f64_at(&df, BETA, i, &at)?.unwrap_or(0.0);
        let prompts = f64_at(&df, PROMPTS, i, &at)?.unwrap_or(0.0) as u64;
        let mut rw = Vec::with_capacity(rewards.len());
        for r in &rewards {
            let mean = f64_at(&df, &mean_col(r), i, &at)?.unwrap_or(f64::NAN);
            let se = f64_at(&df, &std_col(r), i, &at)?.map(|s| s / (prompts as f64).sqrt());
            rw.push((mean, se));
        }
        let win_vs_bon = gold
            .iter()
            .map(|g| if has_bon { f64_at(&df, &win_col(g), i, &at) } else { Ok(None) })
            .collect::<Result<Vec<_>, _>>()?;
        let vs_bon = gold
            .iter()
            .map(|g| {
                if !has_bon {
                    return Ok(None);
                }
                let mean = f64_at(&df, &diff_col(g), i, &at)?;
                let std = f64_at(&df, &diff_std_col(g), i, &at)?;
                Ok(mean.map(|m| Paired::from_moments(prompts, m, std.unwrap_or(f64::NAN))))
            })
            .collect::<Result<Vec<_>, ReportError>>()?;
        let pairs = exports.iter().find(|e| e.method == method && e.beta == beta).cloned();
        rows.push(SummaryRow {
            beta,
            prompts,
            rewards: rw,
            win_vs_bon,
            vs_bon,
            logprob: f64_at(&df, F_LOGPROB, i, &at)?,
            wd: f64_at(&df, F_WD, i, &at)?,
            num_tokens: f64_at(&df, F_TOKENS, i, &at)?,
            num_chars: f64_at(&df, F_CHARS, i, &at)?,
            pairs,
            method,
        });
    }
    rows.sort_by(|a, b| {
        let (oa, ob) = (order(&run.select.methods, &gold, &a.method), order(&run.select.methods, &gold, &b.method));
        oa.cmp(&ob).then(a.method.cmp(&b.method)).then(a.beta.total_cmp(&b.beta))
    });
    let random = Label::Random.to_string();
    let prompts = rows.iter().find(|r| r.method == random).map_or(0, |r| r.prompts);
    let proxy: Vec<String> = run.select.proxy.names().to_vec();
    Ok(Summary {
        run_name: run.name.clone(),
        prompts,
        samples,
        correlations: correlations(run, &proxy, &gold)?,
        rewards,
        proxy,
        gold,
        rows,
        exports,
    })
}

/// Pearson correlations of each proxy model with each gold model over the scores shards.
fn correlations(run: &RunData, proxy: &[String], gold: &[String]) -> Result<Vec<Correlation>, ReportError> {
    let pairs: Vec<(&String, &String)> = proxy.iter().flat_map(|p| gold.iter().map(move |g| (p, g))).collect();
    if pairs.is_empty() || run.scores.is_empty() {
        return Ok(Vec::new());
    }
    let at = run.root.join(StageName::Scores.as_str());
    let name = |k: usize| format!("r{k}");
    let exprs = || -> Vec<Expr> {
        pairs
            .iter()
            .enumerate()
            .map(|(k, (p, g))| pearson_corr(col(reward_column(p)), col(reward_column(g))).alias(name(k)))
            .collect()
    };
    let scores = scan(&run.scores)?;
    let pooled = scores.clone().select(exprs()).collect().map_err(ReportError::polars(&at))?;
    let within = scores.group_by([col(PROMPT_ID)]).agg(exprs()).collect().map_err(ReportError::polars(&at))?;
    let mut out = Vec::with_capacity(pairs.len());
    for (k, (p, g)) in pairs.iter().enumerate() {
        let pooled = f64_at(&pooled, &name(k), 0, &at)?.filter(|v| v.is_finite());
        let c = within.column(&name(k)).map_err(ReportError::polars(&at))?;
        let c = c.cast(&DataType_::Float64).map_err(ReportError::polars(&at))?;
        let ca = c.f64().map_err(ReportError::polars(&at))?;
        let finite: Vec<f64> = (0..ca.len()).filter_map(|i| ca.get(i)).filter(|v| v.is_finite()).collect();
        let within_prompt = (!finite.is_empty()).then(|| finite.iter().sum::<f64>() / finite.len() as f64);
        out.push(Correlation { proxy: (*p).clone(), gold: (*g).clone(), pooled, within_prompt });
    }
    Ok(out)
}

/// Pair counters per export, summed from the pair shards' footers (drops are never silent: each
/// shard records them by reason).
fn export_counts(run: &RunData) -> Result<Vec<ExportCounts>, ReportError> {
    let mut sums: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for p in &run.pairs {
        let meta: ShardMeta = shard::read_meta(p)?.unwrap_or_default();
        for (key, c) in meta.details {
            let e = sums.entry(key).or_default();
            for (k, v) in c {
                *e.entry(k).or_default() += v;
            }
        }
    }
    let mut out = Vec::with_capacity(sums.len());
    for (key, counts) in sums {
        let Some((method, beta)) = key.split_once("/beta=") else { continue };
        let Ok(beta) = beta.parse::<f64>() else { continue };
        out.push(ExportCounts { method: method.to_owned(), beta, counts });
    }
    let methods = &run.select.methods;
    out.sort_by(|a, b| {
        let pos = |m: &str| methods.iter().position(|x| x.as_str() == m).unwrap_or(methods.len());
        pos(&a.method).cmp(&pos(&b.method)).then(a.beta.total_cmp(&b.beta))
    });
    Ok(out)
}

/// Writes the summary as `summary.parquet`: one row per (method, β).
pub fn write_summary(s: &Summary, path: &Path) -> Result<(), ReportError> {
    let mut fields = vec![
        Field::new(METHOD, DataType::Utf8, false),
        Field::new(BETA, DataType::Float64, false),
        Field::new(PROMPTS, DataType::UInt64, false),
    ];
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(s.rows.iter().map(|r| r.method.as_str()))),
        Arc::new(Float64Array::from_iter_values(s.rows.iter().map(|r| r.beta))),
        Arc::new(UInt64Array::from_iter_values(s.rows.iter().map(|r| r.prompts))),
    ];
    let mut f64_col = |name: String, values: Vec<Option<f64>>| {
        fields.push(Field::new(name, DataType::Float64, true));
        cols.push(Arc::new(Float64Array::from(values)) as ArrayRef);
    };
    for (k, r) in s.rewards.iter().enumerate() {
        f64_col(format!("{}_mean", reward_column(r)), s.rows.iter().map(|x| Some(x.rewards[k].0)).collect());
        f64_col(format!("{}_se", reward_column(r)), s.rows.iter().map(|x| x.rewards[k].1).collect());
    }
    let mut needed = Vec::new();
    for (k, g) in s.gold.iter().enumerate() {
        f64_col(win_col(g), s.rows.iter().map(|x| x.win_vs_bon[k]).collect());
        f64_col(diff_col(g), s.rows.iter().map(|x| x.vs_bon[k].map(|t| t.mean)).collect());
        f64_col(format!("p_vs_bon_{g}"), s.rows.iter().map(|x| x.vs_bon[k].and_then(|t| t.p_value)).collect());
        needed.push((
            format!("prompts_needed_vs_bon_{g}"),
            s.rows.iter().map(|x| x.vs_bon[k].and_then(|t| t.prompts_needed)).collect::<Vec<_>>(),
        ));
    }
    f64_col("logprob_mean".into(), s.rows.iter().map(|x| x.logprob).collect());
    f64_col("wd_mean".into(), s.rows.iter().map(|x| x.wd).collect());
    f64_col("num_tokens_mean".into(), s.rows.iter().map(|x| x.num_tokens).collect());
    f64_col("num_chars_mean".into(), s.rows.iter().map(|x| x.num_chars).collect());
    for (name, values) in needed {
        fields.push(Field::new(name, DataType::UInt64, true));
        cols.push(Arc::new(UInt64Array::from(values)));
    }
    for c in PAIR_COUNTERS {
        fields.push(Field::new(c, DataType::UInt64, true));
        cols.push(Arc::new(UInt64Array::from(
            s.rows.iter().map(|x| x.pairs.as_ref().map(|p| p.get(c))).collect::<Vec<_>>(),
        )));
    }
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), cols)
        .map_err(|e| ReportError::Data { path: path.to_owned(), message: e.to_string() })?;
    shard::write_parquet(path, &schema, &[batch], &ShardMeta::default())?;
    Ok(())
}
