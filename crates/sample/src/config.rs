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
    /// Where samples are drawn: `embedded` (candle, in this process; the default) or `server`
    /// (an OpenAI-compatible completions server, configured under `server`).
    #[serde(default, skip_serializing_if = "Engine::is_embedded")]
    pub engine: Engine,
    /// The inference server of `engine: server`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerConfig>,
}

/// The policy's sampling engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// candle models in this process, on `runtime.devices`.
    #[default]
    Embedded,
    /// An OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp) over HTTP.
    Server,
}

impl Engine {
    pub fn is_embedded(&self) -> bool {
        *self == Self::Embedded
    }
}

/// Where each sample's log π_ref comes from with `engine: server`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogprobSource {
    /// The server's log-probability of each sampled token (vLLM: `--logprobs-mode raw_logprobs`,
    /// its default), summed by rbon.
    #[default]
    Server,
    /// Teacher forcing of the returned tokens by the local policy (`policy.model`, a copy on
    /// each device of `runtime.devices`): for servers that return no (or temperature-scaled)
    /// log-probs.
    TeacherForcing,
}

/// How the prompt is sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptForm {
    /// The token ids rbon rendered and encoded (vLLM, SGLang, llama.cpp accept them).
    #[default]
    Tokens,
    /// The rendered text, which the server encodes (for servers that take only text; the
    /// server's tokenizer must then encode it as rbon's does).
    Text,
}

/// The most requests in flight.
pub const MAX_CONCURRENCY: u32 = 4096;
/// The most retries of one request.
pub const MAX_RETRIES: u32 = 100;

fn d_concurrency() -> u32 {
    64
}
fn d_timeout() -> f64 {
    600.0
}
fn d_retries() -> u32 {
    5
}
fn yes() -> bool {
    true
}

/// The `policy.server` section: an OpenAI-compatible completions endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The OpenAI-compatible base URL, e.g. `http://127.0.0.1:8000/v1`.
    pub url: String,
    /// The served model name (what `/v1/models` lists).
    pub model: String,
    /// An environment variable holding the API key, sent as `Authorization: Bearer …`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// Requests in flight at most (one request is one sample).
    #[serde(default = "d_concurrency")]
    pub concurrency: u32,
    /// Seconds one request may take, connection included.
    #[serde(default = "d_timeout")]
    pub timeout_s: f64,
    /// Retries of a request after a 429, a 5xx, a timeout or a lost connection, with
    /// exponential backoff (0.5 s, 1 s, 2 s, … at most 30 s; a `Retry-After` header is obeyed).
    #[serde(default = "d_retries")]
    pub retries: u32,
    /// `server` or `teacher_forcing`.
    #[serde(default)]
    pub logprobs: LogprobSource,
    /// `tokens` or `text`.
    #[serde(default)]
    pub prompt: PromptForm,
    /// Before sampling, send one request twice with the same seed and fail when the two
    /// samples differ (a server that ignores the seed cannot reproduce a run).
    #[serde(default = "yes")]
    pub check_seed: bool,
}

impl ServerConfig {
    /// Every problem with this section that shows without contacting the server.
    pub fn check(&self, doc: &ConfigDoc, d: &mut Diagnostics) {
        let url = self.url.trim_end_matches('/');
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.contains(char::is_whitespace) {
            d.push(doc.diag(
                "policy.server.url",
                format!(
                    "{:?} is not an http(s) URL: give the OpenAI-compatible base, e.g. http://127.0.0.1:8000/v1",
                    self.url
                ),
            ));
        } else if reqwest::Url::parse(url).is_err() {
            d.push(doc.diag("policy.server.url", format!("{:?} is not a valid URL", self.url)));
        }
        if self.model.trim().is_empty() {
            d.push(doc.diag("policy.server.model", "empty: give the served model name (what /v1/models lists)"));
        }
        if let Some(var) = &self.api_key_env
            && std::env::var_os(var).is_none()
        {
            d.push(doc.diag("policy.server.api_key_env", format!("the environment variable {var} is not set")));
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            d.push(doc.diag(
                "policy.server.concurrency",
                format!("{} is not allowed: between 1 and {MAX_CONCURRENCY} requests in flight", self.concurrency),
            ));
        }
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0 && self.timeout_s <= 86_400.0) {
            d.push(
                doc.diag(
                    "policy.server.timeout_s",
                    format!("{} is not allowed: seconds in (0, 86400]", self.timeout_s),
                ),
            );
        }
        if self.retries > MAX_RETRIES {
            d.push(
                doc.diag("policy.server.retries", format!("{} is not allowed: at most {MAX_RETRIES}", self.retries)),
            );
        }
    }

    /// The completions endpoint.
    pub fn completions_url(&self) -> String {
        format!("{}/completions", self.url.trim_end_matches('/'))
    }

    /// The models endpoint.
    pub fn models_url(&self) -> String {
        format!("{}/models", self.url.trim_end_matches('/'))
    }

    /// The parts that decide what the server returns: not the address, concurrency, timeout or
    /// retries, so moving the server or tuning the client keeps finished shards.
    pub fn identity(&self) -> serde_json::Value {
        serde_json::json!({ "model": self.model, "logprobs": self.logprobs, "prompt": self.prompt })
    }
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

/// The most new tokens per response (a model's context is the tighter bound, checked against
/// its positions).
pub const MAX_NEW_TOKENS: u32 = 1 << 20;

impl SampleConfig {
    /// `max_new_tokens` against the embedded policy's positions (prompt included); a server's
    /// context is checked per prompt when the run asks it.
    pub fn check_positions(&self, policy: &PolicyConfig, doc: &ConfigDoc, d: &mut Diagnostics) {
        if policy.server().is_some() {
            return;
        }
        if let Ok(c) = policy.decoder_config()
            && self.max_new_tokens as usize >= c.max_position_embeddings
        {
            d.push(doc.diag(
                "sample.max_new_tokens",
                format!(
                    "{} is not allowed: the policy has {} positions, the prompt included",
                    self.max_new_tokens, c.max_position_embeddings
                ),
            ));
        }
    }

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
        if self.max_new_tokens > MAX_NEW_TOKENS {
            d.push(doc.diag(
                "sample.max_new_tokens",
                format!("{} is not allowed: at most {MAX_NEW_TOKENS}", self.max_new_tokens),
            ));
        }
        for (i, s) in self.stop.iter().enumerate() {
            if s.is_empty() {
                d.push(doc.diag(&format!("sample.stop[{i}]"), "an empty stop string would end every response at once"));
            }
        }
    }
}

impl PolicyConfig {
    /// The embedded engine on `model` with every other key at its default.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            dtype: DTypeName::default(),
            chat_template: auto(),
            system_prompt: None,
            engine: Engine::Embedded,
            server: None,
        }
    }

    /// The server section when the engine is `server`.
    pub fn server(&self) -> Option<&ServerConfig> {
        match self.engine {
            Engine::Server => self.server.as_ref(),
            Engine::Embedded => None,
        }
    }

    /// The content digests of every file the policy's outputs depend on: the model folder's
    /// ([`ModelDir::input_files`]) and a chat template given by path.
    pub fn model_identity(
        &self,
        files: &rbon_core::FileDigests,
    ) -> Result<Vec<(String, String)>, rbon_core::StageError> {
        let dir = ModelDir::resolve(&self.model).map_err(rbon_core::StageError::other)?;
        // A server's samples depend on the local folder only through its tokenizer and template
        // (the weights are the server's); teacher forcing reads the weights too.
        let mut inputs = match self.server() {
            Some(s) if s.logprobs == LogprobSource::Server => dir.text_files(),
            _ => dir.input_files().map_err(rbon_core::StageError::other)?,
        };
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

    /// The local model's configuration: the GGUF header, or config.json.
    pub fn decoder_config(&self) -> Result<DecoderConfig, rbon_models::ModelError> {
        let dir = ModelDir::resolve(&self.model)?;
        match dir.gguf() {
            Some(file) => rbon_models::inspect_gguf(file).map(|m| m.config),
            None => dir
                .read("config.json")
                .and_then(|t| DecoderConfig::from_json(&t, &dir.root().join("config.json").display().to_string())),
        }
    }

    /// What the sample stage's fingerprint holds of this section: all of it for the embedded
    /// engine; for a server, what decides its samples ([`ServerConfig::identity`]).
    pub fn identity(&self) -> serde_json::Value {
        let mut local = self.clone();
        let server = local.server.take();
        let mut v = serde_json::to_value(&local).unwrap_or_default();
        if let (Some(s), Some(obj)) = (server.filter(|_| self.engine == Engine::Server), v.as_object_mut()) {
            obj.insert("server".into(), s.identity());
        }
        v
    }

    /// Every problem with this section that shows without loading weights or contacting a
    /// server: the folder, its config.json or GGUF header (architecture, tensor types), the
    /// template choice and the server section.
    pub fn check(&self, doc: &ConfigDoc, d: &mut Diagnostics) {
        let server = self.server();
        match (self.engine, &self.server) {
            (Engine::Server, None) => d.push(
                doc.diag("policy.engine", "`server` needs a `policy.server` section with at least `url` and `model`"),
            ),
            (Engine::Embedded, Some(_)) => d.push(
                doc.diag("policy.server", "read only with `policy.engine: server`; add it or remove this section"),
            ),
            (Engine::Server, Some(s)) => s.check(doc, d),
            (Engine::Embedded, None) => {}
        }
        match ModelDir::resolve(&self.model) {
            Err(e) => d.push(doc.diag("policy.model", e.to_string())),
            // With a server, only the tokenizer and template are read (and the weights for
            // teacher forcing).
            Ok(dir) if server.is_some_and(|s| s.logprobs == LogprobSource::Server) => {
                if dir.file("tokenizer.json").is_none() {
                    d.push(doc.diag("policy.model", format!("{} has no tokenizer.json", dir.root().display())));
                }
            }
            Ok(dir) => {
                let cfg = self.decoder_config().map(|_| ());
                if let Err(e) = cfg {
                    d.push(doc.diag("policy.model", e.to_string()));
                }
                if dir.file("tokenizer.json").is_none() {
                    d.push(doc.diag("policy.model", format!("{} has no tokenizer.json", dir.root().display())));
                }
            }
        }
        self.check_template(doc, d);
    }

    /// A chat template given by path exists; the tokenizer and chat template load and render a
    /// plain conversation (a template's syntax errors and runaway loops show here, naming its
    /// file).
    fn check_template(&self, doc: &ConfigDoc, d: &mut Diagnostics) {
        let named = !matches!(self.chat_template.as_str(), "auto" | "none");
        if named && !Path::new(&self.chat_template).is_file() {
            d.push(doc.diag(
                "policy.chat_template",
                format!("no such file: {} (use auto, none, or the path of a .jinja file)", self.chat_template),
            ));
            return;
        }
        let Ok(dir) = ModelDir::resolve(&self.model) else { return };
        if dir.file("tokenizer.json").is_none() {
            return;
        }
        let choice = rbon_models::chat::template_choice(&self.chat_template, Path::new("."));
        // One plain conversation renders: a template that fails on it, or never ends, fails here.
        let probe = [Message::new("user", "Hello")];
        let checked = rbon_models::ChatTokenizer::load(&dir, &choice).and_then(|t| t.render(&probe, true));
        if let Err(e) = checked {
            d.push(doc.diag(if named { "policy.chat_template" } else { "policy.model" }, e.to_string()));
        }
    }
}
