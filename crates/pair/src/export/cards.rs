//! The dataset cards (README.md) of the exports, rendered with minijinja from the templates in
//! `crates/pair/templates/`: Hugging Face front matter, what the rows are, counts, and how to
//! train on them.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use minijinja::{Environment, context};
use rbon_core::CoreError;
use rbon_core::stage::counter;
use rbon_regularize::Method;

use super::CardContext;
use crate::config::PairFormat;
use crate::stage::DropReason;

const TEMPLATES: [(&str, &str); 4] = [
    ("index.md", include_str!("../../templates/index.md")),
    ("pairs.md", include_str!("../../templates/pairs.md")),
    ("sft.md", include_str!("../../templates/sft.md")),
    ("vbon.md", include_str!("../../templates/vbon.md")),
];

fn environment() -> Result<&'static Environment<'static>, CoreError> {
    static ENV: OnceLock<Result<Environment<'static>, String>> = OnceLock::new();
    let env = ENV.get_or_init(|| {
        let mut env = Environment::new();
        // The templates end with the newline the cards end with.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .keep_trailing_newline(true)
            .build()
            .map_err(|e| format!("syntax: {e}"))?;
        env.set_syntax(syntax);
        for (name, source) in TEMPLATES {
            env.add_template(name, source).map_err(|e| format!("{name}: {e}"))?;
        }
        Ok(env)
    });
    env.as_ref().map_err(|e| CoreError::internal(format!("dataset card templates: {e}")))
}

fn render(name: &str, ctx: minijinja::Value) -> Result<String, CoreError> {
    let env = environment()?;
    env.get_template(name)
        .and_then(|t| t.render(ctx))
        .map_err(|e| CoreError::internal(format!("dataset card {name}: {e:#}")))
}

/// The README.md of one export of pairs.
pub fn dataset_card(
    card: &CardContext,
    method: Method,
    beta: f64,
    counts: &BTreeMap<String, u64>,
    files: usize,
) -> Result<String, CoreError> {
    let get = |k: &str| counts.get(k).copied().unwrap_or(0);
    let ext = card.pair.file_format.extension();
    let proxy = if card.select.proxy.is_ensemble() {
        format!(
            "the ensemble `{}` (each model's rewards standardised over the N samples, then averaged)",
            card.select.proxy
        )
    } else {
        format!("`{}`", card.select.proxy)
    };
    let drops: Vec<minijinja::Value> = DropReason::ALL
        .iter()
        .map(|d| context! { name => d.counter().replace('_', " "), count => get(d.counter()) })
        .collect();
    render(
        "pairs.md",
        context! {
            ext,
            loader => if ext == "jsonl" { "json" } else { "parquet" },
            run_name => card.run_name,
            version => card.version,
            method => method.as_str(),
            beta => beta.to_string(),
            beta_text => if method.uses_beta() { format!(", β = {beta}") } else { String::new() },
            rejected => card.pair.rejected.as_str(),
            standard => card.pair.format == PairFormat::Standard,
            rule => method.rule(beta),
            proxy,
            sft => card.pair.sft,
            pairs => get(counter::PAIRS),
            drops,
            files,
            config_text => card.config_text.trim_end(),
            margin => card.pair.margin == crate::config::MarginColumn::Proxy,
        },
    )
}

/// One configuration of the pairs folder's card: an export (or its SFT half) and its files.
#[derive(Debug, Clone)]
pub struct CardEntry {
    pub method: Method,
    pub beta: f64,
    pub sft: bool,
    pub rows: u64,
    /// Files relative to the pairs folder: `glob` for the configuration, `card` its README.md.
    pub glob: String,
    pub card: String,
}

impl CardEntry {
    /// `rbon_wd-beta=0.1` (`-sft` for the SFT half): what `load_dataset(folder, name)` takes.
    pub fn name(&self) -> String {
        format!("{}-beta={}{}", self.method.as_str(), self.beta, if self.sft { "-sft" } else { "" })
    }
}

/// A string as a YAML scalar: JSON's double-quoted form, which YAML reads the same.
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// The Hub's size category for a dataset of `n` rows.
fn size_category(n: u64) -> &'static str {
    match n {
        0..1_000 => "n<1K",
        1_000..10_000 => "1K<n<10K",
        10_000..100_000 => "10K<n<100K",
        100_000..1_000_000 => "100K<n<1M",
        1_000_000..10_000_000 => "1M<n<10M",
        10_000_000..100_000_000 => "10M<n<100M",
        _ => "100M<n<1B",
    }
}

/// The README.md of the pairs folder: Hugging Face front matter with one configuration per
/// export, so `load_dataset(<folder or repository>, "<method>-beta=<β>")` reads it, and a table
/// of the exports.
pub fn index_card(card: &CardContext, entries: &[CardEntry]) -> Result<String, CoreError> {
    let mut tags: Vec<String> = ["dpo", "preference", "rbon", "trl"].map(str::to_owned).to_vec();
    for t in &card.pair.card.tags {
        if !tags.contains(t) {
            tags.push(t.clone());
        }
    }
    let configs: Vec<minijinja::Value> = entries
        .iter()
        .map(|e| {
            context! {
                name => yaml_str(&e.name()),
                plain => e.name(),
                path => yaml_str(&e.glob),
                glob => e.glob.clone(),
                method => e.method.as_str(),
                beta => if e.method.uses_beta() { e.beta.to_string() } else { "–".to_owned() },
                rows => e.rows,
                card => e.card.clone(),
            }
        })
        .collect();
    render(
        "index.md",
        context! {
            license => card.pair.card.license.clone(),
            tags => tags.iter().map(|t| yaml_str(t)).collect::<Vec<_>>(),
            size => size_category(entries.iter().map(|e| e.rows).max().unwrap_or(0)),
            pretty_name => yaml_str(&format!("{} (rbon preference pairs)", card.run_name)),
            configs,
            run_name => card.run_name,
            version => card.version,
            rejected => card.pair.rejected.as_str(),
            margin => card.pair.margin == crate::config::MarginColumn::Proxy,
        },
    )
}

/// The README.md of an SFT export.
pub fn sft_card(card: &CardContext, method: Method, beta: f64, rows: usize, files: usize) -> Result<String, CoreError> {
    render(
        "sft.md",
        context! {
            ext => card.pair.file_format.extension(),
            run_name => card.run_name,
            version => card.version,
            method => method.as_str(),
            beta => beta.to_string(),
            rows,
            files,
        },
    )
}

/// The README.md of the vBoN export.
pub fn vbon_card(card: &CardContext, rows: usize, files: usize) -> Result<String, CoreError> {
    render(
        "vbon.md",
        context! {
            ext => card.pair.file_format.extension(),
            run_name => card.run_name,
            version => card.version,
            proxy => card.select.proxy.to_string(),
            rows,
            files,
        },
    )
}
