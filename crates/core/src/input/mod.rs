//! Reading what users bring: prompts (JSONL, JSON, Parquet; a file, a directory or a glob; a
//! prompt or messages column; HH-RLHF transcripts) and candidates made elsewhere (long format,
//! Parquet or JSONL). Every file becomes Arrow record batches ([`files`]: Parquet as stored,
//! JSON decoded by arrow-json), read through one validator ([`columns`]); every data error names
//! the file and the line or row to fix.

mod candidates;
mod columns;
mod files;
mod hh_rlhf;
mod prompts;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use candidates::{
    CandidateGroup, CandidateSample, Candidates, CandidatesHeader, CandidatesIndex, candidates_header, read_candidates,
    scan_candidates, stream_candidates,
};
pub use files::{FileKind, file_kind, resolve_files};
pub use hh_rlhf::hh_rlhf_prompt;
pub use prompts::{PromptRow, for_each_prompt, prompt_id_of, read_prompts};

fn default_shard_size() -> u64 {
    32
}

/// How prompts are laid out in the input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputFormat {
    /// A prompt column (text or messages) or a messages column.
    #[default]
    Auto,
    /// Anthropic HH-RLHF transcripts (`\n\nHuman: … \n\nAssistant: …`); the prompt is every turn
    /// before the last `Assistant:`.
    HhRlhf,
}

/// The `input` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// Prompts: a `.jsonl`, `.jsonl.gz`, `.json` or `.parquet` file, a directory of them, or a
    /// glob. Relative paths are taken from the working directory.
    #[serde(default)]
    pub path: Option<String>,
    /// Column holding the prompt: text (one user turn) or a list of `{role, content}` messages.
    /// Default: `prompt` (`chosen` for `format: hh-rlhf`).
    #[serde(default)]
    pub prompt_column: Option<String>,
    /// Column holding a list of `{role, content}` messages; the alternative to `prompt_column`.
    #[serde(default)]
    pub messages_column: Option<String>,
    /// Column holding a stable prompt id. Default: SHA-256 of the canonical prompt.
    #[serde(default)]
    pub id_column: Option<String>,
    /// `auto` or `hh-rlhf`.
    #[serde(default)]
    pub format: InputFormat,
    /// Use only the first K prompts.
    #[serde(default)]
    pub limit: Option<u64>,
    /// Prompts per shard, the unit of work, resume and distribution.
    #[serde(default = "default_shard_size")]
    pub shard_size: u64,
    /// Candidates made elsewhere (long format, Parquet or JSONL): start at selection.
    #[serde(default)]
    pub candidates: Option<String>,
}

impl Default for InputConfig {
    fn default() -> Self {
        Self {
            path: None,
            prompt_column: None,
            messages_column: None,
            id_column: None,
            format: InputFormat::Auto,
            limit: None,
            shard_size: default_shard_size(),
            candidates: None,
        }
    }
}
