use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
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

/// How prompt, chosen and rejected are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairFormat {
    /// Message lists (TRL's conversational format): each trainer applies its own chat template.
    #[default]
    Conversational,
    /// Plain strings rendered with the policy's chat template (TRL's standard format): the
    /// prompt ends with the generation prompt, and the responses carry no trailing EOS, which
    /// trainers append themselves.
    Standard,
}

/// The file type of the exports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// `train-0000i-of-0000N.parquet`.
    #[default]
    Parquet,
    /// `train-0000i-of-0000N.jsonl`, one JSON object per line.
    Jsonl,
}

impl FileFormat {
    /// The file extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Parquet => "parquet",
            Self::Jsonl => "jsonl",
        }
    }
}

/// Whether the exports carry the `margin` column (score_chosen − score_rejected, proxy units).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarginColumn {
    /// The proxy margin (default). OpenRLHF's reward-model training reads a `margin` column as
    /// the offset of its margin loss (`--model.margin_loss_enable` in 0.11):
    /// −log σ(r_chosen − r_rejected − margin).
    #[default]
    Proxy,
    /// Left out of the exports: margin loss then uses 0 (the pairs shards keep it for
    /// `min_margin` and the report).
    None,
}

/// The `pair.card` section: Hugging Face metadata of the pairs folder's dataset card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardConfig {
    /// A license id of the Hub (`apache-2.0`, `cc-by-4.0`, `other`, …). The pairs inherit the
    /// terms of the prompts and of the models that wrote and scored the responses, which rbon
    /// cannot know: `unknown` until you say.
    #[serde(default = "unknown_license")]
    pub license: String,
    /// Tags besides rbon's own (`dpo`, `preference`, `rbon`, `trl`).
    #[serde(default)]
    pub tags: Vec<String>,
}

fn unknown_license() -> String {
    "unknown".to_owned()
}

impl Default for CardConfig {
    fn default() -> Self {
        Self { license: unknown_license(), tags: Vec::new() }
    }
}

impl CardConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    fn check(&self, doc: &ConfigDoc, diags: &mut Diagnostics) {
        let id = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
        if self.license.is_empty() || !self.license.chars().all(id) {
            diags.push(doc.diag(
                "pair.card.license",
                format!(
                    "`{}` is not a Hub license id: lowercase letters, digits, `-` and `.` (e.g. apache-2.0, cc-by-4.0, other)",
                    self.license
                ),
            ));
        }
        for (i, t) in self.tags.iter().enumerate() {
            if t.trim().is_empty() || t.chars().any(char::is_control) || t.len() > 100 {
                diags.push(doc.diag(&format!("pair.card.tags[{i}]"), "a tag is a non-empty line of at most 100 bytes"));
            }
        }
    }
}

fn is_proxy(m: &MarginColumn) -> bool {
    *m == MarginColumn::Proxy
}

/// An entry of `pair.betas`: a β (or λ) value, or `best`, the β that `select.tune` picks per method.
#[derive(Debug, Clone, Copy, PartialEq)]
enum BetaChoice {
    Value(f64),
    Best,
}

impl<'de> Deserialize<'de> for BetaChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = BetaChoice;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a β value or `best`")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<BetaChoice, E> {
                Ok(BetaChoice::Value(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<BetaChoice, E> {
                Ok(BetaChoice::Value(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<BetaChoice, E> {
                Ok(BetaChoice::Value(v as f64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<BetaChoice, E> {
                match v {
                    "best" => Ok(BetaChoice::Best),
                    other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// The `pair` section as written in the YAML.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPairConfig {
    #[serde(default)]
    rejected: RejectedRule,
    #[serde(default)]
    min_margin: f64,
    #[serde(default)]
    methods: Option<Vec<Method>>,
    #[serde(default)]
    betas: Option<Vec<BetaChoice>>,
    #[serde(default)]
    sft: bool,
    #[serde(default)]
    vbon: bool,
    #[serde(default)]
    format: PairFormat,
    #[serde(default)]
    file_format: FileFormat,
    #[serde(default)]
    margin: MarginColumn,
    #[serde(default)]
    card: CardConfig,
}

impl From<RawPairConfig> for PairConfig {
    fn from(r: RawPairConfig) -> Self {
        let best_at = r.betas.as_ref().and_then(|bs| bs.iter().position(|b| *b == BetaChoice::Best));
        let best_count = r.betas.as_ref().map_or(0, |bs| bs.iter().filter(|b| **b == BetaChoice::Best).count());
        let betas = r.betas.map(|bs| {
            bs.into_iter()
                .filter_map(|b| match b {
                    BetaChoice::Value(v) => Some(v),
                    BetaChoice::Best => None,
                })
                .collect()
        });
        Self {
            rejected: r.rejected,
            min_margin: r.min_margin,
            methods: r.methods,
            betas,
            best: best_at.is_some(),
            sft: r.sft,
            vbon: r.vbon,
            format: r.format,
            file_format: r.file_format,
            margin: r.margin,
            card: r.card,
            best_at: best_at.map(|i| (i, best_count)),
        }
    }
}

/// The `pair` section: how chosen/rejected pairs are built and which are exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "RawPairConfig")]
pub struct PairConfig {
    /// `worst` (argmin proxy reward, default), `random` (seeded per prompt) or `second`
    /// (runner-up under the chosen method's objective).
    pub rejected: RejectedRule,
    /// Pairs whose proxy margin (score_chosen − score_rejected) is below this are dropped.
    pub min_margin: f64,
    /// Export only these methods (default: every method in `select.methods`).
    pub methods: Option<Vec<Method>>,
    /// Export only these β values (default: all of `select.betas`, and all of `select.lambdas`
    /// for `bon_unc`); methods without β always export. The YAML list may also hold `best`,
    /// which is kept apart in [`PairConfig::best`].
    pub betas: Option<Vec<f64>>,
    /// `pair.betas` lists `best`: export each method at the β that `select.tune` picks (the
    /// tuned values are passed to [`PairConfig::exports`] once the tuning has run).
    pub best: bool,
    /// Also write each export's SFT half (`<export>/sft/`: prompt + the chosen completion, TRL's
    /// prompt-completion format), the SFT term of BoNBoN alignment.
    pub sft: bool,
    /// Also write `vbon/`: every sample with log π_ref, its reward CDF and its variational-BoN
    /// log-weight.
    pub vbon: bool,
    /// `conversational` (message lists, default) or `standard` (strings rendered with the
    /// policy's chat template).
    pub format: PairFormat,
    /// `parquet` (default) or `jsonl`.
    pub file_format: FileFormat,
    /// `proxy` (default): exports carry `margin`; `none`: they leave it out. Left out of the
    /// serialized form at its default, so fingerprints made before it existed still hold.
    #[serde(default, skip_serializing_if = "is_proxy")]
    pub margin: MarginColumn,
    /// The pairs folder's dataset-card metadata (likewise left out at its default).
    #[serde(default, skip_serializing_if = "CardConfig::is_default")]
    pub card: CardConfig,
    /// Where `best` sat in the YAML list and how often it was listed, for diagnostics; set by
    /// deserialization.
    #[serde(skip)]
    pub best_at: Option<(usize, usize)>,
}

impl Default for PairConfig {
    fn default() -> Self {
        Self {
            rejected: RejectedRule::Worst,
            min_margin: 0.0,
            methods: None,
            betas: None,
            best: false,
            sft: false,
            vbon: false,
            format: PairFormat::Conversational,
            file_format: FileFormat::Parquet,
            margin: MarginColumn::Proxy,
            card: CardConfig::default(),
            best_at: None,
        }
    }
}

impl PairConfig {
    /// The settings the pairs shards are made with. With `pair.betas: best` they pair every β
    /// of the grid, so they do not depend on the tuning, which needs every shard's selections;
    /// the exports then keep the tuned β (and any listed) per method.
    pub fn for_shards(&self) -> Self {
        let mut p = self.clone();
        if p.best {
            p.betas = None;
            p.best = false;
        }
        // What the exports carry and their card do not change the pairs.
        p.margin = MarginColumn::default();
        p.card = CardConfig::default();
        p
    }

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

    /// Whether (method, β) is exported. With `best`, a method's tuned β (`tuned`: the β
    /// `select.tune` picked per method; empty before the tuning) is exported besides any values
    /// listed.
    pub fn exports(&self, select: &SelectConfig, method: Method, beta: f64, tuned: &BTreeMap<Method, f64>) -> bool {
        let listed = |bs: &Vec<f64>| bs.contains(&beta);
        let tuned = self.best && tuned.get(&method) == Some(&beta);
        self.export_methods(select).contains(&method)
            && (!method.uses_beta() || tuned || self.betas.as_ref().is_none_or(listed))
    }

    /// The position in the YAML list `pair.betas` of the i-th β value in [`PairConfig::betas`].
    fn beta_path(&self, i: usize) -> String {
        let shift = match self.best_at {
            Some((at, n)) if at <= i => n,
            _ => 0,
        };
        format!("pair.betas[{}]", i + shift)
    }

    /// Every problem with this section (`select` is `None` when it did not parse).
    pub fn check(&self, doc: &ConfigDoc, select: Option<&SelectConfig>, diags: &mut Diagnostics) {
        self.card.check(doc, diags);
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
        if let Some((at, n)) = self.best_at {
            let path = format!("pair.betas[{at}]");
            if select.tune.is_none() {
                diags.push(doc.diag(
                    &path,
                    "`best` needs `select.tune` (the tuning subset and gold reward that pick β per method)",
                ));
            }
            if n > 1 {
                diags.push(doc.diag(&path, "`best` is listed twice"));
            }
        }
        for m in self.export_methods(select) {
            if !self.best && !select.grid(m).iter().any(|&b| self.exports(select, m, b, &BTreeMap::new())) {
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
                    diags.push(
                        doc.diag(&self.beta_path(i), format!("β = {b} is not in select.betas or select.lambdas")),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(yaml: &str) -> (PairConfig, SelectConfig, Vec<String>) {
        let doc = ConfigDoc::parse(Path::new("p.yaml"), yaml).unwrap();
        let mut d = Diagnostics::default();
        let select: SelectConfig = doc.section("select", &mut d).unwrap();
        let pair: PairConfig = doc.section("pair", &mut d).unwrap();
        pair.check(&doc, Some(&select), &mut d);
        (pair, select, d.iter().map(|x| format!("{}: {}", x.path, x.message)).collect())
    }

    const SELECT: &str =
        "select:\n  proxy: proxy\n  gold: [gold]\n  methods: [bon, rbon_kl, rbon_wd]\n  betas: [0.1, 0.5, 1.0]\n";

    #[test]
    fn card_metadata_is_checked() {
        let (pair, _, problems) =
            parse(&format!("{SELECT}pair:\n  margin: none\n  card: {{ license: Apache 2.0, tags: [ok, \"\"] }}\n"));
        assert_eq!(pair.margin, MarginColumn::None);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("pair.card.license: `Apache 2.0` is not a Hub license id"), "{problems:?}");
        assert!(problems[1].starts_with("pair.card.tags[1]: "), "{problems:?}");
        let (pair, _, problems) = parse(&format!("{SELECT}pair:\n  card: {{ license: cc-by-4.0 }}\n"));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(pair.card.license, "cc-by-4.0");
        // Neither changes the pairs shards' settings, and at their defaults neither is serialized
        // (fingerprints of runs made before they existed hold).
        assert_eq!(
            serde_json::to_value(pair.for_shards()).unwrap(),
            serde_json::to_value(PairConfig::default()).unwrap()
        );
        assert!(serde_json::to_value(PairConfig::default()).unwrap().get("card").is_none());
    }

    #[test]
    fn best_exports_the_tuned_beta_of_each_method() {
        let tune = "  tune: { gold: gold, fraction: 0.5 }\n";
        let (pair, select, problems) =
            parse(&format!("{SELECT}{tune}pair:\n  betas: [best, 1.0]\n  format: standard\n  file_format: jsonl\n"));
        assert!(problems.is_empty(), "{problems:?}");
        assert!(pair.best);
        assert_eq!(pair.betas, Some(vec![1.0]));
        assert_eq!((pair.format, pair.file_format), (PairFormat::Standard, FileFormat::Jsonl));
        // Before tuning only the listed β exports; after, each method's own best too.
        assert!(!pair.exports(&select, Method::RbonKl, 0.1, &BTreeMap::new()));
        let tuned = BTreeMap::from([(Method::RbonKl, 0.1), (Method::RbonWd, 0.5)]);
        assert!(pair.exports(&select, Method::RbonKl, 0.1, &tuned));
        assert!(!pair.exports(&select, Method::RbonKl, 0.5, &tuned));
        assert!(pair.exports(&select, Method::RbonWd, 0.5, &tuned));
        assert!(pair.exports(&select, Method::RbonWd, 1.0, &tuned));
        assert!(pair.exports(&select, Method::Bon, 0.0, &tuned));
        // The shards pair every β of the grid: they do not depend on the tuning.
        let shards = pair.for_shards();
        assert!(!shards.best && shards.betas.is_none());
        assert!(shards.exports(&select, Method::RbonKl, 0.5, &BTreeMap::new()));
    }

    #[test]
    fn best_needs_select_tune_and_positions_stay_right() {
        let (_, _, problems) = parse(&format!("{SELECT}pair:\n  betas: [0.5, best, 0.3]\n"));
        assert_eq!(
            problems,
            [
                "pair.betas[1]: `best` needs `select.tune` (the tuning subset and gold reward that pick β per method)",
                "pair.betas[2]: β = 0.3 is not in select.betas or select.lambdas",
            ]
        );
        let doc = ConfigDoc::parse(Path::new("p.yaml"), "pair:\n  betas: [worst]\n").unwrap();
        let mut d = Diagnostics::default();
        assert!(doc.section::<PairConfig>("pair", &mut d).is_none());
        assert!(d.iter().any(|x| x.message.contains("expected a β value or `best`")), "{d}");
    }
}
