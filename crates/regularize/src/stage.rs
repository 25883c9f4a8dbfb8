use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt32Array};
use rbon_core::CoreError;
use rbon_core::schema::selections_schema;
use rbon_core::tables::SampleScores;

use crate::config::SelectConfig;
use crate::method::{Candidates, Method, RegularizeError, argmax, objectives, wasserstein};

/// Errors of the selection stage.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("prompt {prompt_id:?}: {source}")]
    Prompt { prompt_id: String, source: RegularizeError },
    #[error("the scores have no `reward_{0}` column")]
    MissingReward(String),
    #[error(transparent)]
    Core(#[from] CoreError),
}

/// One row of the selections table.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectionRow {
    pub prompt_id: String,
    /// `bon`, `rbon_kl`, …, `oracle:<gold>`, `random`.
    pub method: String,
    pub beta: f64,
    /// The chosen `sample_idx`; `None` for `random`, which is an average, not a pick.
    pub index: Option<u32>,
    pub objective: f64,
    /// Every reward model's score of the pick (means for `random`), in `reward_names` order.
    pub rewards: Vec<f64>,
}

/// The (method, β) combinations a config sweeps, in output order. β is 0 for methods without one.
pub fn sweep(cfg: &SelectConfig) -> Vec<(Method, f64)> {
    let mut out = Vec::new();
    for &m in cfg.methods.iter().filter(|m| !m.is_report_only()) {
        if m.uses_beta() {
            out.extend(cfg.betas.iter().map(|&b| (m, b)));
        } else {
            out.push((m, 0.0));
        }
    }
    out
}

/// Applies every rule of the sweep to each prompt of a shard.
pub fn select_shard(cfg: &SelectConfig, data: &SampleScores) -> Result<Vec<SelectionRow>, SelectError> {
    let proxy = data.reward_index(&cfg.proxy).ok_or_else(|| SelectError::MissingReward(cfg.proxy.clone()))?;
    let gold = cfg
        .gold
        .iter()
        .map(|g| data.reward_index(g).map(|i| (g, i)).ok_or_else(|| SelectError::MissingReward(g.clone())))
        .collect::<Result<Vec<_>, _>>()?;
    let needs_wd = cfg.methods.iter().any(|m| m.needs_embedding());
    let combos = sweep(cfg);
    let mut out = Vec::with_capacity(data.groups.len() * (combos.len() + gold.len() + 1));
    for g in &data.groups {
        let pid = &data.prompt_ids[g.start];
        let err = |source| SelectError::Prompt { prompt_id: pid.clone(), source };
        let wd = match (needs_wd, data.group_embeddings(g)) {
            (true, Some((e, dim))) => Some(wasserstein(e, dim).map_err(err)?),
            (true, None) => return Err(err(RegularizeError::MissingEmbedding)),
            (false, _) => None,
        };
        let c = Candidates {
            proxy: &data.rewards[proxy][g.clone()],
            logprob: data.logprob.as_ref().map(|l| &l[g.clone()]),
            num_tokens: data.num_tokens.as_ref().map(|n| &n[g.clone()]),
            wd: wd.as_deref(),
        };
        let rewards_at = |i: usize| data.rewards.iter().map(|r| r[g.start + i]).collect::<Vec<_>>();
        let row = |method: String, beta: f64, index: Option<usize>, objective: f64, rewards: Vec<f64>| SelectionRow {
            prompt_id: pid.clone(),
            method,
            beta,
            index: index.map(|i| data.sample_idx[g.start + i]),
            objective,
            rewards,
        };
        for &(m, beta) in &combos {
            let obj = objectives(m, beta, &c).map_err(err)?;
            let i = argmax(&obj).ok_or_else(|| err(RegularizeError::NoCandidates))?;
            out.push(row(m.as_str().to_owned(), beta, Some(i), obj[i], rewards_at(i)));
        }
        for &(name, gi) in &gold {
            let values = &data.rewards[gi][g.clone()];
            let i = argmax(values).ok_or_else(|| err(RegularizeError::NoCandidates))?;
            out.push(row(format!("{}:{name}", Method::Oracle.as_str()), 0.0, Some(i), values[i], rewards_at(i)));
        }
        // The random baseline: the expected rewards of a uniformly random pick.
        let n = g.len() as f64;
        let means: Vec<f64> = data.rewards.iter().map(|r| r[g.clone()].iter().sum::<f64>() / n).collect();
        let objective = gold.first().map_or(means[proxy], |&(_, gi)| means[gi]);
        out.push(row(Method::Random.as_str().to_owned(), 0.0, None, objective, means));
    }
    Ok(out)
}

/// The selections table of some rows.
pub fn selections_batch(rows: &[SelectionRow], reward_names: &[String]) -> Result<RecordBatch, SelectError> {
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.prompt_id.as_str()))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.method.as_str()))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.beta))),
        Arc::new(UInt32Array::from_iter(rows.iter().map(|r| r.index))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.objective))),
    ];
    for i in 0..reward_names.len() {
        cols.push(Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.rewards[i]))));
    }
    RecordBatch::try_new(selections_schema(reward_names), cols)
        .map_err(|e| SelectError::Core(CoreError::data("selections", e.to_string())))
}

/// Counters a selection shard reports.
pub fn counters(data: &SampleScores, rows: &[SelectionRow]) -> BTreeMap<String, u64> {
    BTreeMap::from([("prompts".to_owned(), data.groups.len() as u64), ("selections".to_owned(), rows.len() as u64)])
}
