//! Helpers shared by the end-to-end test binaries.

#![allow(dead_code, reason = "each test binary uses some of the helpers")]
#![allow(clippy::unwrap_used, reason = "tests: unwraps are the assertions")]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

pub fn rbon(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rbon")).args(args).current_dir(cwd).output().unwrap()
}

pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn read(path: &Path) -> RecordBatch {
    let f = fs::File::open(path).unwrap();
    let r = ParquetRecordBatchReaderBuilder::try_new(f).unwrap().build().unwrap();
    let batches: Vec<RecordBatch> = r.map(|b| b.unwrap()).collect();
    arrow_select_concat(&batches)
}

pub fn arrow_select_concat(batches: &[RecordBatch]) -> RecordBatch {
    assert!(!batches.is_empty());
    let schema = batches[0].schema();
    let cols = (0..schema.fields().len())
        .map(|i| {
            let arrays: Vec<&dyn Array> = batches.iter().map(|b| b.column(i).as_ref()).collect();
            arrow_select::concat::concat(&arrays).unwrap()
        })
        .collect();
    RecordBatch::try_new(schema, cols).unwrap()
}

pub fn samples_rows(run: &Path) -> Vec<(String, u32, Vec<u32>, String, f64)> {
    let mut out = Vec::new();
    let mut i = 0;
    while run.join(format!("samples/shard-{i:05}.parquet")).exists() {
        let b = read(&run.join(format!("samples/shard-{i:05}.parquet")));
        let ids = b.column_by_name("prompt_id").unwrap().as_string::<i32>();
        let k = b.column_by_name("sample_idx").unwrap().as_primitive::<arrow_array::types::UInt32Type>();
        let toks = b.column_by_name("token_ids").unwrap().as_list::<i32>();
        let fin = b.column_by_name("finish_reason").unwrap().as_string::<i32>();
        let lp = b.column_by_name("logprob").unwrap().as_primitive::<arrow_array::types::Float64Type>();
        for r in 0..b.num_rows() {
            let t = toks.value(r);
            let t: Vec<u32> = t.as_primitive::<arrow_array::types::UInt32Type>().values().to_vec();
            out.push((ids.value(r).to_owned(), k.value(r), t, fin.value(r).to_owned(), lp.value(r)));
        }
        i += 1;
    }
    out
}

/// Each prompts shard's conversations, by prompt id.
pub fn conversations(run: &Path) -> std::collections::BTreeMap<String, Vec<rbon_core::Message>> {
    let mut out = std::collections::BTreeMap::new();
    let mut i = 0;
    while run.join(format!("prompts/shard-{i:05}.parquet")).exists() {
        let b = read(&run.join(format!("prompts/shard-{i:05}.parquet")));
        out.extend(rbon_core::tables::read_prompts_batches(&[b], "prompts").unwrap());
        i += 1;
    }
    out
}

pub fn load_policy(name: &str) -> rbon_sample::Policy {
    let cfg = rbon_sample::PolicyConfig {
        model: repo().join("data/models").join(name).display().to_string(),
        dtype: Default::default(),
        chat_template: "auto".into(),
        system_prompt: None,
        engine: Default::default(),
        server: None,
    };
    rbon_sample::Policy::load(&cfg, &rbon_models::Device::Cpu).unwrap()
}

/// A text column's values.
pub fn strings(b: &RecordBatch, col: &str) -> Vec<String> {
    let a = b.column_by_name(col).unwrap().as_string::<i32>();
    (0..a.len()).map(|r| a.value(r).to_owned()).collect()
}
