//! Candidates made elsewhere (long format, Parquet or JSON/JSONL, one row per sample): checked
//! whole before anything is written, then streamed shard by shard.

use std::collections::HashMap;
use std::path::Path;

use arrow_schema::{Field, Schema};

use super::columns::{Column, Kind};
use super::files::{
    Batch, FileKind, FirstRecord, JsonLayout, file_kind, first_record, for_each_batch, parquet_columns,
};
use crate::error::{CoreError, Result};
use crate::messages::{Message, canonical, check_conversation};
use crate::schema::{
    EMBEDDING, LOGPROB, NUM_TOKENS, PROMPT, PROMPT_ID, RESPONSE, SAMPLE_IDX, reward_column, reward_name,
};

/// One candidate response.
#[derive(Debug, Clone, PartialEq)]
pub struct CandidateSample {
    pub sample_idx: u32,
    pub response: String,
    /// One per [`Candidates::rewards`] name.
    pub rewards: Vec<f64>,
    pub logprob: Option<f64>,
    pub num_tokens: Option<u32>,
    pub embedding: Option<Vec<f32>>,
    pub location: String,
}

/// One prompt with its candidates, sorted by `sample_idx`.
#[derive(Debug, Clone, PartialEq)]
pub struct CandidateGroup {
    pub prompt_id: String,
    pub messages: Vec<Message>,
    pub samples: Vec<CandidateSample>,
}

/// A candidates file, grouped by prompt in order of first appearance.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Candidates {
    /// Reward model names (`reward_<name>` columns), in file order.
    pub rewards: Vec<String>,
    pub has_logprob: bool,
    pub has_num_tokens: bool,
    pub embedding_dim: Option<usize>,
    pub groups: Vec<CandidateGroup>,
}

/// What a candidates file offers, read from its schema or first record only.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CandidatesHeader {
    /// Every column (for JSON, the fields of the first record).
    pub columns: Vec<String>,
    /// Reward model names (`reward_<name>` columns); none when the config scores the file.
    pub rewards: Vec<String>,
    pub has_logprob: bool,
    pub has_num_tokens: bool,
    pub has_embedding: bool,
}

const CANDIDATE_REQUIRED: [&str; 4] = [PROMPT_ID, PROMPT, SAMPLE_IDX, RESPONSE];

/// What checking a candidates file found, without keeping its text: enough to stream it again
/// shard by shard ([`stream_candidates`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CandidatesIndex {
    pub header: CandidatesHeader,
    pub embedding_dim: Option<usize>,
    /// Rows of each prompt kept (the first `limit`), in order of first appearance.
    pub group_rows: Vec<u32>,
    /// The first row whose `num_tokens` is 0, if any.
    pub zero_num_tokens: Option<String>,
    /// Digests of the kept prompts' ids ([`crate::seed::digest16`]).
    prompt_digests: HashMap<[u8; 16], usize>,
}

impl CandidatesIndex {
    pub fn prompts(&self) -> usize {
        self.group_rows.len()
    }

    /// Whether a prompt id is among the kept prompts.
    pub fn has_prompt(&self, prompt_id: &str) -> bool {
        self.prompt_digests.contains_key(&crate::seed::digest16(prompt_id.as_bytes()))
    }
}

/// Per-prompt state while checking: digests and sample indices, not the text.
struct ScanGroup {
    messages: [u8; 16],
    first_loc: String,
    /// Sorted.
    sample_idx: Vec<u32>,
}

fn messages_digest(messages: &[Message]) -> [u8; 16] {
    crate::seed::digest16(canonical(messages).as_bytes())
}

/// What a column of a candidates file holds; `None` for a column rbon does not read.
fn kind_of(column: &str) -> Option<Kind> {
    if reward_name(column).is_some() {
        return Some(Kind::Float);
    }
    Some(match column {
        PROMPT_ID => Kind::Id,
        PROMPT => Kind::Conversation { messages_only: false },
        SAMPLE_IDX => Kind::Index,
        RESPONSE => Kind::Text,
        LOGPROB => Kind::Float,
        NUM_TOKENS => Kind::Count,
        EMBEDDING => Kind::Vector,
        _ => return None,
    })
}

impl CandidatesHeader {
    fn of(columns: Vec<String>) -> Self {
        let mut h = Self::default();
        for n in &columns {
            if let Some(r) = reward_name(n) {
                h.rewards.push(r.to_owned());
            }
            h.has_logprob |= n == LOGPROB;
            h.has_num_tokens |= n == NUM_TOKENS;
            h.has_embedding |= n == EMBEDDING;
        }
        Self { columns, ..h }
    }

    /// The columns read, in file order.
    fn read(&self) -> impl Iterator<Item = (&str, Kind)> {
        self.columns.iter().filter_map(|c| kind_of(c).map(|k| (c.as_str(), k)))
    }
}

/// JSON candidates are decoded into the columns of the first record.
impl JsonLayout for CandidatesHeader {
    fn schema(&self, first: &FirstRecord) -> Result<Schema> {
        Ok(Schema::new(
            self.read()
                .map(|(name, kind)| Field::new(name, kind.json_type(first.kind(name)), true))
                .collect::<Vec<_>>(),
        ))
    }

    /// A reward, log-prob, length or embedding field on a later record only would be ignored.
    fn first_only(&self, field: &str) -> bool {
        kind_of(field).is_some()
    }

    fn expected(&self, field: &str) -> String {
        kind_of(field).unwrap_or(Kind::Text).expected(field)
    }
}

/// Reads only the columns of a candidates file (for validation without loading it).
pub fn candidates_header(path: &Path) -> Result<CandidatesHeader> {
    let shown = path.display().to_string();
    let names = match file_kind(path) {
        Some(FileKind::Parquet) => parquet_columns(path)?,
        Some(_) => {
            let first = first_record(path)?.ok_or_else(|| CoreError::data(&shown, "the file holds no candidates"))?;
            first.fields.into_iter().map(|(k, _)| k).collect()
        }
        None => return Err(CoreError::data(&shown, "candidates must be a .parquet, .jsonl or .json file")),
    };
    for req in CANDIDATE_REQUIRED {
        if !names.iter().any(|n| n == req) {
            return Err(CoreError::data(
                &shown,
                format!(
                    "missing column `{req}` (candidates need {}; found {})",
                    CANDIDATE_REQUIRED.join(", "),
                    names.join(", ")
                ),
            ));
        }
    }
    Ok(CandidatesHeader::of(names))
}

/// The columns of one batch of candidates.
struct CandidateColumns {
    prompt_id: Column,
    prompt: Column,
    sample_idx: Column,
    response: Column,
    rewards: Vec<Column>,
    logprob: Option<Column>,
    num_tokens: Option<Column>,
    embedding: Option<Column>,
}

impl CandidateColumns {
    fn new(batch: &Batch, h: &CandidatesHeader) -> Result<Self> {
        let get = |name: &str| Column::get(batch, name, kind_of(name).unwrap_or(Kind::Text));
        let optional = |present: bool, name: &str| present.then(|| get(name)).transpose();
        Ok(Self {
            prompt_id: get(PROMPT_ID)?,
            prompt: get(PROMPT)?,
            sample_idx: get(SAMPLE_IDX)?,
            response: get(RESPONSE)?,
            rewards: h.rewards.iter().map(|r| get(&reward_column(r))).collect::<Result<_>>()?,
            logprob: optional(h.has_logprob, LOGPROB)?,
            num_tokens: optional(h.has_num_tokens, NUM_TOKENS)?,
            embedding: optional(h.has_embedding, EMBEDDING)?,
        })
    }

    fn row(&self, r: usize, location: String) -> Result<(String, Vec<Message>, CandidateSample)> {
        let loc = location.as_str();
        let prompt_id = self.prompt_id.text(r, loc)?;
        let messages = self.prompt.conversation(r, loc)?.into_messages();
        let sample = CandidateSample {
            sample_idx: self.sample_idx.index(r, loc)?,
            response: self.response.text(r, loc)?,
            rewards: self.rewards.iter().map(|c| c.float(r, loc)).collect::<Result<_>>()?,
            logprob: self
                .logprob
                .as_ref()
                .map(|c| c.float(r, loc))
                .transpose()?
                .map(|lp| log_probability(lp, loc))
                .transpose()?,
            num_tokens: self.num_tokens.as_ref().map(|c| c.count(r, loc)).transpose()?,
            embedding: self.embedding.as_ref().map(|c| c.vector(r, loc)).transpose()?,
            location,
        };
        Ok((prompt_id, messages, sample))
    }
}

/// A sequence's log-probability is at most 0 (a little above, from rounding, is kept).
fn log_probability(lp: f64, loc: &str) -> Result<f64> {
    if lp > 1e-6 {
        return Err(CoreError::data(loc, format!("`logprob` is {lp}; a log-probability is at most 0")));
    }
    Ok(lp)
}

/// Calls `f(prompt_id, messages, sample)` for every row of a candidates file, in file order.
fn for_each_candidate(
    path: &Path,
    header: &CandidatesHeader,
    mut f: impl FnMut(String, Vec<Message>, CandidateSample) -> Result<bool>,
) -> Result<()> {
    for_each_batch(path, header, |batch| {
        let cols = CandidateColumns::new(&batch, header)?;
        for r in 0..batch.data.num_rows() {
            let (prompt_id, messages, sample) = cols.row(r, batch.location(r))?;
            if !f(prompt_id, messages, sample)? {
                return Ok(false);
            }
        }
        Ok(true)
    })
}

/// Checks every row of a candidates file (DESIGN §7) and indexes its first `limit` prompts,
/// keeping per prompt only digests and sample indices: a large file is not held in memory.
pub fn scan_candidates(path: &Path, limit: Option<u64>) -> Result<CandidatesIndex> {
    let header = candidates_header(path)?;
    let limit = limit.map(|l| l as usize).unwrap_or(usize::MAX);
    let mut index: HashMap<[u8; 16], usize> = HashMap::new();
    let mut groups: Vec<ScanGroup> = Vec::new();
    let mut embedding_dim: Option<usize> = None;
    let mut zero_num_tokens = None;
    let mut duplicate: Option<(String, String, u32)> = None;
    for_each_candidate(path, &header, |prompt_id, messages, s| {
        if let Some(e) = &s.embedding
            && !e.is_empty()
            && e.iter().all(|&x| x == 0.0)
        {
            return Err(CoreError::data(&s.location, "`embedding` is the zero vector, which has no direction"));
        }
        if let Some(dim) = s.embedding.as_ref().map(Vec::len) {
            match embedding_dim {
                None => embedding_dim = Some(dim),
                Some(d) if d != dim => {
                    return Err(CoreError::data(
                        &s.location,
                        format!("embedding has {dim} values, earlier rows have {d}"),
                    ));
                }
                _ => {}
            }
            if dim == 0 {
                return Err(CoreError::data(&s.location, "embedding is empty"));
            }
        }
        let key = crate::seed::digest16(prompt_id.as_bytes());
        let gi = match index.get(&key) {
            Some(&gi) => {
                if groups[gi].messages != messages_digest(&messages) {
                    return Err(CoreError::data(
                        &s.location,
                        format!(
                            "prompt differs from the one at {} for the same prompt_id {prompt_id:?}",
                            groups[gi].first_loc
                        ),
                    ));
                }
                gi
            }
            None => {
                if groups.len() >= limit {
                    return Ok(true);
                }
                check_conversation(&messages).map_err(|m| CoreError::data(&s.location, m))?;
                index.insert(key, groups.len());
                groups.push(ScanGroup {
                    messages: messages_digest(&messages),
                    first_loc: s.location.clone(),
                    sample_idx: Vec::new(),
                });
                groups.len() - 1
            }
        };
        let idx = &mut groups[gi].sample_idx;
        match idx.binary_search(&s.sample_idx) {
            Ok(_) => {
                // Rare: find the first row again to name it.
                duplicate = Some((s.location.clone(), prompt_id, s.sample_idx));
                return Ok(false);
            }
            Err(at) => idx.insert(at, s.sample_idx),
        }
        if s.num_tokens == Some(0) && zero_num_tokens.is_none() {
            zero_num_tokens = Some(s.location.clone());
        }
        Ok(true)
    })?;
    if let Some((loc, prompt_id, k)) = duplicate {
        let mut first = String::new();
        for_each_candidate(path, &header, |pid, _, s| {
            if pid == prompt_id && s.sample_idx == k {
                first = s.location;
                return Ok(false);
            }
            Ok(true)
        })?;
        return Err(CoreError::data(
            loc,
            format!("duplicate sample_idx {k} for prompt_id {prompt_id:?}: also at {first}"),
        ));
    }
    if groups.is_empty() {
        return Err(CoreError::data(path.display().to_string(), "the file holds no candidates"));
    }
    Ok(CandidatesIndex {
        header,
        embedding_dim,
        group_rows: groups.iter().map(|g| g.sample_idx.len() as u32).collect(),
        zero_num_tokens,
        prompt_digests: index,
    })
}

/// Streams a checked candidates file in shards of `shard_size` prompts (in order of first
/// appearance), calling `f(shard, groups)` for each shard `want(shard)` selects once all its rows
/// are read. Rows are buffered only until their shard is complete, so a file grouped by prompt
/// (as generators write them) streams in bounded memory; shards come in the order they complete.
pub fn stream_candidates(
    path: &Path,
    index: &CandidatesIndex,
    shard_size: usize,
    want: impl Fn(usize) -> bool,
    mut f: impl FnMut(usize, Vec<CandidateGroup>) -> Result<bool>,
) -> Result<()> {
    let shard_size = shard_size.max(1);
    let n = index.prompts();
    let mut rows_needed: Vec<u64> = vec![0; n.div_ceil(shard_size)];
    for (g, r) in index.group_rows.iter().enumerate() {
        rows_needed[g / shard_size] += u64::from(*r);
    }
    let mut ordinal: HashMap<[u8; 16], usize> = HashMap::new();
    let mut pending: HashMap<usize, (Vec<Option<CandidateGroup>>, u64)> = HashMap::new();
    let mut failure = None;
    for_each_candidate(path, &index.header, |prompt_id, messages, s| {
        let key = crate::seed::digest16(prompt_id.as_bytes());
        let gi = match ordinal.get(&key) {
            Some(&g) => g,
            // Prompts past the first `limit` are skipped, as the scan did.
            None if ordinal.len() < n => {
                let g = ordinal.len();
                ordinal.insert(key, g);
                g
            }
            None => return Ok(true),
        };
        let shard = gi / shard_size;
        if !want(shard) {
            return Ok(true);
        }
        let (groups, seen) =
            pending.entry(shard).or_insert_with(|| (vec![None; (n - shard * shard_size).min(shard_size)], 0));
        let slot = &mut groups[gi - shard * shard_size];
        slot.get_or_insert_with(|| CandidateGroup { prompt_id, messages, samples: Vec::new() }).samples.push(s);
        *seen += 1;
        if *seen == rows_needed[shard] {
            let (groups, _) = pending.remove(&shard).unwrap_or_default();
            let mut groups: Vec<CandidateGroup> = groups.into_iter().flatten().collect();
            for g in &mut groups {
                g.samples.sort_by_key(|s| s.sample_idx);
            }
            match f(shard, groups) {
                Ok(more) => return Ok(more),
                Err(e) => {
                    failure = Some(e);
                    return Ok(false);
                }
            }
        }
        Ok(true)
    })?;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Reads a candidates file (DESIGN §7), keeping the first `limit` prompts, all in memory.
pub fn read_candidates(path: &Path, limit: Option<u64>) -> Result<Candidates> {
    let index = scan_candidates(path, limit)?;
    let mut shards: Vec<(usize, Vec<CandidateGroup>)> = Vec::new();
    stream_candidates(
        path,
        &index,
        1,
        |_| true,
        |i, g| {
            shards.push((i, g));
            Ok(true)
        },
    )?;
    shards.sort_by_key(|(i, _)| *i);
    Ok(Candidates {
        rewards: index.header.rewards,
        has_logprob: index.header.has_logprob,
        has_num_tokens: index.header.has_num_tokens,
        embedding_dim: index.embedding_dim,
        groups: shards.into_iter().flat_map(|(_, g)| g).collect(),
    })
}
