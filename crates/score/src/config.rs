use serde::{Deserialize, Serialize};

use rbon_core::{ConfigDoc, Diagnostics};
use rbon_models::{DTypeName, ModelDir};

fn auto() -> String {
    "auto".to_owned()
}

/// One reward model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSpec {
    /// Its column is `reward_<name>`; `select.proxy` and `select.gold` refer to it by name.
    pub name: String,
    /// A `*ForSequenceClassification` folder (Llama, Mistral, Qwen2, Qwen3, DeBERTa-v2/v3), or a
    /// hub id in the local Hugging Face cache.
    pub model: String,
    /// Weight precision: `f32`, `bf16` or `f16`.
    #[serde(default)]
    pub dtype: DTypeName,
    /// The reward model's own chat template: `auto`, `none` or a `.jinja` path (decoders only).
    #[serde(default = "auto")]
    pub chat_template: String,
    /// What kind of judge it is: a sequence classifier (default), the SHP preset or another
    /// seq2seq judge.
    #[serde(default, skip_serializing_if = "RewardKind::is_classifier")]
    pub kind: RewardKind,
    /// A decoder with its own linear head instead of `score` (Eurus-RM's `regression_head`,
    /// Starling-RM's `v_head`): the head's tensor prefix (`<head>.weight`, one output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    /// Which token a decoder's head reads: `last` (default) or `{ token: "<text>" }`, the last
    /// occurrence of that token in the input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooling: Option<HeadPooling>,
    /// A seq2seq judge's input, with `{prompt}` and `{response}` in it (`kind: seq2seq`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// The token whose probability at the judge's first decoding step is the reward
    /// (`kind: seq2seq`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// How PairRM's pairwise comparisons of a prompt's N samples become each sample's reward
    /// (`kind: pairrm`; default `rank`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<PairAggregate>,
}

/// A PairRM reward: each sample against the prompt's other samples, from all N(N−1) ordered
/// comparisons. Relative within the prompt's samples, so not comparable across prompts (or
/// across N).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairAggregate {
    /// 1 − (rank − 1)/(N − 1) by llm-blender's `rank` (scores of mean logit differences; ties
    /// share the better rank): 1 for the best sample, 0 for the worst (the paper's reward).
    #[default]
    Rank,
    /// The share of the other samples it beats, a comparison d_ij = logit(i, j) − logit(j, i)
    /// (both orders) counting 1 when positive and ½ when 0 (the paper's win-ratio evaluation).
    WinRate,
    /// llm-blender's score itself: (1/N) Σ_j d_ij.
    MeanLogit,
}

/// A reward model's kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    /// `*ForSequenceClassification` (decoders, DeBERTa-v2/v3), or a decoder with `head`.
    #[default]
    Classifier,
    /// Stanford's SteamSHP (Flan-T5): the probability that the response is "A" when asked to
    /// compare it with an empty response B (the RBoN paper's proxy).
    Shp,
    /// Another seq2seq (T5) judge: `template` and `token` say what it reads and which token's
    /// first-step probability is the reward.
    Seq2seq,
    /// llm-blender's PairRM (`llm-blender/PairRM-hf`): a DeBERTa-v3 that compares two responses
    /// to one prompt; `aggregate` turns the comparisons into rewards.
    Pairrm,
}

impl RewardKind {
    fn is_classifier(&self) -> bool {
        *self == Self::Classifier
    }
}

/// The token a decoder reward model's head reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HeadPooling {
    /// `last`: the input's last token.
    Last(LastToken),
    /// `{ token: "<text>" }`: the last occurrence of this token (one id of the tokenizer).
    Token { token: String },
}

/// The word `last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LastToken {
    Last,
}

/// SteamSHP's input (the RBoN paper's reward_model.py), newlines of prompt and response
/// replaced by spaces.
pub const SHP_TEMPLATE: &str =
    "POST: {prompt} \n\n RESPONSE A: {response}\n\n RESPONSE B: .\n\n Which response is better? RESPONSE";

/// The token SHP's reward is the probability of.
pub const SHP_TOKEN: &str = "A";

impl RewardSpec {
    /// A sequence classifier at `model` (default settings otherwise).
    pub fn classifier(name: &str, model: &str) -> Self {
        Self {
            name: name.to_owned(),
            model: model.to_owned(),
            dtype: DTypeName::default(),
            chat_template: auto(),
            kind: RewardKind::Classifier,
            head: None,
            pooling: None,
            template: None,
            token: None,
            aggregate: None,
        }
    }

    /// A seq2seq judge's template, token and whether newlines become spaces.
    pub fn seq2seq(&self) -> Option<(&str, &str, bool)> {
        match self.kind {
            RewardKind::Classifier | RewardKind::Pairrm => None,
            RewardKind::Shp => Some((SHP_TEMPLATE, SHP_TOKEN, true)),
            RewardKind::Seq2seq => Some((self.template.as_deref()?, self.token.as_deref()?, false)),
        }
    }

    fn check(&self, doc: &ConfigDoc, path: &str, d: &mut Diagnostics) {
        let decoder_only =
            |d: &mut Diagnostics, key: &str| {
                d.push(doc.diag(
                    &format!("{path}.{key}"),
                    format!("`{key}` applies to decoder classifiers (`kind: classifier`)"),
                ))
            };
        let seq2seq_only = |d: &mut Diagnostics, key: &str| {
            d.push(doc.diag(&format!("{path}.{key}"), format!("`{key}` applies to `kind: seq2seq`")))
        };
        if self.aggregate.is_some() && self.kind != RewardKind::Pairrm {
            d.push(doc.diag(&format!("{path}.aggregate"), "`aggregate` applies to `kind: pairrm`"));
        }
        match self.kind {
            RewardKind::Pairrm => {
                for (key, set) in [
                    ("head", self.head.is_some()),
                    ("pooling", self.pooling.is_some()),
                    ("template", self.template.is_some()),
                    ("token", self.token.is_some()),
                    ("chat_template", self.chat_template != "auto"),
                ] {
                    if set {
                        d.push(doc.diag(
                            &format!("{path}.{key}"),
                            format!("`{key}` does not apply to `kind: pairrm` (it reads the prompt and two responses its own way)"),
                        ));
                    }
                }
            }
            RewardKind::Classifier => {
                for (key, set) in [("template", self.template.is_some()), ("token", self.token.is_some())] {
                    if set {
                        seq2seq_only(d, key);
                    }
                }
                if let Some(h) = &self.head
                    && (h.is_empty() || h.starts_with('.') || h.ends_with('.'))
                {
                    d.push(
                        doc.diag(
                            &format!("{path}.head"),
                            format!("`{h}` is not a tensor prefix (e.g. regression_head)"),
                        ),
                    );
                }
                if let Some(HeadPooling::Token { token }) = &self.pooling
                    && token.is_empty()
                {
                    d.push(doc.diag(&format!("{path}.pooling.token"), "must not be empty"));
                }
            }
            RewardKind::Shp | RewardKind::Seq2seq => {
                for (key, set) in [("head", self.head.is_some()), ("pooling", self.pooling.is_some())] {
                    if set {
                        decoder_only(d, key);
                    }
                }
                if self.kind == RewardKind::Shp {
                    for (key, set) in [("template", self.template.is_some()), ("token", self.token.is_some())] {
                        if set {
                            d.push(doc.diag(
                                &format!("{path}.{key}"),
                                "`kind: shp` is SteamSHP's preset; use `kind: seq2seq` to set your own",
                            ));
                        }
                    }
                } else {
                    match &self.template {
                        None => d.push(doc.diag(
                            &format!("{path}.template"),
                            "`kind: seq2seq` needs a `template` with {response} in it",
                        )),
                        Some(t) if !t.contains("{response}") => {
                            d.push(doc.diag(&format!("{path}.template"), "must contain {response}"))
                        }
                        _ => {}
                    }
                    if self.token.as_deref().is_none_or(str::is_empty) {
                        d.push(doc.diag(
                            &format!("{path}.token"),
                            "`kind: seq2seq` needs the `token` whose probability is the reward",
                        ));
                    }
                }
                if self.chat_template != "auto" {
                    d.push(doc.diag(
                        &format!("{path}.chat_template"),
                        "a seq2seq judge reads `template`, not a chat template",
                    ));
                }
            }
        }
    }
}

/// The sentence embedder for RBoN_WD and MBR.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingSpec {
    /// A sentence-transformers folder (BERT family), e.g. all-MiniLM-L6-v2.
    pub model: String,
    /// Activations stay f32 whatever it says (candle's BERT yields NaN in half precision); on a
    /// CPU with AMX or AVX-512-BF16, `bf16` makes the encoder's matrix products bf16.
    #[serde(default)]
    pub dtype: DTypeName,
}

/// The `score` section: reward models and the embedder applied to every sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreConfig {
    /// Reward models, each a `reward_<name>` column (may be empty when the embedding is all a
    /// candidates file lacks).
    #[serde(default)]
    pub rewards: Vec<RewardSpec>,
    /// The sentence embedder (needed by `rbon_wd` and `mbr`).
    #[serde(default)]
    pub embedding: Option<EmbeddingSpec>,
}

impl ScoreConfig {
    /// Reward names, in order.
    pub fn names(&self) -> Vec<String> {
        self.rewards.iter().map(|r| r.name.clone()).collect()
    }

    /// The content digests of every model of the section, reward models first (every file
    /// its loader reads: [`rbon_models::ModelDir::input_files`]).
    pub fn model_identities(
        &self,
        files: &rbon_core::FileDigests,
    ) -> Result<Vec<Vec<(String, String)>>, rbon_core::StageError> {
        // A reward model's chat template given by path is read like its folder's files.
        let templates =
            self.rewards.iter().map(|r| Some(r.chat_template.as_str()).filter(|t| !matches!(*t, "auto" | "none")));
        let specs = self
            .rewards
            .iter()
            .map(|r| r.model.as_str())
            .zip(templates)
            .chain(self.embedding.iter().map(|e| (e.model.as_str(), None)));
        specs
            .map(|(spec, template)| {
                let dir = ModelDir::resolve(spec).map_err(rbon_core::StageError::other)?;
                let mut inputs = dir.input_files().map_err(rbon_core::StageError::other)?;
                if let Some(t) = template {
                    inputs.push(std::path::PathBuf::from(t));
                }
                Ok(files.of_files(dir.root(), &inputs)?)
            })
            .collect()
    }

    /// Every problem that shows without loading weights.
    pub fn check(&self, doc: &ConfigDoc, d: &mut Diagnostics) {
        if self.rewards.is_empty() && self.embedding.is_none() {
            d.push(doc.diag(
                "score",
                "must list reward models (`rewards: [{ name, model }]`), an `embedding` model, or both",
            ));
        }
        for (i, r) in self.rewards.iter().enumerate() {
            let path = format!("score.rewards[{i}]");
            if r.name.is_empty() || !r.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                d.push(
                    doc.diag(
                        &format!("{path}.name"),
                        format!("`{}` is not allowed: use letters, digits and _", r.name),
                    ),
                );
            }
            if self.rewards[..i].iter().any(|o| o.name == r.name) {
                d.push(doc.diag(&format!("{path}.name"), format!("`{}` is listed twice", r.name)));
            }
            check_folder(doc, &format!("{path}.model"), &r.model, d);
            r.check(doc, &path, d);
            check_kind(doc, &path, r, d);
        }
        if let Some(e) = &self.embedding {
            check_folder(doc, "score.embedding.model", &e.model, d);
            check_embedder(doc, &e.model, d);
        }
    }
}

/// The embedder is a BERT encoder (sentence-transformers' all-MiniLM-L6-v2 and its kin), not a
/// decoder or another family, by its config.json.
fn check_embedder(doc: &ConfigDoc, spec: &str, d: &mut Diagnostics) {
    let Ok(dir) = ModelDir::resolve(spec) else { return };
    let Ok(text) = dir.read("config.json") else {
        d.push(doc.diag("score.embedding.model", format!("{} has no config.json", dir.root().display())));
        return;
    };
    let cfg: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let model_type = cfg.get("model_type").and_then(|v| v.as_str()).unwrap_or("none");
    if model_type != "bert" {
        let arch = cfg.get("architectures").map(|a| a.to_string()).unwrap_or_default();
        d.push(doc.diag(
            "score.embedding.model",
            format!(
                "{} is a `{model_type}` model {arch}; the embedder must be a BERT sentence-transformers model \
                 (model_type `bert`, e.g. all-MiniLM-L6-v2)",
                dir.root().display()
            ),
        ));
    }
}

/// The model's architecture fits its `kind`: a seq2seq judge is a T5 folder, a classifier is not.
fn check_kind(doc: &ConfigDoc, path: &str, r: &RewardSpec, d: &mut Diagnostics) {
    let Ok(dir) = ModelDir::resolve(&r.model) else { return };
    let Ok(text) = dir.read("config.json") else { return };
    let cfg: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let model_type = cfg.get("model_type").and_then(|v| v.as_str()).unwrap_or("none");
    let pairrm = cfg.get("cand1_prefix_id").is_some();
    if pairrm != (r.kind == RewardKind::Pairrm) {
        let message = if pairrm {
            format!("{} is a PairRM pairwise ranker: set `kind: pairrm`", dir.root().display())
        } else {
            format!(
                "{} is not a PairRM folder (llm-blender/PairRM-hf's config.json, with cand1_prefix_id and the other \
                 prefix ids)",
                dir.root().display()
            )
        };
        d.push(doc.diag(&format!("{path}.{}", if pairrm { "model" } else { "kind" }), message));
        return;
    }
    if pairrm {
        return;
    }
    if model_type == "deberta-v2" && (r.head.is_some() || r.pooling.is_some()) {
        let key = if r.head.is_some() { "head" } else { "pooling" };
        d.push(doc.diag(
            &format!("{path}.{key}"),
            format!("{} is a DeBERTa text-pair classifier; `{key}` applies to decoders", dir.root().display()),
        ));
    }
    let seq2seq = model_type == "t5";
    if seq2seq && r.kind == RewardKind::Classifier {
        d.push(doc.diag(
            &format!("{path}.model"),
            format!(
                "{} is a T5 (seq2seq) model: set `kind: shp` (SteamSHP) or `kind: seq2seq` with `template` and `token`",
                dir.root().display()
            ),
        ));
    } else if !seq2seq && r.kind != RewardKind::Classifier {
        d.push(doc.diag(
            &format!("{path}.kind"),
            format!(
                "{} is a `{model_type}` model; `kind: {}` needs a T5 folder",
                dir.root().display(),
                kind_name(r.kind)
            ),
        ));
    }
}

fn kind_name(k: RewardKind) -> &'static str {
    match k {
        RewardKind::Classifier => "classifier",
        RewardKind::Shp => "shp",
        RewardKind::Seq2seq => "seq2seq",
        RewardKind::Pairrm => "pairrm",
    }
}

fn check_folder(doc: &ConfigDoc, path: &str, spec: &str, d: &mut Diagnostics) {
    match ModelDir::resolve(spec) {
        Err(e) => d.push(doc.diag(path, e.to_string())),
        Ok(dir) => {
            if dir.file("tokenizer.json").is_none() {
                d.push(doc.diag(path, format!("{} has no tokenizer.json", dir.root().display())));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use super::*;

    fn problems(rewards: &str) -> Vec<String> {
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/models");
        let yaml = format!("score:\n  rewards:\n{}", rewards.replace("MODELS", &models.display().to_string()));
        let doc = ConfigDoc::parse(Path::new("p.yaml"), &yaml).unwrap();
        let mut d = Diagnostics::default();
        if let Some(sc) = doc.section::<ScoreConfig>("score", &mut d) {
            sc.check(&doc, &mut d);
        }
        d.iter().map(|x| format!("{}: {}", x.path, x.message)).collect()
    }

    #[test]
    fn each_kind_takes_its_own_keys_and_fits_its_folder() {
        assert!(problems("    - { name: shp, model: MODELS/tiny-shp, kind: shp }\n").is_empty());
        assert!(
            problems("    - { name: e, model: MODELS/tiny-eurus-rm, head: regression_head, pooling: last }\n")
                .is_empty()
        );
        assert!(
            problems("    - { name: e, model: MODELS/tiny-eurus-rm, head: h, pooling: { token: \"[/INST]\" } }\n")
                .is_empty()
        );
        let generic = "    - { name: j, model: MODELS/tiny-shp, kind: seq2seq, template: \"Q: {prompt} A: {response}\", token: \"A\" }\n";
        assert!(problems(generic).is_empty());

        let p = problems("    - { name: shp, model: MODELS/tiny-shp }\n");
        assert!(p.len() == 1 && p[0].contains("is a T5 (seq2seq) model: set `kind: shp`"), "{p:?}");
        let p = problems("    - { name: shp, model: MODELS/tiny-rm-qwen2, kind: shp }\n");
        assert!(
            p.len() == 1 && p[0].starts_with("score.rewards[0].kind: ") && p[0].contains("needs a T5 folder"),
            "{p:?}"
        );
        let p = problems("    - { name: shp, model: MODELS/tiny-shp, kind: shp, token: B, head: x }\n");
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p.iter().any(|m| m.starts_with("score.rewards[0].token: `kind: shp` is SteamSHP's preset")), "{p:?}");
        assert!(
            p.iter().any(|m| m.starts_with("score.rewards[0].head: `head` applies to decoder classifiers")),
            "{p:?}"
        );
        let p = problems("    - { name: j, model: MODELS/tiny-shp, kind: seq2seq, template: \"{prompt}\" }\n");
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("must contain {response}") || p[1].contains("must contain {response}"), "{p:?}");
        assert!(
            problems("    - { name: p, model: MODELS/tiny-pairrm, kind: pairrm, aggregate: win_rate }\n").is_empty()
        );
        let p = problems("    - { name: p, model: MODELS/tiny-pairrm }\n");
        assert!(p.len() == 1 && p[0].contains("is a PairRM pairwise ranker: set `kind: pairrm`"), "{p:?}");
        let p = problems("    - { name: p, model: MODELS/tiny-deberta-rm, kind: pairrm }\n");
        assert!(
            p.len() == 1 && p[0].starts_with("score.rewards[0].kind: ") && p[0].contains("not a PairRM folder"),
            "{p:?}"
        );
        let p = problems("    - { name: p, model: MODELS/tiny-pairrm, kind: pairrm, head: x, chat_template: none }\n");
        assert_eq!(p.len(), 2, "{p:?}");
        let p = problems("    - { name: p, model: MODELS/tiny-rm-qwen2, aggregate: rank }\n");
        assert!(p.len() == 1 && p[0].contains("`aggregate` applies to `kind: pairrm`"), "{p:?}");
        let p = problems("    - { name: e, model: MODELS/tiny-eurus-rm, pooling: first }\n");
        assert!(p.len() == 1 && p[0].starts_with("score.rewards[0]"), "{p:?}");
    }
}
