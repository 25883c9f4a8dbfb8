//! CPU f32 kernels for the prefill-shaped forward passes of scoring (BERT embedders and decoder
//! reward models over packed rows): a GEMM wrapper, attention over one packed row, and fused,
//! vectorised, multi-threaded element-wise ops.
//!
//! Why not candle's ops: on the CPU its unary and binary ops run on one thread and call libm's
//! scalar `expf`/`erf` per element (GELU and SiLU then cost seconds per thousand texts), its
//! generic softmax makes five passes, and a padded batch's attention materialises a
//! [batch, heads, t, t] score tensor that is written and read again by each of those passes.
//! Here every element-wise op is one pass, parallel over tokens, with an `exp` that LLVM
//! vectorises (a Cephes-style polynomial) compiled for AVX-512 or AVX2 where the CPU has it.

use gemm::Parallelism;

#[cfg(test)]
pub(crate) use crate::epilogue::uniform;
pub use crate::epilogue::{Epilogue, Mat};
use crate::epilogue::{exp, finish, gelu};
use rayon::prelude::*;

/// Rows of work per rayon task for element-wise ops over [tokens, width] buffers.
const TOKENS_PER_TASK: usize = 16;

/// Compiles `$body` three times (AVX-512, AVX2+FMA, baseline) and picks one at run time. The
/// helpers it calls are `#[inline(always)]`, so they are compiled with the same features.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        multiversion! { $(#[$m])* $vis fn $name($($arg: $ty),*) -> () $body }
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                fn v4($($arg: $ty),*) -> $ret $body
                #[target_feature(enable = "avx2,fma")]
                fn v3($($arg: $ty),*) -> $ret $body
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512dq")
                    && std::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU has the features `v4` was compiled for (checked above).
                    #[expect(unsafe_code, reason = "calling the AVX-512 build of this function")]
                    return unsafe { v4($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above, for `v3`.
                    #[expect(unsafe_code, reason = "calling the AVX2 build of this function")]
                    return unsafe { v3($($arg),*) };
                }
            }
            $body
        }
    };
}
pub(crate) use multiversion;

multiversion! {
    /// `x ← gelu(x)`, one thread's share.
    fn gelu_erf_serial(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = gelu(*v);
        }
    }
}

multiversion! {
    /// `gate ← silu(gate) · up` (the Llama MLP's activation), single-threaded.
    pub fn silu_mul_one(gate: &mut [f32], up: &[f32]) {
        for (g, u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + exp(-*g)) * u;
        }
    }
}

/// Lanes of the explicit accumulators below: LLVM does not reorder float reductions by itself,
/// so a plain `sum` or `max` over a slice runs one element at a time.
const LANES: usize = 16;

#[inline(always)]
pub(crate) fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    rest.iter().chain(acc.iter()).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

#[inline(always)]
pub(crate) fn sum_of(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += f(c[l]);
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|&v| f(v)).sum::<f32>()
}

/// `x[i] ← e^(scale · (x[i] − max x))` in place; returns 1 / Σ of them.
#[inline(always)]
fn exps(x: &mut [f32], scale: f32) -> f32 {
    let max = max_of(x);
    let mut acc = [0f32; LANES];
    let (chunks, rest) = x.as_chunks_mut::<LANES>();
    for c in chunks {
        for l in 0..LANES {
            let e = exp((c[l] - max) * scale);
            c[l] = e;
            acc[l] += e;
        }
    }
    // The tail as one more vector, padded with -inf (whose exp is 0), rather than a scalar
    // exp per leftover element: rows of ~100 keys leave up to 15.
    if !rest.is_empty() {
        let mut pad = [f32::NEG_INFINITY; LANES];
        pad[..rest.len()].copy_from_slice(rest);
        for l in 0..LANES {
            let e = exp((pad[l] - max) * scale);
            pad[l] = e;
            acc[l] += e;
        }
        rest.copy_from_slice(&pad[..rest.len()]);
    }
    let sum: f32 = acc.iter().sum();
    1.0 / sum
}

multiversion! {
    /// softmax(scale · x) of one row in place (scale > 0).
    fn softmax_serial(x: &mut [f32], scale: f32) {
        let inv = exps(x, scale);
        for v in x.iter_mut() {
            *v *= inv;
        }
    }
}

multiversion! {
    /// softmax(scale · x) of one row rounded to bf16 (to nearest, ties to even) in pairs into
    /// `out`, as the bf16 products read a row; `x` is left holding the unnormalised exponentials.
    fn softmax_pairs_serial(x: &mut [f32], scale: f32, out: &mut [u32]) {
        let inv = exps(x, scale);
        // Branch-free rounding, so that the pass vectorises (exact for the finite values a
        // softmax gives).
        let round = |v: f32| {
            let b = (v * inv).to_bits();
            b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16
        };
        let (pairs, rest) = x.as_chunks::<2>();
        for (o, [lo, hi]) in out.iter_mut().zip(pairs) {
            *o = round(*lo) | (round(*hi) << 16);
        }
        if let (Some(&lo), Some(o)) = (rest.first(), out.get_mut(pairs.len())) {
            *o = round(lo);
        }
    }
}

multiversion! {
    /// LayerNorm of each row of `x` in place (mean and variance in f32, two passes, as torch).
    fn layer_norm_serial(x: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
        let width = w.len();
        for row in x.chunks_exact_mut(width) {
            let mean = sum_of(row, |v| v) / width as f32;
            let var = sum_of(row, |v| (v - mean) * (v - mean)) / width as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for ((v, w), b) in row.iter_mut().zip(w).zip(b) {
                *v = (*v - mean) * inv * w + b;
            }
        }
    }
}

multiversion! {
    /// RMSNorm of each row of `x` into `out` (Llama: x / sqrt(mean(x²) + eps) · w).
    fn rms_norm_serial(x: &[f32], out: &mut [f32], w: &[f32], eps: f32) {
        crate::host::rms_norm_with::<crate::host::NoRound>(x, out, w, eps);
    }
}

multiversion! {
    /// `out[i] = e^(x[i] - shift)`; returns Σ out in f64 (a sampler's weights and normaliser).
    pub fn exp_shifted(x: &[f32], shift: f32, out: &mut [f32]) -> f64 {
        let mut acc = [0f64; LANES];
        let mut xs = x.chunks_exact(LANES);
        let mut os = out.chunks_exact_mut(LANES);
        for (c, o) in (&mut xs).zip(&mut os) {
            for l in 0..LANES {
                let e = exp(c[l] - shift);
                o[l] = e;
                acc[l] += f64::from(e);
            }
        }
        let mut sum: f64 = acc.iter().sum();
        for (v, o) in xs.remainder().iter().zip(os.into_remainder()) {
            *o = exp(*v - shift);
            sum += f64::from(*o);
        }
        sum
    }
}

/// softmax(scale · x) of one row in place (scale > 0; -inf entries become 0).
pub fn softmax(x: &mut [f32], scale: f32) {
    softmax_serial(x, scale);
}

/// softmax(scale · x) of one row as bf16 pairs into `out` (`x.len()`/2 rounded up; the last
/// high half zero when the length is odd); `x` is left holding the unnormalised exponentials.
///
/// # Panics
/// When `out` is shorter than that (a bug in the caller).
pub(crate) fn softmax_pairs(x: &mut [f32], scale: f32, out: &mut [u32]) {
    assert!(out.len() >= x.len().div_ceil(2), "softmax_pairs: too few pairs");
    softmax_pairs_serial(x, scale, out);
}

/// LayerNorm over rows of width `w.len()`, in place; `threads`: in parallel.
pub fn layer_norm(x: &mut [f32], w: &[f32], b: &[f32], eps: f32, threads: bool) {
    if threads {
        x.par_chunks_mut(TOKENS_PER_TASK * w.len()).for_each(|c| layer_norm_serial(c, w, b, eps));
    } else {
        layer_norm_serial(x, w, b, eps);
    }
}

/// RMSNorm over rows of width `w.len()` into `out`, in parallel.
pub fn rms_norm(x: &[f32], out: &mut [f32], w: &[f32], eps: f32) {
    let c = TOKENS_PER_TASK * w.len();
    x.par_chunks(c).zip(out.par_chunks_mut(c)).for_each(|(x, o)| rms_norm_serial(x, o, w, eps));
}

/// `out ← (accumulate ? out : 0) + x · wᵀ` for x [m, k] and w [n, k] (a linear layer's weight),
/// `out` [m, n] with row stride `ldo`. `threads`: split the product across rayon's pool (off
/// when the caller already runs one product per task).
///
/// # Panics
/// When a view does not fit its buffer or the shapes disagree: the callers' shapes come from a
/// checked model config, so this is a bug, not bad input.
pub fn matmul_t(x: Mat, w: Mat, out: &mut [f32], ldo: usize, accumulate: bool, threads: bool) {
    let (m, k, n) = (x.rows, x.cols, w.rows);
    assert_eq!(w.cols, k, "matmul_t: inner dimensions differ");
    assert!(x.fits() && w.fits(), "matmul_t: an input view exceeds its buffer");
    assert!(m == 0 || n == 0 || (m - 1) * ldo + n <= out.len(), "matmul_t: the output exceeds its buffer");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out.chunks_mut(ldo).take(m).for_each(|r| r[..n].fill(0.0));
        }
        return;
    }
    let par = if threads { Parallelism::Rayon(0) } else { Parallelism::None };
    // w [n, k] read as wᵀ [k, n]: row stride 1, column stride w.stride.
    gemm_raw(x, (w.data, 1, w.stride), m, n, k, out, ldo, accumulate, par);
}

/// A linear layer's weight [rows, cols] (out, in), held the way [`linear`] multiplies fastest:
/// packed for AMX tiles where the CPU has them and the shape allows (see [`crate::amx`]),
/// plain f32 for gemm otherwise.
#[derive(Debug)]
pub struct Weight {
    rows: usize,
    cols: usize,
    repr: Repr,
}

#[derive(Debug)]
enum Repr {
    F32(Vec<f32>),
    /// bf16 panels, multiplied with `vdpbf16ps` ([`crate::panels`]).
    Bf16(crate::panels::Panels),
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    Amx(crate::amx::Packed),
}

impl Weight {
    /// `data` is [rows, cols], row-major.
    ///
    /// # Panics
    /// When `data` does not hold rows·cols values (a bug in the loader).
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Self {
        Self::prepared(data, rows, cols, false)
    }

    /// For products in bf16 (operands rounded to bf16, sums in f32) where the CPU has AMX or
    /// AVX-512-BF16 (`vdpbf16ps`, twice the rate of f32 FMAs); f32 like [`Self::new`] elsewhere
    /// (on AVX2 alone, bf16 products would be slower than f32 ones).
    ///
    /// # Panics
    /// As [`Self::new`].
    pub fn bf16(data: Vec<f32>, rows: usize, cols: usize) -> Self {
        Self::prepared(data, rows, cols, true)
    }

    /// Packed for AMX when the CPU has it and the shape fits, f32 otherwise.
    #[cfg_attr(not(all(target_arch = "x86_64", target_os = "linux")), allow(unused_variables))]
    fn prepared(data: Vec<f32>, rows: usize, cols: usize, bf16: bool) -> Self {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            use crate::amx::{Packed, Precision, available};
            let precision = if bf16 { Precision::Bf16 } else { Precision::F32 };
            if available()
                && let Some(p) = Packed::new(&data, rows, cols, precision)
            {
                return Self { rows, cols, repr: Repr::Amx(p) };
            }
        }
        if bf16 && crate::lowp::dot_bf16_available() {
            return Self { rows, cols, repr: Repr::Bf16(crate::panels::Panels::new(&data, rows, cols)) };
        }
        Self::portable(data, rows, cols)
    }

    /// Always plain f32 (gemm), whatever the CPU.
    ///
    /// # Panics
    /// As [`Self::new`].
    pub fn portable(data: Vec<f32>, rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "Weight: {rows}×{cols} from {} values", data.len());
        Self { rows, cols, repr: Repr::F32(data) }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Whether products with this weight run on AMX tiles.
    pub fn on_amx(&self) -> bool {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        return matches!(self.repr, Repr::Amx(_));
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        false
    }

    /// The bf16 panels, when products with this weight run on `vdpbf16ps` (AVX-512-BF16
    /// without AMX).
    pub(crate) fn panels(&self) -> Option<&crate::panels::Panels> {
        match &self.repr {
            Repr::Bf16(p) => Some(p),
            _ => None,
        }
    }

    /// Whether products with this weight take bf16 operands (on AMX or AVX-512-BF16).
    pub fn in_bf16(&self) -> bool {
        match &self.repr {
            Repr::F32(_) => false,
            Repr::Bf16(_) => true,
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            Repr::Amx(p) => p.is_bf16(),
        }
    }
}

/// What [`linear`] does around its product:
/// `out ← gelu?((accumulate ? out : 0) + x · wᵀ + bias)` with a prepared [`Weight`] (see
/// [`Epilogue`]); `out` is [x.rows, w.rows] at row stride `ldo`. On AMX, not in passes of their
/// own: a fresh sum starts from the bias in its accumulator tiles, and GELU (or a residual's
/// bias) is applied to each block of the output while it is in L1.
///
/// # Panics
/// As [`matmul_t`], and when the bias is not one value per output column.
pub fn linear(x: Mat, w: &Weight, out: &mut [f32], ldo: usize, then: Epilogue, threads: bool) {
    assert_eq!(x.cols, w.cols, "linear: inner dimensions differ");
    assert!(then.bias.is_none_or(|b| b.len() == w.rows), "linear: the bias is not one value per output");
    match &w.repr {
        Repr::F32(d) => {
            let (m, n) = (x.rows, w.rows);
            if let Some(b) = then.bias {
                rows_of(out, ldo, m, n, threads, |r| {
                    if then.accumulate {
                        finish(r, Some(b), false);
                    } else {
                        r.copy_from_slice(b);
                    }
                });
            }
            matmul_t(x, Mat::new(d, w.rows, w.cols), out, ldo, then.accumulate || then.bias.is_some(), threads);
            if then.gelu {
                rows_of(out, ldo, m, n, threads, gelu_erf_serial);
            }
        }
        Repr::Bf16(p) => {
            use crate::panels::{Input, Out};
            crate::panels::linear(Input::Rows(x), p, Out::F32(out, ldo), then, threads);
        }
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        Repr::Amx(p) => crate::amx::matmul_t(x, p, out, ldo, then, threads),
    }
}

/// `f` on the first `n` values of each of the `m` rows of `out` (row stride `ldo`); `threads`:
/// in parallel.
fn rows_of(out: &mut [f32], ldo: usize, m: usize, n: usize, threads: bool, f: impl Fn(&mut [f32]) + Sync) {
    if m == 0 || n == 0 {
        return;
    }
    let out = &mut out[..(m - 1) * ldo + n];
    if threads {
        out.par_chunks_mut(ldo * TOKENS_PER_TASK).for_each(|c| c.chunks_mut(ldo).for_each(|r| f(&mut r[..n])));
    } else {
        out.chunks_mut(ldo).for_each(|r| f(&mut r[..n]));
    }
}

/// `out ← (accumulate ? out : 0) + a · b` for a [m, k] (row-major view) and b [k, n] given as
/// (data, row stride, column stride). The one place that calls gemm.
#[allow(clippy::too_many_arguments)]
fn gemm_raw(
    a: Mat,
    b: (&[f32], usize, usize),
    m: usize,
    n: usize,
    k: usize,
    out: &mut [f32],
    ldo: usize,
    accumulate: bool,
    par: Parallelism,
) {
    let (bd, brs, bcs) = b;
    assert!(a.rows == m && a.cols == k && a.fits(), "gemm: the left view does not fit its buffer");
    assert!((k - 1) * brs + (n - 1) * bcs < bd.len(), "gemm: the right view exceeds its buffer");
    assert!((m - 1) * ldo + n <= out.len(), "gemm: the output exceeds its buffer");
    // SAFETY: the asserts above (with m, n, k ≥ 1, checked by the callers) keep every element
    // gemm reads or writes inside the three slices: a[i * a.stride + p], b[p * brs + j * bcs]
    // and out[i * ldo + j] for i < m, j < n, p < k. `out` is borrowed mutably, so nothing else
    // aliases it.
    #[expect(unsafe_code, reason = "gemm takes raw pointers and strides")]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            ldo as isize,
            accumulate,
            a.data.as_ptr(),
            1,
            a.stride as isize,
            bd.as_ptr(),
            bcs as isize,
            brs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
}

/// Which keys a query sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    /// Every position of the row (encoders).
    All,
    /// Keys at or before the query, within a sliding window when `Some` (decoders).
    Causal(Option<usize>),
}

/// Scaled dot-product attention over one packed row of `t` tokens, for every head.
///
/// `q` is [tq, heads·d] (the last `tq` queries of the row), `k` and `v` are [t, kv_heads·d];
/// query head h reads KV head h / (heads / kv_heads). Writes [tq, heads·d] into `out` (row
/// stride `ldo`). `scratch` is reused across calls.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: Mat,
    k: Mat,
    v: Mat,
    heads: usize,
    kv_heads: usize,
    d: usize,
    vis: Visibility,
    out: &mut [f32],
    ldo: usize,
    scratch: &mut Vec<f32>,
) {
    let (tq, t) = (q.rows, k.rows);
    let rep = heads / kv_heads.max(1);
    let scale = 1.0 / (d as f32).sqrt();
    let first = t - tq; // absolute position of the first query
    // Causal rows go in blocks of queries, each against only the keys its queries can see:
    // about half the work of the full square for long rows.
    let block = match vis {
        Visibility::All => tq.max(1),
        Visibility::Causal(_) => CAUSAL_BLOCK,
    };
    for h in 0..heads {
        let kv = h / rep.max(1);
        let mut q0 = 0;
        while q0 < tq {
            let q1 = (q0 + block).min(tq);
            let (k0, k1) = match vis {
                Visibility::All => (0, t),
                Visibility::Causal(w) => (w.map_or(0, |w| (first + q0 + 1).saturating_sub(w)), first + q1),
            };
            let nk = k1 - k0;
            scratch.clear();
            scratch.resize((q1 - q0) * nk, 0.0);
            let qh = Mat { data: &q.data[q0 * q.stride + h * d..], rows: q1 - q0, cols: d, stride: q.stride };
            let kh = Mat { data: &k.data[k0 * k.stride + kv * d..], rows: nk, cols: d, stride: k.stride };
            matmul_t(qh, kh, scratch, nk, false, false);
            for (i, row) in scratch.chunks_exact_mut(nk).enumerate() {
                let pos = first + q0 + i;
                let (lo, hi) = match vis {
                    Visibility::All => (0, nk),
                    Visibility::Causal(w) => (w.map_or(0, |w| (pos + 1).saturating_sub(w)) - k0, pos + 1 - k0),
                };
                row[..lo].fill(0.0);
                row[hi..].fill(0.0);
                softmax(&mut row[lo..hi], scale);
            }
            let vh = Mat { data: &v.data[k0 * v.stride + kv * d..], rows: nk, cols: d, stride: v.stride };
            matmul_nn(Mat::new(scratch, q1 - q0, nk), vh, &mut out[q0 * ldo + h * d..], ldo);
            q0 = q1;
        }
    }
}

/// Queries per block of causal attention.
const CAUSAL_BLOCK: usize = 64;

/// `out ← a · b` for a [m, k] and b [k, n] (row-major views), single-threaded.
fn matmul_nn(a: Mat, b: Mat, out: &mut [f32], ldo: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul_nn: inner dimensions differ");
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    gemm_raw(a, (b.data, b.stride, 1), m, n, k, out, ldo, false, Parallelism::None);
}

/// Splits `buf` ([tokens, width]) into one mutable slice per packed row, for `par_iter`.
pub fn split_rows<'a>(mut buf: &'a mut [f32], offsets: &[usize], width: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(offsets.len().saturating_sub(1));
    for w in offsets.windows(2) {
        let (head, tail) = buf.split_at_mut((w[1] - w[0]) * width);
        out.push(head);
        buf = tail;
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::epilogue::{assert_epilogue, erf};

    /// The fused softmax-and-round gives the bf16 pairs of the f32 softmax, bit for bit.
    #[test]
    fn softmax_pairs_round_the_softmax() {
        let mut r = uniform(21, 8.0);
        for len in [1usize, 2, 15, 16, 17, 33, 114] {
            let x: Vec<f32> = (0..len).map(|_| r()).collect();
            let mut want = x.clone();
            softmax(&mut want, 0.7);
            let bits = |i: usize| want.get(i).map_or(0, |&v| u32::from(half::bf16::from_f32(v).to_bits()));
            let mut got = vec![u32::MAX; len.div_ceil(2)];
            softmax_pairs(&mut x.clone(), 0.7, &mut got);
            for (p, g) in got.iter().enumerate() {
                assert_eq!(*g, bits(2 * p) | (bits(2 * p + 1) << 16), "len {len}, pair {p}");
            }
        }
    }

    #[test]
    fn exp_and_erf_are_accurate() {
        // The documented range, [-87, 88].
        for i in -1990..=2010 {
            let x = i as f32 * 0.0437;
            let (got, want) = (exp(x), x.exp());
            assert!((got - want).abs() <= 3e-7 * want, "exp({x}) = {got}, want {want}");
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        for i in -600..=600 {
            let x = i as f64 * 0.01;
            let want = libm_erf(x);
            let got = f64::from(erf(x as f32));
            assert!((got - want).abs() < 5e-7, "erf({x}) = {got}, want {want}");
        }
    }

    /// erf by its Taylor series / continued fraction, in f64: an independent reference.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() < 3.0 {
            let mut sum = 0.0;
            let mut term = x;
            let mut n = 0.0;
            while term.abs() > 1e-17 {
                sum += term / (2.0 * n + 1.0);
                n += 1.0;
                term *= -x * x / n;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc by Lentz's continued fraction.
            let a = x.abs();
            let mut f = a;
            for k in (1..60).rev() {
                f = a + (k as f64 / 2.0) / f;
            }
            let erfc = (-a * a).exp() / (f * std::f64::consts::PI.sqrt());
            (1.0 - erfc).copysign(x)
        }
    }

    #[test]
    fn fused_ops_match_plain_formulas() {
        let x: Vec<f32> = (0..3000).map(|i| ((i * 37) % 1000) as f32 / 100.0 - 5.0).collect();
        let mut g = x.clone();
        gelu_erf_serial(&mut g);
        for (a, b) in x.iter().zip(&g) {
            let want = 0.5 * f64::from(*a) * (1.0 + libm_erf(f64::from(*a) / 2f64.sqrt()));
            assert!((f64::from(*b) - want).abs() < 1e-6, "gelu({a})");
        }
        let up: Vec<f32> = x.iter().map(|v| v * 0.5 + 1.0).collect();
        let mut s = x.clone();
        silu_mul_one(&mut s, &up);
        for ((a, u), b) in x.iter().zip(&up).zip(&s) {
            let want = f64::from(*a) / (1.0 + (-f64::from(*a)).exp()) * f64::from(*u);
            assert!((f64::from(*b) - want).abs() < 1e-5 * want.abs().max(1.0), "silu({a})");
        }
        let mut row = vec![1.0f32, 2.0, 3.0, f32::NEG_INFINITY];
        softmax(&mut row, 1.0);
        let z: f64 = [1f64, 2.0, 3.0].iter().map(|v| v.exp()).sum();
        for (i, v) in [1f64, 2.0, 3.0].iter().enumerate() {
            assert!((f64::from(row[i]) - v.exp() / z).abs() < 1e-7);
        }
        assert_eq!(row[3], 0.0);
    }

    /// A prepared weight (AMX tiles where the CPU has them and the shape fits, gemm otherwise)
    /// gives the plain f32 product: within the bf16x3 bound for f32, the bf16 bound for bf16;
    /// with every epilogue, strided output, on one thread or many.
    #[test]
    fn prepared_weights_match_plain_products() {
        let mut r = uniform(9, 0.5);
        for (m, k, n) in [(37, 64, 96), (5, 48, 40), (64, 384, 64)] {
            let x: Vec<f32> = (0..m * k).map(|_| r()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| r()).collect();
            let bias: Vec<f32> = (0..n).map(|_| r()).collect();
            let ldo = n + 3;
            let start: Vec<f32> = (0..m * ldo).map(|_| r()).collect();
            let mut plain = vec![0f32; m * n];
            matmul_t(Mat::new(&x, m, k), Mat::new(&w, n, k), &mut plain, n, false, true);
            for (wt, tol, may_use_amx) in [
                (Weight::new(w.clone(), n, k), 1e-5, true),
                (Weight::bf16(w.clone(), n, k), 1e-2, true),
                (Weight::portable(w.clone(), n, k), 1e-6, false),
            ] {
                assert_eq!((wt.rows(), wt.cols()), (n, k));
                #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
                assert_eq!(wt.on_amx(), may_use_amx && crate::amx::available() && crate::amx::fits(n, k));
                if !wt.on_amx() {
                    assert_eq!(wt.in_bf16(), tol > 1e-3 && crate::lowp::dot_bf16_available());
                }
                #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
                assert!(!wt.on_amx() || may_use_amx);
                for then in [
                    Epilogue::overwrite(None),
                    Epilogue::overwrite(Some(&bias)).gelu(),
                    Epilogue::accumulate(Some(&bias)),
                    Epilogue::accumulate(None).gelu(),
                ] {
                    for threads in [true, false] {
                        let mut got = start.clone();
                        linear(Mat::new(&x, m, k), &wt, &mut got, ldo, then, threads);
                        let what = format!("({m},{k},{n}) amx={} {then:?} threads={threads}", wt.on_amx());
                        let tol = tol * (k as f64).sqrt();
                        assert_epilogue(
                            &got,
                            &start,
                            (m, n, ldo),
                            then,
                            |i, j| f64::from(plain[i * n + j]),
                            tol,
                            &what,
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_and_attention_match_naive() {
        let (m, k, n) = (5, 7, 3);
        let x: Vec<f32> = (0..m * k).map(|i| (i % 11) as f32 - 5.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.5 - 1.0).collect();
        let mut out = vec![1.0f32; m * n];
        matmul_t(Mat::new(&x, m, k), Mat::new(&w, n, k), &mut out, n, true, true);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0 + (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum::<f32>();
                assert!((out[i * n + j] - want).abs() < 1e-4);
            }
        }
        // Attention against a direct computation in f64: grouped heads, causal with and without
        // a window, rows longer than a query block, only the last queries, and bidirectional.
        for (t, tq, heads, kvh, d, vis) in [
            (4, 4, 2, 1, 3, Visibility::Causal(None)),
            (150, 150, 4, 2, 8, Visibility::Causal(None)),
            (150, 150, 4, 2, 8, Visibility::Causal(Some(40))),
            (150, 1, 4, 2, 8, Visibility::Causal(Some(40))),
            (150, 3, 4, 4, 8, Visibility::Causal(None)),
            (70, 70, 3, 3, 5, Visibility::All),
        ] {
            let f = |n: usize, salt: usize| -> Vec<f32> {
                (0..n).map(|i| (((i * 7919 + salt * 104729) % 1000) as f32 / 500.0 - 1.0) * 0.8).collect()
            };
            let (q, kk, v) = (f(tq * heads * d, 1), f(t * kvh * d, 2), f(t * kvh * d, 3));
            let mut out = vec![0.0f32; tq * heads * d];
            let mut scratch = Vec::new();
            attention(
                Mat::new(&q, tq, heads * d),
                Mat::new(&kk, t, kvh * d),
                Mat::new(&v, t, kvh * d),
                heads,
                kvh,
                d,
                vis,
                &mut out,
                heads * d,
                &mut scratch,
            );
            for h in 0..heads {
                let g = h / (heads / kvh);
                for i in 0..tq {
                    let pos = t - tq + i;
                    let keys: Vec<usize> = match vis {
                        Visibility::All => (0..t).collect(),
                        Visibility::Causal(w) => (0..=pos).filter(|&j| w.is_none_or(|w| pos - j < w)).collect(),
                    };
                    let s: Vec<f64> = keys
                        .iter()
                        .map(|&j| {
                            (0..d)
                                .map(|c| {
                                    f64::from(q[i * heads * d + h * d + c]) * f64::from(kk[j * kvh * d + g * d + c])
                                })
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let mx = s.iter().copied().fold(f64::MIN, f64::max);
                    let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                    for c in 0..d {
                        let want: f64 = keys
                            .iter()
                            .zip(&s)
                            .map(|(&j, sj)| (sj - mx).exp() / z * f64::from(v[j * kvh * d + g * d + c]))
                            .sum();
                        let got = f64::from(out[i * heads * d + h * d + c]);
                        assert!(
                            (got - want).abs() < 1e-5,
                            "{vis:?} t {t}: head {h} query {i} dim {c}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
