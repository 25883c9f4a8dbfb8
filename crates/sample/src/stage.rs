//! The sample stage: a prompts shard in, a samples shard out (DESIGN §8).

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::builder::{ListBuilder, UInt32Builder};
use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow_schema::{DataType, Field};
use rbon_core::schema::samples_schema;
use rbon_core::{CoreError, Message};

use crate::config::SampleConfig;
use crate::generate::{FinishReason, Generated, Policy, SampleError, sample_seed};

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
        ("prompts".to_owned(), prompts.len() as u64),
        ("samples".to_owned(), rows.len() as u64),
        ("tokens".to_owned(), tokens as u64),
        ("truncated".to_owned(), truncated as u64),
    ]);
    Ok(ShardSamples { batch, counters })
}
