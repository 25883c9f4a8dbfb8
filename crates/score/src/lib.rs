//! The score stage: reward models (decoder `*ForSequenceClassification` and DeBERTa-v2/v3) and
//! sentence embeddings for every sample (DESIGN §1, §4, §8).

pub mod config;
pub mod embed;
pub mod reward;
pub mod stage;

pub use config::{EmbeddingSpec, RewardSpec, ScoreConfig};
pub use embed::{Embedder, Pooling};
pub use reward::RewardModel;
pub use stage::{ShardScores, score_shard};

/// Errors of the score stage.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error(transparent)]
    Model(#[from] rbon_models::ModelError),
    #[error("{0}")]
    Config(String),
    #[error("{context}: {source}")]
    Candle { context: String, source: candle_core::Error },
    #[error("reward `{reward}` of prompt {prompt_id:?} sample {sample_idx} is not finite")]
    NonFinite { reward: String, prompt_id: String, sample_idx: u32 },
    #[error(transparent)]
    Core(#[from] rbon_core::CoreError),
}
