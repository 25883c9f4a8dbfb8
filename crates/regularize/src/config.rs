use serde::{Deserialize, Serialize};

use rbon_core::{ConfigDoc, Diagnostics};

use crate::method::Method;

/// The paper's β grid (Jinnai et al. 2024).
pub const PAPER_BETAS: [f64; 13] = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0];

fn default_methods() -> Vec<Method> {
    Method::SELECTION.to_vec()
}

fn default_betas() -> Vec<f64> {
    PAPER_BETAS.to_vec()
}

/// The `select` section: which rules to apply and over which β grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectConfig {
    /// The reward model to select with (R_p): the name of a `reward_<name>` column.
    pub proxy: String,
    /// Held-out reward models (R_g) for evaluation only: they give the `oracle` and `random`
    /// baselines and the report's gold columns, and never influence a pick.
    #[serde(default)]
    pub gold: Vec<String>,
    /// Selection rules: `bon`, `rbon_kl`, `rbon_wd`, `mbr`, `rbon_len`. `oracle` and `random`
    /// are added on their own (report only).
    #[serde(default = "default_methods")]
    pub methods: Vec<Method>,
    /// The β grid swept by `rbon_kl`, `rbon_wd` and `rbon_len` (finite, ≥ 0).
    #[serde(default = "default_betas")]
    pub betas: Vec<f64>,
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
            }
        }
        if self.methods.iter().any(|m| m.uses_beta()) && self.betas.is_empty() {
            diags.push(doc.diag("select.betas", "must hold at least one β for rbon_kl, rbon_wd or rbon_len"));
        }
        for (i, b) in self.betas.iter().enumerate() {
            let path = format!("select.betas[{i}]");
            if !b.is_finite() || *b < 0.0 {
                diags.push(doc.diag(&path, format!("β = {b} is not allowed: β must be a finite number ≥ 0")));
            } else if self.betas[..i].contains(b) {
                diags.push(doc.diag(&path, format!("β = {b} is listed twice")));
            }
        }
        for (i, g) in self.gold.iter().enumerate() {
            if self.gold[..i].contains(g) {
                diags.push(doc.diag(&format!("select.gold[{i}]"), format!("`{g}` is listed twice")));
            }
        }
        let Some(a) = avail else { return };
        let names = a.rewards.join(", ");
        if !a.rewards.contains(&self.proxy) {
            diags.push(doc.diag(
                "select.proxy",
                format!("no reward model `{}` in {} (available: {names})", self.proxy, a.source),
            ));
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
