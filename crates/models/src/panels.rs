//! Prefill-shaped bf16 products on CPUs with AVX-512-BF16 but no AMX (Zen 4 on, Cooper Lake):
//! `out ← gelu?((accumulate ? out : 0) + x · wᵀ + bias)` for many input rows (an encoder's
//! batch of tokens), with x rounded to bf16 and every sum in f32.
//!
//! The decode kernel in [`crate::lowp`] takes dot products along k and reduces each one across
//! a register at the end; that is right for a handful of rows, whose cost is reading the weight,
//! but over an encoder's batch the reductions and the copies around them left it at about half
//! of `vdpbf16ps`'s rate. Here the product is an outer
//! product, as in a BLAS: the weight is stored at load time in panels of [`NR`] output columns
//! whose k values are interleaved in pairs (the layout `vdpbf16ps` multiplies: lane j of one
//! register holds w[j][2p] and w[j][2p + 1]), each input row is rounded to bf16 (a row of bf16
//! read as 32-bit lanes is its pairs), and a tile of MR × NR sums stays in 24 registers for the
//! whole of k: per pair of k values, two weight loads, [`MR`] broadcasts (one from each row of
//! the tile) and 24 `vdpbf16ps` (768 products). The epilogue (residual, bias, GELU) is applied
//! to each tile in the registers, which are then stored as f32 or, for an output that only
//! feeds the next product (an encoder's intermediate activations), rounded straight to the bf16
//! pairs that product reads. [`attention`] runs an encoder's attention on the same kernel.
//!
//! Each output sums its k terms in one order, a pair at a time from k = 0, whatever the shape,
//! the thread count or the other rows of the batch, so a row's result does not depend on them.

use rayon::prelude::*;

use crate::epilogue::{Epilogue, Mat};

/// Output columns per weight panel: two registers of 16 f32 sums.
pub(crate) const NR: usize = 32;
/// Input rows per tile (12 × 2 accumulators, 2 weight registers and a broadcast fit the 32).
pub(crate) const MR: usize = 12;

/// A weight [rows, cols] in bf16, in panels of [`NR`] rows with the cols interleaved in pairs:
/// `data[(c · pairs + p) · NR + j]` holds w[c·NR + j][2p] in its low half and w[c·NR + j][2p + 1]
/// in its high half (zero past the weight's edges).
#[derive(Debug)]
pub(crate) struct Panels {
    rows: usize,
    cols: usize,
    pairs: usize,
    data: Vec<u32>,
}

/// Two bf16 values as one 32-bit lane: `lo` in the low half.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    u32::from(crate::lowp::bf16_bits(lo)) | (u32::from(crate::lowp::bf16_bits(hi)) << 16)
}

impl Panels {
    /// `w` is [rows, cols], row-major, rounded to bf16 here.
    ///
    /// # Panics
    /// When `w` does not hold rows·cols values (a bug in the loader).
    pub(crate) fn new(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols, "Panels: {rows}×{cols} from {} values", w.len());
        Self::of_rows(Mat::new(w, rows, cols), Vec::new())
    }

    /// The weight whose rows are the rows of `x`, into `data` (its capacity reused).
    fn of_rows(x: Mat, mut data: Vec<u32>) -> Self {
        let (rows, cols, pairs) = (x.rows, x.cols, x.cols.div_ceil(2));
        data.clear();
        data.resize(rows.div_ceil(NR) * pairs * NR, 0);
        pack_panels(x, pairs, &mut data);
        Self { rows, cols, pairs, data }
    }

    /// The weight whose rows are the columns of `x` (xᵀ), into `data` (its capacity reused):
    /// pair p of output column j is x[2p][j] and x[2p + 1][j], two rows rounded side by side.
    fn of_columns(x: Mat, mut data: Vec<u32>) -> Self {
        let (rows, cols, pairs) = (x.cols, x.rows, x.rows.div_ceil(2));
        data.clear();
        data.resize(rows.div_ceil(NR) * pairs * NR, 0);
        for (c, panel) in data.chunks_exact_mut(pairs * NR).enumerate() {
            let (j0, width) = (c * NR, NR.min(rows - c * NR));
            for (p, lanes) in panel.chunks_exact_mut(NR).enumerate() {
                let lo = &x.data[2 * p * x.stride + j0..][..width];
                let hi = (2 * p + 1 < cols).then(|| &x.data[(2 * p + 1) * x.stride + j0..][..width]);
                interleave(lo, hi, &mut lanes[..width]);
            }
        }
        Self { rows, cols, pairs, data }
    }
}

/// The rows of `x` (k = `pairs`·2 values, the last one zero when k is odd) rounded to bf16 in
/// panels of [`NR`] rows, the layout of [`Panels`]: `out[(c · pairs + p) · NR + j]` is the pair
/// p of row c·NR + j (zero for rows past the end). A row of bf16 values read as 32-bit lanes is
/// its pairs, so each row is rounded whole (16 values per instruction where the CPU has
/// AVX-512-BF16) and then spread over its panel.
fn pack_panels(x: Mat, pairs: usize, out: &mut [u32]) {
    let k = x.cols;
    let mut row_pairs = vec![0u32; pairs];
    for (t, tile) in out.chunks_exact_mut(pairs * NR).enumerate() {
        for r in 0..NR {
            let i = t * NR + r;
            if i >= x.rows {
                row_pairs.fill(0);
            } else {
                round_row(&x.data[i * x.stride..][..k], &mut row_pairs);
            }
            for (p, &v) in row_pairs.iter().enumerate() {
                tile[p * NR + r] = v;
            }
        }
    }
}

/// `row` rounded to bf16 (to nearest, ties to even) as pairs into `out` (`row.len()`/2 rounded
/// up; a missing last value is zero).
pub(crate) fn round_row(row: &[f32], out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::lowp::dot_bf16_available() {
        // SAFETY: `dot_bf16_available` checked the features `avx512::round_row` is compiled for.
        #[expect(unsafe_code, reason = "calling a function compiled for AVX-512-BF16")]
        unsafe {
            avx512::round_row(row, out)
        };
        return;
    }
    for (p, o) in out.iter_mut().enumerate() {
        *o = pair(row[2 * p], row.get(2 * p + 1).copied().unwrap_or(0.0));
    }
}

/// The rows of `x` rounded to bf16 pairs as [`round_row`] does, row i at `out[i · stride..]`.
fn round_rows(x: Mat, out: &mut [u32], stride: usize) {
    let pairs = x.cols.div_ceil(2);
    for (i, r) in out.chunks_mut(stride).take(x.rows).enumerate() {
        round_row(&x.data[i * x.stride..][..x.cols], &mut r[..pairs]);
    }
}

/// `out[j]` ← the pair (`lo[j]`, `hi[j]`) rounded to bf16 (`hi` zero when absent).
pub(crate) fn interleave(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::lowp::dot_bf16_available() {
        // SAFETY: `dot_bf16_available` checked the features `avx512::interleave` is compiled for.
        #[expect(unsafe_code, reason = "calling a function compiled for AVX-512-BF16")]
        unsafe {
            avx512::interleave(lo, hi, out)
        };
        return;
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = pair(lo[j], hi.map_or(0.0, |h| h[j]));
    }
}

/// softmax(scale · x) of one row rounded to bf16 pairs into `out`, as
/// [`crate::kernels::softmax_pairs`] (which serves CPUs without AVX-512-BF16); `x` is left
/// holding the unnormalised exponentials.
///
/// # Panics
/// When `out` holds fewer than `x.len()`/2 (rounded up) pairs (a bug in the caller).
pub(crate) fn softmax_pairs(x: &mut [f32], scale: f32, out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::lowp::dot_bf16_available() {
        // SAFETY: `dot_bf16_available` checked the features `avx512::softmax_pairs` is compiled
        // for.
        #[expect(unsafe_code, reason = "calling a function compiled for AVX-512-BF16")]
        unsafe {
            avx512::softmax_pairs(x, scale, out)
        };
        return;
    }
    crate::kernels::softmax_pairs(x, scale, out);
}

/// The left operand of [`linear`]: f32 rows, rounded to bf16 pairs there, or rows already in
/// pairs (an earlier product's [`Out::Pairs`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Input<'a> {
    Rows(Mat<'a>),
    Pairs { a: Lhs<'a>, rows: usize },
}

/// Where a product's sums go, through the epilogue.
#[derive(Debug)]
pub(crate) enum Out<'a> {
    /// f32 rows, the second field apart.
    F32(&'a mut [f32], usize),
    /// bf16 pairs (to nearest, ties to even), rows the second field (in pairs) apart, as
    /// [`Input::Pairs`] reads them: for an output that only feeds another product. A fresh
    /// sum only (no residual to accumulate into); with an odd number of columns, the last high
    /// half is zero.
    Pairs(&'a mut [u32], usize),
}

impl<'a> Out<'a> {
    /// The output from row `r0` on.
    fn rows_from(&mut self, r0: usize) -> Out<'_> {
        match self {
            Out::F32(d, ld) => Out::F32(&mut d[r0 * *ld..], *ld),
            Out::Pairs(d, ld) => Out::Pairs(&mut d[r0 * *ld..], *ld),
        }
    }

    /// Whether `m` rows of `n` columns fit, rows not overlapping.
    fn fits(&self, m: usize, n: usize) -> bool {
        let fits = |len: usize, ld: usize, width: usize| ld >= width && (m == 0 || len >= (m - 1) * ld + width);
        match self {
            Out::F32(d, ld) => fits(d.len(), *ld, n),
            Out::Pairs(d, ld) => fits(d.len(), *ld, n.div_ceil(2)),
        }
    }

    /// The first `m` rows (of `n` columns, the last row cut there), in consecutive chunks of
    /// `rows` rows.
    fn chunks(self, m: usize, n: usize, rows: usize) -> Vec<Out<'a>> {
        match self {
            Out::F32(d, ld) => d[..(m - 1) * ld + n].chunks_mut(rows * ld).map(|c| Out::F32(c, ld)).collect(),
            Out::Pairs(d, ld) => {
                d[..(m - 1) * ld + n.div_ceil(2)].chunks_mut(rows * ld).map(|c| Out::Pairs(c, ld)).collect()
            }
        }
    }
}

/// `out ← gelu?((accumulate ? out : 0) + x · wᵀ + bias)`, `out` [x's rows, w.rows].
/// `threads`: split the rows over rayon's pool.
///
/// # Panics
/// When a view does not fit its buffer, the shapes disagree, or pairs are asked to accumulate
/// (a bug in the caller).
pub(crate) fn linear(x: Input, w: &Panels, out: Out, then: Epilogue, threads: bool) {
    let n = w.rows;
    let m = match x {
        Input::Rows(x) => {
            assert!(x.cols == w.cols && x.fits(), "panels::linear: the input rows do not fit the weight");
            x.rows
        }
        Input::Pairs { a, rows } => {
            assert!(
                a.stride >= w.pairs && (rows == 0 || a.data.len() >= (rows - 1) * a.stride + w.pairs),
                "panels::linear: the input pairs do not fit the weight"
            );
            rows
        }
    };
    assert!(then.bias.is_none_or(|b| b.len() == n), "panels::linear: the bias is not one value per output");
    if m == 0 || n == 0 {
        return;
    }
    assert!(out.fits(m, n), "panels::linear: the output does not fit its buffer");
    let tiles = m.div_ceil(MR);
    // Rows per task, in whole tiles: every thread busy, each task long enough to amortise
    // reading the weight.
    let per_task = MR * if threads { tiles.div_ceil(rayon::current_num_threads().max(1)).max(1) } else { tiles };
    // Rows to round go through a buffer this thread keeps between calls (taken, so that a call
    // nested in this one while rayon waits just allocates its own).
    let mut a = ROWS.with(std::cell::Cell::take);
    a.resize(if matches!(x, Input::Rows(_)) { m * w.pairs } else { 0 }, 0);
    let outs = out.chunks(m, n, per_task);
    let jobs: Vec<_> = match x {
        Input::Rows(_) => outs.into_iter().zip(a.chunks_mut(per_task * w.pairs.max(1))).enumerate().collect(),
        Input::Pairs { .. } => {
            outs.into_iter().zip(std::iter::repeat_with(<&mut [u32]>::default)).enumerate().collect()
        }
    };
    let run = |(c, (out, buf)): (usize, (Out, &mut [u32]))| {
        let r0 = c * per_task;
        let rows = (m - r0).min(per_task);
        let lhs = match x {
            Input::Rows(x) => {
                round_rows(Mat { data: &x.data[r0 * x.stride..], rows, cols: x.cols, stride: x.stride }, buf, w.pairs);
                Lhs { data: buf, stride: w.pairs }
            }
            Input::Pairs { a, .. } => Lhs { data: &a.data[r0 * a.stride..], stride: a.stride },
        };
        product(lhs, w, rows, out, then);
    };
    if threads && m > per_task {
        jobs.into_par_iter().for_each(run);
    } else {
        jobs.into_iter().for_each(run);
    }
    ROWS.with(|r| r.set(a));
}

thread_local! {
    /// [`linear`]'s buffer of rounded input rows.
    static ROWS: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// One thread's buffers for [`attention`], kept across calls.
#[derive(Debug, Default)]
pub(crate) struct AttentionScratch {
    scores: Vec<f32>,
    rows: Vec<u32>,
    panel: Vec<u32>,
}

/// Bidirectional multi-head attention over the `t` tokens of one sequence with bf16 products
/// (sums in f32): for each head h, `out[:, h·d..(h + 1)·d] ← softmax(q_h · k_hᵀ / √d) · v_h`,
/// where q_h is columns h·d.. of `q` (likewise k and v) and `out` has row stride `ldo`. The
/// queries, keys, values and attention weights are rounded to bf16 as they enter a product, as
/// torch does in bf16; the softmax runs in f32.
///
/// # Panics
/// When a view does not fit its buffer or the shapes disagree (a bug in the caller).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    q: Mat,
    k: Mat,
    v: Mat,
    heads: usize,
    d: usize,
    out: &mut [f32],
    ldo: usize,
    s: &mut AttentionScratch,
) {
    let t = q.rows;
    assert!(k.rows == t && v.rows == t, "panels::attention: queries, keys and values differ in length");
    assert!(
        [q, k, v].iter().all(|m| m.cols >= heads * d && m.fits()),
        "panels::attention: a view is narrower than its heads"
    );
    if t == 0 || d == 0 {
        return;
    }
    assert!(ldo >= heads * d && (t - 1) * ldo + heads * d <= out.len(), "panels::attention: the output does not fit");
    let scale = 1.0 / (d as f32).sqrt();
    let (dp, tp) = (d.div_ceil(2), t.div_ceil(2));
    for h in 0..heads {
        // scores ← q_h · k_hᵀ: the keys are the weight, t output columns over k = d; the
        // queries are rounded row by row and broadcast from where they lie.
        let kh = Mat { data: &k.data[h * d..], rows: t, cols: d, stride: k.stride };
        let keys = Panels::of_rows(kh, std::mem::take(&mut s.panel));
        s.rows.resize(t * dp.max(tp), 0);
        round_rows(Mat { data: &q.data[h * d..], rows: t, cols: d, stride: q.stride }, &mut s.rows, dp);
        s.scores.resize(t * t, 0.0);
        product(Lhs { data: &s.rows, stride: dp }, &keys, t, Out::F32(&mut s.scores, t), Epilogue::overwrite(None));
        // The weights, each row rounded as soon as it is normalised.
        for (row, r) in s.scores.chunks_exact_mut(t).zip(s.rows.chunks_exact_mut(tp)) {
            softmax_pairs(row, scale, r);
        }
        // out_h ← p · v_h: the values are the weight, d output columns over k = t.
        let vh = Mat { data: &v.data[h * d..], rows: t, cols: d, stride: v.stride };
        let values = Panels::of_columns(vh, keys.data);
        let out = Out::F32(&mut out[h * d..], ldo);
        product(Lhs { data: &s.rows, stride: tp }, &values, t, out, Epilogue::overwrite(None));
        s.panel = values.data;
    }
}

/// Bytes of a block of rows' packed inputs and outputs kept in L2 while every panel passes over
/// it (half of a 1 MiB L2: the panel in use and the next block's rows share the rest).
const BLOCK_BYTES: usize = 512 << 10;

/// The left operand of a product: rows of bf16 pairs, row i's pair p at `data[i · stride + p]`
/// (as [`round_row`] writes a row), which the kernel broadcasts from [`MR`] rows at once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lhs<'a> {
    pub(crate) data: &'a [u32],
    pub(crate) stride: usize,
}

/// The product for `m` rows of `a` into `out` (row stride `ldo`), on this thread: in blocks of
/// rows whose inputs and outputs fit in L2, each weight panel in turn against every tile of the
/// block, so that the panel is read from L1/L2 by all of the block's tiles and the block's
/// outputs (a residual stream read and written) stay in L2.
///
/// # Panics
/// When `a` or `out` is too short for `m` rows (a bug in the caller).
fn product(a: Lhs, w: &Panels, m: usize, mut out: Out, then: Epilogue) {
    if m == 0 || w.rows == 0 {
        return;
    }
    let (pairs, n) = (w.pairs, w.rows);
    assert!(a.stride >= pairs && a.data.len() >= (m - 1) * a.stride + pairs, "panels: too few input rows");
    assert!(out.fits(m, n), "panels: the output does not fit");
    assert!(!(then.accumulate && matches!(out, Out::Pairs(..))), "panels: pairs cannot accumulate");
    assert!(then.bias.is_none_or(|b| b.len() >= n), "panels: the bias is shorter than the outputs");
    let per_row = 4 * w.pairs + 4 * w.rows;
    let block = (BLOCK_BYTES / (MR * per_row)).max(1) * MR;
    for r0 in (0..m).step_by(block) {
        let rows = (m - r0).min(block);
        let (a, out) = (Lhs { data: &a.data[r0 * a.stride..], stride: a.stride }, out.rows_from(r0));
        #[cfg(target_arch = "x86_64")]
        if crate::lowp::dot_bf16_available() {
            // SAFETY: `dot_bf16_available` checked the features `avx512::product` is compiled
            // for, and the asserts above that every tile and output row is inside its slice.
            #[expect(unsafe_code, reason = "calling a function compiled for AVX-512-BF16")]
            unsafe {
                avx512::product(a.data.as_ptr(), a.stride, w, rows, out, then)
            };
            continue;
        }
        portable(a, w, rows, out, then);
    }
}

/// [`product`] in scalar code, for CPUs the kernel cannot run on (only reached when a caller
/// builds [`Panels`] there; [`crate::kernels::Weight`] keeps f32 weights on such CPUs): the
/// same terms summed in the same order, though `vdpbf16ps` rounds within a pair in its own way,
/// so the two agree to f32 rounding rather than bit for bit.
fn portable(a: Lhs, w: &Panels, m: usize, mut out: Out, then: Epilogue) {
    let widen = |v: u32| (f32::from_bits(v << 16), f32::from_bits(v & 0xffff_0000));
    let pairs = w.pairs;
    for (c, panel) in w.data.chunks_exact(pairs * NR).enumerate() {
        for i0 in (0..m).step_by(MR) {
            let mut acc = [[0f32; NR]; MR];
            for p in 0..pairs {
                for (r, acc) in acc.iter_mut().enumerate().take(m - i0) {
                    let (x0, x1) = widen(a.data[(i0 + r) * a.stride + p]);
                    for (j, s) in acc.iter_mut().enumerate() {
                        let (w0, w1) = widen(panel[p * NR + j]);
                        *s += x0 * w0 + x1 * w1;
                    }
                }
            }
            store(&acc, &mut out, i0, m, c * NR, w.rows, then);
        }
    }
}

/// Writes a tile of sums (rows i0.., columns j0..) through the epilogue, skipping rows at or past
/// `m` and columns at or past `n`.
#[inline(always)]
fn store(acc: &[[f32; NR]; MR], out: &mut Out, i0: usize, m: usize, j0: usize, n: usize, then: Epilogue) {
    let cols = NR.min(n - j0);
    let bias = then.bias.map(|b| &b[j0..j0 + cols]);
    for (r, acc) in acc.iter().enumerate().take(m.saturating_sub(i0)) {
        let mut v = [0f32; NR];
        let v = &mut v[..cols];
        if let (true, Out::F32(o, ld)) = (then.accumulate, &*out) {
            v.copy_from_slice(&o[(i0 + r) * ld + j0..][..cols]);
        }
        // One pass per step, each branch-free so that it vectorises.
        v.iter_mut().zip(acc).for_each(|(v, s)| *v += s);
        if let Some(b) = bias {
            v.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
        if then.gelu {
            v.iter_mut().for_each(|v| *v = crate::epilogue::gelu(*v));
        }
        match out {
            Out::F32(o, ld) => o[(i0 + r) * *ld + j0..][..cols].copy_from_slice(v),
            Out::Pairs(o, ld) => {
                let row = &mut o[(i0 + r) * *ld + j0 / 2..][..cols.div_ceil(2)];
                for (q, o) in row.iter_mut().enumerate() {
                    *o = pair(v[2 * q], v.get(2 * q + 1).copied().unwrap_or(0.0));
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[expect(unsafe_code, reason = "AVX-512 intrinsics and unaligned loads")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{MR, NR, Out, Panels};
    use crate::epilogue::Epilogue;

    /// [`super::round_row`] with `vcvtne2ps2bf16` (the same rounding; a subnormal input becomes
    /// zero, as `vdpbf16ps` would read it anyway).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) fn round_row(row: &[f32], out: &mut [u32]) {
        assert!(2 * out.len() >= row.len() && 2 * out.len() <= row.len() + 1, "panels: row and pairs disagree");
        let (rp, op) = (row.as_ptr(), out.as_mut_ptr());
        let k = row.len();
        let mut c = 0;
        while c < k {
            // 32 values (16 pairs) at a time, the tail masked.
            let lanes = (k - c).min(32);
            let lo_mask: __mmask16 = if lanes >= 16 { u16::MAX } else { (1u16 << lanes) - 1 };
            let hi_mask: __mmask16 = if lanes >= 32 {
                u16::MAX
            } else if lanes > 16 {
                (1u16 << (lanes - 16)) - 1
            } else {
                0
            };
            // SAFETY: the unmasked lanes are c..c + lanes < k; masked lanes are not read.
            let (lo, hi) =
                unsafe { (_mm512_maskz_loadu_ps(lo_mask, rp.add(c)), _mm512_maskz_loadu_ps(hi_mask, rp.add(c + 16))) };
            let v = _mm512_cvtne2ps_pbh(hi, lo);
            let pairs = lanes.div_ceil(2);
            let mask: __mmask16 = if pairs >= 16 { u16::MAX } else { (1u16 << pairs) - 1 };
            // SAFETY: pair c/2 + q < out.len() for the unmasked q < pairs.
            unsafe {
                _mm512_mask_storeu_epi32(op.add(c / 2).cast(), mask, std::mem::transmute::<__m512bh, __m512i>(v))
            };
            c += 32;
        }
    }

    /// [`super::interleave`] with `vcvtneps2bf16` (the rounding of [`round_row`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) fn interleave(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
        let n = out.len();
        assert!(lo.len() >= n && hi.is_none_or(|h| h.len() >= n), "panels: rows shorter than the lanes");
        let mut j = 0;
        while j < n {
            let lanes = (n - j).min(16);
            let mask: __mmask16 = if lanes >= 16 { u16::MAX } else { (1u16 << lanes) - 1 };
            // SAFETY: the unmasked lanes are j..j + lanes ≤ n, inside every slice.
            unsafe {
                let l = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(
                    _mm512_maskz_loadu_ps(mask, lo.as_ptr().add(j)),
                )));
                let h = match hi {
                    Some(h) => {
                        _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
                            _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, h.as_ptr().add(j))),
                        )))
                    }
                    None => _mm512_setzero_si512(),
                };
                _mm512_mask_storeu_epi32(out.as_mut_ptr().add(j).cast(), mask, _mm512_or_si512(l, h));
            }
            j += 16;
        }
    }

    /// [`super::softmax_pairs`] in one register of 16 lanes at a time (the tail masked), with
    /// e^y as 2^n · 2^r for y·log₂e = n + r, n an integer and |r| ≤ ½: 2^r by a degree-5
    /// polynomial (1.9·10⁻⁷ relative; fitted to 2^r on [-½, ½], ln 2 its linear term) and 2^n
    /// applied by `vscalefps`, eleven operations per register where the portable exp takes
    /// twice that, and the weights rounded 32 at a time by `vcvtne2ps2bf16`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) fn softmax_pairs(x: &mut [f32], scale: f32, out: &mut [u32]) {
        let t = x.len();
        assert!(out.len() >= t.div_ceil(2), "panels: too few pairs for the softmax");
        let (xp, op) = (x.as_mut_ptr(), out.as_mut_ptr());
        let mask = |c: usize| -> __mmask16 {
            let lanes = t.saturating_sub(c).min(16);
            if lanes == 16 { u16::MAX } else { (1u16 << lanes) - 1 }
        };
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut top = neg_inf;
        for c in (0..t).step_by(16) {
            // SAFETY: the unmasked lanes are c.. < t, inside `x`.
            top = _mm512_max_ps(top, unsafe { _mm512_mask_loadu_ps(neg_inf, mask(c), xp.add(c)) });
        }
        let top = _mm512_set1_ps(_mm512_reduce_max_ps(top));
        let k = _mm512_set1_ps(scale * std::f32::consts::LOG2_E);
        // Below 2^-160 the result is 0 (e^-inf included).
        let floor = _mm512_set1_ps(-160.0);
        let coef = [1.330_060_7e-3, 9.669_691e-3, 5.550_558_5e-2, 2.402_228_3e-1, std::f32::consts::LN_2, 1.0]
            .map(|c: f32| _mm512_set1_ps(c));
        let mut sum = _mm512_setzero_ps();
        for c in (0..t).step_by(16) {
            let m = mask(c);
            // SAFETY: as above.
            let v = unsafe { _mm512_maskz_loadu_ps(m, xp.add(c)) };
            let y = _mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(v, top), k), floor);
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
            let r = _mm512_sub_ps(y, n);
            let p = coef[1..].iter().fold(coef[0], |p, &c| _mm512_fmadd_ps(p, r, c));
            // Zero in the lanes past the end, so that they add nothing.
            let e = _mm512_maskz_scalef_ps(m, p, n);
            sum = _mm512_add_ps(sum, e);
            // SAFETY: as above.
            unsafe { _mm512_mask_storeu_ps(xp.add(c), m, e) };
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        for c in (0..t).step_by(32) {
            // SAFETY: as above; the unmasked pairs c/2 + q < ⌈t/2⌉ ≤ out.len().
            unsafe {
                let lo = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask(c), xp.add(c)), inv);
                let hi = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask(c + 16), xp.add(c + 16)), inv);
                let pairs = (t - c).div_ceil(2).min(16);
                let m: __mmask16 = if pairs == 16 { u16::MAX } else { (1u16 << pairs) - 1 };
                let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_mask_storeu_epi32(op.add(c / 2).cast(), m, v);
            }
        }
    }

    /// [`super::product`] on `vdpbf16ps`, for rows of pairs at `a`, `stride` pairs apart.
    ///
    /// # Safety
    /// The `m` rows at `a`, every output row (`w.rows` values, or their pairs) and the
    /// epilogue's bias are inside their buffers, as [`super::product`] asserts.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn product(a: *const u32, stride: usize, w: &Panels, m: usize, mut out: Out, then: Epilogue) {
        let (pairs, n) = (w.pairs, w.rows);
        for (c, panel) in w.data.chunks_exact(pairs * NR).enumerate() {
            for i0 in (0..m).step_by(MR) {
                // The tile's output lines, fetched while its sums are computed: a residual
                // stream is read there, and a store that misses stalls the loop behind it.
                let j0 = c * NR;
                for i in i0..m.min(i0 + MR) {
                    match &out {
                        Out::F32(o, ld) => {
                            let p = o[i * ld + j0..].as_ptr();
                            _mm_prefetch::<_MM_HINT_T0>(p.cast());
                            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(NR - 1).cast());
                        }
                        Out::Pairs(o, ld) => _mm_prefetch::<_MM_HINT_T0>(o[i * ld + j0 / 2..].as_ptr().cast()),
                    }
                }
                // SAFETY: the caller's promise covers the tile's rows (the last tile's missing
                // rows read as its last row).
                let acc = unsafe {
                    let rows: [*const u32; MR] = std::array::from_fn(|r| a.add((i0 + r).min(m - 1) * stride));
                    tile_sums(rows, panel, pairs)
                };
                // SAFETY: as above, for the output rows and the bias.
                unsafe { store_tile(&acc, &mut out, i0, m, j0, n, then) };
            }
        }
    }

    /// The MR × NR sums of one tile of rows (row r's pairs at `rows[r]`) against one panel.
    ///
    /// # Safety
    /// Each `rows[r]` points at `pairs` readable pairs, and `panel` holds `pairs` · NR.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn tile_sums(rows: [*const u32; MR], panel: &[u32], pairs: usize) -> [[__m512; 2]; MR] {
        assert!(panel.len() >= pairs * NR, "panels: panel too short");
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let wp = panel.as_ptr();
        for p in 0..pairs {
            // SAFETY: p < pairs, so the reads stay inside the lengths asserted above.
            let (w0, w1) = unsafe {
                let q = wp.add(p * NR);
                (
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(q.cast())),
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(q.add(16).cast())),
                )
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: the caller's promise.
                let xv = unsafe { rows[r].add(p).read() };
                // SAFETY: 512 bits of plain data either way.
                let xv = unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(xv as i32)) };
                acc[0] = _mm512_dpbf16_ps(acc[0], xv, w0);
                acc[1] = _mm512_dpbf16_ps(acc[1], xv, w1);
            }
        }
        acc
    }

    /// [`super::store`] from the registers: the residual, bias and GELU applied in them and
    /// each row written with (masked) vector stores.
    ///
    /// # Safety
    /// Output rows i0..min(m, i0 + MR) hold columns j0..min(n, j0 + NR) (in pairs for
    /// [`Out::Pairs`]), and the bias (if any) holds n values.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn store_tile(
        acc: &[[__m512; 2]; MR],
        out: &mut Out,
        i0: usize,
        m: usize,
        j0: usize,
        n: usize,
        then: Epilogue,
    ) {
        let cols = NR.min(n - j0);
        let lanes = |count: usize| -> __mmask16 { if count >= 16 { u16::MAX } else { (1u16 << count) - 1 } };
        let masks = [lanes(cols), lanes(cols.saturating_sub(16))];
        let pair_mask = lanes(cols.div_ceil(2));
        let bias = then.bias.map(|b| {
            // SAFETY: the bias holds n ≥ j0 + cols values; masked lanes are not read.
            std::array::from_fn::<__m512, 2, _>(|h| unsafe {
                _mm512_maskz_loadu_ps(masks[h], b.as_ptr().add(j0 + 16 * h))
            })
        });
        let rows = m.min(i0 + MR) - i0;
        match out {
            Out::F32(o, ld) => {
                for (r, acc) in acc.iter().enumerate().take(rows) {
                    // SAFETY: the caller's promise: row i0 + r holds columns j0.. of the tile.
                    let o = unsafe { o.as_mut_ptr().add((i0 + r) * *ld + j0) };
                    for h in 0..2 {
                        if masks[h] == 0 {
                            continue;
                        }
                        let mut v = acc[h];
                        if then.accumulate {
                            // SAFETY: as above; masked lanes are not read.
                            v = _mm512_add_ps(unsafe { _mm512_maskz_loadu_ps(masks[h], o.add(16 * h)) }, v);
                        }
                        let v = finish(v, bias.map(|b| b[h]), then.gelu);
                        // SAFETY: as above; masked lanes are not written.
                        unsafe { _mm512_mask_storeu_ps(o.add(16 * h), masks[h], v) };
                    }
                }
            }
            Out::Pairs(o, ld) => {
                for (r, acc) in acc.iter().enumerate().take(rows) {
                    // Both halves, even one past n: its sums, bias and GELU are zero there,
                    // the zero high halves that pairs need past an odd n.
                    let [lo, hi] = [0, 1].map(|h| finish(acc[h], bias.map(|b| b[h]), then.gelu));
                    // SAFETY: 512 bits of plain data either way.
                    let v = unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)) };
                    // SAFETY: the caller's promise: row i0 + r holds pairs j0/2.. of the tile;
                    // masked lanes are not written.
                    unsafe {
                        _mm512_mask_storeu_epi32(o.as_mut_ptr().add((i0 + r) * *ld + j0 / 2).cast(), pair_mask, v)
                    };
                }
            }
        }
    }

    /// The bias and GELU of the epilogue on one register of sums.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn finish(mut v: __m512, bias: Option<__m512>, gelu: bool) -> __m512 {
        if let Some(b) = bias {
            v = _mm512_add_ps(v, b);
        }
        if gelu {
            // In the register (a fixed 16 lanes, which LLVM keeps there): reading back a
            // masked store would stall on the forwarding that fails.
            // SAFETY: 512 bits of plain data either way.
            let mut lanes = unsafe { std::mem::transmute::<__m512, [f32; 16]>(v) };
            lanes.iter_mut().for_each(|x| *x = crate::epilogue::gelu(*x));
            // SAFETY: as above.
            v = unsafe { std::mem::transmute::<[f32; 16], __m512>(lanes) };
        }
        v
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::epilogue::assert_epilogue;

    fn bf16(v: f32) -> f64 {
        f64::from(half::bf16::from_f32(v).to_f32())
    }

    /// Both paths give the f64 product of the bf16-rounded operands through every epilogue,
    /// within f32 summation error, at shapes with ragged tiles, panels and odd k; a row's
    /// result does not depend on the batch it is in or the thread count.
    #[test]
    fn products_match_an_f64_reference() {
        let mut r = crate::kernels::uniform(11, 1.0);
        for (m, k, n) in [(1, 7, 5), (13, 64, 33), (25, 96, 70), (40, 385, 31), (100, 1536, 64)] {
            let x: Vec<f32> = (0..m * k).map(|_| r()).collect();
            let wv: Vec<f32> = (0..n * k).map(|_| r()).collect();
            let bias: Vec<f32> = (0..n).map(|_| r()).collect();
            let w = Panels::new(&wv, n, k);
            assert_eq!((w.rows, w.cols, w.pairs), (n, k, k.div_ceil(2)));
            let ldo = n + 2;
            let start: Vec<f32> = (0..m * ldo).map(|_| r()).collect();
            for then in
                [Epilogue::overwrite(None), Epilogue::overwrite(Some(&bias)).gelu(), Epilogue::accumulate(Some(&bias))]
            {
                let mut first = None;
                for threads in [false, true] {
                    let mut got = start.clone();
                    linear(Input::Rows(Mat::new(&x, m, k)), &w, Out::F32(&mut got, ldo), then, threads);
                    let dot =
                        |i: usize, j: usize| -> f64 { (0..k).map(|p| bf16(x[i * k + p]) * bf16(wv[j * k + p])).sum() };
                    let what = format!("({m},{k},{n}) {then:?} threads={threads}");
                    assert_epilogue(&got, &start, (m, n, ldo), then, dot, 2e-6 * k as f64, &what);
                    // Rows already in pairs give the same bits; so do the outputs as pairs,
                    // which are the f32 outputs rounded.
                    let ap = k.div_ceil(2) + 1;
                    let mut rows = vec![0u32; m * ap];
                    round_rows(Mat::new(&x, m, k), &mut rows, ap);
                    let mut again = start.clone();
                    let input = Input::Pairs { a: Lhs { data: &rows, stride: ap }, rows: m };
                    linear(input, &w, Out::F32(&mut again, ldo), then, threads);
                    assert_eq!(got, again, "({m},{k},{n}) {then:?}: rows in pairs differ");
                    if !then.accumulate {
                        let op = n.div_ceil(2) + 2;
                        let mut pairs = vec![u32::MAX; m * op];
                        linear(Input::Rows(Mat::new(&x, m, k)), &w, Out::Pairs(&mut pairs, op), then, threads);
                        for i in 0..m {
                            let mut want = vec![0u32; n.div_ceil(2)];
                            round_row(&got[i * ldo..][..n], &mut want);
                            assert_eq!(
                                pairs[i * op..][..want.len()],
                                want[..],
                                "({m},{k},{n}) {then:?}: row {i} in pairs"
                            );
                            assert_eq!(
                                pairs[i * op + want.len()..][..2],
                                [u32::MAX; 2],
                                "({m},{k},{n}): past a row's pairs"
                            );
                        }
                    }
                    match &first {
                        None => first = Some(got),
                        Some(f) => assert_eq!(f, &got, "({m},{k},{n}): the thread count changed the result"),
                    }
                }
                // The last row alone gives the same bits as in the batch.
                let last = &x[(m - 1) * k..];
                let mut one = start[(m - 1) * ldo..].to_vec();
                linear(Input::Rows(Mat::new(last, 1, k)), &w, Out::F32(&mut one, ldo), then, false);
                let mut all = start.clone();
                linear(Input::Rows(Mat::new(&x, m, k)), &w, Out::F32(&mut all, ldo), then, true);
                assert_eq!(one[..n], all[(m - 1) * ldo..][..n], "({m},{k},{n}): the last row alone differs");
            }
        }
    }

    /// The scalar path is the vectorised one's reference: the same sums within f32 rounding.
    #[test]
    fn portable_path_matches_the_kernel() {
        let mut r = crate::kernels::uniform(12, 1.0);
        let (m, k, n) = (30, 200, 45);
        let x: Vec<f32> = (0..m * k).map(|_| r()).collect();
        let wv: Vec<f32> = (0..n * k).map(|_| r()).collect();
        let w = Panels::new(&wv, n, k);
        // Rows padded to a longer stride, as attention's buffer is.
        let stride = w.pairs + 3;
        let mut rows = vec![0u32; m * stride];
        round_rows(Mat::new(&x, m, k), &mut rows, stride);
        let a = Lhs { data: &rows, stride };
        let (mut p, mut v) = (vec![0f32; m * n], vec![0f32; m * n]);
        portable(a, &w, m, Out::F32(&mut p, n), Epilogue::overwrite(None));
        product(a, &w, m, Out::F32(&mut v, n), Epilogue::overwrite(None));
        for (p, v) in p.iter().zip(&v) {
            assert!((p - v).abs() < 1e-4, "{p} vs {v}");
        }
        // Its pairs are its f32 outputs rounded (n odd: the last high half zero).
        let np = n.div_ceil(2);
        let mut pairs = vec![u32::MAX; m * np];
        portable(a, &w, m, Out::Pairs(&mut pairs, np), Epilogue::overwrite(None));
        let mut want = vec![0u32; m * np];
        round_rows(Mat::new(&p, m, n), &mut want, np);
        assert_eq!(pairs, want);
    }

    /// The softmax that attention's second product reads: each weight is e^(scale·(x − max))/Σ
    /// rounded to the nearest bf16 (ties to even), as the f64 value rounds, except where that
    /// value lies within 10⁻⁶ (relative) of a point halfway between two bf16 values; entries of
    /// -∞ give 0, and an odd row's last high half is 0.
    #[test]
    fn softmax_pairs_round_the_exact_softmax() {
        let mut r = crate::kernels::uniform(23, 8.0);
        for len in [1usize, 2, 15, 16, 17, 31, 32, 33, 114, 257] {
            let mut x: Vec<f32> = (0..len).map(|_| r()).collect();
            if len > 2 {
                x[1] = f32::NEG_INFINITY;
            }
            let scale = 0.7f64;
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f64> = x.iter().map(|&v| (scale * (f64::from(v) - f64::from(max))).exp()).collect();
            let sum: f64 = e.iter().sum();
            let mut got = vec![u32::MAX; len.div_ceil(2)];
            softmax_pairs(&mut x, scale as f32, &mut got);
            for (i, e) in e.iter().enumerate() {
                let exact = e / sum;
                let g = half::bf16::from_bits((got[i / 2] >> (16 * (i % 2))) as u16);
                let want = half::bf16::from_f64(exact);
                if g != want {
                    let mid = (g.to_f64() + want.to_f64()) / 2.0;
                    let adjacent = g.to_bits().abs_diff(want.to_bits()) == 1;
                    assert!(adjacent && (exact - mid).abs() <= 1e-6 * exact, "len {len}, [{i}]: {g} for {exact}");
                }
            }
            if len > 2 {
                assert_eq!(got[0] >> 16, 0, "len {len}: e^-inf");
            }
            if len % 2 == 1 {
                assert_eq!(got[len / 2] >> 16, 0, "len {len}: the last high half");
            }
        }
    }

    /// Attention on bf16 products against f64 attention over the bf16-rounded queries, keys
    /// and values: within the rounding of the weights to bf16 (2⁻⁹ of the largest value, 2⁻⁸
    /// allowed), for several heads, sequences shorter and longer than a panel, odd lengths and
    /// head sizes, and an output wider than the heads; columns past the heads stay as they were.
    #[test]
    fn attention_matches_an_f64_reference() {
        let mut r = crate::kernels::uniform(13, 2.0);
        let mut s = AttentionScratch::default();
        for (t, heads, d) in [(1, 2, 32), (13, 3, 24), (45, 2, 32), (70, 1, 7)] {
            let width = heads * d + 5;
            let qkv: Vec<f32> = (0..t * 3 * width).map(|_| r()).collect();
            let view = |c: usize| Mat { data: &qkv[c * width..], rows: t, cols: width, stride: 3 * width };
            let ldo = heads * d + 2;
            let mut out = vec![7f32; t * ldo];
            attention(view(0), view(1), view(2), heads, d, &mut out, ldo, &mut s);
            crate::epilogue::assert_attention(&qkv, width, t, heads, d, &out, ldo);
        }
    }
}
