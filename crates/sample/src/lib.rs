//! The sample stage: N responses per prompt from the reference policy, from one shared prefill,
//! with per-sample seeds and the exact log π_ref(y | x) that RBoN_KL needs (DESIGN §1, §4).

pub mod config;
pub mod device;
pub mod generate;
pub mod sampler;
pub mod server;
pub mod stage;

pub use config::{Engine, LogprobSource, PolicyConfig, PromptForm, SampleConfig, ServerConfig};
pub use generate::{FinishReason, Generated, Policy, SampleError, prompt_ids, sample_seed};
pub use rbon_models::DTypeName;
pub use sampler::{Draw, SamplingParams, draw};
pub use server::{ServerPolicy, Tick, server_seed};
pub use stage::{SampleStage, ShardSamples, sample_shard};
