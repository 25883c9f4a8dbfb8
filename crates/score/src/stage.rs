//! The score stage: a samples shard in, a scores shard out (DESIGN §8): `reward_<name>` per
//! reward model, and the embedding of each response when an embedder is configured.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow_array::builder::{FixedSizeListBuilder, Float32Builder};
use arrow_array::cast::AsArray;
use arrow_array::types::UInt32Type;
use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt32Array};
use arrow_schema::{DataType, Field};
use rbon_core::schema::{PROMPT_ID, RESPONSE, SAMPLE_IDX, scores_schema};
use rbon_core::stage::counter;
use rbon_core::{CoreError, Message, ShardCtx, ShardMeta, ShardWorker, Stage, StageError, StageFailure, StageName};
use rbon_models::Device;

use crate::ScoreError;
use crate::config::ScoreConfig;
use crate::embed::Embedder;
use crate::reward::RewardModel;

/// The score stage of a pipeline: every reward model and the embedder over each sample.
#[derive(Debug, Clone)]
pub struct ScoreStage {
    pub score: ScoreConfig,
    /// Padded tokens per model batch (`runtime.batch_tokens`).
    pub batch_tokens: usize,
}

impl Stage<Device> for ScoreStage {
    fn name(&self) -> StageName {
        StageName::Scores
    }

    fn upstream(&self) -> &'static [StageName] {
        &[StageName::Prompts, StageName::Samples]
    }

    fn identity(&self, files: &rbon_core::FileDigests) -> Result<serde_json::Value, StageError> {
        Ok(serde_json::json!({ "score": self.score, "models": self.score.model_identities(files)? }))
    }

    fn per_device(&self) -> bool {
        true
    }

    fn worker<'s>(&'s self, device: &Device) -> Box<dyn ShardWorker + 's> {
        Box::new(ScoreWorker { stage: self, device: device.clone(), scorers: None })
    }
}

/// The loaded reward models (with their names) and embedder of a `score` section.
#[derive(Debug)]
pub struct Scorers {
    pub rewards: Vec<(String, RewardModel)>,
    pub embedder: Option<Embedder>,
}

impl Scorers {
    /// Loads every model of the section on `device`.
    pub fn load(sc: &ScoreConfig, device: &Device) -> Result<Self, ScoreError> {
        let mut rewards = Vec::new();
        for r in &sc.rewards {
            let template = rbon_models::chat::template_choice(&r.chat_template, std::path::Path::new("."));
            rewards.push((r.name.clone(), RewardModel::load_spec(r, &template, r.dtype.dtype(), device)?));
        }
        let embedder = match &sc.embedding {
            Some(e) => Some(Embedder::load(&e.model, e.dtype.dtype(), device)?),
            None => None,
        };
        Ok(Self { rewards, embedder })
    }
}

/// One device's scorers, loaded on the first shard.
struct ScoreWorker<'a> {
    stage: &'a ScoreStage,
    device: Device,
    scorers: Option<Scorers>,
}

impl ShardWorker for ScoreWorker<'_> {
    fn run(&mut self, ctx: &ShardCtx<'_>) -> Result<(ShardMeta, usize), StageError> {
        if self.scorers.is_none() {
            self.scorers = Some(Scorers::load(&self.stage.score, &self.device)?);
        }
        let Some(s) = self.scorers.as_ref() else { return Err(CoreError::internal("no scorers").into()) };
        let prompts = rbon_core::tables::read_prompts_shard(ctx.run, ctx.shard)?;
        let samples = rbon_core::shard::read_parquet(&ctx.run.shard_path(StageName::Samples, ctx.shard))?;
        let out = score_shard(&s.rewards, s.embedder.as_ref(), &prompts, &samples, self.stage.batch_tokens)?;
        ctx.write(&out.batch.schema(), out.batch, ctx.meta(out.counters))
    }
}

impl StageFailure for ScoreError {
    fn is_data(&self) -> bool {
        matches!(self, Self::Core(c) if c.is_data())
    }
}

/// The scores of one shard and its counters.
#[derive(Debug)]
pub struct ShardScores {
    pub batch: RecordBatch,
    pub counters: BTreeMap<String, u64>,
}

/// Scores every sample of a shard with every reward model, and embeds the responses.
pub fn score_shard(
    rewards: &[(String, RewardModel)],
    embedder: Option<&Embedder>,
    prompts: &[(String, Vec<Message>)],
    samples: &[RecordBatch],
    batch_tokens: usize,
) -> Result<ShardScores, ScoreError> {
    let prompt_of: HashMap<&str, &[Message]> = prompts.iter().map(|(id, m)| (id.as_str(), m.as_slice())).collect();
    let (mut ids, mut idx, mut responses) = (Vec::new(), Vec::new(), Vec::new());
    for b in samples {
        let col = |n: &str| b.column_by_name(n).ok_or_else(|| CoreError::internal(format!("samples: no `{n}` column")));
        let (pid, k, resp) = (
            col(PROMPT_ID)?.as_string::<i32>(),
            col(SAMPLE_IDX)?.as_primitive::<UInt32Type>(),
            col(RESPONSE)?.as_string::<i32>(),
        );
        for r in 0..b.num_rows() {
            ids.push(pid.value(r).to_owned());
            idx.push(k.value(r));
            responses.push(resp.value(r).to_owned());
        }
    }
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(ids.iter())),
        Arc::new(UInt32Array::from_iter_values(idx.iter().copied())),
    ];
    // Batches never span prompts: a prompt's scores then depend only on its own samples, not on
    // which prompts share its shard, so shard size cannot move a score by a rounding.
    let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
    for r in 0..ids.len() {
        match groups.last_mut() {
            Some(g) if ids[g.start] == ids[r] => g.end = r + 1,
            _ => groups.push(r..r + 1),
        }
    }
    for (name, model) in rewards {
        let mut scores = Vec::with_capacity(ids.len());
        for g in &groups {
            let id = &ids[g.start];
            let prompt = prompt_of
                .get(id.as_str())
                .ok_or_else(|| CoreError::internal(format!("prompt {id:?} has samples but no prompts row")))?;
            let inputs =
                responses[g.clone()].iter().map(|resp| model.encode(prompt, resp)).collect::<Result<Vec<_>, _>>()?;
            scores.extend(model.score(&inputs, batch_tokens)?);
        }
        if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
            return Err(ScoreError::NonFinite { reward: name.clone(), prompt_id: ids[i].clone(), sample_idx: idx[i] });
        }
        cols.push(Arc::new(Float64Array::from_iter_values(scores)));
    }
    let dim = match embedder {
        Some(e) => {
            let mut vecs = Vec::with_capacity(ids.len());
            for g in &groups {
                let texts: Vec<&str> = responses[g.clone()].iter().map(String::as_str).collect();
                vecs.extend(e.embed(&texts, batch_tokens)?);
            }
            let d = e.dim() as i32;
            let mut b = FixedSizeListBuilder::new(Float32Builder::new(), d).with_field(Arc::new(Field::new(
                "item",
                DataType::Float32,
                false,
            )));
            for v in &vecs {
                b.values().append_slice(v);
                b.append(true);
            }
            cols.push(Arc::new(b.finish()));
            Some(d)
        }
        None => None,
    };
    let names: Vec<String> = rewards.iter().map(|(n, _)| n.clone()).collect();
    let batch = RecordBatch::try_new(scores_schema(&names, dim), cols)
        .map_err(|e| CoreError::internal(format!("scores: {e}")))?;
    let counters = BTreeMap::from([(counter::SAMPLES.to_owned(), ids.len() as u64)]);
    Ok(ShardScores { batch, counters })
}
