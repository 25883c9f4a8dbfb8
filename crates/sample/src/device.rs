//! Drawing where the logits are: on a GPU (or on the CPU with `RBON_KERNELS=candle`) a step's
//! logits never leave the device whole. What crosses to the host per row and step:
//!
//! - **Untruncated sampling** (the RBoN case, any temperature): the row's maximum and the sums of
//!   its weights over chunks of [`CHUNK`] tokens (`vocab / 256` values); the host picks a chunk
//!   with the row's uniform number, and that chunk's 256 logits come back for the token: an
//!   inverse-CDF draw in two levels, exact up to the f32 rounding of the chunk sums.
//! - **Greedy**: the argmax and the chunk sums (for the log-prob).
//! - **top-k / top-p / min-p**: the row's best [`CANDIDATES`] logits with their ids, found on the
//!   device by sorting chunks of [`SORT_WIDTH`] and keeping each chunk's best until one chunk is
//!   left; the host then cuts and draws among them as the host sampler does. A row whose cut
//!   needs tokens past the candidates (top-p or min-p over a flat distribution, or top-k above
//!   [`CANDIDATES`]) is copied whole and drawn by the host sampler.
//!
//! The log-prob is always l_t − log Σ exp(l) of the untempered logits, from the untempered chunk
//! sums finished in f64. Every step of a row is a function of that row's logits and uniform
//! alone, so draws do not depend on which rows decode together (the logits themselves may, on a
//! GPU: see README, "GPU build").

use candle_core::{D, DType, Tensor};
use rbon_models::rows::{self, CHUNK};

use crate::sampler::{Draw, SamplingParams, cut_top_p, draw};

type Result<T> = std::result::Result<T, candle_core::Error>;

/// Widest row one device sort handles (candle's CUDA sort runs a row in one thread block).
pub const SORT_WIDTH: usize = 1024;

/// Candidates kept for truncated sampling (at most half of [`SORT_WIDTH`], so each round of the
/// tournament halves the row).
pub const CANDIDATES: usize = 512;

/// Draws one token per row of `logits` [rows, vocab], with `us[r]` ∈ [0, 1) the uniform number of
/// row `r` (see [`crate::sampler::draw`], whose distribution this realises).
pub fn draw_rows(logits: &Tensor, p: &SamplingParams, us: &[f64]) -> Result<Vec<Draw>> {
    let logits = logits.to_dtype(DType::F32)?.contiguous()?;
    let (n, vocab) = logits.dims2()?;
    if n != us.len() {
        candle_core::bail!("draw_rows: {n} rows but {} uniform numbers", us.len());
    }
    let dev = logits.device();
    let c = rows::chunked(&logits)?;
    let chunks = c.dim(1)?;
    let (max_t, max) = rows::row_max(&c)?;
    let untempered = rows::chunk_sums(&c, &max_t, 1.0)?;
    let lse = rows::log_sum_exp(&max, &untempered);
    let draw_of = |r: usize, token: u32, logit: f32| Draw { token, logprob: f64::from(logit) - lse[r] };

    if p.temperature <= 0.0 || vocab == 1 {
        // Greedy; ties to the lowest id.
        let ids: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        let picked = gather(&logits, &ids)?;
        return Ok((0..n).map(|r| draw_of(r, ids[r], picked[r])).collect());
    }
    let inv_t = 1.0 / f64::from(p.temperature);
    let truncating = p.top_k > 0 && p.top_k < vocab || p.top_p < 1.0 || p.min_p > 0.0;
    if !truncating {
        let weights = if p.temperature == 1.0 { untempered } else { rows::chunk_sums(&c, &max_t, inv_t)? };
        // The chunk holding each row's target, and where in the chunk's mass the target falls.
        let mut at = Vec::with_capacity(n);
        for (r, w) in weights.iter().enumerate() {
            let target = us[r] * w.iter().sum::<f64>();
            let mut acc = 0.0;
            let mut pick = (w.iter().rposition(|&x| x > 0.0).unwrap_or(0), 0.0);
            for (ci, &x) in w.iter().enumerate() {
                if target < acc + x {
                    pick = (ci, (target - acc) / x);
                    break;
                }
                acc += x;
            }
            at.push(pick);
        }
        let idx: Vec<u32> = at.iter().enumerate().map(|(r, &(ci, _))| (r * chunks + ci) as u32).collect();
        let picked: Vec<Vec<f32>> =
            c.reshape((n * chunks, CHUNK))?.index_select(&Tensor::new(idx.as_slice(), dev)?, 0)?.to_vec2()?;
        return Ok((0..n)
            .map(|r| {
                let (ci, frac) = at[r];
                let m = f64::from(max[r]);
                let w: Vec<f64> = picked[r].iter().map(|&l| ((f64::from(l) - m) * inv_t).exp()).collect();
                let target = frac * w.iter().sum::<f64>();
                let mut acc = 0.0;
                let mut j = w.iter().rposition(|&x| x > 0.0).unwrap_or(0);
                for (k, &x) in w.iter().enumerate() {
                    acc += x;
                    if target < acc {
                        j = k;
                        break;
                    }
                }
                draw_of(r, (ci * CHUNK + j) as u32, picked[r][j])
            })
            .collect());
    }

    let top_k = if p.top_k > 0 && p.top_k < vocab { p.top_k } else { 0 };
    let m = if top_k > 0 { top_k.min(CANDIDATES) } else { CANDIDATES.min(vocab) };
    let (vals, ids) = top_candidates(&logits, m)?;
    // Top-p without top-k is relative to the whole vocabulary's mass.
    let totals: Option<Vec<f64>> = if p.top_p < 1.0 && top_k == 0 {
        Some(rows::chunk_sums(&c, &max_t, inv_t)?.iter().map(|w| w.iter().sum()).collect())
    } else {
        None
    };
    let mut out = Vec::with_capacity(n);
    for r in 0..n {
        let on_host = |out: &mut Vec<Draw>| -> Result<()> {
            let row: Vec<f32> = logits.get(r)?.to_vec1()?;
            out.push(draw(&row, p, us[r]));
            Ok(())
        };
        if top_k > CANDIDATES {
            on_host(&mut out)?;
            continue;
        }
        // Sorted by logit, highest first; padding (−∞) dropped.
        let real = vals[r].iter().take_while(|v| v.is_finite()).count().max(1);
        let mut cand: Vec<u32> = ids[r][..real].to_vec();
        let top = f64::from(vals[r][0]);
        let mut weights: Vec<f64> = vals[r][..real].iter().map(|&v| ((f64::from(v) - top) * inv_t).exp()).collect();
        let complete = top_k > 0 || real == vocab;
        if p.top_p < 1.0 {
            let total = match &totals {
                Some(t) => t[r],
                None => weights.iter().sum(),
            };
            if weights.iter().sum::<f64>() < f64::from(p.top_p) * total {
                on_host(&mut out)?;
                continue;
            }
            cut_top_p(&mut cand, &mut weights, p.top_p, total);
        }
        if p.min_p > 0.0 {
            let floor = f64::from(p.min_p) * weights[0];
            let keep = weights.iter().take_while(|&&w| w >= floor).count().max(1);
            if keep == weights.len() && !complete && p.top_p >= 1.0 {
                // Every candidate passes: tokens past them may too.
                on_host(&mut out)?;
                continue;
            }
            cand.truncate(keep);
            weights.truncate(keep);
        }
        let target = us[r] * weights.iter().sum::<f64>();
        let mut acc = 0.0;
        let mut j = cand.len() - 1;
        for (k, w) in weights.iter().enumerate() {
            acc += w;
            if target < acc {
                j = k;
                break;
            }
        }
        let at = ids[r].iter().position(|&t| t == cand[j]).unwrap_or(0);
        out.push(draw_of(r, cand[j], vals[r][at]));
    }
    Ok(out)
}

/// The logits at `ids[r]` of each row.
fn gather(logits: &Tensor, ids: &[u32]) -> Result<Vec<f32>> {
    let idx = Tensor::new(ids, logits.device())?.unsqueeze(1)?;
    logits.gather(&idx, 1)?.squeeze(1)?.to_vec1()
}

/// Per row: logits, highest first, and their token ids.
type Candidates = (Vec<Vec<f32>>, Vec<Vec<u32>>);

/// Each row's `m` largest logits, highest first, with their ids: rows are cut into chunks of
/// [`SORT_WIDTH`] that are sorted on the device, each keeping its best `m`, until one chunk is
/// left.
fn top_candidates(logits: &Tensor, m: usize) -> Result<Candidates> {
    let dev = logits.device();
    let (n, vocab) = logits.dims2()?;
    let mut vals = logits.clone();
    let mut ids = Tensor::arange(0u32, vocab as u32, dev)?.unsqueeze(0)?.broadcast_as((n, vocab))?.contiguous()?;
    loop {
        let width = vals.dim(1)?;
        if width <= SORT_WIDTH {
            let order = vals.arg_sort_last_dim(false)?.narrow(1, 0, m.min(width))?.contiguous()?;
            return Ok((vals.gather(&order, 1)?.to_vec2()?, ids.gather(&order, 1)?.to_vec2()?));
        }
        let chunks = width.div_ceil(SORT_WIDTH);
        let pad = chunks * SORT_WIDTH - width;
        if pad > 0 {
            vals = Tensor::cat(&[&vals, &Tensor::full(f32::NEG_INFINITY, (n, pad), dev)?], 1)?;
            ids = Tensor::cat(&[&ids, &Tensor::zeros((n, pad), DType::U32, dev)?], 1)?;
        }
        let v = vals.reshape((n, chunks, SORT_WIDTH))?;
        let i = ids.reshape((n, chunks, SORT_WIDTH))?;
        let order = v.arg_sort_last_dim(false)?.narrow(2, 0, m)?.contiguous()?;
        vals = v.gather(&order, 2)?.reshape((n, chunks * m))?;
        ids = i.gather(&order, 2)?.reshape((n, chunks * m))?;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The host sampler and the device sampler over the same logits and a grid of uniforms:
    /// the same tokens (away from rounding at CDF boundaries, which a fine grid rarely hits) and
    /// the same log-probs.
    fn agree(logits: &[f32], p: &SamplingParams) {
        let grid = 200;
        let us: Vec<f64> = (0..grid).map(|i| (i as f64 + 0.5) / grid as f64).collect();
        let t = Tensor::from_vec(logits.repeat(grid), (grid, logits.len()), &Device::Cpu).unwrap();
        let got = draw_rows(&t, p, &us).unwrap();
        let mut differ = 0;
        for (u, g) in us.iter().zip(&got) {
            let want = draw(logits, p, *u);
            differ += usize::from(want.token != g.token);
            assert!((g.logprob - f64::from(logits[g.token as usize]) + lse(logits)).abs() < 1e-5, "{p:?}");
        }
        assert!(differ <= 1, "{p:?}: {differ} of {grid} draws differ from the host sampler's");
    }

    fn lse(l: &[f32]) -> f64 {
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        m + l.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
    }

    fn logits(vocab: usize, spread: f32) -> Vec<f32> {
        (0..vocab).map(|i| ((i * 7919 + 13) % 10007) as f32 / 10007.0 * spread - spread / 2.0).collect()
    }

    #[test]
    fn every_parameter_draws_as_the_host_sampler() {
        let base = SamplingParams::default();
        // 5,000 tokens: several chunks of 256 and of 1,024, a partial last one of each.
        for l in [logits(5000, 12.0), logits(300, 6.0), logits(7, 3.0)] {
            for p in [
                base,
                SamplingParams { temperature: 0.7, ..base },
                SamplingParams { temperature: 0.0, ..base },
                SamplingParams { top_k: 40, ..base },
                SamplingParams { top_k: 40, top_p: 0.8, temperature: 0.9, ..base },
                SamplingParams { top_p: 0.9, ..base },
                SamplingParams { min_p: 0.05, ..base },
                SamplingParams { top_k: 700, ..base },
                SamplingParams { top_p: 0.95, min_p: 0.1, ..base },
            ] {
                agree(&l, &p);
            }
        }
        // Flat: top-p and min-p need more than the candidates, so those rows go to the host.
        let flat = logits(5000, 0.5);
        agree(&flat, &SamplingParams { top_p: 0.9, ..base });
        agree(&flat, &SamplingParams { min_p: 0.5, ..base });
    }

    #[test]
    fn the_candidates_are_the_top_logits_in_order() {
        let l = logits(5000, 12.0);
        let t = Tensor::from_vec(l.clone(), (1, 5000), &Device::Cpu).unwrap();
        let (vals, ids) = top_candidates(&t, 100).unwrap();
        let mut order: Vec<u32> = (0..5000).collect();
        order.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
        assert_eq!(ids[0], order[..100]);
        assert!(vals[0].iter().zip(&ids[0]).all(|(v, &i)| *v == l[i as usize]));
    }
}
