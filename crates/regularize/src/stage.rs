//! The selection stage: every rule of the sweep applied to each prompt of a shard, giving
//! one selections row per (prompt, method, β).

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt32Array};
use std::ops::Range;

use rbon_core::schema::selections_schema;
use rbon_core::seed::derive_seed;
use rbon_core::stage::counter;
use rbon_core::tables::SampleScores;
use rbon_core::{CoreError, ShardCtx, ShardMeta, ShardWorker, Stage, StageError, StageFailure, StageName};

use crate::config::SelectConfig;
use crate::method::{
    Candidates, Label, Method, RegularizeError, argmax, ensemble, objectives, runner_up, sample_index, wasserstein,
};

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
    /// The runner-up's `sample_idx` under the same objective (ties to the lowest index): what
    /// `pair.rejected: second` pairs the pick with. `None` with one sample, and for `random`.
    pub second: Option<u32>,
    pub objective: f64,
    /// Every reward model's score of the pick (means for `random`), in `reward_names` order.
    pub rewards: Vec<f64>,
}

/// The selection stage of a pipeline: every (method, β) pick of every prompt.
#[derive(Debug, Clone)]
pub struct SelectStage {
    pub select: SelectConfig,
    /// Seeds the stochastic rules.
    pub seed: u64,
}

impl<D> Stage<D> for SelectStage {
    fn name(&self) -> StageName {
        StageName::Selections
    }

    fn upstream(&self) -> &'static [StageName] {
        &[StageName::Samples, StageName::Scores]
    }

    fn identity(&self, _: &rbon_core::FileDigests) -> Result<serde_json::Value, StageError> {
        Ok(serde_json::json!({ "select": self.select, "seed": self.seed }))
    }

    fn worker<'s>(&'s self, _: &D) -> Box<dyn ShardWorker + 's> {
        Box::new(self)
    }
}

impl ShardWorker for &SelectStage {
    fn run(&mut self, ctx: &ShardCtx<'_>) -> Result<(ShardMeta, usize), StageError> {
        let data = SampleScores::read(ctx.run, ctx.shard)?;
        let rows = select_shard(&self.select, &data, self.seed)?;
        let batch = selections_batch(&rows, &data.reward_names)?;
        ctx.write(&batch.schema(), batch, ctx.meta(counters(&data, &rows)))
    }
}

/// Every selection failure but the run directory's is the data's.
impl StageFailure for SelectError {
    fn is_data(&self) -> bool {
        !matches!(self, Self::Core(c) if !c.is_data())
    }
}

/// The (method, β) combinations a config sweeps, in output order. β is 0 for methods without
/// one, and λ for `bon_unc`.
pub fn sweep(cfg: &SelectConfig) -> Vec<(Method, f64)> {
    cfg.methods
        .iter()
        .filter(|m| !m.is_report_only())
        .flat_map(|&m| cfg.grid(m).into_iter().map(move |b| (m, b)))
        .collect()
}

/// A prompt's proxy reward per sample, and the ensemble's spread when the proxy is an ensemble:
/// the raw reward for one model; mean and std of the standardised rewards for several.
pub fn group_proxy(
    cfg: &SelectConfig,
    data: &SampleScores,
    g: &Range<usize>,
) -> Result<(Vec<f64>, Option<Vec<f64>>), SelectError> {
    let cols = cfg
        .proxy
        .names()
        .iter()
        .map(|n| {
            data.reward_index(n)
                .map(|i| &data.rewards[i][g.clone()])
                .ok_or_else(|| SelectError::MissingReward(n.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    match cols.as_slice() {
        [] => Err(SelectError::MissingReward(String::new())),
        [one] => Ok((one.to_vec(), None)),
        many => {
            let (mean, std) = ensemble(many);
            Ok((mean, Some(std)))
        }
    }
}

/// The uniform draw in [0, 1) behind a stochastic pick, from (seed, prompt id, method, β).
fn draw(seed: u64, prompt_id: &str, method: Method, beta: f64) -> f64 {
    let mut tag = method.as_str().as_bytes().to_vec();
    tag.extend_from_slice(&beta.to_bits().to_le_bytes());
    (derive_seed(seed, prompt_id, &tag) >> 11) as f64 / (1u64 << 53) as f64
}

/// Applies every rule of the sweep to each prompt of a shard. `seed` drives the stochastic
/// rules, per prompt and β, so picks do not depend on sharding.
pub fn select_shard(cfg: &SelectConfig, data: &SampleScores, seed: u64) -> Result<Vec<SelectionRow>, SelectError> {
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
        let (proxy, uncertainty) = group_proxy(cfg, data, g)?;
        let c = Candidates {
            proxy: &proxy,
            logprob: data.logprob.as_ref().map(|l| &l[g.clone()]),
            num_tokens: data.num_tokens.as_ref().map(|n| &n[g.clone()]),
            wd: wd.as_deref(),
            uncertainty: uncertainty.as_deref(),
        };
        let rewards_at = |i: usize| data.rewards.iter().map(|r| r[g.start + i]).collect::<Vec<_>>();
        let row =
            |method: String, beta: f64, pick: Option<(usize, Option<usize>)>, objective: f64, rewards: Vec<f64>| {
                let idx = |i: usize| data.sample_idx[g.start + i];
                SelectionRow {
                    prompt_id: pid.clone(),
                    method,
                    beta,
                    index: pick.map(|(i, _)| idx(i)),
                    second: pick.and_then(|(_, s)| s).map(idx),
                    objective,
                    rewards,
                }
            };
        for &(m, beta) in &combos {
            let obj = objectives(m, beta, &c).map_err(err)?;
            let i = if m.is_stochastic() { sample_index(&obj, draw(seed, pid, m, beta)) } else { argmax(&obj) };
            let i = i.ok_or_else(|| err(RegularizeError::NoCandidates))?;
            let second = runner_up(&obj, i);
            out.push(row(Label::Rule(m).to_string(), beta, Some((i, second)), obj[i], rewards_at(i)));
        }
        for &(name, gi) in &gold {
            let values = &data.rewards[gi][g.clone()];
            let i = argmax(values).ok_or_else(|| err(RegularizeError::NoCandidates))?;
            let pick = Some((i, runner_up(values, i)));
            out.push(row(Label::oracle(name).to_string(), 0.0, pick, values[i], rewards_at(i)));
        }
        // The random baseline: the expected rewards of a uniformly random pick.
        let n = g.len() as f64;
        let means: Vec<f64> = data.rewards.iter().map(|r| r[g.clone()].iter().sum::<f64>() / n).collect();
        // Its objective is the expected reward of a random pick: under the first gold model, or
        // (with no gold) under the first proxy model's raw reward.
        let first =
            gold.first().map(|&(_, gi)| gi).or_else(|| cfg.proxy.names().first().and_then(|p| data.reward_index(p)));
        let objective = first.map_or(0.0, |i| means[i]);
        out.push(row(Label::Random.to_string(), 0.0, None, objective, means));
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
        Arc::new(UInt32Array::from_iter(rows.iter().map(|r| r.second))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.objective))),
    ];
    for i in 0..reward_names.len() {
        cols.push(Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.rewards[i]))));
    }
    RecordBatch::try_new(selections_schema(reward_names), cols)
        .map_err(|e| SelectError::Core(CoreError::internal(format!("selections: {e}"))))
}

/// Counters a selection shard reports.
pub fn counters(data: &SampleScores, rows: &[SelectionRow]) -> BTreeMap<String, u64> {
    BTreeMap::from([
        (counter::PROMPTS.to_owned(), data.groups.len() as u64),
        (counter::SELECTIONS.to_owned(), rows.len() as u64),
    ])
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::needless_range_loop)] // the reference is deliberately plain loops
mod tests {
    //! The stage against an independent re-derivation of DESIGN §1: every objective, WD, argmax
    //! and baseline below is recomputed with plain loops, never with `crate::method`.

    use std::ops::Range;

    use super::*;

    const TOL: f64 = 1e-9;

    /// xorshift64*: a tiny deterministic generator so the data needs no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        /// Uniform in [0, 1).
        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
        fn range(&mut self, lo: f64, hi: f64) -> f64 {
            lo + (hi - lo) * self.unit()
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    const NAMES: [&str; 3] = ["gold_a", "proxy", "gold_b"];

    /// One prompt's rows, appended to `d`.
    struct Group {
        sample_idx: Vec<u32>,
        rewards: [Vec<f64>; 3],
        logprob: Vec<f64>,
        num_tokens: Vec<u32>,
        embeddings: Vec<[f32; 5]>,
    }

    fn empty_scores() -> SampleScores {
        SampleScores {
            prompt_ids: vec![],
            sample_idx: vec![],
            responses: vec![],
            reward_names: NAMES.iter().map(|s| (*s).to_owned()).collect(),
            rewards: vec![vec![]; 3],
            logprob: Some(vec![]),
            num_tokens: Some(vec![]),
            embeddings: Some((vec![], 5)),
            groups: vec![],
        }
    }

    fn push(d: &mut SampleScores, pid: &str, g: &Group) {
        let start = d.prompt_ids.len();
        let n = g.sample_idx.len();
        for i in 0..n {
            d.prompt_ids.push(pid.to_owned());
            d.sample_idx.push(g.sample_idx[i]);
            d.responses.push(format!("{pid} response {}", g.sample_idx[i]));
            for k in 0..3 {
                d.rewards[k].push(g.rewards[k][i]);
            }
            d.logprob.as_mut().unwrap().push(g.logprob[i]);
            d.num_tokens.as_mut().unwrap().push(g.num_tokens[i]);
            d.embeddings.as_mut().unwrap().0.extend_from_slice(&g.embeddings[i]);
        }
        d.groups.push(start..start + n);
    }

    fn random_group(rng: &mut Rng, n: usize) -> Group {
        // N distinct sample indices, shuffled: positions and sample_idx disagree.
        let mut pool: Vec<u32> = (0..(2 * n as u32 + 3)).collect();
        for i in (1..pool.len()).rev() {
            pool.swap(i, rng.below(i + 1));
        }
        let mut embeddings = Vec::new();
        for _ in 0..n {
            let scale = rng.range(0.05, 20.0) as f32;
            let mut e = [0f32; 5];
            for x in &mut e {
                *x = rng.range(-1.0, 1.0) as f32 * scale;
            }
            e[0] += 0.01 * scale; // never the zero vector
            embeddings.push(e);
        }
        Group {
            sample_idx: pool[..n].to_vec(),
            rewards: std::array::from_fn(|_| (0..n).map(|_| rng.range(-3.0, 3.0)).collect()),
            logprob: (0..n).map(|_| rng.range(-200.0, -1.0)).collect(),
            num_tokens: (0..n).map(|_| 1 + rng.below(60) as u32).collect(),
            embeddings,
        }
    }

    /// N = 6 with exact ties (dyadic values, axis-aligned embeddings scaled by powers of two so
    /// that every cosine is exactly 0 or 1).
    fn tie_group() -> Group {
        let axis = |k: usize, s: f32| {
            let mut e = [0f32; 5];
            e[k] = s;
            e
        };
        Group {
            // Increasing but not contiguous, so "lowest index" is unambiguous.
            sample_idx: vec![2, 5, 6, 11, 13, 20],
            rewards: [
                vec![0.25, -1.0, 1.0, 0.0, 1.0, 1.0], // gold_a: max at 2, 4, 5 → 2
                vec![1.0, 3.0, 2.0, 3.0, 0.5, 3.0],   // proxy: max at 1, 3, 5 → 1
                vec![5.0, 5.0, 0.0, 0.0, 0.0, 5.0],   // gold_b: max at 0, 1, 5 → 0
            ],
            // rbon_kl, β = 0.5: [0, 0, 1, 1, 0, −1] → 2.
            logprob: vec![-2.0, -6.0, -2.0, -4.0, -1.0, -8.0],
            // rbon_len, β = 1: [0.5, 2, 1.5, 2.75, −0.5, 2.75] → 3.
            num_tokens: vec![2, 1, 2, 4, 1, 4],
            // Directions e0, e1, e0, e1, e2, e0: WD = [3, 4, 3, 4, 5, 3] / 6; mbr → 0.
            embeddings: vec![axis(0, 2.0), axis(1, 0.5), axis(0, 4.0), axis(1, 2.0), axis(2, 8.0), axis(0, 0.25)],
        }
    }

    /// WD_i = (1/N) Σ_j (1 − cos(e_i, e_j)) over all j, from unit vectors in f64. The diagonal
    /// term is 1 − cos(e_i, e_i) = 0 exactly.
    fn reference_wd(emb: &[f32], n: usize, dim: usize) -> Vec<f64> {
        let mut unit = vec![vec![0f64; dim]; n];
        for i in 0..n {
            let mut sq = 0.0;
            for k in 0..dim {
                sq += f64::from(emb[i * dim + k]) * f64::from(emb[i * dim + k]);
            }
            let norm = sq.sqrt();
            for k in 0..dim {
                unit[i][k] = f64::from(emb[i * dim + k]) / norm;
            }
        }
        let mut wd = vec![0f64; n];
        for i in 0..n {
            let mut total = 0.0;
            for j in 0..n {
                if i == j {
                    continue;
                }
                let mut dot = 0.0;
                for k in 0..dim {
                    dot += unit[i][k] * unit[j][k];
                }
                total += 1.0 - dot;
            }
            wd[i] = total / n as f64;
        }
        wd
    }

    /// (position, value) of the maximum, first position on ties.
    fn reference_argmax(v: &[f64]) -> (usize, f64) {
        let mut best = 0;
        for i in 1..v.len() {
            if v[i] > v[best] {
                best = i;
            }
        }
        (best, v[best])
    }

    fn reference_objective(method: &str, beta: f64, d: &SampleScores, g: &Range<usize>, wd: &[f64]) -> Vec<f64> {
        let proxy = &d.rewards[1];
        let lp = d.logprob.as_ref().unwrap();
        let toks = d.num_tokens.as_ref().unwrap();
        (0..g.len())
            .map(|i| {
                let r = g.start + i;
                match method {
                    "bon" => proxy[r],
                    "rbon_kl" => proxy[r] + beta * lp[r],
                    "rbon_wd" => proxy[r] - beta * wd[i],
                    "mbr" => -wd[i],
                    "rbon_len" => proxy[r] - beta / f64::from(toks[r]),
                    other => panic!("no objective for {other}"),
                }
            })
            .collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= TOL * (1.0 + b.abs())
    }

    fn config(methods: &[Method], betas: &[f64], gold: &[&str]) -> SelectConfig {
        SelectConfig {
            proxy: "proxy".into(),
            gold: gold.iter().map(|s| (*s).to_owned()).collect(),
            methods: methods.to_vec(),
            betas: betas.to_vec(),
            lambdas: vec![],
            tune: None,
        }
    }

    /// Random prompts with N = 1..=9 (every N at least once) plus the tie prompt.
    fn test_data() -> SampleScores {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut d = empty_scores();
        for (p, n) in [1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 9, 2, 8].into_iter().enumerate() {
            push(&mut d, &format!("p{p:02}"), &random_group(&mut rng, n));
        }
        push(&mut d, "ties", &tie_group());
        d
    }

    /// Every row of `select_shard` against the independent computation. Returns, per method,
    /// how many picks were decided by an exact tie (first position kept).
    fn check_against_reference(cfg: &SelectConfig, d: &SampleScores) -> BTreeMap<String, usize> {
        let rows = select_shard(cfg, d, 0).unwrap();
        // Expected (method, β) order, built from the config rather than from `sweep`.
        let mut combos: Vec<(String, f64)> = Vec::new();
        for m in &cfg.methods {
            match m.as_str() {
                "bon" | "mbr" => combos.push((m.as_str().to_owned(), 0.0)),
                s => combos.extend(cfg.betas.iter().map(|&b| (s.to_owned(), b))),
            }
        }
        let swept: Vec<(String, f64)> = sweep(cfg).into_iter().map(|(m, b)| (m.as_str().to_owned(), b)).collect();
        assert_eq!(swept, combos);
        let per_prompt = combos.len() + cfg.gold.len() + 1;
        assert_eq!(rows.len(), d.groups.len() * per_prompt);

        let mut ties = BTreeMap::new();
        let mut idx_differs_from_position = 0;
        for (gi, g) in d.groups.iter().enumerate() {
            let n = g.len();
            let pid = &d.prompt_ids[g.start];
            let (emb, dim) = d.embeddings.as_ref().unwrap();
            let wd = reference_wd(&emb[g.start * dim..g.end * dim], n, *dim);
            let got = &rows[gi * per_prompt..(gi + 1) * per_prompt];
            let rewards_at = |i: usize| (0..3).map(|k| d.rewards[k][g.start + i]).collect::<Vec<_>>();
            let mut expect: Vec<(String, f64, Option<usize>, Vec<f64>)> = Vec::new();
            for (m, beta) in &combos {
                let obj = reference_objective(m, *beta, d, g, &wd);
                let (i, _) = reference_argmax(&obj);
                expect.push((m.clone(), *beta, Some(i), obj));
            }
            for gold in &cfg.gold {
                let k = NAMES.iter().position(|n| n == gold).unwrap();
                let obj = d.rewards[k][g.clone()].to_vec();
                let (i, _) = reference_argmax(&obj);
                expect.push((format!("oracle:{gold}"), 0.0, Some(i), obj));
            }
            for (row, (method, beta, pos, obj)) in got.iter().zip(&expect) {
                let ctx = format!("{pid} {method} β={beta}: {row:?}");
                assert_eq!(&row.prompt_id, pid, "{ctx}");
                assert_eq!(&row.method, method, "{ctx}");
                assert_eq!(row.beta.to_bits(), beta.to_bits(), "{ctx}");
                let i = pos.unwrap();
                assert_eq!(row.index, Some(d.sample_idx[g.start + i]), "{ctx}, expected position {i} of {obj:?}");
                assert!(close(row.objective, obj[i]), "{ctx}, expected objective {}", obj[i]);
                assert_eq!(row.rewards, rewards_at(i), "{ctx}");
                if d.sample_idx[g.start + i] as usize != i {
                    idx_differs_from_position += 1;
                }
                if obj.iter().filter(|&&v| v == obj[i]).count() > 1 {
                    *ties.entry(method.clone()).or_insert(0) += 1;
                }
            }
            // Random: mean of every reward; objective = first gold's mean, else the proxy's.
            let last = &got[per_prompt - 1];
            assert_eq!(
                (last.prompt_id.as_str(), last.method.as_str(), last.beta, last.index),
                (pid.as_str(), "random", 0.0, None)
            );
            let means: Vec<f64> = (0..3).map(|k| d.rewards[k][g.clone()].iter().sum::<f64>() / n as f64).collect();
            assert_eq!(last.rewards.len(), 3);
            for (a, b) in last.rewards.iter().zip(&means) {
                assert!(close(*a, *b), "{pid} random: {:?} vs {means:?}", last.rewards);
            }
            let k = cfg.gold.first().map_or(1, |gold| NAMES.iter().position(|n| n == gold).unwrap());
            assert!(close(last.objective, means[k]), "{pid} random objective {} vs {}", last.objective, means[k]);
        }
        assert!(idx_differs_from_position > 0, "the data must tell sample_idx from position");
        ties
    }

    #[test]
    fn selections_match_design_formulas_on_random_data() {
        let d = test_data();
        // Config order, not declaration order; gold order differs from the table's reward order.
        let cfg = config(
            &[Method::RbonLen, Method::Mbr, Method::RbonKl, Method::Bon, Method::RbonWd],
            &[0.0, 1e-3, 0.05, 0.5, 1.0, 2.0, 100.0],
            &["gold_b", "gold_a"],
        );
        let ties = check_against_reference(&cfg, &d);
        // The tie prompt really exercises the lowest-index rule for each kind of objective.
        for m in ["bon", "rbon_kl", "rbon_wd", "mbr", "rbon_len", "oracle:gold_a", "oracle:gold_b"] {
            assert!(ties.get(m).copied().unwrap_or(0) > 0, "no tie for {m}: {ties:?}");
        }

        // And by hand, on the tie prompt.
        let rows = select_shard(&cfg, &d, 0).unwrap();
        let pick = |m: &str, b: f64| {
            rows.iter().find(|r| r.prompt_id == "ties" && r.method == m && r.beta == b).unwrap().index.unwrap()
        };
        assert_eq!(pick("bon", 0.0), 5); // positions 1, 3, 5 tie
        assert_eq!(pick("rbon_kl", 0.5), 6); // positions 2, 3 tie
        assert_eq!(pick("rbon_kl", 0.0), 5); // β = 0 is BoN
        assert_eq!(pick("rbon_len", 1.0), 11); // positions 3, 5 tie
        assert_eq!(pick("mbr", 0.0), 2); // positions 0, 2, 5 tie
        assert_eq!(pick("rbon_wd", 0.0), 5);
        assert_eq!(pick("oracle:gold_a", 0.0), 6); // positions 2, 4, 5 tie
        assert_eq!(pick("oracle:gold_b", 0.0), 2); // positions 0, 1, 5 tie
        let mbr = rows.iter().find(|r| r.prompt_id == "ties" && r.method == "mbr").unwrap();
        assert!((mbr.objective + 0.5).abs() < 1e-15, "{mbr:?}");
    }

    #[test]
    fn without_gold_random_reports_the_proxy_mean_and_no_oracle() {
        let d = test_data();
        let cfg = config(&[Method::Bon, Method::RbonKl], &[0.01, 1.0], &[]);
        check_against_reference(&cfg, &d);
        let rows = select_shard(&cfg, &d, 0).unwrap();
        assert!(rows.iter().all(|r| !r.method.starts_with("oracle")));
        assert_eq!(rows.iter().filter(|r| r.method == "random").count(), d.groups.len());
    }

    #[test]
    fn report_only_methods_in_the_config_are_not_swept_twice() {
        let cfg = config(&[Method::Bon, Method::Oracle, Method::Random, Method::Mbr], &[0.1], &["gold_a"]);
        assert_eq!(sweep(&cfg), vec![(Method::Bon, 0.0), (Method::Mbr, 0.0)]);
        let rows = select_shard(&cfg, &test_data(), 0).unwrap();
        let first: Vec<&str> = rows.iter().take(4).map(|r| r.method.as_str()).collect();
        assert_eq!(first, ["bon", "mbr", "oracle:gold_a", "random"]);
    }

    #[test]
    fn embeddings_are_only_needed_by_wd_methods() {
        let mut d = test_data();
        d.embeddings = None;
        let cfg = config(&[Method::Bon, Method::RbonKl, Method::RbonLen], &[0.1], &["gold_a"]);
        assert_eq!(select_shard(&cfg, &d, 0).unwrap().len(), d.groups.len() * 5);
        for m in [Method::RbonWd, Method::Mbr] {
            let err = select_shard(&config(&[Method::Bon, m], &[0.1], &[]), &d, 0).unwrap_err();
            assert!(
                matches!(&err, SelectError::Prompt { prompt_id, source: RegularizeError::MissingEmbedding } if prompt_id == "p00"),
                "{err:?}"
            );
        }
    }

    #[test]
    fn missing_reward_columns_are_named() {
        let d = test_data();
        let mut cfg = config(&[Method::Bon], &[], &[]);
        cfg.proxy = "nope".into();
        assert!(matches!(select_shard(&cfg, &d, 0), Err(SelectError::MissingReward(n)) if n == "nope"));
        let cfg = config(&[Method::Bon], &[], &["gold_a", "gold_c"]);
        assert!(matches!(select_shard(&cfg, &d, 0), Err(SelectError::MissingReward(n)) if n == "gold_c"));
    }

    #[test]
    fn selections_batch_round_trips_rows() {
        use arrow_array::Array;
        use arrow_array::cast::AsArray;
        use arrow_array::types::{Float64Type, UInt32Type};
        let d = test_data();
        let cfg = config(&[Method::Bon, Method::RbonWd], &[0.5], &["gold_a"]);
        let rows = select_shard(&cfg, &d, 0).unwrap();
        let b = selections_batch(&rows, &d.reward_names).unwrap();
        assert_eq!(b.num_rows(), rows.len());
        let index = b.column_by_name("index").unwrap().as_primitive::<UInt32Type>();
        let proxy = b.column_by_name("reward_proxy").unwrap().as_primitive::<Float64Type>();
        let methods = b.column_by_name("method").unwrap().as_string::<i32>();
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(methods.value(i), r.method);
            assert_eq!(index.is_null(i), r.index.is_none());
            if let Some(x) = r.index {
                assert_eq!(index.value(i), x);
            }
            assert_eq!(proxy.value(i), r.rewards[1]);
        }
    }
}
