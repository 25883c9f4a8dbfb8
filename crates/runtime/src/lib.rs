//! Runs pipelines: composes the stage configs into the pipeline YAML, checks it, and streams the
//! shards of one rank through the stages over the run directory, with resume; merges finished
//! runs into exports and reports their status. Emits progress events; never prints.

pub mod bench;
pub mod config;
pub mod devices;
mod exec;
mod finalize;
pub mod ranks;
pub mod run;
mod stages;

pub use config::{Pipeline, PipelineConfig, RuntimeConfig, load};
pub use finalize::{StageStatus, Status, finalize, status};
pub use ranks::Ranks;
pub use run::{RunError, RunOptions, RunReport, StageReport, VERSION, run};
