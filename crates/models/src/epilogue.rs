//! What the CPU kernels and the AMX tile kernel share (so neither imports the other): a
//! matrix view, what a product does after it (bias, residual, GELU), and the scalar exp, erf and
//! GELU that every vectorised pass inlines.

/// A row-major f32 matrix view: `rows` rows of `cols` values, row i starting at `i * stride`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
}

impl<'a> Mat<'a> {
    /// A dense [rows, cols] matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols, stride: cols }
    }

    pub(crate) fn fits(&self) -> bool {
        self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.stride + self.cols <= self.data.len()
    }
}

/// `out ← gelu?((accumulate ? out : 0) + x · wᵀ + bias)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// Add to `out` (a residual stream) instead of overwriting it.
    pub accumulate: bool,
    /// One value per output column.
    pub bias: Option<&'a [f32]>,
    /// The exact (erf) GELU on the result.
    pub gelu: bool,
}

impl<'a> Epilogue<'a> {
    /// `out ← x · wᵀ + bias`.
    pub fn overwrite(bias: Option<&'a [f32]>) -> Self {
        Self { accumulate: false, bias, gelu: false }
    }

    /// `out ← out + x · wᵀ + bias`.
    pub fn accumulate(bias: Option<&'a [f32]>) -> Self {
        Self { accumulate: true, bias, gelu: false }
    }

    /// GELU on the result as well.
    pub fn gelu(self) -> Self {
        Self { gelu: true, ..self }
    }
}

/// `row ← row + bias`, then GELU when `gelu`: an [`Epilogue`] on a piece of an output row
/// (`bias` as long as `row`). Inlined into callers compiled for AVX-512 (the AMX kernel's).
#[inline(always)]
pub(crate) fn finish(row: &mut [f32], bias: Option<&[f32]>, gelu_after: bool) {
    if let Some(b) = bias {
        for (v, b) in row.iter_mut().zip(b) {
            *v += b;
        }
    }
    if gelu_after {
        for v in row.iter_mut() {
            *v = gelu(*v);
        }
    }
}

/// `e^x` to about 2 ulp for x in [-87, 88], 0 below (masked scores are -inf), in straight-line
/// code that LLVM vectorises: x = n·ln2 + r, e^r by Cephes' degree-6 polynomial, 2^n by bits.
/// `mul_add` is one instruction in the AVX2/AVX-512 builds (and on aarch64); only an x86 CPU
/// without FMA (before 2013) pays a libm call for it.
///
/// n is rounded by adding 1.5·2²³, which leaves it in the low bits of the sum: a float-to-int
/// `as` cast would saturate and map NaN to 0, and LLVM does that one lane at a time (it made
/// softmax and GELU ten times slower).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³
    let xc = x.clamp(-87.0, 88.0);
    let t = xc.mul_add(LOG2E, ROUND);
    let n = t - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc));
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let er = (p * r).mul_add(r, r) + 1.0;
    // t's bits are ROUND's plus n; 2^n is (n + 127) in the exponent field.
    let scale = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    if x < -87.0 { 0.0 } else { er * scale }
}

/// erf(x) to 5e-7 absolute: x·P(x²)/Q(x²) on x clamped to [-4, 4] (beyond which erf is ±1 in
/// f32), the rational approximation XLA and Eigen use for f32: one division and twelve
/// multiply-adds, branch-free, so that it vectorises.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p.mul_add(x2, 2.770_681_4e-8);
    p = p.mul_add(x2, -2.101_024e-6);
    p = p.mul_add(x2, -5.692_506_4e-5);
    p = p.mul_add(x2, -7.349_906e-4);
    p = p.mul_add(x2, -2.954_600_2e-3);
    p = p.mul_add(x2, -1.609_603_4e-2);
    let mut q = -1.456_607_2e-5_f32;
    q = q.mul_add(x2, -2.133_740_5e-4);
    q = q.mul_add(x2, -1.682_827e-3);
    q = q.mul_add(x2, -7.373_329e-3);
    q = q.mul_add(x2, -1.426_474e-2);
    x * p / q
}

/// The exact (erf) GELU BERT uses.
#[inline(always)]
pub(crate) fn gelu(v: f32) -> f32 {
    0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2))
}

/// For kernel tests: `got` (`m` rows at stride `ldo`, which held `start` before the product) is
/// `then` applied to `product(i, j)` within `tol` for the first `n` columns, and unchanged past
/// them.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn assert_epilogue(
    got: &[f32],
    start: &[f32],
    (m, n, ldo): (usize, usize, usize),
    then: Epilogue,
    product: impl Fn(usize, usize) -> f64,
    tol: f64,
    what: &str,
) {
    for i in 0..m {
        for j in 0..ldo {
            let (g, s) = (got[i * ldo + j], start[i * ldo + j]);
            if j >= n {
                assert_eq!(g, s, "{what}: a value past the output columns changed");
                continue;
            }
            let mut e = product(i, j) + then.bias.map_or(0.0, |b| f64::from(b[j]));
            if then.accumulate {
                e += f64::from(s);
            }
            if then.gelu {
                e = f64::from(gelu(e as f32));
            }
            assert!((f64::from(g) - e).abs() <= tol, "{what} [{i},{j}]: {g} vs {e}");
        }
    }
}

/// A deterministic uniform generator on [-half, half) for kernel tests (an LCG).
#[cfg(test)]
pub(crate) fn uniform(seed: u64, half: f32) -> impl FnMut() -> f32 {
    let mut s = seed;
    move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * half
    }
}

/// Test support for the bf16 attention kernels: asserts that `out` ([t rows at stride `ldo`])
/// holds attention over every head of `qkv` (t rows at stride 3·`width`; queries, keys and
/// values from columns 0, `width` and 2·`width`), computed in f64 over the operands rounded to
/// bf16, within the rounding of the weights to bf16 (2⁻⁹ of the largest value, 2⁻⁸ allowed),
/// and that the two columns past the heads still hold 7.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn assert_attention(qkv: &[f32], width: usize, t: usize, heads: usize, d: usize, out: &[f32], ldo: usize) {
    let at =
        |m: usize, i: usize, c: usize| f64::from(half::bf16::from_f32(qkv[i * 3 * width + m * width + c]).to_f32());
    let scale = 1.0 / (d as f64).sqrt();
    for h in 0..heads {
        let vmax =
            (0..t).flat_map(|j| (0..d).map(move |c| (j, c))).fold(0f64, |a, (j, c)| a.max(at(2, j, h * d + c).abs()));
        for i in 0..t {
            let sc: Vec<f64> = (0..t)
                .map(|j| (0..d).map(|c| at(0, i, h * d + c) * at(1, j, h * d + c)).sum::<f64>() * scale)
                .collect();
            let max = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = sc.iter().map(|v| (v - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for c in 0..d {
                let want: f64 = (0..t).map(|j| e[j] / sum * at(2, j, h * d + c)).sum();
                let got = f64::from(out[i * ldo + h * d + c]);
                let what = format!("t={t} heads={heads} d={d} [{i},{h},{c}]");
                assert!((got - want).abs() <= vmax / 256.0, "{what}: {got} vs {want}");
            }
        }
    }
    for i in 0..t {
        assert_eq!(out[i * ldo + heads * d..][..2], [7.0, 7.0], "t={t}: a column past the heads changed");
    }
}
