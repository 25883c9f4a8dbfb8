//! Running a pipeline over its run directory, stage by stage, shard by shard. A stage whose
//! fingerprint (its config plus its inputs' fingerprints) changed is discarded and redone; a
//! shard that already exists with the current fingerprint is reused.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use rbon_core::input::{CandidateGroup, InputConfig, read_candidates, read_prompts, resolve_files};
use rbon_core::rundir::fingerprint;
use rbon_core::schema;
use rbon_core::shard::{self, ShardMeta};
use rbon_core::tables::{self, SampleScores};
use rbon_core::{CoreError, Event, Manifest, Message, Progress, RunDir, StageState};
use rbon_pair::{CardContext, Export, PairError, export_key, pair_shard, pairs_batch, write_exports};
use rbon_regularize::{SelectError, select_shard, selections_batch, sweep};

use crate::config::{Pipeline, PipelineConfig};

/// rbon's version, recorded in manifests and cards.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Errors of a run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Core(#[from] CoreError),
    /// Stopped on request after writing the shards in flight.
    #[error("interrupted after {stage}: {done} of {total} shards written")]
    Interrupted { stage: String, done: usize, total: usize },
    #[error(transparent)]
    Select(#[from] SelectError),
    #[error(transparent)]
    Pair(#[from] PairError),
    #[error(transparent)]
    Sample(Box<rbon_sample::SampleError>),
    #[error(transparent)]
    Score(Box<rbon_score::ScoreError>),
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
            Self::Interrupted { .. } => false,
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
}

/// What one stage did.
#[derive(Debug, Clone, PartialEq)]
pub struct StageReport {
    pub stage: String,
    pub shards: usize,
    pub reused: usize,
    pub counters: BTreeMap<String, u64>,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub run_dir: PathBuf,
    pub stages: Vec<StageReport>,
    pub exports: Vec<Export>,
    /// True when the exports were already up to date and left alone.
    pub exports_reused: bool,
    /// The variational-BoN export's files, when `pair.vbon` is on.
    pub vbon_files: Vec<PathBuf>,
}

#[derive(Serialize)]
struct ImportFingerprint<'a> {
    input: &'a InputConfig,
    files_sha256: Vec<String>,
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

/// What a run starts from, read and checked in full before the run directory is touched.
enum Source {
    Candidates { groups: Vec<CandidateGroup>, rewards: Vec<String>, embedding_dim: Option<usize>, fp: String },
    Prompts { rows: Vec<(String, Vec<Message>)>, fp: String },
}

fn read_source(cfg: &PipelineConfig) -> Result<Source, RunError> {
    if let Some(c) = cfg.input.candidates.as_deref() {
        let path = PathBuf::from(c);
        let file_sha256 = hash_file(&path)?;
        let cands = read_candidates(&path, cfg.input.limit)?;
        if let Some(select) = &cfg.select
            && select.methods.iter().any(|m| m.needs_num_tokens())
        {
            let zero = cands.groups.iter().flat_map(|g| &g.samples).find(|s| s.num_tokens == Some(0));
            if let Some(s) = zero {
                return Err(CoreError::data(&s.location, "`num_tokens` is 0; rbon_len divides by the length").into());
            }
        }
        let fp = fingerprint("import", &ImportFingerprint { input: &cfg.input, files_sha256: vec![file_sha256] }, &[]);
        return Ok(Source::Candidates {
            groups: cands.groups,
            rewards: cands.rewards,
            embedding_dim: cands.embedding_dim,
            fp,
        });
    }
    let spec = cfg.input.path.as_deref().unwrap_or_default();
    let files = resolve_files(spec).map_err(|m| CoreError::data("input.path", m))?;
    let files_sha256 = files.iter().map(|f| hash_file(f)).collect::<Result<Vec<_>, _>>()?;
    let rows = read_prompts(&cfg.input)?.into_iter().map(|r| (r.prompt_id, r.messages)).collect();
    let fp = fingerprint("prompts", &ImportFingerprint { input: &cfg.input, files_sha256 }, &[]);
    Ok(Source::Prompts { rows, fp })
}

/// SHA-256 of a file, streamed.
fn hash_file(path: &std::path::Path) -> Result<String, CoreError> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path).map_err(|e| CoreError::io(path, e))?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| CoreError::io(path, e))?;
    Ok(rbon_core::seed::hex(&h.finalize()))
}

/// Runs (or resumes) a pipeline.
pub fn run(p: &Pipeline, opts: RunOptions, progress: &dyn Progress) -> Result<RunReport, RunError> {
    let cfg = &p.config;
    // Read and check the whole input before touching the run directory: bad data leaves nothing behind.
    let source = read_source(cfg)?;
    let shard_size = cfg.input.shard_size.max(1) as usize;

    let foreign = std::fs::read_dir(&cfg.output).is_ok_and(|mut d| d.next().is_some())
        && !cfg.output.join("manifest.json").is_file();
    if foreign {
        return Err(CoreError::RunDir {
            path: cfg.output.clone(),
            message: "exists, is not empty and is not an rbon run directory (no manifest.json); \
                      choose another `output`"
                .into(),
        }
        .into());
    }
    let run = RunDir::create(&cfg.output)?;
    let _lock = run.lock()?;
    if opts.force {
        run.clear_all()?;
    }
    let mut manifest = run.read_manifest()?;
    manifest.rbon_version = VERSION.to_owned();
    manifest.name = cfg.name.clone();
    run.freeze_config(p.doc.text())?;
    shard::remove_stale_temps(run.root())?;

    let mut reports = Vec::new();
    let (n_shards, fp_scores) = match &source {
        Source::Candidates { groups, rewards, embedding_dim, fp } => {
            let chunks: Vec<&[CandidateGroup]> = groups.chunks(shard_size).collect();
            // What the file lacks and the config can compute: log-probs with the policy, rewards
            // and embeddings with the score section. Their models join the import fingerprint.
            let mut identity = vec![fp.clone()];
            if let Some(pc) = &cfg.policy {
                identity.push(fingerprint("policy", &(pc, model_identity(&pc.model)?), &[]));
            }
            if let Some(sc) = &cfg.score {
                let mut models = sc.rewards.iter().map(|r| model_identity(&r.model)).collect::<Result<Vec<_>, _>>()?;
                if let Some(e) = &sc.embedding {
                    models.push(model_identity(&e.model)?);
                }
                identity.push(fingerprint("score", &ScoreFingerprint { score: sc, models }, &[]));
            }
            let refs: Vec<&str> = identity.iter().map(String::as_str).collect();
            let fp = fingerprint("import", &(), &refs);
            let complete = Completion { cfg, rewards, embedding_dim: *embedding_dim };
            reports.push(import_candidates(&run, &mut manifest, &chunks, &complete, &fp, progress)?);
            (chunks.len(), fp)
        }
        Source::Prompts { rows, fp } => {
            let chunks: Vec<&[(String, Vec<Message>)]> = rows.chunks(shard_size).collect();
            let (r, fp_samples) = prompts_and_samples(cfg, &run, &mut manifest, &chunks, fp, progress)?;
            reports.extend(r);
            match &cfg.score {
                Some(score) => {
                    let (r, fp_scores) =
                        score_stage(cfg, score, &run, &mut manifest, chunks.len(), &fp_samples, progress)?;
                    reports.push(r);
                    (chunks.len(), fp_scores)
                }
                None => (chunks.len(), fp_samples),
            }
        }
    };
    let Some(select) =
        cfg.select.as_ref().filter(|_| matches!(source, Source::Candidates { .. }) || cfg.score.is_some())
    else {
        return Ok(RunReport {
            run_dir: cfg.output.clone(),
            stages: reports,
            exports: Vec::new(),
            exports_reused: false,
            vbon_files: Vec::new(),
        });
    };

    // The seed reaches selection only through the stochastic rules.
    let select_seed = select.methods.iter().any(|m| m.is_stochastic()).then_some(cfg.seed);
    // λ only matters to bon_unc.
    let mut select_fp = select.clone();
    if !select_fp.methods.contains(&rbon_regularize::Method::BonUnc) {
        select_fp.lambdas.clear();
    }
    let fp_select =
        fingerprint("selections", &SelectFingerprint { select: &select_fp, seed: select_seed }, &[&fp_scores]);
    // sft/vbon only shape the exports, whose fingerprint covers the whole config text.
    let pair_fp = PairFingerprint {
        rejected: cfg.pair.rejected,
        min_margin: cfg.pair.min_margin,
        methods: &cfg.pair.methods,
        betas: &cfg.pair.betas,
        seed: (cfg.pair.rejected == rbon_pair::RejectedRule::Random).then_some(cfg.seed),
    };
    let fp_pairs = fingerprint("pairs", &pair_fp, &[&fp_select]);
    let fp_export =
        fingerprint("export", &ExportFingerprint { name: &cfg.name, config_text: p.doc.text() }, &[&fp_pairs]);

    // Selection.
    invalidate(&run, &mut manifest, "selections", &fp_select, progress)?;
    let r = run_stage(&run, &mut manifest, "selections", &fp_select, n_shards, progress, |i| {
        let data = read_sample_scores(&run, i)?;
        let rows = select_shard(select, &data, cfg.seed)?;
        let batch = selections_batch(&rows, &data.reward_names)?;
        let meta = ShardMeta {
            fingerprint: fp_select.clone(),
            counters: rbon_regularize::stage::counters(&data, &rows),
            ..Default::default()
        };
        shard::write_parquet(&run.shard_path("selections", i), &batch.schema(), &[batch], &meta)?;
        Ok((meta, rows.len()))
    })?;
    reports.push(r);

    // Pairs.
    invalidate(&run, &mut manifest, "pairs", &fp_pairs, progress)?;
    let r = run_stage(&run, &mut manifest, "pairs", &fp_pairs, n_shards, progress, |i| {
        let data = read_sample_scores(&run, i)?;
        let prompts = tables::read_prompts_batches(&shard::read_parquet(&run.shard_path("prompts", i))?, "prompts")?;
        let selections = shard::read_parquet(&run.shard_path("selections", i))?;
        let sp = pair_shard(&cfg.pair, select, cfg.seed, &prompts, &data, &selections)?;
        let meta = ShardMeta { fingerprint: fp_pairs.clone(), counters: sp.counters, details: sp.details };
        shard::write_parquet(&run.shard_path("pairs", i), &schema::pairs_schema(), &[pairs_batch(&sp.rows)?], &meta)?;
        Ok((meta, sp.rows.len()))
    })?;
    reports.push(r);

    // Exports, merged from every pair shard.
    let exports: Vec<_> = sweep(select).into_iter().filter(|&(m, b)| cfg.pair.exports(select, m, b)).collect();
    let mut details: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for i in 0..n_shards {
        let meta = shard::read_meta(&run.shard_path("pairs", i))?.unwrap_or_default();
        for (k, c) in meta.details {
            let e = details.entry(k).or_default();
            for (ck, v) in c {
                *e.entry(ck).or_default() += v;
            }
        }
    }
    let export_done = manifest.stages.get("export").is_some_and(|s| s.complete && s.fingerprint == fp_export)
        && exports.iter().all(|&(m, b)| {
            let dir = run.stage_dir("pairs").join(export_key(m, b));
            dir.join("README.md").is_file() && (!cfg.pair.sft || dir.join("sft/README.md").is_file())
        })
        && (!cfg.pair.vbon || run.root().join(rbon_pair::export::VBON_DIR).join("README.md").is_file());
    let exports_list = if export_done {
        exports
            .iter()
            .map(|&(m, b)| {
                let dir = run.stage_dir("pairs").join(export_key(m, b));
                let sft_files = if cfg.pair.sft { parquet_files(&dir.join("sft")) } else { Vec::new() };
                let files = parquet_files(&dir);
                let counts = details.get(&export_key(m, b)).cloned().unwrap_or_default();
                Export { method: m, beta: b, dir, files, sft_files, counts }
            })
            .collect()
    } else {
        manifest.stages.insert("export".into(), StageState { fingerprint: fp_export.clone(), ..Default::default() });
        run.write_manifest(&manifest)?;
        let card =
            CardContext { run_name: &cfg.name, version: VERSION, select, pair: &cfg.pair, config_text: p.doc.text() };
        let samples_report = reports.iter().find(|r| r.stage == "samples");
        let totals = samples_report.map_or((0, 0), |r: &StageReport| {
            let get = |k: &str| r.counters.get(k).copied().unwrap_or(0) as usize;
            (get("prompts"), get("samples"))
        });
        let written = write_exports(&run, n_shards, &exports, &details, totals, &card)?;
        for e in &written {
            for f in &e.files {
                progress.event(Event::Wrote { path: f.clone() });
            }
        }
        let files: usize = written.iter().map(|e| e.files.len()).sum();
        manifest.stages.insert(
            "export".into(),
            StageState {
                fingerprint: fp_export,
                shards: files,
                done: files,
                complete: true,
                counters: BTreeMap::from([
                    ("exports".to_owned(), written.len() as u64),
                    ("files".to_owned(), files as u64),
                ]),
            },
        );
        run.write_manifest(&manifest)?;
        written
    };
    let vbon_files = parquet_files(&run.root().join(rbon_pair::export::VBON_DIR));
    Ok(RunReport {
        run_dir: cfg.output.clone(),
        stages: reports,
        exports: exports_list,
        exports_reused: export_done,
        vbon_files,
    })
}

/// Import: prompts, samples and scores shards from a candidates file.
/// What the candidates file brings, and the config that fills in what it lacks.
struct Completion<'a> {
    cfg: &'a PipelineConfig,
    rewards: &'a [String],
    embedding_dim: Option<usize>,
}

/// The models that complete candidates, loaded on the first shard that needs them.
#[derive(Default)]
struct Completers {
    policy: Option<rbon_sample::Policy>,
    scorers: Option<Scorers>,
}

impl Completion<'_> {
    /// Reward names after completion, in column order: the file's, then the score section's.
    fn reward_names(&self) -> Vec<String> {
        let mut names = self.rewards.to_vec();
        if let Some(sc) = &self.cfg.score {
            names.extend(sc.names());
        }
        names
    }

    /// Fills log-probs (and token counts), rewards and embeddings the file lacks.
    fn fill(&self, groups: &mut [CandidateGroup], models: &mut Completers) -> Result<Option<usize>, RunError> {
        let device = rbon_models::Device::Cpu;
        let budget = self.cfg.runtime.batch_tokens.max(1) as usize;
        if let Some(pc) = &self.cfg.policy {
            let policy = loaded(&mut models.policy, || Ok(rbon_sample::Policy::load(pc, &device)?))?;
            // Imported responses are complete: scored with the policy's EOS after them.
            let eos = policy.tokenizer().eos_ids().first().copied();
            for g in groups.iter_mut() {
                let prompt = policy.prompt_ids(&g.messages)?;
                for s in &mut g.samples {
                    let mut ids =
                        policy.tokenizer().encode_text(&s.response).map_err(rbon_sample::SampleError::from)?;
                    ids.extend(eos);
                    s.logprob = Some(policy.score(&prompt, &ids)?.iter().sum());
                    s.num_tokens.get_or_insert(ids.len() as u32);
                }
            }
        }
        let mut dim = self.embedding_dim;
        if let Some(sc) = &self.cfg.score {
            let (rms, emb) = loaded(&mut models.scorers, || load_scorers(sc, &device))?;
            for g in groups.iter_mut() {
                for (_, m) in rms {
                    let inputs =
                        g.samples.iter().map(|s| m.encode(&g.messages, &s.response)).collect::<Result<Vec<_>, _>>()?;
                    for (s, r) in g.samples.iter_mut().zip(m.score(&inputs, budget)?) {
                        s.rewards.push(r);
                    }
                }
                if let Some(e) = emb {
                    let texts: Vec<&str> = g.samples.iter().map(|s| s.response.as_str()).collect();
                    let vecs = e.embed(&texts, budget)?;
                    for (s, v) in g.samples.iter_mut().zip(vecs) {
                        s.embedding = Some(v);
                    }
                    dim = Some(e.dim());
                }
            }
        }
        Ok(dim)
    }
}

/// Models are loaded on the first shard that needs them: a finished run does not pay for them.
fn loaded<T>(slot: &mut Option<T>, load: impl FnOnce() -> Result<T, RunError>) -> Result<&T, RunError> {
    if slot.is_none() {
        *slot = Some(load()?);
    }
    slot.as_ref().ok_or_else(|| CoreError::internal("a model slot is empty after loading").into())
}

fn load_scorers(sc: &rbon_score::ScoreConfig, device: &rbon_models::Device) -> Result<Scorers, RunError> {
    let mut rms = Vec::new();
    for r in &sc.rewards {
        let template = rbon_models::chat::template_choice(&r.chat_template, std::path::Path::new("."));
        rms.push((r.name.clone(), rbon_score::RewardModel::load(&r.model, &template, r.dtype.dtype(), device)?));
    }
    let emb = match &sc.embedding {
        Some(e) => Some(rbon_score::Embedder::load(&e.model, e.dtype.dtype(), device)?),
        None => None,
    };
    Ok((rms, emb))
}

fn import_candidates(
    run: &RunDir,
    manifest: &mut Manifest,
    chunks: &[&[CandidateGroup]],
    complete: &Completion,
    fp: &str,
    progress: &dyn Progress,
) -> Result<StageReport, RunError> {
    for stage in ["prompts", "samples", "scores"] {
        invalidate(run, manifest, stage, fp, progress)?;
    }
    let rewards = complete.reward_names();
    let mut models = Completers::default();
    let r = run_stage(run, manifest, "samples", fp, chunks.len(), progress, |i| {
        let mut owned = chunks[i].to_vec();
        let embedding_dim = complete.fill(&mut owned, &mut models)?;
        let groups = owned.as_slice();
        let samples: usize = groups.iter().map(|g| g.samples.len()).sum();
        let counters =
            BTreeMap::from([("prompts".to_owned(), groups.len() as u64), ("samples".to_owned(), samples as u64)]);
        let meta = ShardMeta { fingerprint: fp.to_owned(), counters, ..Default::default() };
        // The samples shard is written last: its presence marks the import of shard i complete.
        shard::write_parquet(
            &run.shard_path("prompts", i),
            &schema::prompts_schema(),
            &[tables::prompts_batch(groups)?],
            &meta,
        )?;
        let scores = tables::scores_batch(groups, &rewards, embedding_dim)?;
        shard::write_parquet(&run.shard_path("scores", i), &scores.schema(), &[scores], &meta)?;
        shard::write_parquet(
            &run.shard_path("samples", i),
            &schema::samples_schema(),
            &[tables::samples_batch(groups)?],
            &meta,
        )?;
        Ok((meta, samples))
    })?;
    for stage in ["prompts", "scores"] {
        let mut st = manifest.stages.get("samples").cloned().unwrap_or_default();
        st.counters.retain(|k, _| (stage == "prompts") == (k == "prompts"));
        manifest.stages.insert(stage.to_owned(), st);
    }
    run.write_manifest(manifest)?;
    Ok(r)
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

fn model_identity(spec: &str) -> Result<Vec<(String, u64)>, RunError> {
    let dir = rbon_models::ModelDir::resolve(spec).map_err(rbon_sample::SampleError::from)?;
    let mut files = vec![dir.root().join("config.json")];
    files.extend(dir.safetensors().map_err(rbon_sample::SampleError::from)?);
    let mut out = Vec::new();
    for f in files {
        let len = std::fs::metadata(&f).map_err(|e| CoreError::io(&f, e))?.len();
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tag = if name == "config.json" { hash_file(&f)? } else { name };
        out.push((tag, len));
    }
    Ok(out)
}

/// The loaded reward models (with their names) and embedder.
type Scorers = (Vec<(String, rbon_score::RewardModel)>, Option<rbon_score::Embedder>);

#[derive(Serialize)]
struct ScoreFingerprint<'a> {
    score: &'a rbon_score::ScoreConfig,
    models: Vec<Vec<(String, u64)>>,
}

/// Scores shards for the samples: every reward model, and the embedder.
fn score_stage(
    cfg: &PipelineConfig,
    score: &rbon_score::ScoreConfig,
    run: &RunDir,
    manifest: &mut Manifest,
    n_shards: usize,
    fp_samples: &str,
    progress: &dyn Progress,
) -> Result<(StageReport, String), RunError> {
    let mut models = score.rewards.iter().map(|r| model_identity(&r.model)).collect::<Result<Vec<_>, _>>()?;
    if let Some(e) = &score.embedding {
        models.push(model_identity(&e.model)?);
    }
    let fp = fingerprint("scores", &ScoreFingerprint { score, models }, &[fp_samples]);
    invalidate(run, manifest, "scores", &fp, progress)?;
    let device = rbon_models::Device::Cpu;
    let batch_tokens = cfg.runtime.batch_tokens.max(1) as usize;
    // Loaded on the first shard that needs them.
    let mut scorers: Option<Scorers> = None;
    let r = run_stage(run, manifest, "scores", &fp, n_shards, progress, |i| {
        let (rms, emb) = loaded(&mut scorers, || load_scorers(score, &device))?;
        let prompts = tables::read_prompts_batches(&shard::read_parquet(&run.shard_path("prompts", i))?, "prompts")?;
        let samples = shard::read_parquet(&run.shard_path("samples", i))?;
        let out = rbon_score::score_shard(rms, emb.as_ref(), &prompts, &samples, batch_tokens)?;
        let meta = ShardMeta { fingerprint: fp.clone(), counters: out.counters, ..Default::default() };
        let rows = out.batch.num_rows();
        shard::write_parquet(&run.shard_path("scores", i), &out.batch.schema(), &[out.batch], &meta)?;
        Ok((meta, rows))
    })?;
    Ok((r, fp))
}

/// Prompts shards from the input, then the samples the policy draws for them.
fn prompts_and_samples(
    cfg: &PipelineConfig,
    run: &RunDir,
    manifest: &mut Manifest,
    chunks: &[&[(String, Vec<Message>)]],
    fp_prompts: &str,
    progress: &dyn Progress,
) -> Result<(Vec<StageReport>, String), RunError> {
    let (Some(policy_cfg), Some(sample_cfg)) = (&cfg.policy, &cfg.sample) else {
        return Err(CoreError::internal("prompts input without policy and sample passed validation").into());
    };
    let mut reports = Vec::new();
    invalidate(run, manifest, "prompts", fp_prompts, progress)?;
    reports.push(run_stage(run, manifest, "prompts", fp_prompts, chunks.len(), progress, |i| {
        let rows = chunks[i];
        let ids = arrow_array::StringArray::from_iter_values(rows.iter().map(|(id, _)| id.as_str()));
        let msgs = rbon_core::messages::messages_array(rows.iter().map(|(_, m)| m.as_slice()));
        let batch = arrow_array::RecordBatch::try_new(schema::prompts_schema(), vec![std::sync::Arc::new(ids), msgs])
            .map_err(|e| CoreError::internal(format!("prompts: {e}")))?;
        let meta = ShardMeta {
            fingerprint: fp_prompts.to_owned(),
            counters: BTreeMap::from([("prompts".to_owned(), rows.len() as u64)]),
            ..Default::default()
        };
        shard::write_parquet(&run.shard_path("prompts", i), &schema::prompts_schema(), &[batch], &meta)?;
        Ok((meta, rows.len()))
    })?);

    let identity = SampleFingerprint {
        policy: policy_cfg,
        sample: sample_cfg,
        seed: cfg.seed,
        model: model_identity(&policy_cfg.model)?,
    };
    let fp_samples = fingerprint("samples", &identity, &[fp_prompts]);
    invalidate(run, manifest, "samples", &fp_samples, progress)?;
    // Loaded on the first shard that needs it: a finished run does not pay for the model.
    let mut policy: Option<rbon_sample::Policy> = None;
    let device = rbon_models::Device::Cpu;
    let budget = cfg.runtime.batch_tokens.max(1) as usize;
    let rows_per_batch = (budget / (sample_cfg.max_new_tokens as usize + 64)).max(1);
    reports.push(run_stage(run, manifest, "samples", &fp_samples, chunks.len(), progress, |i| {
        let pol = loaded(&mut policy, || Ok(rbon_sample::Policy::load(policy_cfg, &device)?))?;
        let prompts = tables::read_prompts_batches(&shard::read_parquet(&run.shard_path("prompts", i))?, "prompts")?;
        let mut on_prompt = |tokens: usize| progress.event(Event::Tokens { stage: "samples".into(), tokens });
        let out = rbon_sample::sample_shard(pol, sample_cfg, cfg.seed, &prompts, rows_per_batch, &mut on_prompt)?;
        let meta = ShardMeta { fingerprint: fp_samples.clone(), counters: out.counters, ..Default::default() };
        let rows = out.batch.num_rows();
        shard::write_parquet(&run.shard_path("samples", i), &schema::samples_schema(), &[out.batch], &meta)?;
        Ok((meta, rows))
    })?);
    Ok((reports, fp_samples))
}

fn parquet_files(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "parquet")).collect())
        .unwrap_or_default();
    files.sort();
    files
}

fn read_sample_scores(run: &RunDir, i: usize) -> Result<SampleScores, CoreError> {
    let samples = shard::read_parquet(&run.shard_path("samples", i))?;
    let scores = shard::read_parquet(&run.shard_path("scores", i))?;
    SampleScores::from_batches(&samples, &scores, &format!("shard {i}"))
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
    shard::remove_stale_temps(&run.stage_dir(stage))
}

/// Runs `work` for every shard that is not finished, reusing the others.
fn run_stage(
    run: &RunDir,
    m: &mut Manifest,
    stage: &str,
    fp: &str,
    n_shards: usize,
    progress: &dyn Progress,
    mut work: impl FnMut(usize) -> Result<(ShardMeta, usize), RunError>,
) -> Result<StageReport, RunError> {
    let started = Instant::now();
    let done: Vec<Option<ShardMeta>> = (0..n_shards).map(|i| run.finished_shard(stage, i, fp)).collect();
    let reused = done.iter().filter(|d| d.is_some()).count();
    m.stages.insert(
        stage.to_owned(),
        StageState {
            fingerprint: fp.to_owned(),
            shards: n_shards,
            done: reused,
            complete: false,
            counters: BTreeMap::new(),
        },
    );
    run.write_manifest(m)?;
    progress.event(Event::StageStarted { stage: stage.to_owned(), total: n_shards, skipped: reused });
    let mut counters: BTreeMap<String, u64> = BTreeMap::new();
    let mut written = reused;
    for (i, d) in done.into_iter().enumerate() {
        let meta = match d {
            Some(meta) => meta,
            None => {
                // Between shards: what is written stays, the rest is left for a rerun.
                if progress.stop_requested() {
                    m.stages.entry(stage.to_owned()).or_default().done = written;
                    run.write_manifest(m)?;
                    return Err(RunError::Interrupted { stage: stage.to_owned(), done: written, total: n_shards });
                }
                let (meta, rows) = work(i)?;
                written += 1;
                progress.event(Event::ShardDone { stage: stage.to_owned(), shard: i, rows });
                meta
            }
        };
        for (k, v) in meta.counters {
            *counters.entry(k).or_default() += v;
        }
    }
    let st = StageState {
        fingerprint: fp.to_owned(),
        shards: n_shards,
        done: n_shards,
        complete: true,
        counters: counters.clone(),
    };
    m.stages.insert(stage.to_owned(), st);
    run.write_manifest(m)?;
    progress.event(Event::StageFinished {
        stage: stage.to_owned(),
        counters: counters.clone(),
        elapsed: started.elapsed(),
    });
    Ok(StageReport { stage: stage.to_owned(), shards: n_shards, reused, counters })
}
