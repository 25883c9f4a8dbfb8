use std::path::Path;

use serde::{Deserialize, Serialize};

use rbon_core::{ConfigDoc, Diagnostics, Message};
use rbon_models::{DTypeName, DecoderConfig, ModelDir};

fn auto() -> String {
    "auto".to_owned()
}

/// The `policy` section: the reference model π_ref that samples are drawn from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// A Hugging Face model folder, a hub id already in the local Hugging Face cache, or a
    /// GGUF model: a `.gguf` file, or a folder holding exactly one, whose folder also holds
    /// tokenizer.json and tokenizer_config.json (the tokenizer inside the GGUF is not used).
    pub model: String,
    /// Precision of the activations and dense weights: `f32`, `bf16` or `f16` (quantized GGUF
    /// weights stay quantized).
    #[serde(default)]
    pub dtype: DTypeName,
    /// `auto` (the folder's template), `none` (contents joined, tokenizer's BOS added) or the
    /// path of a `.jinja` file.
    #[serde(default = "auto")]
    pub chat_template: String,
    /// A system turn put before prompts that have none. It becomes part of the conversation
    /// stored in the prompts table, so sampling, teacher forcing, reward models and exports all
    /// see the same context.
    #[serde(default)]
    pub system_prompt: Option<String>,
}

fn d_n() -> u32 {
    16
}
fn d_one() -> f32 {
    1.0
}
fn d_max_new() -> u32 {
    128
}

/// The `sample` section: how many responses per prompt, and how they are drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleConfig {
    /// Responses per prompt (N).
    #[serde(default = "d_n")]
    pub n: u32,
    /// Softmax temperature of the draws (0 = greedy). RBoN assumes samples from π_ref: 1.0.
    #[serde(default = "d_one")]
    pub temperature: f32,
    /// Nucleus sampling mass (1.0 = off).
    #[serde(default = "d_one")]
    pub top_p: f32,
    /// Keep the k most likely tokens (0 = off).
    #[serde(default)]
    pub top_k: u32,
    /// Drop tokens below this fraction of the most likely token's probability (0 = off).
    #[serde(default)]
    pub min_p: f32,
    /// Most tokens per response, EOS included.
    #[serde(default = "d_max_new")]
    pub max_new_tokens: u32,
    /// Strings that end a response (not included in it), besides the model's EOS tokens.
    #[serde(default)]
    pub stop: Vec<String>,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self { n: d_n(), temperature: 1.0, top_p: 1.0, top_k: 0, min_p: 0.0, max_new_tokens: d_max_new(), stop: vec![] }
    }
}

/// The most responses per prompt.
pub const MAX_N: u64 = 65_536;

impl SampleConfig {
    /// Every problem with this section.
    pub fn check(&self, doc: &ConfigDoc, d: &mut Diagnostics) {
        if self.n == 0 {
            d.push(doc.diag("sample.n", "0 is not allowed: must be at least 1"));
        }
        // Every response of a prompt is held (and compared, for rbon_wd and mbr) at once.
        if u64::from(self.n) > MAX_N {
            d.push(doc.diag("sample.n", format!("{} is not allowed: at most {MAX_N} responses per prompt", self.n)));
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            d.push(
                doc.diag(
                    "sample.temperature",
                    format!("{} is not allowed: must be ≥ 0 (0 = greedy)", self.temperature),
                ),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            d.push(doc.diag("sample.top_p", format!("{} is not allowed: must be in (0, 1]", self.top_p)));
        }
        if !(self.min_p >= 0.0 && self.min_p < 1.0) {
            d.push(doc.diag("sample.min_p", format!("{} is not allowed: must be in [0, 1)", self.min_p)));
        }
        if self.max_new_tokens == 0 {
            d.push(doc.diag("sample.max_new_tokens", "0 is not allowed: must be at least 1"));
        }
        for (i, s) in self.stop.iter().enumerate() {
            if s.is_empty() {
                d.push(doc.diag(&format!("sample.stop[{i}]"), "an empty stop string would end every response at once"));
            }
        }
    }
}

impl PolicyConfig {
    /// The content digests of every file the policy's outputs depend on: the model folder's
    /// ([`ModelDir::input_files`]) and a chat template given by path.
    pub fn model_identity(
        &self,
        files: &rbon_core::FileDigests,
    ) -> Result<Vec<(String, String)>, rbon_core::StageError> {
        let dir = ModelDir::resolve(&self.model).map_err(rbon_core::StageError::other)?;
        let mut inputs = dir.input_files().map_err(rbon_core::StageError::other)?;
        if !matches!(self.chat_template.as_str(), "auto" | "none") {
            inputs.push(Path::new(&self.chat_template).to_owned());
        }
        Ok(files.of_files(dir.root(), &inputs)?)
    }

    /// The conversation the policy answers: `messages` with the system prompt put first when one
    /// is configured and the conversation has no system turn of its own.
    pub fn conversation(&self, messages: Vec<Message>) -> Vec<Message> {
        match &self.system_prompt {
            Some(sys) if messages.first().is_none_or(|m| m.role != "system") => {
                let mut out = Vec::with_capacity(messages.len() + 1);
                out.push(Message::new("system", sys));
                out.extend(messages);
                out
            }
            _ => messages,
        }
    }

    /// Every problem with this section that shows without loading weights: the folder, its
    /// config.json or GGUF header (architecture, tensor types) and the template choice.
    pub fn check(&self, doc: &ConfigDoc, d: &mut Diagnostics) {
        match ModelDir::resolve(&self.model) {
            Err(e) => d.push(doc.diag("policy.model", e.to_string())),
            Ok(dir) => {
                let cfg = match dir.gguf() {
                    Some(file) => rbon_models::inspect_gguf(file).map(|_| ()),
                    None => dir.read("config.json").and_then(|t| {
                        DecoderConfig::from_json(&t, &dir.root().join("config.json").display().to_string()).map(|_| ())
                    }),
                };
                if let Err(e) = cfg {
                    d.push(doc.diag("policy.model", e.to_string()));
                }
                if dir.file("tokenizer.json").is_none() {
                    d.push(doc.diag("policy.model", format!("{} has no tokenizer.json", dir.root().display())));
                }
            }
        }
        if !matches!(self.chat_template.as_str(), "auto" | "none") && !Path::new(&self.chat_template).is_file() {
            d.push(doc.diag(
                "policy.chat_template",
                format!("no such file: {} (use auto, none, or the path of a .jinja file)", self.chat_template),
            ));
        }
    }
}
