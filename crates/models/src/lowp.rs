//! Linear products with half-precision operands on the CPU: `y = x · wᵀ` with x and w in bf16 or
//! f16 and every sum in f32, as torch's CPU kernels (oneDNN) take them. Each product of two half
//! values is exact in f32, so the only rounding is in the sums.
//!
//! Why: candle's CPU matmul has no bf16 kernel. It widens both operands to f32 on every call, on
//! one thread, so a bf16 model decoded at a seventh of its f32 speed. Here the weights stay in
//! half precision in memory (half the traffic of f32, which is what decoding is bound by) and:
//!
//! - bf16 on CPUs with AVX-512-BF16 (Zen 4 on, Cooper Lake, Sapphire Rapids on) multiplies with
//!   `vdpbf16ps`: 32 products per instruction into 16 f32 sums, twice the rate of f32 FMAs.
//!   The register tiles are those of the f32 decode kernel (see [`crate::linear`]): 4 weight rows
//!   by 4 input rows, 16 accumulators.
//! - Elsewhere (f16 everywhere, bf16 on CPUs without the instruction), each task widens its share
//!   of the weight rows to f32 once, in L2, and runs the f32 kernel over it: the same products,
//!   summed in another order.
//!
//! Every output sums its terms in one fixed order that depends on neither the number of rows nor
//! which rows share the product, so a sample's numbers do not depend on its batch.

use rayon::prelude::*;

/// A half-precision format, whose values are passed as their bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    Bf16,
    F16,
}

/// Weight rows per rayon task (at k = 896 in bf16: 112 KiB, in L2).
const ROWS_PER_TASK: usize = 64;

/// Whether bf16 products run on `vdpbf16ps` here (`RBON_BF16_DOT=0` turns it off, to run the
/// fallback).
pub fn dot_bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            !std::env::var("RBON_BF16_DOT").is_ok_and(|v| v.trim() == "0")
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The bf16 nearest to `x` (ties to even; NaN stays NaN), as bits.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// `vals` widened to f32 into `out` (cleared first).
pub fn widen(kind: Half, vals: &[u16], out: &mut Vec<f32>) {
    out.clear();
    out.resize(vals.len(), 0.0);
    match kind {
        // A shift, which LLVM vectorises.
        Half::Bf16 => out.iter_mut().zip(vals).for_each(|(o, &b)| *o = f32::from_bits(u32::from(b) << 16)),
        Half::F16 => {
            use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
            let v: &[half::f16] = vals.reinterpret_cast();
            v.convert_to_f32_slice(out);
        }
    }
}

/// `y [m, n] = x [m, k] · w [n, k]ᵀ`, row-major, with x and w as bits of `kind` (the products
/// exact, sums in f32). In parallel over blocks of weight rows.
///
/// # Panics
/// When `x` or `w` holds fewer than m·k or n·k values (a bug in the caller).
pub fn matmul_t(kind: Half, x: &[u16], w: &[u16], m: usize, k: usize, n: usize) -> Vec<f32> {
    matmul_t_with(kind, x, w, m, k, n, true)
}

/// [`matmul_t`]; `threads: false` runs on the calling thread (for callers that already run one
/// product per task).
///
/// # Panics
/// As [`matmul_t`].
pub fn matmul_t_with(kind: Half, x: &[u16], w: &[u16], m: usize, k: usize, n: usize, threads: bool) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    matmul_t_into(kind, x, w, m, k, n, threads, &mut y, |v| v);
    y
}

/// [`matmul_t_with`] into `out` [m, n], each value through `f` (a rounding to the output's
/// dtype, done while the block is in cache).
///
/// # Panics
/// As [`matmul_t`], and when `out` holds fewer than m·n values.
#[allow(clippy::too_many_arguments)]
pub fn matmul_t_into<T: Send>(
    kind: Half,
    x: &[u16],
    w: &[u16],
    m: usize,
    k: usize,
    n: usize,
    threads: bool,
    out: &mut [T],
    f: impl Fn(f32) -> T + Sync,
) {
    assert!(x.len() >= m * k && w.len() >= n * k, "lowp::matmul_t: operands shorter than their shapes");
    let (x, w) = (&x[..m * k], &w[..n * k]);
    let dot = kind == Half::Bf16 && dot_bf16_available();
    let mut xf = Vec::new();
    if !dot && k > 0 {
        widen(kind, x, &mut xf);
    }
    let xf = &xf;
    by_weight_blocks(m, n, threads, out, f, |j0, rows, part| {
        if k == 0 {
            return;
        }
        let wc = &w[j0 * k..(j0 + rows) * k];
        #[cfg(target_arch = "x86_64")]
        if dot {
            // SAFETY: `dot_bf16_available` checked the features `block` is compiled for.
            #[expect(unsafe_code, reason = "calling a function compiled for AVX-512-BF16")]
            unsafe {
                dot::block(x, wc, part, m, k)
            };
            return;
        }
        let mut wf = Vec::new();
        widen(kind, wc, &mut wf);
        crate::linear::block(xf, &wf, part, m, k);
    });
}

/// A product over blocks of [`ROWS_PER_TASK`] weight rows, in parallel when `threads`:
/// `task(j0, rows, part)` fills `part` [m, rows] with output columns j0..j0 + rows, and the parts
/// are then copied into `out` [m, n] through `f`, one output row per task, each row written in
/// order.
pub(crate) fn by_weight_blocks<T: Send>(
    m: usize,
    n: usize,
    threads: bool,
    out: &mut [T],
    f: impl Fn(f32) -> T + Sync,
    task: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    assert!(out.len() >= m * n, "by_weight_blocks: the output is too short");
    if m == 0 || n == 0 {
        return;
    }
    let run = |c: usize| -> Vec<f32> {
        let j0 = c * ROWS_PER_TASK;
        let rows = ROWS_PER_TASK.min(n - j0);
        let mut part = vec![0f32; m * rows];
        task(j0, rows, &mut part);
        part
    };
    let blocks = n.div_ceil(ROWS_PER_TASK);
    let parts: Vec<Vec<f32>> =
        if threads { (0..blocks).into_par_iter().map(run).collect() } else { (0..blocks).map(run).collect() };
    let assemble = |(i, row): (usize, &mut [T])| {
        for (c, part) in parts.iter().enumerate() {
            let rows = part.len() / m;
            let dst = &mut row[c * ROWS_PER_TASK..][..rows];
            for (o, &v) in dst.iter_mut().zip(&part[i * rows..][..rows]) {
                *o = f(v);
            }
        }
    };
    let out = &mut out[..m * n];
    if threads {
        out.par_chunks_mut(n).enumerate().for_each(assemble);
    } else {
        out.chunks_mut(n).enumerate().for_each(assemble);
    }
}

/// The `vdpbf16ps` kernel: the f32 decode kernel's tiles with 32 bf16 values per load.
#[cfg(target_arch = "x86_64")]
#[expect(unsafe_code, reason = "AVX-512 intrinsics and unaligned loads")]
mod dot {
    use std::arch::x86_64::*;

    /// Input rows per pass over the task's weight rows (measured best of 4 to 64 at m = 32 to 128).
    const GROUP: usize = 8;

    /// `out[i * n + j] = x_i · w_j` for the n weight rows `w` of one task (output [m, n]).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) fn block(x: &[u16], w: &[u16], out: &mut [f32], m: usize, k: usize) {
        let n = w.len() / k;
        assert!(x.len() >= m * k && out.len() >= n * m, "lowp: buffers too short");
        for i0 in (0..m).step_by(GROUP) {
            let ie = (i0 + GROUP).min(m);
            let mut j = 0;
            while j + 4 <= n {
                rows::<4>(x, w, out, n, k, j, i0, ie);
                j += 4;
            }
            while j < n {
                rows::<1>(x, w, out, n, k, j, i0, ie);
                j += 1;
            }
        }
    }

    /// Weight rows j..j+J against input rows i0..ie.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    fn rows<const J: usize>(x: &[u16], w: &[u16], out: &mut [f32], n: usize, k: usize, j: usize, i0: usize, ie: usize) {
        let mut i = i0;
        while i + 4 <= ie {
            tile::<J, 4>(x, w, out, n, k, j, i);
            i += 4;
        }
        while i < ie {
            tile::<J, 1>(x, w, out, n, k, j, i);
            i += 1;
        }
    }

    /// 32 bf16 values from `p` (lanes at or past `mask` zeroed).
    #[inline(always)]
    unsafe fn load(mask: __mmask32, p: *const u16) -> __m512bh {
        // SAFETY: the caller keeps the unmasked lanes inside its slice; masked lanes are not read.
        let v = unsafe { _mm512_maskz_loadu_epi16(mask, p.cast::<i16>()) };
        // SAFETY: both are 512 bits of plain data.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// out[(i + b) * n + j + a] = w_{j+a} · x_{i+b} for a < J, b < I.
    #[inline]
    #[allow(clippy::needless_range_loop)] // indices into register tiles read clearer
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn tile<const J: usize, const I: usize>(
        x: &[u16],
        w: &[u16],
        out: &mut [f32],
        n: usize,
        k: usize,
        j: usize,
        i: usize,
    ) {
        debug_assert!((j + J) * k <= w.len() && (i + I) * k <= x.len());
        let mut acc = [[_mm512_setzero_ps(); I]; J];
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut p = 0;
        while p < k {
            let mask: __mmask32 = if p + 32 <= k { u32::MAX } else { (1u32 << (k - p)) - 1 };
            // SAFETY: rows j..j+J of w and i..i+I of x lie inside their slices (asserted in
            // `block`, since j + J <= n and i + I <= m), and lanes at or past k are masked off.
            let wv: [__m512bh; J] = std::array::from_fn(|a| unsafe { load(mask, wp.add((j + a) * k + p)) });
            // As in the f32 kernel: fetch the next weight rows' line ahead of use.
            for a in 0..J {
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add((j + J + a) * k + p).cast::<i8>());
            }
            for b in 0..I {
                // SAFETY: as above.
                let xv = unsafe { load(mask, xp.add((i + b) * k + p)) };
                for a in 0..J {
                    acc[a][b] = _mm512_dpbf16_ps(acc[a][b], wv[a], xv);
                }
            }
            p += 32;
        }
        for a in 0..J {
            for b in 0..I {
                out[(i + b) * n + j + a] = _mm512_reduce_add_ps(acc[a][b]);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Half operands on both paths (vdpbf16ps where the CPU has it, the widening fallback) give
    /// the f64 product of the same half values within f32 summation error, at odd shapes.
    #[test]
    fn products_match_an_f64_reference_on_every_path() {
        let mut r = crate::kernels::uniform(5, 1.0);
        for (m, k, n) in [(1, 7, 5), (3, 64, 130), (19, 70, 11), (16, 100, 257), (40, 33, 65), (130, 96, 9)] {
            let xf: Vec<f32> = (0..m * k).map(|_| r()).collect();
            let wf: Vec<f32> = (0..n * k).map(|_| r()).collect();
            for kind in [Half::Bf16, Half::F16] {
                let bits = |v: &[f32]| -> Vec<u16> {
                    v.iter()
                        .map(|&x| match kind {
                            Half::Bf16 => bf16_bits(x),
                            Half::F16 => half::f16::from_f32(x).to_bits(),
                        })
                        .collect()
                };
                let (x, w) = (bits(&xf), bits(&wf));
                let (mut xw, mut ww) = (Vec::new(), Vec::new());
                widen(kind, &x, &mut xw);
                widen(kind, &w, &mut ww);
                let got = matmul_t(kind, &x, &w, m, k, n);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k).map(|p| f64::from(xw[i * k + p]) * f64::from(ww[j * k + p])).sum();
                        let g = f64::from(got[i * n + j]);
                        assert!(
                            (g - want).abs() < 1e-5 * (k as f64),
                            "{kind:?} ({m},{k},{n}) [{i},{j}]: {g} vs {want}"
                        );
                    }
                }
                // A row's result does not depend on the other rows of its batch.
                let one = matmul_t(kind, &x[(m - 1) * k..], &w, 1, k, n);
                assert_eq!(one, got[(m - 1) * n..], "{kind:?} ({m},{k},{n}): the last row alone differs");
            }
        }
    }
}
