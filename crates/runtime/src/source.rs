//! The first stage of a run: the input, read and checked in full before the run directory is
//! touched, then streamed again shard by shard. Prompts become the prompts table; a candidates
//! file becomes the prompts, samples and scores tables at once (an import), completed with
//! whatever the file lacks and the config can compute (log-probs, rewards, embeddings).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use rbon_core::digest::sha256_file;
use rbon_core::input::{
    CandidateGroup, CandidatesIndex, InputConfig, PromptRow, for_each_prompt, resolve_files, scan_candidates,
};
use rbon_core::rundir::fingerprint;
use rbon_core::stage::counter;
use rbon_core::{CoreError, RunDir, ShardMeta, StageName, schema, shard, tables};
use rbon_models::Device;
use rbon_score::Scorers;

use crate::config::{Pipeline, PipelineConfig};
use crate::outcome::RunError;

/// What a run starts from. Neither is held in memory: prompts are counted and candidates
/// indexed here, and both are streamed again by the pipeline.
pub(crate) enum Source {
    Candidates { path: PathBuf, index: CandidatesIndex, fp: String },
    Prompts { count: usize, fp: String },
}

impl Source {
    pub fn prompts(&self) -> usize {
        match self {
            Self::Candidates { index, .. } => index.prompts(),
            Self::Prompts { count, .. } => *count,
        }
    }

    /// The stage whose shards the input writes (an import's samples shard marks all three of
    /// its tables written), and the other tables it writes.
    pub fn stage(&self) -> (StageName, &'static [StageName]) {
        match self {
            Self::Prompts { .. } => (StageName::Prompts, &[]),
            Self::Candidates { .. } => (StageName::Samples, &[StageName::Prompts, StageName::Scores]),
        }
    }
}

#[derive(Serialize)]
struct InputIdentity<'a> {
    input: &'a InputConfig,
    files_sha256: Vec<String>,
    /// The prompts table holds the conversation with `policy.system_prompt` applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    system_prompt: Option<&'a str>,
}

/// What `rbon validate` reads of the data: every input row checked as `rbon run` checks it, and
/// the tuning subset's ids; the number of prompts a run would have.
pub fn check_input(p: &Pipeline) -> Result<usize, RunError> {
    read_source(p).map(|s| s.prompts())
}

/// Reads and checks the whole input (every row, before anything is written), and the prompt ids
/// `select.tune.prompts` lists against it.
pub(crate) fn read_source(p: &Pipeline) -> Result<Source, RunError> {
    let cfg = &p.config;
    if let Some(c) = cfg.input.candidates.as_deref() {
        let path = PathBuf::from(c);
        let file_sha256 = sha256_file(&path)?;
        let index = scan_candidates(&path, cfg.input.limit)?;
        if let Some(select) = &cfg.select
            && select.methods.iter().any(|m| m.needs_num_tokens())
            && let Some(loc) = &index.zero_num_tokens
        {
            return Err(CoreError::data(loc, "`num_tokens` is 0; rbon_len divides by the length").into());
        }
        check_tune_ids(p, c, |id| index.has_prompt(id))?;
        let identity = InputIdentity { input: &cfg.input, files_sha256: vec![file_sha256], system_prompt: None };
        let fp = fingerprint("import", &identity, &[]);
        return Ok(Source::Candidates { path, index, fp });
    }
    let spec = cfg.input.path.as_deref().unwrap_or_default();
    let files = resolve_files(spec).map_err(|m| CoreError::data("input.path", m))?;
    let files_sha256 = files.iter().map(|f| sha256_file(f)).collect::<Result<Vec<_>, _>>()?;
    // A first pass checks every row (and counts them) without keeping any but the ids of the
    // tuning subset.
    let wanted: HashSet<&str> = tune_ids(cfg).iter().map(String::as_str).collect();
    let mut found: HashSet<String> = HashSet::new();
    let count = for_each_prompt(&cfg.input, |row| {
        if wanted.contains(row.prompt_id.as_str()) {
            found.insert(row.prompt_id);
        }
        Ok(true)
    })?;
    check_tune_ids(p, spec, |id| found.contains(id))?;
    let system_prompt = cfg.policy.as_ref().and_then(|p| p.system_prompt.as_deref());
    let identity = InputIdentity { input: &cfg.input, files_sha256, system_prompt };
    let fp = fingerprint(StageName::Prompts.as_str(), &identity, &[]);
    Ok(Source::Prompts { count, fp })
}

fn tune_ids(cfg: &PipelineConfig) -> &[String] {
    cfg.select.as_ref().and_then(|s| s.tune.as_ref()).and_then(|t| t.prompts.as_deref()).unwrap_or_default()
}

/// `select.tune.prompts` names prompts of the input (of its first `input.limit`, with one): a
/// tuning subset with a stray id would tune on fewer prompts than listed, or on none.
fn check_tune_ids(p: &Pipeline, input: &str, has: impl Fn(&str) -> bool) -> Result<(), RunError> {
    let missing: Vec<String> = tune_ids(&p.config)
        .iter()
        .enumerate()
        .filter(|(_, id)| !has(id))
        .map(|(i, id)| {
            let within = match p.config.input.limit {
                Some(l) => format!("the first {l} prompts (input.limit) of {input}"),
                None => input.to_owned(),
            };
            p.doc
                .diag(&format!("select.tune.prompts[{i}]"), format!("`{id}` is not a prompt id of {within}"))
                .to_string()
        })
        .collect();
    if missing.is_empty() { Ok(()) } else { Err(RunError::Usage(missing.join("\n"))) }
}

/// The fingerprint of a candidates import: the file, and the models that complete it (their
/// fingerprints join the file's).
pub(crate) fn import_fingerprint(
    cfg: &PipelineConfig,
    file_fp: &str,
    files: &rbon_core::FileDigests,
) -> Result<String, RunError> {
    let mut identity = vec![file_fp.to_owned()];
    if let Some(pc) = &cfg.policy {
        identity.push(fingerprint("policy", &(pc, pc.model_identity(files)?), &[]));
    }
    if let Some(sc) = &cfg.score {
        identity.push(fingerprint(StageName::Scores.as_str(), &(sc, sc.model_identities(files)?), &[]));
    }
    let refs: Vec<&str> = identity.iter().map(String::as_str).collect();
    Ok(fingerprint("import", &(), &refs))
}

/// What a candidates import is called: `import`, with what it computes for the file.
pub(crate) fn import_label(cfg: &PipelineConfig) -> String {
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

/// A prompts shard from rows of the input.
pub(crate) fn write_prompts(
    cfg: &PipelineConfig,
    run: &RunDir,
    fp: &str,
    i: usize,
    rows: &[PromptRow],
) -> Result<(ShardMeta, usize), RunError> {
    let ids = arrow_array::StringArray::from_iter_values(rows.iter().map(|r| r.prompt_id.as_str()));
    // The conversation the policy answers (with its system prompt) is the one stored: sampling,
    // the reward models and the exports all read it from here.
    let conversations: Vec<Vec<rbon_core::Message>> = rows
        .iter()
        .map(|r| match &cfg.policy {
            Some(pc) => pc.conversation(r.messages.clone()),
            None => r.messages.clone(),
        })
        .collect();
    let msgs = rbon_core::messages::messages_array(conversations.iter().map(Vec::as_slice));
    let batch = arrow_array::RecordBatch::try_new(schema::prompts_schema(), vec![Arc::new(ids), msgs])
        .map_err(|e| CoreError::internal(format!("prompts: {e}")))?;
    let meta = ShardMeta {
        fingerprint: fp.to_owned(),
        counters: BTreeMap::from([(counter::PROMPTS.to_owned(), rows.len() as u64)]),
        ..Default::default()
    };
    shard::write_shard(&run.shard_path(StageName::Prompts, i), &schema::prompts_schema(), &[batch], &meta)?;
    Ok((meta, rows.len()))
}

/// What a candidates file brings, and the config that fills in what it lacks.
pub(crate) struct Completion<'a> {
    pub cfg: &'a PipelineConfig,
    pub rewards: &'a [String],
    pub embedding_dim: Option<usize>,
}

/// The models that complete candidates, loaded on the first shard that needs them.
#[derive(Default)]
pub(crate) struct Completers {
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
    fn fill(
        &self,
        groups: &mut [CandidateGroup],
        models: &mut Completers,
        device: &Device,
    ) -> Result<Option<usize>, RunError> {
        let budget = self.cfg.runtime.batch_tokens.max(1) as usize;
        if let Some(pc) = &self.cfg.policy {
            if models.policy.is_none() {
                models.policy = Some(rbon_sample::Policy::load(pc, device)?);
            }
            let Some(policy) = models.policy.as_ref() else { return Err(CoreError::internal("no policy").into()) };
            // Imported responses are complete: each is closed as the template closes a turn.
            for g in groups.iter_mut() {
                let responses: Vec<&str> = g.samples.iter().map(|s| s.response.as_str()).collect();
                let forced = policy.teacher_force(&g.messages, &responses)?;
                for (s, (logprob, tokens)) in g.samples.iter_mut().zip(forced) {
                    s.logprob = Some(logprob);
                    s.num_tokens.get_or_insert(tokens);
                }
            }
        }
        let mut dim = self.embedding_dim;
        if let Some(sc) = &self.cfg.score {
            if models.scorers.is_none() {
                models.scorers = Some(Scorers::load(sc, device)?);
            }
            let Some(s) = models.scorers.as_ref() else { return Err(CoreError::internal("no scorers").into()) };
            for g in groups.iter_mut() {
                for (_, m) in &s.rewards {
                    let inputs =
                        g.samples.iter().map(|s| m.encode(&g.messages, &s.response)).collect::<Result<Vec<_>, _>>()?;
                    for (s, r) in g.samples.iter_mut().zip(m.score(&inputs, budget)?) {
                        s.rewards.push(r);
                    }
                }
                if let Some(e) = &s.embedder {
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

/// Import of shard `i` of a candidates file: its prompts, samples and scores shards, completed
/// with what the file lacks. The samples shard is written last: its presence marks the import
/// of shard `i` complete.
pub(crate) fn import(
    run: &RunDir,
    fp: &str,
    i: usize,
    mut groups: Vec<CandidateGroup>,
    complete: &Completion,
    models: &mut Completers,
    device: &Device,
) -> Result<(ShardMeta, usize), RunError> {
    // The conversation the policy saw is the one every later stage and export sees.
    if let Some(pc) = &complete.cfg.policy {
        for g in &mut groups {
            g.messages = pc.conversation(std::mem::take(&mut g.messages));
        }
    }
    let embedding_dim = complete.fill(&mut groups, models, device)?;
    let groups = groups.as_slice();
    let samples: usize = groups.iter().map(|g| g.samples.len()).sum();
    let counters = BTreeMap::from([
        (counter::PROMPTS.to_owned(), groups.len() as u64),
        (counter::SAMPLES.to_owned(), samples as u64),
    ]);
    let meta = ShardMeta { fingerprint: fp.to_owned(), counters, ..Default::default() };
    shard::write_shard(
        &run.shard_path(StageName::Prompts, i),
        &schema::prompts_schema(),
        &[tables::prompts_batch(groups)?],
        &meta,
    )?;
    let scores = tables::scores_batch(groups, &complete.reward_names(), embedding_dim)?;
    shard::write_shard(&run.shard_path(StageName::Scores, i), &scores.schema(), &[scores], &meta)?;
    shard::write_shard(
        &run.shard_path(StageName::Samples, i),
        &schema::samples_schema(),
        &[tables::samples_batch(groups)?],
        &meta,
    )?;
    Ok((meta, samples))
}
