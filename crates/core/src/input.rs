//! Reading what users bring: prompts (JSONL, JSON, Parquet; a file, a directory or a glob; a
//! prompt or messages column; HH-RLHF transcripts) and candidates made elsewhere (long format,
//! Parquet or JSONL). Every data error names the file and the line or row to fix.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{CoreError, Result};
use crate::messages::{Message, canonical, is_messages_type, read_messages};
use crate::schema::{
    EMBEDDING, LOGPROB, NUM_TOKENS, PROMPT, PROMPT_ID, RESPONSE, SAMPLE_IDX, reward_column, reward_name,
};
use crate::seed::sha256_hex;

fn default_shard_size() -> u64 {
    32
}

/// How prompts are laid out in the input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputFormat {
    /// A prompt column (text or messages) or a messages column.
    #[default]
    Auto,
    /// Anthropic HH-RLHF transcripts (`\n\nHuman: … \n\nAssistant: …`); the prompt is every turn
    /// before the last `Assistant:`.
    HhRlhf,
}

/// The `input` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// Prompts: a `.jsonl`, `.jsonl.gz`, `.json` or `.parquet` file, a directory of them, or a
    /// glob. Relative paths are taken from the working directory.
    #[serde(default)]
    pub path: Option<String>,
    /// Column holding the prompt: text (one user turn) or a list of `{role, content}` messages.
    /// Default: `prompt` (`chosen` for `format: hh-rlhf`).
    #[serde(default)]
    pub prompt_column: Option<String>,
    /// Column holding a list of `{role, content}` messages; the alternative to `prompt_column`.
    #[serde(default)]
    pub messages_column: Option<String>,
    /// Column holding a stable prompt id. Default: SHA-256 of the canonical prompt.
    #[serde(default)]
    pub id_column: Option<String>,
    /// `auto` or `hh-rlhf`.
    #[serde(default)]
    pub format: InputFormat,
    /// Use only the first K prompts.
    #[serde(default)]
    pub limit: Option<u64>,
    /// Prompts per shard, the unit of work, resume and distribution.
    #[serde(default = "default_shard_size")]
    pub shard_size: u64,
    /// Candidates made elsewhere (long format, Parquet or JSONL): start at selection.
    #[serde(default)]
    pub candidates: Option<String>,
}

impl Default for InputConfig {
    fn default() -> Self {
        Self {
            path: None,
            prompt_column: None,
            messages_column: None,
            id_column: None,
            format: InputFormat::Auto,
            limit: None,
            shard_size: default_shard_size(),
            candidates: None,
        }
    }
}

/// The file kinds we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Jsonl,
    Json,
    Parquet,
}

/// The kind of an input file from its name (`.gz` allowed on JSON and JSONL).
pub fn file_kind(path: &Path) -> Option<FileKind> {
    let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
    let name = name.strip_suffix(".gz").unwrap_or(&name);
    if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
        Some(FileKind::Jsonl)
    } else if name.ends_with(".json") {
        Some(FileKind::Json)
    } else if name.ends_with(".parquet") {
        Some(FileKind::Parquet)
    } else {
        None
    }
}

/// Expands an input path: a file, every supported file in a directory (sorted), or a glob's
/// matches (sorted). No file is an error.
pub fn resolve_files(spec: &str) -> std::result::Result<Vec<PathBuf>, String> {
    let p = Path::new(spec);
    let mut files = if p.is_file() {
        return Ok(vec![p.to_owned()]);
    } else if p.is_dir() {
        let rd = std::fs::read_dir(p).map_err(|e| format!("cannot list directory {spec}: {e}"))?;
        rd.filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| f.is_file() && file_kind(f).is_some())
            .collect::<Vec<_>>()
    } else if spec.contains(['*', '?', '[']) {
        glob::glob(spec)
            .map_err(|e| format!("bad glob pattern {spec:?}: {e}"))?
            .filter_map(|e| e.ok())
            .filter(|f| f.is_file())
            .collect()
    } else {
        return Err(format!("no such file or directory: {spec}"));
    };
    files.sort();
    if files.is_empty() {
        return Err(format!("{spec} matches no .jsonl, .json or .parquet file"));
    }
    if let Some(bad) = files.iter().find(|f| file_kind(f).is_none()) {
        return Err(format!("{} is not a .jsonl, .json or .parquet file", bad.display()));
    }
    Ok(files)
}

fn open_text(path: &Path) -> Result<Box<dyn BufRead>> {
    let f = File::open(path).map_err(|e| CoreError::io(path, e))?;
    let gz = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gz"));
    Ok(if gz { Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(f))) } else { Box::new(BufReader::new(f)) })
}

/// Reads JSON objects from a JSONL file, or a JSON file holding an array of objects (a `.json`
/// file that does not start with `[` is read as JSON lines, as `datasets` writes them). Calls
/// `f(location, object)` per record.
fn for_each_json(path: &Path, mut f: impl FnMut(String, serde_json::Map<String, Value>) -> Result<bool>) -> Result<()> {
    let kind = file_kind(path);
    let mut reader = open_text(path)?;
    let shown = path.display().to_string();
    if kind == Some(FileKind::Json) {
        let mut text = String::new();
        reader.read_to_string(&mut text).map_err(|e| CoreError::io(path, e))?;
        if text.trim_start().starts_with('[') {
            let rows: Vec<Value> = serde_json::from_str(&text).map_err(|e| {
                CoreError::data(format!("{shown}:{}:{}", e.line(), e.column()), format!("invalid JSON: {e}"))
            })?;
            for (i, v) in rows.into_iter().enumerate() {
                let loc = format!("{shown}: record {i}");
                let Value::Object(m) = v else {
                    return Err(CoreError::data(loc, "expected a JSON object"));
                };
                if !f(loc, m)? {
                    break;
                }
            }
            return Ok(());
        }
        return for_each_line(&shown, text.as_bytes(), f);
    }
    for_each_line(&shown, reader, f)
}

fn for_each_line(
    shown: &str,
    reader: impl BufRead,
    mut f: impl FnMut(String, serde_json::Map<String, Value>) -> Result<bool>,
) -> Result<()> {
    for (i, line) in reader.lines().enumerate() {
        let loc = format!("{shown}:{}", i + 1);
        let line = line.map_err(|e| CoreError::data(&loc, format!("cannot read: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| CoreError::data(&loc, format!("invalid JSON: {e}")))?;
        let Value::Object(m) = v else {
            return Err(CoreError::data(loc, "expected a JSON object on each line"));
        };
        if !f(loc, m)? {
            break;
        }
    }
    Ok(())
}

/// Reads a user's Parquet file batch by batch (bounded memory); a file that does not decode is
/// bad input, not an I/O failure. `f` returns false to stop.
fn for_each_parquet_batch(path: &Path, mut f: impl FnMut(RecordBatch) -> Result<bool>) -> Result<()> {
    let bad =
        |e: &dyn std::fmt::Display| CoreError::data(path.display().to_string(), format!("unreadable Parquet: {e}"));
    let file = File::open(path).map_err(|e| CoreError::io(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| bad(&e))?
        .with_batch_size(1024)
        .build()
        .map_err(|e| bad(&e))?;
    for batch in reader {
        if !f(batch.map_err(|e| bad(&e))?)? {
            break;
        }
    }
    Ok(())
}

fn json_messages(v: &Value) -> Option<Vec<Message>> {
    let arr = v.as_array()?;
    arr.iter()
        .map(|m| {
            let o = m.as_object()?;
            // Both OpenAI (`role`/`content`) and ShareGPT (`from`/`value`) spellings.
            let role = o.get("role").or_else(|| o.get("from"))?.as_str()?;
            let content = o.get("content").or_else(|| o.get("value"))?.as_str()?;
            let role = match role {
                "human" => "user",
                "gpt" => "assistant",
                r => r,
            };
            Some(Message::new(role, content))
        })
        .collect()
}

/// Splits an HH-RLHF transcript into turns and keeps every turn before the last `Assistant:`.
pub fn hh_rlhf_prompt(transcript: &str) -> Option<Vec<Message>> {
    let mut turns: Vec<Message> = Vec::new();
    let mut rest = transcript;
    const H: &str = "\n\nHuman:";
    const A: &str = "\n\nAssistant:";
    loop {
        let next_h = rest.find(H);
        let next_a = rest.find(A);
        let (pos, role, tag) = match (next_h, next_a) {
            (Some(h), Some(a)) if h < a => (h, "user", H),
            (Some(h), None) => (h, "user", H),
            (_, Some(a)) => (a, "assistant", A),
            (None, None) => break,
        };
        if let Some(last) = turns.last_mut() {
            last.content = rest[..pos].trim().to_owned();
        } else if !rest[..pos].trim().is_empty() {
            return None;
        }
        turns.push(Message::new(role, ""));
        rest = &rest[pos + tag.len()..];
    }
    let last = turns.last_mut()?;
    last.content = rest.trim().to_owned();
    let cut = turns.iter().rposition(|m| m.role == "assistant")?;
    turns.truncate(cut);
    (!turns.is_empty() && turns.last().is_some_and(|m| m.role == "user")).then_some(turns)
}

/// One prompt read from the input.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRow {
    pub prompt_id: String,
    pub messages: Vec<Message>,
    /// File and line/row it came from, for error messages.
    pub location: String,
}

/// The default id of a prompt: SHA-256 of its canonical form.
pub fn prompt_id_of(messages: &[Message]) -> String {
    sha256_hex(canonical(messages).as_bytes())
}

fn value_to_id(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Reads prompts as `InputConfig` describes them. Duplicate ids are an error naming both rows.
pub fn read_prompts(cfg: &InputConfig) -> Result<Vec<PromptRow>> {
    let mut out = Vec::new();
    for_each_prompt(cfg, |row| {
        out.push(row);
        Ok(true)
    })?;
    Ok(out)
}

/// Streams prompts as `InputConfig` describes them, in input order, to `f` (which returns false
/// to stop early); returns how many were passed. Only the ids seen so far are kept (a 16-byte
/// digest and the row's location each), so memory does not grow with the prompts' text.
/// Duplicate ids are an error naming both rows; an input without prompts is an error.
pub fn for_each_prompt(cfg: &InputConfig, mut f: impl FnMut(PromptRow) -> Result<bool>) -> Result<usize> {
    let spec = cfg.path.as_deref().ok_or_else(|| CoreError::data("input.path", "no prompt input configured"))?;
    let files = resolve_files(spec).map_err(|m| CoreError::data("input.path", m))?;
    let limit = cfg.limit.map(|l| l as usize).unwrap_or(usize::MAX);
    let (column, messages_only) = match (&cfg.messages_column, &cfg.prompt_column, cfg.format) {
        (Some(m), _, _) => (m.clone(), true),
        (None, Some(p), _) => (p.clone(), false),
        (None, None, InputFormat::HhRlhf) => ("chosen".to_owned(), false),
        (None, None, InputFormat::Auto) => (PROMPT.to_owned(), false),
    };
    let mut count = 0usize;
    let mut seen: HashMap<[u8; 16], String> = HashMap::new();
    let mut push = |row: PromptRow| -> Result<bool> {
        let digest = crate::seed::digest16(row.prompt_id.as_bytes());
        if let Some(first) = seen.get(&digest) {
            return Err(CoreError::data(
                &row.location,
                format!(
                    "duplicate prompt id {:?}: also at {first} (give each prompt a distinct id, or drop the repeat)",
                    row.prompt_id
                ),
            ));
        }
        seen.insert(digest, row.location.clone());
        count += 1;
        Ok(f(row)? && count < limit)
    };
    let to_messages = |loc: &str, text: Option<&str>, msgs: Option<Vec<Message>>| -> Result<Vec<Message>> {
        let m = match (cfg.format, text, msgs) {
            (InputFormat::HhRlhf, Some(t), _) => hh_rlhf_prompt(t).ok_or_else(|| {
                CoreError::data(
                    loc,
                    format!("column `{column}` is not an HH-RLHF transcript (\\n\\nHuman: … \\n\\nAssistant: …)"),
                )
            })?,
            (InputFormat::Auto, Some(t), _) if !messages_only => vec![Message::user(t)],
            (_, _, Some(m)) => m,
            _ => {
                let want = if messages_only {
                    "a list of {role, content} messages"
                } else {
                    "text or a list of {role, content} messages"
                };
                return Err(CoreError::data(loc, format!("column `{column}` must hold {want}")));
            }
        };
        if m.is_empty() {
            return Err(CoreError::data(loc, format!("column `{column}` holds an empty conversation")));
        }
        Ok(m)
    };
    'files: for file in &files {
        match file_kind(file) {
            Some(FileKind::Parquet) => {
                let shown = file.display();
                let mut row0 = 0usize;
                let mut stop = false;
                for_each_parquet_batch(file, |batch| {
                    let col = batch.column_by_name(&column).ok_or_else(|| {
                        CoreError::data(
                            shown.to_string(),
                            format!("no column `{column}`; columns: {}", columns_of(&batch)),
                        )
                    })?;
                    let text = match col.data_type() {
                        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Some(
                            arrow_cast::cast(col, &DataType::Utf8)
                                .map_err(|e| CoreError::data(shown.to_string(), e.to_string()))?,
                        ),
                        t if is_messages_type(t) => None,
                        t => {
                            return Err(CoreError::data(
                                shown.to_string(),
                                format!("column `{column}` has type {t}; expected text or list<struct<role, content>>"),
                            ));
                        }
                    };
                    let ids = match &cfg.id_column {
                        Some(c) => Some(id_column(&batch, c, &shown.to_string())?),
                        None => None,
                    };
                    for r in 0..batch.num_rows() {
                        let loc = format!("{shown}: row {}", row0 + r);
                        let msgs = match &text {
                            Some(t) => {
                                let t = t.as_string::<i32>();
                                to_messages(&loc, t.is_valid(r).then(|| t.value(r)), None)?
                            }
                            None => to_messages(&loc, None, read_messages(col.as_ref(), r))?,
                        };
                        let prompt_id = match &ids {
                            Some(ids) => {
                                let ids = ids.as_string::<i32>();
                                if ids.is_null(r) {
                                    return Err(CoreError::data(loc, "the id column is null"));
                                }
                                ids.value(r).to_owned()
                            }
                            None => prompt_id_of(&msgs),
                        };
                        if !push(PromptRow { prompt_id, messages: msgs, location: loc })? {
                            stop = true;
                            return Ok(false);
                        }
                    }
                    row0 += batch.num_rows();
                    Ok(true)
                })?;
                if stop {
                    break 'files;
                }
            }
            _ => {
                let mut stop = false;
                for_each_json(file, |loc, obj| {
                    let v = obj.get(&column).ok_or_else(|| {
                        CoreError::data(
                            &loc,
                            format!(
                                "no field `{column}`; fields: {}",
                                obj.keys().cloned().collect::<Vec<_>>().join(", ")
                            ),
                        )
                    })?;
                    let msgs = to_messages(&loc, v.as_str(), json_messages(v))?;
                    let prompt_id = match &cfg.id_column {
                        Some(c) => obj.get(c).and_then(value_to_id).ok_or_else(|| {
                            CoreError::data(&loc, format!("id field `{c}` is missing or not a string/number"))
                        })?,
                        None => prompt_id_of(&msgs),
                    };
                    let more = push(PromptRow { prompt_id, messages: msgs, location: loc })?;
                    stop = !more;
                    Ok(more)
                })?;
                if stop {
                    break;
                }
            }
        }
    }
    if count == 0 {
        return Err(CoreError::data(spec, "the input holds no prompts"));
    }
    Ok(count)
}

fn columns_of(batch: &RecordBatch) -> String {
    batch.schema().fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
}

fn id_column(batch: &RecordBatch, name: &str, shown: &str) -> Result<ArrayRef> {
    let col = batch
        .column_by_name(name)
        .ok_or_else(|| CoreError::data(shown, format!("no id column `{name}`; columns: {}", columns_of(batch))))?;
    arrow_cast::cast(col, &DataType::Utf8)
        .map_err(|e| CoreError::data(shown, format!("id column `{name}` cannot be read as text: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Candidates

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

fn header_from_names<'a>(names: impl Iterator<Item = &'a str>) -> (CandidatesHeader, Vec<String>) {
    let mut h = CandidatesHeader::default();
    let mut all = Vec::new();
    for n in names {
        all.push(n.to_owned());
        if let Some(r) = reward_name(n) {
            h.rewards.push(r.to_owned());
        }
        h.has_logprob |= n == LOGPROB;
        h.has_num_tokens |= n == NUM_TOKENS;
        h.has_embedding |= n == EMBEDDING;
    }
    (h, all)
}

/// Reads only the columns of a candidates file (for validation without loading it).
pub fn candidates_header(path: &Path) -> Result<CandidatesHeader> {
    let shown = path.display().to_string();
    let (h, names) = match file_kind(path) {
        Some(FileKind::Parquet) => {
            let f = File::open(path).map_err(|e| CoreError::io(path, e))?;
            let b = ParquetRecordBatchReaderBuilder::try_new(f)
                .map_err(|source| CoreError::Parquet { path: path.to_owned(), source })?;
            let schema = b.schema().clone();
            header_from_names(schema.fields().iter().map(|f| f.name().as_str()))
        }
        Some(_) => {
            let mut first = None;
            for_each_json(path, |_, m| {
                first = Some(m);
                Ok(false)
            })?;
            let first = first.ok_or_else(|| CoreError::data(&shown, "the file holds no candidates"))?;
            header_from_names(first.keys().map(String::as_str))
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
    Ok(CandidatesHeader { columns: names, ..h })
}

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
}

impl CandidatesIndex {
    pub fn prompts(&self) -> usize {
        self.group_rows.len()
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

/// Calls `f(prompt_id, messages, sample)` for every row of a candidates file, in file order.
fn for_each_candidate(
    path: &Path,
    header: &CandidatesHeader,
    mut f: impl FnMut(String, Vec<Message>, CandidateSample) -> Result<bool>,
) -> Result<()> {
    let shown = path.display().to_string();
    if file_kind(path) == Some(FileKind::Parquet) {
        let mut row0 = 0usize;
        for_each_parquet_batch(path, |batch| {
            let cols = ParquetColumns::new(&batch, header, &shown)?;
            for r in 0..batch.num_rows() {
                let loc = format!("{shown}: row {}", row0 + r);
                let (pid, msgs, s) = cols.row(r, loc)?;
                if !f(pid, msgs, s)? {
                    return Ok(false);
                }
            }
            row0 += batch.num_rows();
            Ok(true)
        })
    } else {
        for_each_json(path, |loc, obj| {
            let (pid, msgs, s) = json_candidate(&loc, &obj, header)?;
            f(pid, msgs, s)
        })
    }
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
                if let Some(last) = messages.last()
                    && last.role != "user"
                {
                    return Err(CoreError::data(
                        &s.location,
                        format!(
                            "the prompt ends with a `{}` turn; it must end with the user turn being answered",
                            last.role
                        ),
                    ));
                }
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

fn finite(loc: &str, col: &str, v: Option<f64>) -> Result<f64> {
    match v {
        Some(x) if x.is_finite() => Ok(x),
        Some(x) => Err(CoreError::data(loc, format!("`{col}` is {x}; it must be a finite number"))),
        None => Err(CoreError::data(loc, format!("`{col}` is null or not a number"))),
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

fn json_candidate(
    loc: &str,
    obj: &serde_json::Map<String, Value>,
    h: &CandidatesHeader,
) -> Result<(String, Vec<Message>, CandidateSample)> {
    // The columns come from the first record; a field it lacks would otherwise be ignored.
    for k in obj.keys() {
        let known = match reward_name(k) {
            Some(r) => h.rewards.iter().any(|x| x == r),
            None => match k.as_str() {
                LOGPROB => h.has_logprob,
                NUM_TOKENS => h.has_num_tokens,
                EMBEDDING => h.has_embedding,
                _ => true,
            },
        };
        if !known {
            return Err(CoreError::data(
                loc,
                format!("field `{k}` is not on the first record; every record must have the same fields"),
            ));
        }
    }
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let missing = |k: &str| CoreError::data(loc, format!("`{k}` is missing or null"));
    let pid = get(PROMPT_ID)
        .ok_or_else(|| missing(PROMPT_ID))
        .and_then(|v| value_to_id(v).ok_or_else(|| CoreError::data(loc, "`prompt_id` must be a string or a number")))?;
    let pv = get(PROMPT).ok_or_else(|| missing(PROMPT))?;
    let msgs = match pv.as_str() {
        Some(t) => vec![Message::user(t)],
        None => json_messages(pv).filter(|m| !m.is_empty()).ok_or_else(|| {
            CoreError::data(loc, "`prompt` must be text or a non-empty list of {role, content} messages")
        })?,
    };
    let sample_idx = get(SAMPLE_IDX)
        .and_then(Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| CoreError::data(loc, "`sample_idx` must be a non-negative integer below 2^32"))?;
    let response = get(RESPONSE)
        .and_then(Value::as_str)
        .ok_or_else(|| CoreError::data(loc, "`response` must be text"))?
        .to_owned();
    let rewards = h
        .rewards
        .iter()
        .map(|r| {
            let col = reward_column(r);
            finite(loc, &col, get(&col).and_then(Value::as_f64))
        })
        .collect::<Result<Vec<_>>>()?;
    let logprob = if h.has_logprob { Some(finite(loc, LOGPROB, get(LOGPROB).and_then(Value::as_f64))?) } else { None };
    let num_tokens = if h.has_num_tokens {
        Some(
            get(NUM_TOKENS)
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| CoreError::data(loc, "`num_tokens` must be a non-negative integer"))?,
        )
    } else {
        None
    };
    let embedding = if h.has_embedding {
        let arr = get(EMBEDDING)
            .and_then(Value::as_array)
            .ok_or_else(|| CoreError::data(loc, "`embedding` must be a list of numbers"))?;
        let v = arr
            .iter()
            .map(|x| x.as_f64().map(|f| f as f32).filter(|f| f.is_finite()))
            .collect::<Option<Vec<f32>>>()
            .ok_or_else(|| CoreError::data(loc, "`embedding` must hold finite 32-bit floats only"))?;
        Some(v)
    } else {
        None
    };
    Ok((
        pid,
        msgs,
        CandidateSample { sample_idx, response, rewards, logprob, num_tokens, embedding, location: loc.to_owned() },
    ))
}

/// The columns of one Parquet batch of candidates, cast to the types we use.
struct ParquetColumns {
    prompt_id: ArrayRef,
    prompt: ArrayRef,
    prompt_is_text: bool,
    sample_idx: ArrayRef,
    response: ArrayRef,
    rewards: Vec<(String, ArrayRef)>,
    logprob: Option<ArrayRef>,
    num_tokens: Option<ArrayRef>,
    embedding: Option<ArrayRef>,
}

impl ParquetColumns {
    fn new(batch: &RecordBatch, h: &CandidatesHeader, shown: &str) -> Result<Self> {
        let col = |name: &str| {
            batch
                .column_by_name(name)
                .cloned()
                .ok_or_else(|| CoreError::data(shown, format!("missing column `{name}`")))
        };
        let cast = |name: &str, t: &DataType| -> Result<ArrayRef> {
            let c = col(name)?;
            arrow_cast::cast(&c, t).map_err(|e| {
                CoreError::data(
                    shown,
                    format!("column `{name}` has type {}, which cannot be read as {t}: {e}", c.data_type()),
                )
            })
        };
        let prompt = col(PROMPT)?;
        let prompt_is_text = matches!(prompt.data_type(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View);
        if !prompt_is_text && !is_messages_type(prompt.data_type()) {
            return Err(CoreError::data(
                shown,
                format!(
                    "column `prompt` has type {}; expected text or list<struct<role, content>>",
                    prompt.data_type()
                ),
            ));
        }
        let prompt = if prompt_is_text { cast(PROMPT, &DataType::Utf8)? } else { prompt };
        let embedding = if h.has_embedding {
            let list_f32 =
                DataType::List(std::sync::Arc::new(arrow_schema::Field::new("item", DataType::Float32, true)));
            Some(cast(EMBEDDING, &list_f32)?)
        } else {
            None
        };
        Ok(Self {
            prompt_id: cast(PROMPT_ID, &DataType::Utf8)?,
            prompt,
            prompt_is_text,
            sample_idx: cast(SAMPLE_IDX, &DataType::Int64)?,
            response: cast(RESPONSE, &DataType::Utf8)?,
            rewards: h
                .rewards
                .iter()
                .map(|r| {
                    let name = reward_column(r);
                    Ok((name.clone(), cast(&name, &DataType::Float64)?))
                })
                .collect::<Result<_>>()?,
            logprob: if h.has_logprob { Some(cast(LOGPROB, &DataType::Float64)?) } else { None },
            num_tokens: if h.has_num_tokens { Some(cast(NUM_TOKENS, &DataType::Int64)?) } else { None },
            embedding,
        })
    }

    fn row(&self, r: usize, loc: String) -> Result<(String, Vec<Message>, CandidateSample)> {
        let null = |name: &str| CoreError::data(&loc, format!("`{name}` is null"));
        let f64_at = |a: &ArrayRef, name: &str| -> Result<f64> {
            let a = a.as_primitive::<arrow_array::types::Float64Type>();
            finite(&loc, name, a.is_valid(r).then(|| a.value(r)))
        };
        let pid = self.prompt_id.as_string::<i32>();
        if pid.is_null(r) {
            return Err(null(PROMPT_ID));
        }
        let msgs = if self.prompt_is_text {
            let p = self.prompt.as_string::<i32>();
            if p.is_null(r) {
                return Err(null(PROMPT));
            }
            vec![Message::user(p.value(r))]
        } else {
            read_messages(self.prompt.as_ref(), r)
                .filter(|m| !m.is_empty())
                .ok_or_else(|| CoreError::data(&loc, "`prompt` is null, empty or has null role/content"))?
        };
        let si = self.sample_idx.as_primitive::<arrow_array::types::Int64Type>();
        let sample_idx = si
            .is_valid(r)
            .then(|| si.value(r))
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| CoreError::data(&loc, "`sample_idx` must be a non-negative integer below 2^32"))?;
        let resp = self.response.as_string::<i32>();
        if resp.is_null(r) {
            return Err(null(RESPONSE));
        }
        let rewards = self.rewards.iter().map(|(n, a)| f64_at(a, n)).collect::<Result<Vec<_>>>()?;
        let logprob = self.logprob.as_ref().map(|a| f64_at(a, LOGPROB)).transpose()?;
        let num_tokens = match &self.num_tokens {
            Some(a) => {
                let a = a.as_primitive::<arrow_array::types::Int64Type>();
                Some(
                    a.is_valid(r)
                        .then(|| a.value(r))
                        .and_then(|v| u32::try_from(v).ok())
                        .ok_or_else(|| CoreError::data(&loc, "`num_tokens` must be a non-negative integer"))?,
                )
            }
            None => None,
        };
        let embedding = match &self.embedding {
            Some(a) => {
                let l = a.as_list::<i32>();
                if l.is_null(r) {
                    return Err(null(EMBEDDING));
                }
                let v = l.value(r);
                let v = v.as_primitive::<arrow_array::types::Float32Type>();
                if v.null_count() > 0 || v.values().iter().any(|x| !x.is_finite()) {
                    return Err(CoreError::data(&loc, "`embedding` must hold finite numbers only"));
                }
                Some(v.values().to_vec())
            }
            None => None,
        };
        Ok((
            pid.value(r).to_owned(),
            msgs,
            CandidateSample {
                sample_idx,
                response: resp.value(r).to_owned(),
                rewards,
                logprob,
                num_tokens,
                embedding,
                location: loc,
            },
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn hh_rlhf_transcripts() {
        let t = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine";
        assert_eq!(
            hh_rlhf_prompt(t).unwrap(),
            vec![Message::user("hi there"), Message::assistant("hello"), Message::user("how are you?")]
        );
        assert_eq!(hh_rlhf_prompt("no turns here"), None);
    }

    #[test]
    fn jsonl_prompts_with_ids_limit_and_duplicates() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "a.jsonl",
            "{\"id\": 1, \"q\": \"one\"}\n\n{\"id\": 2, \"q\": \"two\"}\n{\"id\": 3, \"q\": \"three\"}\n",
        );
        let mut cfg = InputConfig {
            path: Some(p.display().to_string()),
            prompt_column: Some("q".into()),
            id_column: Some("id".into()),
            ..Default::default()
        };
        let rows = read_prompts(&cfg).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1].prompt_id, "2");
        assert_eq!(rows[1].messages, vec![Message::user("two")]);
        assert!(rows[2].location.ends_with("a.jsonl:4"), "{}", rows[2].location);
        cfg.limit = Some(2);
        assert_eq!(read_prompts(&cfg).unwrap().len(), 2);

        let dup = write(d.path(), "dup.jsonl", "{\"q\": \"same\"}\n{\"q\": \"other\"}\n{\"q\": \"same\"}\n");
        let cfg = InputConfig {
            path: Some(dup.display().to_string()),
            prompt_column: Some("q".into()),
            ..Default::default()
        };
        let e = read_prompts(&cfg).unwrap_err().to_string();
        assert!(e.contains("dup.jsonl:3") && e.contains("also at") && e.contains("dup.jsonl:1"), "{e}");
    }

    #[test]
    fn json_array_messages_gz_and_glob() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "x.json",
            r#"[{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}]"#,
        );
        let gz = d.path().join("y.jsonl.gz");
        let mut enc = flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::default());
        enc.write_all(b"{\"messages\": [{\"from\": \"human\", \"value\": \"v\"}]}\n").unwrap();
        enc.finish().unwrap();
        let cfg = InputConfig {
            path: Some(format!("{}/*", d.path().display())),
            messages_column: Some("messages".into()),
            ..Default::default()
        };
        let rows = read_prompts(&cfg).unwrap();
        assert_eq!(rows[0].messages, vec![Message::new("system", "s"), Message::user("u")]);
        assert_eq!(rows[1].messages, vec![Message::user("v")]);
        assert_eq!(rows[0].prompt_id, prompt_id_of(&rows[0].messages));
        // A directory reads the same files.
        let cfg = InputConfig { path: Some(d.path().display().to_string()), ..cfg };
        assert_eq!(read_prompts(&cfg).unwrap(), rows);
    }

    #[test]
    #[allow(clippy::print_stderr, reason = "says why the test is skipped")]
    fn shared_hh_rlhf_if_present() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/hh-rlhf/harmless-base/test.jsonl.gz");
        if !p.exists() {
            eprintln!("skipping: {} is absent", p.display());
            return;
        }
        let cfg = InputConfig {
            path: Some(p.display().to_string()),
            format: InputFormat::HhRlhf,
            limit: Some(50),
            ..Default::default()
        };
        let rows = read_prompts(&cfg).unwrap();
        assert_eq!(rows.len(), 50);
        assert!(rows.iter().all(|r| r.messages.last().unwrap().role == "user"));
        assert!(rows.iter().all(|r| r.messages.iter().all(|m| !m.content.contains("\n\nHuman:"))));
    }

    #[test]
    fn candidates_jsonl_errors_name_the_line() {
        let d = tempfile::tempdir().unwrap();
        let ok =
            "{\"prompt_id\": \"a\", \"prompt\": \"p\", \"sample_idx\": 0, \"response\": \"r\", \"reward_x\": 1.0}\n";
        let p = write(
            d.path(),
            "c.jsonl",
            &format!("{ok}{}", ok.replace("\"sample_idx\": 0", "\"sample_idx\": 1").replace("1.0", "NaN")),
        );
        let e = read_candidates(&p, None).unwrap_err().to_string();
        assert!(e.contains("c.jsonl:2") && e.contains("invalid JSON"), "{e}");
        let p = write(d.path(), "c2.jsonl", &format!("{ok}{ok}"));
        let e = read_candidates(&p, None).unwrap_err().to_string();
        assert!(e.contains("c2.jsonl:2: duplicate sample_idx 0") && e.contains("c2.jsonl:1"), "{e}");
        // No reward column: the score section computes them (checked in the pipeline config).
        let p = write(d.path(), "c3.jsonl", &ok.replace("\"reward_x\": 1.0", "\"score\": 1.0"));
        let c = read_candidates(&p, None).unwrap();
        assert!(c.rewards.is_empty() && c.groups[0].samples[0].rewards.is_empty(), "{c:?}");
        let h = candidates_header(&p).unwrap();
        assert_eq!(h.columns.len(), 5);
        assert!(h.rewards.is_empty() && h.columns.iter().any(|c| c == "score"), "{h:?}");
        let p = write(
            d.path(),
            "c4.jsonl",
            &format!("{ok}{}", ok.replace("\"sample_idx\": 0", "\"sample_idx\": 1").replace("\"p\"", "\"q\"")),
        );
        let e = read_candidates(&p, None).unwrap_err().to_string();
        assert!(e.contains("c4.jsonl:2: prompt differs"), "{e}");
    }

    fn parquet_candidates(dir: &Path, reward: Vec<Option<f32>>) -> PathBuf {
        use arrow_array::builder::{FixedSizeListBuilder, Float32Builder};
        use arrow_array::{Float32Array, Float64Array, Int32Array, Int64Array, StringArray};
        use std::sync::Arc;
        let msgs = [vec![Message::new("system", "be brief"), Message::user("q1")], vec![Message::user("q2")]];
        let rows = [0usize, 0, 1];
        let mut emb = FixedSizeListBuilder::new(Float32Builder::new(), 3);
        for v in [[3.0f32, 0.0, 4.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]] {
            emb.values().append_slice(&v);
            emb.append(true);
        }
        let cols: Vec<(&str, ArrayRef)> = vec![
            ("prompt_id", Arc::new(Int64Array::from(vec![7, 7, 9]))),
            ("prompt", crate::messages::messages_array(rows.iter().map(|&r| msgs[r].as_slice()))),
            ("sample_idx", Arc::new(Int64Array::from(vec![1, 0, 0]))),
            ("response", Arc::new(StringArray::from(vec!["b", "a", "c"]))),
            ("reward_rm", Arc::new(Float32Array::from(reward))),
            ("logprob", Arc::new(Float64Array::from(vec![-1.0, -2.0, -3.0]))),
            ("num_tokens", Arc::new(Int32Array::from(vec![2, 3, 4]))),
            ("embedding", Arc::new(emb.finish())),
        ];
        let batch = RecordBatch::try_from_iter(cols).unwrap();
        let p = dir.join("c.parquet");
        crate::shard::write_parquet(&p, &batch.schema(), &[batch], &Default::default()).unwrap();
        p
    }

    #[test]
    fn candidates_from_parquet_with_other_types() {
        let d = tempfile::tempdir().unwrap();
        let p = parquet_candidates(d.path(), vec![Some(0.5), Some(1.5), Some(-1.0)]);
        let h = candidates_header(&p).unwrap();
        assert_eq!(h.rewards, vec!["rm".to_owned()]);
        assert!(h.has_logprob && h.has_num_tokens && h.has_embedding);
        let c = read_candidates(&p, None).unwrap();
        assert_eq!(c.embedding_dim, Some(3));
        assert_eq!(c.groups.len(), 2);
        let g = &c.groups[0];
        assert_eq!(g.prompt_id, "7");
        assert_eq!(g.messages, vec![Message::new("system", "be brief"), Message::user("q1")]);
        // Sorted by sample_idx.
        assert_eq!(
            g.samples.iter().map(|s| (s.sample_idx, s.response.as_str())).collect::<Vec<_>>(),
            [(0, "a"), (1, "b")]
        );
        assert_eq!(g.samples[0].rewards, vec![1.5]);
        assert_eq!(g.samples[0].num_tokens, Some(3));
        assert_eq!(g.samples[1].embedding, Some(vec![3.0, 0.0, 4.0]));
        assert_eq!(read_candidates(&p, Some(1)).unwrap().groups.len(), 1);

        let p = parquet_candidates(d.path(), vec![Some(0.5), None, Some(1.0)]);
        let e = read_candidates(&p, None).unwrap_err().to_string();
        assert!(e.ends_with("c.parquet: row 1: `reward_rm` is null or not a number"), "{e}");
        let p = parquet_candidates(d.path(), vec![Some(0.5), Some(f32::NAN), Some(1.0)]);
        let e = read_candidates(&p, None).unwrap_err().to_string();
        assert!(e.ends_with("c.parquet: row 1: `reward_rm` is NaN; it must be a finite number"), "{e}");
    }

    #[test]
    fn prompts_from_parquet_messages_and_text() {
        use arrow_array::StringArray;
        use std::sync::Arc;
        let d = tempfile::tempdir().unwrap();
        let msgs = [vec![Message::user("a")], vec![Message::new("system", "s"), Message::user("b")]];
        let batch = RecordBatch::try_from_iter(vec![
            ("conv", crate::messages::messages_array(msgs.iter().map(Vec::as_slice))),
            ("text", Arc::new(StringArray::from(vec!["x", "y"])) as ArrayRef),
        ])
        .unwrap();
        let p = d.path().join("p.parquet");
        crate::shard::write_parquet(&p, &batch.schema(), &[batch], &Default::default()).unwrap();
        let cfg = InputConfig {
            path: Some(p.display().to_string()),
            prompt_column: Some("conv".into()),
            ..Default::default()
        };
        let rows = read_prompts(&cfg).unwrap();
        assert_eq!(rows.iter().map(|r| r.messages.clone()).collect::<Vec<_>>(), msgs.to_vec());
        let cfg = InputConfig { prompt_column: Some("text".into()), ..cfg };
        assert_eq!(read_prompts(&cfg).unwrap()[1].messages, vec![Message::user("y")]);
        let cfg = InputConfig { prompt_column: None, messages_column: Some("text".into()), ..cfg };
        let e = read_prompts(&cfg).unwrap_err().to_string();
        assert!(e.contains("p.parquet: row 0: column `text` must hold a list of {role, content} messages"), "{e}");
        let cfg = InputConfig { messages_column: Some("nope".into()), ..cfg };
        let e = read_prompts(&cfg).unwrap_err().to_string();
        assert!(e.contains("no column `nope`; columns: conv, text"), "{e}");
    }

    #[test]
    fn candidates_stream_by_shard_in_any_row_order() {
        let d = tempfile::tempdir().unwrap();
        let row = |p: usize, k: u32| {
            format!(
                "{{\"prompt_id\": \"p{p}\", \"prompt\": \"q{p}\", \"sample_idx\": {k}, \"response\": \"r{p}-{k}\", \"reward_x\": {p}.5}}\n"
            )
        };
        // Sample-major order: every prompt's rows are spread over the whole file.
        let text: String = (0..3u32).rev().flat_map(|k| (0..5).map(move |p| (p, k))).map(|(p, k)| row(p, k)).collect();
        let p = write(d.path(), "s.jsonl", &text);
        let all = read_candidates(&p, Some(4)).unwrap();
        assert_eq!(all.groups.len(), 4);
        assert!(all.groups.iter().all(|g| g.samples.iter().map(|s| s.sample_idx).eq(0..3)));
        let index = scan_candidates(&p, Some(4)).unwrap();
        assert_eq!(index.group_rows, vec![3, 3, 3, 3]);
        let mut got = Vec::new();
        stream_candidates(
            &p,
            &index,
            3,
            |i| i == 1,
            |i, g| {
                got.push((i, g));
                Ok(true)
            },
        )
        .unwrap();
        // Shard 1 holds the 4th prompt only (the limit), complete and sorted.
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, 1);
        assert_eq!(got[0].1, all.groups[3..].to_vec());
        // A grouped file streams its shards as they complete, in file order.
        let text: String = (0..5).flat_map(|p| (0..2).map(move |k| (p, k))).map(|(p, k)| row(p, k)).collect();
        let p = write(d.path(), "g.jsonl", &text);
        let index = scan_candidates(&p, None).unwrap();
        let mut order = Vec::new();
        stream_candidates(
            &p,
            &index,
            2,
            |_| true,
            |i, g| {
                order.push((i, g.len()));
                Ok(true)
            },
        )
        .unwrap();
        assert_eq!(order, vec![(0, 2), (1, 2), (2, 1)]);
    }

    #[test]
    fn candidates_limit_unordered_and_row_checks() {
        let d = tempfile::tempdir().unwrap();
        let row = |p: &str, k: u32, extra: &str| {
            format!(
                "{{\"prompt_id\": \"{p}\", \"prompt\": \"q{p}\", \"sample_idx\": {k}, \"response\": \"r{k}\", \"reward_x\": 1.0{extra}}}\n"
            )
        };
        // Rows of the first prompt after a later prompt's rows are kept under a limit.
        let text = [row("a", 0, ""), row("b", 0, ""), row("a", 1, "")].concat();
        let p = write(d.path(), "u.jsonl", &text);
        let c = read_candidates(&p, Some(1)).unwrap();
        assert_eq!(c.groups.len(), 1);
        assert_eq!(c.groups[0].samples.len(), 2);
        // A field missing from the first record is an error, not silently ignored.
        let text = [row("a", 0, ""), row("a", 1, ", \"logprob\": -3.0")].concat();
        let e = read_candidates(&write(d.path(), "f.jsonl", &text), None).unwrap_err().to_string();
        assert!(e.contains("f.jsonl:2: field `logprob` is not on the first record"), "{e}");
        // Zero embeddings and f32 overflow are caught at read time.
        let text = [row("a", 0, ", \"embedding\": [1.0, 0.0]"), row("a", 1, ", \"embedding\": [0.0, 0.0]")].concat();
        let e = read_candidates(&write(d.path(), "z.jsonl", &text), None).unwrap_err().to_string();
        assert!(e.contains("z.jsonl:2: `embedding` is the zero vector"), "{e}");
        let text = row("a", 0, ", \"embedding\": [1e300, 0.0]");
        let e = read_candidates(&write(d.path(), "o.jsonl", &text), None).unwrap_err().to_string();
        assert!(e.contains("o.jsonl:1: `embedding` must hold finite 32-bit floats"), "{e}");
        // A prompt must end with the user turn being answered.
        let text = "{\"prompt_id\": \"a\", \"prompt\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}], \"sample_idx\": 0, \"response\": \"r\", \"reward_x\": 1.0}\n";
        let e = read_candidates(&write(d.path(), "t.jsonl", text), None).unwrap_err().to_string();
        assert!(e.contains("t.jsonl:1: the prompt ends with a `assistant` turn"), "{e}");
    }
}
