//! Trainer-ready exports: `pairs/<method>/beta=<β>/train-0000i-of-0000N.parquet` plus a dataset
//! card, merged from the pair shards in shard order (so the bytes do not depend on how many
//! processes made the shards).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::PathBuf;

use arrow_array::cast::AsArray;
use arrow_array::types::Float64Type;
use arrow_array::{BooleanArray, RecordBatch};
use rbon_core::schema::{self, BETA, METHOD};
use rbon_core::shard::{self, ParquetSink, ShardMeta};
use rbon_core::{CoreError, RunDir};
use rbon_regularize::{Method, SelectConfig};

use crate::config::PairConfig;
use crate::stage::{DropReason, PairError, export_key};

/// Rows per exported Parquet file.
pub const ROWS_PER_FILE: usize = 100_000;
/// Rows per row group in exports: bounds the memory of the writers open at once.
const ROW_GROUP_ROWS: usize = 4096;

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
    pub counts: BTreeMap<String, u64>,
}

/// The file name of part `i` of `n`: `train-00000-of-00003.parquet`, the layout the Hugging Face
/// Hub and `load_dataset` read as a train split.
pub fn part_name(i: usize, n: usize) -> String {
    format!("train-{i:05}-of-{n:05}.parquet")
}

/// Writes every export from the `pairs` stage's shards, replacing earlier files.
/// `counts[key]` holds each export's summed counters (from the shards' details).
pub fn write_exports(
    run: &RunDir,
    shards: usize,
    exports: &[(Method, f64)],
    counts: &BTreeMap<String, BTreeMap<String, u64>>,
    card: &CardContext,
) -> Result<Vec<Export>, PairError> {
    let pairs_dir = run.stage_dir("pairs");
    let schema = schema::pairs_schema();
    struct Open {
        method: Method,
        beta: f64,
        dir: PathBuf,
        parts: usize,
        files: Vec<PathBuf>,
        sink: Option<ParquetSink>,
    }
    let mut open: Vec<Open> = Vec::new();
    for &(method, beta) in exports {
        let key = export_key(method, beta);
        let dir = pairs_dir.join(&key);
        // Earlier files may have another part count; stale parts must not be loaded with new ones.
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| CoreError::io(&dir, e))?;
        }
        let n = counts.get(&key).and_then(|c| c.get("pairs")).copied().unwrap_or(0) as usize;
        open.push(Open { method, beta, dir, parts: n.div_ceil(ROWS_PER_FILE).max(1), files: Vec::new(), sink: None });
    }
    let meta = ShardMeta::default();
    let start = |o: &mut Open| -> Result<(), CoreError> {
        let path = o.dir.join(part_name(o.files.len(), o.parts));
        o.sink = Some(ParquetSink::create(&path, &schema, &meta, Some(ROW_GROUP_ROWS))?);
        o.files.push(path);
        Ok(())
    };
    for o in &mut open {
        start(o)?;
    }
    for i in 0..shards {
        let path = run.shard_path("pairs", i);
        for batch in shard::read_parquet(&path)? {
            let methods = batch.column_by_name(METHOD).map(|c| c.as_string::<i32>().clone());
            let betas = batch.column_by_name(BETA).map(|c| c.as_primitive::<Float64Type>().clone());
            let (Some(methods), Some(betas)) = (methods, betas) else {
                return Err(CoreError::data(path.display().to_string(), "not a pairs shard").into());
            };
            for o in &mut open {
                let mask: BooleanArray = (0..batch.num_rows())
                    .map(|r| Some(methods.value(r) == o.method.as_str() && betas.value(r) == o.beta))
                    .collect();
                let mut part = filter(&batch, &mask)?;
                while part.num_rows() > 0 {
                    let sink = o.sink.as_mut().ok_or_else(|| CoreError::data("pairs", "export closed"))?;
                    let room = ROWS_PER_FILE - sink.rows();
                    let take = room.min(part.num_rows());
                    sink.write(&part.slice(0, take))?;
                    part = part.slice(take, part.num_rows() - take);
                    if sink.rows() == ROWS_PER_FILE && o.files.len() < o.parts {
                        if let Some(s) = o.sink.take() {
                            s.finish()?;
                        }
                        start(o)?;
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    for mut o in open {
        if let Some(s) = o.sink.take() {
            s.finish()?;
        }
        let key = export_key(o.method, o.beta);
        let c = counts.get(&key).cloned().unwrap_or_default();
        let text = dataset_card(card, o.method, o.beta, &c, o.files.len());
        shard::write_atomic(&o.dir.join("README.md"), text.as_bytes())?;
        out.push(Export { method: o.method, beta: o.beta, dir: o.dir, files: o.files, counts: c });
    }
    Ok(out)
}

fn filter(batch: &RecordBatch, mask: &BooleanArray) -> Result<RecordBatch, CoreError> {
    arrow_select_filter(batch, mask)
}

fn arrow_select_filter(batch: &RecordBatch, mask: &BooleanArray) -> Result<RecordBatch, CoreError> {
    let cols = batch
        .columns()
        .iter()
        .map(|c| arrow_select::filter::filter(c.as_ref(), mask))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CoreError::data("pairs", e.to_string()))?;
    RecordBatch::try_new(batch.schema(), cols).map_err(|e| CoreError::data("pairs", e.to_string()))
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
        "---\ntags:\n- trl\n- dpo\n- rbon\n- preference\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: \"train-*.parquet\"\n---\n"
    );
    let beta_text = if method.uses_beta() { format!(", β = {beta}") } else { String::new() };
    let _ = writeln!(s, "# {}: `{}`{} preference pairs\n", card.run_name, method, beta_text);
    let _ = writeln!(
        s,
        "Made by rbon {} from N candidate responses per prompt. **chosen** is the pick of `{}`{}; \
         **rejected** is chosen by the `{}` rule. Format: Conversational / Type: Preference, with an \
         explicit prompt (TRL).\n",
        card.version,
        method,
        beta_text,
        card.pair.rejected.as_str()
    );
    let objective = match method {
        Method::Bon => "R_p(x, y)".to_owned(),
        Method::RbonKl => format!("R_p(x, y) + {beta} · log π_ref(y | x)"),
        Method::RbonWd => format!("R_p(x, y) − {beta} · WD(y)"),
        Method::Mbr => "− WD(y)".to_owned(),
        Method::RbonLen => format!("R_p(x, y) − {beta} / |y|"),
        Method::Oracle | Method::Random => String::new(),
    };
    let _ = writeln!(
        s,
        "Selection objective (argmax over the N samples, ties to the lowest index): `{objective}`, with proxy reward `{}`.\n",
        card.select.proxy
    );
    let _ = writeln!(s, "## Counts\n\n| | rows |\n|---|---|");
    let _ = writeln!(s, "| pairs written | {} |", get("pairs"));
    for d in DropReason::ALL {
        let _ = writeln!(s, "| {} | {} |", d.counter().replace('_', " "), get(d.counter()));
    }
    let _ = writeln!(s, "\nFiles: {files} (`train-*.parquet`).\n");
    let _ = writeln!(
        s,
        "## Columns\n\n| column | type | meaning |\n|---|---|---|\n\
         | prompt | list<struct<role, content>> | the conversation before the response |\n\
         | chosen | list<struct<role, content>> | one assistant message |\n\
         | rejected | list<struct<role, content>> | one assistant message |\n\
         | prompt_id | string | id of the prompt (input id column, or SHA-256 of the canonical prompt) |\n\
         | method, beta | string, float64 | the selection rule and its β (0 for rules without one) |\n\
         | chosen_index, rejected_index | uint32 | sample indices among the prompt's N candidates |\n\
         | score_chosen, score_rejected | float64 | proxy reward of each response |\n\
         | margin | float64 | score_chosen − score_rejected |\n"
    );
    let _ = writeln!(
        s,
        "## Training on it\n\n\
         - TRL: `load_dataset(\"parquet\", data_files=\"train-*.parquet\")` and pass it to `DPOTrainer`.\n\
         - OpenRLHF: `--dataset <this folder> --data.apply_chat_template --data.prompt_key prompt \
         --data.chosen_key chosen --data.rejected_key rejected`.\n"
    );
    let _ = writeln!(s, "## Pipeline\n\n```yaml\n{}\n```", card.config_text.trim_end());
    s
}
