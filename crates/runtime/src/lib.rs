//! Runs pipelines: composes the stage configs into the pipeline YAML, checks it, and streams the
//! shards of one rank through the stages over the run directory, with resume; merges finished
//! runs into exports and reports their status. Emits progress events; never prints.

pub mod bench;
pub mod config;
pub mod describe;
pub mod devices;
mod exec;
mod finalize;
pub mod outcome;
mod pipeline;
pub mod ranks;
pub mod run;
mod source;

pub use config::{Pipeline, PipelineConfig, RuntimeConfig, load};
pub use finalize::{StageStatus, Status, finalize, status};
pub use outcome::{RunError, RunReport, StageReport, VERSION};
pub use ranks::Ranks;
/// Why pairs are dropped (each a counter of the pairs stage).
pub use rbon_pair::DropReason;
pub use run::{RunOptions, run};
pub use source::check_input;
