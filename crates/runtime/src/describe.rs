//! What `rbon validate` says about the models a pipeline would load: for each, its role, the
//! folder it resolves to (a local path or a snapshot in the Hugging Face cache), its
//! architecture, how it is read and how much it weighs. Nothing is loaded.

use rbon_models::ModelDir;
use rbon_score::{HeadPooling, RewardKind, RewardSpec};

use crate::config::Pipeline;

/// One model of a pipeline, described.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelLine {
    /// `policy`, `reward <name> (proxy)`, `reward <name> (gold)`, `embedding`.
    pub role: String,
    /// As written in the pipeline.
    pub spec: String,
    /// Where it resolves, when it does (`None` for an inference server's model).
    pub folder: Option<String>,
    /// Architecture and how it is read, e.g. `mistral EurusRewardModel; head regression_head at
    /// the last token`.
    pub what: String,
    /// `bf16`, `f32`, …
    pub dtype: String,
    /// Weight files and their total size in bytes.
    pub weights: Option<(usize, u64)>,
}

impl std::fmt::Display for ModelLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.role, self.spec)?;
        if let Some(folder) = &self.folder
            && folder != &self.spec
        {
            write!(f, " → {folder}")?;
        }
        write!(f, "\n    {}, {}", self.what, self.dtype)?;
        if let Some((n, bytes)) = self.weights {
            write!(f, ", {n} weight file{} ({})", if n == 1 { "" } else { "s" }, size(bytes))?;
        }
        Ok(())
    }
}

fn size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.0} kB", b / 1e3)
    }
}

/// The architecture a folder's config.json names: `model_type` and `architectures`.
fn architecture(dir: &ModelDir) -> String {
    if let Some(g) = dir.gguf() {
        return format!("GGUF {}", g.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    }
    let cfg: serde_json::Value =
        dir.read("config.json").ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    let model_type = cfg.get("model_type").and_then(|v| v.as_str()).unwrap_or("?");
    let archs: Vec<&str> = cfg
        .get("architectures")
        .and_then(|a| a.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    if archs.is_empty() { model_type.to_owned() } else { format!("{model_type} {}", archs.join(", ")) }
}

fn weights(dir: &ModelDir) -> Option<(usize, u64)> {
    let files = dir.model_files().ok()?;
    let files: Vec<_> = files.into_iter().filter(|f| f.extension().is_some_and(|e| e != "json")).collect();
    let bytes = files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
    Some((files.len(), bytes))
}

fn folder_line(role: String, spec: &str, what: impl FnOnce(&ModelDir) -> String, dtype: String) -> ModelLine {
    match ModelDir::resolve(spec) {
        Ok(dir) => ModelLine {
            role,
            spec: spec.to_owned(),
            folder: Some(dir.root().display().to_string()),
            what: what(&dir),
            dtype,
            weights: weights(&dir),
        },
        Err(e) => ModelLine { role, spec: spec.to_owned(), folder: None, what: e.to_string(), dtype, weights: None },
    }
}

/// How a reward model is read, in words.
fn reading(r: &RewardSpec, dir: &ModelDir) -> String {
    let model_type = dir
        .read("config.json")
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|c| c.get("model_type").and_then(|v| v.as_str()).map(str::to_owned))
        .unwrap_or_default();
    if r.kind == RewardKind::Classifier && model_type == "deberta-v2" {
        return "text-pair classifier of (the prompt's turns, the response)".to_owned();
    }
    match r.kind {
        RewardKind::Pairrm => format!(
            "PairRM: each sample against the prompt's others, all N(N−1) ordered comparisons, reward = {}",
            match r.aggregate.unwrap_or_default() {
                rbon_score::PairAggregate::Rank => "1 − (rank − 1)/(N − 1)",
                rbon_score::PairAggregate::WinRate => "share of the others it beats",
                rbon_score::PairAggregate::MeanLogit => "mean logit difference",
            }
        ),
        RewardKind::Shp => "SteamSHP judge: P(\"A\") at the first decoding step, SHP's input template".to_owned(),
        RewardKind::Seq2seq => format!(
            "seq2seq judge: P({:?}) at the first decoding step of {:?}",
            r.token.as_deref().unwrap_or_default(),
            r.template.as_deref().unwrap_or_default()
        ),
        RewardKind::Classifier => {
            let at = match &r.pooling {
                Some(HeadPooling::Token { token }) => format!("at the last {token:?}"),
                _ => "at the last token".to_owned(),
            };
            match &r.head {
                Some(h) => format!("head `{h}` {at}, chat template {}", r.chat_template),
                None => format!("`score` head {at} of the conversation, chat template {}", r.chat_template),
            }
        }
    }
}

/// Every model the pipeline would load, in the order the stages load them.
pub fn describe_models(p: &Pipeline) -> Vec<ModelLine> {
    let cfg = &p.config;
    let mut out = Vec::new();
    if let Some(pc) = &cfg.policy {
        let role = "policy".to_owned();
        let dtype = pc.dtype.to_string();
        match pc.server() {
            Some(s) => out.push(ModelLine {
                role,
                spec: s.model.clone(),
                folder: None,
                what: format!("served at {} (tokenizer and template from {})", s.url, pc.model),
                dtype,
                weights: None,
            }),
            None => out.push(folder_line(
                role,
                &pc.model,
                |d| format!("{}, chat template {}", architecture(d), pc.chat_template),
                dtype,
            )),
        }
    }
    if let Some(sc) = &cfg.score {
        let select = cfg.select.as_ref();
        for r in &sc.rewards {
            let part = match select {
                Some(s) if s.proxy.names().contains(&r.name) => " (proxy)",
                Some(s) if s.gold.contains(&r.name) => " (gold)",
                _ => "",
            };
            let role = format!("reward {}{part}", r.name);
            out.push(folder_line(
                role,
                &r.model,
                |d| format!("{}; {}", architecture(d), reading(r, d)),
                r.dtype.to_string(),
            ));
        }
        if let Some(e) = &sc.embedding {
            out.push(folder_line(
                "embedding".to_owned(),
                &e.model,
                |d| format!("{}; mean-pooled, normalised (sentence-transformers)", architecture(d)),
                e.dtype.to_string(),
            ));
        }
    }
    out
}
