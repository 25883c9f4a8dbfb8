//! Running a pipeline over its run directory. Every stage's fingerprint (its config plus its
//! inputs' fingerprints) is known before any work; a shard that already exists with its stage's
//! fingerprint is reused, and with a single rank a stage whose fingerprint changed is discarded
//! first. The shards then stream through the stages ([`crate::exec`]), and the run is merged
//! into its exports ([`crate::finalize`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use rbon_core::input::{CandidatesIndex, InputConfig, for_each_prompt, resolve_files, scan_candidates};
use rbon_core::rundir::{RANKS_DIR, fingerprint};
use rbon_core::shard;
use rbon_core::{CoreError, Event, Manifest, Progress, RunDir};
use rbon_pair::{Export, PairError};
use rbon_regularize::SelectError;

use crate::config::{Pipeline, PipelineConfig};
use crate::finalize::{Merge, merge};
use crate::ranks::Ranks;
use crate::stages::Ctx;

/// rbon's version, recorded in manifests and cards.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Errors of a run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Core(#[from] CoreError),
    /// Stopped on request after writing the shards in flight.
    #[error("interrupted: {done} of {total} shards went through every stage; the rest are left for a rerun")]
    Interrupted { done: usize, total: usize },
    /// The run cannot be merged (yet), or its ranks disagree.
    #[error("{0}")]
    NotFinished(String),
    /// The command line or the devices do not fit the run.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Select(#[from] SelectError),
    #[error(transparent)]
    Pair(#[from] PairError),
    #[error(transparent)]
    Sample(Box<rbon_sample::SampleError>),
    #[error(transparent)]
    Score(Box<rbon_score::ScoreError>),
    #[error("report: {0}")]
    Report(Box<rbon_report::ReportError>),
}

impl From<rbon_report::ReportError> for RunError {
    fn from(e: rbon_report::ReportError) -> Self {
        Self::Report(Box::new(e))
    }
}

impl From<rbon_score::ScoreError> for RunError {
    fn from(e: rbon_score::ScoreError) -> Self {
        Self::Score(Box::new(e))
    }
}

impl From<rbon_sample::SampleError> for RunError {
    fn from(e: rbon_sample::SampleError) -> Self {
        Self::Sample(Box::new(e))
    }
}

impl RunError {
    /// True when the user's data, not the environment, is at fault.
    pub fn is_data(&self) -> bool {
        match self {
            Self::Core(e) => e.is_data(),
            Self::Interrupted { .. } | Self::NotFinished(_) | Self::Usage(_) | Self::Report(_) => false,
            Self::Select(SelectError::Core(e)) | Self::Pair(PairError::Core(e)) => e.is_data(),
            Self::Sample(e) => matches!(e.as_ref(), rbon_sample::SampleError::Core(c) if c.is_data()),
            Self::Score(e) => matches!(e.as_ref(), rbon_score::ScoreError::Core(c) if c.is_data()),
            Self::Select(_) | Self::Pair(_) => true,
        }
    }
}

/// Options of `rbon run`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Discard everything in the run directory first.
    pub force: bool,
    /// This process's rank; shard i belongs to rank i mod world size.
    pub ranks: Ranks,
}

/// What one stage did.
#[derive(Debug, Clone, PartialEq)]
pub struct StageReport {
    pub stage: String,
    /// What the stage is called in progress and summaries: its name, or for a candidates
    /// import (the `samples` stage of such a run) what the import computes.
    pub label: String,
    pub shards: usize,
    pub reused: usize,
    pub counters: BTreeMap<String, u64>,
    /// Time the stage's workers spent on the shards written now (stages overlap in time).
    pub busy: Duration,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub run_dir: PathBuf,
    /// This process's stages (its own shards, unless `finalized`).
    pub stages: Vec<StageReport>,
    pub ranks: Ranks,
    /// The shards were merged (exports written or up to date); false for a rank of several,
    /// which leaves that to `rbon finalize`.
    pub finalized: bool,
    pub exports: Vec<Export>,
    /// True when the exports were already up to date and left alone.
    pub exports_reused: bool,
    /// The variational-BoN export's files, when `pair.vbon` is on.
    pub vbon_files: Vec<PathBuf>,
    /// The report, when the run was merged and selects.
    pub report: Option<rbon_report::Report>,
}

#[derive(Serialize)]
struct ImportFingerprint<'a> {
    input: &'a InputConfig,
    files_sha256: Vec<String>,
    /// The prompts table holds the conversation with `policy.system_prompt` applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    system_prompt: Option<&'a str>,
}

#[derive(Serialize)]
struct SelectFingerprint<'a> {
    select: &'a rbon_regularize::SelectConfig,
    seed: Option<u64>,
}

#[derive(Serialize)]
struct PairFingerprint<'a> {
    rejected: rbon_pair::RejectedRule,
    min_margin: f64,
    methods: &'a Option<Vec<rbon_regularize::Method>>,
    betas: &'a Option<Vec<f64>>,
    /// Only `rejected: random` draws.
    seed: Option<u64>,
}

#[derive(Serialize)]
struct ExportFingerprint<'a> {
    name: &'a str,
    config_text: &'a str,
}

#[derive(Serialize)]
struct SampleFingerprint<'a> {
    policy: &'a rbon_sample::PolicyConfig,
    sample: &'a rbon_sample::SampleConfig,
    seed: u64,
    /// config.json and the weight files' names and sizes: a changed model redoes sampling
    /// without hashing gigabytes of weights.
    model: Vec<(String, u64)>,
}

#[derive(Serialize)]
struct ScoreFingerprint<'a> {
    score: &'a rbon_score::ScoreConfig,
    models: Vec<Vec<(String, u64)>>,
}

/// What a run starts from, checked in full before the run directory is touched. Neither is
/// held in memory: prompts are counted and candidates indexed here, and both are streamed again
/// by the pipeline.
pub(crate) enum Source {
    Candidates { path: PathBuf, index: CandidatesIndex, fp: String },
    Prompts { count: usize, fp: String },
}

impl Source {
    fn prompts(&self) -> usize {
        match self {
            Self::Candidates { index, .. } => index.prompts(),
            Self::Prompts { count, .. } => *count,
        }
    }
}

fn read_source(cfg: &PipelineConfig) -> Result<Source, RunError> {
    if let Some(c) = cfg.input.candidates.as_deref() {
        let path = PathBuf::from(c);
        let file_sha256 = hash_file(&path)?;
        let index = scan_candidates(&path, cfg.input.limit)?;
        if let Some(select) = &cfg.select
            && select.methods.iter().any(|m| m.needs_num_tokens())
            && let Some(loc) = &index.zero_num_tokens
        {
            return Err(CoreError::data(loc, "`num_tokens` is 0; rbon_len divides by the length").into());
        }
        let fp = fingerprint(
            "import",
            &ImportFingerprint { input: &cfg.input, files_sha256: vec![file_sha256], system_prompt: None },
            &[],
        );
        return Ok(Source::Candidates { path, index, fp });
    }
    let spec = cfg.input.path.as_deref().unwrap_or_default();
    let files = resolve_files(spec).map_err(|m| CoreError::data("input.path", m))?;
    let files_sha256 = files.iter().map(|f| hash_file(f)).collect::<Result<Vec<_>, _>>()?;
    // A first pass checks every row (and counts them) without keeping any.
    let count = for_each_prompt(&cfg.input, |_| Ok(true))?;
    let system_prompt = cfg.policy.as_ref().and_then(|p| p.system_prompt.as_deref());
    let fp = fingerprint("prompts", &ImportFingerprint { input: &cfg.input, files_sha256, system_prompt }, &[]);
    Ok(Source::Prompts { count, fp })
}

/// SHA-256 of a file, streamed.
fn hash_file(path: &std::path::Path) -> Result<String, CoreError> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path).map_err(|e| CoreError::io(path, e))?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| CoreError::io(path, e))?;
    Ok(rbon_core::seed::hex(&h.finalize()))
}

fn model_identity(spec: &str) -> Result<Vec<(String, u64)>, RunError> {
    let dir = rbon_models::ModelDir::resolve(spec).map_err(rbon_sample::SampleError::from)?;
    // config.json and the safetensors, or the GGUF file.
    let files = dir.model_files().map_err(rbon_sample::SampleError::from)?;
    let mut out = Vec::new();
    for f in files {
        let len = std::fs::metadata(&f).map_err(|e| CoreError::io(&f, e))?.len();
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tag = if name == "config.json" { hash_file(&f)? } else { name };
        out.push((tag, len));
    }
    Ok(out)
}

fn score_fingerprint(sc: &rbon_score::ScoreConfig, upstream: &[&str]) -> Result<String, RunError> {
    let mut models = sc.rewards.iter().map(|r| model_identity(&r.model)).collect::<Result<Vec<_>, _>>()?;
    if let Some(e) = &sc.embedding {
        models.push(model_identity(&e.model)?);
    }
    Ok(fingerprint("scores", &ScoreFingerprint { score: sc, models }, upstream))
}

/// What a candidates import is called: `import`, with what it computes for the file.
fn import_label(cfg: &PipelineConfig) -> String {
    let mut parts = Vec::new();
    if cfg.policy.is_some() {
        parts.push("log-probs");
    }
    if cfg.score.as_ref().is_some_and(|s| !s.rewards.is_empty()) {
        parts.push("rewards");
    }
    if cfg.score.as_ref().is_some_and(|s| s.embedding.is_some()) {
        parts.push("embeddings");
    }
    if parts.is_empty() { "import".to_owned() } else { format!("import ({})", parts.join(", ")) }
}

/// The stages a run goes through and every stage's fingerprint, known before any work.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub n_shards: usize,
    /// The shard stages in order. A candidates import is the `samples` stage (it writes the
    /// prompts and scores shards too).
    pub chain: Vec<&'static str>,
    /// What each stage of `chain` is called in progress events and reports.
    pub labels: Vec<String>,
    pub fps: BTreeMap<String, String>,
    /// The exports' fingerprint, when the run makes pairs.
    pub export_fp: Option<String>,
}

fn plan(p: &Pipeline, source: &Source, n_shards: usize) -> Result<Plan, RunError> {
    let cfg = &p.config;
    let mut chain = Vec::new();
    let mut labels = Vec::new();
    let mut fps = BTreeMap::new();
    let fp_scores = match source {
        Source::Candidates { fp, .. } => {
            // What the file lacks and the config can compute: log-probs with the policy, rewards
            // and embeddings with the score section. Their models join the import fingerprint.
            let mut identity = vec![fp.clone()];
            if let Some(pc) = &cfg.policy {
                identity.push(fingerprint("policy", &(pc, model_identity(&pc.model)?), &[]));
            }
            if let Some(sc) = &cfg.score {
                identity.push(score_fingerprint(sc, &[])?);
            }
            let refs: Vec<&str> = identity.iter().map(String::as_str).collect();
            let fp = fingerprint("import", &(), &refs);
            chain.push("samples");
            labels.push(import_label(cfg));
            for stage in ["prompts", "samples", "scores"] {
                fps.insert(stage.to_owned(), fp.clone());
            }
            Some(fp)
        }
        Source::Prompts { fp, .. } => {
            let (Some(policy_cfg), Some(sample_cfg)) = (&cfg.policy, &cfg.sample) else {
                return Err(CoreError::internal("prompts input without policy and sample passed validation").into());
            };
            chain.push("prompts");
            labels.push("prompts".to_owned());
            fps.insert("prompts".to_owned(), fp.clone());
            let identity = SampleFingerprint {
                policy: policy_cfg,
                sample: sample_cfg,
                seed: cfg.seed,
                model: model_identity(&policy_cfg.model)?,
            };
            let fp_samples = fingerprint("samples", &identity, &[fp]);
            chain.push("samples");
            labels.push("samples".to_owned());
            fps.insert("samples".to_owned(), fp_samples.clone());
            match &cfg.score {
                Some(sc) => {
                    let fp_scores = score_fingerprint(sc, &[&fp_samples])?;
                    chain.push("scores");
                    labels.push("scores".to_owned());
                    fps.insert("scores".to_owned(), fp_scores.clone());
                    Some(fp_scores)
                }
                None => None,
            }
        }
    };
    let mut export_fp = None;
    if let (Some(select), Some(fp_scores)) = (&cfg.select, fp_scores) {
        // The seed reaches selection only through the stochastic rules.
        let select_seed = select.methods.iter().any(|m| m.is_stochastic()).then_some(cfg.seed);
        // λ only matters to bon_unc.
        let mut select_fp = select.clone();
        if !select_fp.methods.contains(&rbon_regularize::Method::BonUnc) {
            select_fp.lambdas.clear();
        }
        // Tuning reads selections; it does not change them.
        select_fp.tune = None;
        let fp_select =
            fingerprint("selections", &SelectFingerprint { select: &select_fp, seed: select_seed }, &[&fp_scores]);
        // sft/vbon/format only shape the exports, whose fingerprint covers the whole config text.
        let pair = shard_pair_config(&cfg.pair);
        let pair_fp = PairFingerprint {
            rejected: pair.rejected,
            min_margin: pair.min_margin,
            methods: &pair.methods,
            betas: &pair.betas,
            seed: (cfg.pair.rejected == rbon_pair::RejectedRule::Random).then_some(cfg.seed),
        };
        let fp_pairs = fingerprint("pairs", &pair_fp, &[&fp_select]);
        export_fp = Some(fingerprint(
            "export",
            &ExportFingerprint { name: &cfg.name, config_text: p.doc.text() },
            &[&fp_pairs],
        ));
        chain.extend(["selections", "pairs"]);
        labels.extend(["selections".to_owned(), "pairs".to_owned()]);
        fps.insert("selections".to_owned(), fp_select);
        fps.insert("pairs".to_owned(), fp_pairs);
    }
    Ok(Plan { n_shards, chain, labels, fps, export_fp })
}

/// The pair configuration of the pairs shards. With `pair.betas: best`, the shards pair every β
/// of the grid, so they do not depend on the tuning, which needs every shard's selections; the
/// exports then keep the tuned β (and any listed) per method.
pub(crate) fn shard_pair_config(pair: &rbon_pair::PairConfig) -> rbon_pair::PairConfig {
    let mut p = pair.clone();
    if p.best {
        p.betas = None;
        p.best = false;
        p.best_betas.clear();
    }
    p
}

/// Whether `dir` holds something other than an rbon run (hidden temporaries and the ranks'
/// folder of a run another rank is just creating do not count).
fn foreign(dir: &std::path::Path) -> bool {
    if dir.join("manifest.json").is_file() {
        return false;
    }
    std::fs::read_dir(dir).is_ok_and(|d| {
        d.flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            !name.starts_with('.') && name != RANKS_DIR && name != "pipeline.yaml"
        })
    })
}

/// Runs (or resumes) a pipeline: this rank's shards through every stage, then, with a single
/// rank, the merge into exports.
pub fn run(p: &Pipeline, opts: RunOptions, progress: &dyn Progress) -> Result<RunReport, RunError> {
    let cfg = &p.config;
    let ranks = opts.ranks;
    let multi = ranks.world_size > 1;
    if opts.force && multi {
        return Err(RunError::Usage(
            "--force with several ranks would let one rank delete another's shards; clear the run directory \
             (or run once with --force on a single rank) before launching the ranks"
                .into(),
        ));
    }
    let devices = crate::devices::open(&cfg.runtime.devices).map_err(RunError::Usage)?;
    // Read and check the whole input before touching the run directory: bad data leaves nothing behind.
    let source = read_source(cfg)?;
    let shard_size = cfg.input.shard_size.max(1) as usize;
    let n_shards = source.prompts().div_ceil(shard_size);

    if foreign(&cfg.output) {
        return Err(CoreError::RunDir {
            path: cfg.output.clone(),
            message: "exists, is not empty and is not an rbon run directory (no manifest.json); \
                      choose another `output`"
                .into(),
        }
        .into());
    }
    let run = RunDir::create(&cfg.output)?;
    let _lock = if multi { run.lock_rank(ranks.rank)? } else { run.lock()? };
    if opts.force {
        run.clear_all()?;
    }
    let mut manifest = run.read_manifest()?;
    manifest.rbon_version = crate::VERSION.to_owned();
    manifest.name = cfg.name.clone();
    if !multi || !run.manifest_path().is_file() {
        run.write_manifest(&manifest)?;
    }
    run.freeze_config(p.doc.text())?;
    run.remove_other_ranks(ranks.world_size)?;
    let plan = plan(p, &source, n_shards)?;

    let mut stage_dirs: Vec<&str> = plan.chain.clone();
    if matches!(source, Source::Candidates { .. }) {
        stage_dirs.extend(["prompts", "scores"]);
    }
    for stage in &stage_dirs {
        let fp = plan.fps.get(*stage).map(String::as_str).unwrap_or_default();
        if !multi {
            invalidate(&run, &mut manifest, stage, fp, progress)?;
        } else if manifest.stages.get(*stage).is_some_and(|s| s.fingerprint != fp) {
            // With several ranks, each overwrites only its own stale shards.
            progress.event(Event::Invalidated {
                stage: (*stage).to_owned(),
                reason: "its configuration or inputs changed; this rank redoes its shards".into(),
            });
        }
        shard::remove_stale_temps_of(&run.stage_dir(stage), |i| i.is_some_and(|i| ranks.owns(i)) || !multi)?;
    }
    if multi {
        let owned = rbon_core::RankState::owned(ranks.rank, ranks.world_size, n_shards).count();
        progress.event(Event::Info {
            message: format!("rank {} of {}: {owned} of {n_shards} shards", ranks.rank, ranks.world_size),
        });
    }

    let ctx = Ctx { cfg, run: &run, plan: &plan, progress };
    let outcome = crate::exec::execute(&ctx, &source, ranks, &devices, (!multi).then_some(&mut manifest))?;
    if multi {
        return Ok(RunReport {
            run_dir: cfg.output.clone(),
            stages: outcome.reports,
            ranks,
            finalized: false,
            exports: Vec::new(),
            exports_reused: false,
            vbon_files: Vec::new(),
            report: None,
        });
    }
    let m = Merge {
        run: &run,
        world_size: 1,
        n_shards,
        chain: plan.chain.iter().map(|s| s.to_string()).collect(),
        fps: plan.fps.clone(),
        export_fp: plan.export_fp.clone().unwrap_or_default(),
        name: &cfg.name,
        select: cfg.select.as_ref(),
        pair: &cfg.pair,
        policy: cfg.policy.as_ref(),
        config_text: p.doc.text(),
    };
    let merged = merge(&m, &outcome.metas, &mut manifest, progress)?;
    Ok(RunReport {
        run_dir: cfg.output.clone(),
        stages: outcome.reports,
        ranks,
        finalized: true,
        exports: merged.exports,
        exports_reused: merged.exports_reused,
        vbon_files: merged.vbon_files,
        report: merged.report,
    })
}

/// Discards a stage's output when it was made under another fingerprint.
fn invalidate(run: &RunDir, m: &mut Manifest, stage: &str, fp: &str, progress: &dyn Progress) -> Result<(), CoreError> {
    let stale = match m.stages.get(stage) {
        Some(s) => s.fingerprint != fp,
        // No record: keep only shards whose own fingerprint matches (checked per shard).
        None => false,
    };
    if stale {
        run.clear_stage(stage)?;
        m.stages.remove(stage);
        progress.event(Event::Invalidated {
            stage: stage.to_owned(),
            reason: "its configuration or inputs changed".into(),
        });
    }
    Ok(())
}
