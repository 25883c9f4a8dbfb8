//! Input files as Arrow record batches: Parquet as stored, JSON and JSONL decoded by arrow-json
//! into the schema the reader asks for. Every row keeps where it came from (file and line,
//! record or row), so the one validator ([`super::columns`]) names what to fix.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_json::ReaderBuilder;
use arrow_json::reader::Decoder;
use arrow_schema::{ArrowError, Schema, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

use crate::error::{CoreError, Result};

/// Rows per batch, for every file kind.
const BATCH_ROWS: usize = 1024;

/// The file kinds we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Jsonl,
    Json,
    Parquet,
}

/// The kind of an input file from its name (`.gz` allowed on JSON and JSONL).
pub fn file_kind(path: &Path) -> Option<FileKind> {
    let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
    let name = name.strip_suffix(".gz").unwrap_or(&name);
    if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
        Some(FileKind::Jsonl)
    } else if name.ends_with(".json") {
        Some(FileKind::Json)
    } else if name.ends_with(".parquet") {
        Some(FileKind::Parquet)
    } else {
        None
    }
}

/// Expands an input path: a file, every supported file in a directory (sorted), or a glob's
/// matches (sorted). No file is an error.
pub fn resolve_files(spec: &str) -> std::result::Result<Vec<PathBuf>, String> {
    let p = Path::new(spec);
    let mut files = if p.is_file() {
        return Ok(vec![p.to_owned()]);
    } else if p.is_dir() {
        let rd = std::fs::read_dir(p).map_err(|e| format!("cannot list directory {spec}: {e}"))?;
        rd.filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| f.is_file() && file_kind(f).is_some())
            .collect::<Vec<_>>()
    } else if spec.contains(['*', '?', '[']) {
        glob::glob(spec)
            .map_err(|e| format!("bad glob pattern {spec:?}: {e}"))?
            .filter_map(|e| e.ok())
            .filter(|f| f.is_file())
            .collect()
    } else {
        return Err(format!("no such file or directory: {spec}"));
    };
    files.sort();
    if files.is_empty() {
        return Err(format!("{spec} matches no .jsonl, .json or .parquet file"));
    }
    if let Some(bad) = files.iter().find(|f| file_kind(f).is_none()) {
        return Err(format!("{} is not a .jsonl, .json or .parquet file", bad.display()));
    }
    Ok(files)
}

fn open_text(path: &Path) -> Result<Box<dyn BufRead>> {
    let f = File::open(path).map_err(|e| CoreError::io(path, e))?;
    let gz = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gz"));
    Ok(if gz { Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(f))) } else { Box::new(BufReader::new(f)) })
}

/// Where the rows of a batch came from.
#[derive(Debug, Clone)]
enum Origin {
    /// Parquet: 0-based rows from this one.
    Rows(usize),
    /// JSONL: the 1-based line of each row.
    Lines(Vec<usize>),
    /// A JSON array: 0-based records from this one.
    Records(usize),
}

/// One batch of a user's file, and where each of its rows came from.
#[derive(Debug, Clone)]
pub(crate) struct Batch {
    pub(crate) data: RecordBatch,
    file: Arc<str>,
    origin: Origin,
}

impl Batch {
    /// The file and line (JSONL, 1-based), record (JSON array, 0-based) or row (Parquet, 0-based)
    /// of row `r`.
    pub(crate) fn location(&self, r: usize) -> String {
        match &self.origin {
            Origin::Rows(r0) => format!("{}: row {}", self.file, r0 + r),
            Origin::Lines(lines) => format!("{}:{}", self.file, lines[r]),
            Origin::Records(i0) => format!("{}: record {}", self.file, i0 + r),
        }
    }

    /// Where a problem of a whole column is reported: the file, or for JSON its first record.
    pub(crate) fn column_location(&self) -> String {
        match &self.origin {
            Origin::Rows(_) => self.file.to_string(),
            Origin::Lines(_) | Origin::Records(_) => self.location(0),
        }
    }
}

/// The kind of a JSON value, enough to choose the Arrow type a field is decoded as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JsonKind {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

impl JsonKind {
    fn of(v: &Value) -> Self {
        match v {
            Value::Null => Self::Null,
            Value::Bool(_) => Self::Bool,
            Value::Number(_) => Self::Number,
            Value::String(_) => Self::String,
            Value::Array(_) => Self::Array,
            Value::Object(_) => Self::Object,
        }
    }
}

/// The fields of a JSON file's first record, sorted by name, with the kind of each value.
#[derive(Debug, Clone)]
pub(crate) struct FirstRecord {
    pub(crate) fields: Vec<(String, JsonKind)>,
    pub(crate) location: String,
}

impl FirstRecord {
    fn of(object: &serde_json::Map<String, Value>, location: String) -> Self {
        Self { fields: object.iter().map(|(k, v)| (k.clone(), JsonKind::of(v))).collect(), location }
    }

    /// The kind of `field`'s value; `None` when the record lacks it.
    pub(crate) fn kind(&self, field: &str) -> Option<JsonKind> {
        self.fields.iter().find(|(k, _)| k == field).map(|(_, t)| *t)
    }

    pub(crate) fn names(&self) -> String {
        self.fields.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// How a reader wants JSON decoded.
pub(crate) trait JsonLayout {
    /// The Arrow schema to decode every record into, chosen from the first record. Fields not in
    /// it are ignored.
    fn schema(&self, first: &FirstRecord) -> Result<Schema>;
    /// Fields that count only when the first record has them, so that a later record holding one
    /// is an error rather than silently ignored.
    fn first_only(&self, _field: &str) -> bool {
        false
    }
    /// What a value of `field` must be, told when arrow-json cannot decode one.
    fn expected(&self, field: &str) -> String;
}

/// The first record of a JSON or JSONL file (`None` for a file without records).
pub(crate) fn first_record(path: &Path) -> Result<Option<FirstRecord>> {
    let file = path.display().to_string();
    let mut first = None;
    read_json(path, &mut |at, record| {
        if let Record::First(object, _) = record {
            first = Some(FirstRecord::of(&object, at.location(&file)));
        }
        Ok(false)
    })?;
    Ok(first)
}

/// Calls `f` with each batch of `path` (bounded memory for Parquet and JSONL; a JSON array is
/// parsed whole). `f` returns false to stop.
pub(crate) fn for_each_batch(
    path: &Path,
    layout: &dyn JsonLayout,
    mut f: impl FnMut(Batch) -> Result<bool>,
) -> Result<()> {
    let file: Arc<str> = path.display().to_string().into();
    if file_kind(path) == Some(FileKind::Parquet) {
        return for_each_parquet_batch(path, |data, row0| {
            f(Batch { data, file: file.clone(), origin: Origin::Rows(row0) })
        });
    }
    let mut json = JsonBatches { file: file.clone(), layout, schema: None, first: HashSet::new(), pending: Vec::new() };
    let mut more = true;
    read_json(path, &mut |at, record| {
        let loc = at.location(&file);
        let row = match record {
            Record::First(object, line) => {
                json.start(&FirstRecord::of(&object, loc))?;
                match line {
                    Some(line) => Row::Line(line),
                    None => Row::Value(Value::Object(object)),
                }
            }
            Record::Line(line) => {
                json.check_fields(&loc, &line)?;
                Row::Line(line)
            }
            Record::Element(v) => {
                json.check_value_fields(&loc, &v)?;
                Row::Value(v)
            }
        };
        json.pending.push((at, row));
        if json.pending.len() == BATCH_ROWS {
            more = f(json.flush()?)?;
        }
        Ok(more)
    })?;
    if more && !json.pending.is_empty() {
        f(json.flush()?)?;
    }
    Ok(())
}

/// Where a JSON record is: a 1-based line of a JSONL file, or a 0-based record of an array.
#[derive(Debug, Clone, Copy)]
enum At {
    Line(usize),
    Record(usize),
}

impl At {
    fn location(self, file: &str) -> String {
        match self {
            Self::Line(n) => format!("{file}:{n}"),
            Self::Record(i) => format!("{file}: record {i}"),
        }
    }
}

/// What [`read_json`] hands over: the first record parsed (its fields choose the schema), later
/// JSONL lines as text (arrow-json decodes them), later records of a JSON array parsed.
enum Record {
    /// The first record, and its line of a JSONL file.
    First(serde_json::Map<String, Value>, Option<String>),
    Line(String),
    Element(Value),
}

enum Row {
    Line(String),
    Value(Value),
}

/// Reads the records of a JSONL file, or a JSON file holding an array of objects (a `.json`
/// file that does not start with `[` is read as JSON lines, as `datasets` writes them).
fn read_json(path: &Path, f: &mut dyn FnMut(At, Record) -> Result<bool>) -> Result<()> {
    let shown = path.display().to_string();
    let mut reader = open_text(path)?;
    if file_kind(path) == Some(FileKind::Json) {
        let mut text = String::new();
        reader.read_to_string(&mut text).map_err(|e| CoreError::io(path, e))?;
        if text.trim_start().starts_with('[') {
            let rows: Vec<Value> = serde_json::from_str(&text).map_err(|e| {
                CoreError::data(format!("{shown}:{}:{}", e.line(), e.column()), format!("invalid JSON: {e}"))
            })?;
            for (i, v) in rows.into_iter().enumerate() {
                let record = match v {
                    Value::Object(m) if i == 0 => Record::First(m, None),
                    v @ Value::Object(_) => Record::Element(v),
                    _ => return Err(CoreError::data(At::Record(i).location(&shown), "expected a JSON object")),
                };
                if !f(At::Record(i), record)? {
                    break;
                }
            }
            return Ok(());
        }
        return read_lines(&shown, text.as_bytes(), f);
    }
    read_lines(&shown, reader, f)
}

fn read_lines(shown: &str, reader: impl BufRead, f: &mut dyn FnMut(At, Record) -> Result<bool>) -> Result<()> {
    let mut first = true;
    for (i, line) in reader.lines().enumerate() {
        let at = At::Line(i + 1);
        let line = line.map_err(|e| CoreError::data(at.location(shown), format!("cannot read: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let record = if first {
            first = false;
            let v = serde_json::from_str(&line)
                .map_err(|e| CoreError::data(at.location(shown), format!("invalid JSON: {e}")))?;
            match v {
                Value::Object(m) => Record::First(m, Some(line)),
                _ => return Err(CoreError::data(at.location(shown), "expected a JSON object on each line")),
            }
        } else {
            Record::Line(line)
        };
        if !f(at, record)? {
            break;
        }
    }
    Ok(())
}

/// Decodes JSON records into batches of the layout's schema.
struct JsonBatches<'a> {
    file: Arc<str>,
    layout: &'a dyn JsonLayout,
    schema: Option<SchemaRef>,
    /// The first record's fields.
    first: HashSet<String>,
    /// Records not yet decoded.
    pending: Vec<(At, Row)>,
}

impl JsonBatches<'_> {
    fn start(&mut self, first: &FirstRecord) -> Result<()> {
        self.schema = Some(Arc::new(self.layout.schema(first)?));
        self.first = first.fields.iter().map(|(k, _)| k.clone()).collect();
        Ok(())
    }

    fn stray(&self, loc: &str, field: &str) -> Result<()> {
        if self.layout.first_only(field) && !self.first.contains(field) {
            return Err(CoreError::data(
                loc,
                format!("field `{field}` is not on the first record; every record must have the same fields"),
            ));
        }
        Ok(())
    }

    /// Checks a later JSONL line: valid JSON, an object, no field that only the first record
    /// may introduce. Values are skipped here; arrow-json decodes them.
    fn check_fields(&self, loc: &str, line: &str) -> Result<()> {
        let mut stray = None;
        let mut de = serde_json::Deserializer::from_str(line);
        let parsed = FieldNames { layout: self.layout, first: &self.first, stray: &mut stray }
            .deserialize(&mut de)
            .and_then(|()| de.end());
        if let Err(e) = parsed {
            let message = if e.is_data() {
                "expected a JSON object on each line".to_owned()
            } else {
                format!("invalid JSON: {e}")
            };
            return Err(CoreError::data(loc, message));
        }
        match stray {
            Some(field) => self.stray(loc, &field),
            None => Ok(()),
        }
    }

    fn check_value_fields(&self, loc: &str, v: &Value) -> Result<()> {
        match v {
            Value::Object(m) => m.keys().try_for_each(|k| self.stray(loc, k)),
            _ => Err(CoreError::data(loc, "expected a JSON object")),
        }
    }

    fn decode(&self, rows: &[(At, Row)]) -> std::result::Result<Option<RecordBatch>, ArrowError> {
        let schema = self.schema.clone().unwrap_or_else(|| Arc::new(Schema::empty()));
        // Numbers (and booleans) in a text field are read as their JSON text: ids may be
        // either, and `7` must stay "7" and `2.5` "2.5".
        let mut d: Decoder =
            ReaderBuilder::new(schema).with_batch_size(rows.len() + 1).with_coerce_primitive(true).build_decoder()?;
        for (_, row) in rows {
            match row {
                Row::Line(text) => {
                    d.decode(text.as_bytes())?;
                    d.decode(b"\n")?;
                }
                Row::Value(v) => d.serialize(std::slice::from_ref(v))?,
            }
        }
        d.flush()
    }

    fn flush(&mut self) -> Result<Batch> {
        let rows = std::mem::take(&mut self.pending);
        let origin = match rows.first() {
            Some((At::Record(i0), _)) => Origin::Records(*i0),
            _ => Origin::Lines(rows.iter().map(|(at, _)| if let At::Line(n) = at { *n } else { 0 }).collect()),
        };
        match self.decode(&rows) {
            Ok(Some(data)) if data.num_rows() == rows.len() => Ok(Batch { data, file: self.file.clone(), origin }),
            Ok(_) => Err(CoreError::data(self.file.to_string(), "a JSON record did not decode to one row")),
            Err(batch_error) => Err(self.locate(&rows, &batch_error)),
        }
    }

    /// Finds the record arrow-json could not decode and says what its value must be.
    fn locate(&self, rows: &[(At, Row)], batch_error: &ArrowError) -> CoreError {
        for row in rows {
            if let Err(e) = self.decode(std::slice::from_ref(row)) {
                return CoreError::data(row.0.location(&self.file), self.describe(&e));
            }
        }
        CoreError::data(self.file.to_string(), self.describe(batch_error))
    }

    fn describe(&self, e: &ArrowError) -> String {
        let text = e.to_string();
        match text.split("whilst decoding field '").nth(1).and_then(|rest| rest.split('\'').next()) {
            Some(field) => self.layout.expected(field),
            None => format!("cannot be decoded: {text}"),
        }
    }
}

/// Visits the top-level field names of one JSON object, skipping the values.
struct FieldNames<'a> {
    layout: &'a dyn JsonLayout,
    first: &'a HashSet<String>,
    stray: &'a mut Option<String>,
}

impl<'de> DeserializeSeed<'de> for FieldNames<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldNames<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if self.stray.is_none() && self.layout.first_only(&key) && !self.first.contains(key.as_ref()) {
                *self.stray = Some(key.into_owned());
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}

/// Reads a user's Parquet file batch by batch (bounded memory); a file that does not decode is
/// bad input, not an I/O failure. `f(batch, first_row)` returns false to stop.
fn for_each_parquet_batch(path: &Path, mut f: impl FnMut(RecordBatch, usize) -> Result<bool>) -> Result<()> {
    let bad =
        |e: &dyn std::fmt::Display| CoreError::data(path.display().to_string(), format!("unreadable Parquet: {e}"));
    let file = File::open(path).map_err(|e| CoreError::io(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| bad(&e))?
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(|e| bad(&e))?;
    let mut row0 = 0;
    for batch in reader {
        let batch = batch.map_err(|e| bad(&e))?;
        let rows = batch.num_rows();
        if !f(batch, row0)? {
            break;
        }
        row0 += rows;
    }
    Ok(())
}

/// The column names of a Parquet file, from its footer.
pub(crate) fn parquet_columns(path: &Path) -> Result<Vec<String>> {
    let f = File::open(path).map_err(|e| CoreError::io(path, e))?;
    let b = ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(|source| CoreError::Parquet { path: path.to_owned(), source })?;
    Ok(b.schema().fields().iter().map(|f| f.name().clone()).collect())
}
