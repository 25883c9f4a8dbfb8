//! The Llama-family decoder on the CPU without candle's ops: the policy's prefill, lock-step
//! decoding and teacher forcing in f32, bf16 or f16, with a KV cache of its own.
//!
//! Why: candle runs about 35 CPU ops per layer of a decode step, most on one thread, each
//! allocating its output and followed by its thread pool spinning at a barrier; at N = 16 on a
//! Qwen2.5-0.5B shape they cost as much as the products. Here a layer is four products (q/k/v
//! and gate/up stacked) and a handful of fused passes over the step's few rows, each parallel
//! across rows.
//!
//! Numerics are transformers' (eager attention) in the model's dtype: activations are held in
//! f32 but rounded to the dtype exactly where torch rounds its bf16/f16 tensors: after every
//! product (f32 sums, bias added before the one rounding), after RMSNorm's normalisation and
//! again after its weight, after each of RoPE's products and its sum, after the attention scores
//! and their scaling, after the f32 softmax, after SiLU, after the gating product and after each
//! residual addition. In f32 every rounding is the identity. The products are those of
//! [`crate::lowp`] (half precision) and [`crate::linear`] (f32): each output sums its terms in a
//! fixed order whatever the number of rows, and attention reads one row at a time, so a row's
//! numbers do not depend on its batch.

use half::{bf16, f16};
use rayon::prelude::*;

use candle_core::{DType, Tensor};

use crate::config::DecoderConfig;
use crate::epilogue::{Mat, exp};
use crate::kernels::{max_of, multiversion, sum_of};
use crate::lowp::{self, Half};

type Result<T> = std::result::Result<T, candle_core::Error>;

/// The dtype activations are rounded to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Precision {
    F32,
    Bf16,
    F16,
}

impl Precision {
    fn of(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F32 => Some(Self::F32),
            DType::BF16 => Some(Self::Bf16),
            DType::F16 => Some(Self::F16),
            _ => None,
        }
    }

    /// `v` rounded to this dtype (nearest, ties to even), as f32.
    #[inline(always)]
    fn round(self, v: f32) -> f32 {
        match self {
            Self::F32 => v,
            Self::Bf16 => round_bf16(v),
            Self::F16 => f16::from_f32_const(v).to_f32_const(),
        }
    }
}

/// The bf16 nearest to `v` (ties to even), as f32; NaN stays NaN. Branch-free, so loops of it
/// vectorise (`half`'s conversion branches on NaN).
#[inline(always)]
fn round_bf16(v: f32) -> f32 {
    let b = v.to_bits();
    let r = f32::from_bits(b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000);
    if v.is_nan() { v } else { r }
}

/// Calls `$f::<R>(args)` with the [`Round`] of precision `$p`: each loop is compiled per
/// rounding, with no dispatch inside it.
macro_rules! by_precision {
    ($p:expr, $f:ident($($arg:expr),*)) => {
        match $p {
            Precision::F32 => $f::<NoRound>($($arg),*),
            Precision::Bf16 => $f::<Bf16Round>($($arg),*),
            Precision::F16 => $f::<F16Round>($($arg),*),
        }
    };
}

/// A rounding to a dtype, as a type, so that generic loops are compiled once per dtype.
pub(crate) trait Round {
    fn r(v: f32) -> f32;
}

pub(crate) struct NoRound;
struct Bf16Round;
struct F16Round;

impl Round for NoRound {
    #[inline(always)]
    fn r(v: f32) -> f32 {
        v
    }
}

impl Round for Bf16Round {
    #[inline(always)]
    fn r(v: f32) -> f32 {
        round_bf16(v)
    }
}

impl Round for F16Round {
    #[inline(always)]
    fn r(v: f32) -> f32 {
        Precision::F16.round(v)
    }
}

/// A weight [rows, cols] (out, in) in the model's dtype.
#[derive(Debug)]
struct Dense {
    data: Data,
    rows: usize,
    cols: usize,
}

#[derive(Debug)]
enum Data {
    F32(Vec<f32>),
    Half(Half, Vec<u16>),
}

impl Dense {
    /// The weights of `parts` [rows_i, cols] stacked row-wise.
    fn stacked(parts: &[&Tensor]) -> Result<Self> {
        let t = if parts.len() == 1 { parts[0].clone() } else { Tensor::cat(parts, 0)? };
        let (rows, cols) = t.dims2()?;
        let flat = t.flatten_all()?;
        let data = match t.dtype() {
            DType::F32 => Data::F32(flat.to_vec1()?),
            DType::BF16 => Data::Half(Half::Bf16, flat.to_vec1::<bf16>()?.into_iter().map(bf16::to_bits).collect()),
            DType::F16 => Data::Half(Half::F16, flat.to_vec1::<f16>()?.into_iter().map(f16::to_bits).collect()),
            d => candle_core::bail!("weights in {d:?} do not run on the host decoder"),
        };
        Ok(Self { data, rows, cols })
    }

    /// Row `i` widened to f32 into `out` (an embedding lookup).
    fn row(&self, i: usize, out: &mut [f32]) {
        let k = self.cols;
        match &self.data {
            Data::F32(d) => out.copy_from_slice(&d[i * k..][..k]),
            Data::Half(Half::Bf16, d) => {
                for (o, &b) in out.iter_mut().zip(&d[i * k..][..k]) {
                    *o = f32::from_bits(u32::from(b) << 16);
                }
            }
            Data::Half(Half::F16, d) => {
                for (o, &b) in out.iter_mut().zip(&d[i * k..][..k]) {
                    *o = f16::from_bits(b).to_f32();
                }
            }
        }
    }

    /// `out [m, rows] = x [m, cols] · wᵀ`, each value through `f`. `x` holds values of the
    /// weight's dtype (exact in it), so passing them as that dtype loses nothing.
    fn product(&self, x: &[f32], m: usize, out: &mut [f32], f: impl Fn(f32) -> f32 + Sync) {
        let (n, k) = (self.rows, self.cols);
        let (x, out) = (&x[..m * k], &mut out[..m * n]);
        match &self.data {
            Data::Half(kind, w) => {
                let mut xb = vec![0u16; m * k];
                match kind {
                    Half::Bf16 => xb.iter_mut().zip(x).for_each(|(o, &v)| *o = lowp::bf16_bits(v)),
                    Half::F16 => xb.iter_mut().zip(x).for_each(|(o, &v)| *o = f16::from_f32(v).to_bits()),
                }
                lowp::matmul_t_into(*kind, &xb, w, m, k, n, true, out, f);
            }
            Data::F32(w) if m <= crate::linear::small_m() => {
                lowp::by_weight_blocks(m, n, true, out, f, |j0, rows, part| {
                    if k > 0 {
                        crate::linear::block(x, &w[j0 * k..(j0 + rows) * k], part, m, k);
                    }
                });
            }
            Data::F32(w) => {
                // Long prefills: gemm (its sums in another order, as candle's f32 matmul).
                crate::kernels::matmul_t(Mat::new(x, m, k), Mat::new(w, n, k), out, n, false, true);
                out.par_chunks_mut(n).for_each(|r| r.iter_mut().for_each(|v| *v = f(*v)));
            }
        }
    }
}

fn vec_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()
}

/// Biases of stacked layers (zeros for a layer without).
fn stacked_bias(parts: &[(Option<&Tensor>, usize)]) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for (b, rows) in parts {
        match b {
            Some(b) => out.extend(vec_f32(b)?),
            None => out.extend(std::iter::repeat_n(0f32, *rows)),
        }
    }
    Ok(out)
}

/// A linear layer's weight and bias.
pub(crate) type Linear = (Tensor, Option<Tensor>);

/// One layer's weights, as [`HostModel::new`] takes them (owned handles: a layer's storage is
/// freed once its parts are converted).
pub(crate) struct LayerParts {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub ln1: Tensor,
    pub ln2: Tensor,
}

#[derive(Debug)]
struct Layer {
    /// q, k and v stacked: [(heads + 2·kv_heads)·d, hidden].
    qkv: Dense,
    /// Biases, zeros for a layer without.
    qkv_b: Vec<f32>,
    o: Dense,
    o_b: Vec<f32>,
    /// gate and up stacked: [2·intermediate, hidden].
    gate_up: Dense,
    gate_up_b: Vec<f32>,
    down: Dense,
    down_b: Vec<f32>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    ln1: Vec<f32>,
    ln2: Vec<f32>,
}

/// The host decoder; built by [`crate::Decoder::load`] where it applies (see
/// [`crate::Decoder::on_host`]).
#[derive(Debug)]
pub(crate) struct HostModel {
    cfg: DecoderConfig,
    precision: Precision,
    embed: Dense,
    /// None: tied to the embeddings.
    head: Option<Dense>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    inv_freq: Vec<f32>,
    rope_interleaved: bool,
}

/// Keys and values of one row, per layer: [positions, kv_heads·d] each, row-major.
#[derive(Debug, Clone)]
struct RowKv {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// The host decoder's KV cache: rows that share one length.
#[derive(Debug)]
pub(crate) struct HostCache {
    pub(crate) len: usize,
    rows: Vec<RowKv>,
}

impl HostCache {
    pub(crate) fn new() -> Self {
        Self { len: 0, rows: Vec::new() }
    }

    /// Row 0 copied into `n` rows.
    pub(crate) fn fork(&self, n: usize) -> Result<Self> {
        let Some(first) = self.rows.first() else { candle_core::bail!("the cache is empty") };
        Ok(Self { len: self.len, rows: vec![first.clone(); n] })
    }

    /// The rows `rows`, in that order.
    pub(crate) fn select(&self, rows: &[u32]) -> Result<Self> {
        let picked = rows
            .iter()
            .map(|&r| self.rows.get(r as usize).cloned())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| candle_core::Error::Msg("a selected row is not in the cache".into()))?;
        Ok(Self { len: self.len, rows: picked })
    }

    /// Keeps `rows` (increasing), moving them rather than copying.
    pub(crate) fn keep(&mut self, rows: &[u32]) -> Result<()> {
        if rows.windows(2).any(|w| w[0] >= w[1]) || rows.last().is_some_and(|&r| r as usize >= self.rows.len()) {
            candle_core::bail!("rows to keep must be increasing and in the cache");
        }
        let mut next = rows.iter().peekable();
        let mut i = 0u32;
        self.rows.retain(|_| {
            let keep = next.peek().is_some_and(|&&r| r == i);
            if keep {
                next.next();
            }
            i += 1;
            keep
        });
        Ok(())
    }
}

/// RMSNorm per row of `w.len()`, rounding as `R` (f32: `x · rsqrt(mean(x²) + eps) · w`).
#[inline(always)]
pub(crate) fn rms_norm_with<R: Round>(x: &[f32], out: &mut [f32], w: &[f32], eps: f32) {
    let width = w.len();
    for (row, o) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let ms = sum_of(row, |v| v * v) / width as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(w) {
            *o = R::r(R::r(v * inv) * w);
        }
    }
}

multiversion! {
    /// RMSNorm as transformers computes it in the model's dtype, per row of `w.len()`:
    /// n = round(x · rsqrt(mean(x²) + eps)), out = round(n · w).
    fn rms_norm_rows(x: &[f32], out: &mut [f32], w: &[f32], eps: f32, p: Precision) {
        by_precision!(p, rms_norm_with(x, out, w, eps))
    }
}

/// `x ← round(x + round(y + b))` for rows of `b`'s width (a residual after a product).
#[inline(always)]
fn residual_with<R: Round>(x: &mut [f32], y: &[f32], b: &[f32]) {
    for (xr, yr) in x.chunks_exact_mut(b.len()).zip(y.chunks_exact(b.len())) {
        for ((x, y), b) in xr.iter_mut().zip(yr).zip(b) {
            *x = R::r(*x + R::r(y + b));
        }
    }
}

multiversion! {
    /// `x ← round(x + round(y + b))` over rows of `b`'s width (zeros for a layer without bias).
    fn residual_rows(x: &mut [f32], y: &[f32], b: &[f32], p: Precision) {
        by_precision!(p, residual_with(x, y, b))
    }
}

#[inline(always)]
fn gated_with<R: Round>(act: &[f32], b: &[f32], out: &mut [f32]) {
    let inter = out.len();
    let (g, u) = act.split_at(inter);
    let (bg, bu) = b.split_at(inter);
    for i in 0..inter {
        let g = R::r(g[i] + bg[i]);
        let u = R::r(u[i] + bu[i]);
        out[i] = R::r(R::r(g / (1.0 + exp(-g))) * u);
    }
}

multiversion! {
    /// One row of [gate ‖ up] (width 2·inter) into `out` [inter]:
    /// round(round(silu(g)) · u) with g = round(gate + b), u = round(up + b).
    fn gated_row(act: &[f32], b: &[f32], out: &mut [f32], p: Precision) {
        by_precision!(p, gated_with(act, b, out))
    }
}

multiversion! {
    /// `x · y` with 16 partial sums.
    fn dot(x: &[f32], y: &[f32]) -> f32 {
        let mut acc = [0f32; 16];
        let (xc, xr) = x.as_chunks::<16>();
        let (yc, yr) = y.as_chunks::<16>();
        for (a, b) in xc.iter().zip(yc) {
            for l in 0..16 {
                acc[l] += a[l] * b[l];
            }
        }
        acc.iter().sum::<f32>() + xr.iter().zip(yr).map(|(a, b)| a * b).sum::<f32>()
    }
}

multiversion! {
    /// `out ← round(Σ_j p_j · v_j)` over value rows v_j = v[j·stride..][..out.len()].
    fn weighted_sum(probs: &[f32], v: &[f32], stride: usize, out: &mut [f32], p: Precision) {
        out.fill(0.0);
        let d = out.len();
        for (j, &w) in probs.iter().enumerate() {
            for (o, x) in out.iter_mut().zip(&v[j * stride..][..d]) {
                *o += w * x;
            }
        }
        by_precision!(p, round_all(out));
    }
}

multiversion! {
    /// softmax in f32 of one row of scores in place, then each probability rounded.
    fn softmax_rounded(s: &mut [f32], p: Precision) {
        let max = max_of(s);
        for v in s.iter_mut() {
            *v = exp(*v - max);
        }
        let inv = 1.0 / sum_of(s, |v| v);
        for v in s.iter_mut() {
            *v *= inv;
        }
        by_precision!(p, round_all(s));
    }
}

#[inline(always)]
fn round_all<R: Round>(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = R::r(*v);
    }
}

multiversion! {
    /// Bias added, then each value rounded (a product's outputs).
    fn bias_round(x: &mut [f32], b: &[f32], p: Precision) {
        by_precision!(p, bias_round_with(x, b))
    }
}

#[inline(always)]
fn bias_round_with<R: Round>(x: &mut [f32], b: &[f32]) {
    for (v, b) in x.iter_mut().zip(b) {
        *v = R::r(*v + b);
    }
}

impl HostModel {
    /// Whether the host decoder runs models in `dtype` (f32, bf16 and f16).
    pub(crate) fn supports(dtype: DType) -> bool {
        Precision::of(dtype).is_some()
    }

    /// A model in `dtype` ([`Self::supports`]) from its weights, converted one layer at a time.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: &DecoderConfig,
        dtype: DType,
        embed: &Tensor,
        head: Option<&Tensor>,
        layers: impl Iterator<Item = LayerParts>,
        norm: &Tensor,
        inv_freq: &[f32],
        rope_interleaved: bool,
    ) -> Result<Self> {
        let Some(precision) = Precision::of(dtype) else {
            candle_core::bail!("the host decoder does not run {dtype:?} models")
        };
        let w = |t: &Tensor| -> Result<Tensor> { t.to_dtype(dtype) };
        let stack = |parts: &[&Linear]| -> Result<(Dense, Vec<f32>)> {
            let ws = parts.iter().map(|(t, _)| w(t)).collect::<Result<Vec<_>>>()?;
            let refs: Vec<&Tensor> = ws.iter().collect();
            let bias = parts.iter().map(|(t, b)| Ok((b.as_ref(), t.dim(0)?))).collect::<Result<Vec<_>>>()?;
            Ok((Dense::stacked(&refs)?, stacked_bias(&bias)?))
        };
        let layers = layers
            .map(|l| {
                let (qkv, qkv_b) = stack(&[&l.q, &l.k, &l.v])?;
                let (o, o_b) = stack(&[&l.o])?;
                let (gate_up, gate_up_b) = stack(&[&l.gate, &l.up])?;
                let (down, down_b) = stack(&[&l.down])?;
                Ok(Layer {
                    qkv,
                    qkv_b,
                    o,
                    o_b,
                    gate_up,
                    gate_up_b,
                    down,
                    down_b,
                    q_norm: l.q_norm.as_ref().map(vec_f32).transpose()?,
                    k_norm: l.k_norm.as_ref().map(vec_f32).transpose()?,
                    ln1: vec_f32(&l.ln1)?,
                    ln2: vec_f32(&l.ln2)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            precision,
            embed: Dense::stacked(&[&w(embed)?])?,
            head: head.map(|h| Dense::stacked(&[&w(h)?])).transpose()?,
            layers,
            norm: vec_f32(norm)?,
            inv_freq: inv_freq.to_vec(),
            rope_interleaved,
        })
    }

    /// Runs `ids` [rows, t] (row-major) after the cached positions; returns the final-norm
    /// hidden states [rows·t, hidden].
    pub(crate) fn hidden(&self, ids: &[u32], rows: usize, cache: &mut HostCache) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let p = self.precision;
        let (h, d, heads, kvh, inter) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.intermediate_size);
        let eps = c.rms_norm_eps as f32;
        if rows == 0 || ids.is_empty() || !ids.len().is_multiple_of(rows) {
            candle_core::bail!("{} token ids do not make {rows} rows", ids.len());
        }
        if let Some(id) = ids.iter().find(|&&id| id as usize >= c.vocab_size) {
            candle_core::bail!("token id {id} is outside the vocabulary of {}", c.vocab_size);
        }
        let t = ids.len() / rows;
        let m = ids.len();
        if cache.rows.is_empty() && cache.len == 0 {
            let empty = RowKv { k: vec![Vec::new(); self.layers.len()], v: vec![Vec::new(); self.layers.len()] };
            cache.rows = vec![empty; rows];
        } else if cache.rows.len() != rows {
            candle_core::bail!("{rows} rows of ids for a cache of {} rows", cache.rows.len());
        }
        let start = cache.len;
        let (q_w, kv_w) = (heads * d, kvh * d);
        let qkv_w = q_w + 2 * kv_w;
        let mut x = vec![0f32; m * h];
        x.par_chunks_mut(h).zip(ids.par_iter()).for_each(|(o, &id)| self.embed.row(id as usize, o));
        let mut xn = vec![0f32; m * h];
        let mut qkv = vec![0f32; m * qkv_w];
        let mut ctx = vec![0f32; m * q_w];
        let mut y = vec![0f32; m * h];
        let mut act = vec![0f32; m * 2 * inter];
        let mut gated = vec![0f32; m * inter];
        let tasks = |width: usize| (4096 / width.max(1)).max(1);
        for (li, l) in self.layers.iter().enumerate() {
            let norm = |x: &[f32], xn: &mut [f32], w: &[f32]| {
                x.par_chunks(h * tasks(h))
                    .zip(xn.par_chunks_mut(h * tasks(h)))
                    .for_each(|(x, o)| rms_norm_rows(x, o, w, eps, p));
            };
            norm(&x, &mut xn, &l.ln1);
            l.qkv.product(&xn, m, &mut qkv, |v| v);
            qkv.par_chunks_mut(qkv_w).enumerate().for_each_init(
                || (vec![0f32; self.inv_freq.len()], vec![0f32; self.inv_freq.len()]),
                |(cos, sin), (tok, row)| {
                    bias_round(row, &l.qkv_b, p);
                    self.norm_and_rope(l, row, start + tok % t, cos, sin);
                },
            );
            for (r, kv) in cache.rows.iter_mut().enumerate() {
                for i in 0..t {
                    let row = &qkv[(r * t + i) * qkv_w..][..qkv_w];
                    kv.k[li].extend_from_slice(&row[q_w..q_w + kv_w]);
                    kv.v[li].extend_from_slice(&row[q_w + kv_w..]);
                }
            }
            let kv_rows = &cache.rows;
            let qkv_ref = &qkv;
            ctx.par_chunks_mut(q_w).enumerate().for_each_init(Vec::new, |scores, (tok, out)| {
                let (r, i) = (tok / t, tok % t);
                let q = &qkv_ref[tok * qkv_w..][..q_w];
                self.attend(q, &kv_rows[r].k[li], &kv_rows[r].v[li], start + i, out, scores);
            });
            l.o.product(&ctx, m, &mut y, |v| v);
            x.par_chunks_mut(h * tasks(h))
                .zip(y.par_chunks(h * tasks(h)))
                .for_each(|(x, y)| residual_rows(x, y, &l.o_b, p));
            norm(&x, &mut xn, &l.ln2);
            l.gate_up.product(&xn, m, &mut act, |v| v);
            act.par_chunks(2 * inter)
                .zip(gated.par_chunks_mut(inter))
                .for_each(|(a, g)| gated_row(a, &l.gate_up_b, g, p));
            l.down.product(&gated, m, &mut y, |v| v);
            x.par_chunks_mut(h * tasks(h))
                .zip(y.par_chunks(h * tasks(h)))
                .for_each(|(x, y)| residual_rows(x, y, &l.down_b, p));
        }
        cache.len += t;
        x.par_chunks(h * tasks(h))
            .zip(xn.par_chunks_mut(h * tasks(h)))
            .for_each(|(x, o)| rms_norm_rows(x, o, &self.norm, eps, p));
        Ok(xn)
    }

    /// Logits [rows, vocab] of final hidden states [rows, hidden]: the head's products rounded
    /// to the dtype (transformers' logits), as f32.
    pub(crate) fn logits(&self, hidden: &[f32], rows: usize) -> Vec<f32> {
        let head = self.head.as_ref().unwrap_or(&self.embed);
        let mut out = vec![0f32; rows * head.rows];
        match self.precision {
            Precision::F32 => head.product(hidden, rows, &mut out, NoRound::r),
            Precision::Bf16 => head.product(hidden, rows, &mut out, Bf16Round::r),
            Precision::F16 => head.product(hidden, rows, &mut out, F16Round::r),
        }
        out
    }

    /// Qwen3's per-head q/k RMSNorm, then RoPE at position `pos`, on one token's [q ‖ k ‖ v].
    fn norm_and_rope(&self, l: &Layer, tok: &mut [f32], pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        let c = &self.cfg;
        let p = self.precision;
        let (d, heads, kvh) = (c.head_dim, c.num_heads, c.num_kv_heads);
        let half = self.inv_freq.len();
        for (i, f) in self.inv_freq.iter().enumerate() {
            // Angles in f32, cos and sin rounded to the dtype, as transformers computes them.
            let a = pos as f32 * f;
            cos[i] = p.round(a.cos());
            sin[i] = p.round(a.sin());
        }
        let eps = c.rms_norm_eps as f32;
        let mut tmp = vec![0f32; d];
        for head in 0..heads + kvh {
            let x = &mut tok[head * d..(head + 1) * d];
            let w = if head < heads { l.q_norm.as_deref() } else { l.k_norm.as_deref() };
            if let Some(w) = w {
                tmp.copy_from_slice(x);
                rms_norm_rows(&tmp, x, w, eps, p);
            }
            let r = |a: f32| p.round(a);
            if self.rope_interleaved {
                for i in 0..half {
                    let (a, b) = (x[2 * i], x[2 * i + 1]);
                    x[2 * i] = r(r(a * cos[i]) - r(b * sin[i]));
                    x[2 * i + 1] = r(r(b * cos[i]) + r(a * sin[i]));
                }
            } else {
                for i in 0..half {
                    let (a, b) = (x[i], x[i + half]);
                    x[i] = r(r(a * cos[i]) - r(b * sin[i]));
                    x[i + half] = r(r(b * cos[i]) + r(a * sin[i]));
                }
            }
        }
    }

    /// Attention of one query (all heads, [heads·d]) at position `pos` over its row's keys and
    /// values `k`, `v` [positions, kv_heads·d], into `out` [heads·d]: eager attention's
    /// roundings (scores, scaled scores, probabilities, output).
    fn attend(&self, q: &[f32], k: &[f32], v: &[f32], pos: usize, out: &mut [f32], s: &mut Vec<f32>) {
        let c = &self.cfg;
        let p = self.precision;
        let (d, heads, kvh) = (c.head_dim, c.num_heads, c.num_kv_heads);
        let kv_w = kvh * d;
        let rep = heads / kvh.max(1);
        let scale = 1.0 / (d as f32).sqrt();
        let lo = c.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
        for hd in 0..heads {
            let g = hd / rep.max(1);
            let qh = &q[hd * d..][..d];
            s.clear();
            s.extend((lo..=pos).map(|j| p.round(p.round(dot(qh, &k[j * kv_w + g * d..][..d])) * scale)));
            softmax_rounded(s, p);
            weighted_sum(s, &v[lo * kv_w + g * d..], kv_w, &mut out[hd * d..][..d], p);
        }
    }
}
