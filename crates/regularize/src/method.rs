//! Selection rules over one prompt's N candidates (DESIGN §1). Everything is computed in f64 and
//! ties go to the lowest index, as in the paper's official code.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A selection rule (serde: snake_case names "bon", "rbon_kl", "rbon_wd", "mbr", "rbon_len",
/// "bon_unc", "srbon_kl", "oracle", "random").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// argmax R_p.
    Bon,
    /// argmax R_p + β·log π_ref.
    RbonKl,
    /// argmax R_p − β·WD (MBR-BoN).
    RbonWd,
    /// argmax −WD (minimum Bayes risk).
    Mbr,
    /// argmax R_p − β/|y| (Ichihara et al. 2025).
    RbonLen,
    /// argmax mean_m z_m − λ·std_m z_m over an ensemble of proxy reward models, z_m each model's
    /// rewards standardised over the N samples (Yang et al. 2024, uncertainty-penalised BoN).
    BonUnc,
    /// A draw from p_i ∝ exp(ℓ_i + β·R_p): stochastic RBoN_KL (Ichihara et al. 2025).
    SrbonKl,
    /// argmax of the gold reward; report only.
    Oracle,
    /// Mean gold reward over the N candidates; report only.
    Random,
}

impl Method {
    /// Every method, in declaration order.
    pub const ALL: [Method; 9] = [
        Method::Bon,
        Method::RbonKl,
        Method::RbonWd,
        Method::Mbr,
        Method::RbonLen,
        Method::BonUnc,
        Method::SrbonKl,
        Method::Oracle,
        Method::Random,
    ];

    /// The methods users select with and export pairs for.
    pub const SELECTION: [Method; 7] =
        [Method::Bon, Method::RbonKl, Method::RbonWd, Method::Mbr, Method::RbonLen, Method::BonUnc, Method::SrbonKl];

    /// The RBoN paper's methods, selected when a config names none.
    pub const PAPER: [Method; 5] = [Method::Bon, Method::RbonKl, Method::RbonWd, Method::Mbr, Method::RbonLen];

    /// The snake_case name, as in configs and file paths.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Bon => "bon",
            Method::RbonKl => "rbon_kl",
            Method::RbonWd => "rbon_wd",
            Method::Mbr => "mbr",
            Method::RbonLen => "rbon_len",
            Method::BonUnc => "bon_unc",
            Method::SrbonKl => "srbon_kl",
            Method::Oracle => "oracle",
            Method::Random => "random",
        }
    }

    /// Whether the objective depends on β (so a β sweep gives distinct selections). For
    /// `bon_unc` the swept value is λ, taken from `select.lambdas`.
    pub fn uses_beta(self) -> bool {
        matches!(self, Method::RbonKl | Method::RbonWd | Method::RbonLen | Method::BonUnc | Method::SrbonKl)
    }

    /// Whether `Candidates::logprob` is required.
    pub fn needs_logprob(self) -> bool {
        matches!(self, Method::RbonKl | Method::SrbonKl)
    }

    /// Whether an ensemble of proxy reward models (hence `Candidates::uncertainty`) is required.
    pub fn needs_ensemble(self) -> bool {
        matches!(self, Method::BonUnc)
    }

    /// Whether the pick is drawn at random (seeded) from the objective instead of its argmax.
    pub fn is_stochastic(self) -> bool {
        matches!(self, Method::SrbonKl)
    }

    /// Whether embeddings (hence `Candidates::wd`) are required.
    pub fn needs_embedding(self) -> bool {
        matches!(self, Method::RbonWd | Method::Mbr)
    }

    /// Whether `Candidates::num_tokens` is required.
    pub fn needs_num_tokens(self) -> bool {
        matches!(self, Method::RbonLen)
    }

    /// Whether the method needs gold rewards and is only reported, never exported as pairs.
    pub fn is_report_only(self) -> bool {
        matches!(self, Method::Oracle | Method::Random)
    }
}

impl Method {
    /// What the method picks at β, as dataset cards state it (empty for the baselines).
    pub fn rule(self, beta: f64) -> String {
        match self {
            Method::Bon => "argmax of R_p(x, y)".to_owned(),
            Method::RbonKl => format!("argmax of R_p(x, y) + {beta} · log π_ref(y | x)"),
            Method::RbonWd => format!("argmax of R_p(x, y) − {beta} · WD(y)"),
            Method::Mbr => "argmax of − WD(y)".to_owned(),
            Method::RbonLen => format!("argmax of R_p(x, y) − {beta} / |y|"),
            Method::BonUnc => format!("argmax of mean_m z_m(y) − {beta} · std_m z_m(y) over the proxy ensemble"),
            Method::SrbonKl => format!("a seeded draw from p(y) ∝ π_ref(y | x) · exp({beta} · R_p(x, y))"),
            Method::Oracle | Method::Random => String::new(),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown method name was given to [`Method::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown method `{name}` (expected one of: bon, rbon_kl, rbon_wd, mbr, rbon_len, bon_unc, srbon_kl, oracle, random)"
)]
pub struct ParseMethodError {
    /// The name that did not match.
    pub name: String,
}

impl FromStr for Method {
    type Err = ParseMethodError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Method::ALL.into_iter().find(|m| m.as_str() == s).ok_or_else(|| ParseMethodError { name: s.to_owned() })
    }
}

/// What a selections row's `method` column holds: a selection rule, the oracle of one gold
/// reward (`oracle:<gold>`), or the `random` baseline. Built and parsed only here.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Label {
    Rule(Method),
    Oracle(String),
    Random,
}

impl Label {
    /// The oracle of gold reward `gold`.
    pub fn oracle(gold: &str) -> Self {
        Self::Oracle(gold.to_owned())
    }

    /// Whether the row is a report-only baseline (an oracle or random), not a rule's pick.
    pub fn is_baseline(&self) -> bool {
        !matches!(self, Self::Rule(_))
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rule(m) => f.write_str(m.as_str()),
            Self::Oracle(gold) => write!(f, "{}:{gold}", Method::Oracle.as_str()),
            Self::Random => f.write_str(Method::Random.as_str()),
        }
    }
}

impl FromStr for Label {
    type Err = ParseMethodError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(gold) = s.strip_prefix(Method::Oracle.as_str()).and_then(|r| r.strip_prefix(':')) {
            return Ok(Self::Oracle(gold.to_owned()));
        }
        match s.parse::<Method>()? {
            Method::Random => Ok(Self::Random),
            Method::Oracle => Err(ParseMethodError { name: s.to_owned() }),
            m => Ok(Self::Rule(m)),
        }
    }
}

/// One prompt's N candidates, index i = sample i (0..N).
#[derive(Debug, Clone, Copy)]
pub struct Candidates<'a> {
    /// R_p(x, y_i).
    pub proxy: &'a [f64],
    /// ℓ_i = log π_ref(y_i | x).
    pub logprob: Option<&'a [f64]>,
    /// |y_i| in tokens.
    pub num_tokens: Option<&'a [u32]>,
    /// WD_i, precomputed by [`wasserstein`].
    pub wd: Option<&'a [f64]>,
    /// std_m z_m(y_i) across an ensemble of proxy reward models, from [`ensemble`].
    pub uncertainty: Option<&'a [f64]>,
}

impl<'a> Candidates<'a> {
    /// Candidates with proxy rewards only; set the other fields as the method needs.
    pub fn new(proxy: &'a [f64]) -> Self {
        Candidates { proxy, logprob: None, num_tokens: None, wd: None, uncertainty: None }
    }

    /// N.
    pub fn len(&self) -> usize {
        self.proxy.len()
    }

    /// Whether N = 0.
    pub fn is_empty(&self) -> bool {
        self.proxy.is_empty()
    }
}

/// Why a selection or WD computation was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum RegularizeError {
    #[error("no candidates (N = 0)")]
    NoCandidates,
    #[error("rbon_kl needs reference log-probs, but none were given")]
    MissingLogprob,
    #[error("rbon_wd and mbr need embeddings (WD values), but none were given")]
    MissingEmbedding,
    #[error("rbon_len needs response token counts, but none were given")]
    MissingNumTokens,
    #[error("bon_unc needs an ensemble of proxy reward models, but only one was given")]
    MissingEnsemble,
    #[error("{what} has {got} values, expected {expected} (one per candidate)")]
    LengthMismatch { what: &'static str, expected: usize, got: usize },
    #[error("candidate {index} has 0 tokens; rbon_len divides by the length")]
    ZeroTokens { index: usize },
    #[error("embedding of candidate {index} is the zero vector and has no direction")]
    ZeroEmbedding { index: usize },
    #[error("embedding dimension must be at least 1")]
    ZeroDimension,
    #[error("embedding of candidate {index} has {got} dimensions, expected {expected}")]
    DimensionMismatch { index: usize, expected: usize, got: usize },
    #[error("{what} of candidate {index} is not finite")]
    NonFinite { what: &'static str, index: usize },
    #[error("beta must be finite and >= 0, got {beta}")]
    InvalidBeta { beta: f64 },
    #[error("`{method}` is report-only: it is computed from gold rewards, not selected here")]
    ReportOnly { method: Method },
}

/// WD_i = (1/N) Σ_j (1 − cos(e_i, e_j)), j over all N incl. i, from row-major embeddings
/// (N rows of `dim` f32). Rows are L2-normalised in f64 first; a zero or non-finite row is an
/// error naming its index.
pub fn wasserstein(embeddings: &[f32], dim: usize) -> Result<Vec<f64>, RegularizeError> {
    if dim == 0 {
        return Err(RegularizeError::ZeroDimension);
    }
    let rem = embeddings.len() % dim;
    if rem != 0 {
        return Err(RegularizeError::DimensionMismatch { index: embeddings.len() / dim, expected: dim, got: rem });
    }
    let rows: Vec<&[f32]> = embeddings.chunks_exact(dim).collect();
    wasserstein_rows(&rows)
}

/// [`wasserstein`] over separately stored rows, which must all have the first row's length.
pub fn wasserstein_rows<R: AsRef<[f32]>>(rows: &[R]) -> Result<Vec<f64>, RegularizeError> {
    let n = rows.len();
    let Some(first) = rows.first() else {
        return Err(RegularizeError::NoCandidates);
    };
    let dim = first.as_ref().len();
    if dim == 0 {
        return Err(RegularizeError::ZeroDimension);
    }
    let mut unit = Vec::with_capacity(n * dim);
    for (index, row) in rows.iter().enumerate() {
        let row = row.as_ref();
        if row.len() != dim {
            return Err(RegularizeError::DimensionMismatch { index, expected: dim, got: row.len() });
        }
        if row.iter().any(|x| !x.is_finite()) {
            return Err(RegularizeError::NonFinite { what: "embedding", index });
        }
        let norm = row.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
        if norm == 0.0 || !norm.is_finite() {
            return Err(RegularizeError::ZeroEmbedding { index });
        }
        unit.extend(row.iter().map(|&x| f64::from(x) / norm));
    }

    // C is symmetric with a zero diagonal: fill the upper triangle once and add to both rows.
    // The diagonal is exactly 0 rather than 1 − |u|², so rounding cannot make WD depend on scale.
    let mut sums = vec![0.0f64; n];
    for i in 0..n {
        let ui = &unit[i * dim..(i + 1) * dim];
        for j in i + 1..n {
            let uj = &unit[j * dim..(j + 1) * dim];
            let cos: f64 = ui.iter().zip(uj).map(|(a, b)| a * b).sum();
            // Rounding can push |cos| a hair past 1; keep C in its exact range [0, 2].
            let cost = 1.0 - cos.clamp(-1.0, 1.0);
            sums[i] += cost;
            sums[j] += cost;
        }
    }
    let n_f = n as f64;
    Ok(sums.into_iter().map(|s| s / n_f).collect())
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), RegularizeError> {
    if got == expected { Ok(()) } else { Err(RegularizeError::LengthMismatch { what, expected, got }) }
}

fn check_finite(what: &'static str, values: &[f64]) -> Result<(), RegularizeError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(RegularizeError::NonFinite { what, index }),
        None => Ok(()),
    }
}

fn require<T>(value: Option<T>, missing: RegularizeError) -> Result<T, RegularizeError> {
    value.ok_or(missing)
}

/// Objective values of `method` at `beta` for every candidate:
/// bon: R_p; rbon_kl: R_p + β·ℓ; rbon_wd: R_p − β·WD; mbr: −WD; rbon_len: R_p − β/|y|;
/// bon_unc: R_p − λ·U (R_p the ensemble mean, U its spread); srbon_kl: ℓ + β·R_p (logits).
/// Every present input must have N values; inputs the method uses must be finite. `beta` is
/// ignored by bon and mbr. Oracle and Random need gold rewards and are refused.
pub fn objectives(method: Method, beta: f64, c: &Candidates) -> Result<Vec<f64>, RegularizeError> {
    if method.is_report_only() {
        return Err(RegularizeError::ReportOnly { method });
    }
    let n = c.proxy.len();
    if n == 0 {
        return Err(RegularizeError::NoCandidates);
    }
    if let Some(l) = c.logprob {
        check_len("logprob", n, l.len())?;
    }
    if let Some(t) = c.num_tokens {
        check_len("num_tokens", n, t.len())?;
    }
    if let Some(w) = c.wd {
        check_len("wd", n, w.len())?;
    }
    if let Some(u) = c.uncertainty {
        check_len("uncertainty", n, u.len())?;
    }
    if method.uses_beta() && !(beta.is_finite() && beta >= 0.0) {
        return Err(RegularizeError::InvalidBeta { beta });
    }
    if method != Method::Mbr {
        check_finite("proxy reward", c.proxy)?;
    }

    let values: Vec<f64> = match method {
        Method::Bon => c.proxy.to_vec(),
        Method::RbonKl => {
            let l = require(c.logprob, RegularizeError::MissingLogprob)?;
            check_finite("logprob", l)?;
            c.proxy.iter().zip(l).map(|(r, l)| r + beta * l).collect()
        }
        Method::RbonWd => {
            let w = require(c.wd, RegularizeError::MissingEmbedding)?;
            check_finite("wd", w)?;
            c.proxy.iter().zip(w).map(|(r, w)| r - beta * w).collect()
        }
        Method::Mbr => {
            let w = require(c.wd, RegularizeError::MissingEmbedding)?;
            check_finite("wd", w)?;
            w.iter().map(|w| -w).collect()
        }
        Method::RbonLen => {
            let t = require(c.num_tokens, RegularizeError::MissingNumTokens)?;
            if let Some(index) = t.iter().position(|&t| t == 0) {
                return Err(RegularizeError::ZeroTokens { index });
            }
            c.proxy.iter().zip(t).map(|(r, &t)| r - beta / f64::from(t)).collect()
        }
        Method::BonUnc => {
            let u = require(c.uncertainty, RegularizeError::MissingEnsemble)?;
            check_finite("uncertainty", u)?;
            c.proxy.iter().zip(u).map(|(r, u)| r - beta * u).collect()
        }
        // The logits of the sampling distribution p_i ∝ π_ref(y_i) exp(β R_p(y_i)).
        Method::SrbonKl => {
            let l = require(c.logprob, RegularizeError::MissingLogprob)?;
            check_finite("logprob", l)?;
            c.proxy.iter().zip(l).map(|(r, l)| l + beta * r).collect()
        }
        Method::Oracle | Method::Random => return Err(RegularizeError::ReportOnly { method }),
    };
    // A huge β times a finite input can still overflow; a NaN/inf objective must not be selected.
    check_finite("objective", &values)?;
    Ok(values)
}

/// Index of the best value under `better`, skipping `skip`; ties keep the lowest index.
fn best_by(values: &[f64], skip: Option<usize>, better: impl Fn(f64, f64) -> bool) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &v) in values.iter().enumerate() {
        if Some(i) == skip {
            continue;
        }
        match best {
            Some(b) if !better(v, values[b]) => {}
            _ => best = Some(i),
        }
    }
    best
}

/// Index of the maximum, ties to the lowest index; None if empty. Values are assumed finite.
pub fn argmax(values: &[f64]) -> Option<usize> {
    best_by(values, None, |v, b| v > b)
}

/// Index of the minimum, ties to the lowest index; None if empty. Values are assumed finite.
pub fn argmin(values: &[f64]) -> Option<usize> {
    best_by(values, None, |v, b| v < b)
}

/// A selected candidate and its objective value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    /// Candidate index in 0..N.
    pub index: usize,
    /// The method's objective at that index.
    pub objective: f64,
}

/// The argmax of [`objectives`] (ties → lowest index).
pub fn select(method: Method, beta: f64, c: &Candidates) -> Result<Pick, RegularizeError> {
    let values = objectives(method, beta, c)?;
    let index = argmax(&values).ok_or(RegularizeError::NoCandidates)?;
    Ok(Pick { index, objective: values[index] })
}

/// Draws an index from p_i ∝ exp(logits_i) by inverting the CDF at `u` ∈ [0, 1); the max is
/// subtracted first so large logits cannot overflow. None if empty.
pub fn sample_index(logits: &[f64], u: f64) -> Option<usize> {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if logits.is_empty() || !max.is_finite() {
        return None;
    }
    let weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let target = u.clamp(0.0, 1.0) * weights.iter().sum::<f64>();
    let mut acc = 0.0;
    for (i, w) in weights.iter().enumerate() {
        acc += w;
        if target < acc {
            return Some(i);
        }
    }
    // u·total can round up to the total: the last index with positive weight.
    weights.iter().rposition(|&w| w > 0.0)
}

/// Each model's rewards standardised over the N samples: (r − mean) / std with the population
/// std; a model whose rewards are all equal gives zeros.
pub fn standardize(values: &[f64]) -> Vec<f64> {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let std = (values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n).sqrt();
    if std > 0.0 && std.is_finite() {
        values.iter().map(|v| (v - mean) / std).collect()
    } else {
        vec![0.0; values.len()]
    }
}

/// An ensemble's proxy reward and uncertainty per sample: mean_m z_m(y_i) and std_m z_m(y_i)
/// (population std across models), where z_m is model m's rewards standardised over the N
/// samples, so differently scaled reward models weigh alike.
pub fn ensemble(models: &[&[f64]]) -> (Vec<f64>, Vec<f64>) {
    let n = models.first().map_or(0, |m| m.len());
    let z: Vec<Vec<f64>> = models.iter().map(|m| standardize(m)).collect();
    let m = z.len() as f64;
    let mut mean = vec![0.0; n];
    let mut std = vec![0.0; n];
    for i in 0..n {
        let mu = z.iter().map(|zm| zm[i]).sum::<f64>() / m;
        mean[i] = mu;
        std[i] = (z.iter().map(|zm| (zm[i] - mu) * (zm[i] - mu)).sum::<f64>() / m).sqrt();
    }
    (mean, std)
}

/// Variational-BoN weights (Amini et al. 2024) per sample: the empirical reward CDF
/// F̂(r_i) = (#{j: r_j < r_i} + ½·#{j: r_j = r_i}) / N (ties, i itself included, count half)
/// and log w_i = log N + (N − 1)·log F̂(r_i), the log-density ratio of the BoN distribution to
/// the reference at sample i. F̂ ≥ 1/(2N), so the logarithm is always finite.
pub fn vbon_weights(rewards: &[f64]) -> Vec<(f64, f64)> {
    let n = rewards.len() as f64;
    rewards
        .iter()
        .map(|&r| {
            let below = rewards.iter().filter(|&&x| x < r).count() as f64;
            let equal = rewards.iter().filter(|&&x| x == r).count() as f64;
            let cdf = (below + 0.5 * equal) / n;
            (cdf, n.ln() + (n - 1.0) * cdf.ln())
        })
        .collect()
}

/// The runner-up of objective values: the best index other than `pick` (ties → lowest
/// index); None if N < 2.
pub fn runner_up(values: &[f64], pick: usize) -> Option<usize> {
    best_by(values, Some(pick), |v, b| v > b)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EPS: f64 = 1e-12;

    /// The runner-up of a method's objectives.
    fn second(method: Method, beta: f64, c: &Candidates, pick: usize) -> Result<Option<usize>, RegularizeError> {
        Ok(runner_up(&objectives(method, beta, c)?, pick))
    }

    fn assert_pick(p: Pick, index: usize, objective: f64) {
        assert_eq!(p.index, index, "{p:?}");
        assert!((p.objective - objective).abs() < EPS, "{p:?}, expected objective {objective}");
    }

    // ---- Method ----

    #[test]
    fn method_names_round_trip() {
        for m in Method::ALL {
            assert_eq!(m.as_str().parse::<Method>().unwrap(), m);
            assert_eq!(m.to_string(), m.as_str());
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(json, format!("\"{}\"", m.as_str()));
            assert_eq!(serde_json::from_str::<Method>(&json).unwrap(), m);
        }
        let err = "mbr_bon".parse::<Method>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("mbr_bon"), "{msg}");
        for m in Method::ALL {
            assert!(msg.contains(m.as_str()), "{msg} lacks {m}");
        }
    }

    #[test]
    fn method_flags() {
        assert!(Method::SELECTION.iter().all(|m| !m.is_report_only()));
        assert!(Method::Oracle.is_report_only() && Method::Random.is_report_only());
        let beta: Vec<_> = Method::ALL.into_iter().filter(|m| m.uses_beta()).collect();
        assert_eq!(beta, [Method::RbonKl, Method::RbonWd, Method::RbonLen, Method::BonUnc, Method::SrbonKl]);
        assert!(Method::SrbonKl.is_stochastic() && Method::SrbonKl.needs_logprob());
        assert!(Method::BonUnc.needs_ensemble() && !Method::Bon.needs_ensemble());
        assert_eq!(Method::PAPER.len(), 5);
        let emb: Vec<_> = Method::ALL.into_iter().filter(|m| m.needs_embedding()).collect();
        assert_eq!(emb, [Method::RbonWd, Method::Mbr]);
        assert!(Method::RbonKl.needs_logprob() && !Method::Bon.needs_logprob());
        assert!(Method::RbonLen.needs_num_tokens() && !Method::RbonKl.needs_num_tokens());
    }

    // ---- hand-computed selections, N = 4 ----

    #[test]
    fn bon_picks_max_proxy_with_tie_to_lowest() {
        // R_p = [0.5, 2.0, -1.0, 2.0]: max 2.0 at 1 and 3 → 1.
        let proxy = [0.5, 2.0, -1.0, 2.0];
        let c = Candidates::new(&proxy);
        assert_pick(select(Method::Bon, 0.0, &c).unwrap(), 1, 2.0);
        // Runner-up excluding 1: the tied 3.
        assert_eq!(second(Method::Bon, 0.0, &c, 1).unwrap(), Some(3));
        // Excluding 3: 1 again.
        assert_eq!(second(Method::Bon, 0.0, &c, 3).unwrap(), Some(1));
    }

    #[test]
    fn rbon_kl_changes_pick() {
        // β = 0.05, R_p = [1.0, 1.5, 0.2, 1.4], ℓ = [-10, -30, -5, -12]
        // 0: 1.0 − 0.5 = 0.5; 1: 1.5 − 1.5 = 0.0; 2: 0.2 − 0.25 = −0.05; 3: 1.4 − 0.6 = 0.8
        let proxy = [1.0, 1.5, 0.2, 1.4];
        let lp = [-10.0, -30.0, -5.0, -12.0];
        let c = Candidates { logprob: Some(&lp), ..Candidates::new(&proxy) };
        assert_pick(select(Method::Bon, 0.05, &c).unwrap(), 1, 1.5);
        assert_pick(select(Method::RbonKl, 0.05, &c).unwrap(), 3, 0.8);
        let obj = objectives(Method::RbonKl, 0.05, &c).unwrap();
        for (o, e) in obj.iter().zip([0.5, 0.0, -0.05, 0.8]) {
            assert!((o - e).abs() < EPS, "{obj:?}");
        }
        assert_eq!(second(Method::RbonKl, 0.05, &c, 3).unwrap(), Some(0));
    }

    #[test]
    fn rbon_kl_tie_to_lowest() {
        // Dyadic numbers so the ties are exact: β = 0.5, R_p = [1, 2, 0, 1.5], ℓ = [-2, -4, -1, -3]
        // 0: 1 − 1 = 0; 1: 2 − 2 = 0; 2: 0 − 0.5 = −0.5; 3: 1.5 − 1.5 = 0 → tie {0, 1, 3} → 0.
        let proxy = [1.0, 2.0, 0.0, 1.5];
        let lp = [-2.0, -4.0, -1.0, -3.0];
        let c = Candidates { logprob: Some(&lp), ..Candidates::new(&proxy) };
        assert_pick(select(Method::RbonKl, 0.5, &c).unwrap(), 0, 0.0);
        assert_eq!(second(Method::RbonKl, 0.5, &c, 0).unwrap(), Some(1));
    }

    #[test]
    fn rbon_wd_changes_pick_and_ties() {
        // β = 1, R_p = [3.0, 3.5, 2.0, 3.2], WD = [0.2, 0.9, 0.1, 0.3]
        // 0: 2.8; 1: 2.6; 2: 1.9; 3: 2.9 → 3 (BoN picks 1).
        let proxy = [3.0, 3.5, 2.0, 3.2];
        let wd = [0.2, 0.9, 0.1, 0.3];
        let c = Candidates { wd: Some(&wd), ..Candidates::new(&proxy) };
        assert_eq!(select(Method::Bon, 1.0, &c).unwrap().index, 1);
        assert_pick(select(Method::RbonWd, 1.0, &c).unwrap(), 3, 2.9);

        // Tie: β = 1, R_p = [3, 3.5, 2, 3.25], WD = [0.25, 0.75, 0.125, 0.5]
        // 0: 2.75; 1: 2.75; 2: 1.875; 3: 2.75 → 0.
        let proxy = [3.0, 3.5, 2.0, 3.25];
        let wd = [0.25, 0.75, 0.125, 0.5];
        let c = Candidates { wd: Some(&wd), ..Candidates::new(&proxy) };
        assert_pick(select(Method::RbonWd, 1.0, &c).unwrap(), 0, 2.75);
    }

    #[test]
    fn mbr_picks_min_wd_with_tie_to_lowest() {
        // −WD = [−0.4, −0.2, −0.2, −0.6] → max −0.2 at 1 and 2 → 1. R_p is ignored.
        let proxy = [9.0, 0.0, 5.0, 1.0];
        let wd = [0.4, 0.2, 0.2, 0.6];
        let c = Candidates { wd: Some(&wd), ..Candidates::new(&proxy) };
        assert_pick(select(Method::Mbr, 123.0, &c).unwrap(), 1, -0.2);
        assert_eq!(second(Method::Mbr, 0.0, &c, 1).unwrap(), Some(2));
    }

    #[test]
    fn rbon_len_changes_pick() {
        // β = 1, R_p = [1.0, 1.1, 0.9, 1.05], |y| = [10, 2, 50, 5]
        // 0: 1.0 − 0.1 = 0.9; 1: 1.1 − 0.5 = 0.6; 2: 0.9 − 0.02 = 0.88; 3: 1.05 − 0.2 = 0.85 → 0.
        let proxy = [1.0, 1.1, 0.9, 1.05];
        let toks = [10, 2, 50, 5];
        let c = Candidates { num_tokens: Some(&toks), ..Candidates::new(&proxy) };
        assert_eq!(select(Method::Bon, 1.0, &c).unwrap().index, 1);
        assert_pick(select(Method::RbonLen, 1.0, &c).unwrap(), 0, 0.9);

        // Tie: β = 1, R_p = [1, 1.25, 0.5, 1.5], |y| = [2, 4, 1, 2]
        // 0: 1 − 0.5 = 0.5; 1: 1.25 − 0.25 = 1.0; 2: 0.5 − 1 = −0.5; 3: 1.5 − 0.5 = 1.0 → {1, 3} → 1.
        let proxy = [1.0, 1.25, 0.5, 1.5];
        let toks = [2, 4, 1, 2];
        let c = Candidates { num_tokens: Some(&toks), ..Candidates::new(&proxy) };
        assert_pick(select(Method::RbonLen, 1.0, &c).unwrap(), 1, 1.0);
    }

    #[test]
    fn rbon_wd_end_to_end_from_embeddings() {
        // e = (1,0), (1,1), (0,5): WD = [(2 − 1/√2)/3, 2(1 − 1/√2)/3, (2 − 1/√2)/3] ≈ [0.431, 0.195, 0.431]
        // R_p = [1.0, 0.9, 1.1]; β = 1: [0.569, 0.705, 0.669] → 1; BoN → 2.
        let emb = [1.0, 0.0, 1.0, 1.0, 0.0, 5.0];
        let wd = wasserstein(&emb, 2).unwrap();
        let proxy = [1.0, 0.9, 1.1];
        let c = Candidates { wd: Some(&wd), ..Candidates::new(&proxy) };
        let s = std::f64::consts::FRAC_1_SQRT_2;
        assert_eq!(select(Method::Bon, 1.0, &c).unwrap().index, 2);
        assert_pick(select(Method::RbonWd, 1.0, &c).unwrap(), 1, 0.9 - 2.0 * (1.0 - s) / 3.0);
        assert_eq!(select(Method::Mbr, 1.0, &c).unwrap().index, 1);
    }

    // ---- ensembles, stochastic RBoN, vBoN ----

    #[test]
    fn standardize_and_ensemble_hand_computed() {
        // [1, 3]: mean 2, population std 1 → [−1, 1]. Constant rewards carry no ranking → zeros.
        assert_eq!(standardize(&[1.0, 3.0]), vec![-1.0, 1.0]);
        assert_eq!(standardize(&[5.0, 5.0, 5.0]), vec![0.0; 3]);
        // Model a = [0, 2, 4, 6] (mean 3, var (9+1+1+9)/4 = 5) and b = 10·a + 7: the same ranking at
        // another scale, so both standardise to z = (a − 3)/√5 and the spread is 0.
        let a = [0.0, 2.0, 4.0, 6.0];
        let b = [7.0, 27.0, 47.0, 67.0];
        let (mean, std) = ensemble(&[&a, &b]);
        let s5 = 5f64.sqrt();
        for i in 0..4 {
            assert!((mean[i] - (a[i] - 3.0) / s5).abs() < EPS, "{mean:?}");
            assert!(std[i].abs() < 1e-12, "{std:?}");
        }
        // Opposite rankings: c = [1, 0] and d = [0, 1] → z = [1, −1] and [−1, 1]; mean 0, std 1.
        let (mean, std) = ensemble(&[&[1.0, 0.0], &[0.0, 1.0]]);
        assert_eq!(mean, vec![0.0, 0.0]);
        assert_eq!(std, vec![1.0, 1.0]);
    }

    #[test]
    fn bon_unc_penalises_disagreement() {
        // Ensemble mean R = [1.0, 1.2, 0.5, 1.1], spread U = [0.1, 0.9, 0.0, 0.2], λ = 0.5:
        // 0: 0.95; 1: 0.75; 2: 0.5; 3: 1.0 → 3, where BoN on the mean picks 1.
        let proxy = [1.0, 1.2, 0.5, 1.1];
        let unc = [0.1, 0.9, 0.0, 0.2];
        let c = Candidates { uncertainty: Some(&unc), ..Candidates::new(&proxy) };
        assert_eq!(select(Method::Bon, 0.5, &c).unwrap().index, 1);
        assert_pick(select(Method::BonUnc, 0.5, &c).unwrap(), 3, 1.0);
        assert_eq!(second(Method::BonUnc, 0.5, &c, 3).unwrap(), Some(0));
        // λ = 0 is BoN on the ensemble mean.
        assert_eq!(select(Method::BonUnc, 0.0, &c).unwrap().index, 1);
        assert_eq!(
            select(Method::BonUnc, 0.5, &Candidates::new(&proxy)).unwrap_err(),
            RegularizeError::MissingEnsemble
        );
    }

    #[test]
    fn srbon_kl_logits_and_draws() {
        // Logits ℓ + β·R with β = 2, R = [0, 0.5, 1], ℓ = [ln 1, ln 2 − 1, ln 1 − 2] → [0, ln 2, 0]:
        // p = [1/4, 1/2, 1/4], CDF boundaries at 0.25 and 0.75.
        let proxy = [0.0, 0.5, 1.0];
        let lp = [0.0, 2f64.ln() - 1.0, -2.0];
        let c = Candidates { logprob: Some(&lp), ..Candidates::new(&proxy) };
        let logits = objectives(Method::SrbonKl, 2.0, &c).unwrap();
        for (l, e) in logits.iter().zip([0.0, 2f64.ln(), 0.0]) {
            assert!((l - e).abs() < EPS, "{logits:?}");
        }
        let picks: Vec<_> =
            [0.0, 0.2499, 0.25, 0.7499, 0.75, 0.999_999].iter().map(|&u| sample_index(&logits, u).unwrap()).collect();
        assert_eq!(picks, [0, 0, 1, 1, 2, 2]);
        // Huge logits do not overflow; an empty set has no pick.
        assert_eq!(sample_index(&[1e308, 1e308 - 1e300], 0.1), Some(0));
        assert_eq!(sample_index(&[], 0.5), None);
        // Without log-probs there is no reference distribution.
        assert_eq!(
            objectives(Method::SrbonKl, 1.0, &Candidates::new(&proxy)).unwrap_err(),
            RegularizeError::MissingLogprob
        );
    }

    #[test]
    fn vbon_weights_hand_computed() {
        // r = [3, 1, 2, 2], N = 4. F̂: 3 → (3 + ½)/4 = 0.875; 1 → (0 + ½)/4 = 0.125;
        // 2 (tied twice) → (1 + ½·2)/4 = 0.5. log w = ln 4 + 3·ln F̂.
        let w = vbon_weights(&[3.0, 1.0, 2.0, 2.0]);
        let cdf: Vec<f64> = w.iter().map(|x| x.0).collect();
        assert_eq!(cdf, vec![0.875, 0.125, 0.5, 0.5]);
        for (i, &(f, lw)) in w.iter().enumerate() {
            assert!((lw - (4f64.ln() + 3.0 * f.ln())).abs() < EPS, "{i}: {w:?}");
        }
        // The weights of the BoN distribution sum to about N over the samples (exactly in the
        // continuous limit); for distinct rewards their mean is (1/N) Σ N·((k+½)/N)^(N−1).
        let w = vbon_weights(&[0.1, 0.7, 0.3]);
        let expected = [0.5 / 3.0, 2.5 / 3.0, 1.5 / 3.0];
        for (x, e) in w.iter().zip(expected) {
            assert!((x.0 - e).abs() < EPS && (x.1 - (3f64.ln() + 2.0 * e.ln())).abs() < EPS, "{w:?}");
        }
        // One sample: F̂ = ½ and log w = ln 1 + 0 = 0.
        assert_eq!(vbon_weights(&[4.2]), vec![(0.5, 0.0)]);
    }

    // ---- errors ----

    #[test]
    fn input_errors() {
        let proxy = [1.0, 2.0, 3.0, 4.0];
        let c = Candidates::new(&proxy);
        assert_eq!(select(Method::Bon, 0.0, &Candidates::new(&[])), Err(RegularizeError::NoCandidates));
        assert_eq!(select(Method::RbonKl, 0.1, &c), Err(RegularizeError::MissingLogprob));
        assert_eq!(select(Method::RbonWd, 0.1, &c), Err(RegularizeError::MissingEmbedding));
        assert_eq!(select(Method::Mbr, 0.1, &c), Err(RegularizeError::MissingEmbedding));
        assert_eq!(select(Method::RbonLen, 0.1, &c), Err(RegularizeError::MissingNumTokens));
        for m in [Method::Oracle, Method::Random] {
            assert_eq!(select(m, 0.1, &c), Err(RegularizeError::ReportOnly { method: m }));
        }

        let short = [-1.0, -2.0, -3.0];
        let bad = Candidates { logprob: Some(&short), ..c };
        // A present input of the wrong length is refused even if the method does not use it.
        assert_eq!(
            select(Method::Bon, 0.1, &bad),
            Err(RegularizeError::LengthMismatch { what: "logprob", expected: 4, got: 3 })
        );

        let toks = [3, 0, 2, 0];
        let zero = Candidates { num_tokens: Some(&toks), ..c };
        assert_eq!(select(Method::RbonLen, 0.1, &zero), Err(RegularizeError::ZeroTokens { index: 1 }));

        let nan = [1.0, f64::NAN, 3.0, 4.0];
        assert_eq!(
            select(Method::Bon, 0.0, &Candidates::new(&nan)),
            Err(RegularizeError::NonFinite { what: "proxy reward", index: 1 })
        );
        let lp = [-1.0, -2.0, f64::NEG_INFINITY, -4.0];
        let inf = Candidates { logprob: Some(&lp), ..c };
        assert_eq!(select(Method::RbonKl, 0.1, &inf), Err(RegularizeError::NonFinite { what: "logprob", index: 2 }));
        assert!(matches!(select(Method::RbonKl, -0.1, &inf), Err(RegularizeError::InvalidBeta { .. })));
        let lp = [-1.0, -2.0, -3.0, -4.0];
        let ok = Candidates { logprob: Some(&lp), ..c };
        assert!(matches!(select(Method::RbonKl, f64::NAN, &ok), Err(RegularizeError::InvalidBeta { .. })));
        assert_eq!(select(Method::RbonKl, 1e308, &ok), Err(RegularizeError::NonFinite { what: "objective", index: 1 }));
    }

    #[test]
    fn second_edge_cases() {
        let one = [1.0];
        assert_eq!(second(Method::Bon, 0.0, &Candidates::new(&one), 0), Ok(None));
        let two = [1.0, 2.0];
        assert_eq!(second(Method::Bon, 0.0, &Candidates::new(&two), 1), Ok(Some(0)));
    }

    // ---- wasserstein ----

    #[test]
    fn wasserstein_hand_computed() {
        // (1,0), (0,2), (−3,0), (1,0): C rows
        // 0: [0, 1, 2, 0] → 0.75; 1: [1, 0, 1, 1] → 0.75; 2: [2, 1, 0, 2] → 1.25; 3 = row 0.
        let emb = [1.0, 0.0, 0.0, 2.0, -3.0, 0.0, 1.0, 0.0];
        let wd = wasserstein(&emb, 2).unwrap();
        for (w, e) in wd.iter().zip([0.75, 0.75, 1.25, 0.75]) {
            assert!((w - e).abs() < EPS, "{wd:?}");
        }
        // 45°: (1,0), (1,1), (0,5); cos = 1/√2, 0, 1/√2.
        let s = std::f64::consts::FRAC_1_SQRT_2;
        let wd = wasserstein(&[1.0, 0.0, 1.0, 1.0, 0.0, 5.0], 2).unwrap();
        let expect = [(2.0 - s) / 3.0, 2.0 * (1.0 - s) / 3.0, (2.0 - s) / 3.0];
        for (w, e) in wd.iter().zip(expect) {
            assert!((w - e).abs() < EPS, "{wd:?}");
        }
        // A single candidate is at distance 0 from itself.
        assert_eq!(wasserstein(&[0.3, -0.4], 2).unwrap(), vec![0.0]);
    }

    #[test]
    fn wasserstein_errors() {
        assert_eq!(wasserstein(&[1.0, 0.0, 0.0, 0.0, 0.0, 1.0], 2), Err(RegularizeError::ZeroEmbedding { index: 1 }));
        assert_eq!(
            wasserstein(&[1.0, 0.0, 0.0, 1.0, 1.0], 2),
            Err(RegularizeError::DimensionMismatch { index: 2, expected: 2, got: 1 })
        );
        let rows: Vec<Vec<f32>> = vec![vec![1.0, 0.0], vec![0.0, 1.0, 0.0]];
        assert_eq!(wasserstein_rows(&rows), Err(RegularizeError::DimensionMismatch { index: 1, expected: 2, got: 3 }));
        assert_eq!(
            wasserstein(&[1.0, 0.0, f32::NAN, 1.0], 2),
            Err(RegularizeError::NonFinite { what: "embedding", index: 1 })
        );
        assert_eq!(wasserstein(&[], 0), Err(RegularizeError::ZeroDimension));
        assert_eq!(wasserstein(&[], 3), Err(RegularizeError::NoCandidates));
    }

    // ---- properties ----

    /// Distinct integers in random order; scaled, they give values separated by a known gap.
    fn distinct(n: std::ops::RangeInclusive<usize>, lo: i32, hi: i32) -> BoxedStrategy<Vec<i32>> {
        prop::collection::btree_set(lo..hi, n).prop_map(|s| s.into_iter().collect::<Vec<_>>()).prop_shuffle().boxed()
    }

    fn naive_argmax(v: &[f64]) -> Option<usize> {
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        v.iter().position(|&x| x == max)
    }

    fn naive_argmin(v: &[f64]) -> Option<usize> {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        v.iter().position(|&x| x == min)
    }

    /// N nonzero rows of `dim` values plus one positive scale per row.
    fn embeddings() -> impl Strategy<Value = (usize, Vec<f32>, Vec<f32>)> {
        (1usize..10, 1usize..8).prop_flat_map(|(n, dim)| {
            (
                Just(dim),
                prop::collection::vec(
                    prop::collection::vec(-1.0f32..1.0, dim)
                        .prop_filter("nonzero row", |r| r.iter().map(|x| x * x).sum::<f32>() > 1e-4),
                    n,
                )
                .prop_map(|rows| rows.concat()),
                prop::collection::vec(1e-2f32..1e2, n),
            )
        })
    }

    proptest! {
        #[test]
        fn tiny_beta_matches_bon(
            (rewards, lp, wd, toks) in distinct(1..=16, -10_000, 10_000).prop_flat_map(|r| {
                let n = r.len();
                (
                    Just(r),
                    prop::collection::vec(-1000.0f64..0.0, n),
                    prop::collection::vec(0.0f64..2.0, n),
                    prop::collection::vec(1u32..4096, n),
                )
            })
        ) {
            // Rewards 1e-3 apart; β·(regularizer) ≤ 1e-12 · 1000 cannot reorder them.
            let proxy: Vec<f64> = rewards.iter().map(|&k| f64::from(k) * 1e-3).collect();
            let c = Candidates { proxy: &proxy, logprob: Some(&lp), num_tokens: Some(&toks), wd: Some(&wd), uncertainty: None };
            let bon = select(Method::Bon, 1e-12, &c).unwrap().index;
            for m in [Method::RbonKl, Method::RbonWd, Method::RbonLen] {
                prop_assert_eq!(select(m, 1e-12, &c).unwrap().index, bon, "{}", m);
            }
        }

        #[test]
        fn huge_beta_follows_regularizer(
            (proxy, wd_k, lp_k) in (1usize..=16).prop_flat_map(|n| (
                prop::collection::vec(-10.0f64..10.0, n),
                distinct(n..=n, 0, 2_000_000),
                distinct(n..=n, 0, 1_000_000),
            ))
        ) {
            // Regularizers 1e-6 apart; β = 1e9 makes their gaps (≥ 1e3) dwarf the reward range (20).
            let wd: Vec<f64> = wd_k.iter().map(|&k| f64::from(k) * 1e-6).collect();
            let lp: Vec<f64> = lp_k.iter().map(|&k| -f64::from(k) * 1e-6).collect();
            let c = Candidates { proxy: &proxy, logprob: Some(&lp), num_tokens: None, wd: Some(&wd), uncertainty: None };
            let mbr = select(Method::Mbr, 1e9, &c).unwrap().index;
            prop_assert_eq!(mbr, argmin(&wd).unwrap());
            prop_assert_eq!(select(Method::RbonWd, 1e9, &c).unwrap().index, mbr);
            prop_assert_eq!(select(Method::RbonKl, 1e9, &c).unwrap().index, argmax(&lp).unwrap());
        }

        #[test]
        fn argmax_argmin_match_naive(
            v in prop_oneof![
                prop::collection::vec((-3i32..3).prop_map(f64::from), 0..20),
                prop::collection::vec(-1e6f64..1e6, 0..20),
            ]
        ) {
            let (amax, amin) = (argmax(&v), argmin(&v));
            prop_assert_eq!(amax, naive_argmax(&v));
            prop_assert_eq!(amin, naive_argmin(&v));
            if let (Some(i), Some(j)) = (amax, amin) {
                prop_assert!(v[..i].iter().all(|&x| x < v[i]));
                prop_assert!(v[i..].iter().all(|&x| x <= v[i]));
                prop_assert!(v[..j].iter().all(|&x| x > v[j]));
                prop_assert!(v[j..].iter().all(|&x| x >= v[j]));
            } else {
                prop_assert!(v.is_empty());
            }
        }

        #[test]
        fn wasserstein_bounded_and_scale_invariant((dim, emb, scales) in embeddings()) {
            let wd = wasserstein(&emb, dim).unwrap();
            prop_assert_eq!(wd.len(), scales.len());
            prop_assert!(wd.iter().all(|w| (0.0..=2.0).contains(w)), "{:?}", wd);
            let scaled: Vec<f32> = emb
                .chunks_exact(dim)
                .zip(&scales)
                .flat_map(|(row, &s)| row.iter().map(move |x| x * s))
                .collect();
            let wd2 = wasserstein(&scaled, dim).unwrap();
            for (a, b) in wd.iter().zip(&wd2) {
                // Scaling in f32 rounds each element once (~6e-8 relative).
                prop_assert!((a - b).abs() < 1e-6, "{:?} vs {:?}", wd, wd2);
            }
        }
    }
}
