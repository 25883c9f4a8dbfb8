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

const TEMPLATES: [(&str, &str); 3] = [
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
