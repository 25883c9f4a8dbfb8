//! The pair stage: chosen/rejected pairs per (prompt, method, β) from a shard's selections,
//! with every drop counted by reason.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, UInt32Type};
use arrow_array::{Array, ArrayRef, Float64Array, RecordBatch, StringArray, UInt32Array};
use rbon_core::messages::messages_array;
use rbon_core::schema::{self, BETA, INDEX, METHOD, PROMPT_ID, SECOND};
use rbon_core::seed::{derive_seed, uniform_below};
use rbon_core::stage::counter;
use rbon_core::tables::SampleScores;
use rbon_core::{CoreError, Message, ShardCtx, ShardMeta, ShardWorker, Stage, StageError, StageFailure, StageName};
use rbon_regularize::stage::group_proxy;
use rbon_regularize::{Method, RegularizeError, SelectConfig, argmin};

use crate::config::{PairConfig, RejectedRule};

/// The pair stage of a pipeline: chosen/rejected pairs of every exported (method, β).
#[derive(Debug, Clone)]
pub struct PairStage {
    /// The pairing settings of the shards (with `betas: [best]`, every β: tuning needs all
    /// shards and picks among them at export).
    pub pair: PairConfig,
    pub select: SelectConfig,
    /// Seeds `rejected: random`.
    pub seed: u64,
}

impl<D> Stage<D> for PairStage {
    fn name(&self) -> StageName {
        StageName::Pairs
    }

    fn upstream(&self) -> &'static [StageName] {
        &[StageName::Prompts, StageName::Samples, StageName::Scores, StageName::Selections]
    }

    fn identity(&self, _: &rbon_core::FileDigests) -> Result<serde_json::Value, StageError> {
        Ok(serde_json::json!({ "pair": self.pair, "seed": self.seed }))
    }

    fn worker<'s>(&'s self, _: &D) -> Box<dyn ShardWorker + 's> {
        Box::new(self)
    }
}

impl ShardWorker for &PairStage {
    fn run(&mut self, ctx: &ShardCtx<'_>) -> Result<(ShardMeta, usize), StageError> {
        let data = SampleScores::read(ctx.run, ctx.shard)?;
        let prompts = rbon_core::tables::read_prompts_shard(ctx.run, ctx.shard)?;
        let selections = rbon_core::shard::read_parquet(&ctx.run.shard_path(StageName::Selections, ctx.shard))?;
        let sp = pair_shard(&self.pair, &self.select, self.seed, &prompts, &data, &selections)?;
        let meta = ShardMeta { details: sp.details, ..ctx.meta(sp.counters) };
        ctx.write(&schema::pairs_schema(), pairs_batch(&sp.rows)?, meta)
    }
}

/// Every pairing failure but the run directory's is the data's.
impl StageFailure for PairError {
    fn is_data(&self) -> bool {
        !matches!(self, Self::Core(c) if !c.is_data())
    }
}

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
            Self::SameIndex => counter::DROPPED_SAME_INDEX,
            Self::IdenticalText => counter::DROPPED_IDENTICAL_TEXT,
            Self::BelowMargin => counter::DROPPED_BELOW_MARGIN,
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
    let prompt_of: HashMap<&str, &[Message]> = prompts.iter().map(|(id, m)| (id.as_str(), m.as_slice())).collect();
    let group_of: HashMap<&str, usize> =
        data.groups.iter().enumerate().map(|(gi, g)| (data.prompt_ids[g.start].as_str(), gi)).collect();
    let mut out = ShardPairs::default();
    for key in [counter::PAIRS.to_owned()].into_iter().chain(DropReason::ALL.map(|d| d.counter().to_owned())) {
        out.counters.insert(key, 0);
    }
    let mut proxy_cache: HashMap<usize, Vec<f64>> = HashMap::new();
    for batch in selections {
        let ids = col(batch, PROMPT_ID)?.as_string::<i32>();
        let methods = col(batch, METHOD)?.as_string::<i32>();
        let betas = col(batch, BETA)?.as_primitive::<Float64Type>();
        let index = col(batch, INDEX)?.as_primitive::<UInt32Type>();
        let seconds = col(batch, SECOND)?.as_primitive::<UInt32Type>();
        for r in 0..batch.num_rows() {
            let Ok(method) = methods.value(r).parse::<Method>() else { continue };
            let beta = betas.value(r);
            if method.is_report_only() || !cfg.exports(select, method, beta, &BTreeMap::new()) || index.is_null(r) {
                continue;
            }
            let pid = ids.value(r);
            let perr = |message: String| PairError::Prompt { prompt_id: pid.to_owned(), message };
            let gi = *group_of.get(pid).ok_or_else(|| perr("selected but has no samples".into()))?;
            let g = data.groups[gi].clone();
            let prompt = *prompt_of.get(pid).ok_or_else(|| perr("selected but not in the prompts table".into()))?;
            let position = |k: u32| {
                data.sample_idx[g.clone()]
                    .iter()
                    .position(|&s| s == k)
                    .ok_or_else(|| perr(format!("selected sample {k} does not exist")))
            };
            let chosen = position(index.value(r))?;
            if let std::collections::hash_map::Entry::Vacant(e) = proxy_cache.entry(gi) {
                e.insert(group_proxy(select, data, &g).map_err(|e| perr(e.to_string()))?.0);
            }
            let proxy_r = &proxy_cache[&gi];
            let n = g.len();
            let rejected = match cfg.rejected {
                RejectedRule::Worst => argmin(proxy_r),
                RejectedRule::Random => (n >= 2).then(|| {
                    let k = uniform_below(derive_seed(seed, pid, b"pair.rejected"), n as u64 - 1) as usize;
                    if k < chosen { k } else { k + 1 }
                }),
                // The runner-up under the same objective, found by the selection stage.
                RejectedRule::Second => seconds.is_valid(r).then(|| position(seconds.value(r))).transpose()?,
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
            let kind = drop.map_or(counter::PAIRS, DropReason::counter);
            *out.counters.entry(kind.to_owned()).or_default() += 1;
            let detail = out.details.entry(key).or_insert_with(|| {
                [counter::PAIRS.to_owned()]
                    .into_iter()
                    .chain(DropReason::ALL.map(|d| d.counter().to_owned()))
                    .map(|k| (k, 0))
                    .collect()
            });
            *detail.entry(kind.to_owned()).or_default() += 1;
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
    b.column_by_name(name).ok_or_else(|| CoreError::internal(format!("selections: missing column `{name}`")))
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
    RecordBatch::try_new(schema::pairs_schema(), cols).map_err(|e| CoreError::internal(format!("pairs: {e}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! `pair_shard` against an independent re-derivation of DESIGN §1 "Pairs for DPO": chosen from
    //! the selections, rejected by rule, drops counted by reason.

    use std::collections::BTreeSet;

    use rbon_regularize::{SelectionRow, select_shard, selections_batch};

    use super::*;

    /// xorshift64*: deterministic data without dependencies.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn range(&mut self, lo: f64, hi: f64) -> f64 {
            lo + (hi - lo) * ((self.next() >> 11) as f64 / (1u64 << 53) as f64)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    const DIM: usize = 3;

    /// One prompt's candidates.
    struct G {
        pid: String,
        idx: Vec<u32>,
        text: Vec<String>,
        proxy: Vec<f64>,
        lp: Vec<f64>,
        toks: Vec<u32>,
        emb: Vec<[f32; DIM]>,
    }

    impl G {
        /// Hand-made candidates: sample_idx 0..N, log-probs 0, 1 token, distinct directions.
        fn new(pid: &str, text: &[&str], proxy: &[f64]) -> Self {
            let n = proxy.len();
            G {
                pid: pid.to_owned(),
                idx: (0..n as u32).collect(),
                text: text.iter().map(|s| (*s).to_owned()).collect(),
                proxy: proxy.to_vec(),
                lp: vec![0.0; n],
                toks: vec![1; n],
                emb: (0..n).map(|i| [1.0, i as f32, 0.5]).collect(),
            }
        }

        fn random(rng: &mut Rng, pid: &str, n: usize) -> Self {
            let mut pool: Vec<u32> = (0..(2 * n as u32 + 3)).collect();
            for i in (1..pool.len()).rev() {
                pool.swap(i, rng.below(i + 1));
            }
            let idx = pool[..n].to_vec();
            G {
                pid: pid.to_owned(),
                text: idx.iter().map(|i| format!("{pid} answer {i}")).collect(),
                idx,
                proxy: (0..n).map(|_| rng.range(-2.0, 2.0)).collect(),
                lp: (0..n).map(|_| rng.range(-80.0, -1.0)).collect(),
                toks: (0..n).map(|_| 1 + rng.below(40) as u32).collect(),
                emb: (0..n)
                    .map(|_| {
                        let s = rng.range(0.1, 10.0) as f32;
                        [
                            rng.range(0.1, 1.0) as f32 * s,
                            rng.range(-1.0, 1.0) as f32 * s,
                            rng.range(-1.0, 1.0) as f32 * s,
                        ]
                    })
                    .collect(),
            }
        }
    }

    fn scores(groups: &[G]) -> SampleScores {
        let mut d = SampleScores {
            prompt_ids: vec![],
            sample_idx: vec![],
            responses: vec![],
            reward_names: vec!["gold".into(), "proxy".into()],
            rewards: vec![vec![], vec![]],
            logprob: Some(vec![]),
            num_tokens: Some(vec![]),
            embeddings: Some((vec![], DIM)),
            groups: vec![],
        };
        for g in groups {
            let start = d.prompt_ids.len();
            for i in 0..g.proxy.len() {
                d.prompt_ids.push(g.pid.clone());
                d.sample_idx.push(g.idx[i]);
                d.responses.push(g.text[i].clone());
                // Gold is the negated proxy: were it used for pairs, every pick would change.
                d.rewards[0].push(-g.proxy[i]);
                d.rewards[1].push(g.proxy[i]);
                d.logprob.as_mut().unwrap().push(g.lp[i]);
                d.num_tokens.as_mut().unwrap().push(g.toks[i]);
                d.embeddings.as_mut().unwrap().0.extend_from_slice(&g.emb[i]);
            }
            d.groups.push(start..d.prompt_ids.len());
        }
        d
    }

    fn prompts(d: &SampleScores) -> Vec<(String, Vec<Message>)> {
        d.groups
            .iter()
            .rev() // order must not matter
            .map(|g| {
                let pid = &d.prompt_ids[g.start];
                (pid.clone(), vec![Message::new("system", "be brief"), Message::user(format!("question {pid}"))])
            })
            .collect()
    }

    fn select_cfg(methods: &[Method], betas: &[f64]) -> SelectConfig {
        SelectConfig {
            proxy: "proxy".into(),
            gold: vec!["gold".into()],
            methods: methods.to_vec(),
            betas: betas.to_vec(),
            lambdas: vec![],
            tune: None,
        }
    }

    fn pair_cfg(rejected: RejectedRule, min_margin: f64) -> PairConfig {
        PairConfig { rejected, min_margin, ..Default::default() }
    }

    /// Selections (in two batches, to cover batch boundaries) and the pairs made from them.
    fn run(cfg: &PairConfig, select: &SelectConfig, seed: u64, d: &SampleScores) -> (Vec<SelectionRow>, ShardPairs) {
        let rows = select_shard(select, d, 0).unwrap();
        let batch = selections_batch(&rows, &d.reward_names).unwrap();
        let half = batch.num_rows() / 2;
        let batches = [batch.slice(0, half), batch.slice(half, batch.num_rows() - half)];
        let out = pair_shard(cfg, select, seed, &prompts(d), d, &batches).unwrap();
        check_invariants(cfg, d, &out);
        (rows, out)
    }

    /// What must hold whatever the rule.
    fn check_invariants(cfg: &PairConfig, d: &SampleScores, out: &ShardPairs) {
        let names: BTreeSet<&str> = ["pairs"].into_iter().chain(DropReason::ALL.map(DropReason::counter)).collect();
        assert_eq!(out.counters.keys().map(String::as_str).collect::<BTreeSet<_>>(), names);
        assert_eq!(out.counters["pairs"], out.rows.len() as u64);
        for (key, detail) in &out.details {
            assert_eq!(detail.keys().map(String::as_str).collect::<BTreeSet<_>>(), names, "{key}");
            let rows = out.rows.iter().filter(|r| &export_key(r.method, r.beta) == key).count() as u64;
            assert_eq!(detail["pairs"], rows, "{key}");
        }
        for name in names {
            let sum: u64 = out.details.values().map(|c| c[name]).sum();
            assert_eq!(sum, out.counters[name], "details of {name} do not sum to the total");
        }
        for r in &out.rows {
            assert_ne!(r.chosen, r.rejected, "{r:?}");
            assert_ne!(r.chosen_index, r.rejected_index, "{r:?}");
            assert!(r.margin >= cfg.min_margin, "{r:?}");
            let g = d.groups.iter().find(|g| d.prompt_ids[g.start] == r.prompt_id).unwrap();
            let row_of = |s: u32| g.start + d.sample_idx[g.clone()].iter().position(|&x| x == s).unwrap();
            let (c, j) = (row_of(r.chosen_index), row_of(r.rejected_index));
            assert_eq!((&r.chosen, &r.rejected), (&d.responses[c], &d.responses[j]), "{r:?}");
            assert_eq!((r.score_chosen, r.score_rejected), (d.rewards[1][c], d.rewards[1][j]), "{r:?}");
            assert_eq!(r.margin, r.score_chosen - r.score_rejected, "{r:?}");
            assert_eq!(
                r.prompt,
                vec![Message::new("system", "be brief"), Message::user(format!("question {}", r.prompt_id))]
            );
        }
    }

    /// WD from f64 unit vectors, 1 − cos(e_i, e_i) = 0 on the diagonal.
    fn reference_wd(emb: &[f32]) -> Vec<f64> {
        let unit: Vec<Vec<f64>> = emb
            .chunks_exact(DIM)
            .map(|e| {
                let norm = e.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
                e.iter().map(|&x| f64::from(x) / norm).collect()
            })
            .collect();
        let n = unit.len();
        (0..n)
            .map(|i| {
                let mut total = 0.0;
                for j in (0..n).filter(|&j| j != i) {
                    total += 1.0 - unit[i].iter().zip(&unit[j]).map(|(a, b)| a * b).sum::<f64>();
                }
                total / n as f64
            })
            .collect()
    }

    fn reference_objective(method: Method, beta: f64, d: &SampleScores, g: &std::ops::Range<usize>) -> Vec<f64> {
        let wd = reference_wd(&d.embeddings.as_ref().unwrap().0[g.start * DIM..g.end * DIM]);
        (0..g.len())
            .map(|i| {
                let r = g.start + i;
                let p = d.rewards[1][r];
                match method {
                    Method::Bon => p,
                    Method::RbonKl => p + beta * d.logprob.as_ref().unwrap()[r],
                    Method::RbonWd => p - beta * wd[i],
                    Method::Mbr => -wd[i],
                    Method::RbonLen => p - beta / f64::from(d.num_tokens.as_ref().unwrap()[r]),
                    Method::SrbonKl => d.logprob.as_ref().unwrap()[r] + beta * p,
                    Method::BonUnc | Method::Oracle | Method::Random => unreachable!(),
                }
            })
            .collect()
    }

    /// Position of the best value by `better`, skipping `skip`, first position on ties.
    fn best(v: &[f64], skip: Option<usize>, better: impl Fn(f64, f64) -> bool) -> Option<usize> {
        let mut out: Option<usize> = None;
        for i in 0..v.len() {
            if Some(i) != skip && out.is_none_or(|b| better(v[i], v[b])) {
                out = Some(i);
            }
        }
        out
    }

    /// The expected output: `rejected(method, β, group, chosen position)` gives the rejected
    /// position (None: none exists, so rejected = chosen).
    fn expected(
        cfg: &PairConfig,
        d: &SampleScores,
        selections: &[SelectionRow],
        rejected: impl Fn(Method, f64, &std::ops::Range<usize>, usize) -> Option<usize>,
    ) -> ShardPairs {
        fn zero() -> BTreeMap<String, u64> {
            ["pairs", "dropped_same_index", "dropped_identical_text", "dropped_below_margin"]
                .into_iter()
                .map(|k| (k.to_owned(), 0))
                .collect()
        }
        let mut out = ShardPairs { counters: zero(), ..ShardPairs::default() };
        for s in selections {
            let Ok(method) = s.method.parse::<Method>() else { continue };
            let listed = cfg.methods.as_ref().is_none_or(|ms| ms.contains(&method));
            let beta_ok = !method.uses_beta() || cfg.betas.as_ref().is_none_or(|bs| bs.contains(&s.beta));
            if method.is_report_only() || !listed || !beta_ok {
                continue;
            }
            let g = d.groups.iter().find(|g| d.prompt_ids[g.start] == s.prompt_id).unwrap().clone();
            let c = d.sample_idx[g.clone()].iter().position(|&x| Some(x) == s.index).unwrap();
            let j = rejected(method, s.beta, &g, c).unwrap_or(c);
            let margin = d.rewards[1][g.start + c] - d.rewards[1][g.start + j];
            let counter = if j == c {
                "dropped_same_index"
            } else if d.responses[g.start + c] == d.responses[g.start + j] {
                "dropped_identical_text"
            } else if margin < cfg.min_margin {
                "dropped_below_margin"
            } else {
                "pairs"
            };
            *out.counters.get_mut(counter).unwrap() += 1;
            *out.details.entry(export_key(method, s.beta)).or_insert_with(zero).get_mut(counter).unwrap() += 1;
            if counter == "pairs" {
                out.rows.push(PairRow {
                    prompt_id: s.prompt_id.clone(),
                    method,
                    beta: s.beta,
                    prompt: vec![
                        Message::new("system", "be brief"),
                        Message::user(format!("question {}", s.prompt_id)),
                    ],
                    chosen: d.responses[g.start + c].clone(),
                    rejected: d.responses[g.start + j].clone(),
                    chosen_index: d.sample_idx[g.start + c],
                    rejected_index: d.sample_idx[g.start + j],
                    score_chosen: d.rewards[1][g.start + c],
                    score_rejected: d.rewards[1][g.start + j],
                    margin,
                });
            }
        }
        out
    }

    fn random_data(seed: u64, sizes: &[usize]) -> Vec<G> {
        let mut rng = Rng(seed);
        sizes.iter().enumerate().map(|(p, &n)| G::random(&mut rng, &format!("p{p:02}"), n)).collect()
    }

    const ALL: [Method; 5] = [Method::Bon, Method::RbonKl, Method::RbonWd, Method::Mbr, Method::RbonLen];
    const BETAS: [f64; 4] = [0.0, 0.01, 0.5, 5.0];

    #[test]
    fn export_keys() {
        assert_eq!(export_key(Method::Bon, 0.0), "bon/beta=0");
        assert_eq!(export_key(Method::RbonKl, 1.0), "rbon_kl/beta=1");
        assert_eq!(export_key(Method::RbonWd, 0.0001), "rbon_wd/beta=0.0001");
        assert_eq!(export_key(Method::RbonLen, 0.02), "rbon_len/beta=0.02");
    }

    #[test]
    fn worst_rule_is_argmin_proxy_with_ties_to_lowest() {
        let mut groups = random_data(11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 5]);
        // Minimum −1 at positions 1 and 3 (sample_idx 3 and 8): the rejected is sample 3.
        let mut tie = G::new("tie", &["a", "b", "c", "d"], &[2.0, -1.0, 0.5, -1.0]);
        tie.idx = vec![1, 3, 4, 8];
        groups.push(tie);
        let d = scores(&groups);
        let select = select_cfg(&ALL, &BETAS);
        let cfg = pair_cfg(RejectedRule::Worst, 0.0);
        let (sel, out) = run(&cfg, &select, 0, &d);
        let want = expected(&cfg, &d, &sel, |_, _, g, _| best(&d.rewards[1][g.clone()], None, |v, b| v < b));
        assert_eq!(out, want);
        let tied: Vec<_> = out.rows.iter().filter(|r| r.prompt_id == "tie").collect();
        assert!(!tied.is_empty());
        assert!(tied.iter().all(|r| r.rejected_index == 3 && r.score_rejected == -1.0), "{tied:?}");
        // Non-vacuous: pairs were made, and the pick was the worst (N = 1 or otherwise) sometimes.
        assert!(out.rows.len() > 50 && out.counters["dropped_same_index"] > 0, "{:?}", out.counters);
        assert!(out.details.len() == 1 + 3 * BETAS.len() + 1, "{:?}", out.details.keys());
    }

    #[test]
    fn second_rule_is_the_runner_up_under_the_methods_objective() {
        let d = scores(&random_data(12, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 7]));
        let select = select_cfg(&ALL, &BETAS);
        let cfg = pair_cfg(RejectedRule::Second, 0.0);
        let (sel, out) = run(&cfg, &select, 0, &d);
        let runner_up = |m: Method, beta: f64, g: &std::ops::Range<usize>, c: usize| {
            best(&reference_objective(m, beta, &d, g), Some(c), |v, b| v > b)
        };
        let want = expected(&cfg, &d, &sel, runner_up);
        // Under `second`, only N = 1 gives the same index.
        assert_eq!(out.counters["dropped_same_index"], rbon_regularize::sweep(&select).len() as u64);
        // Runner-ups under rbon_kl that are not the proxy's runner-up: the objective matters.
        let differs = out
            .rows
            .iter()
            .filter(|r| r.method == Method::RbonKl && r.beta == 5.0)
            .filter(|r| {
                let g = d.groups.iter().find(|g| d.prompt_ids[g.start] == r.prompt_id).unwrap();
                let c = d.sample_idx[g.clone()].iter().position(|&x| x == r.chosen_index).unwrap();
                let by_proxy = best(&d.rewards[1][g.clone()], Some(c), |v, b| v > b).unwrap();
                d.sample_idx[g.start + by_proxy] != r.rejected_index
            })
            .count();
        assert!(differs > 0);
        // A regularized pick can have a lower R_p than its runner-up: that margin is negative,
        // below the default min_margin of 0, and dropped as such.
        assert!(out.counters["dropped_below_margin"] > 0, "{:?}", out.counters);
        assert_eq!(out, want);
    }

    #[test]
    fn second_rule_with_tied_objectives_takes_the_lowest_other_index() {
        // Proxy 3 at positions 1, 3 and 5: BoN picks 1; the runner-up is 3, not 5.
        let g = G::new("t", &["a", "b", "c", "d", "e", "f"], &[1.0, 3.0, 2.0, 3.0, 0.5, 3.0]);
        let d = scores(&[g]);
        let (_, out) = run(&pair_cfg(RejectedRule::Second, 0.0), &select_cfg(&[Method::Bon], &[]), 0, &d);
        assert_eq!(out.rows.len(), 1);
        assert_eq!((out.rows[0].chosen_index, out.rows[0].rejected_index), (1, 3));
        assert_eq!(out.rows[0].margin, 0.0); // min_margin 0 keeps a zero margin
    }

    #[test]
    fn random_rule_is_seeded_and_never_the_pick() {
        let mut sizes = vec![8; 40];
        sizes.extend([1, 2, 1]);
        let d = scores(&random_data(13, &sizes));
        let select = select_cfg(&[Method::Bon, Method::RbonKl, Method::Mbr], &[0.1, 1.0]);
        let cfg = pair_cfg(RejectedRule::Random, f64::NEG_INFINITY);
        let (_, a) = run(&cfg, &select, 7, &d);
        let (_, again) = run(&cfg, &select, 7, &d);
        assert_eq!(a, again, "same seed, same pairs");
        // N ≥ 2 never gives the pick back; N = 1 always does (4 exported selections per prompt).
        assert_eq!(a.counters["dropped_same_index"], 2 * 4);
        assert_eq!(a.counters["pairs"], 41 * 4, "{:?}", a.counters);
        let (_, b) = run(&cfg, &select, 8, &d);
        let key = |r: &PairRow| (r.prompt_id.clone(), r.method, r.beta.to_bits());
        let of = |s: &ShardPairs| s.rows.iter().map(|r| (key(r), r.rejected_index)).collect::<BTreeMap<_, _>>();
        let (ra, rb) = (of(&a), of(&b));
        assert_eq!(ra.keys().collect::<Vec<_>>(), rb.keys().collect::<Vec<_>>());
        let differ = ra.iter().filter(|(k, v)| rb[*k] != **v).count();
        assert!(differ > ra.len() / 2, "seeds 7 and 8 differ on only {differ} of {} pairs", ra.len());
        // Spread over the N − 1 other positions, not stuck on one.
        let positions: BTreeSet<usize> = a
            .rows
            .iter()
            .filter(|r| r.method == Method::Bon)
            .map(|r| {
                let g = d.groups.iter().find(|g| d.prompt_ids[g.start] == r.prompt_id).unwrap();
                d.sample_idx[g.clone()].iter().position(|&x| x == r.rejected_index).unwrap()
            })
            .collect();
        assert!(positions.len() >= 6, "{positions:?}");
    }

    /// Hand-made drops: β = 0.01 behaves like BoN, β = 1 moves the pick of `p_text`.
    fn drop_data() -> SampleScores {
        let mut text = G::new("p_text", &["A", "A", "B"], &[2.0, 0.0, 1.0]);
        // rbon_kl: β = 0.01 → [1.95, 0, 1] picks 0 ("A" = the worst's text); β = 1 → [−3, 0, 1] picks 2.
        text.lp = vec![-5.0, 0.0, 0.0];
        scores(&[
            G::new("p_one", &["only"], &[1.0]),                   // N = 1: same index
            G::new("p_same", &["x", "y", "z"], &[1.0, 1.0, 1.0]), // all tied: pick 0 = worst 0
            text,                                                 // chosen "A" vs worst "A"
            G::new("p_margin", &["hi", "lo"], &[1.0, 0.875]),     // margin 0.125 < 0.25
            G::new("p_edge", &["hi", "lo"], &[1.25, 1.0]),        // margin 0.25 = min: kept
            G::new("p_ok", &["good", "bad"], &[3.0, 0.0]),        // kept
        ])
    }

    fn counts(pairs: u64, same: u64, text: u64, margin: u64) -> BTreeMap<String, u64> {
        BTreeMap::from([
            ("pairs".to_owned(), pairs),
            ("dropped_same_index".to_owned(), same),
            ("dropped_identical_text".to_owned(), text),
            ("dropped_below_margin".to_owned(), margin),
        ])
    }

    #[test]
    fn every_drop_reason_is_counted() {
        let d = drop_data();
        let select = select_cfg(&[Method::Bon, Method::RbonKl], &[0.01, 1.0]);
        let (_, out) = run(&pair_cfg(RejectedRule::Worst, 0.25), &select, 0, &d);
        assert_eq!(out.counters, counts(7, 6, 2, 3));
        assert_eq!(
            out.details,
            BTreeMap::from([
                ("bon/beta=0".to_owned(), counts(2, 2, 1, 1)),
                ("rbon_kl/beta=0.01".to_owned(), counts(2, 2, 1, 1)),
                ("rbon_kl/beta=1".to_owned(), counts(3, 2, 0, 1)),
            ])
        );
        let got: Vec<(&str, &str, u32, u32, &str, &str, f64)> = out
            .rows
            .iter()
            .map(|r| {
                (
                    r.prompt_id.as_str(),
                    r.method.as_str(),
                    r.chosen_index,
                    r.rejected_index,
                    r.chosen.as_str(),
                    r.rejected.as_str(),
                    r.margin,
                )
            })
            .collect();
        // Selections come prompt by prompt in table order, each in sweep order.
        assert_eq!(
            got,
            [
                ("p_text", "rbon_kl", 2, 1, "B", "A", 1.0),
                ("p_edge", "bon", 0, 1, "hi", "lo", 0.25),
                ("p_edge", "rbon_kl", 0, 1, "hi", "lo", 0.25),
                ("p_edge", "rbon_kl", 0, 1, "hi", "lo", 0.25),
                ("p_ok", "bon", 0, 1, "good", "bad", 3.0),
                ("p_ok", "rbon_kl", 0, 1, "good", "bad", 3.0),
                ("p_ok", "rbon_kl", 0, 1, "good", "bad", 3.0),
            ]
        );
        // Identical text is counted as such even when a different-text sample exists; without a
        // margin requirement the near pair is kept.
        let (_, loose) = run(&pair_cfg(RejectedRule::Worst, 0.0), &select, 0, &d);
        assert_eq!(loose.counters, counts(10, 6, 2, 0));
    }

    #[test]
    fn identical_text_is_dropped_under_every_rule() {
        // Two samples, different indices, same text: whichever rule, the pair teaches nothing.
        let d = scores(&[G::new("dup", &["same", "same"], &[1.0, 0.0])]);
        for rule in [RejectedRule::Worst, RejectedRule::Random, RejectedRule::Second] {
            let (_, out) = run(&pair_cfg(rule, 0.0), &select_cfg(&[Method::Bon], &[]), 3, &d);
            assert_eq!(out.counters, counts(0, 0, 1, 0), "{rule:?}");
            assert!(out.rows.is_empty());
        }
    }

    #[test]
    fn pair_methods_and_betas_filter_the_exports() {
        let d = scores(&random_data(14, &[4, 5, 6, 3]));
        let select = select_cfg(&[Method::Bon, Method::RbonKl, Method::Mbr, Method::RbonLen], &[0.01, 1.0]);
        let cfg = PairConfig {
            methods: Some(vec![Method::RbonKl, Method::Mbr]),
            betas: Some(vec![1.0]),
            ..pair_cfg(RejectedRule::Worst, 0.0)
        };
        let (sel, out) = run(&cfg, &select, 0, &d);
        // Methods without β export whatever pair.betas says.
        let keys: Vec<&str> = out.details.keys().map(String::as_str).collect();
        assert_eq!(keys, ["mbr/beta=0", "rbon_kl/beta=1"]);
        assert!(
            out.rows
                .iter()
                .all(|r| (r.method, r.beta) == (Method::RbonKl, 1.0) || (r.method, r.beta) == (Method::Mbr, 0.0))
        );
        let total: u64 = out.counters.values().sum();
        assert_eq!(total, 2 * d.groups.len() as u64);
        let want = expected(&cfg, &d, &sel, |_, _, g, _| best(&d.rewards[1][g.clone()], None, |v, b| v < b));
        assert_eq!(out, want);

        // Only betas: every method stays, β-methods only at the listed β.
        let cfg = PairConfig { betas: Some(vec![0.01]), ..pair_cfg(RejectedRule::Worst, 0.0) };
        let (_, out) = run(&cfg, &select, 0, &d);
        let keys: Vec<&str> = out.details.keys().map(String::as_str).collect();
        assert_eq!(keys, ["bon/beta=0", "mbr/beta=0", "rbon_kl/beta=0.01", "rbon_len/beta=0.01"]);
    }

    #[test]
    fn selections_of_unknown_prompts_or_samples_are_errors() {
        let d = scores(&random_data(15, &[3, 3]));
        let select = select_cfg(&[Method::Bon], &[]);
        let mut rows = select_shard(&select, &d, 0).unwrap();
        let batch = |rows: &[SelectionRow]| selections_batch(rows, &d.reward_names).unwrap();
        let cfg = pair_cfg(RejectedRule::Worst, 0.0);
        // A prompt missing from the prompts table.
        let only_first: Vec<_> = prompts(&d).into_iter().filter(|(id, _)| id == "p00").collect();
        let err = pair_shard(&cfg, &select, 0, &only_first, &d, &[batch(&rows)]).unwrap_err();
        assert!(matches!(&err, PairError::Prompt { prompt_id, .. } if prompt_id == "p01"), "{err}");
        // A sample index the prompt does not have.
        rows[0].index = Some(999);
        let err = pair_shard(&cfg, &select, 0, &prompts(&d), &d, &[batch(&rows)]).unwrap_err();
        assert!(err.to_string().contains("999"), "{err}");
    }
}
