//! The sample stage: a prompts shard in, a samples shard out (DESIGN §8).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arrow_array::builder::{ListBuilder, UInt32Builder};
use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow_schema::{DataType, Field};
use rbon_core::schema::samples_schema;
use rbon_core::stage::counter;
use rbon_core::{
    CoreError, Event, Message, ShardCtx, ShardMeta, ShardWorker, Stage, StageError, StageFailure, StageName,
};
use rbon_models::Device;

use crate::config::{LogprobSource, PolicyConfig, SampleConfig};
use crate::generate::{FinishReason, Generated, Policy, SampleError, sample_seed};
use crate::server::{ServerPolicy, Tick};

/// The sample stage of a pipeline: N responses per prompt from the policy.
#[derive(Debug, Clone)]
pub struct SampleStage {
    pub policy: PolicyConfig,
    pub sample: SampleConfig,
    pub seed: u64,
    /// Padded tokens per model batch (`runtime.batch_tokens`): rows decoded together.
    pub batch_tokens: usize,
    /// The server engine's connection, made by the first worker that needs it and shared by
    /// all (one request cap, one seed check), or why it could not be made.
    server: Arc<Mutex<Option<Connection>>>,
}

/// A made server connection, or why it could not be made.
type Connection = Result<Arc<ServerPolicy>, String>;

impl SampleStage {
    pub fn new(policy: PolicyConfig, sample: SampleConfig, seed: u64, batch_tokens: usize) -> Self {
        Self { policy, sample, seed, batch_tokens, server: Arc::default() }
    }

    /// The shared server connection, made on first use.
    fn server(&self) -> Result<Arc<ServerPolicy>, SampleError> {
        let url = || self.policy.server().map(|s| s.url.clone()).unwrap_or_default();
        let mut slot =
            self.server.lock().map_err(|_| SampleError::Server { url: url(), message: "a worker failed".into() })?;
        let made = slot.get_or_insert_with(|| {
            ServerPolicy::connect(&self.policy, &self.sample).map(Arc::new).map_err(|e| e.to_string())
        });
        match made {
            Ok(s) => Ok(s.clone()),
            Err(m) => Err(SampleError::Connect(m.clone())),
        }
    }
}

impl Stage<Device> for SampleStage {
    fn name(&self) -> StageName {
        StageName::Samples
    }

    fn upstream(&self) -> &'static [StageName] {
        &[StageName::Prompts]
    }

    fn identity(&self, files: &rbon_core::FileDigests) -> Result<serde_json::Value, StageError> {
        Ok(serde_json::json!({
            "policy": self.policy.identity(),
            "sample": self.sample,
            "seed": self.seed,
            "model": self.policy.model_identity(files)?,
        }))
    }

    /// The embedded engine has a worker per device; a server one worker (whose requests run
    /// concurrently), or one per device when the local policy teacher-forces its samples.
    fn per_device(&self) -> bool {
        self.policy.server().is_none_or(|s| s.logprobs == LogprobSource::TeacherForcing)
    }

    /// Two workers share a server's request cap, so that one shard's last requests overlap the
    /// next shard's first.
    fn workers(&self) -> usize {
        if self.policy.server().is_some() { 2 } else { 1 }
    }

    fn worker<'s>(&'s self, device: &Device) -> Box<dyn ShardWorker + 's> {
        if self.policy.server().is_some() {
            return Box::new(ServerWorker { stage: self, device: device.clone(), forcing: None });
        }
        Box::new(SampleWorker { stage: self, device: device.clone(), policy: None })
    }
}

/// A worker of the server engine: the shared connection, and for `logprobs: teacher_forcing`
/// its own copy of the local policy on its device.
struct ServerWorker<'a> {
    stage: &'a SampleStage,
    device: Device,
    forcing: Option<Policy>,
}

impl ShardWorker for ServerWorker<'_> {
    fn run(&mut self, ctx: &ShardCtx<'_>) -> Result<(ShardMeta, usize), StageError> {
        let st = self.stage;
        let server = st.server()?;
        if self.forcing.is_none() && st.policy.server().is_some_and(|s| s.logprobs == LogprobSource::TeacherForcing) {
            self.forcing = Some(Policy::load(&st.policy, &self.device)?);
        }
        let prompts = rbon_core::tables::read_prompts_shard(ctx.run, ctx.shard)?;
        let mut tick = |t: Tick| {
            ctx.progress.event(Event::InFlight { stage: ctx.label.to_owned(), requests: t.in_flight });
            ctx.progress.event(Event::Tokens { stage: ctx.label.to_owned(), tokens: t.tokens });
        };
        let generated = server.sample_prompts(&prompts, &st.sample, st.seed, self.forcing.as_ref(), &mut tick)?;
        let rows = prompts.iter().zip(generated).flat_map(|((id, _), g)| g.into_iter().map(move |g| (id.as_str(), g)));
        let out = samples_batch(rows.collect(), prompts.len())?;
        ctx.write(&samples_schema(), out.batch, ctx.meta(out.counters))
    }
}

/// One device's policy, loaded on the first shard.
struct SampleWorker<'a> {
    stage: &'a SampleStage,
    device: Device,
    policy: Option<Policy>,
}

impl ShardWorker for SampleWorker<'_> {
    fn run(&mut self, ctx: &ShardCtx<'_>) -> Result<(ShardMeta, usize), StageError> {
        let st = self.stage;
        if self.policy.is_none() {
            self.policy = Some(Policy::load(&st.policy, &self.device)?);
        }
        let Some(policy) = self.policy.as_ref() else { return Err(CoreError::internal("no policy").into()) };
        let rows_per_batch = (st.batch_tokens.max(1) / (st.sample.max_new_tokens as usize + 64)).max(1);
        let prompts = rbon_core::tables::read_prompts_shard(ctx.run, ctx.shard)?;
        let mut on_prompt = |tokens: usize| ctx.progress.event(Event::Tokens { stage: ctx.label.to_owned(), tokens });
        let out = sample_shard(policy, &st.sample, st.seed, &prompts, rows_per_batch, &mut on_prompt)?;
        ctx.write(&samples_schema(), out.batch, ctx.meta(out.counters))
    }
}

impl StageFailure for SampleError {
    fn is_data(&self) -> bool {
        matches!(self, Self::Core(c) if c.is_data())
    }
}

/// The samples of one shard, in prompt order then sample index, with counters.
#[derive(Debug)]
pub struct ShardSamples {
    pub batch: RecordBatch,
    pub counters: BTreeMap<String, u64>,
}

/// Samples every prompt of a shard: `n` responses each, up to `max_rows` decoding together.
/// `on_prompt(tokens)` is called after each prompt with the tokens it generated.
pub fn sample_shard(
    policy: &Policy,
    cfg: &SampleConfig,
    seed: u64,
    prompts: &[(String, Vec<Message>)],
    max_rows: usize,
    on_prompt: &mut dyn FnMut(usize),
) -> Result<ShardSamples, SampleError> {
    let mut rows: Vec<(&str, Generated)> = Vec::with_capacity(prompts.len() * cfg.n as usize);
    for (id, messages) in prompts {
        let perr = |message: String| SampleError::Prompt { prompt_id: id.clone(), message };
        let ids = policy.prompt_ids(messages).map_err(|e| perr(e.to_string()))?;
        let seeds: Vec<(u32, u64)> = (0..cfg.n).map(|k| (k, sample_seed(seed, id, k))).collect();
        let generated = policy.sample(&ids, cfg, &seeds, max_rows).map_err(|e| perr(e.to_string()))?;
        on_prompt(generated.iter().map(|g| g.token_ids.len()).sum());
        rows.extend(generated.into_iter().map(|g| (id.as_str(), g)));
    }
    samples_batch(rows, prompts.len())
}

/// The samples table of one shard's rows (in prompt order, then sample index) and its counters.
fn samples_batch(rows: Vec<(&str, Generated)>, prompts: usize) -> Result<ShardSamples, SampleError> {
    let tokens: usize = rows.iter().map(|(_, g)| g.token_ids.len()).sum();
    let truncated = rows.iter().filter(|(_, g)| g.finish_reason == FinishReason::Length).count();
    let mut tok =
        ListBuilder::new(UInt32Builder::new()).with_field(Arc::new(Field::new("item", DataType::UInt32, false)));
    for (_, g) in &rows {
        tok.values().append_slice(&g.token_ids);
        tok.append(true);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|(id, _)| *id))),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|(_, g)| g.sample_idx))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|(_, g)| g.text.as_str()))),
        Arc::new(tok.finish()),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|(_, g)| g.token_ids.len() as u32))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|(_, g)| g.finish_reason.as_str()))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|(_, g)| g.logprob))),
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|(_, g)| g.seed))),
    ];
    let batch =
        RecordBatch::try_new(samples_schema(), cols).map_err(|e| CoreError::internal(format!("samples: {e}")))?;
    let counters = BTreeMap::from([
        (counter::PROMPTS.to_owned(), prompts as u64),
        (counter::SAMPLES.to_owned(), rows.len() as u64),
        (counter::TOKENS.to_owned(), tokens as u64),
        (counter::TRUNCATED.to_owned(), truncated as u64),
    ]);
    Ok(ShardSamples { batch, counters })
}
