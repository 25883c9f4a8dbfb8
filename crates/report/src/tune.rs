//! β selection (`select.tune`): the best β of each method by a gold reward's mean over a tuning
//! subset of prompts, and how that β does on the other prompts.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use polars::prelude::*;

use rbon_core::schema::{BETA, METHOD, PROMPT_ID, reward_column};
use rbon_core::shard::{self, ShardMeta};
use rbon_regularize::{Label, Method, SelectConfig, TuneConfig};

use crate::ReportError;
use crate::data::{RunData, scan};

/// One method's tuned β.
#[derive(Debug, Clone, PartialEq)]
pub struct TunedBeta {
    pub method: Method,
    /// The β (λ for `bon_unc`) with the highest mean gold reward on the tuning subset (ties to
    /// the smaller β).
    pub beta: f64,
    /// Its mean gold reward on the tuning subset.
    pub tune_mean: f64,
    /// Its mean gold reward and standard error on the held-out prompts (`None` when none are
    /// held out).
    pub heldout_mean: Option<f64>,
    pub heldout_se: Option<f64>,
}

/// The outcome of β tuning.
#[derive(Debug, Clone, PartialEq)]
pub struct Tuning {
    /// The gold reward β was tuned on.
    pub gold: String,
    pub tune_prompts: u64,
    pub heldout_prompts: u64,
    /// One entry per method with a β (or λ) grid, in `select.methods` order.
    pub methods: Vec<TunedBeta>,
    /// Held-out means of the references: BoN, the oracle on this gold reward, random.
    pub heldout_bon: Option<f64>,
    pub heldout_oracle: Option<f64>,
    pub heldout_random: Option<f64>,
}

impl Tuning {
    /// The best β per method: what `pair.betas: [best]` exports.
    pub fn best(&self) -> BTreeMap<Method, f64> {
        self.methods.iter().map(|t| (t.method, t.beta)).collect()
    }
}

/// Tunes β on the run at `run_dir` with `select` (the pipeline's `select` section), reading the
/// selections shards. `None` when `select.tune` is not set.
///
/// Call it after the selection stage and before pairing when `pair.betas` holds `best`, and
/// hand [`Tuning::best`] to the pair config.
pub fn tune(run_dir: &Path, select: &SelectConfig) -> Result<Option<Tuning>, ReportError> {
    let Some(t) = &select.tune else { return Ok(None) };
    let run = RunData::with_select(run_dir, String::new(), select.clone())?;
    tune_with(&run, t).map(Some)
}

struct Cell {
    n: u64,
    mean: f64,
    std: Option<f64>,
}

pub(crate) fn tune_with(run: &RunData, t: &TuneConfig) -> Result<Tuning, ReportError> {
    let at = run.root.join(rbon_core::StageName::Selections.as_str());
    let sel = scan(&run.selections)?;
    let gold = reward_column(&t.gold);
    if !run.reward_names()?.contains(&t.gold) {
        return Err(ReportError::Data {
            path: at,
            message: format!("select.tune.gold: the selections have no `{gold}` column"),
        });
    }
    // Membership is decided per prompt id by `TuneConfig::contains`, never by row order.
    let ids_df = sel
        .clone()
        .select([col(PROMPT_ID)])
        .unique_stable(None, UniqueKeepStrategy::First)
        .collect()
        .map_err(ReportError::polars(&at))?;
    let ids_ca = ids_df.column(PROMPT_ID).and_then(|c| c.str().cloned()).map_err(ReportError::polars(&at))?;
    let ids: Vec<String> = (0..ids_ca.len()).map(|i| ids_ca.get(i).unwrap_or_default().to_owned()).collect();
    let inside: Vec<bool> = ids.iter().map(|p| t.contains(p)).collect();
    let tune_prompts = inside.iter().filter(|&&b| b).count() as u64;
    let heldout_prompts = ids.len() as u64 - tune_prompts;
    if tune_prompts == 0 {
        return Err(ReportError::Data {
            path: at,
            message: format!("select.tune: none of the run's {} prompts is in the tuning subset", ids.len()),
        });
    }
    let membership =
        DataFrame::new_infer_height(vec![Column::new(PROMPT_ID.into(), ids), Column::new("tune".into(), inside)])
            .map_err(ReportError::polars(&at))?;
    let df = sel
        .join(membership.lazy(), [col(PROMPT_ID)], [col(PROMPT_ID)], JoinArgs::new(JoinType::Left))
        .group_by([col(METHOD), col(BETA), col("tune")])
        .agg([len().alias("n"), col(gold.as_str()).mean().alias("mean"), col(gold.as_str()).std(1).alias("std")])
        .collect()
        .map_err(ReportError::polars(&at))?;

    let p = ReportError::polars(&at);
    let methods = df.column(METHOD).and_then(|c| c.str().cloned()).map_err(p)?;
    let betas = df.column(BETA).and_then(|c| c.f64().cloned()).map_err(ReportError::polars(&at))?;
    let tunes = df.column("tune").and_then(|c| c.bool().cloned()).map_err(ReportError::polars(&at))?;
    let ns = df
        .column("n")
        .and_then(|c| c.cast(&polars::prelude::DataType::UInt64))
        .and_then(|c| c.u64().cloned())
        .map_err(ReportError::polars(&at))?;
    let means = df.column("mean").and_then(|c| c.f64().cloned()).map_err(ReportError::polars(&at))?;
    let stds = df.column("std").and_then(|c| c.f64().cloned()).map_err(ReportError::polars(&at))?;
    let mut cells: BTreeMap<(String, u64, bool), Cell> = BTreeMap::new();
    for i in 0..df.height() {
        let (Some(m), Some(b), Some(tu), Some(mean)) = (methods.get(i), betas.get(i), tunes.get(i), means.get(i))
        else {
            continue;
        };
        cells.insert((m.to_owned(), b.to_bits(), tu), Cell { n: ns.get(i).unwrap_or(0), mean, std: stds.get(i) });
    }
    let heldout = |m: &str, b: f64| cells.get(&(m.to_owned(), b.to_bits(), false));
    let mut tuned = Vec::new();
    for &m in run.select.methods.iter().filter(|m| m.uses_beta()) {
        let mut best: Option<(f64, f64)> = None;
        for b in run.select.grid(m) {
            let Some(c) = cells.get(&(m.as_str().to_owned(), b.to_bits(), true)) else { continue };
            // A higher mean wins; on equal means the smaller β does, whatever the grid order.
            if best.is_none_or(|(bb, bm)| c.mean > bm || (c.mean == bm && b < bb)) {
                best = Some((b, c.mean));
            }
        }
        let Some((beta, tune_mean)) = best else { continue };
        let h = heldout(m.as_str(), beta);
        tuned.push(TunedBeta {
            method: m,
            beta,
            tune_mean,
            heldout_mean: h.map(|c| c.mean),
            heldout_se: h.and_then(|c| c.std.map(|s| s / (c.n as f64).sqrt())),
        });
    }
    Ok(Tuning {
        gold: t.gold.clone(),
        tune_prompts,
        heldout_prompts,
        methods: tuned,
        heldout_bon: heldout(Method::Bon.as_str(), 0.0).map(|c| c.mean),
        heldout_oracle: heldout(&Label::oracle(&t.gold).to_string(), 0.0).map(|c| c.mean),
        heldout_random: heldout(&Label::Random.to_string(), 0.0).map(|c| c.mean),
    })
}

/// Writes `tuning.parquet`: one row per tuned method.
pub fn write_tuning(t: &Tuning, path: &Path) -> Result<(), ReportError> {
    let schema = Arc::new(Schema::new(vec![
        Field::new(METHOD, DataType::Utf8, false),
        Field::new("best_beta", DataType::Float64, false),
        Field::new("gold", DataType::Utf8, false),
        Field::new("tune_prompts", DataType::UInt64, false),
        Field::new("tune_mean", DataType::Float64, false),
        Field::new("heldout_prompts", DataType::UInt64, false),
        Field::new("heldout_mean", DataType::Float64, true),
        Field::new("heldout_se", DataType::Float64, true),
        Field::new("heldout_bon_mean", DataType::Float64, true),
    ]));
    let n = t.methods.len();
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(t.methods.iter().map(|m| m.method.as_str()))),
        Arc::new(Float64Array::from_iter_values(t.methods.iter().map(|m| m.beta))),
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(t.gold.as_str(), n))),
        Arc::new(UInt64Array::from_iter_values(std::iter::repeat_n(t.tune_prompts, n))),
        Arc::new(Float64Array::from_iter_values(t.methods.iter().map(|m| m.tune_mean))),
        Arc::new(UInt64Array::from_iter_values(std::iter::repeat_n(t.heldout_prompts, n))),
        Arc::new(Float64Array::from(t.methods.iter().map(|m| m.heldout_mean).collect::<Vec<_>>())),
        Arc::new(Float64Array::from(t.methods.iter().map(|m| m.heldout_se).collect::<Vec<_>>())),
        Arc::new(Float64Array::from(vec![t.heldout_bon; n])),
    ];
    let batch = RecordBatch::try_new(schema.clone(), cols)
        .map_err(|e| ReportError::Data { path: path.to_owned(), message: e.to_string() })?;
    shard::write_parquet(path, &schema, &[batch], &ShardMeta::default())?;
    Ok(())
}
