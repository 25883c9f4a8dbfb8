//! Trainer-ready exports: `pairs/<method>/beta=<β>/train-0000i-of-0000N.parquet` plus a dataset
//! card, merged from the pair shards in shard order (so the bytes do not depend on how many
//! processes made the shards).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::path::PathBuf;

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, UInt32Type};
use arrow_array::{Array, ArrayRef, BooleanArray, Float64Array, RecordBatch, StringArray, UInt32Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use rbon_core::messages::messages_array;
use rbon_core::schema::{self, BETA, METHOD};
use rbon_core::shard::{self, ParquetSink, ShardMeta};
use rbon_core::tables::{self, SampleScores};
use rbon_core::{CoreError, Message, RunDir, StageName};
use rbon_regularize::{Method, SelectConfig, group_proxy, vbon_weights};

use std::io::{BufWriter, Write as _};

use crate::config::{FileFormat, PairConfig, PairFormat};
use crate::format::{self, ChatRender};
use crate::stage::{DropReason, PairError, export_key};

/// Rows per exported Parquet file.
pub const ROWS_PER_FILE: usize = 100_000;
/// Rows per row group in exports: bounds the memory of the writers open at once, one per
/// (method, β), each holding at most about two row groups.
const ROW_GROUP_ROWS: usize = 1024;

/// What the dataset cards say about the run.
#[derive(Debug, Clone)]
pub struct CardContext<'a> {
    pub run_name: &'a str,
    pub version: &'a str,
    pub select: &'a SelectConfig,
    pub pair: &'a PairConfig,
    /// The frozen pipeline YAML.
    pub config_text: &'a str,
}

/// One finished export.
#[derive(Debug, Clone, PartialEq)]
pub struct Export {
    pub method: Method,
    pub beta: f64,
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    /// The SFT export's files, when `pair.sft` is on.
    pub sft_files: Vec<PathBuf>,
    pub counts: BTreeMap<String, u64>,
}

/// The file name of part `i` of `n`: `train-00000-of-00003.parquet`, the layout the Hugging Face
/// Hub and `load_dataset` read as a train split.
pub fn part_name(i: usize, n: usize) -> String {
    part_file(i, n, FileFormat::Parquet)
}

/// [`part_name`] with the extension of `format`.
pub fn part_file(i: usize, n: usize, format: FileFormat) -> String {
    format!("train-{i:05}-of-{n:05}.{}", format.extension())
}

/// How an export is written besides what the config says.
#[derive(Clone, Copy, Default)]
pub struct ExportOptions<'a> {
    /// Renders prompts and responses for `pair.format: standard` (the policy's chat template).
    pub render: Option<&'a dyn ChatRender>,
}

impl std::fmt::Debug for ExportOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportOptions").field("render", &self.render.is_some()).finish()
    }
}

/// An open part file: Parquet through the atomic shard writer, or JSON lines (inside a staged
/// folder, which is itself swapped into place whole).
enum Sink {
    Parquet(Box<ParquetSink>),
    Jsonl { path: PathBuf, file: BufWriter<fs::File>, rows: usize },
}

impl Sink {
    fn rows(&self) -> usize {
        match self {
            Sink::Parquet(p) => p.rows(),
            Sink::Jsonl { rows, .. } => *rows,
        }
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<(), CoreError> {
        match self {
            Sink::Parquet(p) => p.write(batch),
            Sink::Jsonl { path, file, rows } => {
                file.write_all(format::jsonl(batch)?.as_bytes()).map_err(|e| CoreError::io(path.as_path(), e))?;
                *rows += batch.num_rows();
                Ok(())
            }
        }
    }

    fn finish(self) -> Result<(), CoreError> {
        match self {
            Sink::Parquet(p) => (*p).finish().map(|_| ()),
            Sink::Jsonl { path, file, .. } => {
                let f = file.into_inner().map_err(|e| CoreError::io(path.as_path(), e.into_error()))?;
                f.sync_all().map_err(|e| CoreError::io(path.as_path(), e))
            }
        }
    }
}

/// A folder built under a temporary sibling name and swapped into place when complete, so an
/// export is either whole or absent (never a partial set of parts).
struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
}

impl Staged {
    fn new(dest: PathBuf) -> Result<Self, CoreError> {
        let parent = dest.parent().map(PathBuf::from).unwrap_or_default();
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        fs::create_dir_all(&parent).map_err(|e| CoreError::io(&parent, e))?;
        // Leftovers of killed runs.
        let prefix = format!(".{name}.tmp-");
        for e in fs::read_dir(&parent).map_err(|e| CoreError::io(&parent, e))?.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                fs::remove_dir_all(e.path()).map_err(|err| CoreError::io(e.path(), err))?;
            }
        }
        let tmp = parent.join(format!("{prefix}{}", std::process::id()));
        fs::create_dir_all(&tmp).map_err(|e| CoreError::io(&tmp, e))?;
        Ok(Self { tmp, dest })
    }

    fn commit(self) -> Result<PathBuf, CoreError> {
        if self.dest.exists() {
            fs::remove_dir_all(&self.dest).map_err(|e| CoreError::io(&self.dest, e))?;
        }
        fs::rename(&self.tmp, &self.dest).map_err(|e| CoreError::io(&self.dest, e))?;
        Ok(self.dest)
    }
}

/// A multi-part Parquet export being written: `train-0000i-of-0000N.parquet` in `dir`, with N
/// fixed up front from the expected row count so names never change once written. Rows reach
/// the writer in fixed chunks of `ROW_GROUP_ROWS` whatever batches they arrive in, so the bytes
/// depend on the rows only, not on how the shards cut them.
struct Parts {
    dir: PathBuf,
    schema: SchemaRef,
    format: FileFormat,
    parts: usize,
    files: Vec<String>,
    sink: Option<Sink>,
    pending: Vec<RecordBatch>,
    pending_rows: usize,
}

impl Parts {
    fn create(dir: PathBuf, schema: SchemaRef, expected_rows: usize, format: FileFormat) -> Result<Self, CoreError> {
        fs::create_dir_all(&dir).map_err(|e| CoreError::io(&dir, e))?;
        let parts = expected_rows.div_ceil(ROWS_PER_FILE).max(1);
        let mut p =
            Self { dir, schema, format, parts, files: Vec::new(), sink: None, pending: Vec::new(), pending_rows: 0 };
        p.next()?;
        Ok(p)
    }

    fn next(&mut self) -> Result<(), CoreError> {
        if let Some(s) = self.sink.take() {
            s.finish()?;
        }
        let name = part_file(self.files.len(), self.parts, self.format);
        let path = self.dir.join(&name);
        self.sink = Some(match self.format {
            FileFormat::Parquet => Sink::Parquet(Box::new(ParquetSink::create(
                &path,
                &self.schema,
                &ShardMeta::default(),
                Some(ROW_GROUP_ROWS),
            )?)),
            FileFormat::Jsonl => {
                let file = fs::File::create(&path).map_err(|e| CoreError::io(&path, e))?;
                Sink::Jsonl { path, file: BufWriter::new(file), rows: 0 }
            }
        });
        self.files.push(name);
        Ok(())
    }

    fn write(&mut self, batch: RecordBatch) -> Result<(), CoreError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.pending_rows += batch.num_rows();
        self.pending.push(batch);
        while self.pending_rows >= ROW_GROUP_ROWS {
            let all = arrow_select::concat::concat_batches(&self.schema, &self.pending)
                .map_err(|e| CoreError::internal(format!("export: {e}")))?;
            let chunk = all.slice(0, ROW_GROUP_ROWS);
            let rest = all.slice(ROW_GROUP_ROWS, all.num_rows() - ROW_GROUP_ROWS);
            self.pending_rows = rest.num_rows();
            self.pending = vec![rest];
            self.write_rows(chunk)?;
        }
        Ok(())
    }

    fn write_rows(&mut self, mut batch: RecordBatch) -> Result<(), CoreError> {
        while batch.num_rows() > 0 {
            let rows = self.sink.as_ref().map_or(ROWS_PER_FILE, Sink::rows);
            if rows == ROWS_PER_FILE {
                if self.files.len() == self.parts {
                    // Counts come from the same shards; more rows means they changed under us.
                    let where_ = self.dir.display();
                    return Err(CoreError::internal(format!(
                        "{where_}: the shards hold more rows than their counters say"
                    )));
                }
                self.next()?;
                continue;
            }
            let take = (ROWS_PER_FILE - rows).min(batch.num_rows());
            if let Some(s) = self.sink.as_mut() {
                s.write(&batch.slice(0, take))?;
            }
            batch = batch.slice(take, batch.num_rows() - take);
        }
        Ok(())
    }

    /// Flushes and closes; returns the part file names.
    fn finish(mut self) -> Result<Vec<String>, CoreError> {
        let rest = std::mem::take(&mut self.pending);
        if !rest.is_empty() {
            let all = arrow_select::concat::concat_batches(&self.schema, &rest)
                .map_err(|e| CoreError::internal(format!("export: {e}")))?;
            self.write_rows(all)?;
        }
        if let Some(s) = self.sink.take() {
            s.finish()?;
        }
        Ok(std::mem::take(&mut self.files))
    }
}

/// Writes every export from the shards, replacing earlier files: the pairs of each (method, β),
/// and when configured their SFT halves and the vBoN table. `counts[key]` holds each export's
/// summed pair counters (from the shards' details); `prompts` and `samples` are the run's totals.
/// `opts.render` is required by `pair.format: standard`. Conversational exports also get
/// `pairs/dataset_info.json` for LLaMA-Factory.
pub fn write_exports_with(
    run: &RunDir,
    shards: usize,
    exports: &[(Method, f64)],
    counts: &BTreeMap<String, BTreeMap<String, u64>>,
    totals: (usize, usize),
    card: &CardContext,
    opts: ExportOptions,
) -> Result<Vec<Export>, PairError> {
    let (prompts, samples) = totals;
    let file_format = card.pair.file_format;
    let render = match (card.pair.format, opts.render) {
        (PairFormat::Standard, None) => {
            return Err(PairError::Core(CoreError::internal(
                "pair.format: standard needs the policy's chat template to render the pairs, and none was given",
            )));
        }
        (PairFormat::Standard, r) => r,
        (PairFormat::Conversational, _) => None,
    };
    let export_schema = match render {
        Some(_) => schema::pairs_standard_schema(),
        None => schema::pairs_export_schema(),
    };
    let pairs_dir = run.stage_dir(StageName::Pairs);
    let count = |key: &str| counts.get(key).and_then(|c| c.get("pairs")).copied().unwrap_or(0) as usize;
    let mut staged = Vec::new();
    let mut dpo = Vec::new();
    let mut sft = Vec::new();
    for &(m, b) in exports {
        let st = Staged::new(pairs_dir.join(export_key(m, b)))?;
        dpo.push(Parts::create(st.tmp.clone(), export_schema.clone(), count(&export_key(m, b)), file_format)?);
        if card.pair.sft {
            sft.push(Parts::create(st.tmp.join("sft"), sft_schema(), prompts, file_format)?);
        }
        staged.push(st);
    }
    let vbon_dir = run.root().join(VBON_DIR);
    let mut vbon = match card.pair.vbon {
        true => {
            let st = Staged::new(vbon_dir.clone())?;
            let parts = Parts::create(st.tmp.clone(), vbon_schema(), samples, file_format)?;
            Some((st, parts))
        }
        false => {
            if vbon_dir.exists() {
                fs::remove_dir_all(&vbon_dir).map_err(|e| CoreError::io(&vbon_dir, e))?;
            }
            None
        }
    };
    for i in 0..shards {
        let path = run.shard_path(StageName::Pairs, i);
        for batch in shard::read_parquet(&path)? {
            let (methods, betas) = method_beta(&batch, &path)?;
            for (parts, &(m, b)) in dpo.iter_mut().zip(exports) {
                let rows = filter(&batch, &mask(&methods, &betas, m, b))?;
                if rows.num_rows() == 0 {
                    continue;
                }
                parts.write(match render {
                    Some(r) => format::standard_batch(&rows, r)?,
                    None => format::conversational_batch(&rows)?,
                })?;
            }
        }
        if !card.pair.sft && vbon.is_none() {
            continue;
        }
        let prompt_rows =
            tables::read_prompts_batches(&shard::read_parquet(&run.shard_path(StageName::Prompts, i))?, "prompts")?;
        let prompt_of: HashMap<&str, &[Message]> =
            prompt_rows.iter().map(|(id, m)| (id.as_str(), m.as_slice())).collect();
        let data = SampleScores::from_batches(
            &shard::read_parquet(&run.shard_path(StageName::Samples, i))?,
            &shard::read_parquet(&run.shard_path(StageName::Scores, i))?,
            &format!("shard {i}"),
        )?;
        if card.pair.sft {
            let row_of: HashMap<(&str, u32), usize> =
                (0..data.prompt_ids.len()).map(|r| ((data.prompt_ids[r].as_str(), data.sample_idx[r]), r)).collect();
            let sel_path = run.shard_path(StageName::Selections, i);
            for batch in shard::read_parquet(&sel_path)? {
                let (methods, betas) = method_beta(&batch, &sel_path)?;
                let not_sel = || CoreError::internal(format!("{}: not a selections shard", sel_path.display()));
                let index =
                    batch.column_by_name(schema::INDEX).ok_or_else(not_sel)?.as_primitive::<UInt32Type>().clone();
                let ids = batch.column_by_name(schema::PROMPT_ID).ok_or_else(not_sel)?.as_string::<i32>().clone();
                for (parts, &(m, b)) in sft.iter_mut().zip(exports) {
                    let picks: Vec<(&str, u32)> = (0..batch.num_rows())
                        .filter(|&r| methods.value(r) == m.as_str() && betas.value(r) == b && index.is_valid(r))
                        .map(|r| (ids.value(r), index.value(r)))
                        .collect();
                    parts.write(sft_batch(&picks, m, b, &prompt_of, &row_of, &data)?)?;
                }
            }
        }
        if let Some((_, v)) = vbon.as_mut() {
            v.write(vbon_batch(card.select, &prompt_of, &data)?)?;
        }
    }
    let mut out = Vec::new();
    let mut info: Vec<(String, Vec<String>)> = Vec::new();
    let mut sft = sft.into_iter();
    for ((parts, st), &(m, b)) in dpo.into_iter().zip(staged).zip(exports) {
        let names = parts.finish()?;
        let c = counts.get(&export_key(m, b)).cloned().unwrap_or_default();
        shard::write_atomic(&st.tmp.join("README.md"), dataset_card(card, m, b, &c, names.len()).as_bytes())?;
        let sft_names = match sft.next() {
            Some(p) => {
                let names = p.finish()?;
                let text = sft_card(card, m, b, prompts, names.len());
                shard::write_atomic(&st.tmp.join("sft").join("README.md"), text.as_bytes())?;
                names
            }
            None => Vec::new(),
        };
        let dir = st.commit()?;
        let key = export_key(m, b);
        info.push((format!("{}_beta={b}", m.as_str()), names.iter().map(|n| format!("{key}/{n}")).collect()));
        let files = names.iter().map(|n| dir.join(n)).collect();
        let sft_files = sft_names.iter().map(|n| dir.join("sft").join(n)).collect();
        out.push(Export { method: m, beta: b, dir, files, sft_files, counts: c });
    }
    if let Some((st, v)) = vbon {
        let names = v.finish()?;
        shard::write_atomic(&st.tmp.join("README.md"), vbon_card(card, samples, names.len()).as_bytes())?;
        st.commit()?;
    }
    // LLaMA-Factory reads the conversational exports through this file (`dataset_dir: <run>/pairs`).
    let info_path = pairs_dir.join(DATASET_INFO);
    if render.is_none() && !info.is_empty() {
        shard::write_atomic(&info_path, format::dataset_info(&info).as_bytes())?;
    } else if info_path.exists() {
        fs::remove_file(&info_path).map_err(|e| CoreError::io(&info_path, e))?;
    }
    Ok(out)
}

fn method_beta(batch: &RecordBatch, path: &std::path::Path) -> Result<(StringArray, Float64Array), CoreError> {
    let methods = batch.column_by_name(METHOD).map(|c| c.as_string::<i32>().clone());
    let betas = batch.column_by_name(BETA).map(|c| c.as_primitive::<Float64Type>().clone());
    match (methods, betas) {
        (Some(m), Some(b)) => Ok((m, b)),
        _ => Err(CoreError::internal(format!("{}: has no method/beta columns", path.display()))),
    }
}

fn mask(methods: &StringArray, betas: &Float64Array, m: Method, b: f64) -> BooleanArray {
    (0..methods.len()).map(|r| Some(methods.value(r) == m.as_str() && betas.value(r) == b)).collect()
}

/// LLaMA-Factory's dataset registry, written at `pairs/dataset_info.json`.
pub const DATASET_INFO: &str = "dataset_info.json";

/// Folder of the variational-BoN export in the run directory.
pub const VBON_DIR: &str = "vbon";

/// SFT rows (BoNBoN's SFT term): TRL's conversational prompt-completion format.
pub fn sft_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(schema::PROMPT_ID, DataType::Utf8, false),
        Field::new(METHOD, DataType::Utf8, false),
        Field::new(BETA, DataType::Float64, false),
        Field::new(schema::PROMPT, schema::messages_type(), false),
        Field::new(COMPLETION, schema::messages_type(), false),
        Field::new(schema::SAMPLE_IDX, DataType::UInt32, false),
    ]))
}

/// vBoN rows: every sample with its log π_ref and BoN weight.
pub fn vbon_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(schema::PROMPT_ID, DataType::Utf8, false),
        Field::new(schema::SAMPLE_IDX, DataType::UInt32, false),
        Field::new(schema::PROMPT, schema::messages_type(), false),
        Field::new(COMPLETION, schema::messages_type(), false),
        Field::new(schema::LOGPROB, DataType::Float64, true),
        Field::new(REWARD, DataType::Float64, false),
        Field::new(REWARD_CDF, DataType::Float64, false),
        Field::new(LOG_WEIGHT, DataType::Float64, false),
    ]))
}

pub const COMPLETION: &str = "completion";
pub const REWARD: &str = "reward";
pub const REWARD_CDF: &str = "reward_cdf";
pub const LOG_WEIGHT: &str = "log_weight";

fn prompt<'a>(prompt_of: &HashMap<&str, &'a [Message]>, id: &str) -> Result<&'a [Message], CoreError> {
    prompt_of
        .get(id)
        .copied()
        .ok_or_else(|| CoreError::internal(format!("prompt {id:?} is missing from the prompts table")))
}

fn sft_batch(
    picks: &[(&str, u32)],
    m: Method,
    b: f64,
    prompt_of: &HashMap<&str, &[Message]>,
    row_of: &HashMap<(&str, u32), usize>,
    data: &SampleScores,
) -> Result<RecordBatch, CoreError> {
    let mut prompts = Vec::with_capacity(picks.len());
    let mut completion = Vec::with_capacity(picks.len());
    for &(id, idx) in picks {
        prompts.push(prompt(prompt_of, id)?);
        let row = row_of
            .get(&(id, idx))
            .ok_or_else(|| CoreError::internal(format!("prompt {id:?}: selected sample {idx} does not exist")))?;
        completion.push(vec![Message::assistant(&data.responses[*row])]);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(picks.iter().map(|p| p.0))),
        Arc::new(StringArray::from_iter_values(picks.iter().map(|_| m.as_str()))),
        Arc::new(Float64Array::from_iter_values(picks.iter().map(|_| b))),
        messages_array(prompts),
        messages_array(completion.iter().map(Vec::as_slice)),
        Arc::new(UInt32Array::from_iter_values(picks.iter().map(|p| p.1))),
    ];
    RecordBatch::try_new(sft_schema(), cols).map_err(|e| CoreError::internal(format!("sft: {e}")))
}

fn vbon_batch(
    select: &SelectConfig,
    prompt_of: &HashMap<&str, &[Message]>,
    data: &SampleScores,
) -> Result<RecordBatch, PairError> {
    let n = data.prompt_ids.len();
    let (mut reward, mut weights, mut prompts) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for g in &data.groups {
        let id = &data.prompt_ids[g.start];
        let (proxy, _) =
            group_proxy(select, data, g).map_err(|e| CoreError::internal(format!("prompt {id:?}: {e}")))?;
        let p = prompt(prompt_of, id)?;
        weights.extend(vbon_weights(&proxy));
        reward.extend(proxy);
        prompts.extend(std::iter::repeat_n(p, g.len()));
    }
    let completion: Vec<Vec<Message>> = data.responses.iter().map(|r| vec![Message::assistant(r)]).collect();
    let logprob: Float64Array = match &data.logprob {
        Some(l) => Float64Array::from_iter_values(l.iter().copied()),
        None => Float64Array::new_null(n),
    };
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(data.prompt_ids.iter())),
        Arc::new(UInt32Array::from_iter_values(data.sample_idx.iter().copied())),
        messages_array(prompts),
        messages_array(completion.iter().map(Vec::as_slice)),
        Arc::new(logprob),
        Arc::new(Float64Array::from_iter_values(reward)),
        Arc::new(Float64Array::from_iter_values(weights.iter().map(|w| w.0))),
        Arc::new(Float64Array::from_iter_values(weights.iter().map(|w| w.1))),
    ];
    Ok(RecordBatch::try_new(vbon_schema(), cols).map_err(|e| CoreError::internal(format!("vbon: {e}")))?)
}

/// The README.md of an SFT export.
pub fn sft_card(card: &CardContext, method: Method, beta: f64, rows: usize, files: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "---\ntags:\n- trl\n- sft\n- rbon\n- bonbon\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: \"train-*.{}\"\n---\n",
        card.pair.file_format.extension()
    );
    let _ = writeln!(s, "# {}: `{}` β = {} SFT completions\n", card.run_name, method, beta);
    let _ = writeln!(
        s,
        "Made by rbon {}. One row per prompt: the prompt and the pick of `{method}` at β = {beta} as the \
         completion, the SFT half of BoNBoN alignment (Gui et al. 2024), whose preference half is the \
         `worst`-rule pairs beside this folder. Format: Conversational / Type: Prompt-completion (TRL \
         `SFTTrainer`).\n\nRows: {rows}. Files: {files}.\n\n| column | type |\n|---|---|\n\
         | prompt | list<struct<role, content>> |\n| completion | list<struct<role, content>> (one assistant message) |\n\
         | prompt_id, method, beta, sample_idx | string, string, float64, uint32 |\n",
        card.version
    );
    s
}

/// The README.md of the vBoN export.
pub fn vbon_card(card: &CardContext, rows: usize, files: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "---\ntags:\n- rbon\n- vbon\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: \"train-*.{}\"\n---\n",
        card.pair.file_format.extension()
    );
    let _ = writeln!(s, "# {}: variational Best-of-N weights\n", card.run_name);
    let _ = writeln!(
        s,
        "Made by rbon {}. One row per sample, for fine-tuning towards the Best-of-N distribution \
         (Amini et al. 2024, variational BoN). With r_i the proxy reward (`{}`) of sample i among its \
         prompt's N samples:\n\n\
         - `reward_cdf` = F̂(r_i) = (#{{j: r_j < r_i}} + ½·#{{j: r_j = r_i}}) / N (ties, i included, count half);\n\
         - `log_weight` = log N + (N − 1)·log F̂(r_i), the log-density ratio of the BoN distribution to the \
         reference policy at sample i;\n- `logprob` = log π_ref(y_i | x) (null when the samples carry none).\n\n\
         Rows: {rows}. Files: {files}. Columns: prompt_id, sample_idx, prompt, completion (one assistant \
         message), logprob, reward, reward_cdf, log_weight.\n",
        card.version, card.select.proxy
    );
    s
}

fn filter(batch: &RecordBatch, mask: &BooleanArray) -> Result<RecordBatch, CoreError> {
    let cols = batch
        .columns()
        .iter()
        .map(|c| arrow_select::filter::filter(c.as_ref(), mask))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CoreError::internal(format!("pairs: {e}")))?;
    RecordBatch::try_new(batch.schema(), cols).map_err(|e| CoreError::internal(format!("pairs: {e}")))
}

/// The README.md of one export: Hub front matter, what the rows are, counts, and the config.
pub fn dataset_card(
    card: &CardContext,
    method: Method,
    beta: f64,
    counts: &BTreeMap<String, u64>,
    files: usize,
) -> String {
    let get = |k: &str| counts.get(k).copied().unwrap_or(0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "---\ntags:\n- trl\n- dpo\n- rbon\n- preference\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: \"train-*.{}\"\n---\n",
        card.pair.file_format.extension()
    );
    let ext = card.pair.file_format.extension();
    let standard = card.pair.format == PairFormat::Standard;
    let beta_text = if method.uses_beta() { format!(", β = {beta}") } else { String::new() };
    let _ = writeln!(s, "# {}: `{}`{} preference pairs\n", card.run_name, method, beta_text);
    let _ = writeln!(
        s,
        "Made by rbon {} from N candidate responses per prompt. **chosen** is the pick of `{}`{}; \
         **rejected** is chosen by the `{}` rule. Format: {} / Type: Preference, with an \
         explicit prompt (TRL).\n",
        card.version,
        method,
        beta_text,
        card.pair.rejected.as_str(),
        if standard { "Standard (strings rendered with the policy's chat template)" } else { "Conversational" }
    );
    let rule = match method {
        Method::Bon => "argmax of R_p(x, y)".to_owned(),
        Method::RbonKl => format!("argmax of R_p(x, y) + {beta} · log π_ref(y | x)"),
        Method::RbonWd => format!("argmax of R_p(x, y) − {beta} · WD(y)"),
        Method::Mbr => "argmax of − WD(y)".to_owned(),
        Method::RbonLen => format!("argmax of R_p(x, y) − {beta} / |y|"),
        Method::BonUnc => format!("argmax of mean_m z_m(y) − {beta} · std_m z_m(y) over the proxy ensemble"),
        Method::SrbonKl => format!("a seeded draw from p(y) ∝ π_ref(y | x) · exp({beta} · R_p(x, y))"),
        Method::Oracle | Method::Random => String::new(),
    };
    let proxy = if card.select.proxy.is_ensemble() {
        format!(
            "the ensemble `{}` (each model's rewards standardised over the N samples, then averaged)",
            card.select.proxy
        )
    } else {
        format!("`{}`", card.select.proxy)
    };
    let _ = writeln!(
        s,
        "Selection over the N samples (ties to the lowest index): `{rule}`, with proxy reward R_p = {proxy}.\n"
    );
    if card.pair.sft {
        let _ = writeln!(s, "The SFT half (prompt + chosen completion, for BoNBoN alignment) is in `sft/`.\n");
    }
    let _ = writeln!(s, "## Counts\n\n| | rows |\n|---|---|");
    let _ = writeln!(s, "| pairs written | {} |", get("pairs"));
    for d in DropReason::ALL {
        let _ = writeln!(s, "| {} | {} |", d.counter().replace('_', " "), get(d.counter()));
    }
    let _ = writeln!(s, "\nFiles: {files} (`train-*.{ext}`).\n");
    let _ = writeln!(s, "## Columns\n\n| column | type | meaning |\n|---|---|---|");
    if standard {
        let _ = writeln!(
            s,
            "| prompt | string | the conversation rendered with the policy's chat template, ending with the \
             generation prompt |\n\
             | chosen | string | the rest of the rendered conversation, without the final EOS (trainers append it) |\n\
             | rejected | string | likewise |"
        );
    } else {
        let _ = writeln!(
            s,
            "| prompt | list<struct<role, content>> | the conversation before the response |\n\
             | chosen | list<struct<role, content>> | one assistant message |\n\
             | rejected | list<struct<role, content>> | one assistant message |"
        );
    }
    let _ = writeln!(
        s,
        "| prompt_id | string | id of the prompt (input id column, or SHA-256 of the canonical prompt) |\n\
         | method, beta | string, float64 | the selection rule and its β (0 for rules without one) |\n\
         | chosen_index, rejected_index | uint32 | sample indices among the prompt's N candidates |\n\
         | score_chosen, score_rejected | float64 | proxy reward of each response |\n\
         | margin | float64 | score_chosen − score_rejected |"
    );
    if !standard {
        let _ = writeln!(
            s,
            "| chosen_message, rejected_message | struct<role, content> | chosen and rejected as single \
             messages (LLaMA-Factory's sharegpt ranking format) |"
        );
    }
    let loader = if ext == "jsonl" { "json" } else { "parquet" };
    let _ = writeln!(
        s,
        "\n## Training on it\n\n\
         - TRL: `load_dataset(\"{loader}\", data_files=\"train-*.{ext}\", split=\"train\")` and pass it to \
         `DPOTrainer`{}.",
        if standard { " (standard rows: TRL appends the EOS token to chosen and rejected)" } else { "" }
    );
    if standard {
        let _ = writeln!(
            s,
            "- OpenRLHF: `--dataset <file> --prompt_key prompt --chosen_key chosen --rejected_key rejected`, \
             without `--apply_chat_template` (the prompt is already rendered); releases since the April 2026 \
             config rename spell the keys `--data.prompt_key` etc.\n"
        );
    } else {
        let _ = writeln!(
            s,
            "- OpenRLHF: `--dataset <file> --apply_chat_template --prompt_key prompt --chosen_key chosen \
             --rejected_key rejected` (releases since the April 2026 config rename: `--data.apply_chat_template \
             --data.prompt_key prompt --data.chosen_key chosen --data.rejected_key rejected`).\n\
             - LLaMA-Factory: `dataset_dir: <run>/pairs` and `dataset: {}_beta={beta}` (registered in \
             `pairs/dataset_info.json`: sharegpt ranking, `messages` = prompt, chosen/rejected = the single-message \
             columns).\n",
            method.as_str()
        );
    }
    let _ = writeln!(s, "## Pipeline\n\n```yaml\n{}\n```", card.config_text.trim_end());
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use arrow_array::UInt32Array;
    use rbon_core::Message;
    use rbon_core::messages::read_messages;

    use super::*;
    use crate::stage::{PairRow, pairs_batch};

    fn row(pid: &str, method: Method, beta: f64, chosen_index: u32) -> PairRow {
        PairRow {
            prompt_id: pid.to_owned(),
            method,
            beta,
            prompt: vec![Message::user(format!("question {pid}"))],
            chosen: format!("{pid} good {chosen_index}"),
            rejected: format!("{pid} bad"),
            chosen_index,
            rejected_index: 99,
            score_chosen: 1.5,
            score_rejected: -0.5,
            margin: 2.0,
        }
    }

    fn counters(pairs: u64, same: u64) -> BTreeMap<String, u64> {
        let mut c: BTreeMap<String, u64> = DropReason::ALL.map(|d| (d.counter().to_owned(), 0)).into_iter().collect();
        c.insert("pairs".into(), pairs);
        c.insert("dropped_same_index".into(), same);
        c
    }

    /// Every file under `dir`, relative path → bytes.
    fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.insert(p.strip_prefix(dir).unwrap().to_owned(), fs::read(&p).unwrap());
                }
            }
        }
        out
    }

    /// (prompt_id, method, beta, chosen_index, chosen text) of every row of a Parquet file.
    fn read_rows(path: &Path) -> Vec<(String, String, f64, u32, String)> {
        let mut out = Vec::new();
        for b in shard::read_parquet(path).unwrap() {
            assert_eq!(b.schema(), schema::pairs_export_schema());
            let single = b.column_by_name("chosen_message").unwrap().as_struct();
            let ids = b.column_by_name("prompt_id").unwrap().as_string::<i32>();
            let methods = b.column_by_name("method").unwrap().as_string::<i32>();
            let betas = b.column_by_name("beta").unwrap().as_primitive::<Float64Type>();
            let idx = b.column_by_name("chosen_index").unwrap().as_any().downcast_ref::<UInt32Array>().unwrap();
            let chosen = b.column_by_name("chosen").unwrap();
            for r in 0..b.num_rows() {
                let c = read_messages(chosen.as_ref(), r).unwrap();
                assert_eq!(c.len(), 1);
                assert_eq!(c[0].role, "assistant");
                let content = single.column_by_name("content").unwrap().as_string::<i32>().value(r);
                let role = single.column_by_name("role").unwrap().as_string::<i32>().value(r);
                assert_eq!((role, content), ("assistant", c[0].content.as_str()));
                out.push((
                    ids.value(r).to_owned(),
                    methods.value(r).to_owned(),
                    betas.value(r),
                    idx.value(r),
                    c[0].content.clone(),
                ));
            }
        }
        out
    }

    #[test]
    fn exports_follow_shard_order_filter_by_method_and_beta_and_are_reproducible() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create(&tmp.path().join("run")).unwrap();
        let shards = [
            vec![
                row("p0", Method::Bon, 0.0, 1),
                row("p0", Method::RbonKl, 0.5, 2),
                row("p1", Method::Bon, 0.0, 3),
                row("p1", Method::RbonKl, 1.0, 4),
            ],
            vec![row("p2", Method::Bon, 0.0, 5), row("p2", Method::RbonKl, 0.5, 6), row("p3", Method::RbonKl, 0.5, 7)],
        ];
        for (i, rows) in shards.iter().enumerate() {
            let b = pairs_batch(rows).unwrap();
            shard::write_parquet(
                &run.shard_path(StageName::Pairs, i),
                &schema::pairs_schema(),
                &[b],
                &ShardMeta::default(),
            )
            .unwrap();
        }
        // Parts left by an earlier run with another part count must not survive.
        let stale = run.stage_dir(StageName::Pairs).join("bon/beta=0/train-00001-of-00002.parquet");
        fs::create_dir_all(stale.parent().unwrap()).unwrap();
        fs::write(&stale, b"stale").unwrap();

        let exports = [(Method::Bon, 0.0), (Method::RbonKl, 0.5), (Method::RbonKl, 1.0), (Method::Mbr, 0.0)];
        let counts = BTreeMap::from([
            ("bon/beta=0".to_owned(), counters(3, 2)),
            ("rbon_kl/beta=0.5".to_owned(), counters(3, 0)),
            ("rbon_kl/beta=1".to_owned(), counters(1, 4)),
            ("mbr/beta=0".to_owned(), counters(0, 5)),
        ]);
        let select = SelectConfig {
            proxy: "proxy".into(),
            gold: vec![],
            methods: vec![Method::Bon, Method::RbonKl, Method::Mbr],
            betas: vec![0.5, 1.0],
            lambdas: vec![],
            tune: None,
        };
        let pair = PairConfig::default();
        let config_text = "name: export-test\nseed: 0\n";
        let card = CardContext { run_name: "export-test", version: "9.9.9", select: &select, pair: &pair, config_text };

        let out = write_exports_with(&run, 2, &exports, &counts, (0, 0), &card, ExportOptions::default()).unwrap();
        assert!(!stale.exists(), "stale part survived");
        assert_eq!(out.len(), 4);
        let pairs_dir = run.stage_dir(StageName::Pairs);
        let expect: [(&str, &[(&str, u32)]); 4] = [
            ("bon/beta=0", &[("p0", 1), ("p1", 3), ("p2", 5)]),
            ("rbon_kl/beta=0.5", &[("p0", 2), ("p2", 6), ("p3", 7)]),
            ("rbon_kl/beta=1", &[("p1", 4)]),
            ("mbr/beta=0", &[]),
        ];
        for (e, ((method, beta), (key, rows))) in out.iter().zip(exports.iter().zip(expect)) {
            assert_eq!((e.method, e.beta), (*method, *beta));
            assert_eq!(e.dir, pairs_dir.join(key));
            assert_eq!(e.files, vec![pairs_dir.join(key).join("train-00000-of-00001.parquet")]);
            assert_eq!(e.counts, counts[key]);
            let got = read_rows(&e.files[0]);
            let want: Vec<_> = rows
                .iter()
                .map(|&(p, i)| (p.to_owned(), method.as_str().to_owned(), *beta, i, format!("{p} good {i}")))
                .collect();
            assert_eq!(got, want, "{key}");
            let names: Vec<String> =
                fs::read_dir(&e.dir).unwrap().map(|f| f.unwrap().file_name().to_string_lossy().into_owned()).collect();
            let mut names = names;
            names.sort();
            assert_eq!(names, ["README.md", "train-00000-of-00001.parquet"], "{key}");

            let readme = fs::read_to_string(e.dir.join("README.md")).unwrap();
            let c = &counts[key];
            assert!(readme.contains(&format!("| pairs written | {} |", c["pairs"])), "{readme}");
            assert!(readme.contains(&format!("| dropped same index | {} |", c["dropped_same_index"])), "{readme}");
            assert!(readme.contains("| dropped identical text | 0 |"), "{readme}");
            assert!(readme.contains("| dropped below margin | 0 |"), "{readme}");
            assert!(readme.contains(config_text.trim_end()), "{readme}");
            assert!(readme.contains("rbon 9.9.9"), "{readme}");
            assert!(readme.starts_with("---\n"), "{readme}");
            assert_eq!(readme.contains(&format!("β = {beta}")), method.uses_beta(), "{readme}");
        }

        let first = snapshot(&pairs_dir);
        // Two pair shards, a card and a file per export, and LLaMA-Factory's registry.
        assert_eq!(first.len(), 3 + 2 * exports.len(), "{:?}", first.keys());
        let info: serde_json::Value = serde_json::from_slice(&first[Path::new("dataset_info.json")]).unwrap();
        assert_eq!(info["rbon_kl_beta=0.5"]["file_name"], "rbon_kl/beta=0.5/train-00000-of-00001.parquet");
        assert_eq!(info.as_object().unwrap().len(), exports.len());
        let again = write_exports_with(&run, 2, &exports, &counts, (0, 0), &card, ExportOptions::default()).unwrap();
        assert_eq!(again, out);
        assert!(first == snapshot(&pairs_dir), "a rerun changed the bytes of an export");
    }

    #[test]
    fn a_large_export_is_split_into_parts_of_rows_per_file() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create(tmp.path()).unwrap();
        let n = ROWS_PER_FILE + 3;
        // Two shards, the first ending short of a part boundary, the second crossing it.
        let rows: Vec<PairRow> = (0..n).map(|i| row(&format!("p{i}"), Method::Bon, 0.0, i as u32)).collect();
        let cut = ROWS_PER_FILE - 2;
        for (i, part) in [&rows[..cut], &rows[cut..]].into_iter().enumerate() {
            let b = pairs_batch(part).unwrap();
            shard::write_parquet(
                &run.shard_path(StageName::Pairs, i),
                &schema::pairs_schema(),
                &[b],
                &ShardMeta::default(),
            )
            .unwrap();
        }
        let counts = BTreeMap::from([("bon/beta=0".to_owned(), counters(n as u64, 0))]);
        let select = SelectConfig {
            proxy: "proxy".into(),
            gold: vec![],
            methods: vec![Method::Bon],
            betas: vec![],
            lambdas: vec![],
            tune: None,
        };
        let pair = PairConfig::default();
        let card = CardContext { run_name: "big", version: "0", select: &select, pair: &pair, config_text: "" };
        let out = write_exports_with(&run, 2, &[(Method::Bon, 0.0)], &counts, (0, 0), &card, ExportOptions::default())
            .unwrap();
        let dir = run.stage_dir(StageName::Pairs).join("bon/beta=0");
        assert_eq!(
            out[0].files,
            vec![dir.join("train-00000-of-00002.parquet"), dir.join("train-00001-of-00002.parquet")]
        );
        let idx = |p: &Path| -> Vec<u32> {
            shard::read_parquet(p)
                .unwrap()
                .iter()
                .flat_map(|b| {
                    let c = b.column_by_name("chosen_index").unwrap();
                    c.as_any().downcast_ref::<UInt32Array>().unwrap().values().to_vec()
                })
                .collect()
        };
        let (a, b) = (idx(&out[0].files[0]), idx(&out[0].files[1]));
        assert_eq!(a.len(), ROWS_PER_FILE);
        assert_eq!(b, [ROWS_PER_FILE as u32, ROWS_PER_FILE as u32 + 1, ROWS_PER_FILE as u32 + 2]);
        assert!(a.iter().enumerate().all(|(i, &x)| x == i as u32));
        assert!(fs::read_to_string(dir.join("README.md")).unwrap().contains("Files: 2"));
    }

    /// Renders `role: content` lines; the generation prompt is `assistant:`, EOS is `</s>`.
    struct Lines;

    impl ChatRender for Lines {
        fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String> {
            let mut s: String = messages.iter().map(|m| format!("{}: {}</s>\n", m.role, m.content)).collect();
            if add_generation_prompt {
                s.push_str("assistant: ");
            }
            Ok(s)
        }
        fn eos(&self) -> Option<String> {
            Some("</s>".into())
        }
    }

    #[test]
    fn standard_jsonl_exports_render_strings_without_a_trailing_eos() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create(tmp.path()).unwrap();
        let rows = vec![row("p0", Method::Bon, 0.0, 1), row("p1", Method::Bon, 0.0, 2)];
        shard::write_parquet(
            &run.shard_path(StageName::Pairs, 0),
            &schema::pairs_schema(),
            &[pairs_batch(&rows).unwrap()],
            &ShardMeta::default(),
        )
        .unwrap();
        // A registry left by an earlier conversational export must not survive.
        fs::write(run.stage_dir(StageName::Pairs).join(DATASET_INFO), "{}").unwrap();
        let select = SelectConfig {
            proxy: "proxy".into(),
            gold: vec![],
            methods: vec![Method::Bon],
            betas: vec![],
            lambdas: vec![],
            tune: None,
        };
        let pair = PairConfig { format: PairFormat::Standard, file_format: FileFormat::Jsonl, ..Default::default() };
        let card = CardContext { run_name: "s", version: "0", select: &select, pair: &pair, config_text: "" };
        let counts = BTreeMap::from([("bon/beta=0".to_owned(), counters(2, 0))]);
        let exports = [(Method::Bon, 0.0)];
        let err = write_exports_with(&run, 1, &exports, &counts, (0, 0), &card, ExportOptions::default()).unwrap_err();
        assert!(err.to_string().contains("chat template"), "{err}");
        let opts = ExportOptions { render: Some(&Lines) };
        let out = write_exports_with(&run, 1, &exports, &counts, (0, 0), &card, opts).unwrap();
        let file = run.stage_dir(StageName::Pairs).join("bon/beta=0/train-00000-of-00001.jsonl");
        assert_eq!(out[0].files, vec![file.clone()]);
        assert!(!run.stage_dir(StageName::Pairs).join(DATASET_INFO).exists());
        let text = fs::read_to_string(&file).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["prompt"], "user: question p0</s>\nassistant: ");
        assert_eq!(lines[0]["chosen"], "p0 good 1");
        assert_eq!(lines[0]["rejected"], "p0 bad");
        assert_eq!(lines[1]["chosen_index"], 2);
        assert_eq!(lines[1]["margin"], 2.0);
        // Keys keep the column order of the schema.
        assert!(text.starts_with("{\"prompt_id\":\"p0\",\"method\":\"bon\",\"beta\":0.0,"), "{text}");
        let readme = fs::read_to_string(file.with_file_name("README.md")).unwrap();
        assert!(readme.contains("train-*.jsonl") && readme.contains("Standard"), "{readme}");
    }
}
