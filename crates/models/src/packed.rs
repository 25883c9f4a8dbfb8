//! The Llama-family decoder over packed rows on the CPU in f32, for reward models: the tokens of
//! every row sit end to end in one [tokens, hidden] matrix (no padding), each linear layer is one
//! GEMM over all of them, and causal attention runs per row over exactly its tokens. A reward
//! head reads only each row's last token, so the last layer computes its attention output and
//! MLP for those tokens alone. Numerically the same model as [`crate::Decoder`] (the parity
//! tests run both against transformers).

use rayon::prelude::*;

use crate::config::DecoderConfig;
use crate::kernels::{self, Epilogue, Mat, Visibility, Weight};

type Result<T> = std::result::Result<T, candle_core::Error>;

#[derive(Debug)]
pub(crate) struct PackedLayer {
    /// q, k and v weights stacked: [(heads + 2·kv_heads)·d, hidden].
    pub qkv_w: Weight,
    pub qkv_b: Option<Vec<f32>>,
    pub o_w: Weight,
    pub o_b: Option<Vec<f32>>,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    /// gate and up weights stacked: [2·intermediate, hidden].
    pub gate_up_w: Weight,
    pub gate_up_b: Option<Vec<f32>>,
    pub down_w: Weight,
    pub down_b: Option<Vec<f32>>,
    pub ln1: Vec<f32>,
    pub ln2: Vec<f32>,
}

/// A decoder over packed rows (CPU, f32, dense weights); built by [`crate::Decoder::packed`].
#[derive(Debug)]
pub struct PackedDecoder {
    pub(crate) cfg: DecoderConfig,
    pub(crate) embed: Vec<f32>,
    pub(crate) layers: Vec<PackedLayer>,
    pub(crate) norm: Vec<f32>,
    pub(crate) inv_freq: Vec<f32>,
    pub(crate) rope_interleaved: bool,
}

impl PackedDecoder {
    /// The final-norm hidden state at the last token of each row: [rows, hidden], row-major.
    pub fn last_hidden(&self, rows: &[&[u32]]) -> Result<Vec<f32>> {
        self.last_hidden_shared(&[], rows)
    }

    /// [`Self::last_hidden`] of the rows `prefix ++ suffix` for each suffix, computing the shared
    /// prefix once: its tokens sit once at the start of the packed matrix, and each suffix's
    /// tokens attend to the prefix's keys and values and then to their own. This is how the N
    /// responses of one prompt are scored (the rendered prompt is their common prefix).
    pub fn last_hidden_shared(&self, prefix: &[u32], suffixes: &[&[u32]]) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let (h, d, heads, kvh, inter) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.intermediate_size);
        let eps = c.rms_norm_eps as f32;
        let p = prefix.len();
        if suffixes.is_empty() {
            return Ok(Vec::new());
        }
        // Segment 0 is the prefix (possibly empty), then one segment per suffix.
        let mut offsets = vec![0usize, p];
        for r in suffixes {
            if r.is_empty() {
                candle_core::bail!("a row to score has no tokens past the shared prefix");
            }
            offsets.push(offsets[offsets.len() - 1] + r.len());
        }
        let total = offsets[offsets.len() - 1];
        let nrows = suffixes.len();
        let ids: Vec<u32> = prefix.iter().chain(suffixes.iter().flat_map(|r| r.iter())).copied().collect();
        if let Some(id) = ids.iter().find(|&&id| id as usize >= c.vocab_size) {
            candle_core::bail!("token id {id} is outside the vocabulary of {}", c.vocab_size);
        }
        let mut x = vec![0f32; total * h];
        x.par_chunks_mut(h)
            .zip(ids.par_iter())
            .for_each(|(o, &id)| o.copy_from_slice(&self.embed[id as usize * h..][..h]));
        let positions: Vec<usize> = (0..p).chain(suffixes.iter().flat_map(|r| p..p + r.len())).collect();
        let qkv_w = (heads + 2 * kvh) * d;
        let (kv_w, q_w) = (kvh * d, heads * d);
        let mut xn = vec![0f32; total * h];
        let mut qkv = vec![0f32; total * qkv_w];
        let mut ctx = vec![0f32; total * q_w];
        let mut act = vec![0f32; total * 2 * inter];
        let vis = Visibility::Causal(c.sliding_window);
        let last_token = |r: usize| offsets[r + 2] - 1;
        let last = self.layers.len().saturating_sub(1);
        for (li, l) in self.layers.iter().enumerate() {
            kernels::rms_norm(&x, &mut xn, &l.ln1, eps);
            let then = Epilogue::overwrite(l.qkv_b.as_deref());
            kernels::linear(Mat::new(&xn, total, h), &l.qkv_w, &mut qkv, qkv_w, then, true);
            self.norm_and_rope(l, &mut qkv, &positions);
            let qkv_ref = &qkv;
            // Attention of segment `seg` for its queries from `q_from` on, into `out`.
            let attend = |seg: usize, q_from: usize, out: &mut [f32], scratch: &mut (Vec<f32>, Vec<f32>, Vec<f32>)| {
                let (s, e) = (offsets[seg], offsets[seg + 1]);
                let view = |from: usize, rows: usize, col: usize, cols: usize| Mat {
                    data: &qkv_ref[from * qkv_w + col..],
                    rows,
                    cols,
                    stride: qkv_w,
                };
                let q = view(s + q_from, e - s - q_from, 0, q_w);
                let (sc, kb, vb) = scratch;
                if seg == 0 || p == 0 {
                    let (k, v) = (view(s, e - s, q_w, kv_w), view(s, e - s, q_w + kv_w, kv_w));
                    kernels::attention(q, k, v, heads, kvh, d, vis, out, q_w, sc);
                } else {
                    // The prefix's keys and values, then the suffix's, gathered contiguous.
                    let t = p + e - s;
                    kb.clear();
                    vb.clear();
                    for tok in (0..p).chain(s..e) {
                        let row = &qkv_ref[tok * qkv_w..][..qkv_w];
                        kb.extend_from_slice(&row[q_w..q_w + kv_w]);
                        vb.extend_from_slice(&row[q_w + kv_w..]);
                    }
                    let (k, v) = (Mat::new(kb, t, kv_w), Mat::new(vb, t, kv_w));
                    kernels::attention(q, k, v, heads, kvh, d, vis, out, q_w, sc);
                }
            };
            let scratch = || (Vec::new(), Vec::new(), Vec::new());
            if li < last {
                kernels::split_rows(&mut ctx, &offsets, q_w)
                    .into_par_iter()
                    .enumerate()
                    .for_each_init(scratch, |sc, (seg, out)| attend(seg, 0, out, sc));
                self.mlp_block(l, &mut x, &mut xn, &ctx, &mut act, total);
            } else {
                // Only each row's last token feeds the head: attend from it alone, and run the
                // output projection and MLP on those rows.
                let mut ctx_last = vec![0f32; nrows * q_w];
                ctx_last
                    .par_chunks_mut(q_w)
                    .enumerate()
                    .for_each_init(scratch, |sc, (r, out)| attend(r + 1, offsets[r + 2] - offsets[r + 1] - 1, out, sc));
                let mut xl = vec![0f32; nrows * h];
                for (r, o) in xl.chunks_exact_mut(h).enumerate() {
                    o.copy_from_slice(&x[last_token(r) * h..][..h]);
                }
                let mut xn_l = vec![0f32; nrows * h];
                let mut act_l = vec![0f32; nrows * 2 * inter];
                self.mlp_block(l, &mut xl, &mut xn_l, &ctx_last, &mut act_l, nrows);
                x = xl;
            }
        }
        if self.layers.is_empty() {
            let mut xl = vec![0f32; nrows * h];
            for (r, o) in xl.chunks_exact_mut(h).enumerate() {
                o.copy_from_slice(&x[last_token(r) * h..][..h]);
            }
            x = xl;
        }
        let mut out = vec![0f32; nrows * h];
        kernels::rms_norm(&x, &mut out, &self.norm, eps);
        Ok(out)
    }

    /// x ← x + ctx·Woᵀ (+ b); x ← x + down(silu(gate(n)) · up(n)) with n = RMSNorm(x).
    fn mlp_block(&self, l: &PackedLayer, x: &mut [f32], xn: &mut [f32], ctx: &[f32], act: &mut [f32], n: usize) {
        let c = &self.cfg;
        let (h, hd, inter) = (c.hidden_size, c.num_heads * c.head_dim, c.intermediate_size);
        kernels::linear(Mat::new(ctx, n, hd), &l.o_w, x, h, Epilogue::accumulate(l.o_b.as_deref()), true);
        kernels::rms_norm(x, xn, &l.ln2, c.rms_norm_eps as f32);
        let then = Epilogue::overwrite(l.gate_up_b.as_deref());
        kernels::linear(Mat::new(xn, n, h), &l.gate_up_w, act, 2 * inter, then, true);
        act.par_chunks_mut(2 * inter * 8).for_each(|rows| {
            for row in rows.chunks_exact_mut(2 * inter) {
                let (g, u) = row.split_at_mut(inter);
                kernels::silu_mul_one(g, u);
            }
        });
        let a = Mat { data: act, rows: n, cols: inter, stride: 2 * inter };
        kernels::linear(a, &l.down_w, x, h, Epilogue::accumulate(l.down_b.as_deref()), true);
    }

    /// Qwen3's per-head q/k RMSNorm, then RoPE at each token's position in its row.
    fn norm_and_rope(&self, l: &PackedLayer, qkv: &mut [f32], positions: &[usize]) {
        let c = &self.cfg;
        let (d, heads, kvh) = (c.head_dim, c.num_heads, c.num_kv_heads);
        let width = (heads + 2 * kvh) * d;
        let eps = c.rms_norm_eps as f32;
        let half = self.inv_freq.len();
        qkv.par_chunks_mut(width).zip(positions.par_iter()).for_each_init(
            || (vec![0f32; half], vec![0f32; half], vec![0f32; d]),
            |(cos, sin, tmp), (tok, &p)| {
                for (i, f) in self.inv_freq.iter().enumerate() {
                    let a = p as f32 * f;
                    cos[i] = a.cos();
                    sin[i] = a.sin();
                }
                for head in 0..heads + kvh {
                    let x = &mut tok[head * d..(head + 1) * d];
                    let w = if head < heads { l.q_norm.as_deref() } else { l.k_norm.as_deref() };
                    if let Some(w) = w {
                        tmp.copy_from_slice(x);
                        let ms = tmp.iter().map(|v| v * v).sum::<f32>() / d as f32;
                        let inv = 1.0 / (ms + eps).sqrt();
                        for ((o, v), w) in x.iter_mut().zip(tmp.iter()).zip(w) {
                            *o = v * inv * w;
                        }
                    }
                    if self.rope_interleaved {
                        for i in 0..half {
                            let (a, b) = (x[2 * i], x[2 * i + 1]);
                            x[2 * i] = a * cos[i] - b * sin[i];
                            x[2 * i + 1] = a * sin[i] + b * cos[i];
                        }
                    } else {
                        for i in 0..half {
                            let (a, b) = (x[i], x[i + half]);
                            x[i] = a * cos[i] - b * sin[i];
                            x[i + half] = b * cos[i] + a * sin[i];
                        }
                    }
                }
            },
        );
    }
}
