//! Shared ground for every rbon stage: the Arrow schemas and column names of the run directory's
//! tables, YAML config loading with positioned diagnostics, the input readers (prompts and
//! candidates), the run directory with its manifest and atomic Parquet shards, fingerprints and
//! seeding, and the progress events that libraries emit instead of printing.

pub mod config;
pub mod digest;
pub mod error;
pub mod input;
pub mod messages;
pub mod progress;
pub mod rundir;
pub mod schema;
pub mod seed;
pub mod shard;
pub mod stage;
pub mod tables;

pub use config::{ConfigDoc, Diagnostic, Diagnostics};
pub use digest::FileDigests;
pub use error::{CoreError, Result};
pub use messages::Message;
pub use progress::{Event, NoProgress, Progress};
pub use rundir::{Manifest, RankState, RunDir, StageState};
pub use shard::ShardMeta;
pub use stage::{ShardCtx, ShardWorker, Stage, StageError, StageFailure, StageName};
