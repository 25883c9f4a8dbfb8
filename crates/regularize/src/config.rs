use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use rbon_core::seed::derive_seed;
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
    /// β selection: a tuning subset of prompts on which the report names the best β (λ for
    /// `bon_unc`) of each method by a gold reward's mean, evaluated on the other prompts; the
    /// pair export can then use `best` as its β. Selection itself is unaffected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tune: Option<TuneConfig>,
}

/// The `select.tune` section: which prompts tune β, and by which gold reward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuneConfig {
    /// The gold reward (one of `select.gold`) whose mean over the tuning subset picks β.
    pub gold: String,
    /// Fraction of prompts in the tuning subset (0 < f < 1): a prompt is in it when a seeded
    /// hash of its id falls below f, so membership depends on neither row order nor sharding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    /// Or: the prompt ids of the tuning subset (give `fraction` or `prompts`, not both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts: Option<Vec<String>>,
    /// Seed of the hash behind `fraction`.
    #[serde(default)]
    pub seed: u64,
}

impl TuneConfig {
    /// Whether a prompt belongs to the tuning subset (the rest is held out for evaluation).
    pub fn contains(&self, prompt_id: &str) -> bool {
        if let Some(ids) = &self.prompts {
            return ids.iter().any(|p| p == prompt_id);
        }
        let f = self.fraction.unwrap_or(0.0);
        let u = (derive_seed(self.seed, prompt_id, b"select.tune") >> 11) as f64 / (1u64 << 53) as f64;
        u < f
    }

    /// Problems with this section (`gold` is `select.gold`).
    fn check(&self, doc: &ConfigDoc, gold: &[String], diags: &mut Diagnostics) {
        if !gold.contains(&self.gold) {
            let listed = if gold.is_empty() { "select.gold is empty".to_owned() } else { gold.join(", ") };
            diags.push(doc.diag(
                "select.tune.gold",
                format!(
                    "`{}` is not a gold reward of select.gold ({listed}); β is tuned on a held-out gold reward",
                    self.gold
                ),
            ));
        }
        match (&self.fraction, &self.prompts) {
            (Some(_), Some(_)) => {
                diags.push(doc.diag("select.tune", "give either `fraction` or `prompts`, not both"));
            }
            (None, None) => diags.push(doc.diag(
                "select.tune",
                "name the tuning subset: `fraction: 0.2` (seeded by prompt id) or `prompts: [id, ...]`",
            )),
            (Some(f), None) if !(f.is_finite() && *f > 0.0 && *f < 1.0) => diags.push(doc.diag(
                "select.tune.fraction",
                format!("{f} is not allowed: the tuning fraction must be strictly between 0 and 1"),
            )),
            (None, Some(ps)) => {
                if ps.is_empty() {
                    diags.push(doc.diag("select.tune.prompts", "must list at least one prompt id"));
                }
                for (i, p) in ps.iter().enumerate() {
                    if ps[..i].contains(p) {
                        diags.push(doc.diag(&format!("select.tune.prompts[{i}]"), format!("`{p}` is listed twice")));
                    }
                }
            }
            _ => {}
        }
    }
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
            } else if proxies.contains(g) {
                diags.push(doc.diag(
                    &format!("select.gold[{i}]"),
                    format!("`{g}` is the proxy; a gold reward must be another reward model (it measures what the proxy misses)"),
                ));
            }
        }
        if let Some(t) = &self.tune {
            t.check(doc, &self.gold, diags);
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use super::*;

    fn problems(yaml: &str) -> Vec<String> {
        let doc = ConfigDoc::parse(Path::new("p.yaml"), yaml).unwrap();
        let mut d = Diagnostics::default();
        let s: SelectConfig = doc.section("select", &mut d).unwrap();
        s.check(&doc, None, &mut d);
        d.iter().map(|x| format!("{}: {}", x.path, x.message)).collect()
    }

    #[test]
    fn tuning_fraction_is_a_seeded_hash_of_the_prompt_id() {
        let t = TuneConfig { gold: "gold".into(), fraction: Some(0.25), prompts: None, seed: 7 };
        let ids: Vec<String> = (0..4000).map(|i| format!("prompt-{i}")).collect();
        let inside: Vec<&String> = ids.iter().filter(|p| t.contains(p)).collect();
        // Binomial(4000, 0.25): mean 1000, sd ≈ 27.
        assert!((880..1120).contains(&inside.len()), "{}", inside.len());
        // Membership is a property of the id alone: the same in any order, different by seed.
        assert!(ids.iter().rev().filter(|p| t.contains(p)).count() == inside.len());
        let other = TuneConfig { seed: 8, ..t.clone() };
        assert!(ids.iter().any(|p| t.contains(p) != other.contains(p)));
        let listed = TuneConfig { fraction: None, prompts: Some(vec!["a".into(), "c".into()]), ..t };
        assert_eq!(["a", "b", "c"].map(|p| listed.contains(p)), [true, false, true]);
    }

    #[test]
    fn tune_section_is_checked() {
        let base = "select:\n  proxy: proxy\n  gold: [gold]\n";
        assert!(problems(&format!("{base}  tune: {{ gold: gold, fraction: 0.2 }}\n")).is_empty());
        assert!(problems(&format!("{base}  tune: {{ gold: gold, prompts: [a, b] }}\n")).is_empty());
        let p = problems(&format!("{base}  tune: {{ gold: proxy, fraction: 1.5 }}\n"));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("select.tune.gold: `proxy` is not a gold reward"), "{p:?}");
        assert!(p[1].starts_with("select.tune.fraction: 1.5 is not allowed"), "{p:?}");
        let p = problems(&format!("{base}  tune: {{ gold: gold }}\n"));
        assert!(p[0].starts_with("select.tune: name the tuning subset"), "{p:?}");
        let p = problems(&format!("{base}  tune: {{ gold: gold, fraction: 0.5, prompts: [a] }}\n"));
        assert!(p[0].contains("not both"), "{p:?}");
        let p = problems(&format!("{base}  tune: {{ gold: gold, prompts: [a, a] }}\n"));
        assert_eq!(p, ["select.tune.prompts[1]: `a` is listed twice"]);
    }
}
