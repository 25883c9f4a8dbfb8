use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use rbon_core::{ConfigDoc, Diagnostics};

use crate::method::Method;

/// The paper's β grid (Jinnai et al. 2024).
pub const PAPER_BETAS: [f64; 13] = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0];

/// The default λ grid of `bon_unc`.
pub const DEFAULT_LAMBDAS: [f64; 5] = [0.1, 0.2, 0.5, 1.0, 2.0];

fn default_methods() -> Vec<Method> {
    Method::PAPER.to_vec()
}

fn default_lambdas() -> Vec<f64> {
    DEFAULT_LAMBDAS.to_vec()
}

/// The proxy reward: one reward model, or an ensemble whose standardised mean is the proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Proxy {
    /// One reward model, used as it scores.
    One(String),
    /// Several reward models; with two or more, their standardised mean is the proxy.
    Ensemble(Vec<String>),
}

impl Proxy {
    /// The reward model names.
    pub fn names(&self) -> &[String] {
        match self {
            Proxy::One(n) => std::slice::from_ref(n),
            Proxy::Ensemble(ns) => ns,
        }
    }

    /// True for two or more models: their rewards are standardised per prompt and averaged.
    pub fn is_ensemble(&self) -> bool {
        self.names().len() > 1
    }
}

impl From<&str> for Proxy {
    fn from(name: &str) -> Self {
        Proxy::One(name.to_owned())
    }
}

impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(", "))
    }
}

impl<'de> Deserialize<'de> for Proxy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Proxy;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a reward model name or a list of names (an ensemble)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Proxy, E> {
                Ok(Proxy::One(v.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Proxy, A::Error> {
                let mut names = Vec::new();
                while let Some(n) = a.next_element::<String>()? {
                    names.push(n);
                }
                Ok(Proxy::Ensemble(names))
            }
        }
        d.deserialize_any(V)
    }
}

fn default_betas() -> Vec<f64> {
    PAPER_BETAS.to_vec()
}

/// The `select` section: which rules to apply and over which β grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectConfig {
    /// The reward model to select with (R_p): the name of a `reward_<name>` column, or a list
    /// of names for an ensemble (each model's rewards standardised over the prompt's N samples,
    /// then averaged).
    pub proxy: Proxy,
    /// Held-out reward models (R_g) for evaluation only: they give the `oracle` and `random`
    /// baselines and the report's gold columns, and never influence a pick.
    #[serde(default)]
    pub gold: Vec<String>,
    /// Selection rules: `bon`, `rbon_kl`, `rbon_wd`, `mbr`, `rbon_len`, `bon_unc`, `srbon_kl`
    /// (default: the first five). `oracle` and `random` are added on their own (report only).
    #[serde(default = "default_methods")]
    pub methods: Vec<Method>,
    /// The β grid swept by `rbon_kl`, `rbon_wd`, `rbon_len` and `srbon_kl` (finite, ≥ 0).
    #[serde(default = "default_betas")]
    pub betas: Vec<f64>,
    /// The λ grid swept by `bon_unc` (finite, ≥ 0), reported in the `beta` column.
    #[serde(default = "default_lambdas")]
    pub lambdas: Vec<f64>,
}

impl SelectConfig {
    /// The grid a method sweeps: λ for `bon_unc`, β for the others that use one, `[0]` otherwise.
    pub fn grid(&self, m: Method) -> Vec<f64> {
        match m {
            Method::BonUnc => self.lambdas.clone(),
            m if m.uses_beta() => self.betas.clone(),
            _ => vec![0.0],
        }
    }
}

/// What the scored samples offer, for validation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Available {
    /// Reward model names.
    pub rewards: Vec<String>,
    pub logprob: bool,
    pub num_tokens: bool,
    pub embedding: bool,
    /// Where these come from, for messages (e.g. "the candidates file data/x.parquet").
    pub source: String,
}

impl SelectConfig {
    /// Every problem with this section, given what the samples offer (`None` when unknown).
    pub fn check(&self, doc: &ConfigDoc, avail: Option<&Available>, diags: &mut Diagnostics) {
        let allowed = Method::SELECTION.map(Method::as_str).join(", ");
        if self.methods.is_empty() {
            diags.push(doc.diag("select.methods", format!("must name at least one method ({allowed})")));
        }
        for (i, m) in self.methods.iter().enumerate() {
            if self.methods[..i].contains(m) {
                diags.push(doc.diag(&format!("select.methods[{i}]"), format!("`{m}` is listed twice")));
            } else if m.is_report_only() {
                diags.push(doc.diag(
                    &format!("select.methods[{i}]"),
                    format!("`{m}` is a report-only baseline, added on its own when `select.gold` names a model; allowed here: {allowed}"),
                ));
            }
        }
        if self.methods.iter().any(|m| m.uses_beta() && *m != Method::BonUnc) && self.betas.is_empty() {
            diags.push(doc.diag("select.betas", "must hold at least one β for rbon_kl, rbon_wd, rbon_len or srbon_kl"));
        }
        if self.methods.contains(&Method::BonUnc) && self.lambdas.is_empty() {
            diags.push(doc.diag("select.lambdas", "must hold at least one λ for bon_unc"));
        }
        for (key, sym, grid) in [("betas", "β", &self.betas), ("lambdas", "λ", &self.lambdas)] {
            for (i, b) in grid.iter().enumerate() {
                let path = format!("select.{key}[{i}]");
                if !b.is_finite() || b.is_sign_negative() {
                    diags.push(
                        doc.diag(&path, format!("{sym} = {b} is not allowed: {sym} must be a finite number ≥ 0")),
                    );
                } else if grid[..i].contains(b) {
                    diags.push(doc.diag(&path, format!("{sym} = {b} is listed twice")));
                }
            }
        }
        let proxies = self.proxy.names();
        if proxies.is_empty() {
            diags.push(doc.diag("select.proxy", "must name at least one reward model"));
        }
        for (i, p) in proxies.iter().enumerate() {
            if proxies[..i].contains(p) {
                diags.push(doc.diag(&format!("select.proxy[{i}]"), format!("`{p}` is listed twice")));
            }
        }
        if let Some(i) = self.methods.iter().position(|m| m.needs_ensemble())
            && !self.proxy.is_ensemble()
        {
            diags.push(doc.diag(
                &format!("select.methods[{i}]"),
                "`bon_unc` needs an ensemble: set `select.proxy` to a list of two or more reward models",
            ));
        }
        for (i, g) in self.gold.iter().enumerate() {
            if self.gold[..i].contains(g) {
                diags.push(doc.diag(&format!("select.gold[{i}]"), format!("`{g}` is listed twice")));
            }
        }
        let Some(a) = avail else { return };
        let names = a.rewards.join(", ");
        for (i, p) in proxies.iter().enumerate() {
            if !a.rewards.contains(p) {
                let path = if matches!(self.proxy, Proxy::Ensemble(_)) {
                    format!("select.proxy[{i}]")
                } else {
                    "select.proxy".to_owned()
                };
                diags.push(doc.diag(&path, format!("no reward model `{p}` in {} (available: {names})", a.source)));
            }
        }
        for (i, g) in self.gold.iter().enumerate() {
            if !a.rewards.contains(g) {
                diags.push(doc.diag(
                    &format!("select.gold[{i}]"),
                    format!("no reward model `{g}` in {} (available: {names})", a.source),
                ));
            }
        }
        for (i, m) in self.methods.iter().enumerate() {
            let path = format!("select.methods[{i}]");
            let missing = if m.needs_logprob() && !a.logprob {
                Some(("log-probs", "logprob"))
            } else if m.needs_embedding() && !a.embedding {
                Some(("embeddings", "embedding"))
            } else if m.needs_num_tokens() && !a.num_tokens {
                Some(("token counts", "num_tokens"))
            } else {
                None
            };
            if let Some((what, col)) = missing {
                diags.push(doc.diag(
                    &path,
                    format!("`{m}` needs {what}, but {} has no `{col}` column (add it, or drop `{m}`)", a.source),
                ));
            }
        }
    }
}
