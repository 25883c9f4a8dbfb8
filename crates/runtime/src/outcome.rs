//! What a run returns: its errors and its report. Shared by the orchestration ([`crate::run`]),
//! the scheduler ([`crate::exec`]) and the merge ([`crate::finalize`]), which import this and
//! not each other.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use rbon_core::{CoreError, StageError, StageName};
use rbon_pair::{Export, PairError};
use rbon_regularize::SelectError;

use crate::ranks::Ranks;

/// rbon's version, recorded in manifests and cards.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Errors of a run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Core(#[from] CoreError),
    /// A stage failed on a shard.
    #[error(transparent)]
    Stage(#[from] StageError),
    /// Stopped on request after writing the shards in flight.
    #[error("interrupted: {done} of {total} shards went through every stage; the rest are left for a rerun")]
    Interrupted { done: usize, total: usize },
    /// The run cannot be merged (yet), or its ranks disagree.
    #[error("{0}")]
    NotFinished(String),
    /// The command line or the devices do not fit the run.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Select(#[from] SelectError),
    #[error(transparent)]
    Pair(#[from] PairError),
    #[error(transparent)]
    Sample(Box<rbon_sample::SampleError>),
    #[error(transparent)]
    Score(Box<rbon_score::ScoreError>),
    #[error("report: {0}")]
    Report(Box<rbon_report::ReportError>),
}

impl From<rbon_report::ReportError> for RunError {
    fn from(e: rbon_report::ReportError) -> Self {
        Self::Report(Box::new(e))
    }
}

impl From<rbon_score::ScoreError> for RunError {
    fn from(e: rbon_score::ScoreError) -> Self {
        Self::Score(Box::new(e))
    }
}

impl From<rbon_sample::SampleError> for RunError {
    fn from(e: rbon_sample::SampleError) -> Self {
        Self::Sample(Box::new(e))
    }
}

impl RunError {
    /// True when the user's data, not the environment, is at fault.
    pub fn is_data(&self) -> bool {
        match self {
            Self::Core(e) => e.is_data(),
            Self::Stage(e) => e.data,
            Self::Interrupted { .. } | Self::NotFinished(_) | Self::Usage(_) | Self::Report(_) => false,
            Self::Select(SelectError::Core(e)) | Self::Pair(PairError::Core(e)) => e.is_data(),
            Self::Sample(e) => matches!(e.as_ref(), rbon_sample::SampleError::Core(c) if c.is_data()),
            Self::Score(e) => matches!(e.as_ref(), rbon_score::ScoreError::Core(c) if c.is_data()),
            Self::Select(_) | Self::Pair(_) => true,
        }
    }
}

/// What one stage did.
#[derive(Debug, Clone, PartialEq)]
pub struct StageReport {
    pub stage: StageName,
    /// What the stage is called in progress and summaries: its name, or for a candidates
    /// import (the `samples` stage of such a run) what the import computes.
    pub label: String,
    pub shards: usize,
    pub reused: usize,
    pub counters: BTreeMap<String, u64>,
    /// Time the stage's workers spent on the shards written now (stages overlap in time).
    pub busy: Duration,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub run_dir: PathBuf,
    /// This process's stages (its own shards, unless `finalized`).
    pub stages: Vec<StageReport>,
    pub ranks: Ranks,
    /// The shards were merged (exports written or up to date); false for a rank of several,
    /// which leaves that to `rbon finalize`.
    pub finalized: bool,
    pub exports: Vec<Export>,
    /// True when the exports were already up to date and left alone.
    pub exports_reused: bool,
    /// The variational-BoN export's files, when `pair.vbon` is on.
    pub vbon_files: Vec<PathBuf>,
    /// The report, when the run was merged and selects.
    pub report: Option<rbon_report::Report>,
}
