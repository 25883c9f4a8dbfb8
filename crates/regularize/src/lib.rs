//! The selection rules of Regularized Best-of-N (DESIGN §1): BoN, RBoN_KL, RBoN_WD (MBR-BoN), MBR,
//! RBoN_len and the report-only oracle and random baselines. Pure functions over one prompt's N
//! candidates, plus the stage that applies them to shards. No model code lives here.

pub mod method;

pub use method::*;
