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
//! register holds w[j][2p] and w[j][2p + 1]), the input rows in tiles of [`MR`] rows likewise,
//! and a tile of MR × NR sums stays in 24 registers for the whole of k: per pair of k values,
//! two weight loads, MR broadcasts and 24 `vdpbf16ps` (768 products). The epilogue (residual,
//! bias, GELU) is applied to each tile as it leaves the registers.
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
        let pairs = cols.div_ceil(2);
        let panels = rows.div_ceil(NR);
        let mut data = vec![0u32; panels * pairs * NR];
        for (c, panel) in data.chunks_exact_mut(pairs * NR).enumerate() {
            for j in 0..NR.min(rows - c * NR) {
                let row = &w[(c * NR + j) * cols..][..cols];
                for p in 0..pairs {
                    let hi = row.get(2 * p + 1).copied().unwrap_or(0.0);
                    panel[p * NR + j] = pair(row[2 * p], hi);
                }
            }
        }
        Self { rows, cols, pairs, data }
    }
}

/// The rows of `x` (k = `pairs`·2 values, the last one zero when k is odd) rounded to bf16 in
/// tiles of [`MR`] rows: `out[(t · pairs + p) · MR + r]` is the pair p of row t·MR + r (zero for
/// rows past the end). A row of bf16 values read as 32-bit lanes is its pairs, so each row is
/// rounded whole (16 values per instruction where the CPU has AVX-512-BF16) and then spread over
/// its tile.
fn pack_rows(x: Mat, pairs: usize, out: &mut [u32]) {
    let k = x.cols;
    let mut row_pairs = vec![0u32; pairs];
    for (t, tile) in out.chunks_exact_mut(pairs * MR).enumerate() {
        for r in 0..MR {
            let i = t * MR + r;
            if i >= x.rows {
                row_pairs.fill(0);
            } else {
                round_row(&x.data[i * x.stride..][..k], &mut row_pairs);
            }
            for (p, &v) in row_pairs.iter().enumerate() {
                tile[p * MR + r] = v;
            }
        }
    }
}

/// `row` rounded to bf16 (to nearest, ties to even) as pairs into `out` (`row.len()`/2 rounded
/// up; a missing last value is zero).
fn round_row(row: &[f32], out: &mut [u32]) {
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

/// `out ← gelu?((accumulate ? out : 0) + x · wᵀ + bias)` with `out` [x.rows, w.rows] at row
/// stride `ldo`. `threads`: split the rows over rayon's pool.
///
/// # Panics
/// When a view does not fit its buffer or the shapes disagree (a bug in the caller).
pub(crate) fn linear(x: Mat, w: &Panels, out: &mut [f32], ldo: usize, then: Epilogue, threads: bool) {
    let (m, n) = (x.rows, w.rows);
    assert_eq!(x.cols, w.cols, "panels::linear: inner dimensions differ");
    assert!(then.bias.is_none_or(|b| b.len() == n), "panels::linear: the bias is not one value per output");
    if m == 0 || n == 0 {
        return;
    }
    assert!(x.fits() && (m - 1) * ldo + n <= out.len(), "panels::linear: a view exceeds its buffer");
    assert!(ldo >= n, "panels::linear: output rows overlap");
    let tiles = m.div_ceil(MR);
    let tile_len = w.pairs * MR;
    let mut a = vec![0u32; tiles * tile_len];
    let out = &mut out[..(m - 1) * ldo + n];
    // Tiles per task: every thread busy, each task long enough to amortise reading the weight.
    let per_task = if threads { tiles.div_ceil(rayon::current_num_threads().max(1)).max(1) } else { tiles };
    let run = |(c, (a, out)): (usize, (&mut [u32], &mut [f32]))| {
        let r0 = c * per_task * MR;
        let rows = (m - r0).min(per_task * MR);
        pack_rows(Mat { data: &x.data[r0 * x.stride..], rows, cols: x.cols, stride: x.stride }, w.pairs, a);
        product(a, w, rows, out, ldo, then);
    };
    let chunks = a.chunks_mut(per_task * tile_len).zip(out.chunks_mut(per_task * MR * ldo)).enumerate();
    if threads && tiles > per_task {
        chunks.collect::<Vec<_>>().into_par_iter().for_each(run);
    } else {
        chunks.for_each(run);
    }
}

/// Bytes of a block of rows' packed inputs and outputs kept in L2 while every panel passes over
/// it (half of a 1 MiB L2: the panel in use and the next block's rows share the rest).
const BLOCK_BYTES: usize = 512 << 10;

/// The product for `m` rows packed in `a` (as [`pack_rows`] writes them) into `out` (row stride
/// `ldo`), on this thread: in blocks of rows whose inputs and outputs fit in L2, each weight
/// panel in turn against every tile of the block, so that the panel is read from L1/L2 by all of
/// the block's tiles and the block's outputs (a residual stream read and written) stay in L2.
fn product(a: &[u32], w: &Panels, m: usize, out: &mut [f32], ldo: usize, then: Epilogue) {
    let tile_len = w.pairs * MR;
    let per_row = 4 * w.pairs + 4 * w.rows;
    let block = (BLOCK_BYTES / (MR * per_row)).max(1);
    for (b, a) in a.chunks(block * tile_len).enumerate() {
        let r0 = b * block * MR;
        let rows = (m - r0).min(block * MR);
        let out = &mut out[r0 * ldo..];
        #[cfg(target_arch = "x86_64")]
        if crate::lowp::dot_bf16_available() {
            // SAFETY: `dot_bf16_available` checked the features `avx512::product` is compiled for.
            #[expect(unsafe_code, reason = "calling a function compiled for AVX-512-BF16")]
            unsafe {
                avx512::product(a, w, rows, out, ldo, then)
            };
            continue;
        }
        portable(a, w, rows, out, ldo, then);
    }
}

/// [`product`] in scalar code, for CPUs the kernel cannot run on (only reached when a caller
/// builds [`Panels`] there; [`crate::kernels::Weight`] keeps f32 weights on such CPUs): the
/// same terms summed in the same order, though `vdpbf16ps` rounds within a pair in its own way,
/// so the two agree to f32 rounding rather than bit for bit.
fn portable(a: &[u32], w: &Panels, m: usize, out: &mut [f32], ldo: usize, then: Epilogue) {
    let widen = |v: u32| (f32::from_bits(v << 16), f32::from_bits(v & 0xffff_0000));
    let pairs = w.pairs;
    for (c, panel) in w.data.chunks_exact(pairs * NR).enumerate() {
        for (t, tile) in a.chunks_exact(pairs * MR).enumerate() {
            let mut acc = [[0f32; NR]; MR];
            for p in 0..pairs {
                for (r, acc) in acc.iter_mut().enumerate() {
                    let (x0, x1) = widen(tile[p * MR + r]);
                    for (j, s) in acc.iter_mut().enumerate() {
                        let (w0, w1) = widen(panel[p * NR + j]);
                        *s += x0 * w0 + x1 * w1;
                    }
                }
            }
            store(&acc, out, ldo, t * MR, m, c * NR, w.rows, then);
        }
    }
}

/// Writes a tile of sums (rows i0.., columns j0..) through the epilogue, skipping rows at or past
/// `m` and columns at or past `n`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn store(acc: &[[f32; NR]; MR], out: &mut [f32], ldo: usize, i0: usize, m: usize, j0: usize, n: usize, then: Epilogue) {
    let cols = NR.min(n - j0);
    let bias = then.bias.map(|b| &b[j0..j0 + cols]);
    for (r, acc) in acc.iter().enumerate().take(m.saturating_sub(i0)) {
        let o = &mut out[(i0 + r) * ldo + j0..][..cols];
        // One pass per step, each branch-free so that it vectorises.
        if then.accumulate {
            o.iter_mut().zip(acc).for_each(|(o, s)| *o += s);
        } else {
            o.copy_from_slice(&acc[..cols]);
        }
        if let Some(b) = bias {
            o.iter_mut().zip(b).for_each(|(o, b)| *o += b);
        }
        if then.gelu {
            o.iter_mut().for_each(|v| *v = crate::epilogue::gelu(*v));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[expect(unsafe_code, reason = "AVX-512 intrinsics and unaligned loads")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{MR, NR, Panels, store};
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

    /// [`super::product`] on `vdpbf16ps`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) fn product(a: &[u32], w: &Panels, m: usize, out: &mut [f32], ldo: usize, then: Epilogue) {
        let pairs = w.pairs;
        for (c, panel) in w.data.chunks_exact(pairs * NR).enumerate() {
            for (t, tile) in a.chunks_exact(pairs * MR).enumerate() {
                // The tile's output lines, fetched while its sums are computed: a residual
                // stream is read there, and a store that misses stalls the loop behind it.
                let (i0, j0) = (t * MR, c * NR);
                for i in i0..m.min(i0 + MR) {
                    let p = out[i * ldo + j0..].as_ptr();
                    _mm_prefetch::<_MM_HINT_T0>(p.cast());
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(NR - 1).cast());
                }
                let acc = tile_sums(tile, panel, pairs);
                store(&acc, out, ldo, i0, m, j0, w.rows, then);
            }
        }
    }

    /// The MR × NR sums of one tile of rows against one panel.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn tile_sums(tile: &[u32], panel: &[u32], pairs: usize) -> [[f32; NR]; MR] {
        assert!(tile.len() >= pairs * MR && panel.len() >= pairs * NR, "panels: buffers too short");
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let (tp, wp) = (tile.as_ptr(), panel.as_ptr());
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
                // SAFETY: as above.
                let xv = unsafe { tp.add(p * MR + r).read() };
                // SAFETY: 512 bits of plain data either way.
                let xv = unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(xv as i32)) };
                acc[0] = _mm512_dpbf16_ps(acc[0], xv, w0);
                acc[1] = _mm512_dpbf16_ps(acc[1], xv, w1);
            }
        }
        let mut sums = [[0f32; NR]; MR];
        for (s, acc) in sums.iter_mut().zip(&acc) {
            // SAFETY: each half of a row of `sums` is 16 f32.
            unsafe {
                _mm512_storeu_ps(s.as_mut_ptr(), acc[0]);
                _mm512_storeu_ps(s.as_mut_ptr().add(16), acc[1]);
            }
        }
        sums
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
                    linear(Mat::new(&x, m, k), &w, &mut got, ldo, then, threads);
                    let dot =
                        |i: usize, j: usize| -> f64 { (0..k).map(|p| bf16(x[i * k + p]) * bf16(wv[j * k + p])).sum() };
                    let what = format!("({m},{k},{n}) {then:?} threads={threads}");
                    assert_epilogue(&got, &start, (m, n, ldo), then, dot, 2e-6 * k as f64, &what);
                    match &first {
                        None => first = Some(got),
                        Some(f) => assert_eq!(f, &got, "({m},{k},{n}): the thread count changed the result"),
                    }
                }
                // The last row alone gives the same bits as in the batch.
                let last = &x[(m - 1) * k..];
                let mut one = start[(m - 1) * ldo..].to_vec();
                linear(Mat::new(last, 1, k), &w, &mut one, ldo, then, false);
                let mut all = start.clone();
                linear(Mat::new(&x, m, k), &w, &mut all, ldo, then, true);
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
        let mut a = vec![0u32; m.div_ceil(MR) * w.pairs * MR];
        pack_rows(Mat::new(&x, m, k), w.pairs, &mut a);
        let (mut p, mut v) = (vec![0f32; m * n], vec![0f32; m * n]);
        portable(&a, &w, m, &mut p, n, Epilogue::overwrite(None));
        product(&a, &w, m, &mut v, n, Epilogue::overwrite(None));
        for (p, v) in p.iter().zip(&v) {
            assert!((p - v).abs() < 1e-4, "{p} vs {v}");
        }
    }
}
