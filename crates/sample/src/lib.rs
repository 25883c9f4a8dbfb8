//! The sample stage: N responses per prompt from the reference policy, from one shared prefill,
//! with per-sample seeds and the exact log π_ref(y | x) that RBoN_KL needs (DESIGN §1, §4).

pub mod config;
pub mod device;
pub mod generate;
pub mod sampler;
pub mod stage;

pub use config::{PolicyConfig, SampleConfig};
pub use generate::{FinishReason, Generated, Policy, SampleError, sample_seed};
pub use rbon_models::DTypeName;
pub use sampler::{Draw, SamplingParams, draw};
pub use stage::{SampleStage, ShardSamples, sample_shard};
