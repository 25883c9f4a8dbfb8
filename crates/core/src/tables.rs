//! Building and reading the samples and scores tables (DESIGN §8) as Arrow batches. Stages that
//! consume them (selection, pairing) see one [`SampleScores`] per shard: rows sorted by prompt,
//! then sample index, with each prompt's rows contiguous.

use std::ops::Range;
use std::sync::Arc;

use arrow_array::builder::{FixedSizeListBuilder, Float32Builder, ListBuilder, UInt32Builder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, UInt32Type};
use arrow_array::{Array, ArrayRef, Float64Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow_schema::{DataType, Field};

use crate::error::{CoreError, Result};
use crate::input::CandidateGroup;
use crate::messages::{Message, messages_array, read_messages};
use crate::rundir::RunDir;
use crate::schema::{self, *};
use crate::stage::StageName;

/// The prompts shard `shard` of a run: (prompt id, conversation) per prompt, in order.
pub fn read_prompts_shard(run: &RunDir, shard: usize) -> Result<Vec<(String, Vec<Message>)>> {
    let stage = StageName::Prompts;
    read_prompts_batches(&crate::shard::read_parquet(&run.shard_path(stage, shard))?, stage.as_str())
}

fn arrow_err(what: &str, e: arrow_schema::ArrowError) -> CoreError {
    CoreError::internal(format!("{what}: {e}"))
}

/// The prompts table of a set of groups.
pub fn prompts_batch(groups: &[CandidateGroup]) -> Result<RecordBatch> {
    let ids = StringArray::from_iter_values(groups.iter().map(|g| g.prompt_id.as_str()));
    let prompts = messages_array(groups.iter().map(|g| g.messages.as_slice()));
    RecordBatch::try_new(schema::prompts_schema(), vec![Arc::new(ids), prompts])
        .map_err(|e| arrow_err(StageName::Prompts.as_str(), e))
}

/// The samples table of imported candidates (no token ids, finish reasons or seeds).
pub fn samples_batch(groups: &[CandidateGroup]) -> Result<RecordBatch> {
    let rows = || groups.iter().flat_map(|g| g.samples.iter().map(move |s| (g, s)));
    let n = rows().count();
    let ids = StringArray::from_iter_values(rows().map(|(g, _)| g.prompt_id.as_str()));
    let idx = UInt32Array::from_iter_values(rows().map(|(_, s)| s.sample_idx));
    let resp = StringArray::from_iter_values(rows().map(|(_, s)| s.response.as_str()));
    let mut tok =
        ListBuilder::new(UInt32Builder::new()).with_field(Arc::new(Field::new("item", DataType::UInt32, false)));
    for _ in 0..n {
        tok.append_null();
    }
    let num = UInt32Array::from_iter(rows().map(|(_, s)| s.num_tokens));
    let finish = StringArray::new_null(n);
    let logprob = Float64Array::from_iter(rows().map(|(_, s)| s.logprob));
    let seed = UInt64Array::new_null(n);
    let cols: Vec<ArrayRef> = vec![
        Arc::new(ids),
        Arc::new(idx),
        Arc::new(resp),
        Arc::new(tok.finish()),
        Arc::new(num),
        Arc::new(finish),
        Arc::new(logprob),
        Arc::new(seed),
    ];
    RecordBatch::try_new(schema::samples_schema(), cols).map_err(|e| arrow_err(StageName::Samples.as_str(), e))
}

/// The scores table of imported candidates.
pub fn scores_batch(
    groups: &[CandidateGroup],
    rewards: &[String],
    embedding_dim: Option<usize>,
) -> Result<RecordBatch> {
    let rows = || groups.iter().flat_map(|g| g.samples.iter().map(move |s| (g, s)));
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows().map(|(g, _)| g.prompt_id.as_str()))),
        Arc::new(UInt32Array::from_iter_values(rows().map(|(_, s)| s.sample_idx))),
    ];
    for i in 0..rewards.len() {
        cols.push(Arc::new(Float64Array::from_iter_values(rows().map(|(_, s)| s.rewards[i]))));
    }
    let dim = match embedding_dim {
        Some(d) => Some(i32::try_from(d).map_err(|_| CoreError::data("embedding", "dimension too large"))?),
        None => None,
    };
    if let Some(d) = dim {
        let mut b = FixedSizeListBuilder::new(Float32Builder::new(), d).with_field(Arc::new(Field::new(
            "item",
            DataType::Float32,
            false,
        )));
        for (_, s) in rows() {
            let e = s.embedding.as_deref().ok_or_else(|| CoreError::data(&s.location, "`embedding` is missing"))?;
            b.values().append_slice(e);
            b.append(true);
        }
        cols.push(Arc::new(b.finish()));
    }
    RecordBatch::try_new(schema::scores_schema(rewards, dim), cols)
        .map_err(|e| arrow_err(StageName::Scores.as_str(), e))
}

/// One shard's samples joined with their scores, column by column.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleScores {
    pub prompt_ids: Vec<String>,
    pub sample_idx: Vec<u32>,
    pub responses: Vec<String>,
    /// Reward names, and per name one value per row.
    pub reward_names: Vec<String>,
    pub rewards: Vec<Vec<f64>>,
    pub logprob: Option<Vec<f64>>,
    pub num_tokens: Option<Vec<u32>>,
    /// Row-major embeddings and their dimension.
    pub embeddings: Option<(Vec<f32>, usize)>,
    /// Contiguous row ranges, one per prompt, in table order.
    pub groups: Vec<Range<usize>>,
}

fn concat(batches: &[RecordBatch], what: &str) -> Result<Option<RecordBatch>> {
    match batches {
        [] => Ok(None),
        [b] => Ok(Some(b.clone())),
        bs => arrow_select::concat::concat_batches(&bs[0].schema(), bs).map(Some).map_err(|e| arrow_err(what, e)),
    }
}

fn column<'a>(b: &'a RecordBatch, name: &str, what: &str) -> Result<&'a ArrayRef> {
    b.column_by_name(name).ok_or_else(|| CoreError::internal(format!("{what}: missing column `{name}`")))
}

impl SampleScores {
    /// Joins a samples shard with its scores shard (same rows in the same order).
    /// The samples and scores shards `shard` of a run, joined.
    pub fn read(run: &RunDir, shard: usize) -> Result<Self> {
        let samples = crate::shard::read_parquet(&run.shard_path(StageName::Samples, shard))?;
        let scores = crate::shard::read_parquet(&run.shard_path(StageName::Scores, shard))?;
        Self::from_batches(&samples, &scores, &format!("shard {shard}"))
    }

    pub fn from_batches(samples: &[RecordBatch], scores: &[RecordBatch], what: &str) -> Result<Self> {
        let (Some(sa), Some(sc)) = (concat(samples, what)?, concat(scores, what)?) else {
            return Ok(Self::empty());
        };
        if sa.num_rows() != sc.num_rows() {
            return Err(CoreError::internal(format!("{what}: samples and scores shards differ in length")));
        }
        let ids = column(&sa, PROMPT_ID, what)?.as_string::<i32>();
        let idx = column(&sa, SAMPLE_IDX, what)?.as_primitive::<UInt32Type>();
        let sids = column(&sc, PROMPT_ID, what)?.as_string::<i32>();
        let sidx = column(&sc, SAMPLE_IDX, what)?.as_primitive::<UInt32Type>();
        if ids != sids || idx != sidx {
            return Err(CoreError::internal(format!("{what}: samples and scores shards are not aligned")));
        }
        let responses = column(&sa, RESPONSE, what)?.as_string::<i32>();
        let mut reward_names = Vec::new();
        let mut rewards = Vec::new();
        for f in sc.schema().fields() {
            if let Some(name) = reward_name(f.name()) {
                reward_names.push(name.to_owned());
                rewards.push(column(&sc, f.name(), what)?.as_primitive::<Float64Type>().values().to_vec());
            }
        }
        let logprob = column(&sa, LOGPROB, what)?.as_primitive::<Float64Type>();
        let logprob = (logprob.null_count() == 0).then(|| logprob.values().to_vec());
        let num_tokens = column(&sa, NUM_TOKENS, what)?.as_primitive::<UInt32Type>();
        let num_tokens = (num_tokens.null_count() == 0).then(|| num_tokens.values().to_vec());
        let embeddings = match sc.column_by_name(EMBEDDING) {
            Some(e) => {
                let fl = e.as_fixed_size_list();
                let dim = fl.value_length() as usize;
                let values = fl.values().as_primitive::<Float32Type>().values().to_vec();
                Some((values, dim))
            }
            None => None,
        };
        let prompt_ids: Vec<String> = ids.iter().map(|s| s.unwrap_or_default().to_owned()).collect();
        let mut groups = Vec::new();
        let mut start = 0;
        for i in 1..=prompt_ids.len() {
            if i == prompt_ids.len() || prompt_ids[i] != prompt_ids[start] {
                groups.push(start..i);
                start = i;
            }
        }
        Ok(Self {
            prompt_ids,
            sample_idx: idx.values().to_vec(),
            responses: responses.iter().map(|s| s.unwrap_or_default().to_owned()).collect(),
            reward_names,
            rewards,
            logprob,
            num_tokens,
            embeddings,
            groups,
        })
    }

    fn empty() -> Self {
        Self {
            prompt_ids: vec![],
            sample_idx: vec![],
            responses: vec![],
            reward_names: vec![],
            rewards: vec![],
            logprob: None,
            num_tokens: None,
            embeddings: None,
            groups: vec![],
        }
    }

    /// Position of reward `name` in [`Self::rewards`].
    pub fn reward_index(&self, name: &str) -> Option<usize> {
        self.reward_names.iter().position(|n| n == name)
    }

    /// The embeddings of a group's rows, row-major, with their dimension.
    pub fn group_embeddings(&self, g: &Range<usize>) -> Option<(&[f32], usize)> {
        self.embeddings.as_ref().map(|(v, d)| (&v[g.start * d..g.end * d], *d))
    }
}

/// Reads a prompts shard into (prompt_id, messages) pairs.
pub fn read_prompts_batches(batches: &[RecordBatch], what: &str) -> Result<Vec<(String, Vec<Message>)>> {
    let mut out = Vec::new();
    for b in batches {
        let ids = column(b, PROMPT_ID, what)?.as_string::<i32>();
        let prompts = column(b, PROMPT, what)?;
        for r in 0..b.num_rows() {
            let m = read_messages(prompts.as_ref(), r)
                .ok_or_else(|| CoreError::data(format!("{what}: row {r}"), "unreadable prompt"))?;
            out.push((ids.value(r).to_owned(), m));
        }
    }
    Ok(out)
}
