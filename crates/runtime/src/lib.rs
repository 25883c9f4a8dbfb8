//! Runs pipelines: composes the stage configs into the pipeline YAML, checks it, and drives the
//! stages over the run directory with resume. Emits progress events; never prints.

pub mod config;
pub mod run;

pub use config::{Pipeline, PipelineConfig, RuntimeConfig, load};
pub use run::{RunError, RunOptions, RunReport, StageReport, VERSION, run};
