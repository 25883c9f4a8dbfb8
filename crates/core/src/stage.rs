//! The stages of a run: their names, the contract every stage after the input implements, and
//! how their shards and counters are named. The one place a stage's name and a shard's file
//! name are spelled (DESIGN §2, §3).
//!
//! A stage reads its upstream stages' shards from the run directory and writes its own, one
//! shard at a time; the runtime schedules any list of stages the same way (workers on their own
//! threads, one per device for stages with models), derives each stage's fingerprint from its
//! [`Stage::identity`] and its upstream stages' fingerprints, and reuses shards whose footer
//! carries that fingerprint. A stage is added by implementing [`Stage`] in its crate and
//! registering it in the runtime's pipeline (one line).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use serde::{Deserialize, Serialize};

use crate::digest::FileDigests;
use crate::error::CoreError;
use crate::progress::Progress;
use crate::rundir::RunDir;
use crate::shard::ShardMeta;

/// A stage that owns a folder of shards in the run directory, in pipeline order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageName {
    Prompts,
    Samples,
    Scores,
    Selections,
    Pairs,
}

impl StageName {
    /// Every stage, in pipeline order.
    pub const ALL: [StageName; 5] = [Self::Prompts, Self::Samples, Self::Scores, Self::Selections, Self::Pairs];

    /// The stage's name: its folder in the run directory, its key in the manifest.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Prompts => "prompts",
            Self::Samples => "samples",
            Self::Scores => "scores",
            Self::Selections => "selections",
            Self::Pairs => "pairs",
        }
    }
}

impl fmt::Display for StageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StageName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| format!("unknown stage `{s}`"))
    }
}

/// The failure of a stage: what went wrong, and whether the user's data is at fault (a file,
/// row or prompt to fix) rather than the environment.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct StageError {
    pub data: bool,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl StageError {
    /// A failure caused by bad input data.
    pub fn data(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self { data: true, source: source.into() }
    }

    /// Any other failure (I/O, a model that does not load, a bug).
    pub fn other(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self { data: false, source: source.into() }
    }
}

impl From<CoreError> for StageError {
    fn from(e: CoreError) -> Self {
        let data = e.is_data();
        Self { data, source: Box::new(e) }
    }
}

/// The error type of a stage's crate: whether a failure is the input data's fault (exit 65)
/// rather than the machine's or the models' is all the runtime needs to know.
pub trait StageFailure: std::error::Error + Send + Sync + 'static {
    fn is_data(&self) -> bool;
}

impl<E: StageFailure> From<E> for StageError {
    fn from(e: E) -> Self {
        Self { data: e.is_data(), source: Box::new(e) }
    }
}

/// What the making of one shard gets.
#[allow(missing_debug_implementations, reason = "holds a `dyn Progress`")]
pub struct ShardCtx<'a> {
    pub run: &'a RunDir,
    /// The stage whose shard is made.
    pub stage: StageName,
    pub shard: usize,
    /// The stage's fingerprint, for the footer of the shard it writes.
    pub fingerprint: &'a str,
    /// The stage's label, for its progress events.
    pub label: &'a str,
    pub progress: &'a dyn Progress,
}

impl ShardCtx<'_> {
    /// The footer of the shard: the stage's fingerprint and these counters.
    pub fn meta(&self, counters: BTreeMap<String, u64>) -> ShardMeta {
        ShardMeta { fingerprint: self.fingerprint.to_owned(), counters, ..Default::default() }
    }

    /// Writes the shard (atomically, with its footer) and hands back what
    /// [`ShardWorker::run`] returns: the footer and the row count.
    pub fn write(
        &self,
        schema: &SchemaRef,
        batch: RecordBatch,
        meta: ShardMeta,
    ) -> Result<(ShardMeta, usize), StageError> {
        let rows = batch.num_rows();
        crate::shard::write_shard(&self.run.shard_path(self.stage, self.shard), schema, &[batch], &meta)?;
        Ok((meta, rows))
    }
}

/// A stage after the input, over devices of type `D` (the runtime's model devices; stages
/// without models ignore them).
pub trait Stage<D>: Send + Sync {
    /// Its name: its folder of shards and its key in the manifest.
    fn name(&self) -> StageName;

    /// What progress lines and summaries call it.
    fn label(&self) -> String {
        self.name().to_string()
    }

    /// The stages whose shards it reads; their fingerprints are part of its own.
    fn upstream(&self) -> &'static [StageName];

    /// Everything besides its inputs that its output depends on: the whole configuration
    /// sections it reads (so no field can be left out) and the content digests of the files it
    /// reads (models, templates), taken from `files`.
    fn identity(&self, files: &FileDigests) -> Result<serde_json::Value, StageError>;

    /// Whether every device gets its own worker (stages with models) or one worker serves all.
    fn per_device(&self) -> bool {
        false
    }

    /// Workers per device (or in all, without [`Stage::per_device`]): more than one for a stage
    /// that waits on something else (an inference server), so that one shard's last requests
    /// overlap the next shard's first.
    fn workers(&self) -> usize {
        1
    }

    /// A worker on `device`, on the thread that will run it. It owns what the stage loads
    /// (models, loaded on its first shard, so a finished run does not pay for them).
    fn worker<'s>(&'s self, device: &D) -> Box<dyn ShardWorker + 's>;
}

/// Makes the shards of one stage on one device.
pub trait ShardWorker {
    /// Makes shard `ctx.shard` from the upstream shards and writes it atomically; returns its
    /// footer and its row count.
    fn run(&mut self, ctx: &ShardCtx<'_>) -> Result<(ShardMeta, usize), StageError>;
}

/// The names of the counters stages record in their shards' footers (and the manifest sums).
pub mod counter {
    pub const PROMPTS: &str = "prompts";
    pub const SAMPLES: &str = "samples";
    /// Generated tokens, EOS included.
    pub const TOKENS: &str = "tokens";
    /// Samples cut at `max_new_tokens`.
    pub const TRUNCATED: &str = "truncated";
    pub const SELECTIONS: &str = "selections";
    pub const PAIRS: &str = "pairs";
    /// Pairs dropped because chosen and rejected are the same sample.
    pub const DROPPED_SAME_INDEX: &str = "dropped_same_index";
    /// Pairs dropped because chosen and rejected have the same text.
    pub const DROPPED_IDENTICAL_TEXT: &str = "dropped_identical_text";
    /// Pairs dropped because their proxy margin is below `pair.min_margin`.
    pub const DROPPED_BELOW_MARGIN: &str = "dropped_below_margin";
    /// The pair counters of a shard (and of each export), in the order reports show them.
    pub const PAIR_COUNTERS: [&str; 4] = [PAIRS, DROPPED_SAME_INDEX, DROPPED_IDENTICAL_TEXT, DROPPED_BELOW_MARGIN];
    /// Of the export: folders and files written.
    pub const EXPORTS: &str = "exports";
    pub const FILES: &str = "files";
}

const SHARD_PREFIX: &str = "shard-";
const SHARD_SUFFIX: &str = ".parquet";

/// The file name of shard `i`: `shard-00042.parquet`.
pub fn shard_file_name(i: usize) -> String {
    format!("{SHARD_PREFIX}{i:05}{SHARD_SUFFIX}")
}

/// The shard index a file name names: `shard-00042.parquet`, or the temporary file a writer of
/// that shard uses (`.shard-00042.parquet.tmp-…`); `None` for any other name.
pub fn shard_index(file_name: &str) -> Option<usize> {
    let name = file_name.strip_prefix('.').unwrap_or(file_name);
    let digits = name.strip_prefix(SHARD_PREFIX)?;
    let (index, rest) = digits.split_at_checked(digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len()))?;
    let final_name = rest == SHARD_SUFFIX && !file_name.starts_with('.');
    let temp_name = file_name.starts_with('.') && rest.starts_with(SHARD_SUFFIX) && rest.contains(".tmp-");
    (final_name || temp_name).then(|| index.parse().ok()).flatten()
}

/// Whether a file name is that of a finished shard (not a temporary file).
pub fn is_shard_file(file_name: &str) -> bool {
    !file_name.starts_with('.') && shard_index(file_name).is_some()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in StageName::ALL {
            assert_eq!(s.as_str().parse::<StageName>().unwrap(), s);
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert!("export".parse::<StageName>().is_err());
        assert_eq!(shard_file_name(42), "shard-00042.parquet");
        assert_eq!(shard_index("shard-00042.parquet"), Some(42));
        assert_eq!(shard_index(".shard-00042.parquet.tmp-123"), Some(42));
        assert!(is_shard_file("shard-00042.parquet") && !is_shard_file(".shard-00042.parquet.tmp-123"));
        for other in ["shard-00042.parquet.bak", "shard-x.parquet", "train-00000-of-00001.parquet", ".lock"] {
            assert_eq!(shard_index(other), None, "{other}");
        }
    }
}
