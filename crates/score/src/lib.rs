//! The score stage: reward models (decoder `*ForSequenceClassification` and DeBERTa-v2/v3) and
//! sentence embeddings for every sample (DESIGN §1, §4, §8).

pub mod config;
pub mod embed;
pub mod reward;
pub mod stage;

pub use config::{EmbeddingSpec, HeadPooling, PairAggregate, RewardKind, RewardSpec, ScoreConfig};
pub use embed::{Embedder, Pooling};
pub use reward::RewardModel;
pub use stage::{ScoreStage, Scorers, ShardScores, score_shard};

/// Errors of the score stage.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error(transparent)]
    Model(#[from] rbon_models::ModelError),
    #[error("{0}")]
    Config(String),
    #[error("{context}: {source}")]
    Candle { context: String, source: Box<candle_core::Error> },
    #[error("reward `{reward}` of prompt {prompt_id:?} sample {sample_idx} is not finite")]
    NonFinite { reward: String, prompt_id: String, sample_idx: u32 },
    #[error(transparent)]
    Core(#[from] rbon_core::CoreError),
}

pub(crate) fn candle(ctx: &str) -> impl FnOnce(candle_core::Error) -> ScoreError + '_ {
    move |source| ScoreError::Candle { context: ctx.to_owned(), source: Box::new(source) }
}

/// Input indices grouped for batching: sorted by length (then index) so rows of one batch pad
/// little, each batch holding at most `budget` padded tokens (at least one row).
pub(crate) fn length_batches(lens: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| (lens[i], i));
    let mut out = Vec::new();
    let mut start = 0;
    while start < order.len() {
        // Sorted by length: a batch's last row is its longest.
        let mut end = start + 1;
        while end < order.len() && (end + 1 - start) * lens[order[end]] <= budget.max(1) {
            end += 1;
        }
        out.push(order[start..end].to_vec());
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn batches_respect_the_budget_and_cover_every_input() {
        let lens = [5, 1, 9, 3, 3, 20];
        let b = super::length_batches(&lens, 10);
        assert_eq!(b, vec![vec![1, 3, 4], vec![0], vec![2], vec![5]]);
        assert_eq!(super::length_batches(&lens, 1).len(), 6);
    }
}
