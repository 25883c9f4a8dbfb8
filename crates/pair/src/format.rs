//! The shapes an export can take: conversational rows (TRL, OpenRLHF, and LLaMA-Factory through
//! `dataset_info.json`), standard rows rendered with the policy's chat template, and JSONL files.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, UInt32Type, UInt64Type};
use arrow_array::{Array, ArrayRef, RecordBatch, StringArray};
use arrow_schema::DataType;
use rbon_core::messages::{message_array, read_messages};
use rbon_core::schema::{self, CHOSEN, PROMPT, REJECTED};
use rbon_core::{CoreError, Message};

/// Renders conversations with the policy's chat template, for `pair.format: standard`. The
/// pair crate holds no model code: the runtime implements this over the policy's tokenizer
/// (`rbon_models::chat::ChatTokenizer::render`).
pub trait ChatRender: Send + Sync {
    /// The conversation rendered as the model sees it; with `add_generation_prompt`, followed by
    /// the opening of an assistant turn.
    fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String>;
    /// The text of the end-of-sequence token that trainers append to standard completions
    /// (TRL and OpenRLHF both do), e.g. `<|im_end|>`; `None` when the model has none.
    fn eos(&self) -> Option<String>;
}

/// A standard (plain-string) row: the rendered prompt with its generation prompt, and each
/// response as the rest of the rendered conversation, without the trailing EOS (the trainer adds
/// it; leaving it would double it).
pub fn standard_texts(
    render: &dyn ChatRender,
    prompt: &[Message],
    responses: [&str; 2],
) -> Result<(String, [String; 2]), String> {
    let p = render.render(prompt, true)?;
    let eos = render.eos();
    let mut out: [String; 2] = Default::default();
    for (slot, response) in out.iter_mut().zip(responses) {
        let mut conv = prompt.to_vec();
        conv.push(Message::assistant(response));
        let full = render.render(&conv, false)?;
        let rest = full.strip_prefix(p.as_str()).ok_or_else(|| {
            "the rendered prompt is not a prefix of the rendered conversation (the chat template \
             renders the prompt differently once a response follows), so prompt + response would \
             not be what the model saw"
                .to_owned()
        })?;
        let trimmed = rest.trim_end();
        let body = match eos.as_deref().filter(|e| !e.is_empty()) {
            Some(e) => trimmed.strip_suffix(e).unwrap_or(rest),
            None => rest,
        };
        *slot = body.to_owned();
    }
    Ok((p, out))
}

const PAIRS: &str = rbon_core::StageName::Pairs.as_str();

fn internal(what: &str, e: impl std::fmt::Display) -> CoreError {
    CoreError::internal(format!("{what}: {e}"))
}

fn messages_at(col: &dyn Array, r: usize) -> Result<Vec<Message>, CoreError> {
    read_messages(col, r).ok_or_else(|| CoreError::internal(format!("pairs: unreadable messages in row {r}")))
}

/// A pairs batch (schema::pairs_schema) in the conversational export shape: the same columns
/// plus `chosen_message` and `rejected_message`.
pub fn conversational_batch(batch: &RecordBatch) -> Result<RecordBatch, CoreError> {
    let col = |n: &str| batch.column_by_name(n).ok_or_else(|| internal(PAIRS, format!("no `{n}` column")));
    let (chosen, rejected) = (col(CHOSEN)?, col(REJECTED)?);
    let single = |c: &ArrayRef| -> Result<ArrayRef, CoreError> {
        let mut msgs = Vec::with_capacity(batch.num_rows());
        for r in 0..batch.num_rows() {
            let m = messages_at(c.as_ref(), r)?;
            let [one] = <[Message; 1]>::try_from(m)
                .map_err(|m| internal(PAIRS, format!("row {r}: {} messages where one is expected", m.len())))?;
            msgs.push(one);
        }
        Ok(message_array(msgs.iter()))
    };
    let mut cols = batch.columns().to_vec();
    cols.push(single(chosen)?);
    cols.push(single(rejected)?);
    RecordBatch::try_new(schema::pairs_export_schema(), cols).map_err(|e| internal(PAIRS, e))
}

/// A pairs batch in the standard export shape: prompt, chosen and rejected rendered to strings.
pub fn standard_batch(batch: &RecordBatch, render: &dyn ChatRender) -> Result<RecordBatch, CoreError> {
    let col = |n: &str| batch.column_by_name(n).ok_or_else(|| internal(PAIRS, format!("no `{n}` column")));
    let (prompt, chosen, rejected) = (col(PROMPT)?, col(CHOSEN)?, col(REJECTED)?);
    let ids = col(schema::PROMPT_ID)?.as_string::<i32>().clone();
    let n = batch.num_rows();
    let (mut p_out, mut c_out, mut r_out) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for r in 0..n {
        let p = messages_at(prompt.as_ref(), r)?;
        let c = messages_at(chosen.as_ref(), r)?;
        let j = messages_at(rejected.as_ref(), r)?;
        let text = |m: &[Message]| m.first().map(|m| m.content.clone()).unwrap_or_default();
        let (pt, [ct, rt]) = standard_texts(render, &p, [&text(&c), &text(&j)])
            .map_err(|e| CoreError::internal(format!("prompt {:?}: {e}", ids.value(r))))?;
        p_out.push(pt);
        c_out.push(ct);
        r_out.push(rt);
    }
    let out_schema = schema::pairs_standard_schema();
    let cols: Vec<ArrayRef> = out_schema
        .fields()
        .iter()
        .map(|f| -> Result<ArrayRef, CoreError> {
            Ok(match f.name().as_str() {
                PROMPT => Arc::new(StringArray::from(std::mem::take(&mut p_out))),
                CHOSEN => Arc::new(StringArray::from(std::mem::take(&mut c_out))),
                REJECTED => Arc::new(StringArray::from(std::mem::take(&mut r_out))),
                other => col(other)?.clone(),
            })
        })
        .collect::<Result<_, _>>()?;
    RecordBatch::try_new(out_schema, cols).map_err(|e| internal(PAIRS, e))
}

fn json_value(col: &dyn Array, r: usize) -> Result<serde_json::Value, CoreError> {
    use serde_json::Value;
    if col.is_null(r) {
        return Ok(Value::Null);
    }
    Ok(match col.data_type() {
        DataType::Utf8 => Value::from(col.as_string::<i32>().value(r)),
        DataType::Float64 => Value::from(col.as_primitive::<Float64Type>().value(r)),
        DataType::UInt32 => Value::from(col.as_primitive::<UInt32Type>().value(r)),
        DataType::UInt64 => Value::from(col.as_primitive::<UInt64Type>().value(r)),
        DataType::List(_) => serde_json::to_value(messages_at(col, r)?).map_err(|e| internal("jsonl", e))?,
        DataType::Struct(_) => {
            let s = col.as_struct();
            let field = |name: &str| {
                s.column_by_name(name).map(|c| c.as_string::<i32>().value(r).to_owned()).unwrap_or_default()
            };
            serde_json::to_value(Message::new(field(schema::ROLE), field(schema::CONTENT)))
                .map_err(|e| internal("jsonl", e))?
        }
        other => return Err(internal("jsonl", format!("no JSON form for a {other} column"))),
    })
}

/// The rows of a batch as JSON lines, keys in column order.
pub fn jsonl(batch: &RecordBatch) -> Result<String, CoreError> {
    let schema = batch.schema();
    let mut out = String::new();
    for r in 0..batch.num_rows() {
        out.push('{');
        for (i, (f, c)) in schema.fields().iter().zip(batch.columns()).enumerate() {
            let key = serde_json::to_string(f.name()).map_err(|e| internal("jsonl", e))?;
            let value = serde_json::to_string(&json_value(c.as_ref(), r)?).map_err(|e| internal("jsonl", e))?;
            let _ = write!(out, "{}{key}:{value}", if i > 0 { "," } else { "" });
        }
        out.push_str("}\n");
    }
    Ok(out)
}

/// LLaMA-Factory's entry for one file of a conversational export: sharegpt ranking format with
/// OpenAI-style tags, the prompt as `messages` and the single-message columns as chosen/rejected.
pub fn dataset_info_entry(file_name: &str) -> serde_json::Value {
    serde_json::json!({
        "file_name": file_name,
        "formatting": "sharegpt",
        "ranking": true,
        "columns": {
            "messages": schema::PROMPT,
            "chosen": schema::CHOSEN_MESSAGE,
            "rejected": schema::REJECTED_MESSAGE,
        },
        "tags": {
            "role_tag": schema::ROLE,
            "content_tag": schema::CONTENT,
            "user_tag": "user",
            "assistant_tag": "assistant",
            "system_tag": "system",
        },
    })
}

/// `pairs/dataset_info.json`: one entry per export file, named `<method>_beta=<β>` (with
/// `_part<i>` when an export has several files), paths relative to `pairs/`.
pub fn dataset_info(entries: &[(String, Vec<String>)]) -> String {
    let mut map = BTreeMap::new();
    for (name, files) in entries {
        for (i, f) in files.iter().enumerate() {
            let key = if files.len() == 1 { name.clone() } else { format!("{name}_part{i}") };
            map.insert(key, dataset_info_entry(f));
        }
    }
    let mut text = serde_json::to_string_pretty(&map).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A ChatML template, as Qwen models use.
    struct ChatMl;

    impl ChatRender for ChatMl {
        fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String> {
            let mut s = String::new();
            for m in messages {
                s.push_str(&format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content));
            }
            if add_generation_prompt {
                s.push_str("<|im_start|>assistant\n");
            }
            Ok(s)
        }
        fn eos(&self) -> Option<String> {
            Some("<|im_end|>".into())
        }
    }

    #[test]
    fn standard_texts_end_without_eos_so_trainers_do_not_double_it() {
        let prompt = [Message::new("system", "Be brief."), Message::user("Hi?")];
        let (p, [c, r]) = standard_texts(&ChatMl, &prompt, ["Hello.", "Go away"]).unwrap();
        assert_eq!(
            p,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(c, "Hello.");
        assert_eq!(r, "Go away");
        // What TRL builds for a standard row: prompt + completion + EOS, with one EOS.
        let full = format!("{p}{c}<|im_end|>");
        assert_eq!(
            full,
            ChatMl
                .render(&[prompt[0].clone(), prompt[1].clone(), Message::assistant("Hello.")], false)
                .unwrap()
                .trim_end()
        );
    }

    /// A template that renders a prompt differently when a response follows cannot be split.
    struct Inconsistent;

    impl ChatRender for Inconsistent {
        fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String> {
            Ok(format!("{}{}", messages.len(), if add_generation_prompt { ">" } else { "" }))
        }
        fn eos(&self) -> Option<String> {
            None
        }
    }

    #[test]
    fn a_prompt_that_is_not_a_prefix_is_an_error() {
        let err = standard_texts(&Inconsistent, &[Message::user("x")], ["a", "b"]).unwrap_err();
        assert!(err.contains("not a prefix"), "{err}");
    }

    #[test]
    fn dataset_info_names_each_file_and_uses_openai_tags() {
        let text = dataset_info(&[
            ("bon_beta=0".into(), vec!["bon/beta=0/train-00000-of-00001.parquet".into()]),
            ("rbon_kl_beta=0.5".into(), vec!["a.parquet".into(), "b.parquet".into()]),
        ]);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let e = &v["bon_beta=0"];
        assert_eq!(e["file_name"], "bon/beta=0/train-00000-of-00001.parquet");
        assert_eq!(e["ranking"], true);
        assert_eq!(e["formatting"], "sharegpt");
        assert_eq!(e["columns"]["messages"], "prompt");
        assert_eq!(e["columns"]["chosen"], "chosen_message");
        assert_eq!(e["tags"]["role_tag"], "role");
        assert_eq!(e["tags"]["assistant_tag"], "assistant");
        assert_eq!(v["rbon_kl_beta=0.5_part1"]["file_name"], "b.parquet");
    }
}
