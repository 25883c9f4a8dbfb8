//! The selection rules of Regularized Best-of-N (DESIGN §1): BoN, RBoN_KL, RBoN_WD (MBR-BoN), MBR,
//! RBoN_len and the report-only oracle and random baselines. Pure functions over one prompt's N
//! candidates ([`method`]), the `select` config section ([`config`]) and the stage that applies
//! the rules to a shard ([`stage`]). No model code lives here.

pub mod config;
pub mod method;
pub mod stage;

pub use config::{Available, DEFAULT_LAMBDAS, PAPER_BETAS, Proxy, SelectConfig, TuneConfig};
pub use method::*;
pub use stage::{SelectError, SelectStage, SelectionRow, group_proxy, select_shard, selections_batch, sweep};
