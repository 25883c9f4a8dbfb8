use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, UInt32Type};
use arrow_array::{Array, ArrayRef, Float64Array, RecordBatch, StringArray, UInt32Array};
use rbon_core::messages::messages_array;
use rbon_core::schema::{self, BETA, INDEX, METHOD, PROMPT_ID};
use rbon_core::seed::{derive_seed, uniform_below};
use rbon_core::tables::SampleScores;
use rbon_core::{CoreError, Message};
use rbon_regularize::{Candidates, Method, RegularizeError, SelectConfig, argmin, second, wasserstein};

use crate::config::{PairConfig, RejectedRule};

/// Why a pair was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Chosen and rejected are the same sample (e.g. N = 1, or the pick is also the worst).
    SameIndex,
    /// Different samples with the same text: DPO would learn nothing, and TRL's prompt
    /// extraction corrupts such rows.
    IdenticalText,
    /// The proxy margin is below `pair.min_margin`.
    BelowMargin,
}

impl DropReason {
    pub const ALL: [DropReason; 3] = [Self::SameIndex, Self::IdenticalText, Self::BelowMargin];
    /// The counter name, `dropped_<reason>`.
    pub fn counter(self) -> &'static str {
        match self {
            Self::SameIndex => "dropped_same_index",
            Self::IdenticalText => "dropped_identical_text",
            Self::BelowMargin => "dropped_below_margin",
        }
    }
}

/// Errors of the pair stage.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error("prompt {prompt_id:?}: {message}")]
    Prompt { prompt_id: String, message: String },
    #[error(transparent)]
    Regularize(#[from] RegularizeError),
    #[error(transparent)]
    Core(#[from] CoreError),
}

/// One preference pair.
#[derive(Debug, Clone, PartialEq)]
pub struct PairRow {
    pub prompt_id: String,
    pub method: Method,
    pub beta: f64,
    pub prompt: Vec<Message>,
    pub chosen: String,
    pub rejected: String,
    pub chosen_index: u32,
    pub rejected_index: u32,
    pub score_chosen: f64,
    pub score_rejected: f64,
    pub margin: f64,
}

/// The export a (method, β) goes to, relative to `pairs/`: `<method>/beta=<β>`. β prints in
/// its shortest exact form (`0.0001`, `1`, `0`).
pub fn export_key(method: Method, beta: f64) -> String {
    format!("{}/beta={beta}", method.as_str())
}

/// Pairs of one shard with counters: totals, and per export key in `details`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardPairs {
    pub rows: Vec<PairRow>,
    pub counters: BTreeMap<String, u64>,
    pub details: BTreeMap<String, BTreeMap<String, u64>>,
}

/// Builds the pairs of one shard from its prompts, scored samples and selections.
pub fn pair_shard(
    cfg: &PairConfig,
    select: &SelectConfig,
    seed: u64,
    prompts: &[(String, Vec<Message>)],
    data: &SampleScores,
    selections: &[RecordBatch],
) -> Result<ShardPairs, PairError> {
    let proxy = data
        .reward_index(&select.proxy)
        .ok_or_else(|| CoreError::data("scores", format!("no `reward_{}` column", select.proxy)))?;
    let prompt_of: HashMap<&str, &[Message]> = prompts.iter().map(|(id, m)| (id.as_str(), m.as_slice())).collect();
    let group_of: HashMap<&str, usize> =
        data.groups.iter().enumerate().map(|(gi, g)| (data.prompt_ids[g.start].as_str(), gi)).collect();
    let mut out = ShardPairs::default();
    for key in ["pairs".to_owned()].into_iter().chain(DropReason::ALL.map(|d| d.counter().to_owned())) {
        out.counters.insert(key, 0);
    }
    let mut wd_cache: HashMap<usize, Vec<f64>> = HashMap::new();
    for batch in selections {
        let ids = col(batch, PROMPT_ID)?.as_string::<i32>();
        let methods = col(batch, METHOD)?.as_string::<i32>();
        let betas = col(batch, BETA)?.as_primitive::<Float64Type>();
        let index = col(batch, INDEX)?.as_primitive::<UInt32Type>();
        for r in 0..batch.num_rows() {
            let Ok(method) = methods.value(r).parse::<Method>() else { continue };
            let beta = betas.value(r);
            if method.is_report_only() || !cfg.exports(select, method, beta) || index.is_null(r) {
                continue;
            }
            let pid = ids.value(r);
            let perr = |message: String| PairError::Prompt { prompt_id: pid.to_owned(), message };
            let gi = *group_of.get(pid).ok_or_else(|| perr("selected but has no samples".into()))?;
            let g = data.groups[gi].clone();
            let prompt = *prompt_of.get(pid).ok_or_else(|| perr("selected but not in the prompts table".into()))?;
            let chosen = data.sample_idx[g.clone()]
                .iter()
                .position(|&s| s == index.value(r))
                .ok_or_else(|| perr(format!("selected sample {} does not exist", index.value(r))))?;
            let proxy_r = &data.rewards[proxy][g.clone()];
            let n = g.len();
            let rejected = match cfg.rejected {
                RejectedRule::Worst => argmin(proxy_r),
                RejectedRule::Random => (n >= 2).then(|| {
                    let k = uniform_below(derive_seed(seed, pid, b"pair.rejected"), n as u64 - 1) as usize;
                    if k < chosen { k } else { k + 1 }
                }),
                RejectedRule::Second => {
                    let wd = if method.needs_embedding() {
                        if let std::collections::hash_map::Entry::Vacant(e) = wd_cache.entry(gi) {
                            let (emb, dim) = data.group_embeddings(&g).ok_or(RegularizeError::MissingEmbedding)?;
                            e.insert(wasserstein(emb, dim)?);
                        }
                        wd_cache.get(&gi).map(Vec::as_slice)
                    } else {
                        None
                    };
                    let c = Candidates {
                        proxy: proxy_r,
                        logprob: data.logprob.as_ref().map(|l| &l[g.clone()]),
                        num_tokens: data.num_tokens.as_ref().map(|t| &t[g.clone()]),
                        wd,
                    };
                    second(method, beta, &c, chosen)?
                }
            }
            .unwrap_or(chosen);
            let key = export_key(method, beta);
            let margin = proxy_r[chosen] - proxy_r[rejected];
            let drop = if rejected == chosen {
                Some(DropReason::SameIndex)
            } else if data.responses[g.start + chosen] == data.responses[g.start + rejected] {
                Some(DropReason::IdenticalText)
            } else if margin < cfg.min_margin {
                Some(DropReason::BelowMargin)
            } else {
                None
            };
            let counter = drop.map_or("pairs", DropReason::counter);
            *out.counters.entry(counter.to_owned()).or_default() += 1;
            let detail = out.details.entry(key).or_insert_with(|| {
                ["pairs".to_owned()]
                    .into_iter()
                    .chain(DropReason::ALL.map(|d| d.counter().to_owned()))
                    .map(|k| (k, 0))
                    .collect()
            });
            *detail.entry(counter.to_owned()).or_default() += 1;
            if drop.is_some() {
                continue;
            }
            out.rows.push(PairRow {
                prompt_id: pid.to_owned(),
                method,
                beta,
                prompt: prompt.to_vec(),
                chosen: data.responses[g.start + chosen].clone(),
                rejected: data.responses[g.start + rejected].clone(),
                chosen_index: data.sample_idx[g.start + chosen],
                rejected_index: data.sample_idx[g.start + rejected],
                score_chosen: proxy_r[chosen],
                score_rejected: proxy_r[rejected],
                margin,
            });
        }
    }
    Ok(out)
}

fn col<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef, CoreError> {
    b.column_by_name(name).ok_or_else(|| CoreError::data("selections", format!("missing column `{name}`")))
}

/// The pairs table of some rows: TRL conversational rows with an explicit prompt.
pub fn pairs_batch(rows: &[PairRow]) -> Result<RecordBatch, CoreError> {
    let chosen: Vec<Vec<Message>> = rows.iter().map(|r| vec![Message::assistant(&r.chosen)]).collect();
    let rejected: Vec<Vec<Message>> = rows.iter().map(|r| vec![Message::assistant(&r.rejected)]).collect();
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.prompt_id.as_str()))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.method.as_str()))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.beta))),
        messages_array(rows.iter().map(|r| r.prompt.as_slice())),
        messages_array(chosen.iter().map(Vec::as_slice)),
        messages_array(rejected.iter().map(Vec::as_slice)),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.chosen_index))),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.rejected_index))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.score_chosen))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.score_rejected))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.margin))),
    ];
    RecordBatch::try_new(schema::pairs_schema(), cols).map_err(|e| CoreError::data("pairs", e.to_string()))
}
