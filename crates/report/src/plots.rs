//! Plots, each as PNG and SVG: reward of the pick vs β (the paper's central figure), proxy vs
//! gold reward over the samples, and the length of chosen vs rejected responses.
//!
//! Text is drawn with a subset of DejaVu Sans embedded in the crate (assets/FONT-LICENSE.txt),
//! so plots render the same on any machine, with no system fonts or fontconfig.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use polars::prelude::{DataFrame, IntoLazy, JoinArgs, JoinType, col, len, lit};

use rbon_core::StageName;
use rbon_core::schema::{BETA, CHOSEN_INDEX, METHOD, PROMPT_ID, REJECTED_INDEX, SAMPLE_IDX, reward_column};
use rbon_regularize::{Label, Method};

use crate::ReportError;
use crate::data::{F_CHARS, F_TOKENS, RunData, scan};
use crate::summary::Summary;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");
const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (960, 600);

fn font_registered() -> bool {
    static DONE: OnceLock<bool> = OnceLock::new();
    *DONE.get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok())
}

/// Curves; the reference lines use black (BoN), brown (MBR), green (oracle) and grey (random).
const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x17, 0xbe, 0xcf),
    RGBColor(0xe3, 0x77, 0xc2),
];
const GREEN: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);
const GREY: RGBColor = RGBColor(0x7f, 0x7f, 0x7f);

fn err(path: &Path) -> impl Fn(String) -> ReportError + '_ {
    move |message| ReportError::Plot { path: path.to_owned(), message }
}

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Draws `$body` (with the drawing area bound to `$root`) into `<dir>/<stem>.png` and
/// `<dir>/<stem>.svg`; a macro because the two backends are different types.
macro_rules! both {
    ($dir:expr, $stem:expr, |$root:ident| $body:expr) => {{
        let png = $dir.join(format!("{}.png", $stem));
        let svg = $dir.join(format!("{}.svg", $stem));
        {
            let $root = BitMapBackend::new(&png, SIZE).into_drawing_area();
            $root.fill(&WHITE).map_err(s).map_err(err(&png))?;
            $body.map_err(err(&png))?;
            $root.present().map_err(s).map_err(err(&png))?;
        }
        {
            let $root = SVGBackend::new(&svg, SIZE).into_drawing_area();
            $root.fill(&WHITE).map_err(s).map_err(err(&svg))?;
            $body.map_err(err(&svg))?;
            $root.present().map_err(s).map_err(err(&svg))?;
        }
        Ok(vec![png, svg])
    }};
}

/// One curve of the β plot: (β, mean, standard error) per point.
struct Curve {
    label: String,
    points: Vec<(f64, f64, Option<f64>)>,
}

/// A horizontal reference line, with its standard error.
struct Reference {
    label: String,
    value: f64,
    se: Option<f64>,
    color: RGBColor,
}

/// The band a mean ± standard error spans (the mean alone where there is no error).
fn band(y: f64, se: Option<f64>) -> (f64, f64) {
    let e = se.filter(|e| e.is_finite()).unwrap_or(0.0);
    (y - e, y + e)
}

/// The largest magnitude an axis shows: values beyond it (a reward of 1e308, say) sit at the edge
/// of the plot, whose ticks could not be computed otherwise; the report's tables keep them exact.
const AXIS_LIMIT: f64 = 1e15;

/// A value as drawn: within [`AXIS_LIMIT`].
fn shown(v: f64) -> f64 {
    if v.is_finite() { v.clamp(-AXIS_LIMIT, AXIS_LIMIT) } else { 0.0 }
}

fn padded(lo: f64, hi: f64) -> (f64, f64) {
    let clamp = |v: f64, or: f64| if v.is_finite() { v.clamp(-AXIS_LIMIT, AXIS_LIMIT) } else { or };
    let (lo, hi) = (clamp(lo, -1.0), clamp(hi, 1.0));
    let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
    let span = (hi - lo).max(1e-9 * lo.abs().max(hi.abs()).max(1.0));
    (lo - 0.08 * span, hi + 0.08 * span)
}

fn draw_beta<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    y_desc: &str,
    curves: &[Curve],
    refs: &[Reference],
) -> Result<(), String> {
    let xs: Vec<f64> = curves.iter().flat_map(|c| c.points.iter().map(|p| p.0)).collect();
    let ys: Vec<f64> = curves
        .iter()
        .flat_map(|c| c.points.iter().flat_map(|p| <[f64; 2]>::from(band(p.1, p.2))))
        .chain(refs.iter().flat_map(|r| <[f64; 2]>::from(band(r.value, r.se))))
        .collect();
    let (x0, x1) = (xs.iter().copied().fold(f64::INFINITY, f64::min), xs.iter().copied().fold(0.0, f64::max));
    let (y0, y1) =
        padded(ys.iter().copied().fold(f64::INFINITY, f64::min), ys.iter().copied().fold(f64::NEG_INFINITY, f64::max));
    let (x0, x1) = (x0 / 1.5, x1 * 1.5);
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FAMILY, 24))
        .margin(16)
        .x_label_area_size(52)
        .y_label_area_size(72)
        .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
        .map_err(s)?;
    chart
        .configure_mesh()
        .x_desc("β (log scale)")
        .y_desc(y_desc)
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 17))
        .x_label_formatter(&|v| format!("{v:e}"))
        .y_label_formatter(&|v| format!("{:.2}", if v.abs() < 5e-3 { 0.0 } else { *v }))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(s)?;
    // Each mean ± one standard error over prompts as a translucent band, under the lines.
    for r in refs.iter().filter(|r| r.se.is_some_and(|e| e > 0.0)) {
        let (lo, hi) = band(r.value, r.se);
        let area = vec![(x0, shown(lo)), (x1, shown(lo)), (x1, shown(hi)), (x0, shown(hi))];
        chart.draw_series(std::iter::once(Polygon::new(area, r.color.mix(0.08).filled()))).map_err(s)?;
    }
    for (i, c) in curves.iter().enumerate() {
        if !c.points.iter().any(|p| p.2.is_some_and(|e| e > 0.0)) {
            continue;
        }
        let color = COLORS[i % COLORS.len()];
        let upper = c.points.iter().map(|&(x, y, e)| (x, shown(band(y, e).1)));
        let lower = c.points.iter().rev().map(|&(x, y, e)| (x, shown(band(y, e).0)));
        let area: Vec<(f64, f64)> = upper.chain(lower).collect();
        chart.draw_series(std::iter::once(Polygon::new(area, color.mix(0.15).filled()))).map_err(s)?;
    }
    // Curves that coincide (e.g. every method at BoN for small β) stay visible: each later curve
    // is drawn thinner and with smaller markers, on top of the earlier ones.
    let n = curves.len() as u32;
    for (i, c) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let width = 2 + (n - 1 - i as u32).min(3);
        chart
            .draw_series(LineSeries::new(c.points.iter().map(|&(x, y, _)| (x, shown(y))), color.stroke_width(width)))
            .map_err(s)?
            .label(c.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
        let marks = c.points.iter().map(|&(x, y, _)| Circle::new((x, shown(y)), width + 2, color.filled()));
        chart.draw_series(marks).map_err(s)?;
    }
    for r in refs {
        let color = r.color;
        chart
            .draw_series(DashedLineSeries::new(
                vec![(x0, shown(r.value)), (x1, shown(r.value))],
                10,
                6,
                color.stroke_width(2),
            ))
            .map_err(s)?
            .label(r.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2)));
    }
    // The legend goes in the left corner of the half with fewer points.
    let mid = (y0 + y1) / 2.0;
    let low = ys.iter().filter(|&&y| y < mid).count();
    let corner = if 2 * low > ys.len() { SeriesLabelPosition::UpperLeft } else { SeriesLabelPosition::LowerLeft };
    legend(&mut chart, corner)
}

/// The legend box every plot draws, in `corner`.
fn legend<'a, DB, CT>(chart: &mut ChartContext<'a, DB, CT>, corner: SeriesLabelPosition) -> Result<(), String>
where
    DB: DrawingBackend + 'a,
    CT: CoordTranslate,
{
    chart
        .configure_series_labels()
        .position(corner)
        .label_font((FAMILY, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(s)
}

/// Reward of the pick vs β, per β-method, with references: BoN, MBR, the oracle, random.
fn reward_vs_beta(summary: &Summary, reward: &str, dir: &Path, is_gold: bool) -> Result<Vec<PathBuf>, ReportError> {
    let Some(k) = summary.reward_index(reward) else { return Ok(Vec::new()) };
    let mut curves: Vec<Curve> = Vec::new();
    let mut refs: Vec<Reference> = Vec::new();
    for r in &summary.rows {
        let (v, se) = r.rewards[k];
        let uses_beta = r.method.parse::<Method>().is_ok_and(Method::uses_beta);
        if uses_beta {
            if r.beta <= 0.0 {
                continue; // β = 0 has no place on a log axis (it is BoN anyway).
            }
            match curves.iter_mut().find(|c| c.label == r.method) {
                Some(c) => c.points.push((r.beta, v, se)),
                None => curves.push(Curve { label: r.method.clone(), points: vec![(r.beta, v, se)] }),
            }
        } else {
            let color = match r.method.parse::<Label>() {
                Ok(Label::Rule(Method::Bon)) => BLACK,
                Ok(Label::Rule(Method::Mbr)) => RGBColor(0x8c, 0x56, 0x4b),
                Ok(Label::Random) => GREY,
                Ok(Label::Oracle(g)) if g == reward || !is_gold => GREEN,
                _ => continue,
            };
            refs.push(Reference { label: r.method.clone(), value: v, se, color });
        }
    }
    curves.retain(|c| !c.points.is_empty());
    for c in &mut curves {
        c.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    if curves.is_empty() {
        return Ok(Vec::new());
    }
    let kind = if is_gold { "gold" } else { "proxy" };
    let title = format!("{}: {kind} reward `{reward}` of the pick vs β", summary.run_name);
    let y_desc = format!("mean {kind} reward ({reward}) over {} prompts, ± 1 s.e.", summary.prompts);
    both!(dir, format!("{kind}_vs_beta_{reward}"), |root| draw_beta(&root, &title, &y_desc, &curves, &refs))
}

/// A scatter layer: label, points, colour, marker size.
type Layer = (String, Vec<(f64, f64)>, RGBColor, u32);

fn draw_scatter<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    layers: &[Layer],
    diagonal: bool,
) -> Result<(), String> {
    let all = || layers.iter().flat_map(|l| l.1.iter());
    let (x0, x1) =
        padded(all().map(|p| p.0).fold(f64::INFINITY, f64::min), all().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max));
    let (y0, y1) =
        padded(all().map(|p| p.1).fold(f64::INFINITY, f64::min), all().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max));
    let (x0, x1, y0, y1) = if diagonal { (x0.min(y0), x1.max(y1), x0.min(y0), x1.max(y1)) } else { (x0, x1, y0, y1) };
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FAMILY, 24))
        .margin(16)
        .x_label_area_size(52)
        .y_label_area_size(72)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(s)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 17))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(s)?;
    if diagonal {
        chart
            .draw_series(DashedLineSeries::new(vec![(x0, x0), (x1, x1)], 8, 6, GREY.stroke_width(1)))
            .map_err(s)?
            .label("chosen = rejected")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], GREY.stroke_width(1)));
    }
    for (label, points, color, size) in layers {
        let (color, size) = (*color, *size);
        chart
            .draw_series(points.iter().map(|&(x, y)| Circle::new((shown(x), shown(y)), size, color.mix(0.6).filled())))
            .map_err(s)?
            .label(label.clone())
            .legend(move |(x, y)| Circle::new((x + 12, y), 5, color.filled()));
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)
}

/// A column as floats, nulls kept in place.
fn column(df: &DataFrame, name: &str, at: &Path) -> Result<Vec<Option<f64>>, ReportError> {
    let c = df.column(name).map_err(ReportError::polars(at))?;
    let c = c.cast(&polars::prelude::DataType::Float64).map_err(ReportError::polars(at))?;
    let ca = c.f64().map_err(ReportError::polars(at))?;
    Ok((0..ca.len()).map(|i| ca.get(i)).collect())
}

fn points(df: &DataFrame, x: &str, y: &str, at: &Path) -> Result<Vec<(f64, f64)>, ReportError> {
    let (xs, ys) = (column(df, x, at)?, column(df, y, at)?);
    Ok(xs
        .into_iter()
        .zip(ys)
        .filter_map(|(a, b)| Some((a?, b?)))
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect())
}

/// Proxy vs gold reward over every sample, with BoN's and the oracle's picks highlighted.
fn proxy_vs_gold(run: &RunData, summary: &Summary, gold: &str, dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    let Some(proxy) = summary.proxy.first() else { return Ok(Vec::new()) };
    if run.scores.is_empty() {
        return Ok(Vec::new());
    }
    let (rp, rg) = (reward_column(proxy), reward_column(gold));
    let at = run.root.join(StageName::Scores.as_str());
    let samples =
        scan(&run.scores)?.select([col(rp.as_str()), col(rg.as_str())]).collect().map_err(ReportError::polars(&at))?;
    let sel_at = run.root.join(StageName::Selections.as_str());
    let picks = |m: String| -> Result<Vec<(f64, f64)>, ReportError> {
        let df = scan(&run.selections)?
            .filter(col(METHOD).eq(lit(m)))
            .select([col(rp.as_str()), col(rg.as_str())])
            .collect()
            .map_err(ReportError::polars(&sel_at))?;
        points(&df, &rp, &rg, &sel_at)
    };
    let mut layers = vec![("all samples".to_owned(), points(&samples, &rp, &rg, &at)?, GREY, 2)];
    if run.select.methods.contains(&Method::Bon) {
        layers.push(("BoN pick".to_owned(), picks(Method::Bon.to_string())?, COLORS[1], 4));
    }
    let oracle = Label::oracle(gold).to_string();
    layers.push((format!("{oracle} pick"), picks(oracle)?, GREEN, 4));
    let r = summary.correlations.iter().find(|c| c.proxy == *proxy && c.gold == gold);
    let r_text = r.and_then(|c| c.pooled).map_or(String::new(), |v| format!(" (Pearson r = {v:.2})"));
    let title = format!("{}: proxy vs gold reward{r_text}", summary.run_name);
    let descs = (format!("proxy reward ({proxy})"), format!("gold reward ({gold})"));
    both!(dir, format!("proxy_vs_gold_{gold}"), |root| draw_scatter(
        &root,
        &title,
        (&descs.0, &descs.1),
        &layers,
        false
    ))
}

/// Mean length of the chosen responses of the exported pairs vs β per method, beside the mean
/// length of the rejected ones and BoN's chosen: does regularization pick shorter or longer
/// responses, and how far from the rejected?
fn length_pairs(run: &RunData, summary: &Summary, dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    if run.pairs.is_empty() {
        return Ok(Vec::new());
    }
    let at = run.root.join(StageName::Pairs.as_str());
    let features = run.features()?;
    let tokens = features.column(F_TOKENS).map_err(ReportError::polars(&at))?.null_count() == 0;
    let len_col = if tokens { F_TOKENS } else { F_CHARS };
    let unit = if tokens { "tokens" } else { "characters" };
    let lens = features.lazy().select([col(PROMPT_ID), col(SAMPLE_IDX), col(len_col)]);
    let pairs = scan(&run.pairs)?
        .select([col(PROMPT_ID), col(METHOD), col(BETA), col(CHOSEN_INDEX), col(REJECTED_INDEX)])
        .join(
            lens.clone().select([col(PROMPT_ID), col(SAMPLE_IDX), col(len_col).alias("chosen_len")]),
            [col(PROMPT_ID), col(CHOSEN_INDEX)],
            [col(PROMPT_ID), col(SAMPLE_IDX)],
            JoinArgs::new(JoinType::Left),
        )
        .join(
            lens.select([col(PROMPT_ID), col(SAMPLE_IDX), col(len_col).alias("rejected_len")]),
            [col(PROMPT_ID), col(REJECTED_INDEX)],
            [col(PROMPT_ID), col(SAMPLE_IDX)],
            JoinArgs::new(JoinType::Left),
        );
    let means = pairs
        .group_by([col(METHOD), col(BETA)])
        .agg([
            col("chosen_len").mean(),
            col("chosen_len").std(1).alias("chosen_std"),
            col("rejected_len").mean(),
            len().alias("n"),
        ])
        .collect()
        .map_err(ReportError::polars(&at))?;
    let methods = means.column(METHOD).and_then(|c| c.str().cloned()).map_err(ReportError::polars(&at))?;
    let betas = points(&means, BETA, "n", &at)?;
    let chosen = points(&means, BETA, "chosen_len", &at)?;
    let rejected = points(&means, "rejected_len", "n", &at)?;
    // One-prompt exports have no spread: their error is left out.
    let spread = column(&means, "chosen_std", &at)?;
    let se_of = |i: usize| {
        let (n, sd) = (betas[i].1, spread[i]?);
        (n > 1.0 && sd.is_finite()).then(|| sd / n.sqrt())
    };
    if chosen.len() != means.height() || rejected.len() != means.height() || betas.len() != means.height() {
        return Ok(Vec::new());
    }
    let mut curves: Vec<Curve> = Vec::new();
    let mut refs: Vec<Reference> = Vec::new();
    let (mut rej_sum, mut rej_n) = (0.0, 0.0);
    for i in 0..means.height() {
        let (Some(m), (b, n)) = (methods.get(i), betas[i]) else { continue };
        let (c, r) = (chosen[i].1, rejected[i].0);
        rej_sum += r * n;
        rej_n += n;
        match m.parse::<Method>() {
            Ok(method) if method.uses_beta() && b > 0.0 => {
                match curves.iter_mut().find(|x| x.label == format!("{m} (chosen)")) {
                    Some(x) => x.points.push((b, c, se_of(i))),
                    None => curves.push(Curve { label: format!("{m} (chosen)"), points: vec![(b, c, se_of(i))] }),
                }
            }
            Ok(Method::Bon) => {
                refs.push(Reference { label: "bon (chosen)".into(), value: c, se: se_of(i), color: BLACK })
            }
            Ok(Method::Mbr) => refs.push(Reference {
                label: "mbr (chosen)".into(),
                value: c,
                se: se_of(i),
                color: RGBColor(0x8c, 0x56, 0x4b),
            }),
            _ => {}
        }
    }
    for c in &mut curves {
        c.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    curves.sort_by_key(|c| run.select.methods.iter().position(|m| c.label.starts_with(m.as_str())));
    if rej_n > 0.0 {
        refs.push(Reference { label: "rejected (all pairs)".into(), value: rej_sum / rej_n, se: None, color: GREY });
    }
    if curves.is_empty() {
        return Ok(Vec::new());
    }
    let title = format!("{}: length of chosen and rejected responses vs β", summary.run_name);
    let y_desc = format!("mean length over the exported pairs ({unit}), ± 1 s.e.");
    both!(dir, "length_vs_beta", |root| draw_beta(&root, &title, &y_desc, &curves, &refs))
}

/// Draws every plot the run has data for; returns the files written.
pub fn draw_all(run: &RunData, summary: &Summary, dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    if !font_registered() {
        return Err(ReportError::Plot { path: dir.to_owned(), message: "the embedded font did not load".into() });
    }
    let mut files = Vec::new();
    for g in &summary.gold {
        files.extend(reward_vs_beta(summary, g, dir, true)?);
    }
    if let [proxy] = summary.proxy.as_slice() {
        files.extend(reward_vs_beta(summary, proxy, dir, false)?);
    }
    for g in &summary.gold {
        files.extend(proxy_vs_gold(run, summary, g, dir)?);
    }
    files.extend(length_pairs(run, summary, dir)?);
    Ok(files)
}
