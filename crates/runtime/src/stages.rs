//! The work of one shard in each stage. Each function reads its inputs from the run directory
//! (or the input), computes, and writes its shard atomically; model-backed stages take the
//! worker's lazily loaded models, so a finished run does not pay for loading them.

use std::collections::BTreeMap;
use std::sync::Arc;

use rbon_core::input::{CandidateGroup, PromptRow};
use rbon_core::schema;
use rbon_core::shard::{self, ShardMeta};
use rbon_core::tables::{self, SampleScores};
use rbon_core::{CoreError, Event, RunDir};
use rbon_models::Device;
use rbon_pair::{pair_shard, pairs_batch};
use rbon_regularize::{select_shard, selections_batch};

use crate::config::PipelineConfig;
use crate::run::{Plan, RunError};

/// What a shard's work returns: its footer metadata and its row count.
pub(crate) type Done = (ShardMeta, usize);

/// Everything the stages of one rank share.
pub(crate) struct Ctx<'a> {
    pub cfg: &'a PipelineConfig,
    pub run: &'a RunDir,
    pub plan: &'a Plan,
    pub progress: &'a dyn rbon_core::Progress,
}

impl Ctx<'_> {
    fn fp(&self, stage: &str) -> String {
        self.plan.fps.get(stage).cloned().unwrap_or_default()
    }

    fn batch_tokens(&self) -> usize {
        self.cfg.runtime.batch_tokens.max(1) as usize
    }
}

/// Models are loaded on the first shard that needs them.
pub(crate) fn loaded<T>(slot: &mut Option<T>, load: impl FnOnce() -> Result<T, RunError>) -> Result<&T, RunError> {
    if slot.is_none() {
        *slot = Some(load()?);
    }
    slot.as_ref().ok_or_else(|| CoreError::internal("a model slot is empty after loading").into())
}

/// The loaded reward models (with their names) and embedder.
pub(crate) type Scorers = (Vec<(String, rbon_score::RewardModel)>, Option<rbon_score::Embedder>);

pub(crate) fn load_scorers(sc: &rbon_score::ScoreConfig, device: &Device) -> Result<Scorers, RunError> {
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

/// A prompts shard from rows of the input.
pub(crate) fn prompts(ctx: &Ctx, i: usize, rows: &[PromptRow]) -> Result<Done, RunError> {
    let ids = arrow_array::StringArray::from_iter_values(rows.iter().map(|r| r.prompt_id.as_str()));
    // The conversation the policy answers (with its system prompt) is the one stored: sampling,
    // the reward models and the exports all read it from here.
    let conversations: Vec<Vec<rbon_core::Message>> = rows
        .iter()
        .map(|r| match &ctx.cfg.policy {
            Some(pc) => pc.conversation(r.messages.clone()),
            None => r.messages.clone(),
        })
        .collect();
    let msgs = rbon_core::messages::messages_array(conversations.iter().map(Vec::as_slice));
    let batch = arrow_array::RecordBatch::try_new(schema::prompts_schema(), vec![Arc::new(ids), msgs])
        .map_err(|e| CoreError::internal(format!("prompts: {e}")))?;
    let meta = ShardMeta {
        fingerprint: ctx.fp("prompts"),
        counters: BTreeMap::from([("prompts".to_owned(), rows.len() as u64)]),
        ..Default::default()
    };
    shard::write_parquet(&ctx.run.shard_path("prompts", i), &schema::prompts_schema(), &[batch], &meta)?;
    Ok((meta, rows.len()))
}

/// The samples shard of prompts shard `i`, drawn by the policy.
pub(crate) fn samples(
    ctx: &Ctx,
    i: usize,
    policy: &mut Option<rbon_sample::Policy>,
    device: &Device,
) -> Result<Done, RunError> {
    let (Some(policy_cfg), Some(sample_cfg)) = (&ctx.cfg.policy, &ctx.cfg.sample) else {
        return Err(CoreError::internal("prompts input without policy and sample passed validation").into());
    };
    let pol = loaded(policy, || Ok(rbon_sample::Policy::load(policy_cfg, device)?))?;
    let rows_per_batch = (ctx.batch_tokens() / (sample_cfg.max_new_tokens as usize + 64)).max(1);
    let prompts = tables::read_prompts_batches(&shard::read_parquet(&ctx.run.shard_path("prompts", i))?, "prompts")?;
    let mut on_prompt = |tokens: usize| ctx.progress.event(Event::Tokens { stage: "samples".into(), tokens });
    let out = rbon_sample::sample_shard(pol, sample_cfg, ctx.cfg.seed, &prompts, rows_per_batch, &mut on_prompt)?;
    let meta = ShardMeta { fingerprint: ctx.fp("samples"), counters: out.counters, ..Default::default() };
    let rows = out.batch.num_rows();
    shard::write_parquet(&ctx.run.shard_path("samples", i), &schema::samples_schema(), &[out.batch], &meta)?;
    Ok((meta, rows))
}

/// The scores shard of samples shard `i`: every reward model, and the embedder.
pub(crate) fn scores(ctx: &Ctx, i: usize, scorers: &mut Option<Scorers>, device: &Device) -> Result<Done, RunError> {
    let Some(score) = &ctx.cfg.score else {
        return Err(CoreError::internal("a scores stage without a score section").into());
    };
    let (rms, emb) = loaded(scorers, || load_scorers(score, device))?;
    let prompts = tables::read_prompts_batches(&shard::read_parquet(&ctx.run.shard_path("prompts", i))?, "prompts")?;
    let samples = shard::read_parquet(&ctx.run.shard_path("samples", i))?;
    let out = rbon_score::score_shard(rms, emb.as_ref(), &prompts, &samples, ctx.batch_tokens())?;
    let meta = ShardMeta { fingerprint: ctx.fp("scores"), counters: out.counters, ..Default::default() };
    let rows = out.batch.num_rows();
    shard::write_parquet(&ctx.run.shard_path("scores", i), &out.batch.schema(), &[out.batch], &meta)?;
    Ok((meta, rows))
}

fn read_sample_scores(run: &RunDir, i: usize) -> Result<SampleScores, CoreError> {
    let samples = shard::read_parquet(&run.shard_path("samples", i))?;
    let scores = shard::read_parquet(&run.shard_path("scores", i))?;
    SampleScores::from_batches(&samples, &scores, &format!("shard {i}"))
}

/// The selections shard of shard `i`: every (method, β) pick per prompt.
pub(crate) fn selections(ctx: &Ctx, i: usize) -> Result<Done, RunError> {
    let Some(select) = &ctx.cfg.select else {
        return Err(CoreError::internal("a selections stage without a select section").into());
    };
    let data = read_sample_scores(ctx.run, i)?;
    let rows = select_shard(select, &data, ctx.cfg.seed)?;
    let batch = selections_batch(&rows, &data.reward_names)?;
    let meta = ShardMeta {
        fingerprint: ctx.fp("selections"),
        counters: rbon_regularize::stage::counters(&data, &rows),
        ..Default::default()
    };
    shard::write_parquet(&ctx.run.shard_path("selections", i), &batch.schema(), &[batch], &meta)?;
    Ok((meta, rows.len()))
}

/// The pairs shard of shard `i`.
pub(crate) fn pairs(ctx: &Ctx, i: usize) -> Result<Done, RunError> {
    let Some(select) = &ctx.cfg.select else {
        return Err(CoreError::internal("a pairs stage without a select section").into());
    };
    let data = read_sample_scores(ctx.run, i)?;
    let prompts = tables::read_prompts_batches(&shard::read_parquet(&ctx.run.shard_path("prompts", i))?, "prompts")?;
    let selections = shard::read_parquet(&ctx.run.shard_path("selections", i))?;
    let pair = crate::run::shard_pair_config(&ctx.cfg.pair);
    let sp = pair_shard(&pair, select, ctx.cfg.seed, &prompts, &data, &selections)?;
    let meta = ShardMeta { fingerprint: ctx.fp("pairs"), counters: sp.counters, details: sp.details };
    let batch = pairs_batch(&sp.rows)?;
    shard::write_parquet(&ctx.run.shard_path("pairs", i), &schema::pairs_schema(), &[batch], &meta)?;
    Ok((meta, sp.rows.len()))
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
    pub fn reward_names(&self) -> Vec<String> {
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
            let policy = loaded(&mut models.policy, || Ok(rbon_sample::Policy::load(pc, device)?))?;
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
            let (rms, emb) = loaded(&mut models.scorers, || load_scorers(sc, device))?;
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

/// Import of shard `i` of a candidates file: its prompts, samples and scores shards, completed
/// with what the file lacks. The samples shard is written last: its presence marks the import
/// of shard `i` complete.
pub(crate) fn import(
    ctx: &Ctx,
    i: usize,
    mut groups: Vec<CandidateGroup>,
    complete: &Completion,
    models: &mut Completers,
    device: &Device,
) -> Result<Done, RunError> {
    // The conversation the policy saw is the one every later stage and export sees.
    if let Some(pc) = &ctx.cfg.policy {
        for g in &mut groups {
            g.messages = pc.conversation(std::mem::take(&mut g.messages));
        }
    }
    let embedding_dim = complete.fill(&mut groups, models, device)?;
    let groups = groups.as_slice();
    let samples: usize = groups.iter().map(|g| g.samples.len()).sum();
    let counters =
        BTreeMap::from([("prompts".to_owned(), groups.len() as u64), ("samples".to_owned(), samples as u64)]);
    let meta = ShardMeta { fingerprint: ctx.fp("samples"), counters, ..Default::default() };
    let run = ctx.run;
    shard::write_parquet(
        &run.shard_path("prompts", i),
        &schema::prompts_schema(),
        &[tables::prompts_batch(groups)?],
        &meta,
    )?;
    let scores = tables::scores_batch(groups, &complete.reward_names(), embedding_dim)?;
    shard::write_parquet(&run.shard_path("scores", i), &scores.schema(), &[scores], &meta)?;
    shard::write_parquet(
        &run.shard_path("samples", i),
        &schema::samples_schema(),
        &[tables::samples_batch(groups)?],
        &meta,
    )?;
    Ok((meta, samples))
}
