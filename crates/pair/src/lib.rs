//! Chosen/rejected pairs for DPO from the selections (DESIGN §1 "Pairs for DPO"): the rejected
//! rule, drops counted by reason, TRL-native conversational rows and the per-(method, β) exports
//! with their dataset cards. No model code lives here.

pub mod config;
pub mod export;
pub mod format;
pub mod stage;

pub use config::{CardConfig, FileFormat, MarginColumn, PairConfig, PairFormat, RejectedRule};
pub use export::{CardContext, Export, ExportOptions, write_exports_with};
pub use format::ChatRender;
pub use stage::{DropReason, PairError, PairRow, PairStage, ShardPairs, export_key, pair_shard, pairs_batch};
