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
}

/// The sentence embedder for RBoN_WD and MBR.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingSpec {
    /// A sentence-transformers folder (BERT family), e.g. all-MiniLM-L6-v2.
    pub model: String,
    /// Activations stay f32 whatever it says (candle's BERT yields NaN in half precision); on a
    /// CPU with AMX, `bf16` makes the encoder's matrix products bf16.
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
        let specs =
            self.rewards.iter().map(|r| r.model.as_str()).chain(self.embedding.iter().map(|e| e.model.as_str()));
        specs
            .map(|spec| {
                let dir = ModelDir::resolve(spec).map_err(rbon_core::StageError::other)?;
                let inputs = dir.input_files().map_err(rbon_core::StageError::other)?;
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
