//! Chat messages and their Arrow form, `list<struct<role, content>>`.

use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder, StructBuilder};
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, GenericListArray, OffsetSizeTrait, StructArray};
use arrow_schema::{DataType, Field};
use serde::{Deserialize, Serialize};

use crate::schema::{CONTENT, ROLE, message_fields};

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// The rule every conversation to answer follows, whether read as prompts or with
/// candidates: known roles (`system`, `user`, `assistant`), a system turn only first, then a user
/// turn first, no blank turn, and a user turn last (the one being answered).
pub fn check_conversation(messages: &[Message]) -> Result<(), String> {
    let Some(last) = messages.last() else { return Err("the conversation is empty".into()) };
    for (i, m) in messages.iter().enumerate() {
        match m.role.as_str() {
            "system" if i == 0 => {}
            "system" => return Err(format!("turn {i} is a `system` turn; only the first turn may be one")),
            "user" | "assistant" => {}
            r => return Err(format!("turn {i} has the unknown role `{r}` (use system, user or assistant)")),
        }
        if m.content.trim().is_empty() {
            return Err(format!("turn {i} (`{}`) is blank", m.role));
        }
    }
    let first = messages.iter().find(|m| m.role != "system");
    match first {
        None => return Err("the conversation has only a system turn; it needs a user turn to answer".into()),
        Some(m) if m.role != "user" => {
            return Err(format!("the conversation starts with a `{}` turn; it must start with a user turn", m.role));
        }
        _ => {}
    }
    if last.role != "user" {
        return Err(format!(
            "the prompt ends with a `{}` turn; it must end with the user turn being answered",
            last.role
        ));
    }
    Ok(())
}

/// The canonical text of a conversation, hashed for default prompt ids: compact JSON of
/// `[{"role": .., "content": ..}, ..]` with keys in that order.
pub fn canonical(messages: &[Message]) -> String {
    serde_json::to_string(messages).unwrap_or_default()
}

/// Builds a `list<struct<role, content>>` column, one conversation per row.
pub fn messages_array<'a>(rows: impl IntoIterator<Item = &'a [Message]>) -> ArrayRef {
    let fields = message_fields();
    let sb = StructBuilder::new(fields.clone(), vec![Box::new(StringBuilder::new()), Box::new(StringBuilder::new())]);
    let mut lb = ListBuilder::new(sb).with_field(Arc::new(Field::new("item", DataType::Struct(fields), false)));
    for row in rows {
        let sb = lb.values();
        for m in row {
            if let Some(b) = sb.field_builder::<StringBuilder>(0) {
                b.append_value(&m.role);
            }
            if let Some(b) = sb.field_builder::<StringBuilder>(1) {
                b.append_value(&m.content);
            }
            sb.append(true);
        }
        lb.append(true);
    }
    Arc::new(lb.finish())
}

/// Builds a `struct<role, content>` column, one message per row.
pub fn message_array<'a>(rows: impl IntoIterator<Item = &'a Message>) -> ArrayRef {
    let (roles, contents): (Vec<&str>, Vec<&str>) =
        rows.into_iter().map(|m| (m.role.as_str(), m.content.as_str())).unzip();
    let fields = message_fields();
    let cols: Vec<ArrayRef> =
        vec![Arc::new(arrow_array::StringArray::from(roles)), Arc::new(arrow_array::StringArray::from(contents))];
    Arc::new(StructArray::new(fields, cols, None))
}

/// The spellings of a message's fields: OpenAI's `role`/`content` and ShareGPT's `from`/`value`.
const ROLE_KEYS: [&str; 2] = [ROLE, "from"];
const CONTENT_KEYS: [&str; 2] = [CONTENT, "value"];

/// ShareGPT's role names, as chat templates spell them.
fn role_name(role: &str) -> &str {
    match role {
        "human" => "user",
        "gpt" => "assistant",
        r => r,
    }
}

/// The type JSON messages are decoded as: a list of structs with both spellings of each field,
/// whichever a message uses.
pub fn json_messages_type() -> DataType {
    let text = |n: &str| Field::new(n, DataType::Utf8, true);
    let fields: Vec<Field> = ROLE_KEYS.iter().chain(&CONTENT_KEYS).map(|n| text(n)).collect();
    DataType::List(Arc::new(Field::new("item", DataType::Struct(fields.into()), true)))
}

/// Reads conversation `row` of a messages column (list or large list of struct<role, content>
/// or struct<from, value>, string fields of any width). `None` when the column has another type,
/// the row is null, or a message lacks its role or content.
pub fn read_messages(col: &dyn Array, row: usize) -> Option<Vec<Message>> {
    if col.is_null(row) {
        return None;
    }
    match col.data_type() {
        DataType::List(_) => from_list(col.as_list::<i32>(), row),
        DataType::LargeList(_) => from_list(col.as_list::<i64>(), row),
        _ => None,
    }
}

/// The columns of a message struct under either spelling, as text.
fn text_fields(st: &StructArray, keys: [&str; 2]) -> Vec<ArrayRef> {
    keys.iter().filter_map(|k| st.column_by_name(k)).filter_map(|c| arrow_cast::cast(c, &DataType::Utf8).ok()).collect()
}

fn from_list<O: OffsetSizeTrait>(list: &GenericListArray<O>, row: usize) -> Option<Vec<Message>> {
    let values = list.value(row);
    let st: &StructArray = values.as_struct_opt()?;
    let (roles, contents) = (text_fields(st, ROLE_KEYS), text_fields(st, CONTENT_KEYS));
    let first = |cols: &[ArrayRef], i: usize| {
        cols.iter().map(|c| c.as_string::<i32>()).find(|c| c.is_valid(i)).map(|c| c.value(i).to_owned())
    };
    (0..st.len())
        .map(|i| {
            if st.is_null(i) {
                return None;
            }
            Some(Message::new(role_name(&first(&roles, i)?), first(&contents, i)?))
        })
        .collect()
}

/// Whether a column type can hold conversations.
pub fn is_messages_type(t: &DataType) -> bool {
    match t {
        DataType::List(f) | DataType::LargeList(f) => match f.data_type() {
            DataType::Struct(fs) => {
                ROLE_KEYS.iter().any(|k| fs.find(k).is_some()) && CONTENT_KEYS.iter().any(|k| fs.find(k).is_some())
            }
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let a = vec![Message::new("system", "s"), Message::user("hi")];
        let b = vec![Message::user("yo")];
        let arr = messages_array([a.as_slice(), b.as_slice()]);
        assert_eq!(arr.data_type(), &crate::schema::messages_type());
        assert_eq!(read_messages(arr.as_ref(), 0), Some(a.clone()));
        assert_eq!(read_messages(arr.as_ref(), 1), Some(b));
        assert_eq!(canonical(&a), r#"[{"role":"system","content":"s"},{"role":"user","content":"hi"}]"#);
    }
}
