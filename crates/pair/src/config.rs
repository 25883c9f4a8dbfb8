use serde::{Deserialize, Serialize};

use rbon_core::{ConfigDoc, Diagnostics};
use rbon_regularize::{Method, SelectConfig};

/// How the rejected response of a pair is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectedRule {
    /// Worst of N by proxy reward (argmin R_p, ties to the lowest index): "West-of-N".
    #[default]
    Worst,
    /// A uniformly random other sample, seeded per prompt.
    Random,
    /// The runner-up under the chosen method's own objective.
    Second,
}

impl RejectedRule {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Worst => "worst",
            Self::Random => "random",
            Self::Second => "second",
        }
    }
}

/// The `pair` section: how chosen/rejected pairs are built and which are exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairConfig {
    /// `worst` (argmin proxy reward, default), `random` (seeded per prompt) or `second`
    /// (runner-up under the chosen method's objective).
    #[serde(default)]
    pub rejected: RejectedRule,
    /// Pairs whose proxy margin (score_chosen − score_rejected) is below this are dropped.
    #[serde(default)]
    pub min_margin: f64,
    /// Export only these methods (default: every method in `select.methods`).
    #[serde(default)]
    pub methods: Option<Vec<Method>>,
    /// Export only these β values (default: all of `select.betas`, and all of `select.lambdas`
    /// for `bon_unc`); methods without β always export.
    #[serde(default)]
    pub betas: Option<Vec<f64>>,
    /// Also write each export's SFT half (`<export>/sft/`: prompt + the chosen completion, TRL's
    /// prompt-completion format), the SFT term of BoNBoN alignment.
    #[serde(default)]
    pub sft: bool,
    /// Also write `vbon/`: every sample with log π_ref, its reward CDF and its variational-BoN
    /// log-weight.
    #[serde(default)]
    pub vbon: bool,
}

impl Default for PairConfig {
    fn default() -> Self {
        Self { rejected: RejectedRule::Worst, min_margin: 0.0, methods: None, betas: None, sft: false, vbon: false }
    }
}

impl PairConfig {
    /// Methods to export, in `select.methods` order.
    pub fn export_methods(&self, select: &SelectConfig) -> Vec<Method> {
        select
            .methods
            .iter()
            .copied()
            .filter(|m| !m.is_report_only())
            .filter(|m| self.methods.as_ref().is_none_or(|ms| ms.contains(m)))
            .collect()
    }

    /// Whether (method, β) is exported.
    pub fn exports(&self, select: &SelectConfig, method: Method, beta: f64) -> bool {
        self.export_methods(select).contains(&method)
            && (!method.uses_beta() || self.betas.as_ref().is_none_or(|bs| bs.contains(&beta)))
    }

    /// Every problem with this section (`select` is `None` when it did not parse).
    pub fn check(&self, doc: &ConfigDoc, select: Option<&SelectConfig>, diags: &mut Diagnostics) {
        if !self.min_margin.is_finite() {
            diags.push(
                doc.diag("pair.min_margin", format!("{} is not allowed: must be a finite number", self.min_margin)),
            );
        }
        let Some(select) = select else { return };
        if let Some(ms) = &self.methods {
            if ms.is_empty() {
                diags.push(doc.diag("pair.methods", "must name at least one method, or be left out to export all"));
            }
            for (i, m) in ms.iter().enumerate() {
                let path = format!("pair.methods[{i}]");
                if m.is_report_only() {
                    diags.push(doc.diag(&path, format!("`{m}` is report-only and has no pairs")));
                } else if !select.methods.contains(m) {
                    let listed = select.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", ");
                    diags.push(doc.diag(&path, format!("`{m}` is not in select.methods ({listed})")));
                }
            }
        }
        for m in self.export_methods(select) {
            if !select.grid(m).iter().any(|&b| self.exports(select, m, b)) {
                let grid = if m == Method::BonUnc { "select.lambdas" } else { "select.betas" };
                diags.push(doc.diag(
                    "pair.betas",
                    format!("no value of {grid} is listed here, so `{m}` would export nothing (pair.betas filters β and λ alike)"),
                ));
            }
        }
        if let Some(bs) = &self.betas {
            for (i, b) in bs.iter().enumerate() {
                if !select.betas.contains(b) && !select.lambdas.contains(b) {
                    diags.push(doc.diag(
                        &format!("pair.betas[{i}]"),
                        format!("β = {b} is not in select.betas or select.lambdas"),
                    ));
                }
            }
        }
    }
}
