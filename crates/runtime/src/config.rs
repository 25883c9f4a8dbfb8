//! The pipeline YAML (DESIGN §7): the sections of every stage, composed and checked together.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use rbon_core::input::{InputConfig, candidates_header, file_kind, resolve_files};
use rbon_core::{ConfigDoc, Diagnostics};
use rbon_pair::PairConfig;
use rbon_regularize::{Available, SelectConfig};
use rbon_sample::{PolicyConfig, SampleConfig};
use rbon_score::ScoreConfig;

/// The top-level sections a pipeline may have.
pub const SECTIONS: [&str; 10] =
    ["name", "output", "seed", "input", "policy", "sample", "score", "select", "pair", "runtime"];

fn default_devices() -> Vec<String> {
    vec!["cpu".to_owned()]
}

fn default_batch_tokens() -> u64 {
    8192
}

/// The `runtime` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Devices that run model workers: `cpu`, `cuda:N`, `cuda:*` or `metal`.
    #[serde(default = "default_devices")]
    pub devices: Vec<String>,
    /// Token budget of one model batch.
    #[serde(default = "default_batch_tokens")]
    pub batch_tokens: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self { devices: default_devices(), batch_tokens: default_batch_tokens() }
    }
}

/// A whole pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineConfig {
    /// Run name, used in dataset cards.
    pub name: String,
    /// The run directory.
    pub output: PathBuf,
    /// Seed for every random choice (per prompt and sample, never per process).
    pub seed: u64,
    /// Where prompts or candidates come from, and how they are sharded.
    pub input: InputConfig,
    /// The reference policy that samples responses (with `input.path`).
    pub policy: Option<PolicyConfig>,
    /// How many responses per prompt and how they are drawn.
    pub sample: Option<SampleConfig>,
    /// Reward models and the embedder that score sampled responses.
    pub score: Option<ScoreConfig>,
    /// The selection rules and their β/λ grids; without it a run stops after sampling.
    pub select: Option<SelectConfig>,
    /// How pairs are built and exported.
    pub pair: PairConfig,
    /// Devices and batching.
    pub runtime: RuntimeConfig,
}

/// A parsed pipeline with the document it came from (for positions and freezing).
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub config: PipelineConfig,
    pub doc: ConfigDoc,
    /// What the candidates file offers, read from its header.
    pub available: Option<Available>,
}

/// Parses and checks a pipeline file. Every problem is reported at once; no model is loaded
/// and nothing is written.
pub fn load(path: &Path) -> Result<Pipeline, Diagnostics> {
    let doc = ConfigDoc::load(path)?;
    let mut d = Diagnostics::default();
    doc.check_top_level(&SECTIONS, &mut d);
    let name: Option<String> = doc.value("name", &mut d);
    let output: Option<String> = doc.value("output", &mut d);
    let seed: Option<u64> = doc.value("seed", &mut d);
    let input: Option<InputConfig> = doc.section("input", &mut d);
    let policy: Option<PolicyConfig> = doc.get("policy").and_then(|_| doc.section("policy", &mut d));
    let sample: Option<SampleConfig> = doc.get("sample").and_then(|_| doc.section("sample", &mut d));
    let score: Option<ScoreConfig> = doc.get("score").and_then(|_| doc.section("score", &mut d));
    let select: Option<SelectConfig> = match (doc.get("select"), &input) {
        // Prompts without reward models stop after sampling: `select` is optional there.
        (None, Some(i)) if i.candidates.is_none() => None,
        _ => doc.section("select", &mut d),
    };
    let pair: Option<PairConfig> = doc.section("pair", &mut d);
    let runtime: Option<RuntimeConfig> = doc.section("runtime", &mut d);

    let name = name.unwrap_or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
    if name.trim().is_empty() {
        d.push(doc.diag("name", "must not be empty"));
    }
    match &output {
        None if doc.get("output").is_none() => {
            d.push(doc.diag("output", "missing `output`: the run directory to write (e.g. `output: runs/demo`)"))
        }
        Some(o) if o.trim().is_empty() => d.push(doc.diag("output", "must not be empty")),
        Some(o) if Path::new(o).is_file() => {
            d.push(doc.diag("output", format!("{o} is a file; `output` must be a directory")))
        }
        _ => {}
    }
    let mut available = input.as_ref().and_then(|i| check_input(&doc, i, &mut d));
    if let Some(sc) = &score {
        sc.check(&doc, &mut d);
        // Sampled responses carry log-probs and token counts; the score stage adds the rest.
        if input.as_ref().is_some_and(|i| i.path.is_some()) {
            available = Some(Available {
                rewards: sc.names(),
                logprob: true,
                num_tokens: true,
                embedding: sc.embedding.is_some(),
                source: "the `score` section".into(),
            });
        }
        // Candidates: the score section adds rewards (and an embedding) the file lacks.
        if let Some(a) = available.as_mut().filter(|_| input.as_ref().is_some_and(|i| i.candidates.is_some())) {
            for (i, r) in sc.rewards.iter().enumerate() {
                if a.rewards.contains(&r.name) {
                    d.push(doc.diag(
                        &format!("score.rewards[{i}].name"),
                        format!("{} already has `reward_{}`; score only what it lacks", a.source, r.name),
                    ));
                }
            }
            if sc.embedding.is_some() && a.embedding {
                d.push(doc.diag("score.embedding", format!("{} already has `embedding`", a.source)));
            }
            a.rewards.extend(sc.names());
            a.embedding |= sc.embedding.is_some();
            a.source = format!("{} with the `score` section", a.source);
        }
    }
    // Candidates: rewards come from the file or from `score.rewards`; with neither there is
    // nothing to select with.
    if let (Some(i), Some(a)) = (&input, &available)
        && let Some(c) = &i.candidates
        && a.rewards.is_empty()
    {
        let columns = candidates_header(Path::new(c)).map(|h| h.columns.join(", ")).unwrap_or_default();
        d.push(doc.diag(
            "input.candidates",
            format!(
                "{c} has no `reward_<name>` column (found {columns}) and no `score.rewards` computes one: add reward models under `score.rewards`"
            ),
        ));
    }
    // Candidates: the policy adds log-probs (and token counts) by teacher forcing.
    if let Some(a) = available.as_mut().filter(|_| input.as_ref().is_some_and(|i| i.candidates.is_some()))
        && doc.get("policy").is_some()
    {
        if a.logprob {
            d.push(doc.diag("policy", format!("{} already has `logprob`; leave `policy` out", a.source)));
        }
        if policy.as_ref().is_some_and(|p| p.server().is_some()) {
            d.push(doc.diag(
                "policy.engine",
                "candidates are teacher-forced by the embedded engine; `server` samples `input.path` prompts: \
                 leave `engine` out",
            ));
        }
        a.logprob = true;
        a.num_tokens = true;
    }
    if let Some(p) = &policy {
        p.check(&doc, &mut d);
    }
    if let Some(s) = &sample {
        s.check(&doc, &mut d);
        if let Some(p) = &policy {
            s.check_positions(p, &doc, &mut d);
        }
    }
    if let Some(i) = &input {
        let (has_policy, has_sample) = (doc.get("policy").is_some(), doc.get("sample").is_some());
        if i.path.is_some() && !has_policy {
            d.push(doc.diag("policy", "missing `policy`: prompts need a model to sample responses from"));
        }
        if i.path.is_some() && !has_sample {
            d.push(doc.diag("sample", "missing `sample`: how many responses per prompt, and how"));
        }
        if i.candidates.is_some() && has_sample {
            d.push(doc.diag(
                "sample",
                "`input.candidates` already holds the responses; `sample` applies to `input.path` prompts",
            ));
        }
        if i.path.is_some() && doc.get("select").is_some() && doc.get("score").is_none() {
            d.push(doc.diag(
                "select",
                "selecting sampled responses needs reward scores: add a `score` section with reward models, \
                 or leave `select` out to stop after sampling",
            ));
        }
    }
    if let Some(s) = &select {
        s.check(&doc, available.as_ref(), &mut d);
    }
    if let Some(p) = &pair {
        p.check(&doc, select.as_ref(), &mut d);
        if p.format == rbon_pair::PairFormat::Standard && doc.get("policy").is_none() {
            d.push(doc.diag(
                "pair.format",
                "`standard` renders rows with the policy's chat template: add a `policy` section",
            ));
        }
    }
    if let Some(r) = &runtime {
        check_runtime(&doc, r, &mut d);
    }
    d.sort();
    match (d.is_empty(), output, input, pair, runtime) {
        (true, Some(output), Some(input), Some(pair), Some(runtime)) => Ok(Pipeline {
            config: PipelineConfig {
                name,
                output: PathBuf::from(output),
                seed: seed.unwrap_or(0),
                input,
                policy,
                sample,
                score,
                select,
                pair,
                runtime,
            },
            doc,
            available,
        }),
        _ => {
            if d.is_empty() {
                d.push(doc.diag("", "the pipeline is incomplete"));
            }
            Err(d)
        }
    }
}

/// The parts of a frozen pipeline (`RUN_DIR/pipeline.yaml`) that merging a finished run needs.
/// Read without the checks against inputs and model folders, which `rbon finalize` may not see
/// from where it runs.
#[derive(Debug, Clone)]
pub struct Frozen {
    pub name: String,
    pub select: Option<SelectConfig>,
    pub pair: PairConfig,
    /// For `pair.format: standard`, whose rows are rendered with the policy's chat template.
    pub policy: Option<PolicyConfig>,
    pub text: String,
}

/// Reads a frozen pipeline for `rbon finalize`.
pub fn load_frozen(path: &Path) -> Result<Frozen, Diagnostics> {
    let doc = ConfigDoc::load(path)?;
    let mut d = Diagnostics::default();
    let name: Option<String> = doc.value("name", &mut d);
    let select: Option<SelectConfig> = doc.get("select").and_then(|_| doc.section("select", &mut d));
    let pair: Option<PairConfig> = doc.section("pair", &mut d);
    let policy: Option<PolicyConfig> = doc.get("policy").and_then(|_| doc.section("policy", &mut d));
    match (d.is_empty(), pair) {
        (true, Some(pair)) => {
            Ok(Frozen { name: name.unwrap_or_default(), select, pair, policy, text: doc.text().to_owned() })
        }
        _ => {
            if d.is_empty() {
                d.push(doc.diag("pair", "missing `pair`"));
            }
            Err(d)
        }
    }
}

fn check_input(doc: &ConfigDoc, i: &InputConfig, d: &mut Diagnostics) -> Option<Available> {
    if i.shard_size == 0 {
        d.push(doc.diag("input.shard_size", "0 is not allowed: must be at least 1"));
    }
    if i.limit == Some(0) {
        d.push(doc.diag("input.limit", "0 is not allowed: must be at least 1, or null for all prompts"));
    }
    if i.prompt_column.is_some() && i.messages_column.is_some() {
        d.push(doc.diag("input.messages_column", "set either `prompt_column` or `messages_column`, not both"));
    }
    match (&i.path, &i.candidates) {
        (None, None) => {
            d.push(doc.diag(
                "input",
                "set `input.candidates` (responses with rewards made elsewhere) or `input.path` (prompts)",
            ));
            None
        }
        (Some(_), Some(_)) => {
            d.push(doc.diag("input.candidates", "set either `input.path` or `input.candidates`, not both"));
            None
        }
        (Some(p), None) => {
            if let Err(m) = resolve_files(p) {
                d.push(doc.diag("input.path", m));
            }
            None
        }
        (None, Some(c)) => {
            let p = Path::new(c);
            if !p.is_file() {
                d.push(doc.diag("input.candidates", format!("no such file: {c}")));
                return None;
            }
            if file_kind(p).is_none() {
                d.push(
                    doc.diag("input.candidates", format!("{c}: candidates must be a .parquet, .jsonl or .json file")),
                );
                return None;
            }
            match candidates_header(p) {
                Ok(h) => Some(Available {
                    rewards: h.rewards,
                    logprob: h.has_logprob,
                    num_tokens: h.has_num_tokens,
                    embedding: h.has_embedding,
                    source: format!("the candidates file {c}"),
                }),
                Err(e) => {
                    d.push(doc.diag("input.candidates", e.to_string()));
                    None
                }
            }
        }
    }
}

fn check_runtime(doc: &ConfigDoc, r: &RuntimeConfig, d: &mut Diagnostics) {
    if r.devices.is_empty() {
        d.push(doc.diag("runtime.devices", "must name at least one device (e.g. [cpu])"));
    }
    for (i, dev) in r.devices.iter().enumerate() {
        if let Err(m) = crate::devices::check_device(dev) {
            d.push(doc.diag(&format!("runtime.devices[{i}]"), m));
        }
    }
    if r.batch_tokens == 0 {
        d.push(doc.diag("runtime.batch_tokens", "0 is not allowed: must be at least 1"));
    }
}
