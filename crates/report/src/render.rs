//! The summary as text: `report.md` and the terminal table of `rbon report`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::summary::{PAIR_COUNTERS, Summary, SummaryRow};
use crate::tune::Tuning;

fn num(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "–".to_owned(),
    }
}

fn mean_se(r: &SummaryRow, k: usize) -> String {
    let (m, se) = r.rewards[k];
    match se {
        Some(se) => format!("{} ± {}", num(Some(m), 3), num(Some(se), 3)),
        None => num(Some(m), 3),
    }
}

fn beta_text(r: &SummaryRow) -> String {
    if r.beta == 0.0 && (r.is_baseline() || r.method == "bon" || r.method == "mbr") {
        "–".to_owned()
    } else {
        format!("{}", r.beta)
    }
}

/// Columns of the main table: (header, cell of a row).
type Cell<'a> = (String, Box<dyn Fn(&SummaryRow) -> String + 'a>);

fn main_columns(s: &Summary) -> Vec<Cell<'_>> {
    let mut cols: Vec<Cell> = vec![
        ("method".into(), Box::new(|r: &SummaryRow| r.method.clone())),
        ("β".into(), Box::new(beta_text)),
        (crate::summary::PROMPTS.into(), Box::new(|r: &SummaryRow| r.prompts.to_string())),
    ];
    for p in &s.proxy {
        if let Some(k) = s.reward_index(p) {
            cols.push((format!("{p} (proxy)"), Box::new(move |r: &SummaryRow| mean_se(r, k))));
        }
    }
    for (gi, g) in s.gold.iter().enumerate() {
        if let Some(k) = s.reward_index(g) {
            cols.push((format!("{g} (gold)"), Box::new(move |r: &SummaryRow| mean_se(r, k))));
        }
        if s.rows.iter().any(|r| r.win_vs_bon[gi].is_some()) {
            cols.push((format!("win vs bon ({g})"), Box::new(move |r: &SummaryRow| num(r.win_vs_bon[gi], 3))));
        }
    }
    if s.rows.iter().any(|r| r.logprob.is_some()) {
        cols.push(("log π_ref".into(), Box::new(|r: &SummaryRow| num(r.logprob, 2))));
    }
    if s.rows.iter().any(|r| r.wd.is_some()) {
        cols.push(("WD".into(), Box::new(|r: &SummaryRow| num(r.wd, 4))));
    }
    if s.rows.iter().any(|r| r.num_tokens.is_some()) {
        cols.push(("tokens".into(), Box::new(|r: &SummaryRow| num(r.num_tokens, 1))));
    }
    cols.push(("chars".into(), Box::new(|r: &SummaryRow| num(r.num_chars, 0))));
    cols
}

/// Best β per method over all prompts, by the first gold reward (optimistic: chosen and
/// measured on the same prompts; `select.tune` gives the honest version).
fn best_over_all(s: &Summary) -> Vec<(String, f64, f64)> {
    let Some(k) = s.gold.first().and_then(|g| s.reward_index(g)) else { return Vec::new() };
    let mut out: Vec<(String, f64, f64)> = Vec::new();
    for r in s.rows.iter().filter(|r| !r.is_baseline()) {
        let m = r.rewards[k].0;
        match out.iter_mut().find(|(name, _, _)| *name == r.method) {
            Some(e) if m > e.2 || (m == e.2 && r.beta < e.1) => *e = (r.method.clone(), r.beta, m),
            Some(_) => {}
            None => out.push((r.method.clone(), r.beta, m)),
        }
    }
    out
}

/// The main table as fixed-width text for a terminal.
pub fn terminal_table(s: &Summary, tuning: Option<&Tuning>) -> String {
    let cols = main_columns(s);
    let cells: Vec<Vec<String>> = s.rows.iter().map(|r| cols.iter().map(|(_, f)| f(r)).collect()).collect();
    let width =
        |i: usize| cells.iter().map(|row| row[i].chars().count()).chain([cols[i].0.chars().count()]).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols.len()).map(width).collect();
    let line = |row: Vec<&str>| -> String {
        let mut l = String::new();
        for (i, c) in row.iter().enumerate() {
            let pad = widths[i].saturating_sub(c.chars().count());
            if i == 0 {
                let _ = write!(l, "{c}{}", " ".repeat(pad));
            } else {
                let _ = write!(l, "  {}{c}", " ".repeat(pad));
            }
        }
        l.trim_end().to_owned()
    };
    let mut out = String::new();
    let _ = writeln!(out, "{}: {} prompts, {} samples", s.run_name, s.prompts, s.samples);
    let _ = writeln!(out, "{}", line(cols.iter().map(|(h, _)| h.as_str()).collect()));
    let _ = writeln!(out, "{}", widths.iter().map(|w| "─".repeat(*w)).collect::<Vec<_>>().join("  "));
    for row in &cells {
        let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
    }
    if let Some(t) = tuning {
        let _ = writeln!(
            out,
            "\nβ tuned on {} prompts by gold `{}`, evaluated on the other {}:",
            t.tune_prompts, t.gold, t.heldout_prompts
        );
        for m in &t.methods {
            let _ = writeln!(
                out,
                "  {:<10} β = {:<8} held-out gold {}",
                m.method.as_str(),
                m.beta,
                match (m.heldout_mean, m.heldout_se) {
                    (Some(x), Some(se)) => format!("{x:.3} ± {se:.3}"),
                    (x, _) => num(x, 3),
                }
            );
        }
        let _ = writeln!(out, "  references on the held-out prompts: {}", references(t, 3));
    }
    out
}

/// `report.md`.
pub fn markdown(s: &Summary, tuning: Option<&Tuning>, plots: &[PathBuf], dir: &Path) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Report: {}\n", s.run_name);
    let _ = writeln!(
        out,
        "{} prompts, {} samples. Proxy reward (selects): {}. Gold rewards (evaluate only): {}.\n",
        s.prompts,
        s.samples,
        s.proxy.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(", "),
        if s.gold.is_empty() {
            "none".to_owned()
        } else {
            s.gold.iter().map(|g| format!("`{g}`")).collect::<Vec<_>>().join(", ")
        }
    );
    let _ = writeln!(
        out,
        "Each row averages over prompts the reward of the response a method picks (mean ± standard \
         error). `oracle:<gold>` picks by the gold reward itself (the ceiling), `random` is the mean \
         over all N samples (a uniformly random pick). Win vs bon: share of prompts where the pick's \
         gold reward beats BoN's pick (ties count ½). log π_ref, WD and length are of the pick.\n"
    );
    let cols = main_columns(s);
    let _ = writeln!(out, "| {} |", cols.iter().map(|(h, _)| h.as_str()).collect::<Vec<_>>().join(" | "));
    let _ = writeln!(
        out,
        "|{}",
        cols.iter().enumerate().map(|(i, _)| if i < 1 { "---|" } else { "---:|" }).collect::<String>()
    );
    for r in &s.rows {
        let _ = writeln!(out, "| {} |", cols.iter().map(|(_, f)| f(r)).collect::<Vec<_>>().join(" | "));
    }
    let best = best_over_all(s);
    if !best.is_empty()
        && let Some(g) = s.gold.first()
    {
        let _ = writeln!(
            out,
            "\n## Best β per method (all prompts)\n\nBy the mean of gold `{g}`; chosen and measured on the \
             same prompts, so optimistic (set `select.tune` for a held-out estimate).\n\n| method | β | gold {g} |\n|---|---:|---:|"
        );
        for (m, b, v) in &best {
            let _ = writeln!(out, "| {m} | {b} | {v:.4} |");
        }
    }
    paired_section(&mut out, s);
    if let Some(t) = tuning {
        let _ = writeln!(
            out,
            "\n## β tuned on a subset (`select.tune`)\n\nβ picked by the mean of gold `{}` on {} tuning \
             prompts, then evaluated on the {} held-out prompts.\n\n| method | best β | tuning mean | held-out mean ± se |\n|---|---:|---:|---:|",
            t.gold, t.tune_prompts, t.heldout_prompts
        );
        for m in &t.methods {
            let held = match (m.heldout_mean, m.heldout_se) {
                (Some(x), Some(se)) => format!("{x:.4} ± {se:.4}"),
                (x, _) => num(x, 4),
            };
            let _ = writeln!(out, "| {} | {} | {:.4} | {held} |", m.method, m.beta, m.tune_mean);
        }
        let _ = writeln!(out, "\nHeld-out references: {}.", references(t, 4));
    }
    if !s.correlations.is_empty() {
        let _ = writeln!(
            out,
            "\n## Proxy–gold correlation\n\nReward hacking needs a proxy that tracks the gold reward only \
             loosely: the lower the correlation, the more a hard optimisation of the proxy (BoN) can \
             lose on gold, and the more regularization can help. Within-prompt is what selection sees.\n\n\
             | proxy | gold | Pearson (all samples) | Pearson (within prompt, mean) |\n|---|---|---:|---:|"
        );
        for c in &s.correlations {
            let _ = writeln!(out, "| {} | {} | {} | {} |", c.proxy, c.gold, num(c.pooled, 3), num(c.within_prompt, 3));
        }
    }
    if !s.exports.is_empty() {
        let _ = writeln!(
            out,
            "\n## Pairs\n\nPer export: pairs written and pairs dropped, by reason.\n\n| method | β | {} |\n|---|---:|{}",
            PAIR_COUNTERS.map(|c| c.replace('_', " ")).join(" | "),
            "---:|".repeat(PAIR_COUNTERS.len())
        );
        for e in &s.exports {
            let _ = writeln!(
                out,
                "| {} | {} | {} |",
                e.method,
                e.beta,
                PAIR_COUNTERS.map(|c| e.get(c).to_string()).join(" | ")
            );
        }
    }
    if !plots.is_empty() {
        let _ = writeln!(out, "\n## Plots\n");
        for p in plots.iter().filter(|p| p.extension().is_some_and(|e| e == "png")) {
            let rel = p.strip_prefix(dir).unwrap_or(p).display().to_string();
            let _ = writeln!(out, "![{rel}]({rel})\n");
        }
    }
    out
}

/// Per gold reward: each method and β against BoN, a paired t-test on the per-prompt gold
/// difference (the same prompts, so the prompt-to-prompt spread cancels).
fn paired_section(out: &mut String, s: &Summary) {
    for (gi, g) in s.gold.iter().enumerate() {
        let rows: Vec<_> =
            s.rows.iter().filter(|r| r.method != "bon").filter_map(|r| r.vs_bon[gi].map(|t| (r, t))).collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "\n## Against BoN: paired test on gold `{g}`\n\nPer prompt, the gold reward of the method's pick minus \
             BoN's pick; Student's t on those differences (two-sided p). Prompts for p < {alpha}: how many \
             prompts a mean difference and spread like these would need to be significant at that level \
             (– when the mean difference is 0).\n\n| method | β | Δ gold (mean ± se) | p | prompts for p < {alpha} |\n|---|---:|---:|---:|---:|",
            alpha = crate::stats::ALPHA
        );
        for (r, t) in rows {
            let se = (t.n > 1).then(|| t.std / (t.n as f64).sqrt());
            let p = match t.p_value {
                Some(p) if p < 1e-4 => format!("{p:.1e}"),
                p => num(p, 4),
            };
            let needed = t.prompts_needed.map_or("–".to_owned(), |k| k.to_string());
            let _ = writeln!(
                out,
                "| {} | {} | {} ± {} | {p} | {needed} |",
                r.method,
                beta_text(r),
                num(Some(t.mean), 4),
                num(se, 4)
            );
        }
    }
}

/// BoN's, the oracle's and random's mean gold reward on the held-out prompts.
fn references(t: &Tuning, digits: usize) -> String {
    format!(
        "bon {}, oracle {}, random {}",
        num(t.heldout_bon, digits),
        num(t.heldout_oracle, digits),
        num(t.heldout_random, digits)
    )
}
