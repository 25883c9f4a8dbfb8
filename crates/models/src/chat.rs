//! Tokenizers and chat templates of a model folder: `tokenizer.json`, the template from
//! `tokenizer_config.json` (`chat_template`, a string or a list of named templates) or
//! `chat_template.jinja`, special tokens, and the end-of-sequence ids from
//! `generation_config.json` (as `generate` uses them).

use std::path::Path;

use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

use crate::error::ModelError;
use crate::hub::ModelDir;

/// How prompts are turned into text before tokenizing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateChoice {
    /// The folder's own template.
    Auto,
    /// No template: the messages' contents joined by blank lines, encoded with the
    /// tokenizer's special tokens (BOS) added.
    None,
    /// A `.jinja` file.
    File(std::path::PathBuf),
}

/// A tokenizer with its chat template and special tokens.
#[derive(Debug)]
pub struct ChatTokenizer {
    tokenizer: tokenizers::Tokenizer,
    /// The chat template, compiled once into its environment (as [`CHAT`]).
    template: Option<Environment<'static>>,
    /// Where the template came from (a .jinja file, or tokenizer_config.json), for its errors.
    template_origin: String,
    origin: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
}

fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_owned),
        _ => None,
    }
}

/// `eos_token_id` of a config: absent or null, an id, or a list of ids. Anything else, or an
/// id the tokenizer does not have, is an error naming the file: ignoring it would let every
/// response run to `max_new_tokens`.
fn ids(v: Option<&serde_json::Value>, file: &Path, tokenizer: &tokenizers::Tokenizer) -> Result<Vec<u32>, ModelError> {
    let bad = |message: String| ModelError::Config { path: file.display().to_string(), message };
    let id = |x: &serde_json::Value| {
        let id = x
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(format!("`eos_token_id` must be a token id or a list of token ids, not {x}")))?;
        match tokenizer.id_to_token(id) {
            Some(_) => Ok(id),
            None => Err(bad(format!("`eos_token_id` {id} is not a token of the tokenizer"))),
        }
    };
    match v {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(a)) => a.iter().map(id).collect(),
        Some(x) => Ok(vec![id(x)?]),
    }
}

fn read_json(dir: &ModelDir, name: &str) -> Result<Option<serde_json::Value>, ModelError> {
    match dir.file(name) {
        None => Ok(None),
        Some(p) => {
            let text = dir.read(name)?;
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| ModelError::Config { path: p.display().to_string(), message: e.to_string() })
        }
    }
}

impl ChatTokenizer {
    /// Loads the tokenizer and template of a model folder.
    pub fn load(dir: &ModelDir, choice: &TemplateChoice) -> Result<Self, ModelError> {
        let tok_path = dir.root().join("tokenizer.json");
        let origin = tok_path.display().to_string();
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| ModelError::Tokenizer { path: origin.clone(), message: e.to_string() })?;
        let tc = read_json(dir, "tokenizer_config.json")?.unwrap_or_default();
        let mut template_origin = dir.root().join("tokenizer_config.json").display().to_string();
        let template = match choice {
            TemplateChoice::None => None,
            TemplateChoice::File(p) => {
                template_origin = p.display().to_string();
                Some(std::fs::read_to_string(p).map_err(|source| ModelError::Io { path: p.clone(), source })?)
            }
            TemplateChoice::Auto => match dir.file("chat_template.jinja") {
                Some(p) => {
                    template_origin = p.display().to_string();
                    Some(dir.read("chat_template.jinja")?)
                }
                None => match tc.get("chat_template") {
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    // A list of named templates: the one named "default".
                    Some(serde_json::Value::Array(list)) => list
                        .iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                        .and_then(|t| t.get("template"))
                        .and_then(|t| t.as_str())
                        .map(str::to_owned),
                    _ => None,
                },
            },
        };
        if *choice == TemplateChoice::Auto && template.is_none() {
            return Err(ModelError::Template {
                path: dir.root().display().to_string(),
                message: "the folder has no chat template (tokenizer_config.json `chat_template` or \
                          chat_template.jinja); set `chat_template: none` or a .jinja file"
                    .into(),
            });
        }
        // Compiled once: a syntax error shows now (and in `rbon validate`), naming the file.
        let template = match template {
            None => None,
            Some(src) => {
                let mut env = environment();
                env.add_template_owned(CHAT, src)
                    .map_err(|e| ModelError::Template { path: template_origin.clone(), message: format!("{e:#}") })?;
                Some(env)
            }
        };
        let bos_token = token_text(tc.get("bos_token"));
        let eos_token = token_text(tc.get("eos_token"));
        // As `generate` does: generation_config.json, else config.json, else the tokenizer's EOS.
        let generation = read_json(dir, "generation_config.json")?.unwrap_or_default();
        let cfg = read_json(dir, "config.json")?.unwrap_or_default();
        let root = dir.root();
        let mut eos_ids = ids(generation.get("eos_token_id"), &root.join("generation_config.json"), &tokenizer)?;
        if eos_ids.is_empty() {
            eos_ids = ids(cfg.get("eos_token_id"), &root.join("config.json"), &tokenizer)?;
        }
        if eos_ids.is_empty()
            && let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t))
        {
            eos_ids.push(id);
        }
        Ok(Self { tokenizer, template, template_origin, origin, bos_token, eos_token, eos_ids })
    }

    /// Token ids that end a response.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The tokenizer's own EOS token (`eos_token` of tokenizer_config.json): the one trainers
    /// append to plain-string completions (`tokenizer.eos_token`).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// Renders a conversation as the model expects it, ending with the assistant's turn opener
    /// when `add_generation_prompt`. Messages are anything that serializes to `{role, content}`.
    pub fn render<M: Serialize>(&self, messages: &[M], add_generation_prompt: bool) -> Result<String, ModelError> {
        let Some(env) = &self.template else {
            let v = serde_json::to_value(messages).unwrap_or_default();
            let parts: Vec<&str> = v
                .as_array()
                .map(|a| a.iter().filter_map(|m| m.get("content").and_then(|c| c.as_str())).collect())
                .unwrap_or_default();
            return Ok(parts.join("\n\n"));
        };
        let err = |e: minijinja::Error| {
            let message = if e.kind() == ErrorKind::OutOfFuel {
                format!(
                    "the template took more than {TEMPLATE_FUEL} steps for one conversation (each 64 bytes of data it \
                     builds counting as one) and was stopped: a loop that does not end, or a string that keeps growing?"
                )
            } else {
                format!("{e:#}")
            };
            ModelError::Template { path: self.template_origin.clone(), message }
        };
        let tmpl = env.get_template(CHAT).map_err(err)?;
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        tmpl.render(ctx).map_err(err)
    }

    /// Token ids of a prompt: a rendered template already carries its special tokens (BOS), so
    /// none are added; without a template the tokenizer adds its own.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let add_special = self.template.is_none();
        self.tokenizer
            .encode(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::Tokenizer { path: self.origin.clone(), message: e.to_string() })
    }

    /// Token ids of plain text (a response), no special tokens added.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::Tokenizer { path: self.origin.clone(), message: e.to_string() })
    }

    /// Text of token ids, special tokens (EOS) skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer { path: self.origin.clone(), message: e.to_string() })
    }

    /// Whether a template (rather than plain joining) renders prompts.
    pub fn has_template(&self) -> bool {
        self.template.is_some()
    }
}

/// The chat template's name in its environment.
const CHAT: &str = "chat";

/// The most steps a chat template may take to render one conversation (minijinja's fuel: one per
/// instruction, and one per 64 bytes of the strings and lists it builds or writes, checked before
/// each allocation). Real templates take thousands, plus the conversation's size; a loop that does
/// not end is stopped in a fraction of a second, and a string that keeps doubling before it holds
/// about 320 MB.
pub const TEMPLATE_FUEL: u64 = 10_000_000;

/// The template environment transformers' templates expect: Jinja whitespace control as
/// transformers sets it, Python string methods, `raise_exception` and `strftime_now`; at most
/// [`TEMPLATE_FUEL`] steps per render.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build() {
        env.set_syntax(syntax);
    }
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
    env
}

/// `strftime` on the current UTC time for the handful of fields chat templates use.
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format_time(secs, fmt)
}

fn format_time(secs: u64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = (secs / 86_400) as i64;
    let (h, m, s) = ((secs % 86_400) / 3600, (secs % 3600) / 60, secs % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('M') => out.push_str(&format!("{m:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Resolves `chat_template` from a pipeline: `auto`, `none` or a path.
pub fn template_choice(spec: &str, base: &Path) -> TemplateChoice {
    match spec {
        "auto" => TemplateChoice::Auto,
        "none" => TemplateChoice::None,
        p => {
            let p = Path::new(p);
            TemplateChoice::File(if p.is_absolute() { p.to_owned() } else { base.join(p) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_malformed_eos_token_id_is_an_error_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/models/tiny-qwen2");
        for e in std::fs::read_dir(&src).unwrap().flatten() {
            std::fs::copy(e.path(), d.path().join(e.file_name())).unwrap();
        }
        let dir = ModelDir::resolve(d.path().to_str().unwrap()).unwrap();
        let load = || ChatTokenizer::load(&dir, &TemplateChoice::Auto).map(|t| t.eos_ids().to_vec());
        assert_eq!(load().unwrap(), vec![4]);
        for (value, message) in [
            ("\"</s>\"", "`eos_token_id` must be a token id or a list of token ids, not \"</s>\""),
            ("[4, -1]", "not -1"),
            ("999999", "`eos_token_id` 999999 is not a token of the tokenizer"),
        ] {
            std::fs::write(d.path().join("generation_config.json"), format!("{{\"eos_token_id\": {value}}}")).unwrap();
            let e = load().unwrap_err().to_string();
            assert!(e.contains("generation_config.json") && e.contains(message), "{value}: {e}");
        }
        std::fs::write(d.path().join("generation_config.json"), "{\"eos_token_id\": [4, 1]}").unwrap();
        assert_eq!(load().unwrap(), vec![4, 1]);
    }

    #[test]
    fn strftime_fields() {
        // 2024-07-26 13:05:09 UTC.
        assert_eq!(format_time(1_722_000_309, "%d %b %Y %H:%M:%S %B %m %y %%"), "26 Jul 2024 13:25:09 July 07 24 %");
    }
}
