//! Linear layers with a decode-shaped fast path. Lock-step decoding multiplies a handful of rows
//! (one per sample) by each weight matrix. candle's CPU matmul is tuned for large products: with
//! 2–32 rows it packs and tiles as for hundreds, and a (16×1024)·(1024×3072) product costs about
//! ten times the single-row one, so N samples cost nearly N passes. Decoding is memory-bound:
//! done right, N rows should cost about one read of the weights. This op streams each weight row
//! once from memory and takes its dot product with every input row while it sits in L1.
//!
//! bf16 and f16 layers take [`crate::lowp`]'s products at every size (decode, prefill and
//! teacher forcing): candle has no half-precision CPU matmul and widened every weight to f32 on
//! each call.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};

/// Rows up to which the fast path is used with AVX2: measured on 2 cores, it beats candle's
/// matmul up to here (2 rows: 0.22 ms against 1.43 ms for 1024×3072; 8 rows: 0.93 against
/// 1.60 ms) and loses beyond (16 rows: 2.0 against 1.8 ms), where candle's packing pays off.
pub const SMALL_M: usize = 8;

/// The same with the register-blocked AVX-512 kernel, measured on 2 cores of an AMD EPYC (Zen 4)
/// with `cargo run --release -p rbon-models --example bench_linear M K N f32`: against candle's
/// matmul (gemm's AVX-512 kernels), 64×1536×512 0.51 ms against 1.24, 128×512×1536 0.89
/// against 1.27, 128×896×4864 4.6 against 4.4, and 256 rows lose everywhere (1.7 against
/// 1.4 ms at 256×512×1536). Up to 128 rows, the paper's largest N, a decode step stays here.
pub const SMALL_M_AVX512: usize = 128;

pub(crate) fn small_m() -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        return SMALL_M_AVX512;
    }
    SMALL_M
}

/// The weight of a linear layer: dense (any dtype; on the CPU, f32 takes the small-m path and
/// bf16/f16 rbon's half-precision products at every size), or
/// quantized (GGUF blocks, kept at their size in memory and multiplied by candle's quantized
/// matmul, which rounds each input row to the weight's dot-product format, Q8_0 or Q8_K).
#[derive(Debug, Clone)]
enum Weight {
    Dense(Tensor),
    Quantized(QMatMul),
}

/// A linear layer `y = x Wᵀ + b` (weights [out, in], as in safetensors and GGUF).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight: Weight::Dense(weight), bias }
    }

    /// A layer over quantized weights [out, in]. F32/F16/BF16 tensors should be dequantized and
    /// passed to [`Linear::new`] instead, which keeps the small-m path.
    pub fn quantized(weight: Arc<QTensor>, bias: Option<Tensor>) -> Self {
        Self { weight: Weight::Quantized(QMatMul::QTensor(weight)), bias }
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The dense weight; None for a quantized layer.
    pub fn weight(&self) -> Option<&Tensor> {
        match &self.weight {
            Weight::Dense(w) => Some(w),
            Weight::Quantized(_) => None,
        }
    }

    /// `forward(x)` as f32: the same values (rounded to x's dtype, then widened), with the
    /// rounding done inside the product on rbon's half-precision path, which saves a pass and a
    /// buffer of the output's size (an output head's logits are the largest tensor of a step).
    pub fn forward_f32(&self, x: &Tensor) -> Result<Tensor> {
        if let (Weight::Dense(w), None) = (&self.weight, &self.bias)
            && half_on_host(w, x)
        {
            return half_product(w, x, true);
        }
        self.forward(x)?.to_dtype(DType::F32)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Dense(w) => dense(w, x)?,
            // candle's quantized matmul takes f32 rows, contiguous.
            Weight::Quantized(q) => q.forward(&x.to_dtype(DType::F32)?.contiguous()?)?.to_dtype(x.dtype())?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

fn dense(weight: &Tensor, x: &Tensor) -> Result<Tensor> {
    // Half precision on the CPU: rbon's products at every size (candle's widen both operands to
    // f32 on each call; see `crate::lowp`).
    if half_on_host(weight, x) {
        return half_product(weight, x, false);
    }
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let m: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    let fast = crate::path::host_kernels(x.device())
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && m <= small_m();
    if fast {
        let x2 = x.reshape((m, k))?.contiguous()?;
        let y = x2.apply_op2_no_bwd(&weight.contiguous()?, &SmallMatmul)?;
        let mut out = dims.clone();
        if let Some(last) = out.last_mut() {
            *last = weight.dim(0)?;
        }
        y.reshape(out)
    } else {
        candle_nn::Linear::new(weight.clone(), None).forward(x)
    }
}

/// `x [m, k] · w [n, k]ᵀ → [m, n]` in f32 on the CPU, for small m.
struct SmallMatmul;

impl CustomOp2 for SmallMatmul {
    fn name(&self) -> &'static str {
        "small-m-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) else {
            candle_core::bail!("small-m-matmul: f32 only");
        };
        let (Some((xs, xe)), Some((ws, we))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("small-m-matmul: contiguous inputs only");
        };
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("small-m-matmul: inner dimensions {k} and {k2} differ");
        }
        let (x, w) = (&x[xs..xe], &w[ws..we]);
        let mut y = vec![0f32; m * n];
        crate::lowp::by_weight_blocks(
            m,
            n,
            true,
            &mut y,
            |v| v,
            |j0, rows, part| {
                if k > 0 {
                    block(x, &w[j0 * k..(j0 + rows) * k], part, m, k);
                }
            },
        );
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

/// Whether `x · weightᵀ` takes [`HalfMatmul`]: both bf16 or both f16, on rbon's CPU path.
fn half_on_host(weight: &Tensor, x: &Tensor) -> bool {
    crate::path::host_kernels(x.device())
        && x.dtype() == weight.dtype()
        && matches!(x.dtype(), DType::BF16 | DType::F16)
}

/// `x [.., k] · weight [n, k]ᵀ → [.., n]` by [`HalfMatmul`] (`widen`: as f32).
fn half_product(weight: &Tensor, x: &Tensor, widen: bool) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let m: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    let y = x.reshape((m, k))?.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &HalfMatmul { widen })?;
    if let Some(last) = dims.last_mut() {
        *last = weight.dim(0)?;
    }
    y.reshape(dims)
}

/// `x [m, k] · w [n, k]ᵀ → [m, n]` with both in bf16 or both in f16 on the CPU: products exact,
/// sums in f32 ([`crate::lowp`]), each output rounded once to the dtype, as torch's CPU linear;
/// `widen`: returned as f32 (the rounded values, widened).
struct HalfMatmul {
    widen: bool,
}

impl CustomOp2 for HalfMatmul {
    fn name(&self) -> &'static str {
        "half-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        use crate::lowp::{self, Half};
        use half::slice::HalfFloatSliceExt;
        use half::{bf16, f16};
        let (Some((xs, xe)), Some((ws, we))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("half-matmul: contiguous inputs only");
        };
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("half-matmul: inner dimensions {k} and {k2} differ");
        }
        let (kind, x, w): (Half, &[u16], &[u16]) = match (s1, s2) {
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => {
                (Half::Bf16, x[xs..xe].reinterpret_cast(), w[ws..we].reinterpret_cast())
            }
            (CpuStorage::F16(x), CpuStorage::F16(w)) => {
                (Half::F16, x[xs..xe].reinterpret_cast(), w[ws..we].reinterpret_cast())
            }
            _ => candle_core::bail!("half-matmul: both operands bf16 or both f16"),
        };
        // The product into [m, n] values of T, each output through `f`.
        fn product<T: Send + Clone>(
            (kind, x, w): (Half, &[u16], &[u16]),
            (m, k, n): (usize, usize, usize),
            zero: T,
            f: impl Fn(f32) -> T + Sync,
        ) -> Vec<T> {
            let mut y = vec![zero; m * n];
            lowp::matmul_t_into(kind, x, w, m, k, n, true, &mut y, f);
            y
        }
        let (op, dims) = ((kind, x, w), (m, k, n));
        let storage = match (kind, self.widen) {
            (Half::Bf16, true) => CpuStorage::F32(product(op, dims, 0.0, |v| bf16::from_f32(v).to_f32())),
            (Half::F16, true) => CpuStorage::F32(product(op, dims, 0.0, |v| f16::from_f32(v).to_f32())),
            (Half::Bf16, false) => CpuStorage::BF16(product(op, dims, bf16::ZERO, bf16::from_f32)),
            (Half::F16, false) => CpuStorage::F16(product(op, dims, f16::ZERO, f16::from_f32)),
        };
        Ok((storage, Shape::from((m, n))))
    }
}

/// `out[i * n + j] = x_i · w_j` for the n weight rows `w` of one task (output [m, n]),
/// dispatched to an AVX-512 or AVX2+FMA build where the CPU has it.
pub(crate) fn block(x: &[f32], w: &[f32], out: &mut [f32], m: usize, k: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports the features the function was compiled for (checked above).
        #[expect(unsafe_code, reason = "calling a function compiled for AVX-512")]
        unsafe {
            avx512::block(x, w, out, m, k)
        };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: as above.
        #[expect(unsafe_code, reason = "calling a function compiled for AVX2 and FMA")]
        unsafe {
            block_avx2(x, w, out, m, k)
        };
        return;
    }
    block_with(x, w, out, m, k, |a, b, c| a * b + c);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn block_avx2(x: &[f32], w: &[f32], out: &mut [f32], m: usize, k: usize) {
    // The same code compiled with AVX2/FMA: each lane array lives in a ymm register and
    // `mul_add` is one fused instruction.
    block_with(x, w, out, m, k, f32::mul_add)
}

/// Register-blocked AVX-512: 4 weight rows × 4 input rows per step, 16 accumulators, so each
/// 16-float load feeds 2 FMAs on average instead of 0.5 (the dot-product loop above is bound
/// by its loads). Rows past a multiple of 4 take the 1-row variants.
#[cfg(target_arch = "x86_64")]
#[expect(unsafe_code, reason = "AVX-512 intrinsics and unaligned loads")]
mod avx512 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) fn block(x: &[f32], w: &[f32], out: &mut [f32], m: usize, k: usize) {
        let n = w.len() / k;
        assert!(x.len() >= m * k && out.len() >= n * m, "small-m-matmul: buffers too short");
        // Input rows in groups of 16 (at k = 1024, 64 KiB: about L1) against all of this
        // task's weight rows (in L2).
        for i0 in (0..m).step_by(16) {
            let ie = (i0 + 16).min(m);
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
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    fn rows<const J: usize>(x: &[f32], w: &[f32], out: &mut [f32], n: usize, k: usize, j: usize, i0: usize, ie: usize) {
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

    /// out[(i + b) * n + j + a] = w_{j+a} · x_{i+b} for a < J, b < I.
    #[inline]
    #[allow(clippy::needless_range_loop)] // indices into register tiles read clearer
    #[target_feature(enable = "avx512f")]
    fn tile<const J: usize, const I: usize>(
        x: &[f32],
        w: &[f32],
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
            // A masked load reads only the lanes below k: the tail of a row never reads past it.
            let mask: __mmask16 = if p + 16 <= k { 0xffff } else { ((1u32 << (k - p)) - 1) as __mmask16 };
            // SAFETY: rows j..j+J of w and i..i+I of x lie inside their slices (asserted in
            // `block`, since j + J <= n and i + I <= m), and lanes at or past k are masked off.
            let wv: [__m512; J] =
                std::array::from_fn(|a| unsafe { _mm512_maskz_loadu_ps(mask, wp.add((j + a) * k + p)) });
            // Decoding streams each weight once from memory, and the hardware prefetcher does
            // not keep up with four rows at once: fetch the next rows' line ahead of use.
            for a in 0..J {
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add((j + J + a) * k + p).cast::<i8>());
            }
            for b in 0..I {
                // SAFETY: as above.
                let xv = unsafe { _mm512_maskz_loadu_ps(mask, xp.add((i + b) * k + p)) };
                for a in 0..J {
                    acc[a][b] = _mm512_fmadd_ps(wv[a], xv, acc[a][b]);
                }
            }
            p += 16;
        }
        for a in 0..J {
            for b in 0..I {
                out[(i + b) * n + j + a] = _mm512_reduce_add_ps(acc[a][b]);
            }
        }
    }
}

/// Each weight row is loaded once and dotted with every input row while it sits in L1.
#[inline(always)]
fn block_with(x: &[f32], w: &[f32], out: &mut [f32], m: usize, k: usize, fma: impl Fn(f32, f32, f32) -> f32 + Copy) {
    let n = w.len() / k;
    for (j, wr) in w.chunks_exact(k).enumerate() {
        for i in 0..m {
            out[i * n + j] = dot(&x[i * k..(i + 1) * k], wr, fma);
        }
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32], fma: impl Fn(f32, f32, f32) -> f32) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..L {
            acc[l] = fma(x[l], y[l], acc[l]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s = fma(*x, *y, s);
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Every kernel variant this CPU can run, against a plain dot product.
    #[test]
    fn kernel_variants_agree() {
        let (m, k, n) = (19, 70, 11);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 13) % 23) as f32 / 11.0 - 1.0).collect();
        let want: Vec<f32> =
            (0..m * n).map(|o| (0..k).map(|p| x[(o / n) * k + p] * w[(o % n) * k + p]).sum::<f32>()).collect();
        let check = |got: &[f32], what: &str| {
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-4, "{what}: {g} vs {e}");
            }
        };
        let mut out = vec![0f32; n * m];
        block_with(&x, &w, &mut out, m, k, |a, b, c| a * b + c);
        check(&out, "portable");
        #[cfg(target_arch = "x86_64")]
        #[expect(unsafe_code, reason = "calling the SIMD kernels under test")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the features were checked just above.
                unsafe { block_avx2(&x, &w, &mut out, m, k) };
                check(&out, "avx2");
            }
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: as above.
                unsafe { avx512::block(&x, &w, &mut out, m, k) };
                check(&out, "avx512");
            }
        }
    }

    #[test]
    fn matches_candle_matmul() {
        let dev = candle_core::Device::Cpu;
        for (m, k, n) in [(1, 7, 5), (3, 64, 130), (16, 100, 257), (21, 48, 9), (32, 33, 65), (40, 16, 3)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let fast = Linear::new(w.clone(), Some(b.clone())).forward(&x).unwrap();
            let slow = candle_nn::Linear::new(w, Some(b)).forward(&x).unwrap();
            let diff = (fast - slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-3, "{m}x{k}x{n}: {diff}");
        }
        // Half precision: rbon's products against candle's (which widen to f32 and multiply
        // there), within one rounding of the output; `forward_f32` gives exactly the rounded
        // values, widened.
        for dtype in [DType::BF16, DType::F16] {
            for (m, k, n) in [(1, 7, 5), (3, 64, 130), (16, 100, 257), (40, 48, 9), (130, 33, 65)] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap().to_dtype(dtype).unwrap();
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap().to_dtype(dtype).unwrap();
                let ours = Linear::new(w.clone(), None);
                let fast = ours.forward(&x).unwrap();
                assert_eq!(fast.dtype(), dtype);
                let slow = candle_nn::Linear::new(w, None).forward(&x).unwrap();
                let (fast, slow) = (fast.to_dtype(DType::F32).unwrap(), slow.to_dtype(DType::F32).unwrap());
                let diff = (&fast - &slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let scale = slow.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff <= scale * 1e-2, "{dtype:?} {m}x{k}x{n}: {diff} (largest value {scale})");
                let widened = ours.forward_f32(&x).unwrap();
                assert_eq!(widened.dtype(), DType::F32);
                assert_eq!(widened.to_vec2::<f32>().unwrap(), fast.to_vec2::<f32>().unwrap(), "{dtype:?} {m}x{k}x{n}");
            }
        }
        // 3-d input (batch, time, features) keeps its leading shape.
        let x = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (4, 8), &dev).unwrap();
        assert_eq!(Linear::new(w, None).forward(&x).unwrap().dims(), &[2, 3, 4]);
    }
}
