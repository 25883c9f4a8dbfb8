//! The one validator: what each column of a user's file must hold, the Arrow type it is read
//! as, and what a bad value is told. Parquet batches (as stored, cast to that type) and JSON
//! batches (decoded into it) are read through the same [`Column`].

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type};
use arrow_array::{Array, ArrayRef};
use arrow_schema::{DataType, Field};

use super::files::{Batch, JsonKind};
use crate::error::{CoreError, Result};
use crate::messages::{Message, is_messages_type, json_messages_type, read_messages};

/// What a column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A prompt id: text, or a number read as its JSON text (`7`, `2.5`; never truncated).
    Id,
    Text,
    /// A conversation: text (one user turn) or a list of `{role, content}` messages
    /// (`{from, value}` as ShareGPT writes them); only the list when `messages_only`.
    Conversation {
        messages_only: bool,
    },
    /// An integer in `0..2^32`.
    Index,
    /// A non-negative integer.
    Count,
    /// A finite number.
    Float,
    /// A list of finite 32-bit floats.
    Vector,
}

/// The most bytes of text one value (a prompt's conversation, a response, an id) may hold: 4 MiB,
/// about a million tokens, more than any model's context.
pub const MAX_TEXT_BYTES: usize = 4 << 20;

/// A conversation as stored: text, or messages.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Conversation {
    Text(String),
    Messages(Vec<Message>),
}

impl Conversation {
    /// As messages: text is one user turn.
    pub(crate) fn into_messages(self) -> Vec<Message> {
        match self {
            Self::Text(t) => vec![Message::user(t)],
            Self::Messages(m) => m,
        }
    }
}

fn list_of(t: DataType) -> DataType {
    DataType::List(Arc::new(Field::new("item", t, true)))
}

impl Kind {
    /// What a value of column `name` must be.
    pub(crate) fn expected(self, name: &str) -> String {
        match self {
            Self::Id => format!("`{name}` must be a string or a number"),
            Self::Text => format!("`{name}` must be text"),
            Self::Conversation { messages_only: false } => {
                format!("`{name}` must be text or a non-empty list of {{role, content}} messages")
            }
            Self::Conversation { messages_only: true } => {
                format!("`{name}` must be a non-empty list of {{role, content}} messages")
            }
            Self::Index => format!("`{name}` must be a non-negative integer below 2^32"),
            Self::Count => format!("`{name}` must be a non-negative integer"),
            Self::Float => format!("`{name}` is null or not a number"),
            Self::Vector => format!("`{name}` must be a list of numbers"),
        }
    }

    /// The type JSON values are decoded as, given the kind of the first record's value.
    pub(crate) fn json_type(self, first: Option<JsonKind>) -> DataType {
        match (self, first) {
            // Integers too are decoded as numbers, so that 1.5 is caught rather than truncated.
            (Self::Float | Self::Index | Self::Count, _) => DataType::Float64,
            (Self::Id | Self::Text, _) => DataType::Utf8,
            (Self::Conversation { messages_only: true }, _) | (Self::Conversation { .. }, Some(JsonKind::Array)) => {
                json_messages_type()
            }
            (Self::Conversation { .. }, _) => DataType::Utf8,
            // Decoded wide, so that a value beyond f32's range is caught rather than clipped.
            (Self::Vector, _) => list_of(DataType::Float64),
        }
    }

    /// The type a stored column is cast to before reading; `None` keeps it (conversations).
    fn read_type(self, stored: &DataType) -> Option<DataType> {
        match self {
            Self::Id | Self::Text => Some(DataType::Utf8),
            Self::Conversation { .. } if is_messages_type(stored) => None,
            Self::Conversation { .. } => Some(DataType::Utf8),
            // Exact for every integer a u32 can hold.
            Self::Index | Self::Count | Self::Float => Some(DataType::Float64),
            Self::Vector => Some(list_of(DataType::Float32)),
        }
    }
}

fn is_text(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

/// One column of a batch, read as its [`Kind`]; every bad value is an error naming the row.
pub(crate) struct Column {
    name: String,
    kind: Kind,
    array: ArrayRef,
}

/// The columns of a batch, listed for messages.
pub(crate) fn columns_of(batch: &Batch) -> String {
    batch.data.schema().fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
}

impl Column {
    /// Column `name` of `batch`, or `None` when the batch has none.
    pub(crate) fn find(batch: &Batch, name: &str, kind: Kind) -> Result<Option<Self>> {
        let Some(stored) = batch.data.column_by_name(name) else { return Ok(None) };
        let t = stored.data_type();
        let fits = match kind {
            Kind::Conversation { messages_only } => is_messages_type(t) || (!messages_only && is_text(t)),
            _ => true,
        };
        let list = "list<struct<role, content>>";
        if !fits {
            let want = if matches!(kind, Kind::Conversation { messages_only: true }) {
                list.to_owned()
            } else {
                format!("text or {list}")
            };
            return Err(CoreError::data(
                batch.column_location(),
                format!("column `{name}` has type {t}; expected {want}"),
            ));
        }
        let array = match kind.read_type(t) {
            Some(want) => arrow_cast::cast(stored, &want).map_err(|e| {
                CoreError::data(
                    batch.column_location(),
                    format!("column `{name}` has type {t}, which cannot be read as {want}: {e}"),
                )
            })?,
            None => stored.clone(),
        };
        Ok(Some(Self { name: name.to_owned(), kind, array }))
    }

    /// Column `name` of `batch`; its absence is an error listing the columns there are.
    pub(crate) fn get(batch: &Batch, name: &str, kind: Kind) -> Result<Self> {
        Self::find(batch, name, kind)?.ok_or_else(|| {
            CoreError::data(batch.column_location(), format!("no column `{name}`; columns: {}", columns_of(batch)))
        })
    }

    fn bad(&self, loc: &str) -> CoreError {
        CoreError::data(loc, self.kind.expected(&self.name))
    }

    fn missing(&self, r: usize, loc: &str) -> Result<()> {
        if self.array.is_null(r) {
            let message = match self.kind {
                Kind::Float | Kind::Index | Kind::Count => self.kind.expected(&self.name),
                _ => format!("`{}` is missing or null", self.name),
            };
            return Err(CoreError::data(loc, message));
        }
        Ok(())
    }

    /// Id or text of row `r`.
    pub(crate) fn text(&self, r: usize, loc: &str) -> Result<String> {
        self.missing(r, loc)?;
        let t = self.array.as_string::<i32>().value(r);
        self.within_limit(t.len(), loc)?;
        Ok(t.to_owned())
    }

    pub(crate) fn conversation(&self, r: usize, loc: &str) -> Result<Conversation> {
        self.missing(r, loc)?;
        if is_text(self.array.data_type()) {
            let t = self.array.as_string::<i32>().value(r);
            self.within_limit(t.len(), loc)?;
            return Ok(Conversation::Text(t.to_owned()));
        }
        match read_messages(self.array.as_ref(), r) {
            Some(m) if !m.is_empty() => {
                self.within_limit(m.iter().map(|m| m.content.len()).sum(), loc)?;
                Ok(Conversation::Messages(m))
            }
            _ => Err(self.bad(loc)),
        }
    }

    /// A text value (or a conversation's contents) of at most [`MAX_TEXT_BYTES`].
    fn within_limit(&self, bytes: usize, loc: &str) -> Result<()> {
        if bytes > MAX_TEXT_BYTES {
            return Err(CoreError::data(
                loc,
                format!("`{}` holds {bytes} bytes of text; a value is at most {MAX_TEXT_BYTES}", self.name),
            ));
        }
        Ok(())
    }

    pub(crate) fn index(&self, r: usize, loc: &str) -> Result<u32> {
        self.missing(r, loc)?;
        let x = self.array.as_primitive::<Float64Type>().value(r);
        if x.fract() != 0.0 || !(0.0..=f64::from(u32::MAX)).contains(&x) {
            return Err(self.bad(loc));
        }
        Ok(x as u32)
    }

    pub(crate) fn count(&self, r: usize, loc: &str) -> Result<u32> {
        self.index(r, loc)
    }

    pub(crate) fn float(&self, r: usize, loc: &str) -> Result<f64> {
        self.missing(r, loc)?;
        let x = self.array.as_primitive::<Float64Type>().value(r);
        if !x.is_finite() {
            return Err(CoreError::data(loc, format!("`{}` is {x}; it must be a finite number", self.name)));
        }
        Ok(x)
    }

    pub(crate) fn vector(&self, r: usize, loc: &str) -> Result<Vec<f32>> {
        self.missing(r, loc)?;
        let v = self.array.as_list::<i32>().value(r);
        let v = v.as_primitive::<Float32Type>();
        if v.null_count() > 0 || v.values().iter().any(|x| !x.is_finite()) {
            return Err(CoreError::data(loc, format!("`{}` must hold finite 32-bit floats only", self.name)));
        }
        Ok(v.values().to_vec())
    }
}
