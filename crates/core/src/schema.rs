//! Column names and Arrow schemas of the run directory's tables (DESIGN §8). The names are part
//! of the public interface: trainers, the report and users' own scripts read them.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef};

pub const PROMPT_ID: &str = "prompt_id";
pub const PROMPT: &str = "prompt";
pub const SAMPLE_IDX: &str = "sample_idx";
pub const RESPONSE: &str = "response";
pub const TOKEN_IDS: &str = "token_ids";
pub const NUM_TOKENS: &str = "num_tokens";
pub const FINISH_REASON: &str = "finish_reason";
pub const LOGPROB: &str = "logprob";
pub const SEED: &str = "seed";
pub const EMBEDDING: &str = "embedding";
pub const REWARD_PREFIX: &str = "reward_";
pub const METHOD: &str = "method";
pub const BETA: &str = "beta";
pub const INDEX: &str = "index";
/// The runner-up under the same objective (what `pair.rejected: second` takes).
pub const SECOND: &str = "second";
pub const OBJECTIVE: &str = "objective";
pub const CHOSEN: &str = "chosen";
pub const REJECTED: &str = "rejected";
pub const CHOSEN_INDEX: &str = "chosen_index";
pub const REJECTED_INDEX: &str = "rejected_index";
pub const SCORE_CHOSEN: &str = "score_chosen";
pub const SCORE_REJECTED: &str = "score_rejected";
pub const MARGIN: &str = "margin";
/// The chosen and rejected responses as one message each (`struct<role, content>`), the shape
/// LLaMA-Factory's sharegpt ranking format requires, beside TRL's one-message lists.
pub const CHOSEN_MESSAGE: &str = "chosen_message";
pub const REJECTED_MESSAGE: &str = "rejected_message";
pub const ROLE: &str = "role";
pub const CONTENT: &str = "content";

/// `reward_<name>`.
pub fn reward_column(name: &str) -> String {
    format!("{REWARD_PREFIX}{name}")
}

/// The reward model a column belongs to: `reward_proxy` → `proxy`; `None` for other columns.
pub fn reward_name(column: &str) -> Option<&str> {
    column.strip_prefix(REWARD_PREFIX)
}

/// The fields of one chat message: `struct<role: string, content: string>`.
pub fn message_fields() -> Fields {
    Fields::from(vec![Field::new(ROLE, DataType::Utf8, false), Field::new(CONTENT, DataType::Utf8, false)])
}

/// `list<struct<role, content>>`, the conversational type TRL detects.
pub fn messages_type() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Struct(message_fields()), false)))
}

/// prompts: prompt_id, prompt (messages).
pub fn prompts_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(PROMPT_ID, DataType::Utf8, false),
        Field::new(PROMPT, messages_type(), false),
    ]))
}

/// samples: one row per (prompt_id, sample_idx). Imported candidates may lack token ids,
/// finish reasons, log-probs and seeds, hence the nullable columns.
pub fn samples_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(PROMPT_ID, DataType::Utf8, false),
        Field::new(SAMPLE_IDX, DataType::UInt32, false),
        Field::new(RESPONSE, DataType::Utf8, false),
        Field::new(TOKEN_IDS, DataType::List(Arc::new(Field::new("item", DataType::UInt32, false))), true),
        Field::new(NUM_TOKENS, DataType::UInt32, true),
        Field::new(FINISH_REASON, DataType::Utf8, true),
        Field::new(LOGPROB, DataType::Float64, true),
        Field::new(SEED, DataType::UInt64, true),
    ]))
}

/// The fixed-size-list type of an embedding column of dimension `dim`.
pub fn embedding_type(dim: i32) -> DataType {
    DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, false)), dim)
}

/// scores: prompt_id, sample_idx, reward_<name> per reward model, and the embedding when there is one.
pub fn scores_schema(rewards: &[String], embedding_dim: Option<i32>) -> SchemaRef {
    let mut fields =
        vec![Field::new(PROMPT_ID, DataType::Utf8, false), Field::new(SAMPLE_IDX, DataType::UInt32, false)];
    for r in rewards {
        fields.push(Field::new(reward_column(r), DataType::Float64, false));
    }
    if let Some(d) = embedding_dim {
        fields.push(Field::new(EMBEDDING, embedding_type(d), false));
    }
    Arc::new(Schema::new(fields))
}

/// selections: one row per (prompt_id, method, beta). `index` is null for the `random`
/// baseline, whose rewards are the means over all N samples.
pub fn selections_schema(rewards: &[String]) -> SchemaRef {
    let mut fields = vec![
        Field::new(PROMPT_ID, DataType::Utf8, false),
        Field::new(METHOD, DataType::Utf8, false),
        Field::new(BETA, DataType::Float64, false),
        Field::new(INDEX, DataType::UInt32, true),
        Field::new(SECOND, DataType::UInt32, true),
        Field::new(OBJECTIVE, DataType::Float64, false),
    ];
    for r in rewards {
        fields.push(Field::new(reward_column(r), DataType::Float64, false));
    }
    Arc::new(Schema::new(fields))
}

/// SFT rows (BoNBoN's SFT term): TRL's conversational prompt-completion format.
pub fn sft_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(PROMPT_ID, DataType::Utf8, false),
        Field::new(METHOD, DataType::Utf8, false),
        Field::new(BETA, DataType::Float64, false),
        Field::new(PROMPT, messages_type(), false),
        Field::new(COMPLETION, messages_type(), false),
        Field::new(SAMPLE_IDX, DataType::UInt32, false),
    ]))
}

/// vBoN rows: every sample with its log π_ref and BoN weight.
pub fn vbon_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(PROMPT_ID, DataType::Utf8, false),
        Field::new(SAMPLE_IDX, DataType::UInt32, false),
        Field::new(PROMPT, messages_type(), false),
        Field::new(COMPLETION, messages_type(), false),
        Field::new(LOGPROB, DataType::Float64, true),
        Field::new(REWARD, DataType::Float64, false),
        Field::new(REWARD_CDF, DataType::Float64, false),
        Field::new(LOG_WEIGHT, DataType::Float64, false),
    ]))
}

/// Columns of the SFT and vBoN exports.
pub const COMPLETION: &str = "completion";
pub const REWARD: &str = "reward";
pub const REWARD_CDF: &str = "reward_cdf";
pub const LOG_WEIGHT: &str = "log_weight";

/// pairs: TRL conversational rows with an explicit prompt, plus metadata.
pub fn pairs_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(PROMPT_ID, DataType::Utf8, false),
        Field::new(METHOD, DataType::Utf8, false),
        Field::new(BETA, DataType::Float64, false),
        Field::new(PROMPT, messages_type(), false),
        Field::new(CHOSEN, messages_type(), false),
        Field::new(REJECTED, messages_type(), false),
        Field::new(CHOSEN_INDEX, DataType::UInt32, false),
        Field::new(REJECTED_INDEX, DataType::UInt32, false),
        Field::new(SCORE_CHOSEN, DataType::Float64, false),
        Field::new(SCORE_REJECTED, DataType::Float64, false),
        Field::new(MARGIN, DataType::Float64, false),
    ]))
}

/// One chat message, `struct<role, content>`.
pub fn message_type() -> DataType {
    DataType::Struct(message_fields())
}

/// Conversational exports: the pairs columns, then `chosen_message` and `rejected_message` (the
/// same responses as single messages, for LLaMA-Factory).
pub fn pairs_export_schema() -> SchemaRef {
    let mut fields: Vec<Field> = pairs_schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(CHOSEN_MESSAGE, message_type(), false));
    fields.push(Field::new(REJECTED_MESSAGE, message_type(), false));
    Arc::new(Schema::new(fields))
}

/// Standard-format exports: prompt, chosen and rejected as plain strings rendered with the
/// policy's chat template, with the pairs' metadata.
pub fn pairs_standard_schema() -> SchemaRef {
    let fields: Vec<Field> = pairs_schema()
        .fields()
        .iter()
        .map(|f| match f.name().as_str() {
            PROMPT | CHOSEN | REJECTED => Field::new(f.name(), DataType::Utf8, false),
            _ => f.as_ref().clone(),
        })
        .collect();
    Arc::new(Schema::new(fields))
}
