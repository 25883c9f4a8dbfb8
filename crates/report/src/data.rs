//! What the report reads from a run directory: the frozen config, the shard files of each
//! stage, and per-sample features (length, log π_ref, WD) that no table stores.

use std::fs;
use std::path::{Path, PathBuf};

use polars::prelude::*;

use rbon_core::shard;
use rbon_core::tables::SampleScores;
use rbon_core::{ConfigDoc, Diagnostics, RunDir, StageName};
use rbon_regularize::{SelectConfig, wasserstein};

use crate::ReportError;

/// Columns of the per-sample features frame.
pub const F_TOKENS: &str = "num_tokens";
pub const F_CHARS: &str = "num_chars";
pub const F_LOGPROB: &str = "logprob";
pub const F_WD: &str = "wd";

/// A finished run directory, opened for reading.
#[derive(Debug, Clone)]
pub struct RunData {
    pub root: PathBuf,
    pub name: String,
    pub select: SelectConfig,
    /// `selections/shard-*.parquet`, in shard order.
    pub selections: Vec<PathBuf>,
    pub samples: Vec<PathBuf>,
    pub scores: Vec<PathBuf>,
    pub pairs: Vec<PathBuf>,
}

/// The finished shard files of a stage, in shard order (temporary files of killed writers,
/// hidden by a leading dot, are not shards).
pub fn shard_files(dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ReportError::Io { path: dir.to_owned(), source }),
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.file_name().and_then(|n| n.to_str()).is_some_and(rbon_core::stage::is_shard_file))
        .collect();
    out.sort();
    Ok(out)
}

/// The `select` section of the run's frozen `pipeline.yaml`.
pub fn frozen_select(root: &Path) -> Result<(String, SelectConfig), ReportError> {
    let path = root.join(rbon_core::rundir::FROZEN_CONFIG);
    if !path.is_file() {
        return Err(ReportError::Config {
            path,
            message: "not found: is this an rbon run directory (the `output:` of a pipeline)?".into(),
        });
    }
    let config_err = |d: Diagnostics| ReportError::Config { path: path.clone(), message: d.to_string() };
    let doc = ConfigDoc::load(&path).map_err(config_err)?;
    let mut d = Diagnostics::default();
    let name: Option<String> = doc.value("name", &mut d);
    if doc.get("select").is_none() {
        return Err(ReportError::NoSelections { path: root.to_owned() });
    }
    let select: Option<SelectConfig> = doc.section("select", &mut d);
    match select {
        Some(s) if d.is_empty() => Ok((name.unwrap_or_default(), s)),
        _ => Err(config_err(d)),
    }
}

impl RunData {
    /// Opens `root` with the `select` section of its frozen pipeline.
    pub fn open(root: &Path) -> Result<Self, ReportError> {
        let (name, select) = frozen_select(root)?;
        let name = match name.is_empty() {
            true => RunDir::create(root).and_then(|r| r.read_manifest()).map(|m| m.name).unwrap_or_default(),
            false => name,
        };
        Self::with_select(root, name, select)
    }

    /// Opens `root` with a `select` section given by the caller.
    pub fn with_select(root: &Path, name: String, select: SelectConfig) -> Result<Self, ReportError> {
        let dir = |s: StageName| root.join(s.as_str());
        let selections = shard_files(&dir(StageName::Selections))?;
        if selections.is_empty() {
            return Err(ReportError::NoSelections { path: root.to_owned() });
        }
        Ok(Self {
            root: root.to_owned(),
            name,
            select,
            selections,
            samples: shard_files(&dir(StageName::Samples))?,
            scores: shard_files(&dir(StageName::Scores))?,
            pairs: shard_files(&dir(StageName::Pairs))?,
        })
    }

    /// Reward names present in the selections table (`reward_<name>` columns), in table order.
    pub fn reward_names(&self) -> Result<Vec<String>, ReportError> {
        let first = &self.selections[0];
        let schema = scan(std::slice::from_ref(first))?.collect_schema().map_err(ReportError::polars(first))?;
        Ok(schema.iter_names().filter_map(|n| rbon_core::schema::reward_name(n).map(str::to_owned)).collect())
    }

    /// Per sample: prompt_id, sample_idx, num_tokens, num_chars, logprob and WD (nulls where the
    /// run has no token counts, log-probs or embeddings). WD is recomputed from the embeddings
    /// with the selection stage's own function, one shard at a time.
    pub fn features(&self) -> Result<DataFrame, ReportError> {
        let mut ids: Vec<String> = Vec::new();
        let mut idx: Vec<u32> = Vec::new();
        let mut tokens: Vec<Option<f64>> = Vec::new();
        let mut chars: Vec<f64> = Vec::new();
        let mut logprob: Vec<Option<f64>> = Vec::new();
        let mut wd: Vec<Option<f64>> = Vec::new();
        for (sa, sc) in self.samples.iter().zip(&self.scores) {
            let what = sa.display().to_string();
            let data = SampleScores::from_batches(&shard::read_parquet(sa)?, &shard::read_parquet(sc)?, &what)?;
            for g in &data.groups {
                let w = match data.group_embeddings(g) {
                    Some((e, dim)) => Some(wasserstein(e, dim).map_err(|e| ReportError::Data {
                        path: sc.clone(),
                        message: format!("prompt {:?}: {e}", data.prompt_ids[g.start]),
                    })?),
                    None => None,
                };
                for (k, r) in g.clone().enumerate() {
                    ids.push(data.prompt_ids[r].clone());
                    idx.push(data.sample_idx[r]);
                    tokens.push(data.num_tokens.as_ref().map(|t| f64::from(t[r])));
                    chars.push(data.responses[r].chars().count() as f64);
                    logprob.push(data.logprob.as_ref().map(|l| l[r]));
                    wd.push(w.as_ref().map(|w| w[k]));
                }
            }
        }
        DataFrame::new_infer_height(vec![
            Column::new(rbon_core::schema::PROMPT_ID.into(), ids),
            Column::new(rbon_core::schema::SAMPLE_IDX.into(), idx),
            Column::new(F_TOKENS.into(), tokens),
            Column::new(F_CHARS.into(), chars),
            Column::new(F_LOGPROB.into(), logprob),
            Column::new(F_WD.into(), wd),
        ])
        .map_err(ReportError::polars(&self.root))
    }
}

/// A lazy scan over shard files (one scan per file, unioned), without hive partitioning or
/// globbing, so any characters in the run directory's path are taken literally.
pub fn scan(files: &[PathBuf]) -> Result<LazyFrame, ReportError> {
    let mut frames = Vec::with_capacity(files.len());
    for f in files {
        let args = ScanArgsParquet { glob: false, hive_options: HiveOptions::new_disabled(), ..Default::default() };
        let path = PlRefPath::try_from_path(f).map_err(ReportError::polars(f))?;
        frames.push(LazyFrame::scan_parquet(path, args).map_err(ReportError::polars(f))?);
    }
    let at = files.first().map(PathBuf::as_path).unwrap_or(Path::new("."));
    concat(frames, UnionArgs::default()).map_err(ReportError::polars(at))
}
