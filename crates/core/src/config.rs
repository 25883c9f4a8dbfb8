//! YAML config loading that reports every problem at once, each with its file, line:column, key
//! path, the bad value and what is allowed.
//!
//! The document is first read into a tree that remembers where every key and value sits, then
//! turned into a `serde_json::Value` with a side table of positions. Each section is deserialized
//! on its own; when serde rejects a key, the key is recorded and removed and the section is tried
//! again, so one bad key does not hide the next. Semantic checks (ranges, cross references, files)
//! then add their own diagnostics through [`ConfigDoc::diag`].

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use serde_saphyr::Spanned;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// The config file.
    pub file: PathBuf,
    /// 1-based line and column, where the parser knows them.
    pub position: Option<(u64, u64)>,
    /// Dotted key path, e.g. `select.betas[2]`; empty for the whole document.
    pub path: String,
    /// What is wrong, with the bad value and what is allowed.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a config, in document order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        if !self.0.contains(&d) {
            self.0.push(d);
        }
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter()
    }
    /// Sorts by position so the report reads top to bottom.
    pub fn sort(&mut self) {
        self.0.sort_by_key(|d| d.position.unwrap_or((u64::MAX, u64::MAX)));
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// A YAML node with positions, read through serde-saphyr's `Spanned`.
#[derive(Debug, Clone)]
enum Node {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<Node>>),
    Map(Vec<(Spanned<Node>, Spanned<Node>)>),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                Node::deserialize(d)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
                Ok(Node::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
                Ok(Node::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
                Ok(Node::UInt(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
                Ok(Node::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
                Ok(Node::Str(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
                Ok(Node::Str(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
                let mut out = Vec::new();
                while let Some(x) = a.next_element::<Spanned<Node>>()? {
                    out.push(x);
                }
                Ok(Node::Seq(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = a.next_key::<Spanned<Node>>()? {
                    let v = a.next_value::<Spanned<Node>>()?;
                    out.push((k, v));
                }
                Ok(Node::Map(out))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Copy)]
struct Pos {
    key: Option<(u64, u64)>,
    value: (u64, u64),
}

fn loc(l: &serde_saphyr::Location) -> (u64, u64) {
    (l.line(), l.column())
}

fn key_string(n: &Node) -> String {
    match n {
        Node::Str(s) => s.clone(),
        Node::Int(i) => i.to_string(),
        Node::UInt(u) => u.to_string(),
        Node::Float(x) => x.to_string(),
        Node::Bool(b) => b.to_string(),
        Node::Null => "null".into(),
        Node::Seq(_) | Node::Map(_) => "<complex key>".into(),
    }
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() { key.to_owned() } else { format!("{parent}.{key}") }
}

fn to_json(n: Spanned<Node>, path: &str, key: Option<(u64, u64)>, pos: &mut HashMap<String, Pos>) -> Value {
    pos.insert(path.to_owned(), Pos { key, value: loc(&n.referenced) });
    match n.value {
        Node::Null => Value::Null,
        Node::Bool(b) => Value::Bool(b),
        Node::Int(i) => Value::from(i),
        Node::UInt(u) => Value::from(u),
        // JSON has no NaN/inf; keep them as strings so range checks can name them.
        Node::Float(x) => {
            serde_json::Number::from_f64(x).map(Value::Number).unwrap_or_else(|| Value::String(x.to_string()))
        }
        Node::Str(s) => Value::String(s),
        Node::Seq(items) => Value::Array(
            items.into_iter().enumerate().map(|(i, x)| to_json(x, &format!("{path}[{i}]"), None, pos)).collect(),
        ),
        Node::Map(entries) => {
            let mut m = Map::new();
            for (k, v) in entries {
                let name = key_string(&k.value);
                let p = join(path, &name);
                let kpos = loc(&k.referenced);
                m.insert(name, to_json(v, &p, Some(kpos), pos));
            }
            Value::Object(m)
        }
    }
}

/// A parsed config document: its values and where each one sits in the file.
#[derive(Debug, Clone)]
pub struct ConfigDoc {
    file: PathBuf,
    text: String,
    root: Value,
    positions: HashMap<String, Pos>,
}

/// The largest pipeline file read (a pipeline is a few kilobytes).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

impl ConfigDoc {
    /// Reads and parses a YAML file. I/O and syntax errors come back as one diagnostic.
    /// A pipeline file larger than [`MAX_CONFIG_BYTES`], or not a regular file (a device, a
    /// FIFO), is refused before it is read.
    pub fn load(file: &Path) -> Result<Self, Diagnostics> {
        let fail = |message: String| {
            Diagnostics(vec![Diagnostic { file: file.to_owned(), position: None, path: String::new(), message }])
        };
        let meta = std::fs::metadata(file).map_err(|e| fail(format!("cannot read the file: {e}")))?;
        if !meta.is_file() {
            return Err(fail("not a regular file: a pipeline is a YAML file".into()));
        }
        let mut text = String::new();
        std::fs::File::open(file)
            .and_then(|f| std::io::Read::read_to_string(&mut std::io::Read::take(f, MAX_CONFIG_BYTES + 1), &mut text))
            .map_err(|e| fail(format!("cannot read the file: {e}")))?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(fail(format!(
                "more than {MAX_CONFIG_BYTES} bytes: a pipeline file is at most {MAX_CONFIG_BYTES}"
            )));
        }
        Self::parse(file, &text)
    }

    /// Parses YAML text; `file` is used in diagnostics only.
    pub fn parse(file: &Path, text: &str) -> Result<Self, Diagnostics> {
        // YAML 1.2 booleans only: under YAML 1.1 rules a key such as `n` or `y` would be a boolean.
        let mut options = serde_saphyr::Options::default();
        options.strict_booleans = true;
        let node: Spanned<Node> = serde_saphyr::from_str_with_options(text, options).map_err(|e| {
            let position = e.location().map(|l| loc(&l)).filter(|&(l, _)| l > 0);
            let message = e.to_string();
            let mut message = message.lines().next().unwrap_or("invalid YAML");
            // The position is shown in front already.
            message = message.strip_prefix("error: ").unwrap_or(message);
            if message.starts_with("line ")
                && let Some(i) = message.find(": ")
            {
                message = &message[i + 2..];
            }
            Diagnostics(vec![Diagnostic {
                file: file.to_owned(),
                position,
                path: String::new(),
                message: format!("invalid YAML: {message}"),
            }])
        })?;
        let mut positions = HashMap::new();
        let root = to_json(node, "", None, &mut positions);
        let doc = Self { file: file.to_owned(), text: text.to_owned(), root, positions };
        if !doc.root.is_object() {
            let shown = short(&doc.root);
            return Err(Diagnostics(vec![
                doc.diag("", format!("expected a mapping of sections (name:, output:, input:, ...), found {shown}")),
            ]));
        }
        Ok(doc)
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The file's text as read, for freezing into a run directory.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The value at a top-level key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.root.get(key)
    }

    /// A diagnostic at `path`, positioned at the nearest enclosing node the file has.
    pub fn diag(&self, path: &str, message: impl Into<String>) -> Diagnostic {
        let mut p = path.to_owned();
        let position = loop {
            if let Some(pos) = self.positions.get(&p) {
                // A missing key points at its parent's key, an existing one at its value.
                break Some(if p == path { pos.value } else { pos.key.unwrap_or(pos.value) });
            }
            match p.rfind(['.', '[']) {
                Some(i) => p.truncate(i),
                None if !p.is_empty() => p.clear(),
                None => break None,
            }
        };
        Diagnostic { file: self.file.clone(), position, path: path.to_owned(), message: message.into() }
    }

    /// Position of the key itself (for unknown keys).
    fn key_diag(&self, path: &str, message: String) -> Diagnostic {
        let mut d = self.diag(path, message);
        if let Some(Pos { key: Some(k), .. }) = self.positions.get(path) {
            d.position = Some(*k);
        }
        d
    }

    /// Rejects top-level keys other than `allowed`.
    pub fn check_top_level(&self, allowed: &[&str], diags: &mut Diagnostics) {
        if let Value::Object(m) = &self.root {
            for k in m.keys() {
                if !allowed.contains(&k.as_str()) {
                    let list = allowed.iter().map(|a| format!("`{a}`")).collect::<Vec<_>>().join(", ");
                    diags.push(self.key_diag(k, format!("unknown section `{k}`, expected one of {list}")));
                }
            }
        }
    }

    /// Deserializes the top-level scalar or list at `key`; `None` when absent or invalid (the
    /// problem is recorded).
    pub fn value<T: DeserializeOwned>(&self, key: &str, diags: &mut Diagnostics) -> Option<T> {
        let v = self.root.get(key)?;
        match serde_path_to_error::deserialize::<_, T>(v) {
            Ok(t) => Some(t),
            Err(e) => {
                let rel = render_path(e.path());
                let full = if rel.is_empty() { key.to_owned() } else { join(key, &rel) };
                diags.push(self.diag(&full, e.inner().to_string()));
                None
            }
        }
    }

    /// Deserializes the top-level `key` into `T`, collecting every error serde reports.
    /// An absent section deserializes from an empty mapping when `T` allows it; when it does
    /// not, the section is reported as missing.
    pub fn section<T: DeserializeOwned>(&self, key: &str, diags: &mut Diagnostics) -> Option<T> {
        let mut value = match self.root.get(key) {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(v) => v.clone(),
        };
        let absent = matches!(self.root.get(key), None | Some(Value::Null));
        let mut failed = false;
        let mut last: Option<String> = None;
        let mut removed: Vec<String> = Vec::new();
        for _ in 0..64 {
            match serde_path_to_error::deserialize::<_, T>(&value) {
                Ok(t) => return (!failed).then_some(t),
                Err(e) => {
                    failed = true;
                    let rel = render_path(e.path());
                    let msg = e.inner().to_string();
                    let full = if rel.is_empty() { key.to_owned() } else { join(key, &rel) };
                    // A required key we removed ourselves was already reported.
                    if let Some(name) = msg.strip_prefix("missing field `").and_then(|m| m.split('`').next())
                        && removed.contains(&join(&rel, name))
                    {
                        return None;
                    }
                    if absent && msg.starts_with("missing field") {
                        diags.push(self.diag(key, format!("missing section `{key}` ({msg})")));
                        return None;
                    }
                    if msg.starts_with("unknown field") {
                        diags.push(self.key_diag(&full, msg));
                    } else {
                        let shown = lookup(&value, &rel).map(short);
                        let msg = match shown {
                            Some(s) if !msg.contains("invalid type") && !msg.contains("unknown variant") => {
                                format!("{msg} (found {s})")
                            }
                            _ => msg,
                        };
                        diags.push(self.diag(&full, msg.clone()));
                        if msg.starts_with("missing field") {
                            return None;
                        }
                    }
                    if last.as_deref() == Some(rel.as_str()) || rel.is_empty() || !remove(&mut value, &rel) {
                        return None;
                    }
                    removed.push(rel.clone());
                    last = Some(rel);
                }
            }
        }
        None
    }
}

/// A short rendering of a value for messages.
pub fn short(v: &Value) -> String {
    let s = match v {
        Value::Null => "null".to_owned(),
        Value::Object(_) => "a mapping".to_owned(),
        Value::Array(_) => "a list".to_owned(),
        other => other.to_string(),
    };
    if s.chars().count() > 60 { format!("{}…", s.chars().take(60).collect::<String>()) } else { s }
}

fn render_path(p: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in p.iter() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Enum { variant } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(variant);
            }
            Segment::Unknown => {}
        }
    }
    out
}

enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

fn steps(path: &str) -> Vec<Step<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (name, rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            out.push(Step::Key(name));
        }
        for idx in rest.split('[').filter(|s| !s.is_empty()) {
            if let Ok(i) = idx.trim_end_matches(']').parse() {
                out.push(Step::Index(i));
            }
        }
    }
    out
}

fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = v;
    for s in steps(path) {
        cur = match s {
            Step::Key(k) => cur.get(k)?,
            Step::Index(i) => cur.get(i)?,
        };
    }
    Some(cur)
}

/// Removes the node at `path` so deserialization can go on to the next problem. A list element
/// is replaced by the list's first other element when there is one, so indices stay put.
fn remove(v: &mut Value, path: &str) -> bool {
    let st = steps(path);
    let Some((last, parents)) = st.split_last() else {
        return false;
    };
    let mut cur = v;
    for s in parents {
        cur = match s {
            Step::Key(k) => match cur.get_mut(*k) {
                Some(x) => x,
                None => return false,
            },
            Step::Index(i) => match cur.get_mut(*i) {
                Some(x) => x,
                None => return false,
            },
        };
    }
    match (last, cur) {
        (Step::Key(k), Value::Object(m)) => m.remove(*k).is_some(),
        (Step::Index(i), Value::Array(a)) if *i < a.len() => {
            a.remove(*i);
            true
        }
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Sec {
        a: u32,
        #[serde(default)]
        b: Vec<f64>,
        #[serde(default)]
        c: Option<String>,
    }

    fn doc(s: &str) -> ConfigDoc {
        ConfigDoc::parse(Path::new("p.yaml"), s).unwrap()
    }

    #[test]
    fn positions_and_paths() {
        let d = doc("sec:\n  a: 3\n  b: [1.0, 2.5]\n");
        let mut diags = Diagnostics::default();
        let s: Sec = d.section("sec", &mut diags).unwrap();
        assert_eq!(s, Sec { a: 3, b: vec![1.0, 2.5], c: None });
        assert_eq!(d.diag("sec.b[1]", "x").position, Some((3, 12)));
        assert_eq!(d.diag("sec.a", "x").position, Some((2, 6)));
        // A key that is not there points at the nearest parent's key.
        assert_eq!(d.diag("sec.zzz", "x").position, Some((1, 1)));
    }

    #[test]
    fn collects_every_error_in_a_section() {
        let d = doc("sec:\n  a: many\n  zz: 1\n  c: [1]\n");
        let mut diags = Diagnostics::default();
        assert!(d.section::<Sec>("sec", &mut diags).is_none());
        let text = diags.to_string();
        assert_eq!(diags.len(), 3, "{text}");
        assert!(text.contains("p.yaml:2:6: sec.a: invalid type: string \"many\", expected u32"), "{text}");
        assert!(text.contains("p.yaml:3:3: sec.zz: unknown field `zz`, expected one of `a`, `b`, `c`"), "{text}");
        assert!(text.contains("p.yaml:4:6: sec.c: invalid type: sequence, expected a string"), "{text}");
    }

    #[test]
    fn syntax_error_has_position() {
        let e = ConfigDoc::parse(Path::new("p.yaml"), "a: [1, 2\nb: 3\n").unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(e.0[0].position.is_some(), "{e}");
        assert!(e.to_string().starts_with("p.yaml:"), "{e}");
    }

    #[test]
    fn yaml_1_1_booleans_are_strings() {
        let d = doc("s:\n  n: 8\n  y: no\n  t: true\n");
        assert_eq!(d.get("s"), Some(&serde_json::json!({"n": 8, "y": "no", "t": true})));
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let e = ConfigDoc::parse(Path::new("p.yaml"), "a: 1\na: 2\n").unwrap_err();
        assert!(e.to_string().contains("duplicate"), "{e}");
    }

    #[test]
    fn missing_required_section() {
        let d = doc("other: 1\n");
        let mut diags = Diagnostics::default();
        assert!(d.section::<Sec>("sec", &mut diags).is_none());
        assert!(diags.to_string().contains("missing section `sec`"), "{diags}");
        d.check_top_level(&["sec"], &mut diags);
        assert!(diags.to_string().contains("p.yaml:1:1: other: unknown section `other`"), "{diags}");
    }
}
