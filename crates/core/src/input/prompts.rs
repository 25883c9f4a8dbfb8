//! Prompts as `InputConfig` describes them: a prompt or messages column of any supported file,
//! HH-RLHF transcripts, stable ids.

use std::collections::HashMap;

use arrow_schema::{Field, Schema};

use super::columns::{Column, Conversation, Kind};
use super::files::{FirstRecord, JsonLayout, for_each_batch, resolve_files};
use super::hh_rlhf::hh_rlhf_prompt;
use super::{InputConfig, InputFormat};
use crate::error::{CoreError, Result};
use crate::messages::{Message, canonical, check_conversation};
use crate::schema::PROMPT;
use crate::seed::sha256_hex;

/// One prompt read from the input.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRow {
    pub prompt_id: String,
    pub messages: Vec<Message>,
    /// File and line/row it came from, for error messages.
    pub location: String,
}

/// The default id of a prompt: SHA-256 of its canonical form.
pub fn prompt_id_of(messages: &[Message]) -> String {
    sha256_hex(canonical(messages).as_bytes())
}

/// Reads prompts as `InputConfig` describes them. Duplicate ids are an error naming both rows.
pub fn read_prompts(cfg: &InputConfig) -> Result<Vec<PromptRow>> {
    let mut out = Vec::new();
    for_each_prompt(cfg, |row| {
        out.push(row);
        Ok(true)
    })?;
    Ok(out)
}

/// The columns a prompts file is read through.
struct PromptColumns {
    column: String,
    kind: Kind,
    id: Option<String>,
    hh_rlhf: bool,
}

impl PromptColumns {
    fn new(cfg: &InputConfig) -> Self {
        let (column, messages_only) = match (&cfg.messages_column, &cfg.prompt_column, cfg.format) {
            (Some(m), _, _) => (m.clone(), true),
            (None, Some(p), _) => (p.clone(), false),
            (None, None, InputFormat::HhRlhf) => ("chosen".to_owned(), false),
            (None, None, InputFormat::Auto) => (PROMPT.to_owned(), false),
        };
        Self {
            column,
            kind: Kind::Conversation { messages_only },
            id: cfg.id_column.clone(),
            hh_rlhf: cfg.format == InputFormat::HhRlhf,
        }
    }

    fn messages(&self, c: Conversation, loc: &str) -> Result<Vec<Message>> {
        match c {
            Conversation::Text(t) if self.hh_rlhf => hh_rlhf_prompt(&t).ok_or_else(|| {
                CoreError::data(
                    loc,
                    format!(
                        "column `{}` is not an HH-RLHF transcript (\\n\\nHuman: … \\n\\nAssistant: …)",
                        self.column
                    ),
                )
            }),
            c => Ok(c.into_messages()),
        }
    }
}

impl JsonLayout for PromptColumns {
    fn schema(&self, first: &FirstRecord) -> Result<Schema> {
        let mut fields = Vec::new();
        for (name, kind, what) in [(Some(&self.column), self.kind, "column"), (self.id.as_ref(), Kind::Id, "id column")]
        {
            let Some(name) = name else { continue };
            let Some(found) = first.kind(name) else {
                return Err(CoreError::data(
                    &first.location,
                    format!("no {what} `{name}`; columns: {}", first.names()),
                ));
            };
            fields.push(Field::new(name.as_str(), kind.json_type(Some(found)), true));
        }
        Ok(Schema::new(fields))
    }

    fn expected(&self, field: &str) -> String {
        let kind = if field == self.column { self.kind } else { Kind::Id };
        kind.expected(field)
    }
}

/// Streams prompts as `InputConfig` describes them, in input order, to `f` (which returns false
/// to stop early); returns how many were passed. Only the ids seen so far are kept (a 16-byte
/// digest and the row's location each), so memory does not grow with the prompts' text.
/// Duplicate ids are an error naming both rows; an input without prompts is an error.
pub fn for_each_prompt(cfg: &InputConfig, mut f: impl FnMut(PromptRow) -> Result<bool>) -> Result<usize> {
    let spec = cfg.path.as_deref().ok_or_else(|| CoreError::data("input.path", "no prompt input configured"))?;
    let files = resolve_files(spec).map_err(|m| CoreError::data("input.path", m))?;
    let limit = cfg.limit.map(|l| l as usize).unwrap_or(usize::MAX);
    let layout = PromptColumns::new(cfg);
    let mut count = 0usize;
    let mut seen: HashMap<[u8; 16], String> = HashMap::new();
    let mut more = true;
    for file in &files {
        for_each_batch(file, &layout, |batch| {
            let prompts = Column::get(&batch, &layout.column, layout.kind)?;
            let ids = match &layout.id {
                Some(c) => Some(Column::find(&batch, c, Kind::Id)?.ok_or_else(|| {
                    CoreError::data(
                        batch.column_location(),
                        format!("no id column `{c}`; columns: {}", super::columns::columns_of(&batch)),
                    )
                })?),
                None => None,
            };
            for r in 0..batch.data.num_rows() {
                let location = batch.location(r);
                let messages = layout.messages(prompts.conversation(r, &location)?, &location)?;
                check_conversation(&messages).map_err(|m| CoreError::data(&location, m))?;
                let prompt_id = match &ids {
                    Some(ids) => ids.text(r, &location)?,
                    None => prompt_id_of(&messages),
                };
                let digest = crate::seed::digest16(prompt_id.as_bytes());
                if let Some(first) = seen.get(&digest) {
                    return Err(CoreError::data(
                        &location,
                        format!(
                            "duplicate prompt id {prompt_id:?}: also at {first} (give each prompt a distinct id, or drop the repeat)"
                        ),
                    ));
                }
                seen.insert(digest, location.clone());
                count += 1;
                more = f(PromptRow { prompt_id, messages, location })? && count < limit;
                if !more {
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        if !more {
            break;
        }
    }
    if count == 0 {
        return Err(CoreError::data(spec, "the input holds no prompts"));
    }
    Ok(count)
}
